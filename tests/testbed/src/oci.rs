//! Container images made reproducibly for tests and benchmarks, as an
//! image builder leaves them for a push: gzip'd layers (no timestamps, so
//! the same input gives the same digests) and the config that names their
//! uncompressed digests (`rootfs.diff_ids`), which Docker checks on load.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;
use sha2::Digest as _;

/// An image ready to push: its config (JSON) and its layer files, bottom first.
#[derive(Clone, Debug)]
pub struct Image {
    /// The config.
    pub config: Vec<u8>,
    /// The gzip'd layers.
    pub layers: Vec<PathBuf>,
}

impl Image {
    /// Its blobs' bytes (config and layers, as a registry sends them).
    ///
    /// # Errors
    /// A layer file gone.
    pub fn bytes(&self) -> anyhow::Result<u64> {
        let mut n = self.config.len() as u64;
        for l in &self.layers {
            n += std::fs::metadata(l)?.len();
        }
        Ok(n)
    }
}

/// A tar of `files` (path, content), mode 0644 with their directories,
/// mtime 0, written to `path`.
///
/// # Errors
/// The file cannot be written.
pub fn tar_of(path: &Path, files: &[(&str, &[u8])]) -> anyhow::Result<()> {
    let mut b = tar::Builder::new(std::fs::File::create(path).with_context(|| path.display().to_string())?);
    b.mode(tar::HeaderMode::Deterministic);
    let mut dirs = std::collections::BTreeSet::new();
    for (name, content) in files {
        let mut parent = Path::new(name).parent();
        let mut chain = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            chain.push(p.to_owned());
            parent = p.parent();
        }
        for d in chain.into_iter().rev() {
            if dirs.insert(d.clone()) {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, &d, std::io::empty())?;
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(content.len() as u64);
        b.append_data(&mut h, name, *content)?;
    }
    b.into_inner()?.sync_all()?;
    Ok(())
}

/// `n` bytes that do not compress, the same for the same `seed`
/// (xorshift): what an application's binaries and data cost to send.
pub fn filler(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// An image of the root file system tarballs `tars` (bottom first), each
/// gzip'd into `dir`, running `cmd` by default.
///
/// # Errors
/// A tarball that cannot be read, `dir` not writable.
pub fn image(dir: &Path, tars: &[&Path], cmd: &[&str]) -> anyhow::Result<Image> {
    std::fs::create_dir_all(dir)?;
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for tar in tars {
        let mut input = std::fs::File::open(tar).with_context(|| tar.display().to_string())?;
        let mut diff = sha2::Sha256::new();
        let tmp = dir.join("layer.gz.part");
        let mut gz = flate2::GzBuilder::new().mtime(0).write(std::fs::File::create(&tmp)?, flate2::Compression::fast());
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            diff.update(&buf[..n]);
            gz.write_all(&buf[..n])?;
        }
        gz.finish()?.sync_all()?;
        let diff_id = format!("sha256:{}", hex(&diff.finalize()));
        let compressed = sha2::Sha256::digest(std::fs::read(&tmp)?);
        let path = dir.join(format!("{}.tar.gz", hex(&compressed)));
        std::fs::rename(&tmp, &path)?;
        layers.push(path);
        diff_ids.push(diff_id);
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    Ok(Image { config: serde_json::to_vec(&config)?, layers })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One root file system tarball of the layer tarballs `tars` (bottom
/// first; a later entry of a path replaces an earlier one, as in a
/// container), written to `out`: what a store serves for the same image.
///
/// # Errors
/// A tarball that cannot be read, `out` not writable.
pub fn flatten(tars: &[&Path], out: &Path) -> anyhow::Result<()> {
    let mut b = tar::Builder::new(std::io::BufWriter::new(std::fs::File::create(out)?));
    for t in tars {
        let mut a = tar::Archive::new(std::fs::File::open(t).with_context(|| t.display().to_string())?);
        for e in a.entries()? {
            let e = e?;
            let mut h = e.header().clone();
            let path = e.path()?.into_owned();
            let link = e.link_name()?.map(std::borrow::Cow::into_owned);
            match link {
                Some(target) => b.append_link(&mut h, &path, &target)?,
                None => b.append_data(&mut h, &path, e)?,
            }
        }
    }
    b.into_inner()?.into_inner().map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?.sync_all()?;
    Ok(())
}
