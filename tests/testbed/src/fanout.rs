//! Many nodes fetching one image: the figures a fan-out benchmark measured
//! (a rate, a fixed cost, a relay delay per hop), and a simulation of
//! source plans at scales the testbed cannot hold.
//!
//! The simulation follows every extent of the boot segment down a plan's
//! tree: a node's uplink sends the extents to its children in turn, each
//! child's share of the link being the rate over the number of children
//! (the store's too); a node passes an extent on once it has it whole, a
//! relay delay later. The time a node holds the boot segment is the arrival
//! of its last extent, plus the fixed cost measured (ordering, opening).

use std::path::Path;

/// A source plan.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Plan {
    /// Every node from the store.
    Store,
    /// Each node from the one before (fan-out 1).
    Chain,
    /// The store serves one node; each node serves at most `k` others.
    Tree(usize),
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Plan::Store => f.write_str("store"),
            Plan::Chain => f.write_str("chain"),
            Plan::Tree(k) => write!(f, "tree (fan-out {k})"),
        }
    }
}

/// What the simulation is driven by.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Figures {
    /// Bytes a node fetches (boot segment, header, index).
    pub bytes: f64,
    /// One stream's rate on a link, bytes per second.
    pub rate: f64,
    /// Fixed cost of a fetch, seconds (order, open, report).
    pub fixed_s: f64,
    /// Between a node having an extent and its child starting to get it.
    pub relay_s: f64,
    /// Bytes per extent.
    pub extent: f64,
}

/// The parent of each node (0 the store; nodes 1..=n) in `plan`.
fn parents(plan: Plan, n: usize) -> Vec<usize> {
    let mut parent = vec![0; n + 1];
    match plan {
        Plan::Store => {}
        Plan::Chain => (2..=n).for_each(|i| parent[i] = i - 1),
        // Breadth first: node i's children are k(i-1)+2 ..= ki+1.
        Plan::Tree(k) => (2..=n).for_each(|i| parent[i] = (i - 2) / k.max(1) + 1),
    }
    parent
}

/// Simulates `n` nodes fetching under `plan`: the time the last one holds
/// the boot segment, and the store's bytes.
pub fn simulate(plan: Plan, n: usize, f: &Figures) -> (f64, f64) {
    let parent = parents(plan, n);
    let mut children = vec![0usize; n + 1];
    for &p in &parent[1..] {
        children[p] += 1;
    }
    let extents = (f.bytes / f.extent).ceil().max(1.0) as usize;
    // Equal parts (the last extent of an image is as often short as not).
    let part = f.bytes / extents as f64;
    // Arrival of each extent at the node being computed, and at each parent
    // (nodes are computed parents first: a parent's number is lower).
    let mut arrivals: Vec<Vec<f64>> = vec![Vec::new(); n + 1];
    arrivals[0] = vec![0.0; extents]; // the store has them all
    let mut last: f64 = 0.0;
    for v in 1..=n {
        let p = parent[v];
        let share = f.rate / children[p].max(1) as f64;
        let per = part / share;
        let relay = if p == 0 { 0.0 } else { f.relay_s };
        let mut at = Vec::with_capacity(extents);
        let mut prev: f64 = 0.0;
        for &from in &arrivals[p] {
            let t = (from + relay).max(prev) + per;
            at.push(t);
            prev = t;
        }
        last = last.max(prev);
        arrivals[v] = at;
        // Nodes whose children are all computed could drop theirs; n is small.
    }
    let store_streams = children[0] as f64;
    (last + f.fixed_s, store_streams * f.bytes)
}

/// The plan with the least simulated time for `n` nodes among the chain
/// and trees of fan-out 2 to 4 (the store sends the image once in each).
pub fn best(n: usize, f: &Figures) -> Plan {
    [Plan::Chain, Plan::Tree(2), Plan::Tree(3), Plan::Tree(4)]
        .into_iter()
        .min_by(|a, b| simulate(*a, n, f).0.total_cmp(&simulate(*b, n, f).0))
        .unwrap_or(Plan::Chain)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

/// Least-squares slope and intercept of `points`.
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points.iter().fold((0.0, 0.0), |a, p| (a.0 + p.0, a.1 + p.1));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    (slope, my - slope * mx)
}

