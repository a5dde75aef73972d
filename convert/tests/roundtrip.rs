//! Random sparse images x random traces -> convert -> export, byte for byte.

use std::fs::OpenOptions;
use std::io::Cursor;
use std::os::unix::fs::FileExt;

use bootcache_convert::{ConvertOptions, RawSink, RawSource, convert, export};
use bootcache_format::{Image, Segment};
use bootcache_trace::{ImageIdentity, Record, Trace};
use proptest::prelude::*;

#[derive(Debug, Clone)]
struct Case {
    size: u64,
    /// (offset, length, fill): fill 0 writes zeros into an allocated range.
    writes: Vec<(u64, u64, u8)>,
    /// (t_ns, offset, length)
    reads: Vec<(u64, u64, u64)>,
    zstd: bool,
}

fn case() -> impl Strategy<Value = Case> {
    (1u64..2 << 20).prop_flat_map(|size| {
        let w = (0..size, 1u64..200_000, prop_oneof![Just(0u8), 1u8..=255]).prop_map(move |(o, l, f)| (o, l.min(size - o), f));
        let r = (0u64..1000, 0..size, 0u64..100_000).prop_map(move |(t, o, l)| (t, o, l.min(size - o)));
        (Just(size), proptest::collection::vec(w, 0..12), proptest::collection::vec(r, 0..40), any::<bool>())
            .prop_map(|(size, writes, reads, zstd)| Case { size, writes, reads, zstd })
    })
}

/// Writes the image: random bytes (compressible or not, or zeros) in holes-and-data layout.
fn make_image(dir: &std::path::Path, c: &Case) -> (std::path::PathBuf, Vec<u8>) {
    let path = dir.join("src.raw");
    let f = OpenOptions::new().create(true).write(true).truncate(true).open(&path).unwrap();
    f.set_len(c.size).unwrap();
    let mut model = vec![0u8; c.size as usize];
    for &(off, len, fill) in &c.writes {
        let data: Vec<u8> = (0..len)
            .map(|i| {
                if fill == 0 {
                    0
                } else if fill % 2 == 0 {
                    fill
                } else {
                    (i.wrapping_mul(fill as u64 * 7919) >> 3) as u8
                }
            })
            .collect();
        f.write_all_at(&data, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    (path, model)
}

/// Each byte's first-access time.
fn first_times(c: &Case) -> Vec<Option<u64>> {
    let mut reads = c.reads.clone();
    reads.sort_by_key(|r| r.0);
    let mut first = vec![None; c.size as usize];
    for (t, off, len) in reads {
        for b in off..off + len {
            first[b as usize].get_or_insert(t);
        }
    }
    first
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn convert_then_export_is_identical_and_boot_first(c in case()) {
        let dir = tempfile::tempdir().unwrap();
        let (path, model) = make_image(dir.path(), &c);
        let trace = Trace {
            image: ImageIdentity { size: c.size, digest: None },
            records: c.reads.iter().map(|&(t, o, l)| Record::read(t, o, l)).collect(),
            ..Trace::default()
        };
        let src = RawSource::open(&path).unwrap();
        let opts = ConvertOptions { zstd_level: c.zstd.then_some(1), boot_extent_max: 64 << 10, rest_extent_len: 16 << 10, ..Default::default() };
        let (out, report) = convert(&src, &[trace], Cursor::new(Vec::new()), &opts, &|_| {}).unwrap();
        let image = Image::open(out.into_inner()).unwrap();

        // Byte-identical through the reader and through export to a sparse raw file.
        let mut all = vec![0u8; c.size as usize];
        image.read_at(&mut all, 0).unwrap();
        prop_assert!(all == model, "read_at differs from the source");
        let back = dir.path().join("back.raw");
        export(&image, Box::new(RawSink::create(&back, c.size).unwrap()), &|_| {}).unwrap();
        prop_assert!(std::fs::read(&back).unwrap() == model, "export differs from the source");

        // Boot segment: in first-access order, covering every read byte that holds data.
        let first = first_times(&c);
        let mut last = 0;
        for e in image.index().boot_order() {
            let t = (e.guest.start..e.guest.end).filter_map(|b| first[b as usize]).min();
            prop_assert!(t.is_some(), "boot extent {:?} holds no read byte", e.guest);
            prop_assert!(t.unwrap() >= last, "boot extent {:?} out of first-access order", e.guest);
            last = t.unwrap();
        }
        let boot_extents: Vec<_> = image.index().entries().iter().filter(|e| e.segment == Segment::Boot).collect();
        for (b, t) in first.iter().enumerate() {
            if t.is_some() && model[b] != 0 {
                prop_assert!(boot_extents.iter().any(|e| e.guest.contains(&(b as u64))), "read byte {} not in the boot segment", b);
            }
        }
        // Alignment adds at most 10% over the exact boot set.
        let exact = first.iter().filter(|t| t.is_some()).count() as u64;
        prop_assert_eq!(report.boot_set_bytes, exact);
        prop_assert!(report.boot_guest_bytes as f64 <= exact as f64 * 1.10);
    }
}

#[test]
fn sparse_source_costs_no_data_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let c = Case { size: 1 << 30, writes: vec![(4096, 8192, 3), (512 << 20, 4096, 0)], reads: vec![(0, 4096, 4096)], zstd: false };
    let path = dir.path().join("big.raw");
    let f = OpenOptions::new().create(true).write(true).truncate(true).open(&path).unwrap();
    f.set_len(c.size).unwrap();
    f.write_all_at(&[3u8; 8192], 4096).unwrap();
    f.write_all_at(&[0u8; 4096], 512 << 20).unwrap();
    let trace = Trace { records: vec![Record::read(0, 4096, 4096)], ..Trace::default() };
    let src = RawSource::open(&path).unwrap();
    let late = Trace { records: vec![Record::read(2_500_000_000, 4096, 512)], ..Trace::default() };
    let (out, report) = convert(&src, &[trace, late], Cursor::new(Vec::new()), &ConvertOptions::default(), &|_| {}).unwrap();
    // The latest boot's last read is recorded for the node's background stream.
    let img = Image::open(out.get_ref().as_slice()).unwrap();
    assert_eq!(img.metadata().boot_seconds, Some(2.5));
    // 8 KiB of data, an allocated zero block that costs nothing, a 1 GiB disk.
    assert_eq!(report.boot_segment_bytes + report.rest_segment_bytes, 8192);
    assert_eq!(report.zero_extents, 1);
    assert!(out.into_inner().len() < 16 << 10);
}

#[test]
fn a_source_written_during_conversion_fails_it_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("busy.raw");
    let f = OpenOptions::new().create(true).write(true).truncate(true).open(&path).unwrap();
    f.write_all_at(&[7u8; 1 << 20], 0).unwrap();
    let src = RawSource::open(&path).unwrap();
    // The same length and, mostly, the same bytes: only the timestamps tell.
    f.write_all_at(&[8u8; 512], 4096).unwrap();
    let err = convert(&src, &[], Cursor::new(Vec::new()), &ConvertOptions::default(), &|_| {}).unwrap_err();
    assert!(matches!(err, bootcache_convert::ConvertError::SourceChanged), "{err:?}");
    assert!(err.to_string().contains("changed while it was being converted"), "{err}");
    // Opened again, the same file converts.
    let src = RawSource::open(&path).unwrap();
    convert(&src, &[], Cursor::new(Vec::new()), &ConvertOptions::default(), &|_| {}).unwrap();
}
