//! The table (median, min, max; ratio to local), the goals, and the plots.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::run::{Deployment, Method};
use bootcache_testbed::limit::Demand;
use bootcache_testbed::median;

/// The settings present, in first-seen order: (rate, rtt, vms per node).
fn settings(results: &[Deployment]) -> Vec<(u32, f64, usize)> {
    let mut out: Vec<(u32, f64, usize)> = Vec::new();
    for d in results {
        let k = (d.rate_mbit, d.rtt_ms, d.vms_per_node);
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

fn of(results: &[Deployment], k: (u32, f64, usize), m: Method) -> Vec<&Deployment> {
    of_arm(results, k, m, None)
}

/// The deployments at setting `k` by `m` from container `variant` (`None`: the main one).
fn of_arm<'a>(results: &'a [Deployment], k: (u32, f64, usize), m: Method, variant: Option<&str>) -> Vec<&'a Deployment> {
    results.iter().filter(|d| (d.rate_mbit, d.rtt_ms, d.vms_per_node) == k && d.method == m && d.variant.as_deref() == variant).collect()
}

/// Median, min and max time to the last marker.
fn spread(ds: &[&Deployment]) -> (f64, f64, f64) {
    let min = ds.iter().map(|d| d.seconds).fold(f64::INFINITY, f64::min);
    let max = ds.iter().map(|d| d.seconds).fold(0.0, f64::max);
    (med(ds, |d| d.seconds), min, max)
}

fn med(ds: &[&Deployment], f: impl Fn(&Deployment) -> f64) -> f64 {
    median(ds.iter().map(|d| f(d)))
}

/// The last sample of each node.
fn last_samples(d: &Deployment) -> Vec<&crate::run::Sample> {
    let mut last: Vec<&crate::run::Sample> = Vec::new();
    for s in d.timeline.iter().rev() {
        if !last.iter().any(|l| l.node == s.node) {
            last.push(s);
        }
    }
    last
}

/// What the nodes fetched by the last sample (MB), summed over nodes, and
/// how long guest reads waited in all (s).
fn fetched(d: &Deployment) -> (f64, f64, f64, f64, f64) {
    let last = last_samples(d);
    let sum = |f: fn(&crate::run::Sample) -> u64| last.iter().map(|s| f(s)).sum::<u64>() as f64 / 1e6;
    let wait = last.iter().map(|s| s.miss_wait_seconds).sum();
    (sum(|s| s.prefetch_bytes), sum(|s| s.demand_bytes), sum(|s| s.background_bytes), sum(|s| s.peer_bytes), wait)
}

/// The Markdown table and the goals, each as a ratio from the same run.
pub fn table(results: &[Deployment], demand: Option<&Demand>) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "| link | VMs/node | method | time to last marker: median (min-max) | ratio to local | store MB | peer MB | nodes MB | fetched MB: prefetch / demand / background | guest reads waited |"
    );
    let _ = writeln!(t, "|---|---|---|---|---|---|---|---|---|---|");
    for k in settings(results) {
        let local = med(&of(results, k, Method::Local), |d| d.seconds);
        for m in Method::ALL {
            let ds = of(results, k, m);
            if ds.is_empty() {
                continue;
            }
            let (secs, min, max) = spread(&ds);
            let split = if ds[0].timeline.is_empty() {
                " | ".to_owned()
            } else {
                let (p, d, b) = (med(&ds, |d| fetched(d).0), med(&ds, |d| fetched(d).1), med(&ds, |d| fetched(d).2));
                format!("{p:.1} / {d:.1} / {b:.1} | {:.1} s", med(&ds, |d| fetched(d).4))
            };
            let _ = writeln!(
                t,
                "| {} Mbit/s, {} ms | {} | {m} | {secs:.1} s ({min:.1}-{max:.1}) | {} | {:.1} | {:.1} | {:.1} | {split} |",
                k.0,
                k.1,
                k.2,
                if local.is_finite() { format!("{:.2}", secs / local) } else { "(no local run)".to_owned() },
                med(&ds, |d| d.store_bytes as f64 / 1e6),
                med(&ds, |d| d.peer_bytes as f64 / 1e6),
                med(&ds, |d| d.node_bytes as f64 / 1e6),
            );
            if let Some(stall) = demand.map(|d| d.least_stall(f64::from(k.0)))
                && m == Method::Local
            {
                let _ = writeln!(
                    t,
                    "| {} Mbit/s, {} ms | {} | limit: local + {stall:.2} s, the least wait at the link's rate | {:.1} s | {:.2} | | | | | |",
                    k.0,
                    k.1,
                    k.2,
                    local + stall,
                    (local + stall) / local,
                );
            }
        }
    }
    t.push('\n');
    t.push_str(&goals(results, demand));
    if results.iter().any(|d| d.variant.is_some()) {
        t.push('\n');
        t.push_str(&variants(results));
    }
    t
}

