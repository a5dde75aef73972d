//! The hybrid deployment at scale (the source's 100-instance experiment) on
//! the namespace testbed: four compute nodes with their own libvirtd and
//! dockerd, a store and a control node on shaped links, and the lab files
//! of examples/hybrid: traditional VMs (whole qcow2 copied to each node
//! first), bootcache VMs, containers, and 20 VMs + 80 containers, all of
//! the small guest (scripts/small-guest) and its root file system.
//!
//! The smoke test deploys each configuration at a few instances and checks
//! what must hold at any scale: every instance ready, each image's bytes
//! sent by the store (once for bootcache and tarballs; once per node for
//! the traditional copy), nothing left after destroy. `scripts/bench-hybrid`
//! runs the benchmark (ignored here) at full scale. Needs root.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bootcache_testbed::{Link, median};
use support::cluster::{Cluster, Images, Spec, fill_store, fill_store_from, small_guest_large};

/// The configurations, as the lab files name them.
const CONFIGS: [&str; 4] = ["traditional", "bootcache", "containers", "hybrid"];

/// Four nodes with their daemons on `link`, the store filled.
fn cluster(dir: &Path, link: Link, nodes: usize, control_args: &[&str]) -> (Cluster, Images) {
    let store = dir.join("store");
    std::fs::create_dir(&store).unwrap();
    // BOOTCACHE_BENCH_GUEST=large: the small guest's realistic-size sibling.
    let images = match std::env::var("BOOTCACHE_BENCH_GUEST").as_deref() {
        Ok("large") => fill_store_from(&store, dir, &small_guest_large(), "256K"),
        _ => fill_store(&store, dir),
    };
    let spec = Spec {
        nodes: (1..=nodes).map(|i| format!("node{i}")).collect(),
        daemons: true,
        // The boot needs only the boot set (and what it misses): the rest
        // of the image would follow and blur the store's count.
        agent_args: ["--background", "off", "--ready-timeout", &(deploy_timeout() - 300).to_string()].map(String::from).to_vec(),
        control_args: control_args.iter().map(|a| (*a).to_owned()).collect(),
        log: "hybrid",
        heartbeat: 1.0,
    };
    (Cluster::start(dir, &store, link, spec), images)
}

/// How long a deployment may take, s (`BOOTCACHE_BENCH_TIMEOUT`, 1500;
/// at least 600): a VM's agent waits for its boot 300 s less.
fn deploy_timeout() -> u64 {
    std::env::var("BOOTCACHE_BENCH_TIMEOUT").ok().and_then(|t| t.parse().ok()).unwrap_or(1500).max(600)
}

/// The lab file of `config`, for this store, its counts scaled by `scale`
/// (at least one of each).
fn lab(config: &str, store: &str, scale: f64) -> (String, usize) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("examples/hybrid/{config}.yaml"));
    let text = std::fs::read_to_string(&path).unwrap().replace("store.invalid", store);
    let mut total = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|l| match l.trim_start().strip_prefix("count: ").and_then(|n| n.parse::<f64>().ok()) {
            Some(n) => {
                let k = ((n * scale).round() as usize).max(1);
                total += k;
                format!("{}count: {k}", &l[..l.len() - l.trim_start().len()])
            }
            None => l.to_owned(),
        })
        .collect();
    (lines.join("\n") + "\n", total)
}

/// How many of the slowest VMs of a deployment keep their consoles.
const SLOWEST_KEPT: usize = 3;

