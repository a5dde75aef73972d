//! Lazy delivery on the multi-node testbed: a store host and a compute node
//! in their own network namespaces, joined by shaped links (100 Mbit/s with
//! 2 ms and 20 ms round trips, 1 Gbit/s with 2 ms; 5% loss), booting the
//! reference guest to its marker. The store is nginx (a real third-party
//! HTTP server), or `bootcache store serve` where the test kills it or
//! serves a tampered copy. Bytes are counted on the store's interface.
//! Needs root.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use bootcache_testbed::{Link, Testbed};
use support::deliver::{Killed, Nginx, NodeProc, assert_export_equals, bootcache_bin, overlay, start_vm, wait_markers};
use support::{accel, recorded_container};

const MARKER: &str = "BOOTCACHE-BOOTED";

/// One test at a time: they share the machine's two cores and the testbed's names.
static SERIAL: Mutex<()> = Mutex::new(());

struct Fixture {
    image: PathBuf,
    store_dir: PathBuf,
    /// Boot segment plus header and index, bytes.
    boot_bytes: u64,
}

/// The reference guest, its recorded boot, and the container laid out from
/// it, under the target directory (a static is never dropped: a temporary
/// directory would be left behind by every run), made afresh each run.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("testbed_boot-fixture");
        let _ = std::fs::remove_dir_all(&dir);
        let store_dir = dir.join("store");
        std::fs::create_dir_all(&store_dir).unwrap();
        let (image, boot_bytes) = recorded_container(&store_dir, &dir);
        Fixture { image, store_dir, boot_bytes }
    })
}

/// `bootcache store serve DIR` on the store host, port 8080, reachable from the node.
fn store(tb: &Testbed, dir: &Path) -> Killed {
    let addr = format!("{}:8080", tb.host("store").addr);
    let server =
        Killed(tb.command("store", env!("CARGO_BIN_EXE_bootcache")).args(["store", "serve", "--listen", &addr]).arg(dir).spawn().unwrap());
    let start = Instant::now();
    while !tb
        .command("node", "curl")
        .args(["-sf", "-o", "/dev/null", "-I", &format!("http://{addr}/guest.bcimg")])
        .status()
        .unwrap()
        .success()
    {
        assert!(start.elapsed() < Duration::from_secs(20), "the store did not come up on {addr}");
        std::thread::sleep(Duration::from_millis(100));
    }
    server
}

