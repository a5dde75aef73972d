//! Many nodes fetching one image at once, through the control node: agents
//! in prefetch-only mode (no VM is started; an instance is ready when its
//! node holds the image's boot segment) on N testbed nodes, each given one
//! instance of the small guest's image, with the control node's source
//! plan (a tree: each node passes the image on to at most `--fan-out`
//! others as it receives it), a chain (`--fan-out 1`) or every node from the
//! store (`--sources store`).
//!
//! The test checks, at 4 nodes, that the store sends the image's boot
//! bytes about once with the plan and once per node without, and that
//! every node got the whole boot segment; then the same image from the
//! reference registry behind a token service on the store's host, named
//! by reference: its blob sent about once too, each node and the control
//! node presenting a token of their own; `scripts/bench-fanout` runs the
//! benchmark (ignored here): 1 to 16 nodes, the time until the last node
//! holds the boot segment and the store's bytes, and the simulation of 100
//! and 1,000 nodes driven by the figures it measured. Needs root.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use bootcache_testbed::Link;
use bootcache_testbed::programs::{DockerRegistry, RegistryAuth};
use bootcache_testbed::tokens::TokenIssuer;
use support::cluster::{Cluster, Images, Spec, fill_store_with};

/// Nodes on the testbed for the benchmark.
const MAX_NODES: usize = 16;

/// The source plans compared, as control node arguments.
const PLANS: [(&str, &[&str]); 3] = [("tree", &["--fan-out", "2"]), ("chain", &["--fan-out", "1"]), ("store", &["--sources", "store"])];

fn cluster(dir: &Path, link: Link, nodes: usize, boot_extent: &str) -> (Cluster, Images) {
    let store = dir.join("store");
    std::fs::create_dir(&store).unwrap();
    let images = fill_store_with(&store, dir, boot_extent);
    let spec = Spec {
        nodes: (1..=nodes).map(|i| format!("n{i}")).collect(),
        daemons: false,
        agent_args: ["--background", "off", "--ready-timeout", "300"].map(String::from).to_vec(),
        control_args: PLANS[0].1.iter().map(|a| (*a).to_owned()).collect(),
        log: "fetch_fanout",
        // Orders and reports within a fifth of a second.
        heartbeat: 0.2,
    };
    (Cluster::start(dir, &store, link, spec), images)
}

const BIN: &str = env!("CARGO_BIN_EXE_bootcache");

/// The small guest's image on the store.
fn on_store(c: &Cluster) -> String {
    format!("http://{}:8080/small.bcimg", c.store_addr)
}

/// One instance of `image` pinned to each of the first `n` nodes.
fn lab(image: &str, n: usize) -> String {
    let mut t = String::from("name: fanout\ninstances:\n");
    for i in 1..=n {
        t += &format!("  f{i}:\n    kind: vm\n    image: {image}\n    memory: 96MiB\n    node: n{i}\n");
    }
    t
}

/// `n` nodes fetch the image at once from cold caches: the seconds until
/// each holds the boot segment (from the deploy), the store's bytes and
/// the bytes nodes took from each other.
fn fetch(c: &Cluster, n: usize, image: &str) -> (Vec<f64>, u64, f64) {
    for node in &c.nodes {
        node.cold();
    }
    let file = c.dir.join("fanout.yaml");
    std::fs::write(&file, lab(image, n)).unwrap();
    let before = c.tb.tx_bytes("store").unwrap();
    let out = c.cli(&["deploy", "-f", file.to_str().unwrap(), "--output", "json", "--timeout", "300"]);
    assert!(out.status.success(), "deploy of {n}: {}", String::from_utf8_lossy(&out.stderr));
    let sent = c.tb.tx_bytes("store").unwrap() - before;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut ready: Vec<f64> = report["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            assert_eq!(i["state"], "ready", "{i}");
            i["ready_after_ms"].as_f64().unwrap() / 1000.0
        })
        .collect();
    ready.sort_by(f64::total_cmp);
    let peer: f64 = c.nodes.iter().take(n).map(|node| c.node_metric(&node.name, "bootcache_peer_bytes_total")).sum();
    let out = c.cli(&["destroy", "fanout"]);
    assert!(out.status.success(), "destroy: {}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_millis(500));
    (ready, sent, peer)
}

