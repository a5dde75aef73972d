//! One deployment: VMs on both compute nodes, by one method, timed to the
//! last boot marker, with the bytes each server sent.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bootcache_testbed::programs::{Killed, NodeProc, overlay, start_vm, wrap};
use bootcache_testbed::{Link, Testbed};
use serde::{Deserialize, Serialize};

/// A way of getting the VMs running.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// The image already on the node.
    Local,
    /// Download the sparse qcow2 over HTTP, then boot.
    FullCopy,
    /// qemu-nbd on the store, QEMU's NBD client.
    Nbd,
    /// QEMU's curl block driver on the raw image over HTTP, with its read-ahead.
    Curl,
    /// bootcache from the store, the second node taking the boot stream
    /// from the first as it arrives (a relay: the store sends it once; the
    /// ablations below relay alike).
    Bootcache,
    /// bootcache with a peer that already caches the image (the second
    /// node relaying from the first, which asks the peer).
    BootcachePeer,
    /// Ablation: bootcache without any prefetch (guest misses only).
    OnDemand,
    /// Ablation: the trace's ranges prefetched in trace order from a
    /// container that was not reordered.
    TraceOrder,
}

impl Method {
    pub const ALL: [Method; 8] = [
        Method::Local,
        Method::FullCopy,
        Method::Nbd,
        Method::Curl,
        Method::Bootcache,
        Method::BootcachePeer,
        Method::OnDemand,
        Method::TraceOrder,
    ];

    fn uses_node(self) -> bool {
        matches!(self, Method::Bootcache | Method::BootcachePeer | Method::OnDemand | Method::TraceOrder)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = serde_json::to_value(self).map_err(|_| std::fmt::Error)?;
        f.write_str(v.as_str().unwrap_or("?"))
    }
}

/// A method, and for `bootcache` the container it runs from (`None`: the
/// main one; a name: `--variant`'s).
#[derive(Clone, Copy, Debug)]
pub struct Arm<'a> {
    pub method: Method,
    pub variant: Option<&'a str>,
}

impl std::fmt::Display for Arm<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.variant {
            Some(v) => write!(f, "{} [{v}]", self.method),
            None => write!(f, "{}", self.method),
        }
    }
}

/// What every deployment shares.
#[derive(Debug)]
pub struct Setup {
    pub bootcache: PathBuf,
    pub image: PathBuf,
    pub trace: PathBuf,
    pub store_url: String,
    pub nbd_url: String,
    pub peer_url: String,
    pub accel: String,
    pub mem: u32,
    /// More QEMU arguments for every VM.
    pub vm_args: Vec<String>,
    pub marker: String,
    pub timeout: Duration,
    pub work: PathBuf,
    /// `--background` of the bootcache nodes.
    pub background: String,
    /// Set by SIGINT or SIGTERM: stop, cleaning up.
    pub stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A sample of one node's cache counters during a deployment.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Sample {
    pub seconds: f64,
    pub node: String,
    pub prefetch_bytes: u64,
    pub demand_bytes: u64,
    pub background_bytes: u64,
    pub peer_bytes: u64,
    /// Guest reads that waited, and how long in all.
    #[serde(default)]
    pub misses: u64,
    #[serde(default)]
    pub miss_wait_seconds: f64,
    /// Times a guest ahead of the boot stream re-aimed it.
    #[serde(default)]
    pub boot_reaims: u64,
}

/// What one deployment measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Deployment {
    pub run: usize,
    pub method: Method,
    /// For `bootcache` from another container (`--variant`): its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    pub rate_mbit: u32,
    pub rtt_ms: f64,
    pub vms_per_node: usize,
    /// From "deploy" to the last VM's marker.
    pub seconds: f64,
    /// Each VM's time to its marker.
    pub vm_seconds: Vec<f64>,
    /// Bytes the store host sent until the last marker.
    pub store_bytes: u64,
    /// Bytes the peer host sent until the last marker.
    pub peer_bytes: u64,
    /// Bytes the compute nodes sent until the last marker (what they
    /// relayed to each other, and their requests).
    #[serde(default)]
    pub node_bytes: u64,
    /// For bootcache methods: the nodes' counters, sampled.
    pub timeline: Vec<Sample>,
}

