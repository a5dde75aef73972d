//! Loading the eBPF object, attaching its tracepoints, and its maps.

use std::os::fd::AsFd;
use std::time::Duration;

use aya::maps::{Array, HashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::TracePoint;
use aya::{Ebpf, include_bytes_aligned};
use bootcache_ebpf_common::{COUNTER_LOST, Event, FdKey, fd_state};

use super::RecordError;

/// The probes' ELF object, built by build.rs.
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bootcache-probes"));

/// Every tracepoint the object has a program for.
const TRACEPOINTS: &[&str] = &[
    "sys_enter_pread64",
    "sys_exit_pread64",
    "sys_enter_preadv",
    "sys_exit_preadv",
    "sys_enter_preadv2",
    "sys_exit_preadv2",
    "sys_enter_pwrite64",
    "sys_exit_pwrite64",
    "sys_enter_pwritev",
    "sys_exit_pwritev",
    "sys_enter_pwritev2",
    "sys_exit_pwritev2",
    "sys_enter_io_submit",
    "sys_exit_io_submit",
    "sys_exit_open",
    "sys_exit_openat",
    "sys_exit_openat2",
    "sys_enter_close",
    "sys_enter_dup",
    "sys_exit_dup",
    "sys_enter_dup2",
    "sys_exit_dup2",
    "sys_enter_dup3",
    "sys_exit_dup3",
    "sys_enter_fcntl",
    "sys_exit_fcntl",
];

pub(super) struct Probes {
    ebpf: Ebpf,
    /// Held so the map outlives loading: programs refer to it by descriptor.
    _tgid: Array<MapData, u32>,
    ring: RingBuf<MapData>,
    fds: HashMap<MapData, FdKey, u8>,
    counters: PerCpuArray<MapData, u64>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, RecordError> {
    let map = ebpf.take_map(name).ok_or(RecordError::Map(name, aya::maps::MapError::InvalidName { name: name.into() }))?;
    T::try_from(map).map_err(|e| RecordError::Map(name, e))
}

impl Probes {
    pub(super) fn load(pid: u32) -> Result<Probes, RecordError> {
        let mut ebpf = Ebpf::load(OBJECT).map_err(|source| {
            let hint = if matches!(&source, aya::EbpfError::MapError(_) | aya::EbpfError::ProgramError(_))
                || source.to_string().contains("Operation not permitted")
            {
                "needs root, or CAP_BPF and CAP_PERFMON"
            } else {
                "the kernel refused the object"
            };
            RecordError::Load { hint, source }
        })?;
        let mut tgid: Array<MapData, u32> = take(&mut ebpf, "TGID")?;
        tgid.set(0, pid, 0).map_err(|e| RecordError::Map("TGID", e))?;
        let ring = take(&mut ebpf, "EVENTS")?;
        let fds = take(&mut ebpf, "FDS")?;
        let counters = take(&mut ebpf, "COUNTERS")?;
        Ok(Probes { ebpf, _tgid: tgid, ring, fds, counters })
    }

    pub(super) fn attach_all(&mut self) -> Result<(), RecordError> {
        for &name in TRACEPOINTS {
            let prog: &mut TracePoint = self
                .ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or_else(|| RecordError::Attach(name.into(), aya::programs::ProgramError::UnexpectedProgramType))?;
            prog.load().map_err(|e| RecordError::Attach(name.into(), e))?;
            prog.attach("syscalls", name).map_err(|e| RecordError::Attach(name.into(), e))?;
        }
        Ok(())
    }

    pub(super) fn add_fd(&mut self, tgid: u32, fd: u32) -> Result<(), RecordError> {
        self.fds.insert(FdKey { tgid, fd }, fd_state::IMAGE, 0).map_err(|e| RecordError::Map("FDS", e))
    }

    pub(super) fn remove_fd(&mut self, tgid: u32, fd: u32) -> Result<(), RecordError> {
        match self.fds.remove(&FdKey { tgid, fd }) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            // Already gone (the kernel side drops a descriptor on close):
            // aya reports a missing key of a hash map as the syscall's ENOENT.
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(rustix::io::Errno::NOENT.raw_os_error()) => {
                Ok(())
            }
            Err(e) => Err(RecordError::Map("FDS", e)),
        }
    }

    /// Waits until the ring buffer has data or `timeout` passes.
    pub(super) fn wait(&self, timeout: Duration) {
        let fd = self.ring.as_fd();
        let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
        let ts = rustix::time::Timespec { tv_sec: timeout.as_secs() as i64, tv_nsec: i64::from(timeout.subsec_nanos()) };
        let _ = rustix::event::poll(&mut fds, Some(&ts));
    }

    /// Takes every event now in the ring buffer.
    pub(super) fn drain(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<Event>() {
                // SAFETY: the probes write whole `Event`s; read_unaligned copes with any alignment.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
            }
        }
        out
    }

    /// Records lost in the kernel, summed over CPUs.
    pub(super) fn lost(&self) -> u64 {
        self.counters.get(&COUNTER_LOST, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }
}
