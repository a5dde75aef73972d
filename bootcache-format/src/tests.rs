use std::io::Cursor;

use proptest::prelude::*;
use zerocopy::FromBytes;
use zerocopy::little_endian::{U32, U64};

use crate::*;

fn disk(len: usize) -> Vec<u8> {
    // Compressible halves, incompressible halves, and a zero block.
    let mut d: Vec<u8> = (0..len as u64).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    for (i, b) in d.iter_mut().enumerate().take(len / 4) {
        *b = (i % 7) as u8;
    }
    d[len / 2..len / 2 + 4096].fill(0);
    d
}

fn build(data: &[u8], plan: &[PlannedExtent], zstd: Option<i32>) -> Vec<u8> {
    let opts = WriterOptions {
        virtual_size: data.len() as u64,
        block_size: 512,
        max_extent_len: 1 << 20,
        metadata: Metadata { creator: "test".into(), ..Default::default() },
        ..Default::default()
    };
    let mut w = Writer::new(Cursor::new(Vec::new()), opts, plan.to_vec()).unwrap();
    for p in plan {
        w.push(&encode_extent(&data[p.guest.start as usize..p.guest.end as usize], zstd)).unwrap();
    }
    w.finish().unwrap().0.into_inner()
}

fn sample() -> (Vec<u8>, Vec<PlannedExtent>) {
    let data = disk(64 * 1024);
    let b = |r: std::ops::Range<u64>| PlannedExtent { guest: r, segment: Segment::Boot };
    let r = |r: std::ops::Range<u64>| PlannedExtent { guest: r, segment: Segment::Rest };
    // Boot extents out of guest order; a gap at 40960..45056 reads as zero in the source too.
    let mut data = data;
    data[40960..45056].fill(0);
    let plan =
        vec![b(20480..24576), b(512..1536), b(32768..36864), r(0..512), r(1536..20480), r(24576..32768), r(36864..40960), r(45056..65536)];
    (data, plan)
}

#[test]
fn round_trip_reads_every_byte() {
    for zstd in [None, Some(3)] {
        let (data, plan) = sample();
        let img = Image::open(build(&data, &plan, zstd)).unwrap();
        let mut all = vec![0u8; data.len()];
        img.read_at(&mut all, 0).unwrap();
        assert_eq!(all, data);
        for (off, len) in [(0, 1), (511, 2), (1000, 30000), (65535, 1), (40000, 6000)] {
            let mut buf = vec![0xAAu8; len];
            img.read_at(&mut buf, off as u64).unwrap();
            assert_eq!(buf, data[off..off + len]);
        }
        assert!(matches!(img.read_at(&mut [0u8; 2], 65535), Err(Error::OutOfRange { .. })));
        // 32768..36864 is all zero: a zero extent, with no place in the stream.
        let order: Vec<u64> = img.index().boot_order().map(|e| e.guest.start).collect();
        assert_eq!(order, vec![20480, 512]);
        assert_eq!(img.header().boot_guest_bytes, 4096 + 1024 + 4096);
        if zstd.is_some() {
            assert!(img.index().entries().iter().any(|e| e.encoding == Encoding::Zstd));
            assert!(img.index().entries().iter().any(|e| e.encoding == Encoding::Zero));
        }
    }
}

#[test]
fn stream_order_is_header_index_boot_rest_meta() {
    let (data, plan) = sample();
    let img = Image::open(build(&data, &plan, None)).unwrap();
    let h = img.header();
    assert_eq!(h.index_offset, 256);
    assert_eq!(h.boot.start, 256 + 64 * plan.len() as u64);
    assert_eq!(h.boot.end - h.boot.start, 4096 + 1024);
    assert!(h.rest.start == h.boot.end && h.meta.start == h.rest.end);
}

