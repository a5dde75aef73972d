//! `bootcache record` on real boots of the reference guest (TCG), checked
//! against an independent observer of the same boot. Needs root.

mod support;

use std::path::Path;

use bootcache_trace::{IntervalSet, Trace};
use support::iomap::Observer;
use support::{bootcache, qemu_args, reference_guest};

/// Records one boot while the observer watches; returns (recorder's boot set, observer's).
fn record_and_observe(image: &Path, format: &str, aio: &str, out: &Path) -> (IntervalSet, IntervalSet, Trace) {
    let observer = Observer::start(image);
    let qemu = qemu_args(image, format, aio);
    let mut args = vec!["record", "--image", image.to_str().unwrap(), "--out", out.to_str().unwrap(), "--timeout", "240", "--"];
    args.extend(qemu.iter().map(String::as_str));
    bootcache(&args);
    let seen = IntervalSet::from_ranges(observer.stop());
    let trace = Trace::open(out).unwrap();
    let recorded = IntervalSet::from_ranges(trace.records.iter().filter_map(|r| r.boot_bytes()));
    (recorded, seen, trace)
}

fn assert_agree(recorded: &IntervalSet, seen: &IntervalSet, what: &str) {
    let (a, b) = (recorded.bytes() as f64, seen.bytes() as f64);
    let diff = recorded.difference(seen).bytes() + seen.difference(recorded).bytes();
    eprintln!("{what}: recorder {a} bytes in {} intervals, observer {b} bytes; symmetric difference {diff}", recorded.len());
    assert!(a > 30e6, "{what}: a boot reads tens of MB, recorded only {a}");
    assert!((a - b).abs() / b < 0.01, "{what}: recorder {a} vs observer {b} unique bytes differ by more than 1%");
    assert!((diff as f64) / b < 0.01, "{what}: the two boot sets differ in {diff} bytes");
}

#[test]
fn raw_boots_are_recorded_like_the_kernel_sees_them() {
    let image = reference_guest();
    let dir = tempfile::tempdir().unwrap();
    for aio in ["threads", "native"] {
        let out = dir.path().join(format!("{aio}.bctrace"));
        let (recorded, seen, trace) = record_and_observe(&image, "raw", aio, &out);
        assert_eq!(trace.lost_records, 0, "aio={aio}: lost records");
        assert_agree(&recorded, &seen, &format!("raw, aio={aio}"));
        let json: serde_json::Value = serde_json::from_str(&bootcache(&["analyze", out.to_str().unwrap(), "--json"])).unwrap();
        assert_eq!(json["lost_records"], 0);
        assert_eq!(json["unique_bytes"], recorded.bytes());
    }
}

#[test]
fn io_uring_is_refused_with_a_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("x.raw");
    std::fs::write(&image, [0u8; 4096]).unwrap();
    let qemu = qemu_args(&image, "raw", "io_uring");
    let mut args = vec!["record", "--image", image.to_str().unwrap(), "--out", "/dev/null", "--"];
    args.extend(qemu.iter().map(String::as_str));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bootcache")).args(&args).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("aio=threads") && err.contains("aio=native"), "{err}");
}
