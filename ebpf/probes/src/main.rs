//! bootcache's eBPF probes, on syscall tracepoints (kprobes and fentry are not
//! available on every kernel; syscall tracepoints are).
//!
//! Positional reads and writes (`pread64`, `preadv`, `preadv2`, `pwrite64`,
//! `pwritev`, `pwritev2`) are matched entry to exit per thread; `io_submit`
//! iocbs are read from user memory at entry. Only the traced process
//! (`TGID`) and its descriptors in `FDS` are recorded. A full ring buffer
//! counts a lost record instead of blocking anything.
#![no_std]
#![no_main]

use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user};
use aya_ebpf::macros::{map, tracepoint};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::TracePointContext;
use bootcache_ebpf_common::{COUNTER_LOST, COUNTER_SEEN, Event, FdKey, MAX_IOCB, MAX_IOV, Pending, flags, syscall};

/// The traced process's tgid, at index 0.
#[map]
static TGID: Array<u32> = Array::with_max_entries(1, 0);
/// Descriptors of traced processes that refer to the image.
#[map]
static FDS: HashMap<FdKey, u8> = HashMap::with_max_entries(1024, 0);
/// Requests between entry and exit, by thread (pid_tgid).
#[map]
static PENDING: HashMap<u64, Pending> = HashMap::with_max_entries(16384, 0);
/// Events to user space.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(8 << 20, 0);
/// Lost and seen counters.
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

// Syscall tracepoint layout: 8 bytes of common fields, __syscall_nr padded to
// 8, then one 8-byte slot per argument; sys_exit has `long ret` at 16.
const ARG0: usize = 16;
const ARG1: usize = 24;
const ARG2: usize = 32;
const ARG3: usize = 40;
const RET: usize = 16;

#[repr(C)]
struct Iovec {
    base: u64,
    len: u64,
}

// struct iocb offsets.
const IOCB_OPCODE: usize = 16;
const IOCB_FILDES: usize = 20;
const IOCB_BUF: usize = 24;
const IOCB_NBYTES: usize = 32;
const IOCB_OFFSET: usize = 40;
const IOCB_CMD_PREAD: u16 = 0;
const IOCB_CMD_PWRITE: u16 = 1;
const IOCB_CMD_PREADV: u16 = 7;
const IOCB_CMD_PWRITEV: u16 = 8;

fn count(index: u32, n: u64) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, only this CPU touches it while we run.
        unsafe { *c += n };
    }
}

fn traced(fd: u32) -> Option<u32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if TGID.get(0).copied() != Some(tgid) {
        return None;
    }
    // SAFETY: the value is a plain u8 we only test for presence.
    unsafe { FDS.get(&FdKey { tgid, fd }) }.map(|_| tgid)
}

fn arg<T>(ctx: &TracePointContext, at: usize) -> Option<T> {
    // SAFETY: reads a fixed slot of the tracepoint record.
    unsafe { ctx.read_at::<T>(at) }.ok()
}

/// Sum of iov_len over `n` iovecs at `vec` (user memory), and whether `n` exceeded the limit.
fn iov_sum(vec: u64, n: u64) -> (u64, bool) {
    let mut total = 0u64;
    for i in 0..MAX_IOV as u64 {
        if i >= n {
            break;
        }
        let p = (vec + i * 16) as *const Iovec;
        // SAFETY: bpf_probe_read_user checks the address; a fault returns an error.
        match unsafe { bpf_probe_read_user(p) } {
            Ok(iov) => total += iov.len,
            Err(_) => break,
        }
    }
    (total, n > MAX_IOV as u64)
}

fn enter(ctx: &TracePointContext, call: u8, vectored: bool, write: bool) -> u32 {
    let Some(fd) = arg::<u64>(ctx, ARG0) else { return 0 };
    if traced(fd as u32).is_none() {
        return 0;
    }
    let (Some(a1), Some(a2), Some(pos)) = (arg::<u64>(ctx, ARG1), arg::<u64>(ctx, ARG2), arg::<i64>(ctx, ARG3)) else { return 0 };
    if pos < 0 {
        return 0; // preadv2/pwritev2 with offset -1 use the file position: not positional
    }
    let (length, truncated) = if vectored { iov_sum(a1, a2) } else { (a2, false) };
    let mut f = if write { flags::WRITE } else { 0 };
    if truncated {
        f |= flags::IOV_TRUNCATED;
    }
    // SAFETY: helper without preconditions.
    let ktime_ns = unsafe { bpf_ktime_get_ns() };
    let p = Pending { ktime_ns, offset: pos as u64, length, fd: fd as u32, syscall: call, flags: f, reserved: 0 };
    if PENDING.insert(&bpf_get_current_pid_tgid(), &p, 0).is_err() {
        count(COUNTER_LOST, 1);
    }
    0
}