/// bootcache from each container (boot sets from other traces) against
/// local: the boot set fetched, the guest's misses and what they cost.
fn variants(results: &[Deployment]) -> String {
    let mut names: Vec<&str> = Vec::new();
    for d in results {
        if let Some(v) = d.variant.as_deref()
            && !names.contains(&v)
        {
            names.push(v);
        }
    }
    let mut t = String::from(
        "| link | VMs/node | container | time: median (min-max) | ratio to local | boot set fetched MB | guest reads that waited | fetched on demand MB | waited s | boot stream re-aimed |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for k in settings(results) {
        let local = med(&of(results, k, Method::Local), |d| d.seconds);
        let rows = std::iter::once(("main".to_owned(), of(results, k, Method::Bootcache)))
            .chain(names.iter().map(|n| ((*n).to_owned(), of_arm(results, k, Method::Bootcache, Some(n)))));
        for (name, ds) in rows {
            if ds.is_empty() {
                continue;
            }
            let (secs, min, max) = spread(&ds);
            let misses = med(&ds, |d| last_samples(d).iter().map(|s| s.misses).sum::<u64>() as f64);
            let reaims = med(&ds, |d| last_samples(d).iter().map(|s| s.boot_reaims).sum::<u64>() as f64);
            let _ = writeln!(
                t,
                "| {} Mbit/s, {} ms | {} | {name} | {secs:.1} s ({min:.1}-{max:.1}) | {:.2} | {:.1} | {misses:.0} | {:.1} | {:.1} | {reaims:.0} |",
                k.0,
                k.1,
                k.2,
                secs / local,
                med(&ds, |d| fetched(d).0),
                med(&ds, |d| fetched(d).1),
                med(&ds, |d| fetched(d).4),
            );
        }
    }
    t
}

fn goals(results: &[Deployment], demand: Option<&Demand>) -> String {
    let mut g = String::from("Goals (ratios of medians from this run):\n\n");
    for k in settings(results) {
        let time = |m| med(&of(results, k, m), |d| d.seconds);
        let store = |m| med(&of(results, k, m), |d| d.store_bytes as f64);
        let link = format!("{} Mbit/s, {} ms, {} VM(s)/node", k.0, k.1, k.2);
        let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
        let bc = time(Method::Bootcache);
        if bc.is_finite() && time(Method::Local).is_finite() {
            let r = bc / time(Method::Local);
            let _ = writeln!(g, "- {link}: bootcache / local = {r:.3} (goal <= 1.10: {})", verdict(r <= 1.10));
            if let Some(stall) = demand.map(|d| d.least_stall(f64::from(k.0))) {
                let limit = time(Method::Local) + stall;
                let _ = writeln!(
                    g,
                    "- {link}: the link's limit = local + {stall:.2} s = {:.3} x local (the boot needs {:.1} MB of the boot segment within its first second); bootcache / limit = {:.3}",
                    limit / time(Method::Local),
                    demand.map_or(0.0, |d| d.needed_by(1.0) as f64 / 1e6),
                    bc / limit
                );
            }
        }
        if k.0 == 100 {
            for m in [Method::FullCopy, Method::Nbd, Method::Curl] {
                if time(m).is_finite() && bc.is_finite() {
                    let r = bc / time(m);
                    let _ = writeln!(g, "- {link}: bootcache / {m} = {r:.3} (goal < 1: {})", verdict(r < 1.0));
                }
            }
        }
        if store(Method::BootcachePeer).is_finite() && store(Method::Bootcache).is_finite() {
            let r = store(Method::BootcachePeer) / store(Method::Bootcache);
            let _ = writeln!(g, "- {link}: store bytes with a peer / without = {r:.3} (goal <= 0.5: {})", verdict(r <= 0.5));
        }
        if k.2 > 1 {
            // What the nodes fetched for the boots (prefetch and on demand):
            // the store's total also holds background streaming, which runs
            // or not by the time the slower many-VM boots take.
            let for_boots = |d: &Deployment| {
                let (prefetch, demand, ..) = fetched(d);
                prefetch + demand
            };
            let ones = of(results, (k.0, k.1, 1), Method::Bootcache);
            let (one, many) = (med(&ones, for_boots), med(&of(results, k, Method::Bootcache), for_boots));
            if one.is_finite() && many.is_finite() {
                let r = many / one;
                let _ = writeln!(
                    g,
                    "- {link}: bytes fetched for the boots / those with 1 VM per node = {r:.3} ({many:.1} MB / {one:.1} MB; goal: no growth, <= 1.05: {}); store bytes {:.1} MB / {:.1} MB with background streaming",
                    verdict(r <= 1.05),
                    store(Method::Bootcache) / 1e6,
                    med(&ones, |d| d.store_bytes as f64) / 1e6,
                );
            }
        }
    }
    g
}

/// A plotters error, whatever its backend.
fn drawing(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

type Chart<'a, DB> = ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The series' legend at `position`.
fn legend<'a, DB: DrawingBackend + 'a>(chart: &mut Chart<'a, DB>, position: SeriesLabelPosition) -> anyhow::Result<()> {
    chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).position(position).draw().map_err(drawing)
}

