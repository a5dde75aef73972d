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
    let mut args = vec!["record", "--image", image.to_str().unwrap(), "--out", out.to_str().unwrap(), "--timeout", "240", "--no-map", "--"];
    args.extend(qemu.iter().map(String::as_str));
    bootcache(&args);
    let seen = IntervalSet::from_ranges(observer.stop());
    let trace = Trace::open(out).unwrap();
    // In image-file space every read counts (qcow2 metadata included), as the observer sees it.
    let recorded = IntervalSet::from_ranges(trace.records.iter().filter_map(|r| r.transferred()));
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
fn raw_and_qcow2_boots_are_recorded_like_the_kernel_sees_them() {
    let image = reference_guest();
    let dir = tempfile::tempdir().unwrap();
    let mut raw_sets = Vec::new();
    for aio in ["threads", "native"] {
        let out = dir.path().join(format!("{aio}.bctrace"));
        let (recorded, seen, trace) = record_and_observe(&image, "raw", aio, &out);
        assert_eq!(trace.lost_records, 0, "aio={aio}: lost records");
        assert_agree(&recorded, &seen, &format!("raw, aio={aio}"));
        let json: serde_json::Value = serde_json::from_str(&bootcache(&["analyze", out.to_str().unwrap(), "--json"])).unwrap();
        assert_eq!(json["lost_records"], 0);
        assert_eq!(json["unique_bytes"], recorded.bytes());
        raw_sets.push(recorded);
    }

    // The same guest as qcow2: recorded in image-file offsets, then mapped.
    let qcow2 = dir.path().join("guest.qcow2");
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2", image.to_str().unwrap(), qcow2.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    let host = dir.path().join("qcow2-host.bctrace");
    let (recorded, seen, trace) = record_and_observe(&qcow2, "qcow2", "threads", &host);
    assert_eq!(trace.lost_records, 0);
    assert_agree(&recorded, &seen, "qcow2, aio=threads (file offsets)");
    let guest = dir.path().join("qcow2-guest.bctrace");
    bootcache(&["trace", "map", "--image", qcow2.to_str().unwrap(), host.to_str().unwrap(), "--out", guest.to_str().unwrap()]);
    let mapped = Trace::open(&guest).unwrap();
    assert!(mapped.records.iter().any(|r| r.class == bootcache_trace::Class::Metadata), "no qcow2 metadata read kept apart");
    let q = IntervalSet::from_ranges(mapped.records.iter().filter_map(|r| r.boot_bytes()));
    // Reads of clusters qcow2 leaves unallocated (all zero) never reach the
    // file: compare with the raw boot set restricted to allocated clusters.
    let image_q = bootcache_convert::qcow2::Qcow2::open(&qcow2).unwrap();
    let cluster = image_q.header().cluster_size();
    let allocated = IntervalSet::from_ranges(image_q.clusters().unwrap().into_iter().filter_map(|(g, c)| match c {
        bootcache_convert::qcow2::Cluster::Zero => None,
        _ => Some(g..g + cluster),
    }));
    let r = raw_sets[0].intersection(&allocated);
    let diff = q.difference(&r).bytes() + r.difference(&q).bytes();
    let union = q.union(&r).bytes() as f64;
    eprintln!(
        "qcow2 guest-space boot set {} bytes; raw {} bytes, {} of them in allocated clusters; symmetric difference {diff} ({:.2}%)",
        q.bytes(),
        raw_sets[0].bytes(),
        r.bytes(),
        100.0 * diff as f64 / union
    );
    assert!(diff as f64 / union < 0.02, "qcow2 and raw boot sets differ in {diff} bytes (2% or more)");
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

#[test]
fn qemu_dying_mid_boot_keeps_the_partial_trace() {
    let image = reference_guest();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("partial.bctrace");
    let name = format!("bootcache-kill-{}", std::process::id());
    let mut qemu = qemu_args(&image, "raw", "threads");
    qemu.extend(["-name".to_string(), name.clone()]);
    let mut args = vec!["record", "--image", image.to_str().unwrap(), "--out", out.to_str().unwrap(), "--"];
    args.extend(qemu.iter().map(String::as_str));
    let child =
        std::process::Command::new(env!("CARGO_BIN_EXE_bootcache")).args(&args).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Kill QEMU once the guest has been reading for a while.
    std::thread::sleep(std::time::Duration::from_secs(8));
    assert!(
        std::process::Command::new("pkill").args(["-KILL", "-f", &format!("^qemu-system-x86_64 .*{name}")]).status().unwrap().success(),
        "QEMU was not running"
    );
    let result = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "record should fail when QEMU dies");
    assert!(err.contains("QEMU exited") && err.contains("signal: 9"), "{err}");
    assert!(err.contains("last console lines"), "{err}");
    let partial = Trace::open(&out).expect("the partial trace is kept");
    assert!(partial.records.len() > 10, "partial trace has {} records", partial.records.len());
}

#[test]
fn without_privileges_the_missing_capabilities_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("x.raw");
    std::fs::write(&image, [0u8; 4096]).unwrap();
    // As nobody, with no capabilities at all.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .arg(env!("CARGO_BIN_EXE_bootcache"))
        .args(["record", "--image", image.to_str().unwrap(), "--out", "/tmp/never.bctrace", "--pid", "1"])
        .output()
        .expect("setpriv (util-linux)");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CAP_BPF") && err.contains("CAP_PERFMON"), "{err}");
}
