//! The boot I/O study: how much a boot reads, where, and when.

use serde::Serialize;

use crate::file::Trace;
use crate::intervals::{AccessOrder, IntervalSet};
use crate::record::{Op, Record};

/// One power-of-two bucket of request sizes: `min <= size < 2 * min`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Bucket {
    /// Smallest size in the bucket.
    pub min: u64,
    /// Requests in it.
    pub count: u64,
    /// Bytes they transferred.
    pub bytes: u64,
}

/// Summary of a trace's reads.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Analysis {
    /// Successful data reads.
    pub requests: u64,
    /// Bytes they transferred.
    pub total_bytes: u64,
    /// Bytes in the boot set (the union of all reads).
    pub unique_bytes: u64,
    /// Intervals in the boot set after merging overlapping and adjacent reads.
    pub intervals: u64,
    /// Pieces in first-access order (a piece per run of newly read bytes).
    pub first_access_pieces: u64,
    /// total_bytes / unique_bytes.
    pub reread_factor: f64,
    /// Reads that failed or returned nothing.
    pub failed_or_empty_reads: u64,
    /// Write requests.
    pub writes: u64,
    /// Records the recorder lost.
    pub lost_records: u64,
    /// Time of the last record.
    pub duration_ns: u64,
    /// Request sizes in power-of-two buckets.
    pub histogram: Vec<Bucket>,
    /// Size of the traced image, when known.
    pub image_size: u64,
}

/// Analyses a trace's data reads.
pub fn analyze(trace: &Trace) -> Analysis {
    let recs = &trace.records;
    let reads: Vec<&Record> = recs.iter().filter(|r| r.boot_bytes().is_some()).collect();
    // Saturating: a damaged trace's lengths may add up past u64.
    let total = reads.iter().filter_map(|r| r.boot_bytes()).fold(0u64, |t, b| t.saturating_add(b.end - b.start));
    let set = IntervalSet::from_ranges(reads.iter().filter_map(|r| r.boot_bytes()));
    let order = trace.first_access_order();
    let unique = set.bytes();
    Analysis {
        requests: reads.len() as u64,
        total_bytes: total,
        unique_bytes: unique,
        intervals: set.len() as u64,
        first_access_pieces: order.pieces().len() as u64,
        reread_factor: if unique == 0 { 0.0 } else { total as f64 / unique as f64 },
        failed_or_empty_reads: recs.iter().filter(|r| r.op == Op::Read && r.transferred().is_none()).count() as u64,
        writes: recs.iter().filter(|r| r.op == Op::Write).count() as u64,
        lost_records: trace.lost_records,
        duration_ns: recs.iter().map(|r| r.t_ns).max().unwrap_or(0),
        histogram: histogram(&reads),
        image_size: trace.image.size,
    }
}

fn histogram(reads: &[&Record]) -> Vec<Bucket> {
    let mut buckets: Vec<Bucket> = Vec::new();
    for r in reads {
        let Some(b) = r.boot_bytes() else { continue };
        let size = b.end - b.start;
        let min = 1u64 << (63 - size.leading_zeros());
        match buckets.iter_mut().find(|x| x.min == min) {
            Some(x) => {
                x.count += 1;
                x.bytes = x.bytes.saturating_add(size);
            }
            None => buckets.push(Bucket { min, count: 1, bytes: size }),
        }
    }
    buckets.sort_by_key(|b| b.min);
    buckets
}

/// How much of one boot's reads a boot set covers: what a deployment
/// prefetching that set would still miss (at byte granularity; a node
/// fetches whole extents, so its misses are fewer and larger).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Coverage {
    /// Bytes in the boot set.
    pub set_bytes: u64,
    /// Unique bytes the boot read.
    pub boot_bytes: u64,
    /// Of those, the bytes in the set.
    pub covered_bytes: u64,
    /// The bytes the boot read outside the set.
    pub missed_bytes: u64,
    /// Intervals those bytes form.
    pub missed_intervals: u64,
    /// The boot's data reads.
    pub requests: u64,
    /// Reads that needed some byte outside the set.
    pub missed_requests: u64,
    /// Bytes of the set the boot never read.
    pub unused_bytes: u64,
}

/// Measures how much of `boot`'s reads `set` covers.
pub fn coverage(set: &IntervalSet, boot: &Trace) -> Coverage {
    let reads: Vec<_> = boot.records.iter().filter_map(Record::boot_bytes).collect();
    let read = IntervalSet::from_ranges(reads.iter().cloned());
    let missed = read.difference(set);
    let missed_requests = reads.iter().filter(|r| set.clip(r).map(|c| c.end - c.start).sum::<u64>() < r.end - r.start).count();
    Coverage {
        set_bytes: set.bytes(),
        boot_bytes: read.bytes(),
        covered_bytes: read.intersection(set).bytes(),
        missed_bytes: missed.bytes(),
        missed_intervals: missed.len() as u64,
        requests: reads.len() as u64,
        missed_requests: missed_requests as u64,
        unused_bytes: set.difference(&read).bytes(),
    }
}

/// Cumulative unique bytes over time: `(t_ns, bytes first read by then)`.
pub fn cumulative_unique(trace: &Trace) -> Vec<(u64, u64)> {
    let mut total = 0;
    AccessOrder::new_bytes_over_time(trace.records.iter().filter_map(|r| Some((r.boot_bytes()?, r.t_ns))))
        .into_iter()
        .map(|(t, new)| {
            total += new;
            (t, total)
        })
        .collect()
}
