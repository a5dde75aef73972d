//! Interval algebra on byte ranges: the boot set and its first-access order.
//!
//! [`IntervalSet`] is a sorted list of disjoint, non-touching half-open
//! ranges (the union D of all reads). [`AccessOrder`] splits D into pieces,
//! each byte in the piece of the request that first touched it, the pieces
//! ordered by that request's time.

use std::collections::BTreeMap;
use std::ops::Range;

/// Sorted, disjoint, non-adjacent half-open byte ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IntervalSet {
    ranges: Vec<Range<u64>>,
}

impl IntervalSet {
    /// The union of `ranges` (empty ones are ignored). O(n log n).
    pub fn from_ranges(ranges: impl IntoIterator<Item = Range<u64>>) -> IntervalSet {
        let mut v: Vec<Range<u64>> = ranges.into_iter().filter(|r| r.start < r.end).collect();
        v.sort_unstable_by_key(|r| r.start);
        let mut out: Vec<Range<u64>> = Vec::with_capacity(v.len());
        for r in v {
            match out.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => out.push(r),
            }
        }
        IntervalSet { ranges: out }
    }

    /// The ranges, sorted.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }

    /// Number of intervals.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// True when no byte is in the set.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Number of bytes in the set.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    /// True when `offset` is in the set. O(log n).
    pub fn contains(&self, offset: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.end <= offset);
        self.ranges.get(i).is_some_and(|r| r.start <= offset)
    }

    /// The union with `other`.
    pub fn union(&self, other: &IntervalSet) -> IntervalSet {
        IntervalSet::from_ranges(self.ranges.iter().chain(&other.ranges).cloned())
    }

    /// The bytes in both sets.
    pub fn intersection(&self, other: &IntervalSet) -> IntervalSet {
        IntervalSet::at_least(&[self.clone(), other.clone()], 2)
    }

    /// The parts of `r` that are in the set. O(log n) plus the result.
    pub fn clip<'a>(&'a self, r: &'a Range<u64>) -> impl Iterator<Item = Range<u64>> + 'a {
        let first = self.ranges.partition_point(|x| x.end <= r.start);
        self.ranges[first..].iter().take_while(move |x| x.start < r.end).map(move |x| x.start.max(r.start)..x.end.min(r.end))
    }

    /// The bytes in `self` and not in `other`.
    pub fn difference(&self, other: &IntervalSet) -> IntervalSet {
        let mut out = Vec::new();
        let mut j = 0;
        for r in &self.ranges {
            let mut start = r.start;
            while j < other.ranges.len() && other.ranges[j].end <= start {
                j += 1;
            }
            let mut k = j;
            while k < other.ranges.len() && other.ranges[k].start < r.end {
                if other.ranges[k].start > start {
                    out.push(start..other.ranges[k].start);
                }
                start = start.max(other.ranges[k].end);
                k += 1;
            }
            if start < r.end {
                out.push(start..r.end);
            }
        }
        IntervalSet { ranges: out }
    }

    /// Every range widened outward to multiples of `block` (a power of two),
    /// and clipped to `limit`.
    pub fn align(&self, block: u64, limit: u64) -> IntervalSet {
        IntervalSet::from_ranges(self.ranges.iter().map(|r| align_range(r, block, limit)))
    }

    /// The bytes that lie in at least `k` of `sets` ("read in k of n boots").
    /// `k = 1` is the union; `k = sets.len()` the intersection.
    pub fn at_least(sets: &[IntervalSet], k: usize) -> IntervalSet {
        let mut edges: Vec<(u64, i64)> = Vec::new();
        for s in sets {
            for r in &s.ranges {
                edges.push((r.start, 1));
                edges.push((r.end, -1));
            }
        }
        edges.sort_unstable();
        let k = i64::try_from(k.max(1)).unwrap_or(i64::MAX);
        let (mut depth, mut open, mut out) = (0i64, None, Vec::new());
        for (at, delta) in edges {
            depth += delta;
            match open {
                None if depth >= k => open = Some(at),
                Some(start) if depth < k => {
                    if start < at {
                        out.push(start..at);
                    }
                    open = None;
                }
                _ => {}
            }
        }
        IntervalSet::from_ranges(out)
    }
}

/// `r` widened to multiples of `block` and clipped to `limit`.
pub fn align_range(r: &Range<u64>, block: u64, limit: u64) -> Range<u64> {
    let mask = block.max(1) - 1;
    let start = r.start & !mask;
    let end = r.end.checked_add(mask).map_or(!mask, |e| e & !mask).min(limit.max(r.end));
    start..end
}

