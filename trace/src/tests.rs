use std::io::Cursor;

use proptest::prelude::*;

use crate::*;

const SPACE: u64 = 2048;

/// Brute-force model: each byte's first-access time, in stable time order.
fn byte_model(reads: &[(u64, u64, u64)]) -> Vec<Option<u64>> {
    let mut v: Vec<&(u64, u64, u64)> = reads.iter().collect();
    v.sort_by_key(|r| r.0);
    let mut first = vec![None; SPACE as usize];
    for &(t, off, len) in v {
        for b in off..(off + len).min(SPACE) {
            first[b as usize].get_or_insert(t);
        }
    }
    first
}

fn ranges_of(mask: impl Iterator<Item = bool>) -> Vec<std::ops::Range<u64>> {
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    for (i, on) in mask.enumerate() {
        let i = i as u64;
        if on {
            match out.last_mut() {
                Some(r) if r.end == i => r.end = i + 1,
                _ => out.push(i..i + 1),
            }
        }
    }
    out
}

fn reads_strategy() -> impl Strategy<Value = Vec<(u64, u64, u64)>> {
    proptest::collection::vec((0u64..50, 0u64..SPACE - 300, 0u64..300), 0..60)
}

fn order_of(reads: &[(u64, u64, u64)]) -> AccessOrder {
    AccessOrder::from_timed(reads.iter().map(|&(t, o, l)| (o..o + l, t)))
}

