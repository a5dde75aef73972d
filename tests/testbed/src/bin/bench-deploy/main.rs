//! The deployment benchmark: ways of getting VMs on two compute nodes
//! running from an image on a store, run by run on the testbed, side by side.
//!
//! Hosts: `store` (nginx with the images, qemu-nbd), `peer` (a bootcache
//! node that already caches the image), `node1` and `node2` (the compute
//! nodes, each booting 1 or more VMs). Every link is shaped alike; the
//! methods run interleaved, their order rotated from run to run. Each
//! deployment is timed from "deploy" to the last VM's boot marker.
//!
//! Writes `results.json` (every deployment), `table.md` and PNG plots to
//! `--out`, and prints the table.

mod report;
mod run;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use bootcache_testbed::programs::{Killed, Nginx, NodeProc, qemu_nbd_in};
use bootcache_testbed::{Link, Testbed};
use clap::Parser;

use run::{Arm, Deployment, Method, Setup};

/// Deployment benchmark on a namespace testbed (needs root).
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// The bootcache binary.
    #[arg(long, required_unless_present = "from_results")]
    bootcache: Option<PathBuf>,
    /// The reference guest, raw (the "local" image).
    #[arg(long, required_unless_present = "from_results")]
    image: Option<PathBuf>,
    /// The same disk as a sparse qcow2 (full copy, qemu-nbd).
    #[arg(long, required_unless_present = "from_results")]
    qcow2: Option<PathBuf>,
    /// Its bootcache container, reordered by the boot trace.
    #[arg(long, required_unless_present = "from_results")]
    container: Option<PathBuf>,
    /// A container of it converted without a trace (guest order), for the
    /// trace-order ablation.
    #[arg(long, required_unless_present = "from_results")]
    plain_container: Option<PathBuf>,
    /// The boot trace, guest offsets (for the trace-order ablation).
    #[arg(long, required_unless_present = "from_results")]
    trace: Option<PathBuf>,
    /// Where results, table and plots go.
    #[arg(long)]
    out: PathBuf,
    /// Runs of each method at each setting.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Link settings, RATE_MBIT:RTT_MS, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100:2,100:20,1000:2")]
    links: Vec<String>,
    /// VMs per compute node, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    vms: Vec<usize>,
    /// Methods to run with more than one VM per node. Eight TCG guests on
    /// two cores take about 170 s per deployment, so the default keeps the
    /// matrix within an hour: bootcache, whose store bytes must not grow
    /// with the VMs.
    #[arg(long, value_delimiter = ',', default_value = "bootcache")]
    multi_vm_methods: Vec<Method>,
    /// Link settings for runs with more than one VM per node.
    #[arg(long, value_delimiter = ',', default_value = "100:2")]
    multi_vm_links: Vec<String>,
    /// Methods, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    methods: Vec<Method>,
    /// QEMU accelerator.
    #[arg(long, default_value = "tcg")]
    accel: String,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 512)]
    mem: u32,
    /// The guest's boot marker on its serial console.
    #[arg(long, default_value = "BOOTCACHE-BOOTED")]
    marker: String,
    /// Longest wait for a deployment, seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// `--background` of the bootcache nodes: what they fetch after the
    /// prefetch (`full`, `off`, or a rate such as `4M`).
    #[arg(long, default_value = "full")]
    background: String,
    /// Only write the table and plots for an earlier run's results.json
    /// (the link's limit from the demand.json beside it, or from `--trace`
    /// and `--container` when given).
    #[arg(long, value_name = "RESULTS_JSON")]
    from_results: Option<PathBuf>,
    /// More QEMU arguments for every VM (repeat; e.g. `--vm-arg=-smp
    /// --vm-arg=2`, or a direct kernel boot's -kernel, -initrd, -append).
    #[arg(long = "vm-arg", value_name = "ARG", allow_hyphen_values = true)]
    vm_args: Vec<String>,
    /// Another container of the same disk, NAME=PATH (repeat): `bootcache`
    /// also runs from each, reported as `bootcache [NAME]` (e.g. boot sets
    /// from other traces, for the trace-robustness comparison).
    #[arg(long = "variant", value_name = "NAME=PATH")]
    variants: Vec<String>,
    /// Fail unless, at every setting, the store sends at most half the
    /// bytes with a caching peer (a check that does not depend on timing).
    #[arg(long)]
    require_peer_halves: bool,
}

