//! Shared pieces of the end-to-end tests: the reference guest, QEMU command
//! lines, and an independent observer of the image's direct I/O.

#![allow(dead_code, reason = "each test binary uses a different part")]

pub mod cluster;
pub mod deliver;
pub mod iomap;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The reference guest, built (or taken from the cache) by scripts/reference-guest.
pub fn reference_guest() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/reference-guest");
    let out = Command::new(&script).output().expect("run scripts/reference-guest");
    assert!(out.status.success(), "scripts/reference-guest failed:\n{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// The accelerator that boots the reference guest here (scripts/qemu-accel:
/// KVM when a trial boot works, TCG otherwise; cached).
pub fn accel() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/qemu-accel");
    let out = Command::new(&script).output().expect("run scripts/qemu-accel");
    assert!(out.status.success(), "scripts/qemu-accel failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// QEMU arguments that boot `image` without writing to it (`-snapshot`),
/// with the given `aio=` mode.
pub fn qemu_args(image: &Path, format: &str, aio: &str) -> Vec<String> {
    let drive = format!("file={},format={format},if=virtio,cache=none,aio={aio}", image.display());
    let accel = accel();
    ["qemu-system-x86_64", "-accel", &accel, "-m", "512", "-display", "none", "-snapshot", "-net", "none", "-drive", &drive]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Runs the `bootcache` binary; panics with its stderr when it fails.
pub fn bootcache(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_bootcache")).args(args).output().expect("run bootcache");
    assert!(out.status.success(), "bootcache {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Records the reference guest's boot (in `work`) and converts the guest,
/// boot set first, into `store_dir/guest.bcimg`; returns the guest image
/// and the bytes a node fetches for the boot (boot segment, header and
/// index).
pub fn recorded_container(store_dir: &Path, work: &Path) -> (PathBuf, u64) {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let image = reference_guest();
    let trace = work.join("boot.bctrace");
    let mut record = vec!["record".to_string(), "--image".into(), s(&image), "--out".into(), s(&trace), "--".into()];
    record.extend(qemu_args(&image, "raw", "threads"));
    bootcache(&record.iter().map(String::as_str).collect::<Vec<_>>());
    let container = store_dir.join("guest.bcimg");
    bootcache(&["convert", &s(&image), &s(&container), "--trace", &s(&trace), "--zstd", "-q"]);
    let info: serde_json::Value = serde_json::from_str(&bootcache(&["info", &s(&container), "--output", "json"])).unwrap();
    let boot_bytes = info["boot_segment_bytes"].as_u64().unwrap() + 256 + info["index_bytes"].as_u64().unwrap();
    (image, boot_bytes)
}