#[test]
fn any_flipped_data_byte_is_caught_and_named() {
    let (data, plan) = sample();
    for zstd in [None, Some(3)] {
        let file = build(&data, &plan, zstd);
        let good = Image::open(file.clone()).unwrap();
        let (start, end) = (good.header().boot.start, good.header().rest.end);
        for pos in start..end {
            let mut bad = file.clone();
            bad[pos as usize] ^= 0x40;
            let img = Image::open(bad).unwrap();
            let owner = img.index().entries().iter().find(|e| e.stored.contains(&pos)).unwrap().clone();
            match img.check(|_| {}) {
                Err(Error::BadExtent { guest_offset, .. }) => assert_eq!(guest_offset, owner.guest.start),
                other => panic!("flip at {pos:#x} not caught: {other:?}"),
            }
            let mut buf = vec![0u8; 16];
            assert!(img.read_at(&mut buf, owner.guest.start).is_err());
        }
    }
}

#[test]
fn any_flipped_header_or_index_byte_is_refused() {
    let (data, plan) = sample();
    let file = build(&data, &plan, None);
    let index_end = 256 + 64 * plan.len();
    for pos in 0..index_end {
        let mut bad = file.clone();
        bad[pos] ^= 0x01;
        assert!(Image::open(bad).is_err(), "flip at {pos} accepted");
    }
}

#[test]
fn every_truncation_is_refused() {
    let (data, plan) = sample();
    let file = build(&data, &plan, Some(3));
    for len in 0..file.len() {
        assert!(Image::open(file[..len].to_vec()).is_err(), "truncated to {len} accepted");
    }
}

fn reseal(file: &mut [u8], edit: impl FnOnce(&mut RawHeader)) {
    let h = RawHeader::mut_from_prefix(file).unwrap().0;
    edit(h);
    h.header_crc32c = U32::new(h.compute_crc());
}

#[test]
fn header_errors_name_the_problem() {
    let (data, plan) = sample();
    let file = build(&data, &plan, None);
    let mut bad = file.clone();
    bad[0] = b'X';
    assert!(matches!(Image::open(bad).unwrap_err(), Error::Header(HeaderError::BadMagic(_))));
    let mut bad = file.clone();
    reseal(&mut bad, |h| h.version_major = 2.into());
    assert!(matches!(Image::open(bad).unwrap_err(), Error::Header(HeaderError::UnsupportedVersion { major: 2, .. })));
    let mut bad = file.clone();
    reseal(&mut bad, |h| h.incompatible = U64::new(1 << 40));
    match Image::open(bad).unwrap_err() {
        Error::Header(e @ HeaderError::UnsupportedFeatures { .. }) => assert!(e.to_string().contains("unknown 0x10000000000")),
        e => panic!("{e:?}"),
    }
    let mut bad = file.clone();
    reseal(&mut bad, |h| h.incompatible = U64::new(incompat::PARENT));
    assert!(Image::open(bad).unwrap_err().to_string().contains("header"));
    let mut bad = file.clone();
    reseal(&mut bad, |h| h.index_count = U64::new(u64::MAX / 2));
    assert!(matches!(Image::open(bad).unwrap_err(), Error::Header(HeaderError::BadField { field: "index_count", .. })));
    let mut bad = file.clone();
    reseal(&mut bad, |h| h.max_extent_len = U32::new(u32::MAX));
    assert!(matches!(Image::open(bad).unwrap_err(), Error::Header(HeaderError::BadField { field: "max_extent_len", .. })));
}

/// Rewrites entry `i` and reseals index CRC and root digest, as a careful forger would.
fn forge_entry(file: &mut [u8], i: usize, edit: impl FnOnce(&mut RawEntry)) {
    let count = RawHeader::ref_from_prefix(&file[..]).unwrap().0.index_count.get() as usize;
    let range = 256..256 + 64 * count;
    edit(RawEntry::mut_from_bytes(&mut file[256 + 64 * i..256 + 64 * (i + 1)]).unwrap());
    let crc = crc32c::crc32c(&file[range.clone()]);
    let index = file[range].to_vec();
    reseal(file, |h| {
        h.index_crc32c = U32::new(crc);
        let mut hasher = blake3::Hasher::new();
        hasher.update(&h.root_bytes());
        hasher.update(&index);
        h.root_digest = *hasher.finalize().as_bytes();
    });
}

