//! Container write and read throughput, next to a plain copy of the same bytes.
//!
//! Every benchmark in the group moves the same 64 MiB disk image between
//! files in one temporary directory, so their times compare directly:
//! `copy` reads and writes it with a 1 MiB buffer, the baseline for
//! `write/*`, which encode and write a container (BLAKE3 per extent,
//! optionally zstd, one thread); `read_plain` reads the raw file with a 1 MiB
//! buffer, the baseline for `read`, which opens the container and reads every
//! guest byte in 1 MiB requests, verifying digests.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use bootcache_format::{Image, PlannedExtent, Segment, Writer, WriterOptions, encode_extent};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const SIZE: usize = 64 << 20;
const EXTENT: usize = 256 << 10;

fn disk() -> Vec<u8> {
    // Quarters: random, text-like, zero, repetitive; a mix a real disk has.
    let mut x = 0x2545F4914F6CDD1Du64;
    (0..SIZE)
        .map(|i| match i / (SIZE / 4) {
            0 => {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
            1 => b"the quick brown fox jumps over the lazy dog "[i % 44],
            2 => 0,
            _ => (i / 4096) as u8,
        })
        .collect()
}

fn write_container(src: &Path, dst: &Path, zstd: Option<i32>) {
    let mut data = Vec::with_capacity(SIZE);
    File::open(src).unwrap().read_to_end(&mut data).unwrap();
    // The first 8 MiB is the "boot segment", the rest follows in order.
    let plan: Vec<PlannedExtent> = (0..SIZE / EXTENT)
        .map(|i| PlannedExtent {
            guest: (i * EXTENT) as u64..((i + 1) * EXTENT) as u64,
            segment: if i < 32 { Segment::Boot } else { Segment::Rest },
        })
        .collect();
    let opts = WriterOptions {
        virtual_size: SIZE as u64,
        block_size: 4096,
        max_extent_len: EXTENT as u32,
        metadata: Default::default(),
        ..Default::default()
    };
    let mut w = Writer::new(BufWriter::with_capacity(1 << 20, File::create(dst).unwrap()), opts, plan.clone()).unwrap();
    for p in &plan {
        w.push(&encode_extent(&data[p.guest.start as usize..p.guest.end as usize], zstd)).unwrap();
    }
    w.finish().unwrap();
}

fn copy(src: &Path, dst: &Path) {
    let mut r = File::open(src).unwrap();
    let mut w = File::create(dst).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).unwrap();
    }
    w.flush().unwrap();
}

fn read_plain(path: &Path) -> usize {
    let mut r = File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut sum = 0usize;
    while let Ok(n @ 1..) = r.read(&mut buf) {
        sum += buf[..n][0] as usize;
    }
    sum
}

fn read_all(path: &Path) -> usize {
    let image = Image::open(File::open(path).unwrap()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut sum = 0usize;
    for off in (0..SIZE).step_by(buf.len()) {
        image.read_at(&mut buf, off as u64).unwrap();
        sum += buf[0] as usize;
    }
    sum
}

fn container(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, disk()).unwrap();
    let out = dir.path().join("out");
    let bc = dir.path().join("disk.bcimg");
    write_container(&raw, &bc, None);

    let mut g = c.benchmark_group("container");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("copy", |b| b.iter(|| copy(&raw, &out)));
    g.bench_function("write/raw", |b| b.iter(|| write_container(&raw, &out, None)));
    g.bench_function("write/zstd3", |b| b.iter(|| write_container(&raw, &out, Some(3))));
    g.bench_function("read_plain", |b| b.iter(|| read_plain(&raw)));
    g.bench_function("read", |b| b.iter(|| read_all(&bc)));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = container
}
criterion_main!(benches);
