//! Where instances go and where each node fetches an image from: pure
//! functions over what the database knows, so they are tested (and
//! simulated at scale) without a cluster.
//!
//! Placement prefers nodes that already cache an instance's image or most
//! of it (its layers: a role's base held for another role counts by its
//! boot bytes), or are given it earlier in the same plan, then free
//! capacity; the spread policy
//! only balances capacity (the ablation). Source planning gives every node
//! that must fetch an image a source: a node that holds it or fetches it
//! before, each serving at most `fan_out` others, else the store, so the
//! store sends each image about once and no uplink serves more than
//! `fan_out` streams (`fan_out` 1 is a chain, more a tree).

use std::collections::{BTreeMap, HashSet};

use bootcache_api::{Name, RootDigest};

/// A node as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// The node.
    pub node: Name,
    /// Cores free for instances.
    pub cores: u32,
    /// Memory free for instances, bytes.
    pub memory_bytes: u64,
    /// The images it caches.
    pub caches: HashSet<RootDigest>,
}

/// An instance to place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    /// The instance.
    pub instance: Name,
    /// Its image's layers: the image itself first, then its parents, each
    /// with its boot segment's bytes (one for an image that stands alone).
    pub layers: Vec<(RootDigest, u64)>,
    /// Cores it needs.
    pub cores: u32,
    /// Memory it needs, bytes.
    pub memory_bytes: u64,
    /// The node it must run on, if the lab pins it.
    pub pin: Option<Name>,
}

/// How placement chooses among nodes with room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// Nodes that cache most of the image first (by its layers' boot
    /// bytes), then the most free cores.
    CacheAware,
    /// The most free cores, whatever they cache.
    Spread,
}

/// Why an instance could not be placed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{instance}: {why}")]
pub struct Unplaced {
    /// The instance.
    pub instance: Name,
    /// Why.
    pub why: String,
}

/// Places `wants` in order on `nodes` (up nodes only); returns each
/// instance's node, or why it fits nowhere (the others are still placed).
pub fn place(wants: &[Want], nodes: &[Capacity], policy: Policy) -> Vec<Result<(Name, Name), Unplaced>> {
    let mut free: Vec<Capacity> = nodes.to_vec();
    wants
        .iter()
        .map(|w| {
            let fits = |c: &Capacity| c.cores >= w.cores && c.memory_bytes >= w.memory_bytes && w.pin.as_ref().is_none_or(|p| *p == c.node);
            // What of the image a node holds: its layers' boot bytes, then
            // how many (an image whose boot bytes are not known counts by layers).
            let held = |c: &Capacity| {
                let mine = w.layers.iter().filter(|(r, _)| policy == Policy::CacheAware && c.caches.contains(r));
                mine.fold((0u64, 0usize), |(bytes, n), (_, b)| (bytes + b, n + 1))
            };
            // Ties go to the node listed first.
            let best = free
                .iter_mut()
                .enumerate()
                .filter(|(_, c)| fits(c))
                .max_by_key(|(i, c)| (held(c), c.cores, c.memory_bytes, std::cmp::Reverse(*i)))
                .map(|(_, c)| c);
            match best {
                Some(c) => {
                    c.cores -= w.cores;
                    c.memory_bytes -= w.memory_bytes;
                    // It will hold the image's layers once it has fetched them.
                    c.caches.extend(w.layers.iter().map(|(r, _)| *r));
                    Ok((w.instance.clone(), c.node.clone()))
                }
                None => Err(Unplaced {
                    instance: w.instance.clone(),
                    why: match &w.pin {
                        Some(p) if !nodes.iter().any(|c| c.node == *p) => format!("pinned to {p}, which is not an up node"),
                        _ => format!("no up node has {} cores and {} bytes of memory free", w.cores, w.memory_bytes),
                    },
                }),
            }
        })
        .collect()
}

/// Where a node fetches an image from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase", tag = "kind", content = "node")]
pub enum Source {
    /// The store.
    Store,
    /// Another node (a peer that holds the image or fetches it first).
    Node(Name),
}

/// Up to this many nodes fetching one image at once, a chain is quickest;
/// above, a tree of fan-out 2 (the store sends the image once in either).
/// From `scripts/bench-fanout`: its measured per-stream rate and delay per
/// hop drive a simulation of both, which puts the crossover at 52 nodes
/// for images with 256 KiB boot extents at 100 Mbit/s (18 with 1 MiB
/// extents; BENCHMARKS.md, "Many nodes fetching one image").
pub const CHAIN_UP_TO: usize = 48;

/// The fan-out for `nodes` nodes fetching one image at once (see
/// [`CHAIN_UP_TO`]).
pub fn auto_fan_out(nodes: usize) -> usize {
    if nodes <= CHAIN_UP_TO { 1 } else { 2 }
}

/// A source for each of `fetchers` (the nodes that must fetch an image, in
/// the order they start), given the nodes that already `hold` it: each
/// holder, and each fetcher once it has a source, serves at most `fan_out`
/// others; the store serves a fetcher only when no node can.
pub fn sources(fetchers: &[Name], hold: &[Name], fan_out: usize) -> Vec<(Name, Source)> {
    let fan_out = fan_out.max(1);
    // Nodes that can serve, in the order they got the image, and how many
    // they serve already.
    let mut serving: Vec<(Name, usize)> = hold.iter().map(|h| (h.clone(), 0)).collect();
    let mut out = Vec::with_capacity(fetchers.len());
    for f in fetchers {
        let source = match serving.iter_mut().find(|(n, served)| *served < fan_out && n != f) {
            Some((n, served)) => {
                *served += 1;
                Source::Node(n.clone())
            }
            None => Source::Store,
        };
        serving.push((f.clone(), 0));
        out.push((f.clone(), source));
    }
    out
}