/// The benchmark's table (measured per plan and N, the figures fitted
/// from them, the simulation against the measurements and at 100 and
/// 1,000 nodes, the plan to use at each N) and its plots.
///
/// # Errors
/// A plot cannot be written.
pub fn report(results: &[serde_json::Value], boot_bytes: u64, extent_bytes: f64, link: &str, out: &Path) -> anyhow::Result<String> {
    let last = |plan: &str, n: usize| {
        median(results.iter().filter(|r| r["plan"] == plan && r["nodes"] == n).filter_map(|r| r["last_s"].as_f64()).collect())
    };
    let key = |plan: &str, n: usize, k: &str| {
        median(results.iter().filter(|r| r["plan"] == plan && r["nodes"] == n).filter_map(|r| r[k].as_f64()).collect())
    };
    let counts: Vec<usize> = {
        let mut c: Vec<usize> = results.iter().filter_map(|r| r["nodes"].as_u64()).map(|n| n as usize).collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    let bytes = boot_bytes as f64;
    let one = last("tree", 1);
    // The store's link shared by N streams: time grows by bytes/rate a node.
    let store_pts: Vec<(f64, f64)> =
        counts.iter().filter(|&&n| n > 1).map(|&n| (n as f64, last("store", n))).filter(|p| p.1.is_finite()).collect();
    let (per_node, _) = fit(&store_pts);
    let rate = if per_node > 0.0 { bytes / per_node } else { f64::NAN };
    let fixed_s = (one - bytes / rate).max(0.0);
    // A chain adds one relay delay (and an extent's time) per hop.
    let chain_pts: Vec<(f64, f64)> =
        counts.iter().map(|&n| (n as f64, if n == 1 { one } else { last("chain", n) })).filter(|p| p.1.is_finite()).collect();
    let (per_hop, _) = fit(&chain_pts);
    let extent = extent_bytes.max(1.0);
    let relay_s = (per_hop - extent / rate).max(0.0);
    let f = Figures { bytes, rate, fixed_s, relay_s, extent };

    let mut t = format!(
        "Measured on {link} links, {} runs, medians. Boot bytes (boot segment, header, index): {:.1} MB; boot extents of {:.0} KB stored on average.\n\n| nodes | plan | first ready (s) | last ready (s) | last / one node | store bytes / once | peer MB |\n|---|---|---|---|---|---|---|\n",
        results.iter().filter_map(|r| r["run"].as_u64()).max().unwrap_or(0),
        bytes / 1e6,
        extent / 1e3
    );
    for &n in &counts {
        for plan in ["tree", "chain", "store"] {
            let l = if n == 1 { one } else { last(plan, n) };
            if !l.is_finite() || (n == 1 && plan != "tree") {
                continue;
            }
            let plan_shown = if n == 1 { "(one node)" } else { plan };
            t += &format!(
                "| {n} | {plan_shown} | {:.2} | {l:.2} | {:.2} | {:.2} | {:.1} |\n",
                key(if n == 1 { "tree" } else { plan }, n, "first_s"),
                l / one,
                key(if n == 1 { "tree" } else { plan }, n, "store_over_once"),
                key(if n == 1 { "tree" } else { plan }, n, "peer_bytes") / 1e6
            );
        }
    }
    t += &format!(
        "\nFitted: a stream's rate {:.1} MB/s (from the store-only runs), fixed cost {:.2} s (one node alone less its transfer), relay delay {:.3} s per hop besides an extent's transfer (from the chain).\n\n",
        rate / 1e6,
        fixed_s,
        relay_s
    );
    t += "| nodes | plan | simulated last ready (s) | measured (s) | simulated store bytes / once |\n|---|---|---|---|---|\n";
    let plans = [Plan::Store, Plan::Chain, Plan::Tree(2), Plan::Tree(4)];
    for n in counts.iter().copied().filter(|&n| n > 1).chain([100, 1000]) {
        for plan in plans {
            let (s, egress) = simulate(plan, n, &f);
            let measured = match plan {
                Plan::Store => last("store", n),
                Plan::Chain => last("chain", n),
                Plan::Tree(2) => last("tree", n),
                _ => f64::NAN,
            };
            let m = if measured.is_finite() { format!("{measured:.2}") } else { "-".into() };
            t += &format!("| {n} | {plan} | {s:.2} | {m} | {:.0} |\n", egress / bytes);
        }
    }
    // Which plan is quickest, N by N.
    let mut ranges: Vec<(usize, usize, Plan)> = Vec::new();
    for n in 2..=1000 {
        let b = best(n, &f);
        match ranges.last_mut() {
            Some(r) if r.2 == b => r.1 = n,
            _ => ranges.push((n, n, b)),
        }
    }
    t += "\nQuickest plan by the simulation (the store sends the image once in each):\n\n";
    for (lo, hi, p) in &ranges {
        t += &format!("- {lo} to {hi} nodes: {p}\n");
    }
    let fig = serde_json::to_string(&f)?;
    std::fs::write(out.join("figures.json"), fig)?;

    // Plots: time and store egress against N, measured and simulated.
    let sim_ns: Vec<usize> = [1usize, 2, 4, 8, 16, 32, 64, 100, 250, 500, 1000].to_vec();
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for plan in [Plan::Store, Plan::Chain, Plan::Tree(2)] {
        series.push((
            format!("{plan}, simulated"),
            sim_ns.iter().map(|&n| (n as f64, simulate(plan, n, &f).0)).filter(|p| p.1 < 200.0).collect(),
        ));
    }
    for plan in ["store", "chain", "tree"] {
        let pts: Vec<(f64, f64)> =
            counts.iter().map(|&n| (n as f64, if n == 1 { one } else { last(plan, n) })).filter(|p| p.1.is_finite()).collect();
        series.push((format!("{plan}, measured"), pts));
    }
    crate::plot::lines(&out.join("fanout-time.png"), "Time until the last node holds the boot segment", "nodes", "seconds", &series, true)?;
    let egress: Vec<(String, Vec<(f64, f64)>)> = vec![
        ("store, simulated".into(), sim_ns.iter().map(|&n| (n as f64, simulate(Plan::Store, n, &f).1 / 1e6)).collect()),
        ("chain or tree, simulated".into(), sim_ns.iter().map(|&n| (n as f64, simulate(Plan::Tree(2), n, &f).1 / 1e6)).collect()),
        (
            "store, measured".into(),
            counts.iter().map(|&n| (n as f64, key(if n == 1 { "tree" } else { "store" }, n, "store_bytes") / 1e6)).collect(),
        ),
        ("tree, measured".into(), counts.iter().map(|&n| (n as f64, key("tree", n, "store_bytes") / 1e6)).collect()),
    ];
    crate::plot::lines(&out.join("fanout-store-egress.png"), "Store egress for one image", "nodes", "MB", &egress, true)?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: Figures = Figures { bytes: 16e6, rate: 12e6, fixed_s: 0.3, relay_s: 0.01, extent: 262_144.0 };

    #[test]
    fn one_node_takes_its_transfer_and_the_fixed_cost() {
        for plan in [Plan::Store, Plan::Chain, Plan::Tree(2)] {
            let (t, egress) = simulate(plan, 1, &F);
            assert!((t - (0.3 + 16e6 / 12e6)).abs() < 0.05, "{plan}: {t}");
            assert_eq!(egress, 16e6);
        }
    }

    #[test]
    fn the_store_alone_shares_its_link_and_a_chain_adds_a_hop_each() {
        let (store, egress) = simulate(Plan::Store, 10, &F);
        assert!((store - (0.3 + 10.0 * 16e6 / 12e6)).abs() < 0.1, "{store}");
        assert_eq!(egress, 10.0 * 16e6);
        let (chain, egress) = simulate(Plan::Chain, 10, &F);
        let hop = 262_144.0 / 12e6 + 0.01;
        assert!((chain - (0.3 + 16e6 / 12e6 + 9.0 * hop)).abs() < 0.05, "{chain}");
        assert_eq!(egress, 16e6);
        // A tree halves each stream's rate but has few hops.
        let (tree, _) = simulate(Plan::Tree(2), 1000, &F);
        let (chain, _) = simulate(Plan::Chain, 1000, &F);
        assert!(tree < chain && tree > 0.3 + 2.0 * 16e6 / 12e6, "tree {tree} chain {chain}");
        assert_eq!(best(4, &F), Plan::Chain);
        assert_ne!(best(1000, &F), Plan::Chain);
    }

    #[test]
    fn parents_come_first() {
        for plan in [Plan::Chain, Plan::Tree(2), Plan::Tree(3)] {
            let p = parents(plan, 50);
            assert!((2..=50).all(|i| p[i] < i && p[i] >= 1), "{plan}: {p:?}");
            assert_eq!(p[1], 0);
        }
        assert_eq!(parents(Plan::Tree(2), 7)[2..], [1, 1, 2, 2, 3, 3]);
    }
}