/// A piece of the boot set and when it was first read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Guest bytes.
    pub range: Range<u64>,
    /// Time of the first request that touched them (ns since trace start).
    pub first_ns: u64,
}

/// The boot set split into pieces in first-access order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessOrder {
    pieces: Vec<Piece>,
}

/// Adds ranges in time order, keeping only bytes not seen before.
#[derive(Default)]
struct OrderBuilder {
    /// start -> end of the merged ranges seen so far.
    covered: BTreeMap<u64, u64>,
    pieces: Vec<Piece>,
    /// Bytes emitted so far.
    bytes: u64,
}

impl OrderBuilder {
    fn add(&mut self, r: Range<u64>, t: u64) {
        if r.start >= r.end {
            return;
        }
        // The first covered range that could overlap or touch r.
        let from = self.covered.range(..=r.start).next_back().map_or(r.start, |(&s, _)| s);
        let mut at = r.start;
        let (mut new_start, mut new_end) = (r.start, r.end);
        let overlapping: Vec<(u64, u64)> = self.covered.range(from..=r.end).map(|(&s, &e)| (s, e)).filter(|&(_, e)| e >= r.start).collect();
        for (s, e) in overlapping {
            if s > at {
                self.emit(at..s.min(r.end), t);
            }
            at = at.max(e);
            new_start = new_start.min(s);
            new_end = new_end.max(e);
            self.covered.remove(&s);
        }
        if at < r.end {
            self.emit(at..r.end, t);
        }
        self.covered.insert(new_start, new_end);
    }

    fn emit(&mut self, range: Range<u64>, first_ns: u64) {
        if range.start >= range.end {
            return;
        }
        self.bytes += range.end - range.start;
        // Bytes first read at the same time, side by side, are one piece.
        if let Some(last) = self.pieces.last_mut()
            && last.range.end == range.start
            && last.first_ns == first_ns
        {
            last.range.end = range.end;
            return;
        }
        self.pieces.push(Piece { range, first_ns });
    }
}

impl AccessOrder {
    /// The first-access order of `ranges`, given with their times. Ranges are
    /// taken in time order; equal times keep their given order.
    pub fn from_timed(ranges: impl IntoIterator<Item = (Range<u64>, u64)>) -> AccessOrder {
        let mut v: Vec<(Range<u64>, u64)> = ranges.into_iter().collect();
        v.sort_by_key(|(_, t)| *t);
        let mut b = OrderBuilder::default();
        for (r, t) in v {
            b.add(r, t);
        }
        AccessOrder { pieces: b.pieces }
    }

    /// Bytes first read over time: `(t_ns, new bytes)` for every request that
    /// read something new, in time order.
    pub fn new_bytes_over_time(ranges: impl IntoIterator<Item = (Range<u64>, u64)>) -> Vec<(u64, u64)> {
        let mut v: Vec<(Range<u64>, u64)> = ranges.into_iter().collect();
        v.sort_by_key(|(_, t)| *t);
        let mut b = OrderBuilder::default();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (r, t) in v {
            let before = b.bytes;
            b.add(r, t);
            let new = b.bytes - before;
            match out.last_mut() {
                Some(last) if last.0 == t => last.1 += new,
                _ if new > 0 => out.push((t, new)),
                _ => {}
            }
        }
        out
    }

    /// The pieces in first-access order.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The set of bytes (the boot set D).
    pub fn set(&self) -> IntervalSet {
        IntervalSet::from_ranges(self.pieces.iter().map(|p| p.range.clone()))
    }

    /// Each piece widened to `block` (clipped to `limit`); bytes an earlier
    /// piece already claims stay with it.
    pub fn align(&self, block: u64, limit: u64) -> AccessOrder {
        let mut b = OrderBuilder::default();
        for p in &self.pieces {
            b.add(align_range(&p.range, block, limit), p.first_ns);
        }
        AccessOrder { pieces: b.pieces }
    }

    /// Merges the orders of several boots: the bytes read in at least `k` of
    /// them, each byte ordered by the earliest time any boot first read it.
    pub fn merge(orders: &[AccessOrder], k: usize) -> AccessOrder {
        let sets: Vec<IntervalSet> = orders.iter().map(AccessOrder::set).collect();
        let keep = IntervalSet::at_least(&sets, k);
        let mut all: Vec<&Piece> = orders.iter().flat_map(|o| &o.pieces).collect();
        all.sort_by_key(|p| p.first_ns);
        let mut b = OrderBuilder::default();
        for p in all {
            for r in keep.clip(&p.range) {
                b.add(r, p.first_ns);
            }
        }
        AccessOrder { pieces: b.pieces }
    }
}
