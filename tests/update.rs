//! A real update of the reference guest on a node that holds the version
//! before it. Version 2 (`scripts/reference-guest-update`) is version 1
//! after `apt-get full-upgrade` from bookworm-security and bookworm-updates:
//! the packages with updates and a newer 6.1 kernel, booted. Both are recorded and
//! converted as whole images, `bootcache diff` says what they share, and a
//! testbed node whose cache holds all of version 1 boots version 2 over a
//! 100 Mbit/s link: what it fetches before the boot marker against what
//! version 2's boot reads that version 1 does not hold, and its time
//! against the same boot from a local copy and from a cold cache, and
//! against the least wait any fetch at that rate could give (from the
//! recorded boot's timeline). Version 2 is also converted as a layer over
//! version 1 and booted through the chain, on a node holding version 1 and
//! cold (one boot stream across both files).
//!
//! The benchmark is ignored here (`scripts/bench-update` runs it): it
//! builds a Debian guest from the network and boots it a dozen times.
//! Needs root.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bootcache_testbed::limit::Demand;
use bootcache_testbed::median;
use bootcache_testbed::programs::Killed;
use bootcache_testbed::{Link, Testbed};
use support::cluster::record_boot;
use support::deliver::{NodeProc, bootcache_bin, overlay, start_vm, wait_markers};
use support::{accel, bootcache, reference_guest};

const MARKER: &str = "BOOTCACHE-BOOTED";
const BIN: &str = env!("CARGO_BIN_EXE_bootcache");

