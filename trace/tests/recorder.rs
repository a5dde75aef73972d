//! Exactness of the eBPF recorder: this process issues pread64, preadv,
//! preadv2, io_submit and pwrite64 requests at known offsets (aligned,
//! unaligned, short at the end of the file, zero-length, failing, from several
//! threads, through a dup'd descriptor and after a close and reopen) while
//! recording itself. Every request on the image must be recorded exactly
//! once with its offset, length and result; requests on another file, and by
//! another process on the same image, must not be. Needs root (CAP_BPF).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use bootcache_trace::recorder::Recorder;
use bootcache_trace::{Op, TraceInfo};

type Key = (u64, u64, i64, bool); // offset, length, result, write

fn pread(fd: i32, len: usize, off: i64) -> i64 {
    let mut buf = vec![0u8; len.max(1)];
    // SAFETY: buf has at least len bytes.
    unsafe { libc::pread64(fd, buf.as_mut_ptr().cast(), len, off) as i64 }
}

fn preadv(fd: i32, lens: &[usize], off: i64, v2: bool) -> i64 {
    let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0u8; l]).collect();
    let iov: Vec<libc::iovec> = bufs.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
    // SAFETY: every iovec points into a live buffer of its length.
    unsafe {
        if v2 {
            libc::preadv2(fd, iov.as_ptr(), iov.len() as i32, off, 0) as i64
        } else {
            libc::preadv(fd, iov.as_ptr(), iov.len() as i32, off) as i64
        }
    }
}

/// Linux AIO, as QEMU's aio=native uses it: one PREAD and one PREADV iocb.
fn aio_reads(fd: i32, pread_at: u64, preadv_at: u64) -> [i64; 2] {
    #[repr(C)]
    #[derive(Default)]
    struct Iocb {
        data: u64,
        key: u32,
        rw_flags: i32,
        opcode: u16,
        reqprio: i16,
        fildes: u32,
        buf: u64,
        nbytes: u64,
        offset: i64,
        reserved2: u64,
        flags: u32,
        resfd: u32,
    }
    let mut ctx: u64 = 0;
    let mut a = vec![0u8; 512];
    let (mut b1, mut b2) = (vec![0u8; 1000], vec![0u8; 24]);
    let iov =
        [libc::iovec { iov_base: b1.as_mut_ptr().cast(), iov_len: 1000 }, libc::iovec { iov_base: b2.as_mut_ptr().cast(), iov_len: 24 }];
    let c1 = Iocb {
        opcode: 0,
        fildes: fd as u32,
        buf: a.as_mut_ptr() as u64,
        nbytes: 512,
        offset: pread_at as i64,
        data: 1,
        ..Default::default()
    };
    let c2 =
        Iocb { opcode: 7, fildes: fd as u32, buf: iov.as_ptr() as u64, nbytes: 2, offset: preadv_at as i64, data: 2, ..Default::default() };
    let list = [&c1 as *const Iocb, &c2 as *const Iocb];
    let mut events = [[0i64; 4]; 2];
    // SAFETY: raw AIO syscalls on live buffers; the context is destroyed before they are freed.
    unsafe {
        assert_eq!(libc::syscall(libc::SYS_io_setup, 8, &mut ctx), 0);
        assert_eq!(libc::syscall(libc::SYS_io_submit, ctx, 2, list.as_ptr()), 2);
        assert_eq!(libc::syscall(libc::SYS_io_getevents, ctx, 2, 2, events.as_mut_ptr(), std::ptr::null::<libc::timespec>()), 2);
        libc::syscall(libc::SYS_io_destroy, ctx);
    }
    let res = |d: i64| events.iter().find(|e| e[0] == d).map_or(-1, |e| e[2]);
    [res(1), res(2)]
}

