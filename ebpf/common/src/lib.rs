//! The layout shared by the eBPF probes (kernel side) and the recorder (user
//! side): events in the ring buffer, and the keys of the filter maps.
//!
//! ```text
//!  QEMU thread ── pread64/preadv/preadv2/pwrite*/io_submit ──► tracepoints
//!      enter: filter (tgid, fd) in FDS ─► PENDING[thread] = offset, length
//!      exit:  PENDING[thread] + return value ─► EVENTS (ring buffer) ─► recorder
//! ```
//!
//! Records are native-endian `#[repr(C)]`; the recorder converts them to the
//! little-endian trace file.
#![no_std]
#![deny(missing_docs)]

/// The syscall that carried a request.
pub mod syscall {
    /// `pread64`.
    pub const PREAD64: u8 = 1;
    /// `preadv`.
    pub const PREADV: u8 = 2;
    /// `preadv2`.
    pub const PREADV2: u8 = 3;
    /// `pwrite64`.
    pub const PWRITE64: u8 = 4;
    /// `pwritev`.
    pub const PWRITEV: u8 = 5;
    /// `pwritev2`.
    pub const PWRITEV2: u8 = 6;
    /// One iocb of `io_submit` (IOCB_CMD_PREAD/PREADV/PWRITE/PWRITEV).
    pub const IO_SUBMIT: u8 = 7;
    /// The end of an `io_submit` call: `result` is how many iocbs it took.
    pub const IO_SUBMIT_DONE: u8 = 8;
    /// The traced process opened a file: `fd`, added provisionally to `FDS`.
    pub const OPENED: u8 = 9;
    /// The traced process closed `fd` (removed from `FDS`).
    pub const CLOSED: u8 = 10;
    /// The traced process duplicated a traced descriptor `offset` into `fd`.
    pub const DUPED: u8 = 11;
}

/// Values in the `FDS` map.
pub mod fd_state {
    /// Verified by user space to refer to the image.
    pub const IMAGE: u8 = 1;
    /// Just opened; user space has not checked it yet.
    pub const PROVISIONAL: u8 = 2;
}

/// Event flags.
pub mod flags {
    /// A write (otherwise a read).
    pub const WRITE: u8 = 1;
    /// The request had more iovecs than the probe sums: `length` is a lower bound.
    pub const IOV_TRUNCATED: u8 = 2;
}

/// Most iovecs summed for one request.
pub const MAX_IOV: u32 = 128;
/// Most iocbs read from one `io_submit` call; more are counted as lost.
pub const MAX_IOCB: u32 = 32;

/// One request, as the probes deliver it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// `bpf_ktime_get_ns` at syscall entry.
    pub ktime_ns: u64,
    /// File offset.
    pub offset: u64,
    /// Bytes requested.
    pub length: u64,
    /// Return value (bytes or -errno); for io_submit iocbs, 0 (reaped elsewhere).
    pub result: i64,
    /// Thread id.
    pub tid: u32,
    /// File descriptor.
    pub fd: u32,
    /// [`syscall`] code.
    pub syscall: u8,
    /// [`flags`] bits.
    pub flags: u8,
    /// Position of the iocb within its io_submit call.
    pub iocb_index: u16,
    /// Zero.
    pub reserved: u32,
}

const _: () = assert!(core::mem::size_of::<Event>() == 48);

/// A request between syscall entry and exit, per thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Pending {
    /// Entry time.
    pub ktime_ns: u64,
    /// File offset.
    pub offset: u64,
    /// Bytes requested.
    pub length: u64,
    /// File descriptor.
    pub fd: u32,
    /// [`syscall`] code.
    pub syscall: u8,
    /// [`flags`] bits.
    pub flags: u8,
    /// Zero.
    pub reserved: u16,
}

/// Key of the fd filter: a process and one of its descriptors that refer to the image.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FdKey {
    /// Process (thread group) id.
    pub tgid: u32,
    /// File descriptor.
    pub fd: u32,
}

/// Index of the lost-records counter in the `COUNTERS` per-CPU array.
pub const COUNTER_LOST: u32 = 0;
/// Index of the "events seen" counter.
pub const COUNTER_SEEN: u32 = 1;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] structs of integers, no padding (sizes asserted), any bit pattern valid.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above; 32 bytes, no implicit padding.
    unsafe impl aya::Pod for super::Pending {}
    // SAFETY: as above; two u32.
    unsafe impl aya::Pod for super::FdKey {}
}