#[test]
fn forged_indexes_are_refused() {
    let (data, plan) = sample();
    let file = build(&data, &plan, None);
    type Edit = Box<dyn Fn(&mut RawEntry)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("overlap", Box::new(|e| e.guest_offset = U64::new(e.guest_offset.get() - 256))),
        ("past the virtual size", Box::new(|e| e.guest_offset = U64::new(u64::MAX - 10))),
        ("outside", Box::new(|e| e.file_offset = U64::new(1 << 40))),
        ("encoding", Box::new(|e| e.encoding = 9)),
        ("guest length", Box::new(|e| e.guest_len = U32::new(0))),
        ("tiled", Box::new(|e| e.file_offset = U64::new(e.file_offset.get() + 1))),
    ];
    for (what, edit) in cases {
        let mut bad = file.clone();
        forge_entry(&mut bad, 2, edit);
        let err = Image::open(bad).unwrap_err();
        let chain = format!("{err}: {}", std::error::Error::source(&err).map(|s| s.to_string()).unwrap_or_default());
        assert!(chain.contains(what), "{what}: got {chain}");
    }
}

#[test]
fn writer_refuses_bad_plans() {
    let opts =
        WriterOptions { virtual_size: 4096, block_size: 512, max_extent_len: 4096, metadata: Metadata::default(), ..Default::default() };
    let plans = [
        vec![PlannedExtent { guest: 0..8192, segment: Segment::Boot }],
        vec![PlannedExtent { guest: 0..2048, segment: Segment::Rest }, PlannedExtent { guest: 2048..4096, segment: Segment::Boot }],
        vec![PlannedExtent { guest: 0..2048, segment: Segment::Boot }, PlannedExtent { guest: 1024..3000, segment: Segment::Rest }],
        vec![PlannedExtent { guest: 100..100, segment: Segment::Boot }],
    ];
    for plan in plans {
        assert!(Writer::new(Cursor::new(Vec::new()), opts.clone(), plan).is_err());
    }
}

#[test]
fn zstd_bomb_is_bounded() {
    let entry = Entry { guest: 0..4096, stored: 0..0, encoding: Encoding::Zstd, segment: Segment::Rest, digest: [0; 32] };
    let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 1).unwrap();
    let entry = Entry { digest: *blake3::hash(&bomb).as_bytes(), ..entry };
    assert!(matches!(decode_extent(&entry, bomb), Err(ExtentError::Decompress(_) | ExtentError::LengthMismatch { .. })));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn lookup_matches_linear_scan(cuts in proptest::collection::btree_set(1u64..100_000, 1..40), probe in 0u64..100_000) {
        let mut bounds: Vec<u64> = cuts.into_iter().collect();
        bounds.insert(0, 0);
        let entries: Vec<Entry> = bounds.windows(2).enumerate().filter(|(i, _)| i % 3 != 1).map(|(_, w)| Entry {
            guest: w[0]..w[1], stored: 0..0, encoding: Encoding::Zero, segment: Segment::Rest, digest: [0; 32],
        }).collect();
        let index = Index::from_sorted(entries.clone());
        let linear = entries.iter().find(|e| e.guest.contains(&probe));
        prop_assert_eq!(index.find(probe), linear);
        let lo = probe.saturating_sub(500);
        let want: Vec<&Entry> = entries.iter().filter(|e| e.guest.start < probe + 1 && e.guest.end > lo).collect();
        prop_assert_eq!(index.overlapping(lo..probe + 1).iter().collect::<Vec<_>>(), want);
    }
}