#[test]
fn the_store_sends_the_image_once_with_the_plan_and_per_node_without() {
    let dir = tempfile::tempdir().unwrap();
    let (mut c, images) = cluster(dir.path(), Link::new(100, 0.0), 4, "256K");
    let boot_bytes = images.boot_bytes;
    let (ready, sent, peer) = fetch(&c, 4, &on_store(&c));
    eprintln!("tree of 4: ready {ready:?}, store sent {sent}, peers {peer} for {boot_bytes} of boot bytes");
    assert!(sent as f64 <= 1.10 * boot_bytes as f64, "with the plan the store sent {sent}, over 1.10 x {boot_bytes}");
    // The three others took the boot segment from each other.
    assert!(peer >= 2.7 * boot_bytes as f64, "peers gave {peer} bytes, under 3 x {boot_bytes}");
    c.restart_control(&["--sources", "store"]);
    let (_, sent, peer) = fetch(&c, 4, &on_store(&c));
    assert!(
        sent as f64 >= 3.9 * boot_bytes as f64 && peer == 0.0,
        "from the store alone it sent {sent} (peers {peer}), not 4 x {boot_bytes}"
    );

    // The image in the reference registry behind a token service, both on
    // the store's host; pushed there, and named by reference in the lab.
    let netns = c.tb.host("store").netns.clone();
    let issuer = TokenIssuer::start_in(dir.path(), "alice", "s3cret-pass", Some(&netns), &c.store_addr).unwrap();
    let auth = RegistryAuth::Token { realm: &issuer.realm, cert: &issuer.cert };
    let _registry = DockerRegistry::start_in(dir.path(), Some(&netns), &c.store_addr, 5000, auth).unwrap();
    let registry = format!("{}:5000", c.store_addr);
    let config = dir.path().join("registry.json");
    let alice = serde_json::json!({"username": "alice", "password": "s3cret-pass"});
    std::fs::write(&config, serde_json::json!({"auths": {registry.clone(): alice}}).to_string()).unwrap();
    let config_s = config.to_str().unwrap();
    let access = ["--registry-config", config_s, "--insecure-registry", registry.as_str()];
    let reference = format!("{registry}/guests/small:v1");
    let image = dir.path().join("store/small.bcimg");
    let pushed = c.tb.command("store", BIN).args(["push", image.to_str().unwrap(), &reference]).args(access).output().unwrap();
    assert!(pushed.status.success(), "push: {}", String::from_utf8_lossy(&pushed.stderr));
    let pushing = issuer.issued();
    c.restart_control(&[PLANS[0].1, &access[..]].concat());
    let (control_url, join) = (c.control_url.clone(), c.join_token());
    for node in &mut c.nodes {
        node.restart_agent(&control_url, &join, &access);
    }
    c.wait_nodes_up();
    let (ready, sent, peer) = fetch(&c, 4, &reference);
    eprintln!("registry, tree of 4: ready {ready:?}, its host sent {sent}, peers {peer} for {boot_bytes} of boot bytes");
    assert!(sent as f64 <= 1.10 * boot_bytes as f64, "the registry's host sent {sent}, over 1.10 x {boot_bytes}");
    assert!(peer >= 2.7 * boot_bytes as f64, "peers gave {peer} bytes, under 3 x {boot_bytes}");
    assert_eq!(issuer.issued() - pushing, 5, "one token for the control node and one per node, however many ranges");
    assert_eq!(issuer.refused(), 0);
}

/// The benchmark (`scripts/bench-fanout` runs it).
#[test]
#[ignore = "a benchmark: scripts/bench-fanout runs it"]
fn bench_fanout() {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let out_dir = PathBuf::from(env("BOOTCACHE_BENCH_OUT", "target/bench-fanout"));
    std::fs::create_dir_all(&out_dir).unwrap();
    let runs: usize = env("BOOTCACHE_BENCH_RUNS", "3").parse().unwrap();
    let rate: u32 = env("BOOTCACHE_BENCH_RATE", "100").parse().unwrap();
    let counts = [1usize, 2, 4, 8, 16];
    let dir = tempfile::tempdir().unwrap();
    let boot_extent = env("BOOTCACHE_BENCH_BOOT_EXTENT", "256K");
    let link = Link::new(rate, 0.0);
    let (mut c, images) = cluster(dir.path(), link, MAX_NODES, &boot_extent);
    let boot_bytes = images.boot_bytes;
    let mut results = Vec::new();
    for run in 1..=runs {
        for (plan, args) in PLANS {
            c.restart_control(args);
            for n in counts {
                // One node alone is the same whatever the plan: measured once a run.
                if n == 1 && plan != "tree" {
                    continue;
                }
                let (ready, sent, peer) = fetch(&c, n, &on_store(&c));
                let r = serde_json::json!({
                    "run": run, "plan": plan, "nodes": n, "rate_mbit": rate, "boot_extent": boot_extent,
                    "first_s": ready[0], "last_s": ready[ready.len() - 1], "ready_s": ready,
                    "store_bytes": sent, "peer_bytes": peer, "boot_bytes": boot_bytes, "store_over_once": sent as f64 / boot_bytes as f64,
                });
                eprintln!("{r}");
                results.push(r);
                std::fs::write(out_dir.join("results.json"), serde_json::to_string_pretty(&results).unwrap()).unwrap();
            }
        }
    }
    let report = bootcache_testbed::fanout::report(&results, boot_bytes, images.boot_extent_bytes, &link.to_string(), &out_dir).unwrap();
    std::fs::write(out_dir.join("table.md"), &report).unwrap();
    println!("{report}");
}