/// Fails unless the store sent at most half the bytes with a caching peer
/// as without, at every setting where both ran.
pub fn require_peer_halves(results: &[Deployment]) -> anyhow::Result<()> {
    let mut checked = 0;
    for k in settings(results) {
        let store = |m| med(&of(results, k, m), |d| d.store_bytes as f64);
        let (with, without) = (store(Method::BootcachePeer), store(Method::Bootcache));
        if with.is_finite() && without.is_finite() {
            anyhow::ensure!(with <= 0.5 * without, "at {k:?} the store sent {with} bytes with a peer, {without} without");
            checked += 1;
        }
    }
    anyhow::ensure!(checked > 0, "no setting ran both bootcache and bootcache-peer");
    Ok(())
}

/// `boot-times.png` (median time per method and setting) and
/// `timeline.png` (one bootcache deployment's fetched bytes over time).
pub fn plots(results: &[Deployment], out: &Path) -> anyhow::Result<()> {
    let ks = settings(results);
    let methods: Vec<Method> = Method::ALL.into_iter().filter(|m| results.iter().any(|d| d.method == *m)).collect();
    let path = out.join("boot-times.png");
    {
        let root = BitMapBackend::new(&path, (1100, 420 + 20 * ks.len() as u32)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        let ymax = results.iter().map(|d| d.seconds).fold(1.0, f64::max) * 1.45; // room for the legend
        let groups = ks.len().max(1);
        let mut chart = ChartBuilder::on(&root)
            .caption("Time from deploy to the last VM's boot marker (median)", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..(groups * (methods.len() + 1)) as f64, 0.0..ymax)
            .map_err(drawing)?;
        chart.configure_mesh().disable_x_mesh().x_labels(0).y_desc("seconds").draw().map_err(drawing)?;
        for (mi, m) in methods.iter().enumerate() {
            let color = Palette99::pick(mi).to_rgba();
            let bars: Vec<_> = ks
                .iter()
                .enumerate()
                .filter_map(|(gi, k)| {
                    let t = med(&of(results, *k, *m), |d| d.seconds);
                    let x = (gi * (methods.len() + 1) + mi) as f64;
                    t.is_finite().then(|| Rectangle::new([(x, 0.0), (x + 0.9, t)], color.filled()))
                })
                .collect();
            chart
                .draw_series(bars)
                .map_err(drawing)?
                .label(m.to_string())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
        }
        for (gi, k) in ks.iter().enumerate() {
            let x = (gi * (methods.len() + 1)) as f64;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{} Mbit/s {} ms, {}/node", k.0, k.1, k.2),
                    (x, ymax * 0.97),
                    ("sans-serif", 13),
                )))
                .map_err(drawing)?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        root.present().map_err(drawing).context("writing boot-times.png")?;
    }
    // The timeline of the first bootcache deployment at the slowest link.
    let pick = results
        .iter()
        .filter(|d| d.method == Method::Bootcache && d.vms_per_node == 1)
        .min_by(|a, b| a.rate_mbit.cmp(&b.rate_mbit).then(b.rtt_ms.total_cmp(&a.rtt_ms)));
    if let Some(d) = pick {
        timeline(d, &out.join("timeline.png"))?;
    }
    Ok(())
}

fn timeline(d: &Deployment, path: &Path) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing)?;
    let node1: Vec<_> = d.timeline.iter().filter(|s| s.node == "node1").collect();
    let xmax = node1.last().map_or(1.0, |s| s.seconds).max(d.seconds) * 1.05;
    let ymax = node1.iter().map(|s| (s.prefetch_bytes + s.demand_bytes + s.background_bytes) as f64 / 1e6).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("node1, {} Mbit/s {} ms: bytes fetched by kind, boot marker", d.rate_mbit, d.rtt_ms), ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..xmax, 0.0..ymax)
        .map_err(drawing)?;
    chart.configure_mesh().x_desc("seconds since deploy").y_desc("MB fetched").draw().map_err(drawing)?;
    type Get = fn(&crate::run::Sample) -> u64;
    let kinds: [(&str, Get, RGBColor); 3] =
        [("prefetch", |s| s.prefetch_bytes, BLUE), ("on demand", |s| s.demand_bytes, RED), ("background", |s| s.background_bytes, GREEN)];
    for (name, get, color) in kinds {
        chart
            .draw_series(LineSeries::new(node1.iter().map(|s| (s.seconds, get(s) as f64 / 1e6)), color.stroke_width(2)))
            .map_err(drawing)?
            .label(name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    let marker = d.vm_seconds.first().copied().unwrap_or(d.seconds);
    chart
        .draw_series(std::iter::once(PathElement::new([(marker, 0.0), (marker, ymax)], BLACK.stroke_width(1))))
        .map_err(drawing)?
        .label("boot marker")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK));
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(drawing).context("writing timeline.png")
}