fn reference_guest_update() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/reference-guest-update");
    let out = Command::new(&script).stderr(Stdio::inherit()).output().expect("run scripts/reference-guest-update");
    assert!(out.status.success(), "scripts/reference-guest-update failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Fills the cache in `cache` with all of the image at `url` through a
/// node on the testbed's node host.
fn hold(tb: &Testbed, dir: &Path, cache: &Path, url: &str) {
    let node = NodeProc::start_in(
        bootcache_bin(),
        Some(&tb.host("node").netns),
        None,
        cache,
        &dir.join("node-fill"),
        &dir.join("node.token"),
        &["--background", "full", "--background-after", "0"],
    )
    .unwrap();
    node.open("held", url, &[]).unwrap();
    let start = Instant::now();
    loop {
        let status: serde_json::Value = serde_json::from_str(&node.get("/images").unwrap()).unwrap();
        let m = &status[0]["metrics"];
        if m["present_extents"].as_u64().is_some() && m["present_extents"] == m["extents"] {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(900), "the node never held all of {url}: {status}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `bootcache boot` of `image` on the node with `cache`, background off:
/// its JSON report.
fn boot(tb: &Testbed, image: &str, cache: &Path) -> serde_json::Value {
    let out = tb
        .command("node", BIN)
        .args(["boot", "--store", &format!("http://{}:8080", tb.host("store").addr), image, "--exit-at-marker", "--json"])
        .args(["--timeout", "600", "--background", "off", "--cache-dir"])
        .arg(cache)
        .args(["--", "qemu-system-x86_64", "-accel", &accel(), "-m", "512", "-display", "none", "-net", "none"])
        .output()
        .unwrap();
    assert!(out.status.success(), "boot {image}: {}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["outcome"], "marker", "{r}");
    r
}

/// Each numeric figure's median over `runs`, as one result named `median`.
fn medians(runs: &[serde_json::Value]) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    if let Some(first) = runs.first().and_then(|r| r.as_object()) {
        for key in first.keys() {
            let m = median(runs.iter().filter_map(|r| r[key].as_f64()));
            if !m.is_nan() {
                out.insert(key.clone(), m.into());
            }
        }
    }
    out.insert("run".into(), "median".into());
    out.into()
}

/// The local boot: QEMU on a qcow2 overlay over the raw image on the node.
fn local(tb: &Testbed, raw: &Path, dir: &Path) -> f64 {
    let disk = dir.join("local.qcow2");
    let _ = std::fs::remove_file(&disk);
    overlay(&disk, raw.to_str().unwrap(), "raw", std::fs::metadata(raw).unwrap().len()).unwrap();
    let console = dir.join("local.console");
    let started = Instant::now();
    let vm = start_vm(Some(&tb.host("node").netns), &disk, &console, &accel(), 512, &[]).unwrap();
    let t = wait_markers(&[console], MARKER, started, Duration::from_secs(600)).unwrap();
    drop(vm);
    t[0].as_secs_f64()
}

#[test]
#[ignore = "a benchmark: scripts/bench-update runs it"]
fn bench_update() {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let out_dir = PathBuf::from(env("BOOTCACHE_BENCH_OUT", "target/bench-update"));
    std::fs::create_dir_all(&out_dir).unwrap();
    let runs: usize = env("BOOTCACHE_BENCH_RUNS", "3").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (store, work) = (dir.path().join("store"), dir.path().join("work"));
    std::fs::create_dir_all(&store).unwrap();
    std::fs::create_dir_all(&work).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();

    let (v1, v2) = (reference_guest(), reference_guest_update());
    for (name, raw) in [("v1", &v1), ("v2", &v2)] {
        let trace = work.join(format!("{name}.bctrace"));
        record_boot(raw, &trace, "512", 300, &[]);
        bootcache(&["convert", &s(raw), &s(&store.join(format!("{name}.bcimg"))), "--trace", &s(&trace), "--zstd", "-q"]);
    }
    // v2 also as a layer over v1: what differs block by block, booted through the chain.
    let (v1_img, layer) = (store.join("v1.bcimg"), store.join("v2-layer.bcimg"));
    bootcache(&["convert", &s(&v2), &s(&layer), "--parent", &s(&v1_img), "--trace", &s(&work.join("v2.bctrace")), "--zstd", "-q"]);
    let diff: serde_json::Value =
        serde_json::from_str(&bootcache(&["diff", &s(&store.join("v1.bcimg")), &s(&store.join("v2.bcimg")), "--output", "json"])).unwrap();
    eprintln!("diff v1 v2: {diff}");
    let to_fetch = diff["boot_stored_bytes_to_fetch"].as_u64().unwrap();
    // The link: 100 Mbit/s.
    let demand = Demand::lacking(&work.join("v2.bctrace"), &store.join("v2.bcimg"), Some(&store.join("v1.bcimg"))).unwrap();
    let (bound_s, bound_at) = demand.least_stall_at(100.0);
    eprintln!("v2's boot waits at least {bound_s:.2} s for what v1 lacks at 100 Mbit/s (by {bound_at:.2} s into the boot)");

    let mut tb = Testbed::new(&["store", "node"]).unwrap();
    let addr = format!("{}:8080", tb.host("store").addr);
    let _store = Killed(tb.command("store", BIN).args(["store", "serve", "--listen", &addr]).arg(&store).spawn().unwrap());
    let start = Instant::now();
    while !tb.command("node", "curl").args(["-sf", "-o", "/dev/null", "-I", &format!("http://{addr}/v1.bcimg")]).status().unwrap().success()
    {
        assert!(start.elapsed() < Duration::from_secs(20), "the store did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut results = Vec::new();
    for run in 1..=runs {
        let rd = dir.path().join(format!("run{run}"));
        std::fs::create_dir_all(&rd).unwrap();
        // The node comes to hold version 1 over a fast link (not measured).
        tb.shape(Link::new(1000, 2.0)).unwrap();
        let cache = rd.join("cache");
        hold(&tb, &rd, &cache, &format!("http://{addr}/v1.bcimg"));
        // A copy for the layer's boot, taken before whole v2 joins the cache.
        let layered_cache = rd.join("cache-layered");
        let out = Command::new("cp").arg("-a").arg(&cache).arg(&layered_cache).output().unwrap();
        assert!(out.status.success(), "cp: {}", String::from_utf8_lossy(&out.stderr));
        tb.shape(Link::new(100, 2.0)).unwrap();
        let local_s = local(&tb, &v2, &rd);
        let sent = tb.tx_bytes("store").unwrap();
        let held = boot(&tb, "v2.bcimg", &cache);
        let held_sent = tb.tx_bytes("store").unwrap() - sent;
        let sent = tb.tx_bytes("store").unwrap();
        let cold = boot(&tb, "v2.bcimg", &rd.join("cold"));
        let cold_sent = tb.tx_bytes("store").unwrap() - sent;
        // The layer: on a node holding v1, and cold (one boot stream
        // across both files).
        let sent = tb.tx_bytes("store").unwrap();
        let layered_held = boot(&tb, "v2-layer.bcimg", &layered_cache);
        let layered_held_sent = tb.tx_bytes("store").unwrap() - sent;
        let sent = tb.tx_bytes("store").unwrap();
        let layered_cold = boot(&tb, "v2-layer.bcimg", &rd.join("cold-layered"));
        let layered_cold_sent = tb.tx_bytes("store").unwrap() - sent;
        let secs = |r: &serde_json::Value| r["marker_seconds"].as_f64().unwrap();
        let fetched = held["metrics"]["boot_prefetch_bytes"].as_u64().unwrap() + held["metrics"]["demand_bytes"].as_u64().unwrap();
        let r = serde_json::json!({
            "run": run, "local_s": local_s, "held_v1_s": secs(&held), "cold_s": secs(&cold),
            "held_over_local": secs(&held) / local_s, "cold_over_local": secs(&cold) / local_s,
            "held_fetched_bytes": fetched, "held_local_bytes": held["metrics"]["local_bytes"], "held_store_sent": held_sent,
            "cold_store_sent": cold_sent, "boot_bytes_v1_lacks": to_fetch, "fetched_over_lacking": fetched as f64 / to_fetch as f64,
            "least_wait_s": bound_s, "least_over_local": (local_s + bound_s) / local_s, "held_extra_s": secs(&held) - local_s,
            "held_wait_s": held["metrics"]["miss_wait_seconds"], "cold_wait_s": cold["metrics"]["miss_wait_seconds"],
            "layered_held_wait_s": layered_held["metrics"]["miss_wait_seconds"],
            "layered_cold_wait_s": layered_cold["metrics"]["miss_wait_seconds"],
            "layered_held_s": secs(&layered_held), "layered_held_over_local": secs(&layered_held) / local_s,
            "layered_held_store_sent": layered_held_sent,
            "layered_cold_s": secs(&layered_cold), "layered_cold_over_local": secs(&layered_cold) / local_s,
            "layered_cold_store_sent": layered_cold_sent,
        });
        eprintln!("{r}");
        results.push(r);
        std::fs::write(
            out_dir.join("results.json"),
            serde_json::to_string_pretty(
                &serde_json::json!({"diff": diff, "least_wait_s": bound_s, "least_wait_by_s": bound_at, "runs": results}),
            )
            .unwrap(),
        )
        .unwrap();
    }
    let mb = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / 1e6;
    let mut table = format!(
        "v1 -> v2: v2 holds {:.1} MB of data, {:.1} MB of it in extents v1 holds; its boot reads {:.1} MB, {:.1} MB of them held; \
         a node holding v1 fetches {:.1} MB (stored) of v2's boot and {:.1} MB of the rest. \
         By {:.2} s into its boot (recorded locally) v2 has read so much that v1 lacks that at 100 Mbit/s \
         any fetch after the VM starts makes it wait at least {:.2} s\n\n\
         | run | local (s) | v2 on a node holding v1 (s) | x local | added (s) | its reads waited (s) | least possible x local | v2 cold (s) | x local | its reads waited (s) | fetched before the marker (MB) | x boot bytes v1 lacks | store sent (MB), held / cold |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        mb(&diff["new_data_bytes"]),
        mb(&diff["shared_bytes"]),
        mb(&diff["new_boot_bytes"]),
        mb(&diff["shared_boot_bytes"]),
        mb(&diff["boot_stored_bytes_to_fetch"]),
        mb(&(diff["stored_bytes_to_fetch"].as_f64().unwrap_or(0.0) - diff["boot_stored_bytes_to_fetch"].as_f64().unwrap_or(0.0)).into()),
        bound_at,
        bound_s,
    );
    // TCG boots here vary by seconds from one run to the next: the
    // medians of the runs (each figure's own) say more than any one run.
    let median = medians(&results);
    for r in results.iter().chain([&median]) {
        table += &format!(
            "| {} | {:.1} | {:.1} | {:.3} | {:.2} | {:.2} | {:.3} | {:.1} | {:.3} | {:.2} | {:.1} | {:.2} | {:.1} / {:.1} |\n",
            r["run"].to_string().trim_matches('"'),
            r["local_s"].as_f64().unwrap(),
            r["held_v1_s"].as_f64().unwrap(),
            r["held_over_local"].as_f64().unwrap(),
            r["held_extra_s"].as_f64().unwrap(),
            r["held_wait_s"].as_f64().unwrap(),
            r["least_over_local"].as_f64().unwrap(),
            r["cold_s"].as_f64().unwrap(),
            r["cold_over_local"].as_f64().unwrap(),
            r["cold_wait_s"].as_f64().unwrap(),
            mb(&r["held_fetched_bytes"]),
            r["fetched_over_lacking"].as_f64().unwrap(),
            mb(&r["held_store_sent"]),
            mb(&r["cold_store_sent"]),
        );
    }
    table += &format!(
        "\nv2 as a layer over v1 ({:.1} MB; v2 whole {:.1} MB):\n\n\
         | run | local (s) | layer on a node holding v1 (s) | x local | its reads waited (s) | store sent (MB) | layer cold (s) | x local | its reads waited (s) | store sent (MB) | whole v2 cold (s) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
        std::fs::metadata(&layer).unwrap().len() as f64 / 1e6,
        std::fs::metadata(store.join("v2.bcimg")).unwrap().len() as f64 / 1e6,
    );
    for r in results.iter().chain([&median]) {
        table += &format!(
            "| {} | {:.1} | {:.1} | {:.3} | {:.2} | {:.1} | {:.1} | {:.3} | {:.2} | {:.1} | {:.1} |\n",
            r["run"].to_string().trim_matches('"'),
            r["local_s"].as_f64().unwrap(),
            r["layered_held_s"].as_f64().unwrap(),
            r["layered_held_over_local"].as_f64().unwrap(),
            r["layered_held_wait_s"].as_f64().unwrap(),
            mb(&r["layered_held_store_sent"]),
            r["layered_cold_s"].as_f64().unwrap(),
            r["layered_cold_over_local"].as_f64().unwrap(),
            r["layered_cold_wait_s"].as_f64().unwrap(),
            mb(&r["layered_cold_store_sent"]),
            r["cold_s"].as_f64().unwrap(),
        );
    }
    std::fs::write(out_dir.join("table.md"), &table).unwrap();
    println!("{table}");
}
