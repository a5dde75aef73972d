//! The small guest (scripts/small-guest): a 64 MiB disk with the reference
//! kernel, a busybox initrd and root, booting in seconds under TCG in 96 MiB.
//! Its boot is recorded and converted like the reference guest's, and it
//! boots lazily from a store to its marker; its root file system tarball
//! (the same guest as a container image) holds the same service. Needs root.

mod support;

use std::path::Path;
use std::process::Command;

use support::cluster::{record_small_guest, small_guest};
use support::{accel, bootcache};

#[test]
fn the_small_guest_is_recorded_converted_and_boots_lazily() {
    let (raw, tar) = small_guest();
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 64 << 20);
    let dir = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let trace = dir.path().join("small.bctrace");
    record_small_guest(&raw, &trace);
    let accel = accel();
    let a: serde_json::Value = serde_json::from_str(&bootcache(&["analyze", &s(&trace), "--json"])).unwrap();
    let unique = a["unique_bytes"].as_u64().unwrap();
    eprintln!("small guest boot: {unique} unique bytes in {} reads", a["requests"]);
    // The kernel (14 MB) and initrd are read; most of the 64 MiB disk is not.
    assert!(unique > 10_000_000 && unique < 40_000_000, "{a}");

    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    bootcache(&["convert", &s(&raw), &s(&store.join("small.bcimg")), "--trace", &s(&trace), "--zstd", "-q"]);
    let port = support::deliver::free_port().unwrap();
    let _store = support::deliver::store(&store, port);
    let out = Command::new(env!("CARGO_BIN_EXE_bootcache"))
        .args(["boot", "--store", &format!("http://127.0.0.1:{port}"), "small.bcimg", "--exit-at-marker", "--json", "--timeout", "120"])
        .args(["--background", "off", "--cache-dir", &s(&dir.path().join("cache"))])
        .args(["--", "qemu-system-x86_64", "-accel", &accel, "-m", "96", "-display", "none", "-net", "none"])
        .output()
        .unwrap();
    assert!(out.status.success(), "boot: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["outcome"], "marker", "{r}");
    eprintln!("lazy boot: marker after {} s, {}", r["marker_seconds"], r["metrics"]);

    // The container image: the same root file system and service.
    let list = Command::new("tar").arg("-tf").arg(&tar).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for f in ["./etc/service", "./bin/busybox", "./www/index.html"] {
        assert!(list.lines().any(|l| l == f), "{f} in the tarball");
    }
}