#[test]
fn header_is_what_format_md_says() {
    use std::mem::offset_of;
    let table = include_str!("../FORMAT.md");
    let check = |name: &str, off: usize| assert!(table.contains(&format!("| {off} | `{name}`")), "FORMAT.md lacks `{name}` at {off}");
    check("magic", offset_of!(RawHeader, magic));
    check("virtual_size", offset_of!(RawHeader, virtual_size));
    check("index_count", offset_of!(RawHeader, index_count));
    check("boot_offset", offset_of!(RawHeader, boot_offset));
    check("meta_digest", offset_of!(RawHeader, meta_digest));
    check("root_digest", offset_of!(RawHeader, root_digest));
    check("parent_digest", offset_of!(RawHeader, parent_digest));
    check("boot_guest_bytes", offset_of!(RawHeader, boot_guest_bytes));
    check("header_crc32c", offset_of!(RawHeader, header_crc32c));
    check("guest_offset", offset_of!(RawEntry, guest_offset));
    check("stored_len", offset_of!(RawEntry, stored_len));
    check("encoding", offset_of!(RawEntry, encoding));
    check("segment", offset_of!(RawEntry, segment));
    check("digest", offset_of!(RawEntry, digest));
}

#[test]
fn the_recorded_boot_time_is_typed_checked_and_read_from_older_images() {
    let with = |metadata: Metadata| {
        let data = vec![1u8; 4096];
        let plan = vec![PlannedExtent { guest: 0..4096, segment: Segment::Rest }];
        let opts = WriterOptions { virtual_size: 4096, block_size: 512, max_extent_len: 4096, metadata, ..Default::default() };
        let mut w = Writer::new(Cursor::new(Vec::new()), opts, plan).unwrap();
        w.push(&encode_extent(&data, None)).unwrap();
        Image::open(w.finish().unwrap().0.into_inner())
    };
    let typed = with(Metadata { creator: "t".into(), boot_seconds: Some(2.5), ..Default::default() }).unwrap();
    assert_eq!(typed.metadata().boot_seconds, Some(2.5));
    // Written before the field existed: in `extra`.
    let older = with(Metadata { creator: "t".into(), extra: serde_json::json!({"boot_seconds": 1.25}), ..Default::default() }).unwrap();
    assert_eq!(older.metadata().boot_seconds, Some(1.25));
    for bad in [-1.0, 1e9] {
        let err = with(Metadata { creator: "t".into(), boot_seconds: Some(bad), ..Default::default() }).unwrap_err().to_string();
        assert!(err.contains("metadata"), "{bad}: {err}");
    }
    assert_eq!(with(Metadata { creator: "t".into(), ..Default::default() }).unwrap().metadata().boot_seconds, None);
}

/// Layered images: a base, a role over it, and what a reader refuses.
mod layers {
    use super::*;

    const LOCATOR: &str = "base.bcimg";

    fn write(data: &[u8], plan: &[PlannedExtent], parent: Option<LayerOf>, order: Vec<BootRef>) -> Result<Vec<u8>, WriteError> {
        let opts = WriterOptions {
            virtual_size: data.len() as u64,
            block_size: 512,
            max_extent_len: 1 << 20,
            metadata: Metadata { creator: "test".into(), parent_locator: parent.map(|_| LOCATOR.into()), ..Default::default() },
            parent,
            boot_order: order,
        };
        let mut w = Writer::new(Cursor::new(Vec::new()), opts, plan.to_vec())?;
        for p in plan {
            w.push(&encode_extent(&data[p.guest.start as usize..p.guest.end as usize], Some(3)))?;
        }
        Ok(w.finish()?.0.into_inner())
    }

    fn base() -> (Vec<u8>, Vec<u8>) {
        let (data, plan) = sample();
        let file = build(&data, &plan, None);
        (data, file)
    }

    fn boot(r: std::ops::Range<u64>) -> PlannedExtent {
        PlannedExtent { guest: r, segment: Segment::Boot }
    }

    fn rest(r: std::ops::Range<u64>) -> PlannedExtent {
        PlannedExtent { guest: r, segment: Segment::Rest }
    }

    fn refs(list: &[(u16, u64)]) -> Vec<BootRef> {
        list.iter().map(|&(layer, guest_offset)| BootRef { layer, guest_offset }).collect()
    }

