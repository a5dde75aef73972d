//! Which guest bytes go where: the layout policy.
//!
//! The boot set (from one or more traces, merged "k of n") is aligned to a
//! block size, kept in first-access order, restricted to allocated ranges and
//! cut at multiples of `boot_extent_max` in guest space. Everything else that
//! is allocated goes to the rest segment in guest order, cut at multiples of
//! `rest_extent_len`. Cuts on a fixed guest grain, not counted from where a
//! run of reads begins, keep the extents of a region a new version of the
//! image leaves alone equal to the old version's (same bytes, same digest),
//! even where the new boot reads a little more or less around them.

use std::ops::Range;

use std::collections::HashSet;

use bootcache_format::{BootRef, PlannedExtent, Segment};
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

/// The boot order aligned to the largest block size that pads it by at most
/// [`MAX_PADDING`], with that block size.
fn aligned(order: &AccessOrder, size: u64) -> (u64, AccessOrder) {
    let exact_bytes = order.set().bytes();
    ALIGNMENTS
        .iter()
        .map(|&b| (b, order.align(b, size)))
        .find(|(_, a)| a.set().bytes() as f64 <= exact_bytes as f64 * (1.0 + MAX_PADDING))
        .unwrap_or_else(|| (1, order.clone()))
}

/// Plans extents for a disk of `size` bytes with `allocated` ranges and the
/// boot `order` (already merged across traces).
pub fn plan(order: &AccessOrder, allocated: &IntervalSet, size: u64, boot_extent_max: u64, rest_extent_len: u64) -> Plan {
    let exact_bytes = order.set().bytes();
    let (block_size, aligned) = aligned(order, size);

    let mut extents = Vec::new();
    for run in coalesce(aligned.pieces(), allocated) {
        split_aligned(&run, boot_extent_max, |r| extents.push(PlannedExtent { guest: r, segment: Segment::Boot }));
    }
    with_rest(extents, allocated, rest_extent_len, block_size, exact_bytes)
}

/// The plan of `boot` extents followed by the rest of `stored` (what the
/// image holds) in guest order, cut at multiples of `rest_extent_len`.
fn with_rest(mut extents: Vec<PlannedExtent>, stored: &IntervalSet, rest_extent_len: u64, block_size: u64, boot_set_bytes: u64) -> Plan {
    let boot_guest_bytes = extents.iter().map(|e| e.guest.end - e.guest.start).sum();
    let boot = IntervalSet::from_ranges(extents.iter().map(|e| e.guest.clone()));
    let rest = stored.difference(&boot);
    let mut rest_guest_bytes = 0;
    for r in rest.ranges() {
        rest_guest_bytes += r.end - r.start;
        split_aligned(r, rest_extent_len, |r| extents.push(PlannedExtent { guest: r, segment: Segment::Rest }));
    }
    Plan { extents, block_size, boot_set_bytes, boot_guest_bytes, rest_guest_bytes }
}

/// An extent of the parent chain a layer's boot may read instead of storing
/// the bytes itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParentPiece {
    /// The guest bytes read from it.
    pub guest: Range<u64>,
    /// Which extent: its layer counted from the layer being written (1 the
    /// parent) and its first guest byte there.
    pub extent: BootRef,
}

/// A layer's plan: its own extents and its boot stream across the chain.
#[derive(Clone, Debug)]
pub struct LayerPlan {
    /// Own extents, as [`Plan`].
    pub plan: Plan,
    /// The boot stream, own extents (layer 0) and the parents' in first-access order.
    pub boot_order: Vec<BootRef>,
    /// Guest bytes of the boot set the parents hold.
    pub parent_boot_bytes: u64,
}