/// One deployment of `config` from cold caches, measured, then destroyed.
/// `strict`: every instance must be ready (else those that failed are
/// counted, with their reasons, and the rest measured). With `consoles`
/// (a directory and a label), the serial consoles of the slowest VMs and of
/// those that failed are copied there before the lab goes, and named in the
/// result.
fn deploy(c: &Cluster, images: &Images, config: &str, scale: f64, strict: bool, consoles: Option<(&Path, &str)>) -> serde_json::Value {
    // An ablation is a lab deployed by a control node run otherwise
    // (`hybrid+spread`: spread placement, `+store`: every node from the store).
    let lab_name = config.split('+').next().unwrap_or(config);
    let (text, count) = lab(lab_name, &c.store_addr, scale);
    let file = c.dir.join(format!("{lab_name}.yaml"));
    std::fs::write(&file, text).unwrap();
    for n in &c.nodes {
        n.cold();
    }
    // Two heartbeats: the control node learns that no node holds the
    // images any more (else it names as sources nodes whose copies were
    // just wiped, and they answer 404).
    std::thread::sleep(Duration::from_millis(2500));
    let cpu_before: Vec<f64> = c.nodes.iter().map(|n| n.usage().0).collect();
    let sent_before = c.tb.tx_bytes("store").unwrap();
    let started = Instant::now();
    let out = c.cli(&["deploy", "-f", file.to_str().unwrap(), "--output", "json", "--timeout", &deploy_timeout().to_string()]);
    let wall = started.elapsed().as_secs_f64();
    assert!(out.status.success() || !strict, "deploy {config}: {}", String::from_utf8_lossy(&out.stderr));
    let store_bytes = c.tb.tx_bytes("store").unwrap() - sent_before;
    let usage: Vec<(f64, u64)> = c.nodes.iter().map(Node::usage).collect();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("deploy {config} gave no report ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    let instances = report["instances"].as_array().unwrap();
    assert_eq!(instances.len(), count, "{report}");
    let mut ready: Vec<f64> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    for i in instances {
        if strict {
            assert_eq!(i["state"], "ready", "{config}: {i}");
        }
        match i["ready_after_ms"].as_f64() {
            Some(ms) if i["state"] == "ready" => ready.push(ms / 1000.0),
            _ => failed.push(format!("{}: {} {}", i["name"], i["state"], i["reason"])),
        }
    }
    assert!(!ready.is_empty(), "{config}: nothing got ready: {failed:?}");
    ready.sort_by(f64::total_cmp);
    let kinds = |k: &str| instances.iter().filter(|i| i["kind"] == k).count();
    let nodes_of = |k: &str| {
        instances.iter().filter(|i| i["kind"] == k).filter_map(|i| i["node"].as_str()).collect::<std::collections::BTreeSet<_>>().len()
    };
    let peer_bytes: f64 = c.nodes.iter().map(|n| c.node_metric(&n.name, "bootcache_peer_bytes_total")).sum::<f64>() + 0.0;
    // What the store would send if it sent each image once.
    let once = match lab_name {
        "traditional" => images.disk_bytes,
        "bootcache" => images.boot_bytes,
        "containers" => images.tar_bytes,
        _ => images.boot_bytes + images.tar_bytes,
    };
    let pct = |q: f64| ready[((ready.len() as f64 - 1.0) * q).round() as usize];
    let mut r = serde_json::json!({
        "config": config,
        "instances": count,
        "failed": failed,
        "vms": kinds("vm"),
        "containers": kinds("container"),
        "vm_nodes": nodes_of("vm"),
        "container_nodes": nodes_of("container"),
        "deploy_s": wall,
        "unit_deployment_s": wall / count as f64,
        "instances_per_min": count as f64 / wall * 60.0,
        "first_ready_s": ready[0],
        "last_ready_s": ready[ready.len() - 1],
        "median_ready_s": pct(0.5),
        "p95_ready_s": pct(0.95),
        "ready_s": ready,
        "store_bytes": store_bytes,
        "once_bytes": once,
        "store_over_once": store_bytes as f64 / once as f64,
        "peer_bytes": peer_bytes,
        "node_cpu_s": usage.iter().zip(&cpu_before).map(|((u, _), b)| u - b).collect::<Vec<f64>>(),
        "node_rss_bytes": usage.iter().map(|u| u.1).collect::<Vec<u64>>(),
    });
    if let Some((dir, label)) = consoles {
        r["kept_consoles"] = keep_consoles(c, instances, lab_name, dir, label).into();
    }
    let out = c.cli(&["destroy", lab_name]);
    assert!(out.status.success(), "destroy {config}: {}", String::from_utf8_lossy(&out.stderr));
    std::thread::sleep(Duration::from_secs(2));
    c.assert_clean(&format!("after destroying {config}"));
    r
}

/// Copies the consoles of the [`SLOWEST_KEPT`] slowest VMs and of every VM
/// that did not get ready into `dir` as `LABEL-NAME.console`; what was kept
/// (name, node, ready time, file).
fn keep_consoles(c: &Cluster, instances: &[serde_json::Value], lab: &str, dir: &Path, label: &str) -> Vec<serde_json::Value> {
    let mut vms: Vec<&serde_json::Value> = instances.iter().filter(|i| i["kind"] == "vm").collect();
    // Not ready first, then the slowest.
    vms.sort_by(|a, b| {
        let t = |i: &serde_json::Value| if i["state"] == "ready" { i["ready_after_ms"].as_f64().unwrap_or(f64::MAX) } else { f64::MAX };
        t(b).total_cmp(&t(a))
    });
    let failed = vms.iter().filter(|i| i["state"] != "ready").count();
    std::fs::create_dir_all(dir).unwrap();
    let mut kept = Vec::new();
    for i in vms.into_iter().take(failed + SLOWEST_KEPT) {
        let (Some(name), Some(node)) = (i["name"].as_str(), i["node"].as_str()) else { continue };
        let from = c.node(node).dir.join(format!("agent/consoles/bootcache.{lab}.{name}.console"));
        let to = dir.join(format!("{label}-{name}.console"));
        if std::fs::copy(&from, &to).is_ok() {
            kept.push(serde_json::json!({
                "name": name, "node": node, "state": i["state"],
                "ready_s": i["ready_after_ms"].as_f64().map(|ms| ms / 1000.0), "console": to.display().to_string(),
            }));
        }
    }
    kept
}

use support::cluster::Node;

#[test]
fn every_configuration_deploys_at_small_scale() {
    let dir = tempfile::tempdir().unwrap();
    // Two vCPUs a node: the instances of each kind span two nodes or more.
    let (c, images) = cluster(dir.path(), Link::new(100, 2.0), 4, &["--cpu-overcommit", "1"]);
    for config in CONFIGS {
        let r = deploy(&c, &images, config, 0.04, true, None);
        eprintln!("{r}");
        let over = r["store_over_once"].as_f64().unwrap();
        match config {
            // Each node that runs VMs copies the whole disk from the store.
            "traditional" => {
                let nodes = r["vm_nodes"].as_f64().unwrap();
                assert!(over >= nodes * 0.99 && over <= nodes * 1.10, "traditional: {over} x the disk for {nodes} nodes: {r}");
            }
            // Each image comes from the store once (VM image: boot segment,
            // header and index; tarball: whole), however many nodes use it.
            _ => {
                assert!(over <= 1.10, "{config}: the store sent {over} x each image once: {r}");
                if r["vm_nodes"].as_u64().unwrap() > 1 {
                    assert!(
                        r["peer_bytes"].as_f64().unwrap() > 0.5 * images.boot_bytes as f64,
                        "{config}: nodes fetched from each other: {r}"
                    );
                }
            }
        }
    }
}

/// The benchmark (`scripts/bench-hybrid` runs it): every configuration,
/// runs interleaved, at each link rate; results.json, table.md and plots.
#[test]
#[ignore = "a benchmark: scripts/bench-hybrid runs it"]
fn bench_hybrid() {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let out_dir = PathBuf::from(env("BOOTCACHE_BENCH_OUT", "target/bench-hybrid"));
    std::fs::create_dir_all(&out_dir).unwrap();
    let runs: usize = env("BOOTCACHE_BENCH_RUNS", "3").parse().unwrap();
    let scale: f64 = env("BOOTCACHE_BENCH_SCALE", "1").parse().unwrap();
    let rates: Vec<u32> = env("BOOTCACHE_BENCH_RATES", "100,1000").split(',').map(|r| r.parse().unwrap()).collect();
    let configs: Vec<String> = env("BOOTCACHE_BENCH_CONFIGS", &CONFIGS.join(",")).split(',').map(String::from).collect();
    // The report of earlier runs (their results.json files, comma-separated),
    // merged, without running anything.
    if let Ok(files) = std::env::var("BOOTCACHE_BENCH_FROM") {
        let mut results: Vec<serde_json::Value> = Vec::new();
        for f in files.split(',') {
            let v: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap();
            results.extend(v);
        }
        let mut configs: Vec<String> = Vec::new();
        let mut rates: Vec<u32> = Vec::new();
        for r in &results {
            let c = r["config"].as_str().unwrap().to_owned();
            if !configs.contains(&c) {
                configs.push(c);
            }
            let rate = u32::try_from(r["rate_mbit"].as_u64().unwrap()).unwrap();
            if !rates.contains(&rate) {
                rates.push(rate);
            }
        }
        std::fs::write(out_dir.join("results.json"), serde_json::to_string_pretty(&results).unwrap()).unwrap();
        let table = report(&results, &configs, &rates);
        std::fs::write(out_dir.join("table.md"), &table).unwrap();
        plots(&results, &configs, &rates, &out_dir);
        println!("{table}");
        return;
    }
    let mut results = Vec::new();
    let save = |results: &Vec<serde_json::Value>| {
        std::fs::write(out_dir.join("results.json"), serde_json::to_string_pretty(results).unwrap()).unwrap();
    };
    for &rate in &rates {
        let link = Link::new(rate, 2.0);
        let dir = tempfile::tempdir().unwrap();
        // 26 vCPUs a node (2 cores here): about 25 instances each, as in the source.
        let overcommit = env("BOOTCACHE_BENCH_OVERCOMMIT", "13");
        let (mut c, images) = cluster(dir.path(), link, 4, &["--cpu-overcommit", &overcommit]);
        for run in 1..=runs {
            for config in &configs {
                let mut args = vec!["--cpu-overcommit", overcommit.as_str()];
                if config.contains("+spread") {
                    args.extend(["--placement", "spread"]);
                }
                if config.contains("+store") {
                    args.extend(["--sources", "store"]);
                }
                if c.control_args != args {
                    c.restart_control(&args);
                }
                let label = format!("{config}-{rate}mbit-r{run}");
                let mut r = deploy(&c, &images, config, scale, false, Some((&out_dir.join("consoles"), &label)));
                r["link"] = link.to_string().into();
                r["rate_mbit"] = rate.into();
                r["run"] = run.into();
                eprintln!("{r}");
                results.push(r);
                save(&results);
            }
        }
    }
    let table = report(&results, &configs, &rates);
    std::fs::write(out_dir.join("table.md"), &table).unwrap();
    plots(&results, &configs, &rates, &out_dir);
    println!("{table}");
}

fn rows<'a>(results: &'a [serde_json::Value], config: &str, rate: u32) -> Vec<&'a serde_json::Value> {
    results.iter().filter(|r| r["config"] == config && r["rate_mbit"] == rate).collect()
}

