//! The eBPF boot recorder (feature `record`): every positional read and write
//! a process makes on one image file, from syscall tracepoints.
//!
//! ```text
//!  Recorder::attach(pid, image, space) ─ load probes, TGID = pid, FDS = fds of image
//!       │                          (device + inode), attach tracepoints
//!  poll() ── ring buffer ──► Records; rescans /proc/PID/fd (reopen, dup)
//!  finish() ──► Trace (lost records counted, never hidden)
//! ```
//!
//! Needs root, or CAP_BPF with CAP_PERFMON (and CAP_DAC_READ_SEARCH to read
//! another user's `/proc/PID/fd`), and tracefs mounted.

mod fds;
mod probes;
pub mod qemu;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bootcache_ebpf_common::{Event, flags, syscall};

pub use fds::{FileId, image_fds};

use crate::file::{ImageIdentity, OffsetSpace, Trace, TraceInfo};
use crate::recorder::probes::Probes;
use crate::{Class, Op, Record};

/// Errors from recording.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Attaching a tracepoint failed.
    #[error("cannot attach tracepoint {0}")]
    Attach(String, #[source] aya::programs::ProgramError),
    /// The image cannot be stat'ed.
    #[error("cannot stat the image {path}")]
    Image {
        /// The image path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Loading the probes failed.
    #[error("cannot load the eBPF probes ({hint})")]
    Load {
        /// What probably fixes it.
        hint: &'static str,
        /// Why.
        #[source]
        source: aya::EbpfError,
    },
    /// A map operation failed.
    #[error("eBPF map {0} failed")]
    Map(&'static str, #[source] aya::maps::MapError),
    /// The process lacks capabilities the recorder needs.
    #[error("missing capabilities: {0} (run as root, or grant them, e.g. setcap cap_bpf,cap_perfmon,cap_dac_read_search+ep)")]
    MissingCapabilities(String),
    /// tracefs is not mounted.
    #[error("tracefs is not mounted at /sys/kernel/tracing (mount -t tracefs nodev /sys/kernel/tracing)")]
    NoTracefs,
    /// The traced process cannot be inspected.
    #[error("cannot list the descriptors of process {pid} (gone, or missing CAP_DAC_READ_SEARCH/CAP_SYS_PTRACE)")]
    Process {
        /// The process.
        pid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// QEMU could not be started or controlled.
    #[error("QEMU: {what}")]
    Qemu {
        /// What went wrong.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Records one process's I/O on one image.
pub struct Recorder {
    probes: Probes,
    pid: u32,
    image: FileId,
    image_size: u64,
    /// Image-file offsets for qcow2 (mapped to guest offsets later), guest offsets for raw.
    space: OffsetSpace,
    fds: BTreeSet<u32>,
    start_ns: u64,
    records: Vec<Record>,
    /// io_submit iocbs waiting for their call's return value, by thread.
    aio: HashMap<u32, Vec<Event>>,
    /// When `/proc/PID/fd` was last compared with the filter.
    last_rescan: std::time::Instant,
}

/// How often the descriptor filter is checked against `/proc/PID/fd`.
const RESCAN_EVERY: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("pid", &self.pid).field("fds", &self.fds).field("records", &self.records.len()).finish()
    }
}

/// The capabilities the recorder needs that this process does not have.
fn missing_capabilities() -> Vec<&'static str> {
    const NEEDED: [(u32, &str); 3] = [(39, "CAP_BPF"), (38, "CAP_PERFMON"), (2, "CAP_DAC_READ_SEARCH")];
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).and_then(|v| u64::from_str_radix(v.trim(), 16).ok()).unwrap_or(0);
    NEEDED.iter().filter(|(bit, _)| eff & (1 << bit) == 0).map(|(_, name)| *name).collect()
}

/// CLOCK_MONOTONIC in ns: the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

impl Recorder {
    /// Starts recording process `pid`'s reads and writes of `image`, whose
    /// file offsets are in `space` (the caller knows the image's format).
    ///
    /// # Errors
    /// Missing privileges or tracefs, an image that cannot be stat'ed, a
    /// process that cannot be inspected.
    pub fn attach(pid: u32, image: &Path, space: OffsetSpace) -> Result<Recorder, RecordError> {
        let missing = missing_capabilities();
        if !missing.is_empty() {
            return Err(RecordError::MissingCapabilities(missing.join(", ")));
        }
        if !Path::new("/sys/kernel/tracing/events/syscalls").is_dir() {
            return Err(RecordError::NoTracefs);
        }
        let meta = std::fs::metadata(image).map_err(|source| RecordError::Image { path: image.to_path_buf(), source })?;
        let id = FileId::of(image).map_err(|source| RecordError::Image { path: image.to_path_buf(), source })?;
        let start_ns = monotonic_ns();
        let mut probes = Probes::load(pid)?;
        probes.attach_all()?;
        let mut rec = Recorder {
            probes,
            pid,
            image: id,
            image_size: meta.len(),
            space,
            fds: BTreeSet::new(),
            start_ns,
            records: Vec::new(),
            aio: HashMap::new(),
            last_rescan: std::time::Instant::now(),
        };
        rec.rescan_fds()?;
        Ok(rec)
    }

    /// Brings the kernel's descriptor filter up to date with `/proc/PID/fd`
    /// (the image reopened, a descriptor duplicated or closed).
    ///
    /// # Errors
    /// When the process cannot be inspected or the map update fails.
    pub fn rescan_fds(&mut self) -> Result<(), RecordError> {
        self.last_rescan = std::time::Instant::now();
        let now = image_fds(self.pid, self.image).map_err(|source| RecordError::Process { pid: self.pid, source })?;
        for fd in now.difference(&self.fds) {
            self.probes.add_fd(self.pid, *fd)?;
            tracing::debug!(fd, "tracing descriptor");
        }
        for fd in self.fds.difference(&now) {
            self.probes.remove_fd(self.pid, *fd)?;
        }
        self.fds = now;
        Ok(())
    }

    /// A descriptor the process just opened, traced provisionally by the
    /// kernel: keep it if it is the image, drop it otherwise. Its read events
    /// come after this one in the ring, so none is judged before the verdict.
    fn check_opened(&mut self, fd: u32) {
        let is_image = FileId::of(Path::new(&format!("/proc/{}/fd/{fd}", self.pid))).is_ok_and(|id| id == self.image);
        let result = if is_image {
            self.fds.insert(fd);
            self.probes.add_fd(self.pid, fd)
        } else {
            self.fds.remove(&fd);
            self.probes.remove_fd(self.pid, fd)
        };
        if let Err(e) = result {
            let cause = std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default();
            tracing::warn!(fd, error = %e, %cause, "cannot update the descriptor filter");
        }
    }

    /// Makes "now" time zero of the trace (e.g. when the guest starts running).
    pub fn restart_clock(&mut self) {
        self.start_ns = monotonic_ns();
    }

    /// The descriptors currently traced.
    pub fn fds(&self) -> &BTreeSet<u32> {
        &self.fds
    }

    /// Waits up to `timeout` for events and takes them in. Returns how many
    /// records were added.
    ///
    /// # Errors
    /// When the descriptor rescan fails while the process still exists.
    pub fn poll(&mut self, timeout: Duration) -> Result<usize, RecordError> {
        self.probes.wait(timeout);
        let before = self.records.len();
        for e in self.probes.drain() {
            self.take(&e);
        }
        // Opens and duplicates are followed as they happen; the /proc rescan
        // is a safety net (e.g. descriptors passed over a socket), so once a
        // second is enough and keeps the recorder off QEMU's CPUs.
        if self.last_rescan.elapsed() >= RESCAN_EVERY && Path::new(&format!("/proc/{}", self.pid)).exists() {
            self.rescan_fds()?;
        }
        Ok(self.records.len() - before)
    }

    fn take(&mut self, e: &Event) {
        match e.syscall {
            syscall::OPENED => self.check_opened(e.fd),
            syscall::CLOSED => {
                self.fds.remove(&e.fd);
            }
            syscall::DUPED => {
                // The kernel copied the old descriptor's state; follow it.
                if self.fds.contains(&u32::try_from(e.offset).unwrap_or(u32::MAX)) {
                    self.fds.insert(e.fd);
                }
            }
            syscall::IO_SUBMIT if self.fds.contains(&e.fd) => self.aio.entry(e.tid).or_default().push(*e),
            syscall::IO_SUBMIT => {}
            syscall::IO_SUBMIT_DONE => {
                let taken = self.aio.remove(&e.tid).unwrap_or_default();
                for mut iocb in taken.into_iter().filter(|i| i64::from(i.iocb_index) < e.result) {
                    // Completions are reaped from the shared ring, not by a
                    // syscall: a read of a regular file returns up to its end.
                    iocb.result = i64::try_from(iocb.length.min(self.image_size.saturating_sub(iocb.offset))).unwrap_or(i64::MAX);
                    self.push(&iocb);
                }
            }
            _ if !self.fds.contains(&e.fd) => {} // not (or no longer) the image
            _ => self.push(e),
        }
    }

    fn push(&mut self, e: &Event) {
        let mut length = e.length;
        if e.flags & flags::IOV_TRUNCATED != 0 {
            length = length.max(u64::try_from(e.result).unwrap_or(0));
        }
        self.records.push(Record {
            t_ns: e.ktime_ns.saturating_sub(self.start_ns),
            offset: e.offset,
            length,
            result: e.result,
            op: if e.flags & flags::WRITE != 0 { Op::Write } else { Op::Read },
            tid: e.tid,
            class: Class::Data,
            source: e.syscall,
        });
    }

    /// Records taken in so far.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Records the probes could not deliver.
    pub fn lost(&self) -> u64 {
        self.probes.lost()
    }

    /// Stops recording and returns the trace.
    pub fn finish(mut self, info: TraceInfo) -> Trace {
        for e in self.probes.drain() {
            self.take(&e);
        }
        let lost = self.lost();
        if lost > 0 {
            tracing::error!(lost, "the recorder lost records: the trace is incomplete");
        }
        let mut records = std::mem::take(&mut self.records);
        records.sort_by_key(|r| r.t_ns);
        Trace { image: ImageIdentity { size: self.image_size, digest: None }, space: self.space, lost_records: lost, info, records }
    }
}