/// Checks that `order` assigns each byte exactly the model's time, and that pieces are in time order.
fn assert_matches(order: &AccessOrder, model: &[Option<u64>]) -> Result<(), TestCaseError> {
    let mut seen = vec![None; model.len()];
    let mut last_t = 0;
    for p in order.pieces() {
        prop_assert!(p.first_ns >= last_t, "pieces out of time order");
        last_t = p.first_ns;
        for b in p.range.clone() {
            prop_assert!(seen[b as usize].is_none(), "byte {} in two pieces", b);
            seen[b as usize] = Some(p.first_ns);
        }
    }
    if let Some(b) = (0..model.len()).find(|&b| seen[b] != model[b]) {
        let pieces: Vec<_> = order.pieces().iter().map(|p| (p.range.clone(), p.first_ns)).collect();
        prop_assert!(false, "byte {}: order says {:?}, model {:?}; pieces {:?}", b, seen[b], model[b], pieces);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn union_equals_byte_map(reads in reads_strategy()) {
        let model = byte_model(&reads);
        let d = IntervalSet::from_ranges(reads.iter().map(|&(_, o, l)| o..o + l));
        prop_assert_eq!(d.ranges().to_vec(), ranges_of(model.iter().map(Option::is_some)));
        prop_assert_eq!(d.bytes(), model.iter().filter(|b| b.is_some()).count() as u64);
        for probe in [0, 1, 500, 1000, SPACE - 1] {
            prop_assert_eq!(d.contains(probe), model[probe as usize].is_some());
        }
    }

    #[test]
    fn first_access_order_equals_byte_map(reads in reads_strategy()) {
        let order = order_of(&reads);
        assert_matches(&order, &byte_model(&reads))?;
        prop_assert_eq!(order.set(), IntervalSet::from_ranges(reads.iter().map(|&(_, o, l)| o..o + l)));
    }

    #[test]
    fn aligned_order_equals_block_model(reads in reads_strategy(), shift in 0u32..8) {
        let block = 1u64 << shift;
        let model = byte_model(&reads);
        let mut want = vec![None; model.len()];
        for (b, w) in want.iter_mut().enumerate() {
            let blk = b as u64 / block * block;
            *w = (blk..(blk + block).min(SPACE)).filter_map(|x| model[x as usize]).min();
        }
        let aligned = order_of(&reads).align(block, SPACE);
        assert_matches(&aligned, &want)?;
        prop_assert_eq!(aligned.set(), order_of(&reads).set().align(block, SPACE));
    }

    #[test]
    fn k_of_n_equals_count_model(boots in proptest::collection::vec(reads_strategy(), 1..5), k in 1usize..5) {
        let models: Vec<Vec<Option<u64>>> = boots.iter().map(|r| byte_model(r)).collect();
        let want: Vec<Option<u64>> = (0..SPACE as usize).map(|b| {
            let hits: Vec<u64> = models.iter().filter_map(|m| m[b]).collect();
            if hits.len() >= k { hits.into_iter().min() } else { None }
        }).collect();
        let orders: Vec<AccessOrder> = boots.iter().map(|r| order_of(r)).collect();
        assert_matches(&AccessOrder::merge(&orders, k), &want)?;
        let sets: Vec<IntervalSet> = orders.iter().map(AccessOrder::set).collect();
        prop_assert_eq!(IntervalSet::at_least(&sets, k).ranges().to_vec(), ranges_of(want.iter().map(Option::is_some)));
    }

    #[test]
    fn set_operations_equal_byte_map(a in reads_strategy(), b in reads_strategy()) {
        let (ma, mb) = (byte_model(&a), byte_model(&b));
        let (sa, sb) = (order_of(&a).set(), order_of(&b).set());
        prop_assert_eq!(sa.difference(&sb).ranges().to_vec(), ranges_of(ma.iter().zip(&mb).map(|(x, y)| x.is_some() && y.is_none())));
        prop_assert_eq!(sa.intersection(&sb).ranges().to_vec(), ranges_of(ma.iter().zip(&mb).map(|(x, y)| x.is_some() && y.is_some())));
        prop_assert_eq!(sa.union(&sb).ranges().to_vec(), ranges_of(ma.iter().zip(&mb).map(|(x, y)| x.is_some() || y.is_some())));
    }

    #[test]
    fn coverage_equals_byte_map(set_reads in reads_strategy(), boot in reads_strategy()) {
        let (ms, mb) = (byte_model(&set_reads), byte_model(&boot));
        let set = order_of(&set_reads).set();
        let trace = Trace { records: boot.iter().map(|&(t, o, l)| Record::read(t, o, l)).collect(), ..sample_trace(&[], 0) };
        let c = coverage(&set, &trace);
        let count = |f: &dyn Fn(bool, bool) -> bool| ms.iter().zip(&mb).filter(|(s, b)| f(s.is_some(), b.is_some())).count() as u64;
        prop_assert_eq!(c.set_bytes, count(&|s, _| s));
        prop_assert_eq!(c.boot_bytes, count(&|_, b| b));
        prop_assert_eq!(c.covered_bytes, count(&|s, b| s && b));
        prop_assert_eq!(c.missed_bytes, count(&|s, b| !s && b));
        prop_assert_eq!(c.unused_bytes, count(&|s, b| s && !b));
        prop_assert_eq!(c.missed_intervals as usize, ranges_of(ms.iter().zip(&mb).map(|(s, b)| s.is_none() && b.is_some())).len());
        let missed = boot.iter().filter(|&&(_, o, l)| l > 0 && (o..(o + l).min(SPACE)).any(|x| ms[x as usize].is_none())).count();
        prop_assert_eq!((c.requests, c.missed_requests), (boot.iter().filter(|r| r.2 > 0).count() as u64, missed as u64));
    }

    #[test]
    fn trace_file_round_trips(reads in reads_strategy(), lost in 0u64..3) {
        let trace = sample_trace(&reads, lost);
        let bytes = trace.write_to(Cursor::new(Vec::new())).unwrap().into_inner();
        prop_assert_eq!(Trace::parse(&bytes).unwrap(), trace);
    }
}

fn sample_trace(reads: &[(u64, u64, u64)], lost: u64) -> Trace {
    let mut records: Vec<Record> = reads.iter().map(|&(t, o, l)| Record::read(t, o, l)).collect();
    if let Some(r) = records.first_mut() {
        r.op = Op::Write;
        r.tid = 77;
    }
    records.push(Record { result: -5, class: Class::Metadata, ..Record::read(99, 0, 512) });
    Trace {
        image: ImageIdentity { size: SPACE, digest: Some([3; 32]) },
        space: OffsetSpace::Guest,
        lost_records: lost,
        info: TraceInfo { recorder: "test".into(), extra: serde_json::json!({"aio": "threads"}) },
        records,
    }
}

#[test]
fn truncated_trace_is_reported_never_used() {
    let trace = sample_trace(&[(1, 0, 100), (2, 200, 50), (3, 10, 10)], 0);
    let bytes = trace.write_to(Cursor::new(Vec::new())).unwrap().into_inner();
    for len in 0..bytes.len() {
        assert!(Trace::parse(&bytes[..len]).is_err(), "truncated to {len} accepted");
    }
    let cut = bytes.len() - 20;
    match Trace::parse(&bytes[..cut]) {
        Err(TraceError::Truncated { expected: 4, complete: 3, stray: 28 }) => {}
        other => panic!("{other:?}"),
    }
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 48]);
    assert!(matches!(Trace::parse(&longer), Err(TraceError::TrailingBytes(48))));
}

