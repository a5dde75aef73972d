//! Mapping qcow2 image-file offsets to guest offsets, checked against
//! `qemu-img map` on images that qemu-img makes.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use bootcache_convert::qcow2::{Qcow2, map_trace};
use bootcache_trace::{Class, OffsetSpace, Record, Trace};

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img").args(args).output().expect("qemu-img (package qemu-utils)");
    assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// A raw disk with data in a few places, converted to qcow2 with `opts`.
fn make(dir: &Path, opts: &[&str]) -> (std::path::PathBuf, Vec<u8>) {
    let raw = dir.join("d.raw");
    let f = std::fs::File::create(&raw).unwrap();
    f.set_len(8 << 20).unwrap();
    let mut model = vec![0u8; 8 << 20];
    for (i, off) in [0u64, 65536, 1 << 20, 3 << 20, (8 << 20) - 4096].into_iter().enumerate() {
        let data: Vec<u8> = (0..8192u64.min((8 << 20) - off)).map(|j| (j as u8).wrapping_mul(i as u8 + 3) | 1).collect();
        f.write_all_at(&data, off).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    let q = dir.join("d.qcow2");
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(opts);
    args.extend([raw.to_str().unwrap(), q.to_str().unwrap()]);
    qemu_img(&args);
    (q, model)
}

#[test]
fn data_reads_map_like_qemu_img_map_says() {
    let dir = tempfile::tempdir().unwrap();
    for opts in [&["-o", "cluster_size=4096"][..], &["-o", "cluster_size=65536,compat=0.10"], &["-o", "cluster_size=2M"]] {
        let (q, _) = make(dir.path(), opts);
        let map: serde_json::Value = serde_json::from_str(&qemu_img(&["map", "--output=json", q.to_str().unwrap()])).unwrap();
        let image = Qcow2::open(&q).unwrap();
        let mut records = Vec::new();
        let mut want = Vec::new();
        for (t, ext) in map.as_array().unwrap().iter().enumerate() {
            let (Some(host), true) = (ext["offset"].as_u64(), ext["data"].as_bool().unwrap()) else { continue };
            let (guest, len) = (ext["start"].as_u64().unwrap(), ext["length"].as_u64().unwrap());
            // A read in the middle of the extent, and one of its first 512 bytes.
            let mid = len / 2 / 512 * 512;
            records.push(Record::read(t as u64 * 2, host + mid, 512));
            records.push(Record::read(t as u64 * 2 + 1, host, 512));
            want.push(guest + mid);
            want.push(guest);
        }
        assert!(!want.is_empty());
        // A header read and an L1 read: metadata, not data.
        let l1 = image.header().l1_table_offset;
        records.push(Record::read(999, 0, 104));
        records.push(Record::read(1000, l1, 8));
        let trace = Trace { space: OffsetSpace::ImageFile, records, ..Trace::default() };
        let (mapped, stats) = map_trace(&trace, &image).unwrap();
        let data: Vec<u64> = mapped.records.iter().filter(|r| r.class == Class::Data).map(|r| r.offset).collect();
        assert_eq!(data, want, "{opts:?}");
        assert_eq!(stats.metadata_pieces, 2, "{opts:?}");
        assert_eq!(mapped.space, OffsetSpace::Guest);
        assert_eq!(mapped.image.size, 8 << 20);
    }
}

#[test]
fn compressed_clusters_map_to_whole_guest_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = make(dir.path(), &["-c", "-o", "cluster_size=65536"]);
    let image = Qcow2::open(&q).unwrap();
    let clusters = image.clusters().unwrap();
    let compressed: Vec<_> = clusters
        .iter()
        .filter_map(|(g, c)| match c {
            bootcache_convert::qcow2::Cluster::Compressed { host, .. } => Some((*g, *host)),
            _ => None,
        })
        .collect();
    assert!(!compressed.is_empty(), "qemu-img -c made no compressed cluster");
    let records = compressed.iter().map(|&(_, host)| Record::read(0, host, 100)).collect();
    let (mapped, _) = map_trace(&Trace { space: OffsetSpace::ImageFile, records, ..Trace::default() }, &image).unwrap();
    let got: Vec<(u64, u64)> = mapped.records.iter().map(|r| (r.offset, r.length)).collect();
    let want: Vec<(u64, u64)> = compressed.iter().map(|&(g, _)| (g, 65536)).collect();
    assert_eq!(got, want);
}

#[test]
fn malformed_qcow2_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = make(dir.path(), &["-o", "cluster_size=4096"]);
    let good = std::fs::read(&q).unwrap();
    let cases: [(usize, &[u8], &str); 4] = [
        (0, b"QFI\x00", "not a qcow2"),
        (20, &[0, 0, 0, 40], "cluster_bits"),
        (36, &[0x7f, 0xff, 0xff, 0xff], "L1"),
        (72, &[0, 0, 0, 0, 0, 0, 0, 0x10], "unsupported qcow2 features"),
    ];
    let p = dir.path().join("bad.qcow2");
    for (at, bytes, what) in cases {
        let mut bad = good.clone();
        bad[at..at + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&p, &bad).unwrap();
        let err = Qcow2::open(&p).map(|_| ()).and_then(|_| Qcow2::open(&p).unwrap().clusters().map(|_| ())).unwrap_err().to_string();
        assert!(err.contains(what), "{what}: {err}");
    }
    std::fs::write(dir.path().join("short.qcow2"), &good[..50]).unwrap();
    assert!(Qcow2::open(&dir.path().join("short.qcow2")).unwrap_err().to_string().contains("too short"));

    // Truncated after the metadata: data clusters (and so L2 entries) point past the end.
    let image = Qcow2::open(&q).unwrap();
    let last_meta = image.metadata().unwrap().ranges().last().unwrap().end;
    let cut = dir.path().join("cut.qcow2");
    std::fs::write(&cut, &good[..usize::try_from(last_meta).unwrap().max(good.len() / 2)]).unwrap();
    let err = Qcow2::open(&cut).and_then(|q| q.clusters()).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("past the end"), "truncated: {err}");

    // An L1 entry that points past the end of the file.
    let l1 = image.header().l1_table_offset as usize;
    let mut bad = good.clone();
    bad[l1..l1 + 8].copy_from_slice(&(0x8000_0000_0000_0000u64 | (1 << 40)).to_be_bytes());
    std::fs::write(&p, &bad).unwrap();
    let err = Qcow2::open(&p).unwrap().clusters().map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("L1") && err.contains("past the end"), "L1: {err}");

    // A snapshot table past the end of the file (found by fuzzing: an overflow).
    let mut bad = good.clone();
    bad[60..64].copy_from_slice(&1u32.to_be_bytes());
    bad[64..72].copy_from_slice(&u64::MAX.to_be_bytes());
    std::fs::write(&p, &bad).unwrap();
    assert!(Qcow2::open(&p).unwrap_err().to_string().contains("snapshot table"));

    // An absurd virtual size.
    let mut bad = good.clone();
    bad[24..32].copy_from_slice(&u64::MAX.to_be_bytes());
    std::fs::write(&p, &bad).unwrap();
    assert!(Qcow2::open(&p).unwrap_err().to_string().contains("L1 size"));
}