const NODES: [&str; 2] = ["node1", "node2"];

/// Deploys `vms` VMs on each compute node by `arm` and waits for every
/// boot marker.
pub fn deploy(tb: &Testbed, s: &Setup, arm: Arm<'_>, link: Link, vms: usize, run: usize) -> anyhow::Result<Deployment> {
    let Arm { method, variant } = arm;
    let dir = s.work.join(format!("{method}-{}-{}-{}-{vms}-{run}", variant.unwrap_or("main"), link.rate_mbit, link.rtt_ms));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // A node daemon is already running on a compute node before a deployment.
    let mut nodes = Vec::new();
    if method.uses_node() {
        for n in NODES {
            let trace = s.trace.to_string_lossy().into_owned();
            let extra: Vec<&str> = match method {
                Method::OnDemand => vec!["--prefetch", "off"],
                Method::TraceOrder => vec!["--prefetch", &trace],
                _ => vec![],
            };
            let mut extra = extra.into_iter().map(str::to_owned).collect::<Vec<_>>();
            // The container not reordered records no boot time, so its node
            // cannot tell when the boot is over: the trace-order ablation
            // streams no background, which would otherwise run during its
            // boots (the reordered container's nodes wait for the boot).
            let background = if method == Method::TraceOrder { "off".to_owned() } else { s.background.clone() };
            extra.extend(["--background".to_owned(), background]);
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let host = tb.host(n);
            let addr = host.addr.to_string();
            let node = NodeProc::start_in(
                &s.bootcache,
                Some(&host.netns),
                Some(&addr),
                &dir.join(n).join("cache"),
                &dir.join(n),
                &s.work.join("node.token"),
                &extra,
            )?;
            nodes.push(node);
        }
    }
    let node_tx = || -> anyhow::Result<u64> { NODES.iter().map(|n| tb.tx_bytes(n)).sum() };
    let (store0, peer0, nodes0) = (tb.tx_bytes("store")?, tb.tx_bytes("peer")?, node_tx()?);
    let start = Instant::now();
    // The nodes open the image one after the other (a node relays to the
    // next only once it has the image open), then deploy at once.
    let mut backings = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        backings.push(open_on_node(s, arm, node, &nodes[..i])?);
    }
    let prepared: Vec<anyhow::Result<Vec<(PathBuf, Killed)>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = NODES
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let (dir, backing) = (dir.join(n), backings.get(i).cloned());
                scope.spawn(move || deploy_node(tb, s, arm, n, &dir, backing, vms))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("deploy thread panicked")))).collect()
    });
    let mut vms_running = Vec::new();
    for p in prepared {
        vms_running.extend(p?);
    }
    let consoles: Vec<PathBuf> = vms_running.iter().map(|(c, _)| c.clone()).collect();
    let mut seen: Vec<Option<f64>> = vec![None; consoles.len()];
    let mut timeline = Vec::new();
    let mut next_sample = Duration::ZERO;
    while seen.iter().any(Option::is_none) {
        for (i, c) in consoles.iter().enumerate() {
            if seen[i].is_none() && std::fs::read_to_string(c).unwrap_or_default().contains(&s.marker) {
                seen[i] = Some(start.elapsed().as_secs_f64());
            }
        }
        if start.elapsed() >= next_sample {
            for (i, node) in nodes.iter().enumerate() {
                timeline.extend(sample(node, NODES[i], start));
            }
            next_sample += Duration::from_millis(500);
        }
        if s.stop.load(std::sync::atomic::Ordering::Relaxed) {
            bail!("interrupted");
        }
        if start.elapsed() > s.timeout {
            bail!("not every VM reached its marker within {:?}: {seen:?}", s.timeout);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (store_bytes, peer_bytes, node_bytes) = (tb.tx_bytes("store")? - store0, tb.tx_bytes("peer")? - peer0, node_tx()? - nodes0);
    for (i, node) in nodes.iter().enumerate() {
        timeline.extend(sample(node, NODES[i], start));
    }
    let vm_seconds: Vec<f64> = seen.into_iter().flatten().collect();
    drop(vms_running);
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Deployment {
        run,
        method,
        variant: variant.map(str::to_owned),
        rate_mbit: link.rate_mbit,
        rtt_ms: link.rtt_ms,
        vms_per_node: vms,
        seconds: vm_seconds.iter().copied().fold(0.0, f64::max),
        vm_seconds,
        store_bytes,
        peer_bytes,
        node_bytes,
        timeline,
    })
}

