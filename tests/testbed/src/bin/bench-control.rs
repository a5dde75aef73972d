//! The control plane under load, on loopback: a real `bootcache control
//! serve` (SQLite on disk) and a real store, many simulated agents
//! heartbeating (each carries out its orders at once: fetching at the first
//! heartbeat that lists an instance, ready at the next), and one lab of
//! many instances deployed. While they come up the control node is killed (SIGKILL)
//! and started again on the same database; the agents ride it out.
//!
//! Reports the time to place the lab, heartbeats per second and their
//! latency, the time until every instance is ready, the database's size,
//! and checks that nothing was lost: every instance ready, on exactly one
//! node, none failed or lost, placed once (its history holds one
//! `placed`). Writes `results.json` and `table.md` to `--out`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bootcache_api::agent::{Heartbeat, Observed, Orders};
use bootcache_api::{InstanceState, Name};
use clap::Parser;

/// Control-plane load benchmark (loopback; no root needed).
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// The bootcache binary.
    #[arg(long)]
    bootcache: PathBuf,
    /// Where the database, logs, results.json and table.md go.
    #[arg(long)]
    out: PathBuf,
    /// Simulated agents.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// VMs in the lab (their image is a real container on a real store).
    #[arg(long, default_value_t = 1000)]
    vms: u32,
    /// Containers in the lab.
    #[arg(long, default_value_t = 9000)]
    containers: u32,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 1.0)]
    heartbeat: f64,
    /// Kill the control node this many seconds after the deploy, while the
    /// instances come up (0: never); the run fails if all were ready by then.
    #[arg(long, default_value_t = 2.5)]
    kill_after: f64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

const TOKEN: &str = "bench-control-token-0123456789abcdef012345";

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_control(args: &Args, port: u16, token: &Path) -> anyhow::Result<Proc> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(args.out.join("control.log"))?;
    let child = Command::new(&args.bootcache)
        .args(["control", "serve", "--listen", &format!("127.0.0.1:{port}"), "--heartbeat", &args.heartbeat.to_string(), "--db"])
        .arg(args.out.join("control.db"))
        .arg("--token-file")
        .arg(token)
        .stdin(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting bootcache control serve")?;
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("the control node did not come up");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Proc(child))
}

/// What every simulated agent adds to the totals.
#[derive(Default)]
struct Totals {
    beats: AtomicU64,
    failed_beats: AtomicU64,
    latency_us: std::sync::Mutex<Vec<u64>>,
}