    /// The role: base bytes changed at 24576..28672 (read by its boot, own),
    /// zeroed at 0..512 (a zero extent that masks the base), the rest the
    /// base's; its boot reads the base's 20480 extent, its own, the base's 512.
    fn role(base_data: &[u8], base_file: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut data = base_data.to_vec();
        data[24576..28672].iter_mut().enumerate().for_each(|(i, b)| *b = (i * 31 % 251) as u8 + 1);
        data[0..512].fill(0);
        let parent = LayerOf { digest: Image::open(base_file.to_vec()).unwrap().root_digest(), depth: 0 };
        let plan = [boot(24576..28672), rest(0..512)];
        let file = write(&data, &plan, Some(parent), refs(&[(1, 20480), (0, 24576), (1, 512)])).unwrap();
        (data, file)
    }

    fn found(file: &[u8]) -> impl FnMut(ParentRef<'_>) -> std::io::Result<Vec<u8>> {
        let file = file.to_vec();
        move |p| {
            assert_eq!(p.locator, Some(LOCATOR));
            Ok(file.clone())
        }
    }

    #[test]
    fn a_role_reads_as_its_disk_with_one_boot_stream_across_the_layers() {
        let (base_data, base_file) = base();
        let (role_data, role_file) = role(&base_data, &base_file);
        assert!(role_file.len() < 4096 + 2048, "the role stores only what differs: {} bytes", role_file.len());
        let chain = Chain::open(Image::open_layer(role_file).unwrap(), found(&base_file)).unwrap();
        assert_eq!(chain.layers().len(), 2);
        assert_eq!(chain.top().header().layer_depth, 1);
        assert_eq!(chain.top().header().version_minor, 1);
        let mut all = vec![0xAAu8; role_data.len()];
        chain.read_at(&mut all, 0).unwrap();
        assert_eq!(all, role_data);
        for (off, len) in [(0, 1), (500, 30), (24000, 6000), (65535, 1)] {
            let mut buf = vec![0xAAu8; len];
            chain.read_at(&mut buf, off as u64).unwrap();
            assert_eq!(buf, role_data[off..off + len]);
        }
        let stream: Vec<(usize, u64)> = chain.boot_stream().map(|(l, e)| (l, e.guest.start)).collect();
        assert_eq!(stream, vec![(1, 20480), (0, 24576), (1, 512)]);
        assert_eq!(chain.check(|_| {}).unwrap().extents, 2 + sample().1.len() as u64);
        // A third layer over the role: the chain is followed to the base.
        let mut v2 = role_data.clone();
        v2[40960..41984].fill(9);
        let role_root = chain.top().root_digest();
        let top = write(&v2, &[rest(40960..41984)], Some(LayerOf { digest: role_root, depth: 1 }), vec![]).unwrap();
        let mut files = vec![role(&base_data, &base_file).1, base_file].into_iter();
        let chain = Chain::open(Image::open_layer(top).unwrap(), |_| Ok(files.next().unwrap())).unwrap();
        let mut all = vec![0u8; v2.len()];
        chain.read_at(&mut all, 0).unwrap();
        assert_eq!(all, v2);
        assert_eq!(chain.layers().len(), 3);
    }

    #[test]
    fn a_layer_alone_is_refused_by_name_and_never_read_as_zeros() {
        let (base_data, base_file) = base();
        let (_, role_file) = role(&base_data, &base_file);
        let parent = Image::open(base_file).unwrap().root_digest();
        let msg = Image::open(role_file.clone()).unwrap_err().to_string();
        assert!(msg.contains(&parent.to_string()) && msg.contains(LOCATOR), "{msg}");
        let layer = Image::open_layer(role_file).unwrap();
        assert!(matches!(layer.read_at(&mut [0u8; 8], 0), Err(Error::Layered { .. })));
        assert!(layer.check(|_| {}).is_ok(), "its own extents can be checked");
    }

