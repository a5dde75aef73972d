//! Turning a trace of a qcow2 image (image-file offsets) into guest space.

use std::ops::Range;

use bootcache_trace::{Class, IntervalSet, OffsetSpace, Record, Trace};
use serde::Serialize;

use super::{Cluster, Qcow2, Qcow2Error};

/// What the mapping did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MapStats {
    /// Data reads (or parts) mapped to guest offsets.
    pub data_pieces: u64,
    /// Reads (or parts) of qcow2 metadata, kept apart as metadata records.
    pub metadata_pieces: u64,
    /// Bytes that fell on neither (e.g. free clusters); dropped.
    pub unmapped_bytes: u64,
    /// Records with no transferred bytes; dropped.
    pub empty_records: u64,
}

struct HostMap {
    /// (host range, guest offset of its first byte, whole-cluster) sorted by host start.
    spans: Vec<(Range<u64>, u64, bool)>,
}

impl HostMap {
    fn new(clusters: &[(u64, Cluster)], cluster: u64) -> HostMap {
        let mut spans: Vec<(Range<u64>, u64, bool)> = clusters
            .iter()
            .filter_map(|&(guest, c)| match c {
                Cluster::Data { host } => Some((host..host + cluster, guest, false)),
                Cluster::Compressed { host, len } => Some((host..host + len, guest, true)),
                Cluster::Zero => None,
            })
            .collect();
        spans.sort_by_key(|s| s.0.start);
        HostMap { spans }
    }

    /// The span holding `host`, if any. Compressed spans are packed and
    /// their sector-rounded ends overlap the next: the one starting last wins.
    fn find(&self, host: u64) -> Option<&(Range<u64>, u64, bool)> {
        let i = self.spans.partition_point(|s| s.0.start <= host);
        self.spans[..i].last().filter(|s| s.0.contains(&host))
    }
}

/// Maps `trace` (image-file offsets of `image`) to guest offsets. Data reads
/// become guest reads (a read of a compressed cluster becomes a read of the
/// whole guest cluster); reads of qcow2 metadata stay, as metadata records
/// at their file offsets, apart from the boot set.
///
/// # Errors
/// A qcow2 table that cannot be read.
pub fn map_trace(trace: &Trace, image: &Qcow2) -> Result<(Trace, MapStats), Qcow2Error> {
    let cluster = image.header().cluster_size();
    let map = HostMap::new(&image.clusters()?, cluster);
    let meta: IntervalSet = image.metadata()?;
    let mut stats = MapStats::default();
    let mut records = Vec::with_capacity(trace.records.len());
    for r in &trace.records {
        let Some(bytes) = r.transferred() else {
            stats.empty_records += 1;
            continue;
        };
        let mut at = bytes.start;
        while at < bytes.end {
            let piece = |end: u64, offset: u64, class: Class| {
                let len = end - at;
                Record { offset, length: len, result: i64::try_from(len).unwrap_or(i64::MAX), class, ..*r }
            };
            if meta.contains(at) {
                let end = meta.clip(&(at..bytes.end)).next().map_or(at + 1, |x| x.end);
                records.push(piece(end, at, Class::Metadata));
                stats.metadata_pieces += 1;
                at = end;
            } else if let Some((host, guest, whole)) = map.find(at) {
                let end = bytes.end.min(host.end);
                records.push(if *whole {
                    Record { offset: *guest, length: cluster, result: i64::try_from(cluster).unwrap_or(i64::MAX), ..*r }
                } else {
                    piece(end, guest + (at - host.start), Class::Data)
                });
                stats.data_pieces += 1;
                // A compressed cluster is read up to a sector boundary that may
                // lie inside the next one: that tail is not a read of it.
                let next_start = map.spans.get(map.spans.partition_point(|s| s.0.start <= at)).map_or(u64::MAX, |s| s.0.start);
                at = if *whole && bytes.end.saturating_sub(next_start.max(at)) < 512 { bytes.end } else { end.min(next_start.max(at + 1)) };
            } else {
                // Up to the next span or metadata range.
                let next_span = map.spans.get(map.spans.partition_point(|s| s.0.start <= at)).map_or(u64::MAX, |s| s.0.start);
                let next_meta = meta.ranges().get(meta.ranges().partition_point(|m| m.start <= at)).map_or(u64::MAX, |m| m.start);
                let end = bytes.end.min(next_span).min(next_meta);
                stats.unmapped_bytes += end - at;
                at = end;
            }
        }
    }
    let mut info = trace.info.clone();
    if let serde_json::Value::Object(m) = &mut info.extra {
        m.insert("qcow2_mapping".into(), serde_json::to_value(&stats).unwrap_or_default());
    }
    let mapped = Trace {
        image: bootcache_trace::ImageIdentity { size: image.header().size, digest: None },
        space: OffsetSpace::Guest,
        lost_records: trace.lost_records,
        info,
        records,
    };
    Ok((mapped, stats))
}
