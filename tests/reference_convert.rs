//! The reference guest through the whole converter: recorded, converted
//! boot-first, exported back to raw (byte-identical) and to qcow2, which
//! `qemu-img check` accepts and which boots to the marker. Needs root.

mod support;

use std::process::Command;

use support::{bootcache, qemu_args, reference_guest};

#[test]
fn reference_guest_round_trips_and_its_qcow2_export_boots() {
    let image = reference_guest();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let mut record =
        vec!["record".to_string(), "--image".into(), image.to_str().unwrap().into(), "--out".into(), p("boot.bctrace"), "--".into()];
    record.extend(qemu_args(&image, "raw", "threads"));
    bootcache(&record.iter().map(String::as_str).collect::<Vec<_>>());

    bootcache(&["convert", image.to_str().unwrap(), &p("guest.bcimg"), "--trace", &p("boot.bctrace"), "--zstd", "-q"]);
    bootcache(&["export", &p("guest.bcimg"), &p("back.raw"), "-q"]);
    let same = Command::new("cmp").args([image.to_str().unwrap(), &p("back.raw")]).status().unwrap();
    assert!(same.success(), "the raw export differs from the reference guest");

    bootcache(&["export", &p("guest.bcimg"), &p("back.qcow2"), "--format", "qcow2", "-q"]);
    let check = Command::new("qemu-img").args(["check", &p("back.qcow2")]).output().unwrap();
    assert!(check.status.success(), "qemu-img check: {}", String::from_utf8_lossy(&check.stdout));
    let allocated = std::fs::metadata(p("back.qcow2")).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).unwrap();
    assert!(allocated < 1 << 30, "the qcow2 export is not sparse: {allocated} bytes allocated");

    let qcow2 = dir.path().join("back.qcow2");
    let mut boot = vec!["record".to_string(), "--no-probes".into(), "--image".into(), p("back.qcow2"), "--out".into(), p("unused.bctrace")];
    boot.extend(["--timeout".into(), "240".into(), "--".into()]);
    boot.extend(qemu_args(&qcow2, "qcow2", "threads"));
    bootcache(&boot.iter().map(String::as_str).collect::<Vec<_>>());
}