/// Wake the recorder only when this much is waiting; otherwise it drains the
/// ring on its own schedule (every 50 ms), so a boot's thousands of reads do
/// not each wake a process that competes with QEMU for the CPUs.
const WAKEUP_BYTES: u64 = 1 << 20;

fn emit(e: &Event) {
    count(COUNTER_SEEN, 1);
    let wakeup = if EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) >= WAKEUP_BYTES { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    if EVENTS.output::<Event>(e, u64::from(wakeup)).is_err() {
        count(COUNTER_LOST, 1);
    }
}

fn exit(ctx: &TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: the entry is copied out before it is removed.
    let Some(p) = (unsafe { PENDING.get(&id) }).copied() else { return 0 };
    let _ = PENDING.remove(&id);
    let result = arg::<i64>(ctx, RET).unwrap_or(i64::MIN);
    emit(&Event {
        ktime_ns: p.ktime_ns,
        offset: p.offset,
        length: p.length,
        result,
        tid: id as u32,
        fd: p.fd,
        syscall: p.syscall,
        flags: p.flags,
        iocb_index: 0,
        reserved: 0,
    });
    0
}

macro_rules! probe_pair {
    ($enter:ident, $exit:ident, $call:expr, $vectored:expr, $write:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            enter(&ctx, $call, $vectored, $write)
        }
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            exit(&ctx)
        }
    };
}

probe_pair!(sys_enter_pread64, sys_exit_pread64, syscall::PREAD64, false, false);
probe_pair!(sys_enter_preadv, sys_exit_preadv, syscall::PREADV, true, false);
probe_pair!(sys_enter_preadv2, sys_exit_preadv2, syscall::PREADV2, true, false);
probe_pair!(sys_enter_pwrite64, sys_exit_pwrite64, syscall::PWRITE64, false, true);
probe_pair!(sys_enter_pwritev, sys_exit_pwritev, syscall::PWRITEV, true, true);
probe_pair!(sys_enter_pwritev2, sys_exit_pwritev2, syscall::PWRITEV2, true, true);

fn read_iocb<T>(iocb: u64, at: usize) -> Option<T> {
    // SAFETY: bpf_probe_read_user checks the address.
    unsafe { bpf_probe_read_user((iocb + at as u64) as *const T) }.ok()
}

/// io_submit(ctx, nr, iocbpp): one event per traced iocb at entry; the exit
/// event tells user space how many iocbs the kernel took.
#[tracepoint]
pub fn sys_enter_io_submit(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if TGID.get(0).copied() != Some(tgid) {
        return 0;
    }
    let (Some(nr), Some(iocbpp)) = (arg::<i64>(&ctx, ARG1), arg::<u64>(&ctx, ARG2)) else { return 0 };
    // SAFETY: helper without preconditions.
    let ktime_ns = unsafe { bpf_ktime_get_ns() };
    let id = bpf_get_current_pid_tgid();
    for i in 0..MAX_IOCB as i64 {
        if i >= nr {
            break;
        }
        // SAFETY: bpf_probe_read_user checks the address.
        let Ok(iocb) = (unsafe { bpf_probe_read_user((iocbpp + i as u64 * 8) as *const u64) }) else { break };
        let (Some(op), Some(fd)) = (read_iocb::<u16>(iocb, IOCB_OPCODE), read_iocb::<u32>(iocb, IOCB_FILDES)) else { continue };
        let write = match op {
            IOCB_CMD_PREAD | IOCB_CMD_PREADV => false,
            IOCB_CMD_PWRITE | IOCB_CMD_PWRITEV => true,
            _ => continue,
        };
        // SAFETY: presence test of a plain u8 value.
        if unsafe { FDS.get(&FdKey { tgid, fd }) }.is_none() {
            continue;
        }
        let (Some(buf), Some(nbytes), Some(off)) =
            (read_iocb::<u64>(iocb, IOCB_BUF), read_iocb::<u64>(iocb, IOCB_NBYTES), read_iocb::<i64>(iocb, IOCB_OFFSET))
        else {
            continue;
        };
        let (length, truncated) = if op == IOCB_CMD_PREADV || op == IOCB_CMD_PWRITEV { iov_sum(buf, nbytes) } else { (nbytes, false) };
        let f = if write { flags::WRITE } else { 0 } | if truncated { flags::IOV_TRUNCATED } else { 0 };
        emit(&Event {
            ktime_ns,
            offset: off as u64,
            length,
            result: 0,
            tid: id as u32,
            fd,
            syscall: syscall::IO_SUBMIT,
            flags: f,
            iocb_index: i as u16,
            reserved: 0,
        });
    }
    if nr > MAX_IOCB as i64 {
        count(COUNTER_LOST, (nr - MAX_IOCB as i64) as u64);
    }
    0
}