/// One simulated agent: joins, then heartbeats with its own credential,
/// reporting each ordered instance as fetching, then ready, and holding the
/// VM images and tarballs it fetched.
async fn agent(i: usize, base: String, http: reqwest::Client, interval: Duration, totals: Arc<Totals>, stop: Arc<AtomicBool>) {
    let name = format!("sim-{i:04}");
    let address = format!("127.0.{}.{}:7070", 1 + i / 250, 1 + i % 250);
    let mut secret: Option<String> = None;
    let mut seen: std::collections::HashMap<u32, (Name, Name, InstanceState)> = Default::default();
    let mut held: Vec<(bootcache_api::RootDigest, u64)> = Vec::new();
    // Spread the agents over the interval.
    tokio::time::sleep(interval.mul_f64(i as f64 / 97.0 % 1.0)).await;
    let mut tick = tokio::time::interval(interval);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let Some(own) = &secret else {
            let body = serde_json::json!({"name": name, "address": address, "cores": 64, "memory_bytes": 256u64 << 30});
            if let Ok(r) = http.post(format!("{base}/nodes")).json(&body).send().await
                && r.status().is_success()
            {
                secret = r.json::<bootcache_api::agent::Joined>().await.ok().map(|j| j.secret);
            }
            continue;
        };
        let instances: Vec<Observed> = seen
            .iter()
            .map(|(uid, (lab, n, s))| Observed { uid: *uid, lab: lab.clone(), name: n.clone(), state: *s, reason: None })
            .collect();
        let beat = Heartbeat { cores: 64, memory_bytes: 256 << 30, running: 0, caches: held.clone(), files: vec![], instances };
        let sent = Instant::now();
        let r = http.post(format!("{base}/nodes/{name}/heartbeat")).bearer_auth(own).json(&beat).send().await;
        let orders: Option<Orders> = match r {
            Ok(r) if r.status().is_success() => r.json().await.ok(),
            Ok(r) if matches!(r.status().as_u16(), 401 | 404) => {
                secret = None;
                None
            }
            _ => None,
        };
        let Some(orders) = orders else {
            totals.failed_beats.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        totals.beats.fetch_add(1, Ordering::Relaxed);
        totals.latency_us.lock().unwrap().push(u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX));
        let mut now_seen = std::collections::HashMap::new();
        for o in orders.instances {
            let next = match seen.get(&o.uid) {
                None => InstanceState::Fetching,
                Some(_) => InstanceState::Ready,
            };
            // What it fetched it holds: VM images, and tarballs whole (other
            // nodes are given it as their source only once it holds one).
            let key = o.image.key();
            if !held.iter().any(|(r, _)| *r == key) {
                held.push((key, 1));
            }
            now_seen.insert(o.uid, (o.lab, o.name, next));
        }
        seen = now_seen;
    }
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    for f in ["control.db", "control.db-wal", "control.db-shm", "control.log"] {
        let _ = std::fs::remove_file(args.out.join(f));
    }
    let token = args.out.join("control.token");
    std::fs::write(&token, TOKEN)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600))?;
    }
    // A real store with a small real container, for the VMs' image.
    let store_dir = args.out.join("store");
    std::fs::create_dir_all(&store_dir)?;
    let raw = args.out.join("tiny.raw");
    std::fs::write(&raw, vec![1u8; 1 << 20])?;
    let st = Command::new(&args.bootcache).arg("convert").arg(&raw).arg(store_dir.join("tiny.bcimg")).arg("-q").status()?;
    if !st.success() {
        bail!("bootcache convert failed");
    }
    let store_port = free_port()?;
    let _store = Proc(
        Command::new(&args.bootcache)
            .args(["store", "serve", "--listen", &format!("127.0.0.1:{store_port}")])
            .arg(&store_dir)
            .stderr(Stdio::null())
            .spawn()?,
    );
    let port = free_port()?;
    let mut control = Some(start_control(&args, port, &token)?);
    let base = format!("http://127.0.0.1:{port}");
    let total = u64::from(args.vms + args.containers);
    let lab = format!(
        "name: load\nsegments:\n  lan:\n    subnet: 10.200.0.0/16\ninstances:\n  vm:\n    kind: vm\n    image: http://127.0.0.1:{store_port}/tiny.bcimg\n    count: {}\n    memory: 256MiB\n    segments: [lan]\n  user:\n    kind: container\n    image: http://127.0.0.1:{store_port}/user.tar\n    count: {}\n    memory: 32MiB\n    segments: [lan]\n",
        args.vms, args.containers
    );

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(reqwest::header::AUTHORIZATION, format!("Bearer {TOKEN}").parse()?);
        let http = reqwest::Client::builder().default_headers(h).timeout(Duration::from_secs(30)).pool_max_idle_per_host(args.agents).build()?;
        let totals = Arc::new(Totals::default());
        let stop = Arc::new(AtomicBool::new(false));
        let interval = Duration::from_secs_f64(args.heartbeat);
        let mut tasks = Vec::new();
        for i in 0..args.agents {
            tasks.push(tokio::spawn(agent(i, base.clone(), http.clone(), interval, Arc::clone(&totals), Arc::clone(&stop))));
        }
        // Every agent registered and up.
        let start = Instant::now();
        loop {
            let nodes: serde_json::Value = http.get(format!("{base}/nodes")).send().await?.json().await?;
            if nodes.as_array().map_or(0, |a| a.iter().filter(|n| n["up"] == true).count()) == args.agents {
                break;
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the agents did not all come up: {nodes}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let beats_before = totals.beats.load(Ordering::Relaxed);
        let t0 = Instant::now();
        let r = http.post(format!("{base}/labs")).body(lab.clone()).send().await?;
        if !r.status().is_success() {
            bail!("deploy: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
        let placed: serde_json::Value = r.json().await?;
        let place_s = t0.elapsed().as_secs_f64();
        let placed_count = placed.as_array().map_or(0, |a| a.iter().filter(|i| i["state"] == "placed").count());
        let mut killed_at = None;
        let mut restart_s = None;
        let ready_s = loop {
            let ready = match http.get(format!("{base}/labs")).send().await {
                Ok(r) if r.status().is_success() => {
                    let labs: serde_json::Value = r.json().await?;
                    labs[0]["states"]["ready"].as_u64().unwrap_or(0)
                }
                _ => 0,
            };
            if ready == total {
                if args.kill_after > 0.0 && killed_at.is_none() {
                    bail!("every instance was ready before the kill at {} s: nothing was tested (use a smaller --kill-after)", args.kill_after);
                }
                break t0.elapsed().as_secs_f64();
            }
            if killed_at.is_none() && args.kill_after > 0.0 && t0.elapsed().as_secs_f64() >= args.kill_after {
                // SIGKILL mid-way, a second down, then the same database.
                killed_at = Some((t0.elapsed().as_secs_f64(), ready));
                drop(control.take());
                tokio::time::sleep(Duration::from_secs(1)).await;
                let t = Instant::now();
                control = Some(start_control(&args, port, &token)?);
                restart_s = Some(t.elapsed().as_secs_f64());
            }
            if t0.elapsed() > Duration::from_secs(args.timeout) {
                bail!("only {ready} of {total} ready after {} s", args.timeout);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        let elapsed = t0.elapsed().as_secs_f64();
        let beats = totals.beats.load(Ordering::Relaxed) - beats_before;
        // Nothing lost: each instance ready, on one node, placed once.
        let rows: serde_json::Value = http.get(format!("{base}/labs/load/instances")).send().await?.json().await?;
        let rows = rows.as_array().context("instances")?;
        let mut per_node: std::collections::BTreeMap<String, u64> = Default::default();
        let mut problems = Vec::new();
        for r in rows {
            let placed_times = r["history"].as_array().map_or(0, |h| h.iter().filter(|s| s[0] == "placed").count());
            if r["state"] != "ready" || placed_times != 1 || !r["node"].is_string() {
                problems.push(format!("{} {} placed {placed_times}x on {}", r["name"], r["state"], r["node"]));
            }
            *per_node.entry(r["node"].as_str().unwrap_or("-").to_owned()).or_default() += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        let mut lat = totals.latency_us.lock().unwrap().clone();
        lat.sort_unstable();
        let db_bytes: u64 = ["control.db", "control.db-wal"].iter().filter_map(|f| std::fs::metadata(args.out.join(f)).ok()).map(|m| m.len()).sum();
        let result = serde_json::json!({
            "agents": args.agents, "instances": total, "vms": args.vms, "containers": args.containers,
            "heartbeat_s": args.heartbeat,
            "place_s": place_s, "placed_by_deploy": placed_count,
            "all_ready_s": ready_s,
            "killed_at_s": killed_at.map(|k| k.0), "ready_when_killed": killed_at.map(|k| k.1), "restart_s": restart_s,
            "heartbeats": beats, "heartbeats_per_s": beats as f64 / elapsed,
            "failed_heartbeats": totals.failed_beats.load(Ordering::Relaxed),
            "heartbeat_ms_p50": percentile(&lat, 0.5), "heartbeat_ms_p95": percentile(&lat, 0.95), "heartbeat_ms_max": percentile(&lat, 1.0),
            "db_bytes": db_bytes,
            "instances_per_node_min": per_node.values().min(), "instances_per_node_max": per_node.values().max(),
            "problems": problems.len(),
        });
        std::fs::write(args.out.join("results.json"), serde_json::to_string_pretty(&result)?)?;
        let table = format!(
            "| agents | instances | place (s) | all ready (s) | killed at (s, ready) | heartbeats/s | heartbeat p50 / p95 / max (ms) | failed heartbeats | database | problems |\n|---|---|---|---|---|---|---|---|---|---|\n| {} | {} ({} VMs) | {:.2} | {:.1} | {} | {:.0} | {:.1} / {:.1} / {:.0} | {} | {:.1} MB | {} |\n",
            args.agents,
            total,
            args.vms,
            place_s,
            ready_s,
            killed_at.map_or("-".into(), |k| format!("{:.1}, {}", k.0, k.1)),
            beats as f64 / elapsed,
            percentile(&lat, 0.5),
            percentile(&lat, 0.95),
            percentile(&lat, 1.0),
            totals.failed_beats.load(Ordering::Relaxed),
            db_bytes as f64 / 1e6,
            problems.len()
        );
        std::fs::write(args.out.join("table.md"), &table)?;
        println!("{table}");
        drop(control);
        if !problems.is_empty() {
            bail!("{} instances not as they should be, e.g. {:?}", problems.len(), &problems[..problems.len().min(5)]);
        }
        Ok(())
    })
}
