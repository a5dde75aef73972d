//! A VM's cloud-init seed (NoCloud): a small FAT disk labelled `cidata`
//! holding `meta-data`, `user-data` and `network-config`, built in-process
//! (this host has no vfat module to mount one) and attached read-only.
//! Readable by root and QEMU's group only: user-data may hold secrets.

use std::io::{Cursor, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::{NoCloud, RuntimeError};

/// The smallest seed disk (FAT12 needs some room around its files).
const MIN_BYTES: usize = 1 << 20;
/// The most a seed's files may hold together.
pub const MAX_CONTENT: usize = 4 << 20;

/// The seed disk's bytes for `cloud`.
pub fn image(cloud: &NoCloud) -> Result<Vec<u8>, RuntimeError> {
    let files: [(&str, &str); 3] = [
        ("meta-data", &cloud.meta_data),
        // NoCloud reads user-data even when there is none to give.
        ("user-data", cloud.user_data.as_deref().unwrap_or("#cloud-config\n{}\n")),
        ("network-config", &cloud.network_config),
    ];
    let content: usize = files.iter().map(|(_, c)| c.len()).sum();
    if content > MAX_CONTENT {
        return Err(RuntimeError::new("the cloud-init seed", format!("{content} bytes, more than {MAX_CONTENT}")));
    }
    // Room for the files (cluster-rounded), the FATs and the root directory.
    let size = (MIN_BYTES + 2 * content).next_multiple_of(512);
    let mut disk = Cursor::new(vec![0u8; size]);
    let fail = |e: std::io::Error| RuntimeError::new("building the cloud-init seed", e);
    fatfs::format_volume(&mut disk, fatfs::FormatVolumeOptions::new().volume_label(*b"cidata     ").fat_type(fatfs::FatType::Fat12))
        .map_err(fail)?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(fail)?;
        for (name, text) in files {
            let mut f = fs.root_dir().create_file(name).map_err(fail)?;
            f.truncate().map_err(fail)?;
            f.write_all(text.as_bytes()).map_err(fail)?;
        }
        fs.unmount().map_err(fail)?;
    }
    Ok(disk.into_inner())
}

/// Writes `cloud`'s seed to `path` (whole, then renamed over it), mode
/// 0640, group `group` when given (QEMU's under libvirt).
pub fn write(path: &Path, cloud: &NoCloud, group: Option<u32>) -> Result<(), RuntimeError> {
    let bytes = image(cloud)?;
    let fail = |e: std::io::Error| RuntimeError::new(format!("writing {}", path.display()), e);
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(fail)?;
    f.write_all(&bytes).and_then(|()| f.sync_all()).map_err(fail)?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(&tmp, None, Some(gid)).map_err(fail)?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o640)).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_seed_is_a_fat_disk_labelled_cidata_with_the_three_files() {
        let cloud = NoCloud {
            meta_data: "instance-id: 7\nlocal-hostname: web-1\n".into(),
            user_data: Some("#cloud-config\n{\"users\": []}\n".into()),
            network_config: "version: 2\n".into(),
        };
        let bytes = image(&cloud).unwrap();
        let fs = fatfs::FileSystem::new(Cursor::new(bytes), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim_end(), "cidata");
        let read = |name: &str| {
            let mut s = String::new();
            fs.root_dir().open_file(name).unwrap().read_to_string(&mut s).unwrap();
            s
        };
        assert_eq!(read("meta-data"), cloud.meta_data);
        assert_eq!(read("user-data"), cloud.user_data.clone().unwrap());
        assert_eq!(read("network-config"), cloud.network_config);
        // Without user-data, an empty cloud-config is there.
        let none = NoCloud { user_data: None, ..cloud.clone() };
        let fs = fatfs::FileSystem::new(Cursor::new(image(&none).unwrap()), fatfs::FsOptions::new()).unwrap();
        let mut s = String::new();
        fs.root_dir().open_file("user-data").unwrap().read_to_string(&mut s).unwrap();
        assert!(s.starts_with("#cloud-config"));
        // Too much is refused, not written.
        let huge = NoCloud { user_data: Some("x".repeat(MAX_CONTENT + 1)), ..cloud };
        assert!(image(&huge).unwrap_err().to_string().contains("more than"));
    }

    #[test]
    fn a_seed_file_is_private_to_qemus_group() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        let cloud = NoCloud { meta_data: "instance-id: 1\n".into(), user_data: None, network_config: "version: 2\n".into() };
        write(&path, &cloud, None).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        // mtools reads it, and fsck finds nothing wrong, as with any FAT disk
        // (where they are installed: scripts/setup installs both).
        if let Ok(out) = std::process::Command::new("mdir").args(["-b", "-i"]).arg(&path).arg("::").output() {
            let listed = String::from_utf8_lossy(&out.stdout).to_lowercase();
            assert!(listed.contains("meta-data") && listed.contains("network-config"), "{listed}");
        }
        if let Ok(out) = std::process::Command::new("fsck.vfat").arg("-n").arg(&path).output() {
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        }
    }
}