/// How many streams each source serves in a plan (the store under `None`).
pub fn load(plan: &[(Name, Source)]) -> BTreeMap<Option<Name>, usize> {
    let mut out = BTreeMap::new();
    for (_, s) in plan {
        let key = match s {
            Source::Store => None,
            Source::Node(n) => Some(n.clone()),
        };
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        s.parse().unwrap()
    }

    fn node(name: &str, cores: u32, caches: &[u8]) -> Capacity {
        Capacity { node: n(name), cores, memory_bytes: 8 << 30, caches: caches.iter().map(|&b| RootDigest([b; 32])).collect() }
    }

    fn want(name: &str, image: u8, cores: u32) -> Want {
        Want { instance: n(name), layers: vec![(RootDigest([image; 32]), 100)], cores, memory_bytes: 1 << 30, pin: None }
    }

    #[test]
    fn placement_prefers_nodes_with_the_image_then_room_and_says_why_one_fits_nowhere() {
        let nodes = [node("a", 8, &[]), node("b", 4, &[1])];
        let placed = place(&[want("vm1", 1, 2), want("vm2", 2, 2), want("vm3", 1, 2), want("big", 1, 64)], &nodes, Policy::CacheAware);
        let on = |i: usize| placed[i].as_ref().map(|(_, node)| node.as_str().to_owned()).unwrap_or_default();
        assert_eq!((on(0), on(1), on(2)), ("b".into(), "a".into(), "b".into()), "the image's holder first, then the most room");
        assert!(placed[3].as_ref().unwrap_err().why.contains("64 cores"));
        let spread = place(&[want("vm1", 1, 2)], &nodes, Policy::Spread);
        assert_eq!(spread[0].as_ref().unwrap().1, n("a"), "spread ignores caches");
        // Given the image earlier in the plan counts as holding it.
        let again = place(&[want("x", 3, 1), want("y", 3, 1)], &[node("a", 8, &[]), node("b", 8, &[])], Policy::CacheAware);
        assert_eq!(again[0].as_ref().unwrap().1, again[1].as_ref().unwrap().1);
        let mut pinned = want("p", 1, 1);
        pinned.pin = Some(n("gone"));
        assert!(place(&[pinned], &nodes, Policy::CacheAware)[0].as_ref().unwrap_err().why.contains("gone"));
    }

    #[test]
    fn placement_prefers_the_node_holding_most_of_a_layered_image() {
        // Role 5 over base 9 (boot bytes 900) and mid layer 7 (50): node b
        // holds the base for another role, c holds only the mid layer, a
        // nothing but has the most room.
        let role = |name: &str| Want {
            instance: n(name),
            layers: vec![(RootDigest([5; 32]), 30), (RootDigest([7; 32]), 50), (RootDigest([9; 32]), 900)],
            cores: 1,
            memory_bytes: 1 << 30,
            pin: None,
        };
        let nodes = [node("a", 16, &[]), node("b", 2, &[9]), node("c", 8, &[7])];
        let placed = place(&[role("r1"), role("r2"), role("r3")], &nodes, Policy::CacheAware);
        let on: Vec<String> = placed.iter().map(|p| p.as_ref().unwrap().1.as_str().to_owned()).collect();
        assert_eq!(on, ["b", "b", "c"], "the base's holder while it has room, then the node with a layer");
        // A layer known by count only (no boot bytes) still counts.
        let mut bare = role("r4");
        bare.layers.iter_mut().for_each(|l| l.1 = 0);
        let placed = place(&[bare], &nodes, Policy::CacheAware);
        assert_ne!(placed[0].as_ref().unwrap().1, n("a"));
    }

    #[test]
    fn the_store_sends_each_image_once_and_no_uplink_serves_more_than_its_fan_out() {
        let fetchers: Vec<Name> = (0..16).map(|i| n(&format!("n{i}"))).collect();
        for fan_out in [1, 2, 4] {
            let plan = sources(&fetchers, &[], fan_out);
            let load = load(&plan);
            assert_eq!(load.get(&None), Some(&1), "fan-out {fan_out}: the store serves one node");
            assert!(load.values().all(|&l| l <= fan_out), "fan-out {fan_out}: {load:?}");
            assert_eq!(auto_fan_out(CHAIN_UP_TO), 1);
            assert_eq!(auto_fan_out(CHAIN_UP_TO + 1), 2);
            // Every node's source got the image before it.
            for (i, (_, s)) in plan.iter().enumerate() {
                if let Source::Node(src) = s {
                    assert!(fetchers[..i].contains(src), "{src} serves before it has the image");
                }
            }
        }
        // A node that already holds the image serves first; the store nothing.
        let plan = sources(&fetchers[..3], &[n("h")], 2);
        assert!(!load(&plan).contains_key(&None), "{plan:?}");
        assert_eq!(plan[0].1, Source::Node(n("h")));
    }
}
