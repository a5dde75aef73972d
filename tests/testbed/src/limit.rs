//! The limit a link puts on any boot-first delivery of a guest.
//!
//! A guest read cannot be served before the bytes it needs have crossed the
//! link. With the boot segment streamed in first-access order (the best
//! order for a boot that repeats the recorded one), the read at time `t`
//! needs the segment's stored bytes up to the end of its extent, `b`, so at
//! `R` bytes per second the boot is delayed by at least `max(b / R - t)`
//! over its reads. Unlike `boot set / R`, this counts *when* the guest wants
//! the bytes: a bootloader that reads the kernel and initrd in its first
//! second needs them at once, whatever the length of the boot. On a node
//! that holds some extents already (another version's cache), `b` counts
//! only the extents it lacks.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use anyhow::Context;
use bootcache_format::{Encoding, Entry, Image, Segment};
use bootcache_trace::{Class, Op, Trace};
use serde::{Deserialize, Serialize};

/// TCP payload per byte on the shaped link (1448 of every 1514 bytes of an
/// Ethernet frame carry data, with TCP timestamps).
const GOODPUT: f64 = 1448.0 / 1514.0;

/// When the recorded boot needed how much of the boot segment.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Demand {
    /// (seconds since the recording started, boot-segment bytes needed by
    /// then), one point per data read that touches the boot segment.
    pub points: Vec<(f64, u64)>,
}

impl Demand {
    /// The demand of the boot recorded in `trace` on the container at
    /// `container` (reordered by that trace).
    pub fn of(trace: &Path, container: &Path) -> anyhow::Result<Demand> {
        Demand::lacking(trace, container, None)
    }

    /// The same on a node that holds the extents of the container at
    /// `held` (same stored digest, encoding and lengths): only the boot
    /// extents it lacks cross the link, in the segment's order.
    pub fn lacking(trace: &Path, container: &Path, held: Option<&Path>) -> anyhow::Result<Demand> {
        let open = |p: &Path| -> anyhow::Result<Image<std::fs::File>> {
            let file = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            Image::open(file).with_context(|| format!("reading {}", p.display()))
        };
        let trace = Trace::open(trace).with_context(|| format!("reading {}", trace.display()))?;
        let image = open(container)?;
        let key = |e: &Entry| (e.digest, e.encoding.code(), e.guest_len(), e.stored_len());
        let held: HashSet<_> = match held {
            Some(p) => open(p)?.index().entries().iter().filter(|e| e.encoding != Encoding::Zero).map(key).collect(),
            None => HashSet::new(),
        };
        // Per boot extent the node lacks: the lacking bytes of the segment
        // up to its end, in stream (file) order.
        let index = image.index();
        let mut boot: Vec<usize> = (0..index.entries().len())
            .filter(|&i| {
                let e = &index.entries()[i];
                e.segment == Segment::Boot && e.encoding != Encoding::Zero && !held.contains(&key(e))
            })
            .collect();
        boot.sort_by_key(|&i| index.entries()[i].stored.start);
        let mut upto = HashMap::with_capacity(boot.len());
        let mut sum = 0;
        for i in boot {
            sum += index.entries()[i].stored_len();
            upto.insert(index.entries()[i].guest.start, sum);
        }
        let mut points = Vec::new();
        for r in trace.records.iter().filter(|r| r.op == Op::Read && r.class == Class::Data) {
            let Some(range) = r.transferred() else { continue };
            let needed = index.overlapping(range).iter().filter_map(|e| upto.get(&e.guest.start).copied()).max();
            if let Some(b) = needed {
                points.push((r.t_ns as f64 / 1e9, b));
            }
        }
        Ok(Demand { points })
    }

    /// The least delay of the boot when the segment arrives at `mbit` Mbit/s
    /// from the moment the recording's clock starts.
    pub fn least_stall(&self, mbit: f64) -> f64 {
        self.least_stall_at(mbit).0
    }

    /// [`Demand::least_stall`], and when in the recorded boot (s) the read
    /// that waits it comes (0 if none waits).
    pub fn least_stall_at(&self, mbit: f64) -> (f64, f64) {
        let rate = mbit * 1e6 / 8.0 * GOODPUT;
        self.points.iter().map(|&(t, b)| (b as f64 / rate - t, t)).fold((0.0, 0.0), |worst, p| if p.0 > worst.0 { p } else { worst })
    }

    /// Boot-segment bytes the recorded boot needed within its first `secs`.
    pub fn needed_by(&self, secs: f64) -> u64 {
        self.points.iter().filter(|&&(t, _)| t <= secs).map(|&(_, b)| b).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stall_is_the_worst_read_behind_the_stream() {
        // 12.5 MB wanted at 1 s, 25 MB at 10 s: at 100 Mbit/s (11.95 MB/s
        // of payload) the first waits 1.09 s and the second not at all.
        let d = Demand { points: vec![(1.0, 12_500_000), (10.0, 25_000_000)] };
        let s = d.least_stall(100.0);
        assert!((s - (12_500_000.0 / (12.5e6 * GOODPUT) - 1.0)).abs() < 1e-9, "{s}");
        assert_eq!(d.least_stall(1000.0), 0.0, "a fast link never waits");
        assert_eq!(d.needed_by(5.0), 12_500_000);
        assert_eq!(Demand::default().least_stall(1.0), 0.0);
        assert_eq!(d.least_stall_at(100.0).1, 1.0, "the first read is the one that waits");
    }
}
