//! The qcow2 reader against qemu-img: for every image in a corpus that
//! qemu-img and qemu-io make, `qemu-img convert -O raw` and bootcache (the
//! source read directly, and converted to a container and exported) must
//! give the same bytes.

use std::io::Cursor;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bootcache_convert::qcow2::Qcow2Sink;
use bootcache_convert::{ConvertOptions, RawSink, convert, export, open};
use bootcache_format::Image;

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e} (package qemu-utils)"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A raw disk of `size` bytes: scattered random and repetitive data, holes.
fn base_raw(dir: &Path, size: u64) -> PathBuf {
    let p = dir.join("base.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..24u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = (x % size) / 512 * 512;
        let len = (4096 + (x >> 40) % 200_000).min(size - off);
        let data: Vec<u8> = (0..len).map(|j| if i % 3 == 0 { (j / 512) as u8 } else { (j.wrapping_mul(x | 1) >> 17) as u8 }).collect();
        f.write_all_at(&data, off).unwrap();
    }
    p
}

fn check(src: &Path, dir: &Path, what: &str) {
    let reference = dir.join("reference.raw");
    run("qemu-img", &["convert", "-O", "raw", src.to_str().unwrap(), reference.to_str().unwrap()]);
    let want = std::fs::read(&reference).unwrap();
    let image = open(src, None).unwrap_or_else(|e| panic!("{what}: {e}")).source;
    assert_eq!(image.size(), want.len() as u64, "{what}: size");
    let mut got = vec![0u8; want.len()];
    for (i, chunk) in got.chunks_mut(1 << 20).enumerate() {
        image.read_at(chunk, i as u64 * (1 << 20)).unwrap_or_else(|e| panic!("{what}: read at {i} MiB: {e}"));
    }
    assert!(got == want, "{what}: the qcow2 reader differs from qemu-img");
    // Through the whole pipeline: every guest byte the reader reports as
    // unallocated must really be zero, or the round trip would lose it.
    let (file, _) = convert(image.as_ref(), &[], Cursor::new(Vec::new()), &ConvertOptions::default(), &|_| {}).unwrap();
    let bc = Image::open(file.into_inner()).unwrap();
    let back = dir.join("back.raw");
    export(&bc, Box::new(RawSink::create(&back, bc.virtual_size()).unwrap()), &|_| {}).unwrap();
    assert!(std::fs::read(&back).unwrap() == want, "{what}: convert + export differs from qemu-img");
    // And out as qcow2: qemu-img must find it consistent and equal.
    let q = dir.join("back.qcow2");
    export(&bc, Box::new(Qcow2Sink::create(&q, bc.virtual_size()).unwrap()), &|_| {}).unwrap();
    run("qemu-img", &["check", "-f", "qcow2", q.to_str().unwrap()]);
    run("qemu-img", &["compare", "-f", "qcow2", "-F", "raw", q.to_str().unwrap(), reference.to_str().unwrap()]);
}

fn qcow2(dir: &Path, name: &str, base: &Path, opts: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(opts);
    args.extend([base.to_str().unwrap(), out.to_str().unwrap()]);
    run("qemu-img", &args);
    out
}

#[test]
fn cluster_sizes_versions_and_compression() {
    let dir = tempfile::tempdir().unwrap();
    // A size that is not a multiple of any cluster size.
    let base = base_raw(dir.path(), (12 << 20) + 3 * 512);
    check(&base, dir.path(), "raw");
    for (name, opts) in [
        ("c512", &["-o", "cluster_size=512"][..]),
        ("c4k", &["-o", "cluster_size=4096"]),
        ("c64k-v2", &["-o", "cluster_size=65536,compat=0.10"]),
        ("c64k-v3", &["-o", "cluster_size=65536,compat=1.1"]),
        ("c2m", &["-o", "cluster_size=2M"]),
        ("zlib", &["-c", "-o", "cluster_size=65536"]),
        ("zlib-4k-v2", &["-c", "-o", "cluster_size=4096,compat=0.10"]),
        ("zstd", &["-c", "-o", "cluster_size=65536,compression_type=zstd"]),
        ("prealloc-metadata", &["-o", "preallocation=metadata"]),
        ("prealloc-falloc", &["-o", "preallocation=falloc"]),
        ("prealloc-full", &["-o", "preallocation=full"]),
    ] {
        let q = qcow2(dir.path(), &format!("{name}.qcow2"), &base, opts);
        check(&q, dir.path(), name);
    }
}

#[test]
fn backing_chains_discards_and_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_raw(dir.path(), 16 << 20);
    let d = dir.path();
    qcow2(d, "b.qcow2", &base, &["-o", "cluster_size=65536"]);
    let mid = d.join("mid.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", mid.to_str().unwrap()]);
    run("qemu-io", &["-c", "write -P 0xab 1M 192k", "-c", "write -z 4M 128k", "-c", "discard 8M 64k", mid.to_str().unwrap()]);
    let top = d.join("top.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", "-o", "cluster_size=4096", "-b", "mid.qcow2", "-F", "qcow2", top.to_str().unwrap()]);
    run("qemu-io", &["-c", "write -P 0xcd 1100k 8k", "-c", "write -z 0 4k", "-c", "write -P 0x11 15M 4k", top.to_str().unwrap()]);
    check(&top, d, "three-deep chain");
    // A raw backing file, shorter than the overlay.
    let small = d.join("small.raw");
    std::fs::write(&small, vec![0x5au8; 3 << 20]).unwrap();
    let over = d.join("over.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", "-b", "small.raw", "-F", "raw", over.to_str().unwrap(), "8M"]);
    run("qemu-io", &["-c", "write -P 0x77 2M 2M", over.to_str().unwrap()]);
    check(&over, d, "raw backing file");

    // A qcow2 file declared raw by its overlay is read as raw bytes, as QEMU does.
    let inner = d.join("inner.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", inner.to_str().unwrap(), "8M"]);
    let declared = d.join("declared-raw.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", "-b", "inner.qcow2", "-F", "raw", declared.to_str().unwrap()]);
    check(&declared, d, "qcow2 file as a raw backing file");
}

#[test]
fn a_backing_loop_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let a = d.join("a.qcow2");
    let b = d.join("b.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", a.to_str().unwrap(), "1M"]);
    run("qemu-img", &["create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b.to_str().unwrap()]);
    // Point a's backing file at b: a -> b -> a.
    run("qemu-img", &["rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", a.to_str().unwrap()]);
    let err = chain(&open(&b, None).map(|_| ()).unwrap_err());
    assert!(err.contains("loops"), "{err}");
}

/// An error and its causes, on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s = format!("{s}: {c}");
        cause = c.source();
    }
    s
}