fn parse_link(s: &str) -> anyhow::Result<Link> {
    let (rate, rtt) = s.split_once(':').with_context(|| format!("link {s:?}: expected RATE_MBIT:RTT_MS"))?;
    Ok(Link::new(rate.parse().with_context(|| format!("link rate {rate:?}"))?, rtt.parse().with_context(|| format!("link RTT {rtt:?}"))?))
}

fn report_all(results: &[Deployment], demand: Option<&bootcache_testbed::limit::Demand>, out: &std::path::Path) -> anyhow::Result<()> {
    let table = report::table(results, demand);
    std::fs::write(out.join("table.md"), &table)?;
    print!("{table}");
    report::plots(results, out)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.out)?;
    if let Some(path) = &args.from_results {
        let results: Vec<Deployment> =
            serde_json::from_slice(&std::fs::read(path)?).with_context(|| format!("reading {}", path.display()))?;
        // The boot's demand: from --trace and --container if given, else
        // saved beside the results.
        let demand = match (&args.trace, &args.container) {
            (Some(t), Some(c)) => Some(bootcache_testbed::limit::Demand::of(t, c)?),
            _ => std::fs::read(path.with_file_name("demand.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()),
        };
        if let Some(d) = &demand {
            std::fs::write(args.out.join("demand.json"), serde_json::to_string(d)?)?;
        }
        return report_all(&results, demand.as_ref(), &args.out);
    }
    let need = |p: &Option<PathBuf>, what: &str| -> anyhow::Result<PathBuf> {
        let p = p.clone().with_context(|| format!("--{what} is needed"))?;
        if !p.is_file() {
            bail!("{} does not exist", p.display());
        }
        Ok(p)
    };
    let (bootcache, image, qcow2) = (need(&args.bootcache, "bootcache")?, need(&args.image, "image")?, need(&args.qcow2, "qcow2")?);
    let (container, plain, trace) =
        (need(&args.container, "container")?, need(&args.plain_container, "plain-container")?, need(&args.trace, "trace")?);
    let demand = bootcache_testbed::limit::Demand::of(&trace, &container)?;
    std::fs::write(args.out.join("demand.json"), serde_json::to_string(&demand)?)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, std::sync::Arc::clone(&stop))?;
    }
    let links: Vec<Link> = args.links.iter().map(|s| parse_link(s)).collect::<Result<_, _>>()?;
    let multi_links: Vec<Link> = args.multi_vm_links.iter().map(|s| parse_link(s)).collect::<Result<_, _>>()?;
    let methods = if args.methods.is_empty() { Method::ALL.to_vec() } else { args.methods.clone() };
    let mut variants = Vec::new();
    for v in &args.variants {
        let (name, path) = v.split_once('=').with_context(|| format!("--variant {v:?}: expected NAME=PATH"))?;
        anyhow::ensure!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "--variant {v:?}: the name must be letters, digits, '-' or '_'"
        );
        variants.push((name.to_owned(), need(&Some(PathBuf::from(path)), "variant")?));
    }
    let work = tempfile::Builder::new().prefix("bench-deploy-").tempdir_in("/var/tmp").context("creating a work directory")?;
    let store_dir = work.path().join("store");
    std::fs::create_dir(&store_dir)?;
    let inputs = [("guest.raw", &image), ("guest.qcow2", &qcow2), ("guest.bcimg", &container), ("plain.bcimg", &plain)];
    let variant_inputs: Vec<(String, &PathBuf)> = variants.iter().map(|(n, p)| (format!("variant-{n}.bcimg"), p)).collect();
    for (name, src) in inputs.iter().map(|(n, p)| (n.to_string(), *p)).chain(variant_inputs) {
        // nginx's workers run as nobody: a hard link (or a sparse copy)
        // in a readable directory, not a link into the caller's files.
        let dst = store_dir.join(name);
        if std::fs::hard_link(src, &dst).is_err() {
            let ok = std::process::Command::new("cp").args(["--sparse=always", "--reflink=auto"]).arg(src).arg(&dst).status()?;
            if !ok.success() {
                bail!("cannot copy {} to {}", src.display(), dst.display());
            }
        }
    }

    let mut tb = Testbed::new(&["store", "peer", "node1", "node2"])?;
    let store_addr = tb.host("store").addr.to_string();
    let _nginx = Nginx::start_in(Some(&tb.host("store").netns), &store_addr, 8080, &store_dir, &work.path().join("nginx"))?;
    let _nbd: Killed = qemu_nbd_in(Some(&tb.host("store").netns), &store_addr, 10809, &qcow2, "qcow2", "guest")?;
    let store_url = format!("http://{store_addr}:8080");

    // The peer caches the image once, before any run (unshaped).
    let peer =
        if methods.contains(&Method::BootcachePeer) { Some(warm_peer(&tb, &bootcache, &store_url, work.path(), &stop)?) } else { None };

    let setup = Setup {
        bootcache,
        image,
        trace,
        store_url,
        nbd_url: format!("nbd://{store_addr}:10809/guest"),
        peer_url: peer.as_ref().map(|p| format!("http://{}", p.api)).unwrap_or_default(),
        accel: args.accel.clone(),
        mem: args.mem,
        vm_args: args.vm_args.clone(),
        marker: args.marker.clone(),
        timeout: std::time::Duration::from_secs(args.timeout),
        work: work.path().to_owned(),
        background: args.background.clone(),
        stop: std::sync::Arc::clone(&stop),
    };
    let mut schedule = Vec::new();
    for run in 0..args.runs {
        for &vms in &args.vms {
            for link in &links {
                if vms > 1 && !multi_links.is_empty() && !multi_links.contains(link) {
                    continue;
                }
                let mut ms: Vec<Arm<'_>> = methods
                    .iter()
                    .copied()
                    .filter(|m| vms == 1 || args.multi_vm_methods.is_empty() || args.multi_vm_methods.contains(m))
                    .flat_map(|m| {
                        let extra: Vec<Option<&str>> =
                            if m == Method::Bootcache { variants.iter().map(|(n, _)| Some(n.as_str())).collect() } else { vec![] };
                        std::iter::once(None).chain(extra).map(move |variant| Arm { method: m, variant })
                    })
                    .collect();
                let n = ms.len().max(1);
                ms.rotate_left(run % n);
                schedule.extend(ms.into_iter().map(|arm| (run, *link, vms, arm)));
            }
        }
    }
    let started = Instant::now();
    let mut results: Vec<Deployment> = Vec::new();
    let mut failure = None;
    for (i, (run, link, vms, arm)) in schedule.iter().enumerate() {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            failure = Some(anyhow::anyhow!("interrupted"));
            break;
        }
        tb.shape(*link)?;
        let d = match run::deploy(&tb, &setup, *arm, *link, *vms, *run) {
            Ok(d) => d,
            Err(e) => {
                // Report what was measured; everything is torn down on the way out.
                failure = Some(e.context(format!("{arm} at {link}, {vms} VM(s) per node")));
                break;
            }
        };
        eprintln!(
            "[{}/{} {:.0} min] run {run} {link} {vms}/node {arm}: {:.1} s, store sent {:.1} MB, peer {:.1} MB",
            i + 1,
            schedule.len(),
            started.elapsed().as_secs_f64() / 60.0,
            d.seconds,
            d.store_bytes as f64 / 1e6,
            d.peer_bytes as f64 / 1e6
        );
        results.push(d);
        std::fs::write(args.out.join("results.json"), serde_json::to_string_pretty(&results)?)?;
    }
    drop(peer);
    tb.unshape();
    if !results.is_empty() {
        report_all(&results, Some(&demand), &args.out)?;
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if args.require_peer_halves {
        report::require_peer_halves(&results)?;
    }
    eprintln!("{} deployments in {:.1} min; results in {}", results.len(), started.elapsed().as_secs_f64() / 60.0, args.out.display());
    Ok(())
}

/// Starts the peer node and waits until it caches the whole image.
fn warm_peer(
    tb: &Testbed,
    bootcache: &std::path::Path,
    store_url: &str,
    work: &std::path::Path,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<NodeProc> {
    let peer_addr = tb.host("peer").addr.to_string();
    let peer = NodeProc::start_in(
        bootcache,
        Some(&tb.host("peer").netns),
        Some(&peer_addr),
        &work.join("peer-cache"),
        &work.join("peer"),
        &work.join("node.token"),
        &["--background", "full", "--background-after", "0"],
    )?;
    peer.open("guest", &format!("{store_url}/guest.bcimg"), &[])?;
    let warm = Instant::now();
    loop {
        let listed: serde_json::Value = serde_json::from_str(&peer.get("/images")?)?;
        let m = &listed[0]["metrics"];
        if m["present_extents"] == m["extents"] && m["extents"].as_u64().is_some() {
            break;
        }
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            bail!("interrupted");
        }
        if warm.elapsed().as_secs() > 300 {
            bail!("the peer did not cache the image in 5 minutes: {m}");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    eprintln!("peer cached the image in {:.1} s", warm.elapsed().as_secs_f64());
    Ok(peer)
}
