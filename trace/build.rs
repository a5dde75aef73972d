//! Builds the eBPF probes (ebpf/probes) for the BPF target when the `record`
//! feature is on. Needs the nightly toolchain with rust-src and bpf-linker;
//! `scripts/setup` installs both.

use std::path::PathBuf;

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    if std::env::var_os("CARGO_FEATURE_RECORD").is_none() {
        return Ok(());
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let root = manifest.join("../ebpf/probes").canonicalize().context("ebpf/probes not found")?;
    let path = std::env::var_os("PATH").unwrap_or_default();
    if !std::env::split_paths(&path).any(|d| d.join("bpf-linker").is_file()) {
        bail!("bpf-linker is not on PATH: the eBPF probes cannot be built (run scripts/setup, which installs it)");
    }
    println!("cargo:rerun-if-changed={}", root.join("../common/src").display());
    let root = root.to_str().context("non-UTF-8 path")?;
    let package = aya_build::Package { name: "bootcache-probes", root_dir: root, ..Default::default() };
    aya_build::build_ebpf([package], aya_build::Toolchain::Nightly)
}