fn other_process_reads(image: &Path) {
    let script =
        format!("import os\nfd = os.open({:?}, os.O_RDONLY)\nfor i in range(20): os.pread(fd, 4096, i * 4096)\n", image.to_str().unwrap());
    let status = std::process::Command::new("python3").arg("-c").arg(script).status().expect("python3");
    assert!(status.success());
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn every_request_on_the_image_exactly_once() {
    assert!(is_root(), "this test needs root (CAP_BPF, CAP_PERFMON)");
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.raw");
    let other = dir.path().join("other.raw");
    let size: u64 = (1 << 20) + 300;
    let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&image, &data).unwrap();
    std::fs::write(&other, &data).unwrap();

    let mut rec =
        Recorder::attach(std::process::id(), &image, bootcache_trace::OffsetSpace::Guest).expect("attach the recorder (root, tracefs)");
    let mut want: Vec<Key> = Vec::new();
    // Opened after attaching: traced from its first read.
    let f = File::open(&image).unwrap();
    let fd = f.as_raw_fd();
    let o = File::open(&other).unwrap();
    let r = |res: i64, off: u64, len: u64| (off, len, res, false);

    want.push(r(pread(fd, 4096, 0), 0, 4096));
    want.push(r(pread(fd, 999, 1234), 1234, 999));
    let short = pread(fd, 4096, size as i64 - 100);
    assert_eq!(short, 100);
    want.push(r(short, size - 100, 4096));
    want.push(r(pread(fd, 0, 10), 10, 0));
    // SAFETY: a deliberately bad pointer: the kernel answers EFAULT.
    let fault = unsafe { libc::pread64(fd, 8 as *mut libc::c_void, 16, 0) } as i64;
    assert_eq!(fault, -1);
    want.push((0, 16, -i64::from(libc::EFAULT), false));
    want.push(r(preadv(fd, &[100, 200, 300], 5000, false), 5000, 600));
    want.push(r(preadv(fd, &[4096, 4096], 9000, true), 9000, 8192));
    assert!(preadv(fd, &[10], -1, true) >= 0); // offset -1: the file position, not positional: not recorded
    let [a, b] = aio_reads(fd, 20_000, 30_000);
    want.push(r(a, 20_000, 512));
    want.push(r(b, 30_000, 1024));
    pread(o.as_raw_fd(), 4096, 0); // another file: not recorded

    // Several threads at once.
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                (0..25u64)
                    .map(|i| (pread(fd, 50, (100_000 + t * 10_000 + i * 100) as i64), 100_000 + t * 10_000 + i * 100))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for h in handles {
        for (res, off) in h.join().unwrap() {
            want.push(r(res, off, 50));
        }
    }
    // A duplicate, read at once; an fcntl duplicate; then close and reopen.
    // SAFETY: plain descriptor syscalls on a descriptor we own.
    let d = unsafe { libc::dup(fd) };
    want.push(r(pread(d, 77, 40_000), 40_000, 77));
    // SAFETY: as above.
    let d2 = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 200) };
    want.push(r(pread(d2, 88, 41_000), 41_000, 88));
    // SAFETY: closing descriptors we own.
    unsafe {
        libc::close(d);
        libc::close(d2);
    }
    drop(f);
    let w = OpenOptions::new().read(true).write(true).open(&image).unwrap();
    want.push(r(pread(w.as_raw_fd(), 512, 50_000), 50_000, 512));
    // SAFETY: writes back the bytes that are there.
    let wrote = unsafe { libc::pwrite64(w.as_raw_fd(), data[60_000..].as_ptr().cast(), 256, 60_000) } as i64;
    want.push((60_000, 256, wrote, true));
    other_process_reads(&image);

    let deadline = Instant::now() + Duration::from_secs(10);
    while rec.records().len() < want.len() && Instant::now() < deadline {
        rec.poll(Duration::from_millis(50)).unwrap();
    }
    rec.poll(Duration::from_millis(200)).unwrap(); // anything extra arrives too
    assert_eq!(rec.lost(), 0);
    let trace = rec.finish(TraceInfo::default());
    let mut got: BTreeMap<Key, usize> = BTreeMap::new();
    for x in &trace.records {
        *got.entry((x.offset, x.length, x.result, x.op == Op::Write)).or_default() += 1;
    }
    let mut expected: BTreeMap<Key, usize> = BTreeMap::new();
    for k in want {
        *expected.entry(k).or_default() += 1;
    }
    let missing: Vec<_> = expected.iter().filter(|(k, n)| got.get(k) != Some(n)).collect();
    let extra: Vec<_> = got.iter().filter(|(k, n)| expected.get(k) != Some(n)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "missing or miscounted: {missing:?}\nextra: {extra:?}");
    assert_eq!(trace.image.size, size);
}