#[tracepoint]
pub fn sys_exit_io_submit(ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if TGID.get(0).copied() != Some(tgid) {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let result = arg::<i64>(&ctx, RET).unwrap_or(i64::MIN);
    emit(&Event { result, tid: id as u32, syscall: syscall::IO_SUBMIT_DONE, ..Event::default() });
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// ---- Descriptor tracking: opens, closes and duplicates of the traced process.

/// dup/dup2/dup3/fcntl(F_DUPFD*) in flight, by thread: the old descriptor and its state.
#[map]
static DUPS: HashMap<u64, FdKey> = HashMap::with_max_entries(4096, 0);

const F_DUPFD: u64 = 0;
const F_DUPFD_CLOEXEC: u64 = 1030;

fn traced_tgid() -> Option<u32> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    (TGID.get(0).copied() == Some(tgid)).then_some(tgid)
}

fn note(call: u8, fd: u32, old: u64) {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: helper without preconditions.
    let ktime_ns = unsafe { bpf_ktime_get_ns() };
    emit(&Event { ktime_ns, offset: old, tid: id as u32, fd, syscall: call, ..Event::default() });
}

fn opened(ctx: &TracePointContext) -> u32 {
    let Some(tgid) = traced_tgid() else { return 0 };
    let Some(ret) = arg::<i64>(ctx, RET) else { return 0 };
    if ret >= 0 {
        // Traced at once; user space confirms or removes it before it reads
        // any event for this descriptor.
        let _ = FDS.insert(&FdKey { tgid, fd: ret as u32 }, &bootcache_ebpf_common::fd_state::PROVISIONAL, 0);
        note(syscall::OPENED, ret as u32, 0);
    }
    0
}

#[tracepoint]
pub fn sys_exit_open(ctx: TracePointContext) -> u32 {
    opened(&ctx)
}

#[tracepoint]
pub fn sys_exit_openat(ctx: TracePointContext) -> u32 {
    opened(&ctx)
}

#[tracepoint]
pub fn sys_exit_openat2(ctx: TracePointContext) -> u32 {
    opened(&ctx)
}

#[tracepoint]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    let Some(tgid) = traced_tgid() else { return 0 };
    let Some(fd) = arg::<u64>(&ctx, ARG0) else { return 0 };
    let key = FdKey { tgid, fd: fd as u32 };
    // SAFETY: presence test of a plain u8 value.
    if unsafe { FDS.get(&key) }.is_some() {
        let _ = FDS.remove(&key);
        note(syscall::CLOSED, fd as u32, 0);
    }
    0
}

fn dup_enter(old: u64) -> u32 {
    let Some(tgid) = traced_tgid() else { return 0 };
    let key = FdKey { tgid, fd: old as u32 };
    // SAFETY: presence test of a plain u8 value.
    if unsafe { FDS.get(&key) }.is_some() {
        let _ = DUPS.insert(&bpf_get_current_pid_tgid(), &key, 0);
    }
    0
}

fn dup_exit(ctx: &TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: copied out before removal.
    let Some(old) = (unsafe { DUPS.get(&id) }).copied() else { return 0 };
    let _ = DUPS.remove(&id);
    let Some(ret) = arg::<i64>(ctx, RET) else { return 0 };
    // SAFETY: a plain u8 value.
    let Some(state) = (unsafe { FDS.get(&old) }).copied() else { return 0 };
    if ret >= 0 {
        let _ = FDS.insert(&FdKey { tgid: old.tgid, fd: ret as u32 }, &state, 0);
        note(syscall::DUPED, ret as u32, u64::from(old.fd));
    }
    0
}

#[tracepoint]
pub fn sys_enter_dup(ctx: TracePointContext) -> u32 {
    arg::<u64>(&ctx, ARG0).map_or(0, dup_enter)
}

#[tracepoint]
pub fn sys_exit_dup(ctx: TracePointContext) -> u32 {
    dup_exit(&ctx)
}

#[tracepoint]
pub fn sys_enter_dup2(ctx: TracePointContext) -> u32 {
    arg::<u64>(&ctx, ARG0).map_or(0, dup_enter)
}

#[tracepoint]
pub fn sys_exit_dup2(ctx: TracePointContext) -> u32 {
    dup_exit(&ctx)
}

#[tracepoint]
pub fn sys_enter_dup3(ctx: TracePointContext) -> u32 {
    arg::<u64>(&ctx, ARG0).map_or(0, dup_enter)
}

#[tracepoint]
pub fn sys_exit_dup3(ctx: TracePointContext) -> u32 {
    dup_exit(&ctx)
}

#[tracepoint]
pub fn sys_enter_fcntl(ctx: TracePointContext) -> u32 {
    match arg::<u64>(&ctx, ARG1) {
        Some(F_DUPFD | F_DUPFD_CLOEXEC) => arg::<u64>(&ctx, ARG0).map_or(0, dup_enter),
        _ => 0,
    }
}

#[tracepoint]
pub fn sys_exit_fcntl(ctx: TracePointContext) -> u32 {
    dup_exit(&ctx)
}