    #[test]
    fn a_missing_or_wrong_parent_is_named() {
        let (base_data, base_file) = base();
        let (_, role_file) = role(&base_data, &base_file);
        let open = || Image::open_layer(role_file.clone()).unwrap();
        let err = Chain::open(open(), |_| Err(std::io::ErrorKind::NotFound.into())).unwrap_err();
        assert!(matches!(&err, Error::Parent { source, .. } if matches!(**source, ParentError::Missing(_))), "{err:?}");
        assert!(err.to_string().contains(LOCATOR), "{err}");
        // Another image where the base should be: its root digest differs.
        let (data, plan) = sample();
        let other = build(&data, &plan, Some(3));
        let err = Chain::open(open(), |_| Ok(other.clone())).unwrap_err();
        assert!(matches!(&err, Error::Parent { source, .. } if matches!(**source, ParentError::Mismatch { .. })), "{err:?}");
        // A parent that is not an image at all.
        let err = Chain::open(open(), |_| Ok(vec![0u8; 300])).unwrap_err();
        assert!(matches!(&err, Error::Parent { source, .. } if matches!(**source, ParentError::Invalid(_))), "{err:?}");
    }

    #[test]
    fn layers_that_do_not_fit_are_refused() {
        let (base_data, base_file) = base();
        let digest = Image::open(base_file.clone()).unwrap().root_digest();
        // A boot order naming an extent the base does not have (none starts at 4096).
        let bad = write(&base_data, &[], Some(LayerOf { digest, depth: 0 }), refs(&[(1, 4096)])).unwrap();
        let err = Chain::open(Image::open_layer(bad).unwrap(), found(&base_file)).unwrap_err();
        assert!(matches!(err, Error::Chain { layer: 0, .. }), "{err:?}");
        // A layer claiming a deeper parent than it has.
        let bad = write(&base_data, &[], Some(LayerOf { digest, depth: 3 }), vec![]).unwrap();
        let err = Chain::open(Image::open_layer(bad).unwrap(), found(&base_file)).unwrap_err();
        assert!(matches!(err, Error::Chain { layer: 1, .. }), "{err:?}");
        // A layer over a larger disk.
        let bad = write(&base_data[..32768], &[], Some(LayerOf { digest, depth: 0 }), vec![]).unwrap();
        let err = Chain::open(Image::open_layer(bad).unwrap(), found(&base_file)).unwrap_err();
        assert!(matches!(err, Error::Chain { layer: 1, .. }), "{err:?}");
    }

    #[test]
    fn the_writer_refuses_tables_that_do_not_describe_the_plan() {
        let (base_data, base_file) = base();
        let digest = Image::open(base_file).unwrap().root_digest();
        let parent = Some(LayerOf { digest, depth: 0 });
        let plan = [boot(24576..28672)];
        for (parent, order) in [
            (None, refs(&[(0, 24576)])),                                                  // a table without a parent
            (parent, refs(&[(1, 512)])),                                                  // its own boot extent left out
            (parent, refs(&[(0, 0), (0, 24576)])),                                        // an own entry that is no boot extent
            (parent, refs(&[(0, 24576), (2, 0)])),                                        // a layer the chain does not have
            (Some(LayerOf { digest, depth: MAX_CHAIN_LAYERS - 1 }), refs(&[(0, 24576)])), // too deep
        ] {
            assert!(matches!(write(&base_data, &plan, parent, order.clone()), Err(WriteError::BadPlan(_))), "{order:?}");
        }
    }

    #[test]
    fn any_flipped_byte_before_the_data_of_a_layer_is_refused() {
        let (base_data, base_file) = base();
        let (_, role_file) = role(&base_data, &base_file);
        let data_start = Image::open_layer(role_file.clone()).unwrap().header().boot.start as usize;
        for pos in 0..data_start {
            let mut bad = role_file.clone();
            bad[pos] ^= 0x01;
            assert!(Image::open_layer(bad).is_err(), "flip at {pos} accepted");
        }
    }
}

