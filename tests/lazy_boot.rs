//! The reference guest booted from a lazily fetched image, with nginx as the
//! store: alone (`bootcache boot`), its disk through the export compared with
//! the source, and four VMs at once on one node sharing one cache. Needs root
//! (the boot trace is recorded first).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::deliver::{Nginx, NodeProc, overlay, start_vm, wait_markers};
use support::{accel, bootcache, qemu_args, reference_guest};

const MARKER: &str = "BOOTCACHE-BOOTED";

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

#[test]
fn the_reference_guest_boots_lazily_alone_and_four_at_once_from_one_cache() {
    let image = reference_guest();
    let accel = accel();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name);
    let s = |path: &Path| path.to_str().unwrap().to_string();
    std::fs::create_dir_all(p("store")).unwrap();
    std::fs::create_dir_all(p("nginx")).unwrap();

    // The trace of this guest, and the container laid out from it.
    let mut record = vec!["record".to_string(), "--image".into(), s(&image), "--out".into(), s(&p("boot.bctrace")), "--".into()];
    record.extend(qemu_args(&image, "raw", "threads"));
    bootcache(&record.iter().map(String::as_str).collect::<Vec<_>>());
    let container = p("store").join("guest.bcimg");
    bootcache(&["convert", &s(&image), &s(&container), "--trace", &s(&p("boot.bctrace")), "--zstd", "-q"]);
    let info = json(&bootcache(&["info", &s(&container), "--output", "json"]));
    let boot_segment = info["boot_segment_bytes"].as_u64().unwrap();
    let structure = 256 + info["index_bytes"].as_u64().unwrap();
    let size = info["virtual_size"].as_u64().unwrap();

    let nginx = Nginx::start(&p("store"), &p("nginx"));
    let store = format!("http://127.0.0.1:{}", nginx.port);
    let url = format!("{store}/guest.bcimg");

    // One VM: boots to the marker; the store sends little more than the boot segment.
    let out = Command::new(env!("CARGO_BIN_EXE_bootcache"))
        .args(["boot", "--store", &store, "guest.bcimg", "--background", "off", "--exit-at-marker", "--json", "--timeout", "300"])
        .arg("--cache-dir")
        .arg(p("cache1"))
        .args(["--", "qemu-system-x86_64", "-accel", &accel, "-m", "512", "-display", "none", "-net", "none"])
        .output()
        .unwrap();
    assert!(out.status.success(), "bootcache boot: {}", String::from_utf8_lossy(&out.stderr));
    let report = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["outcome"], "marker", "{report}");
    let one = nginx.bytes_sent();
    let limit = 1.10 * (boot_segment + structure) as f64;
    eprintln!("one VM: store sent {one} bytes before the marker; boot segment {boot_segment} + header and index {structure}; {report}");
    assert!(one as f64 <= limit, "store sent {one} bytes, over 1.10 x {}:\n{}", boot_segment + structure, nginx.log());

    // The guest's disk as seen through the export equals the source, byte for
    // byte (the rest comes on demand now).
    let node = NodeProc::start(&p("cache1"), &p("node1"), "off");
    let opened = node.open("check", &url);
    let cmp = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&image)
        .arg(opened["nbd_url"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(
        cmp.status.success(),
        "export differs from the source: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
    drop(node);

    // Four VMs at once on one node, one image: one cache, the store sends it once.
    let before = nginx.bytes_sent();
    let node = NodeProc::start(&p("cache4"), &p("node4"), "off");
    let rss_idle = node.rss();
    let mut vms = Vec::new();
    let mut consoles = Vec::new();
    for i in 0..4 {
        let opened = node.open(&format!("vm{i}"), &url);
        let disk = p(&format!("vm{i}.qcow2"));
        overlay(&disk, opened["nbd_url"].as_str().unwrap(), size);
        consoles.push(p(&format!("vm{i}.console")));
        vms.push((disk, opened));
    }
    let rss_open = node.rss();
    let running: Vec<_> = vms.iter().zip(&consoles).map(|((disk, _), console)| start_vm(disk, console, &accel)).collect();
    let times = wait_markers(&consoles, MARKER, Duration::from_secs(600));
    let rss_booted = node.rss();
    drop(running);
    let four = nginx.bytes_sent() - before;
    let status = json(&node.get("/images"));
    let roots: std::collections::BTreeSet<_> =
        status.as_array().unwrap().iter().map(|i| i["root_digest"].as_str().unwrap().to_string()).collect();
    assert_eq!(roots.len(), 1, "four names, one cache: {status}");
    let per_vm = rss_booted.saturating_sub(rss_open) as f64 / 4.0;
    eprintln!(
        "four VMs: markers after {times:?}; store sent {four} bytes (one VM: {one}); node RSS idle {rss_idle}, images open {rss_open}, \
         after the boots {rss_booted} ({per_vm:.0} bytes per VM); metrics {}",
        status[0]["metrics"]
    );
    assert!(four as f64 <= 1.05 * one as f64, "four VMs made the store send {four} bytes, one VM {one}");
    // A cache per VM would hold the boot set (about 60 MB) each time.
    assert!(per_vm < 16.0 * 1024.0 * 1024.0, "the node grew by {per_vm:.0} bytes per VM");
}