/// Plans a layer over a parent chain: `changed` are the guest ranges whose
/// bytes differ from the parent's (what the layer stores); `parent` the
/// chain's stored extents (guest order) where it does not. The boot set's
/// changed bytes become own boot extents; the parent extents the boot reads
/// are listed in the boot order where the boot first reads them, each once.
pub fn plan_layer(
    order: &AccessOrder,
    changed: &IntervalSet,
    parent: &[ParentPiece],
    size: u64,
    boot_extent_max: u64,
    rest_extent_len: u64,
) -> LayerPlan {
    let exact_bytes = order.set().bytes();
    let (block_size, aligned) = aligned(order, size);
    let unchanged = IntervalSet::from_ranges(std::iter::once(0..size)).difference(changed);
    let mut extents = Vec::new();
    let mut boot_order = Vec::new();
    let mut named = HashSet::new();
    let mut own: Option<Range<u64>> = None;
    let mut parent_boot_bytes = 0;
    let flush = |own: &mut Option<Range<u64>>, extents: &mut Vec<PlannedExtent>, boot_order: &mut Vec<BootRef>| {
        if let Some(run) = own.take() {
            split_aligned(&run, boot_extent_max, |r| {
                boot_order.push(BootRef { layer: 0, guest_offset: r.start });
                extents.push(PlannedExtent { guest: r, segment: Segment::Boot });
            });
        }
    };
    for piece in aligned.pieces() {
        // Within a piece, guest order: each byte is the layer's own or the parent's.
        let mut parts: Vec<(Range<u64>, bool)> = changed.clip(&piece.range).map(|r| (r, true)).collect();
        parts.extend(unchanged.clip(&piece.range).map(|r| (r, false)));
        parts.sort_unstable_by_key(|(r, _)| r.start);
        for (r, is_own) in parts {
            if is_own {
                match &mut own {
                    Some(run) if run.end == r.start => run.end = r.end,
                    _ => {
                        flush(&mut own, &mut extents, &mut boot_order);
                        own = Some(r);
                    }
                }
                continue;
            }
            let first = parent.partition_point(|p| p.guest.end <= r.start);
            for p in parent[first..].iter().take_while(|p| p.guest.start < r.end) {
                parent_boot_bytes += p.guest.end.min(r.end) - p.guest.start.max(r.start);
                if named.insert(p.extent) {
                    flush(&mut own, &mut extents, &mut boot_order);
                    boot_order.push(p.extent);
                }
            }
        }
    }
    flush(&mut own, &mut extents, &mut boot_order);
    let plan = with_rest(extents, changed, rest_extent_len, block_size, exact_bytes);
    LayerPlan { plan, boot_order, parent_boot_bytes }
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
    fn a_layer_stores_what_changed_and_names_the_parent_extents_its_boot_reads_once() {
        // The boot reads 0..8192 (half changed), then 64K..72K (the parent's), then 4096..12288 again.
        let order = AccessOrder::from_timed([(0..8192, 0), (65536..73728, 1), (4096..12288, 2)]);
        let changed = IntervalSet::from_ranges([4096..8192, 1 << 20..(1 << 20) + 4096]);
        let r = |layer, guest_offset| BootRef { layer, guest_offset };
        let parent = vec![
            ParentPiece { guest: 0..4096, extent: r(1, 0) },
            ParentPiece { guest: 8192..65536, extent: r(2, 8192) },
            ParentPiece { guest: 65536..131072, extent: r(1, 65536) },
        ];
        let p = plan_layer(&order, &changed, &parent, 2 << 20, 1 << 20, 256 << 10);
        assert_eq!(p.boot_order, vec![r(1, 0), r(0, 4096), r(1, 65536), r(2, 8192)]);
        let own: Vec<_> = p.plan.extents.iter().map(|e| (e.guest.clone(), e.segment)).collect();
        assert_eq!(own, vec![(4096..8192, Segment::Boot), (1 << 20..(1 << 20) + 4096, Segment::Rest)]);
        assert_eq!(p.parent_boot_bytes, 4096 + 8192 + 4096);
    }

    #[test]
    fn a_boot_reading_one_block_less_moves_one_extent_not_all() {
        let allocated = IntervalSet::from_ranges(std::iter::once(0..(4 << 20)));
        let extents = |start: u64| {
            let order = AccessOrder::from_timed([(start..(1 << 20) + 4096, 0)]);
            let p = plan(&order, &allocated, 4 << 20, 256 << 10, 256 << 10);
            p.extents.into_iter().map(|e| e.guest).collect::<HashSet<_>>()
        };
        let (v1, v2) = (extents(4096), extents(8192));
        // Cut at multiples of 256 KiB: 5 boot extents, 13 rest; only those of
        // the first 256 KiB differ (counted from the run's start, every cut
        // of the run would move).
        assert_eq!(v1.len(), 5 + 13);
        let mut moved: Vec<_> = v1.difference(&v2).cloned().collect();
        moved.sort_by_key(|r| r.start);
        assert_eq!(moved, vec![0..4096, 4096..(256 << 10)]);
        assert!(v1.iter().all(|r| r.end - r.start <= 256 << 10 && (r.start / (256 << 10) == (r.end - 1) / (256 << 10))));
    }

    #[test]
    fn boot_reads_of_holes_cost_nothing() {
        let order = AccessOrder::from_timed([(0..8192, 0)]);
        let allocated = IntervalSet::from_ranges(std::iter::once(4096..8192));
        let p = plan(&order, &allocated, 1 << 20, 1 << 20, 256 << 10);
        assert_eq!(p.extents, vec![PlannedExtent { guest: 4096..8192, segment: Segment::Boot }]);
    }
}
