//! Counters of one node cache, as JSON and as Prometheus text.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Live counters (all monotonic).
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) boot_bytes: AtomicU64,
    pub(crate) demand_bytes: AtomicU64,
    pub(crate) background_bytes: AtomicU64,
    pub(crate) for_peers_bytes: AtomicU64,
    pub(crate) discarded_bytes: AtomicU64,
    pub(crate) peer_bytes: AtomicU64,
    pub(crate) served_bytes: AtomicU64,
    pub(crate) bad_extents: AtomicU64,
    pub(crate) guest_reads: AtomicU64,
    pub(crate) guest_read_bytes: AtomicU64,
    pub(crate) hits: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) miss_wait_ns: AtomicU64,
    pub(crate) read_errors: AtomicU64,
    pub(crate) boot_reaims: AtomicU64,
    pub(crate) local_bytes: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Snapshot {
    /// Stored bytes fetched by the boot-segment prefetch.
    pub boot_prefetch_bytes: u64,
    /// Stored bytes fetched because a guest read missed.
    pub demand_bytes: u64,
    /// Stored bytes fetched by background streaming.
    pub background_bytes: u64,
    /// Stored bytes fetched because a peer asked for extents this cache
    /// neither held nor was fetching (it fetches them once and relays them).
    pub for_peers_bytes: u64,
    /// Bytes received but not used (the extent had arrived by another path).
    pub discarded_bytes: u64,
    /// Of the fetched bytes, those that came from peers rather than the
    /// store.
    pub peer_bytes: u64,
    /// Stored bytes this cache served to other nodes.
    pub served_to_peers_bytes: u64,
    /// Extents whose bytes failed their digest (never served).
    pub bad_extents: u64,
    /// Guest reads served (or failed).
    pub guest_reads: u64,
    /// Guest bytes served.
    pub guest_read_bytes: u64,
    /// Reads served from the cache without waiting.
    pub hits: u64,
    /// Reads that waited for a fetch.
    pub misses: u64,
    /// Total time reads waited, in seconds.
    pub miss_wait_seconds: f64,
    /// Reads answered with an error.
    pub read_errors: u64,
    /// Times a guest that got ahead of the boot stream re-aimed it.
    pub boot_reaims: u64,
    /// Stored bytes taken from other images' caches on this node (extents
    /// with the same digest), not fetched.
    pub local_bytes: u64,
    /// Share of guest reads served without waiting.
    pub hit_ratio: f64,
    /// Extents present (verified on disk, or zero).
    pub present_extents: u64,
    /// Extents in the image.
    pub extents: u64,
}

impl Metrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters now; `present` and `extents` come from the cache.
    pub fn snapshot(&self, present: u64, extents: u64) -> Snapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let reads = g(&self.guest_reads);
        Snapshot {
            boot_prefetch_bytes: g(&self.boot_bytes),
            demand_bytes: g(&self.demand_bytes),
            background_bytes: g(&self.background_bytes),
            for_peers_bytes: g(&self.for_peers_bytes),
            discarded_bytes: g(&self.discarded_bytes),
            peer_bytes: g(&self.peer_bytes),
            served_to_peers_bytes: g(&self.served_bytes),
            bad_extents: g(&self.bad_extents),
            guest_reads: reads,
            guest_read_bytes: g(&self.guest_read_bytes),
            hits: g(&self.hits),
            misses: g(&self.misses),
            miss_wait_seconds: g(&self.miss_wait_ns) as f64 / 1e9,
            read_errors: g(&self.read_errors),
            boot_reaims: g(&self.boot_reaims),
            local_bytes: g(&self.local_bytes),
            hit_ratio: if reads == 0 { 1.0 } else { g(&self.hits) as f64 / reads as f64 },
            present_extents: present,
            extents,
        }
    }
}