fn med(results: &[serde_json::Value], config: &str, rate: u32, key: &str) -> f64 {
    median(rows(results, config, rate).iter().filter_map(|r| r[key].as_f64()))
}

/// The table and the goals' ratios, medians over the runs.
fn report(results: &[serde_json::Value], configs: &[String], rates: &[u32]) -> String {
    let mut t = String::from(
        "| link | configuration | instances (VMs + containers) | runs | not ready (max) | unit deployment time (s) | instances/min | first ready (s) | median ready (s) | p95 ready (s) | last ready (s) | store MB (x once) | peer MB | node CPU s (sum) | node RSS GB (sum) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for &rate in rates {
        for config in configs {
            let rs = rows(results, config, rate);
            let Some(first) = rs.first() else { continue };
            let m = |k: &str| med(results, config, rate, k);
            let sum = |k: &str| median(rs.iter().map(|r| r[k].as_array().unwrap().iter().filter_map(|v| v.as_f64()).sum()));
            t += &format!(
                "| {rate} Mbit/s | {config} | {} ({} + {}) | {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} ({:.2}) | {:.1} | {:.0} | {:.1} |\n",
                first["instances"],
                first["vms"],
                first["containers"],
                rs.len(),
                rs.iter().map(|r| r["failed"].as_array().map_or(0, Vec::len)).max().unwrap_or(0),
                m("unit_deployment_s"),
                m("instances_per_min"),
                m("first_ready_s"),
                m("median_ready_s"),
                m("p95_ready_s"),
                m("last_ready_s"),
                m("store_bytes") / 1e6,
                m("store_over_once"),
                m("peer_bytes") / 1e6 + 0.0, // never "-0.0"
                sum("node_cpu_s"),
                sum("node_rss_bytes") / 1e9,
            );
        }
    }
    t += "\n| link | hybrid / bootcache VMs (goal <= 0.5) | hybrid / traditional (goal <= 0.25) | bootcache / traditional VMs (goal <= 0.5) |\n|---|---|---|---|\n";
    for &rate in rates {
        let u = |c: &str| med(results, c, rate, "unit_deployment_s");
        t += &format!(
            "| {rate} Mbit/s | {:.2} | {:.2} | {:.2} |\n",
            u("hybrid") / u("bootcache"),
            u("hybrid") / u("traditional"),
            u("bootcache") / u("traditional")
        );
    }
    t
}