fn sample(node: &NodeProc, name: &str, start: Instant) -> Option<Sample> {
    let listed: serde_json::Value = serde_json::from_str(&node.get("/images").ok()?).ok()?;
    let m = &listed.get(0)?["metrics"];
    let g = |k: &str| m[k].as_u64().unwrap_or(0);
    Some(Sample {
        seconds: start.elapsed().as_secs_f64(),
        node: name.into(),
        prefetch_bytes: g("boot_prefetch_bytes"),
        demand_bytes: g("demand_bytes"),
        background_bytes: g("background_bytes"),
        peer_bytes: g("peer_bytes"),
        misses: g("misses"),
        miss_wait_seconds: m["miss_wait_seconds"].as_f64().unwrap_or(0.0),
        boot_reaims: g("boot_reaims"),
    })
}

/// Opens the image on a bootcache node (`before`: the nodes that opened it
/// already); returns the NBD URL QEMU opens.
fn open_on_node(s: &Setup, arm: Arm<'_>, node: &NodeProc, before: &[NodeProc]) -> anyhow::Result<String> {
    let image = match arm {
        Arm { method: Method::TraceOrder, .. } => "plain.bcimg".to_owned(),
        Arm { variant: Some(v), .. } => format!("variant-{v}.bcimg"),
        _ => "guest.bcimg".to_owned(),
    };
    // Each node relays its prefetch to the next (so the store, or the
    // caching peer, sends it once); the first asks the caching peer, if any.
    let relay = before.last().map(|n| format!("http://{}", n.api));
    let peers: Vec<String> = match arm.method {
        Method::BootcachePeer => relay.into_iter().chain([s.peer_url.clone()]).collect(),
        _ => relay.into_iter().collect(),
    };
    let opened = node.open("guest", &format!("{}/{image}", s.store_url), &peers)?;
    Ok(opened["nbd_url"].as_str().context("no nbd_url")?.to_owned())
}

/// One node's part: gets the backing image ready by `method` (bootcache
/// methods: `backing`, opened on the node), then starts `vms` VMs on
/// overlays of it. Returns each VM's console and process.
fn deploy_node(
    tb: &Testbed,
    s: &Setup,
    arm: Arm<'_>,
    host: &str,
    dir: &Path,
    backing: Option<String>,
    vms: usize,
) -> anyhow::Result<Vec<(PathBuf, Killed)>> {
    std::fs::create_dir_all(dir)?;
    let method = arm.method;
    let netns = tb.host(host).netns.clone();
    let size = std::fs::metadata(&s.image)?.len();
    let (backing, format) = match method {
        Method::Local => (s.image.to_string_lossy().into_owned(), "raw"),
        Method::FullCopy => {
            let copy = dir.join("guest.qcow2");
            let out = wrap(Some(&netns), "curl")
                .args(["-sS", "--fail", "-o"])
                .arg(&copy)
                .arg(format!("{}/guest.qcow2", s.store_url))
                .output()
                .context("running curl")?;
            if !out.status.success() {
                bail!("downloading the qcow2: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            (copy.to_string_lossy().into_owned(), "qcow2")
        }
        Method::Nbd => (s.nbd_url.clone(), "raw"),
        Method::Curl => (format!(r#"json:{{"file.driver":"http","file.url":"{}/guest.raw"}}"#, s.store_url), "raw"),
        Method::Bootcache | Method::BootcachePeer | Method::OnDemand | Method::TraceOrder => {
            (backing.context("the image is not open on the node")?, "raw")
        }
    };
    let mut out = Vec::new();
    for v in 0..vms {
        let disk = dir.join(format!("vm{v}.qcow2"));
        overlay(&disk, &backing, format, size)?;
        let console = dir.join(format!("vm{v}.console"));
        out.push((console.clone(), start_vm(Some(&netns), &disk, &console, &s.accel, s.mem, &s.vm_args)?));
    }
    Ok(out)
}