/// The container fuzz target's seed of a layer followed by its parent (the
/// target splits its input at each later magic): it still opens as a chain.
/// `BOOTCACHE_WRITE_SEEDS=1 cargo test -p bootcache-format seed` writes it again.
#[test]
fn the_layered_fuzz_seed_is_a_chain() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/container_reader/tiny-layer-and-base.bcimg");
    if std::env::var_os("BOOTCACHE_WRITE_SEEDS").is_some() {
        let (data, plan) = sample();
        let base = build(&data, &plan, Some(3));
        let digest = Image::open(base.clone()).unwrap().root_digest();
        let mut role = data.clone();
        role[24576..28672].fill(3);
        let opts = WriterOptions {
            virtual_size: role.len() as u64,
            block_size: 512,
            max_extent_len: 4096,
            metadata: Metadata { creator: "seed".into(), parent_locator: Some("base".into()), ..Default::default() },
            parent: Some(LayerOf { digest, depth: 0 }),
            boot_order: vec![BootRef { layer: 1, guest_offset: 20480 }, BootRef { layer: 0, guest_offset: 24576 }],
        };
        let plan = [PlannedExtent { guest: 24576..28672, segment: Segment::Boot }];
        let mut w = Writer::new(Cursor::new(Vec::new()), opts, plan.to_vec()).unwrap();
        w.push(&encode_extent(&role[24576..28672], Some(3))).unwrap();
        let mut seed = w.finish().unwrap().0.into_inner();
        seed.extend_from_slice(&base);
        std::fs::write(&path, seed).unwrap();
    }
    let seed = std::fs::read(&path).unwrap();
    let at = seed.windows(8).skip(1).position(|w| w == MAGIC).unwrap() + 1;
    let (top, base) = seed.split_at(at);
    let chain = Chain::open(Image::open_layer(top.to_vec()).unwrap(), |_| Ok(base.to_vec())).unwrap();
    assert_eq!(chain.boot_stream().count(), 2);
}

/// A layer's header fields, forged with a valid checksum: each refused by name.
#[test]
fn forged_layer_headers_are_refused_by_name() {
    let (data, plan) = sample();
    let base = build(&data, &plan, None);
    let digest = Image::open(base.clone()).unwrap().root_digest();
    let opts = WriterOptions {
        virtual_size: data.len() as u64,
        block_size: 512,
        max_extent_len: 4096,
        metadata: Metadata { creator: "t".into(), parent_locator: Some("base".into()), ..Default::default() },
        parent: Some(LayerOf { digest, depth: 0 }),
        boot_order: vec![BootRef { layer: 1, guest_offset: 20480 }],
    };
    let layer = Writer::new(Cursor::new(Vec::new()), opts, vec![]).unwrap().finish().unwrap().0.into_inner();
    assert!(Image::open_layer(layer.clone()).is_ok());
    let forge = |edit: &dyn Fn(&mut RawHeader)| {
        let mut bytes = layer.clone();
        let raw = RawHeader::mut_from_prefix(&mut bytes).unwrap().0;
        edit(raw);
        raw.header_crc32c = U32::new(raw.compute_crc());
        match Image::open_layer(bytes).unwrap_err() {
            Error::Header(HeaderError::BadField { field, .. }) => field,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(forge(&|h| h.layer_depth = 16.into()), "layer_depth");
    assert_eq!(forge(&|h| h.parent_digest = [0; 32]), "parent_digest");
    // Parent fields without the feature: not a layer, not an image that stands alone.
    assert_eq!(forge(&|h| h.incompatible = U64::new(0)), "parent_digest");
    // The order table's entry moved past the disk (its CRC is the root digest's business).
    let mut bytes = layer.clone();
    let at = 256 + 8; // the table follows the empty index; `layer` of entry 0
    bytes[at] = 9;
    let err = Image::open_layer(bytes).unwrap_err();
    assert!(matches!(err, Error::BadOrder(_)), "{err}");
    let mut bytes = layer.clone();
    bytes[256..264].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let err = Image::open_layer(bytes).unwrap_err();
    assert!(matches!(err, Error::BadOrder(ref why) if why.contains("past the virtual size")), "{err}");
}