#[test]
fn any_flipped_byte_is_refused() {
    let trace = sample_trace(&[(1, 0, 100), (2, 200, 50)], 0);
    let bytes = trace.write_to(Cursor::new(Vec::new())).unwrap().into_inner();
    for pos in 0..bytes.len() {
        let mut bad = bytes.clone();
        bad[pos] ^= 0x10;
        assert!(Trace::parse(&bad).is_err(), "flip at {pos} accepted");
    }
}

#[test]
fn unfinished_trace_is_reported() {
    let trace = sample_trace(&[(1, 0, 100)], 0);
    let file = tempfile::NamedTempFile::new().unwrap();
    {
        // Dropped without finish(), as when the recorder is killed.
        let mut w = TraceWriter::new(file.reopen().unwrap(), &trace.image, trace.space, &trace.info).unwrap();
        w.push(&trace.records[0]).unwrap();
        w.push(&trace.records[0]).unwrap();
    }
    let out = std::fs::read(file.path()).unwrap();
    assert!(matches!(Trace::parse(&out), Err(TraceError::Unfinished { complete: 2 })));
}

#[test]
fn csv_import_reads_columns_in_any_order_and_names_bad_lines() {
    let text = "offset, length ,t_ns,op\n0,512,10,r\n# a comment\n4096,4096,5,write\n";
    let recs = csv::import(text.as_bytes()).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!((recs[0].offset, recs[0].length, recs[0].t_ns, recs[0].op), (0, 512, 10, Op::Read));
    assert_eq!(recs[1].op, Op::Write);
    let err = csv::import("t_ns,offset,length\n1,2,3\n4,x,6\n".as_bytes()).unwrap_err();
    assert_eq!(err.to_string(), "line 3: column offset: \"x\": invalid digit found in string");
    let err = csv::import("t_ns,offset\n1,2\n".as_bytes()).unwrap_err();
    assert!(err.to_string().contains("`length`"));
    let mut out = Vec::new();
    csv::export(&recs, &mut out).unwrap();
    assert_eq!(csv::import(out.as_slice()).unwrap(), recs);
}

#[test]
fn analysis_counts_what_a_boot_read() {
    let trace = sample_trace(&[(1, 0, 4096), (2, 4096, 4096), (3, 0, 512), (4, 100_000, 1000)], 2);
    let a = analyze(&trace);
    // The first record became a write; the failed metadata read is not a boot read.
    assert_eq!((a.requests, a.total_bytes, a.unique_bytes, a.intervals), (3, 4096 + 512 + 1000, 4096 + 512 + 1000, 3));
    assert_eq!((a.writes, a.failed_or_empty_reads, a.lost_records), (1, 1, 2));
    let sizes: Vec<(u64, u64)> = a.histogram.iter().map(|b| (b.min, b.count)).collect();
    assert_eq!(sizes, vec![(512, 2), (4096, 1)]);
}

#[test]
fn new_bytes_over_time_counts_each_byte_once() {
    let reads = [(0..100, 5), (50..150, 5), (0..300, 9), (1000..1001, 9)];
    assert_eq!(AccessOrder::new_bytes_over_time(reads), vec![(5, 150), (9, 151)]);
}

#[test]
fn header_and_record_are_what_trace_format_md_says() {
    use crate::file::{RawRecord, RawTraceHeader};
    use std::mem::offset_of;
    let doc = include_str!("../TRACE-FORMAT.md");
    let check = |name: &str, off: usize| assert!(doc.contains(&format!("| {off} | `{name}`")), "TRACE-FORMAT.md lacks `{name}` at {off}");
    check("record_size", offset_of!(RawTraceHeader, record_size));
    check("offset_space", offset_of!(RawTraceHeader, offset_space));
    check("record_count", offset_of!(RawTraceHeader, record_count));
    check("lost_records", offset_of!(RawTraceHeader, lost_records));
    check("image_digest", offset_of!(RawTraceHeader, image_digest));
    check("info_length", offset_of!(RawTraceHeader, info_length));
    check("body_crc32c", offset_of!(RawTraceHeader, body_crc32c));
    check("header_crc32c", offset_of!(RawTraceHeader, header_crc32c));
    check("t_ns", offset_of!(RawRecord, t_ns));
    check("result", offset_of!(RawRecord, result));
    check("tid", offset_of!(RawRecord, tid));
    check("op", offset_of!(RawRecord, op));
    check("class", offset_of!(RawRecord, class));
}