/// Starts `bootcache boot` on the node against the store; returns the child.
fn start_boot(tb: &Testbed, cache: &Path, extra: &[&str]) -> std::process::Child {
    tb.command("node", env!("CARGO_BIN_EXE_bootcache"))
        .args(["boot", "--store", &format!("http://{}:8080", tb.host("store").addr), "guest.bcimg", "--exit-at-marker", "--json"])
        .args(["--timeout", "300", "--cache-dir"])
        .arg(cache)
        .args(extra)
        .args(["--", "qemu-system-x86_64", "-accel", &accel(), "-m", "512", "-display", "none", "-net", "none"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn report(out: &Output) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bootcache boot failed:\n{stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no JSON report ({e}):\n{stderr}"))
}

#[test]
fn boots_at_every_link_setting_from_nginx_and_four_vms_share_one_cache() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let mut tb = Testbed::new(&["store", "node"]).unwrap();
    let store_addr = tb.host("store").addr.to_string();
    let _nginx = Nginx::start_in(Some(&tb.host("store").netns), &store_addr, 8080, &fx.store_dir, &dir.path().join("nginx")).unwrap();
    let url = format!("http://{store_addr}:8080/guest.bcimg");
    let mut one = 0;
    for (i, link) in [Link::new(100, 2.0), Link::new(100, 20.0), Link::new(1000, 2.0)].into_iter().enumerate() {
        tb.shape(link).unwrap();
        let sent_before = tb.tx_bytes("store").unwrap();
        let cache = dir.path().join(format!("cache{i}"));
        let r = report(&start_boot(&tb, &cache, &["--background", "off"]).wait_with_output().unwrap());
        one = tb.tx_bytes("store").unwrap() - sent_before;
        eprintln!(
            "{link}: marker after {} s; store sent {one} bytes on the wire for {} of boot segment, header and index; {}",
            r["marker_seconds"], fx.boot_bytes, r["metrics"]
        );
        assert_eq!(r["outcome"], "marker", "{link}: {r}");
        assert!(one as f64 <= 1.10 * fx.boot_bytes as f64, "{link}: the store sent {one} bytes, over 1.10 x {}", fx.boot_bytes);
    }

    // The guest's disk through the export equals the source byte for byte
    // (what the boot did not read now comes on demand over the link).
    let node = NodeProc::start_in(
        bootcache_bin(),
        Some(&tb.host("node").netns),
        None,
        &dir.path().join("cache2"),
        &dir.path().join("node-check"),
        &dir.path().join("node.token"),
        &["--background", "off"],
    )
    .unwrap();
    let opened = node.open("check", &url, &[]).unwrap();
    assert_export_equals(&fx.image, opened["nbd_url"].as_str().unwrap());
    drop(node);

    // Four VMs at once on one node from one image (1 Gbit/s, 2 ms): one
    // cache, so the store sends the image's boot bytes once. Done at two
    // guest memory sizes: what a VM adds to the node must not follow it.
    let small = four_vms(&tb, &dir.path().join("four-512"), &url, 512, one);
    let large = four_vms(&tb, &dir.path().join("four-2048"), &url, 2048, one);
    eprintln!("node RSS per added VM: {small:.0} bytes at -m 512, {large:.0} bytes at -m 2048");
    // A cache per VM would hold the boot set (about 60 MB) each time; guest
    // memory held by the node would add hundreds of MB at -m 2048.
    for (mem, per_vm) in [(512, small), (2048, large)] {
        assert!(per_vm < 16.0 * 1024.0 * 1024.0, "-m {mem}: the node grew by {per_vm:.0} bytes per VM");
    }
    assert!(
        large <= small + 4.0 * 1024.0 * 1024.0,
        "per-VM node memory grew with guest memory: {small:.0} bytes at -m 512, {large:.0} at -m 2048"
    );
}

/// Boots four VMs of `mem_mb` MiB at once from one fresh node cache under
/// `dir`; checks they share one cache and the store sends at most 1.05 x
/// `one` VM's bytes. Returns the node's RSS growth per VM, in bytes.
fn four_vms(tb: &Testbed, dir: &Path, url: &str, mem_mb: u32, one: u64) -> f64 {
    std::fs::create_dir_all(dir).unwrap();
    let sent_before = tb.tx_bytes("store").unwrap();
    let node = NodeProc::start_in(
        bootcache_bin(),
        Some(&tb.host("node").netns),
        None,
        &dir.join("cache"),
        &dir.join("node"),
        &dir.join("node.token"),
        &["--background", "off"],
    )
    .unwrap();
    let rss_idle = node.rss().unwrap();
    let mut consoles = Vec::new();
    let mut disks = Vec::new();
    for i in 0..4 {
        let opened = node.open(&format!("vm{i}"), url, &[]).unwrap();
        let disk = dir.join(format!("vm{i}.qcow2"));
        overlay(&disk, opened["nbd_url"].as_str().unwrap(), "raw", opened["virtual_size"].as_u64().unwrap()).unwrap();
        consoles.push(dir.join(format!("vm{i}.console")));
        disks.push(disk);
    }
    let rss_open = node.rss().unwrap();
    let running: Vec<_> =
        disks.iter().zip(&consoles).map(|(disk, console)| start_vm(None, disk, console, &accel(), mem_mb, &[]).unwrap()).collect();
    let times = wait_markers(&consoles, MARKER, std::time::Instant::now(), Duration::from_secs(600)).unwrap();
    let rss_booted = node.rss().unwrap();
    drop(running);
    let four = tb.tx_bytes("store").unwrap() - sent_before;
    let status: serde_json::Value = serde_json::from_str(&node.get("/images").unwrap()).unwrap();
    let roots: std::collections::BTreeSet<_> =
        status.as_array().unwrap().iter().map(|i| i["root_digest"].as_str().unwrap().to_string()).collect();
    assert_eq!(roots.len(), 1, "four names, one cache: {status}");
    let per_vm = rss_booted.saturating_sub(rss_open) as f64 / 4.0;
    eprintln!(
        "four VMs at -m {mem_mb}: markers after {times:?}; store sent {four} bytes (one VM: {one}); node RSS idle {rss_idle}, \
         images open {rss_open}, after the boots {rss_booted} ({per_vm:.0} bytes per VM); metrics {}",
        status[0]["metrics"]
    );
    assert!(four as f64 <= 1.05 * one as f64, "four VMs at -m {mem_mb} made the store send {four} bytes, one VM {one}");
    per_vm
}

#[test]
fn a_boot_completes_over_a_link_losing_five_percent_of_packets() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let mut tb = Testbed::new(&["store", "node"]).unwrap();
    let _store = store(&tb, &fx.store_dir);
    let link = Link::new(100, 2.0).with_loss(5.0);
    tb.shape(link).unwrap();
    let r = report(&start_boot(&tb, &dir.path().join("cache"), &["--background", "full"]).wait_with_output().unwrap());
    eprintln!("{link}: {r}");
    assert_eq!(r["outcome"], "marker", "{r}");
    assert_eq!(r["metrics"]["read_errors"], 0, "{r}");
}

#[test]
fn a_boot_completes_when_the_store_dies_3_s_in_and_returns_5_s_later() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    let mut tb = Testbed::new(&["store", "node"]).unwrap();
    // At 25 Mbit/s and 20 ms the boot segment (40 MB) takes over 12 s: at
    // most 3 s of it can arrive before the store dies, whatever the guest
    // does meanwhile (a guest slowed down by a loaded machine may read
    // nothing new during the outage).
    const MBIT: u64 = 25;
    tb.shape(Link::new(MBIT as u32, 20.0)).unwrap();
    let mut server = Some(store(&tb, &fx.store_dir));
    let started = Instant::now();
    let boot = start_boot(&tb, &dir.path().join("cache"), &["--background", "off", "--read-timeout", "60"]);
    std::thread::sleep(Duration::from_secs(3).saturating_sub(started.elapsed()));
    drop(server.take()); // SIGKILL
    std::thread::sleep(Duration::from_secs(5));
    server = Some(store(&tb, &fx.store_dir));
    let r = report(&boot.wait_with_output().unwrap());
    drop(server);
    eprintln!("store killed at 3 s, back at 8 s: {r}");
    assert_eq!(r["outcome"], "marker", "{r}");
    assert_eq!(r["metrics"]["read_errors"], 0, "{r}");
    // The node went on fetching the boot segment once the store was back.
    let before_kill = MBIT * 1_000_000 / 8 * 3;
    let prefetched = r["metrics"]["boot_prefetch_bytes"].as_u64().unwrap();
    assert!(prefetched > 2 * before_kill, "{prefetched} boot bytes: the node stopped fetching after the outage: {r}");
}

