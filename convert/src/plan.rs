//! Which guest bytes go where: the layout policy.
//!
//! The boot set (from one or more traces, merged "k of n") is aligned to a
//! block size, kept in first-access order, restricted to allocated ranges and
//! cut into extents of at most `boot_extent_max`. Everything else that is
//! allocated goes to the rest segment in guest order, cut at multiples of
//! `rest_extent_len` so extent boundaries do not depend on the trace.

use std::ops::Range;

use bootcache_format::{PlannedExtent, Segment};
use bootcache_trace::{AccessOrder, IntervalSet, Piece};

/// Block sizes tried, largest first, for aligning the boot set.
const ALIGNMENTS: [u64; 3] = [4096, 512, 1];
/// Alignment may add at most this share to the boot set.
const MAX_PADDING: f64 = 0.10;

/// The result of planning.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Extents in file order.
    pub extents: Vec<PlannedExtent>,
    /// Alignment used for the boot set.
    pub block_size: u64,
    /// Exact boot set bytes (before alignment and allocation clipping).
    pub boot_set_bytes: u64,
    /// Guest bytes planned into the boot segment.
    pub boot_guest_bytes: u64,
    /// Guest bytes planned into the rest segment.
    pub rest_guest_bytes: u64,
}

/// Plans extents for a disk of `size` bytes with `allocated` ranges and the
/// boot `order` (already merged across traces).
pub fn plan(order: &AccessOrder, allocated: &IntervalSet, size: u64, boot_extent_max: u64, rest_extent_len: u64) -> Plan {
    let exact = order.set();
    let exact_bytes = exact.bytes();
    let (block_size, aligned) = ALIGNMENTS
        .iter()
        .map(|&b| (b, order.align(b, size)))
        .find(|(_, a)| a.set().bytes() as f64 <= exact_bytes as f64 * (1.0 + MAX_PADDING))
        .unwrap_or_else(|| (1, order.clone()));

    let mut extents = Vec::new();
    for run in coalesce(aligned.pieces(), allocated) {
        split(&run, boot_extent_max, |r| extents.push(PlannedExtent { guest: r, segment: Segment::Boot }));
    }
    let boot_guest_bytes = extents.iter().map(|e| e.guest.end - e.guest.start).sum();
    let boot = IntervalSet::from_ranges(extents.iter().map(|e| e.guest.clone()));
    let rest = allocated.difference(&boot);
    let mut rest_guest_bytes = 0;
    for r in rest.ranges() {
        rest_guest_bytes += r.end - r.start;
        split_aligned(r, rest_extent_len, |r| extents.push(PlannedExtent { guest: r, segment: Segment::Rest }));
    }
    Plan { extents, block_size, boot_set_bytes: exact_bytes, boot_guest_bytes, rest_guest_bytes }
}

/// The pieces clipped to allocated ranges, with neighbours in both order and
/// guest space joined into runs.
fn coalesce(pieces: &[Piece], allocated: &IntervalSet) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    for p in pieces {
        for r in allocated.clip(&p.range) {
            match runs.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => runs.push(r),
            }
        }
    }
    runs
}

fn split(r: &Range<u64>, max: u64, mut out: impl FnMut(Range<u64>)) {
    let mut at = r.start;
    while at < r.end {
        let end = r.end.min(at + max);
        out(at..end);
        at = end;
    }
}

/// Splits at multiples of `len` in guest space.
fn split_aligned(r: &Range<u64>, len: u64, mut out: impl FnMut(Range<u64>)) {
    let mut at = r.start;
    while at < r.end {
        let end = r.end.min((at / len + 1) * len);
        out(at..end);
        at = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_first_in_order_rest_in_guest_order_no_overlap() {
        let order = AccessOrder::from_timed([(8192..12288, 0), (12288..16384, 1), (0..100, 2), (1 << 20..(1 << 20) + 4096, 3)]);
        let allocated = IntervalSet::from_ranges(std::iter::once(0..(2 << 20)));
        let p = plan(&order, &allocated, 4 << 20, 1 << 20, 256 << 10);
        let boot: Vec<_> = p.extents.iter().filter(|e| e.segment == Segment::Boot).map(|e| e.guest.clone()).collect();
        // 0..100 is padded to 0..512 (4096 would add more than 10%), the two
        // neighbours at 8192 and 12288 join into one run.
        assert_eq!(p.block_size, 512);
        assert_eq!(boot, vec![8192..16384, 0..512, 1 << 20..(1 << 20) + 4096]);
        let all = IntervalSet::from_ranges(p.extents.iter().map(|e| e.guest.clone()));
        assert_eq!(all, allocated);
        assert_eq!(p.extents.iter().map(|e| e.guest.end - e.guest.start).sum::<u64>(), 2 << 20);
        assert!(p.extents.iter().all(|e| e.guest.end - e.guest.start <= 256 << 10 || e.segment == Segment::Boot));
    }

    #[test]
    fn boot_reads_of_holes_cost_nothing() {
        let order = AccessOrder::from_timed([(0..8192, 0)]);
        let allocated = IntervalSet::from_ranges(std::iter::once(4096..8192));
        let p = plan(&order, &allocated, 1 << 20, 1 << 20, 256 << 10);
        assert_eq!(p.extents, vec![PlannedExtent { guest: 4096..8192, segment: Segment::Boot }]);
    }
}