impl Snapshot {
    /// Several caches' counters added up (a layered image's), the hit
    /// ratio over all their reads.
    pub fn sum(all: impl IntoIterator<Item = Snapshot>) -> Snapshot {
        let mut t = Snapshot::default();
        for s in all {
            t.boot_prefetch_bytes += s.boot_prefetch_bytes;
            t.demand_bytes += s.demand_bytes;
            t.background_bytes += s.background_bytes;
            t.for_peers_bytes += s.for_peers_bytes;
            t.discarded_bytes += s.discarded_bytes;
            t.peer_bytes += s.peer_bytes;
            t.served_to_peers_bytes += s.served_to_peers_bytes;
            t.bad_extents += s.bad_extents;
            t.guest_reads += s.guest_reads;
            t.guest_read_bytes += s.guest_read_bytes;
            t.hits += s.hits;
            t.misses += s.misses;
            t.miss_wait_seconds += s.miss_wait_seconds;
            t.read_errors += s.read_errors;
            t.boot_reaims += s.boot_reaims;
            t.local_bytes += s.local_bytes;
            t.present_extents += s.present_extents;
            t.extents += s.extents;
        }
        t.hit_ratio = if t.guest_reads == 0 { 1.0 } else { t.hits as f64 / t.guest_reads as f64 };
        t
    }

    /// Total stored bytes fetched from the network.
    pub fn fetched_bytes(&self) -> u64 {
        self.boot_prefetch_bytes + self.demand_bytes + self.background_bytes + self.for_peers_bytes + self.discarded_bytes
    }
}

/// Prometheus text exposition of several caches' counters, one family per
/// counter, each sample labelled with its image.
pub fn prometheus(caches: &[(bootcache_format::RootDigest, Snapshot)]) -> String {
    type Get = fn(&Snapshot) -> f64;
    let families: [(&str, &str, &str, Get); 19] = [
        ("fetched_bytes_total", "counter", "Stored bytes fetched from the network.", |s| s.fetched_bytes() as f64),
        ("boot_prefetch_bytes_total", "counter", "Stored bytes fetched by the boot-segment prefetch.", |s| s.boot_prefetch_bytes as f64),
        ("demand_bytes_total", "counter", "Stored bytes fetched because a guest read missed.", |s| s.demand_bytes as f64),
        ("background_bytes_total", "counter", "Stored bytes fetched by background streaming.", |s| s.background_bytes as f64),
        ("for_peers_bytes_total", "counter", "Stored bytes fetched because a peer asked for them.", |s| s.for_peers_bytes as f64),
        ("discarded_bytes_total", "counter", "Bytes received that another fetch had already delivered.", |s| s.discarded_bytes as f64),
        ("peer_bytes_total", "counter", "Fetched bytes that came from peers rather than the store.", |s| s.peer_bytes as f64),
        ("served_to_peers_bytes_total", "counter", "Stored bytes served to other nodes.", |s| s.served_to_peers_bytes as f64),
        ("bad_extents_total", "counter", "Extents that failed their digest.", |s| s.bad_extents as f64),
        ("guest_reads_total", "counter", "Guest reads.", |s| s.guest_reads as f64),
        ("guest_read_bytes_total", "counter", "Guest bytes read.", |s| s.guest_read_bytes as f64),
        ("guest_read_hits_total", "counter", "Guest reads served without waiting.", |s| s.hits as f64),
        ("guest_read_misses_total", "counter", "Guest reads that waited for a fetch.", |s| s.misses as f64),
        ("guest_read_wait_seconds_total", "counter", "Time guest reads waited for fetches.", |s| s.miss_wait_seconds),
        ("guest_read_errors_total", "counter", "Guest reads answered with an error.", |s| s.read_errors as f64),
        ("boot_reaims_total", "counter", "Times a guest ahead of the boot stream re-aimed it.", |s| s.boot_reaims as f64),
        ("local_bytes_total", "counter", "Stored bytes taken from other images' caches on the node.", |s| s.local_bytes as f64),
        ("present_extents", "gauge", "Extents present in the cache.", |s| s.present_extents as f64),
        ("extents", "gauge", "Extents in the image.", |s| s.extents as f64),
    ];
    let mut out = String::new();
    for (name, kind, help, get) in families {
        let _ = writeln!(out, "# HELP bootcache_{name} {help}\n# TYPE bootcache_{name} {kind}");
        for (image, snap) in caches {
            let _ = writeln!(out, "bootcache_{name}{{image=\"{image}\"}} {}", get(snap));
        }
    }
    out
}