#[test]
fn a_tampered_extent_on_the_store_is_detected_never_served_and_named() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let fx = fixture();
    let dir = tempfile::tempdir().unwrap();
    // A copy of the store with one byte of one rest extent flipped.
    let store_dir = dir.path().join("store");
    std::fs::create_dir(&store_dir).unwrap();
    let container = store_dir.join("guest.bcimg");
    std::fs::copy(fx.store_dir.join("guest.bcimg"), &container).unwrap();
    let image = bootcache_format::Image::open(std::fs::File::open(&container).unwrap()).unwrap();
    let victim = image
        .index()
        .entries()
        .iter()
        .find(|e| e.segment == bootcache_format::Segment::Rest && e.encoding != bootcache_format::Encoding::Zero)
        .unwrap()
        .clone();
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&container).unwrap();
    let mut b = [0u8];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut b, victim.stored.start + 1).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[b[0] ^ 1], victim.stored.start + 1).unwrap();
    drop(f);

    let mut tb = Testbed::new(&["store", "node"]).unwrap();
    tb.shape(Link::new(1000, 2.0)).unwrap();
    let _store = store(&tb, &store_dir);
    // Background streaming, started at once rather than after the boot,
    // reaches the tampered extent during the boot.
    let out = start_boot(&tb, &dir.path().join("cache"), &["--background", "full", "--background-after", "0"]).wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let r = report(&out);
    eprintln!("{r}");
    assert_eq!(r["outcome"], "marker", "{r}");
    assert_eq!(r["metrics"]["bad_extents"], 1, "{r}");
    let offset = format!("{:#x}", victim.guest.start);
    assert!(stderr.contains(&offset), "the log does not name guest offset {offset}:\n{stderr}");
    let data = std::fs::read_dir(dir.path().join("cache")).unwrap().next().unwrap().unwrap().path().join("data");
    let cached = std::fs::read(data).unwrap();
    assert!(
        cached[victim.guest.start as usize..victim.guest.end as usize].iter().all(|&x| x == 0),
        "the tampered extent reached the cache file"
    );
}