fn plots(results: &[serde_json::Value], configs: &[String], rates: &[u32], out: &Path) {
    use bootcache_testbed::plot;
    let groups: Vec<String> = rates.iter().map(|r| format!("{r} Mbit/s")).collect();
    let series: Vec<(String, Vec<Option<f64>>)> = configs
        .iter()
        .map(|c| (c.clone(), rates.iter().map(|&r| Some(med(results, c, r, "unit_deployment_s")).filter(|v| v.is_finite())).collect()))
        .collect();
    plot::bars(&out.join("unit-deployment-time.png"), "Unit deployment time (median of runs)", "seconds per instance", &groups, &series)
        .unwrap();
    // Instances ready over time, every configuration of the first run at the slowest link.
    let rate = rates[0];
    let series: Vec<(String, Vec<(f64, f64)>)> = configs
        .iter()
        .filter_map(|c| {
            let r = rows(results, c, rate).into_iter().next()?;
            let ready: Vec<f64> = r["ready_s"].as_array()?.iter().filter_map(|v| v.as_f64()).collect();
            Some((c.clone(), ready.iter().enumerate().map(|(i, t)| (*t, (i + 1) as f64)).collect()))
        })
        .collect();
    plot::lines(
        &out.join("ready-over-time.png"),
        &format!("Instances ready over time ({rate} Mbit/s, run 1)"),
        "seconds since deploy",
        "instances ready",
        &series,
        false,
    )
    .unwrap();
}
