//! The node cache of one image: a sparse local file of the guest disk and a
//! persistent presence map, filled from the store boot segment first.
//!
//! ```text
//!   guest read ──► present? ──yes──► local file
//!                     │ no
//!                     ▼
//!   demand fetch (at once, coalesced, whole extents) ─┐
//!   boot segment stream (first-access order) ─────────┼─► verify digest ─► write ─► present
//!   background stream (rest, rate-limited or off) ────┘                               │
//!                                              fdatasync, then journal record ◄────────┘
//! ```
//!
//! One cache per image root digest on a node, shared by every VM that uses
//! the image; VMs keep their writes in their own overlays and the cache is
//! never written by them. A byte is served only from an extent whose stored
//! bytes matched their BLAKE3 digest.

mod error;
mod fetch;
mod layers;
mod local;
pub(crate) mod open;
mod peer;
pub mod presence;
mod sources;

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bootcache_format::{Encoding, Header, Index};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

pub use error::{FetchFailure, ReadError};
pub use layers::LayeredDisk;
pub(crate) use layers::{follow, roots};
pub use peer::OPENING_WAIT;

/// The checked header of the container at `url` (one small range request;
/// what a control node registers an image by).
///
/// # Errors
/// The store is unreachable, or the file is not a bootcache container.
pub async fn read_header(url: &str, retry: RetryPolicy) -> Result<Header, CacheError> {
    read_header_with(url, retry, None).await
}

/// Like [`read_header`], asking `auth` for the credential (a registry's blob).
///
/// # Errors
/// As [`read_header`]; a refusal the authorizer cannot answer.
pub async fn read_header_with(
    url: &str,
    retry: RetryPolicy,
    auth: Option<Arc<dyn crate::remote::Authorizer>>,
) -> Result<Header, CacheError> {
    let remote = match auth {
        Some(a) => Remote::open_authorized(url, retry, a).await?,
        None => Remote::open(url, retry).await?,
    };
    Ok(open::head(&remote).await?.1)
}

/// The checked headers of the image at `url` and of its parents, the
/// image first (one for an image that stands alone): what a control node
/// knows a family by. Parents are found and checked as a node finds them.
///
/// # Errors
/// As [`read_header`]; a parent missing, not the image its child names, or
/// a chain that does not fit.
pub async fn read_chain(
    url: &str,
    retry: RetryPolicy,
    auth: Option<Arc<dyn crate::remote::Authorizer>>,
) -> Result<Vec<Header>, CacheError> {
    let remote = match auth {
        Some(a) => Remote::open_authorized(url, retry, a).await?,
        None => Remote::open(url, retry).await?,
    };
    let (head, header) = open::head(&remote).await?;
    if header.parent.is_none() {
        return Ok(vec![header]);
    }
    let (found, _) = layers::follow(remote, head, &header, retry, DEFAULT_MAX_INDEX_BYTES).await?;
    Ok(found.iter().map(|f| f.image.header().clone()).collect())
}

use crate::metrics::{Metrics, Snapshot};
use crate::remote::{Remote, RemoteError, RetryPolicy};

/// Errors opening a cache.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A layer's chain does not fit together: its parent is not where or
    /// what it names, or the chain is too deep.
    #[error("{url}: {why}")]
    BadChain {
        /// The layer (or parent) at fault.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// The container on the store is not a valid bootcache image.
    #[error("{url} is not a usable bootcache image")]
    Image {
        /// Where.
        url: String,
        /// Why.
        #[source]
        source: bootcache_format::Error,
    },
    /// A local file could not be used.
    #[error("cache file {path}")]
    Local {
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The URL does not point at a bootcache container.
    #[error("{url} is not a bootcache container (it does not start with the bootcache magic)")]
    NotAContainer {
        /// Where.
        url: String,
    },
    /// A layer's parent could not be opened.
    #[error("{url}: its parent {parent}")]
    Parent {
        /// The layer.
        url: String,
        /// Where its parent was looked for.
        parent: String,
        /// Why it could not be opened.
        #[source]
        source: Box<CacheError>,
    },
    /// The store failed.
    #[error(transparent)]
    Remote(#[from] RemoteError),
    /// A part of the image is larger than this node accepts.
    #[error("{url}: its {what} of {bytes} bytes is larger than this node accepts ({limit})")]
    TooLarge {
        /// Where.
        url: String,
        /// Which part.
        what: &'static str,
        /// Its size as claimed.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
}

/// What to do once the boot segment is cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Background {
    /// Fetch nothing more than the guests ask for.
    Off,
    /// Stream the rest as fast as the link allows.
    Unlimited,
    /// Stream the rest at most this many bytes per second.
    Rate(u64),
}

/// What to fetch ahead of the guests' reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prefetch {
    /// The boot segment, as one stream in its first-access order.
    BootSegment,
    /// Nothing: guest misses only (and the background stream, if on).
    Off,
    /// The extents holding these guest ranges, in this order, each run as it
    /// lies in the container: what a trace-replay prefetcher does on an
    /// image that was not reordered (kept for comparison).
    Ranges(Vec<Range<u64>>),
}

/// The largest index a cache takes by default ([`CacheOptions::max_index_bytes`]).
pub const DEFAULT_MAX_INDEX_BYTES: u64 = 64 << 20;

/// Settings of a cache.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// The node's cache directory; this image's files go in
    /// `DIR/<root digest>/`.
    pub dir: PathBuf,
    /// What to fetch before the guests ask.
    pub prefetch: Prefetch,
    /// Background streaming after the prefetch.
    pub background: Background,
    /// When the background stream may start, counted from opening the
    /// cache (and never before the prefetch is done). `None`: when the
    /// image's recorded boot would be over (its metadata's `boot_seconds`),
    /// and then once guests have not read for a moment (or a minute has
    /// passed), so that the rest does not compete with booting guests for
    /// the link and the node's CPU; at once for an image without it.
    pub background_after: Option<Duration>,
    /// A guest read waiting for the store fails after this long.
    pub read_timeout: Duration,
    /// Retries of store requests.
    pub retry: RetryPolicy,
    /// Demand fetches in flight at once.
    pub demand_parallel: usize,
    /// Other nodes to fetch extents from before the store (base URLs of
    /// their node APIs, e.g. `http://10.0.0.2:7000`); every byte from a peer
    /// is verified against the store's index like the store's own.
    pub peers: Vec<String>,
    /// What this node sends peers as its credential (an `Authorization`
    /// header value), if they require one.
    pub peer_authorization: Option<String>,
    /// The largest index (64 bytes per extent) an image may have: it is
    /// held in memory, so a claim above this is refused before anything is
    /// fetched. The default, 64 MiB, is a million extents (a 256 GiB disk
    /// in 256 KiB extents).
    pub max_index_bytes: u64,
}

impl CacheOptions {
    /// Defaults for a cache under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        CacheOptions {
            dir: dir.into(),
            prefetch: Prefetch::BootSegment,
            background: Background::Unlimited,
            background_after: None,
            read_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
            demand_parallel: 8,
            peers: Vec::new(),
            peer_authorization: None,
            max_index_bytes: DEFAULT_MAX_INDEX_BYTES,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Absent,
    Fetching,
    Present,
    /// The store's bytes failed their digest (kept apart from Absent so a
    /// waiting read can tell the guest why).
    Bad,
}

/// Why an extent is fetched (for the metrics, and whether its extents
/// were claimed before the request: a guest's or a peer's miss).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Boot,
    /// A guest read missed.
    Demand,
    /// A peer asked for extents this cache neither held nor was fetching.
    ForPeer,
    Background,
}

impl Source {
    /// Fetched at once for a waiting reader, its extents claimed up front.
    fn is_miss(self) -> bool {
        matches!(self, Source::Demand | Source::ForPeer)
    }
}

struct Inner {
    remote: Remote,
    /// When the cache was opened, and the last guest read since then (ns).
    opened: Instant,
    /// How long after opening the background stream may start, and whether
    /// it then waits for quiet guests (images with a recorded boot, no
    /// explicit start).
    background_delay: Duration,
    background_waits_for_quiet: bool,
    last_read_ns: std::sync::atomic::AtomicU64,
    header: Header,
    index: Index,
    /// The guest disk: decoded bytes of present extents at guest offsets.
    data: File,
    /// Stored bytes of present compressed extents at their container
    /// offsets, kept to serve peers byte for byte (raw extents' stored
    /// bytes are in `data`).
    stored: File,
    /// Positions of extents with stored bytes, in container order.
    by_stored: Vec<usize>,
    /// Extents the prefetch fetches (its own, or a chain's boot stream
    /// over this layer): a relay waits for those of the boot stream's
    /// current run rather than fetch them again.
    prefetched: Vec<AtomicBool>,
    /// Where bytes come from: the peers, then the store.
    sources: sources::Sources,
    state: Mutex<Vec<State>>,
    changed: Notify,
    /// Misses to fetch at once: extents (claimed) and whose miss it is.
    demand: mpsc::UnboundedSender<(Vec<usize>, Source)>,
    durable: mpsc::UnboundedSender<u32>,
    metrics: Metrics,
    /// Demand fetches in flight; streams yield the link while non-zero.
    demand_in_flight: std::sync::atomic::AtomicUsize,
    /// Where the boot stream goes on; guest misses ahead of it move it.
    aim: fetch::Aim,
    /// Streams over this cache (its own, and the boot streams of chains
    /// over it: several roles booting over one base) take turns run by
    /// run, each choosing its run when its turn comes, so no two streams
    /// receive the same extents.
    stream_turn: tokio::sync::Mutex<()>,
    last_error: Mutex<Option<FetchFailure>>,
    /// Set by [`NodeCache::stop`]: nothing more is fetched.
    stopped: std::sync::atomic::AtomicBool,
    opts: CacheOptions,
}

/// An open node cache. Cheap to share behind an `Arc`; dropping it stops
/// its fetches (what is verified and journaled stays).
pub struct NodeCache {
    inner: Arc<Inner>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for NodeCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCache").field("url", &self.inner.remote.shown()).finish_non_exhaustive()
    }
}

impl NodeCache {
    /// Opens the cache of the image at `url`: fetches and checks its header,
    /// index and metadata, reopens what an earlier run left (verified
    /// extents only), and starts fetching the boot segment.
    ///
    /// # Errors
    /// The store is unreachable, the image is invalid, or the cache
    /// directory is unusable.
    pub async fn open(url: &str, opts: CacheOptions) -> Result<NodeCache, CacheError> {
        open::open(url, opts).await
    }

    /// Size of the guest disk.
    pub fn virtual_size(&self) -> u64 {
        self.inner.header.virtual_size
    }

    /// The image's root digest.
    pub fn root_digest(&self) -> bootcache_format::RootDigest {
        self.inner.header.root()
    }

    /// The counters now.
    pub fn metrics(&self) -> Snapshot {
        let state = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        let present = state.iter().filter(|s| **s == State::Present).count() as u64;
        self.inner.metrics.snapshot(present, state.len() as u64)
    }

    /// Whether every extent is present.
    pub fn complete(&self) -> bool {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner()).iter().all(|s| *s == State::Present)
    }

    /// Ranges within `range` that read as zeros without any data: zero
    /// extents and ranges no extent covers (runs of at least 4 KiB, sorted).
    pub fn zero_ranges(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let mapped = self.inner.index.overlapping(range.clone()).iter().map(|e| (e.guest.clone(), e.encoding == Encoding::Zero));
        zero_ranges(range, mapped)
    }

    /// Reads `len` guest bytes at `offset`, fetching what is missing first.
    ///
    /// # Errors
    /// See [`ReadError`]: past the end of the disk, an extent that failed
    /// its digest, the store away longer than the read timeout (naming the
    /// guest offset and the last fetch failure), a closed image.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ReadError> {
        let mut buf = vec![0u8; len as usize];
        self.read_into(offset, &mut buf).await?;
        Ok(buf)
    }

    /// Fills `buf` with the guest bytes at `offset`, fetching what is
    /// missing first (the allocation-free form of [`NodeCache::read`]).
    ///
    /// # Errors
    /// As [`NodeCache::read`].
    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        let inner = &self.inner;
        let len = u32::try_from(buf.len()).map_err(|_| ReadError::OutOfRange {
            offset,
            len: buf.len() as u64,
            size: inner.header.virtual_size,
        })?;
        let result = inner.read(offset, buf).await;
        Metrics::add(&inner.metrics.guest_reads, 1);
        let now = u64::try_from(inner.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        inner.last_read_ns.store(now, Ordering::Relaxed);
        match &result {
            Ok(()) => Metrics::add(&inner.metrics.guest_read_bytes, u64::from(len)),
            Err(e) => {
                Metrics::add(&inner.metrics.read_errors, 1);
                tracing::error!(offset, len, error = %e, "guest read failed");
            }
        }
        result
    }
}

impl NodeCache {
    /// Waits until every extent the prefetch fetches (the boot segment) is
    /// present, at most `timeout`; whether it is. A stopped cache stops
    /// the wait.
    pub async fn wait_prefetched(&self, timeout: Duration) -> bool {
        let inner = &self.inner;
        let wait = async {
            loop {
                let notified = inner.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                {
                    let state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
                    if state.iter().zip(&inner.prefetched).all(|(s, p)| !p.load(Ordering::Relaxed) || *s == State::Present) {
                        return true;
                    }
                }
                if inner.stopped.load(Ordering::SeqCst) {
                    return false;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// Fetches the extents at `positions` of this image's index as its boot
    /// stream does, in that order (what is here or on its way is not
    /// fetched again): a chain's one boot stream across its layers' caches
    /// (which marks them first, [`NodeCache::mark_prefetched`]).
    pub(crate) async fn stream_in_order(&self, positions: Vec<usize>) {
        fetch::stream_positions(&self.inner, positions).await;
    }

    /// Whether this cache streams its own boot segment (it was not opened
    /// as a layer of a chain whose boot stream fetches for it).
    pub(crate) fn streams_its_boot(&self) -> bool {
        self.inner.opts.prefetch == Prefetch::BootSegment
    }

    /// The positions of this image's boot extents that store bytes, in
    /// boot-segment (first-access) order.
    pub(crate) fn boot_positions(&self) -> Vec<usize> {
        let index = &self.inner.index;
        self.positions(index.boot_order().map(|e| e.guest.start))
    }

    /// Counts the extents at `positions` among what the prefetch fetches.
    pub(crate) fn mark_prefetched(&self, positions: &[usize]) {
        for &p in positions {
            if let Some(flag) = self.inner.prefetched.get(p) {
                flag.store(true, Ordering::Relaxed);
            }
        }
        self.inner.changed.notify_waiters();
    }

    /// The positions in this image's index of the extents starting at
    /// `guest_offsets` that store bytes (others are skipped).
    pub(crate) fn positions(&self, guest_offsets: impl IntoIterator<Item = u64>) -> Vec<usize> {
        let index = &self.inner.index;
        let entries = index.entries();
        guest_offsets.into_iter().map(|g| index.position(g)).filter(|&p| entries.get(p).is_some_and(|e| e.stored_len() > 0)).collect()
    }

    /// Stops fetching (the image was closed on this node while a client may
    /// still hold it): cached bytes stay readable, a read that needs more
    /// fails at once, and nothing streams any more.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        for t in &self.tasks {
            t.abort();
        }
        self.inner.changed.notify_waiters();
    }
}

impl Drop for NodeCache {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The ranges within `range` that read as zeros, given the `mapped` ranges
/// over it (sorted; `true`: a zero extent) and that what nothing maps is
/// zeros: runs of at least 4 KiB, sorted.
fn zero_ranges(range: Range<u64>, mapped: impl Iterator<Item = (Range<u64>, bool)>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut push = |r: Range<u64>| match out.last_mut() {
        Some(last) if last.end == r.start => last.end = r.end,
        _ if r.start < r.end => out.push(r),
        _ => {}
    };
    let mut pos = range.start;
    for (r, zero) in mapped {
        push(pos..r.start.max(pos));
        if zero {
            push(r.start.max(range.start)..r.end.min(range.end));
        }
        pos = r.end.max(pos);
    }
    push(pos.min(range.end)..range.end);
    out.retain(|r| r.end - r.start >= 4096);
    out
}

/// Writes a verified extent into a cache's files: its guest bytes into
/// `data`, and a compressed extent's stored bytes into `stored` at their
/// container offsets (a raw extent's stored bytes are its guest bytes).
fn write_extent(data: &File, stored: &File, entry: &bootcache_format::Entry, stored_bytes: &[u8], guest: &[u8]) -> io::Result<()> {
    if entry.encoding != Encoding::Raw {
        stored.write_all_at(stored_bytes, entry.stored.start)?;
    }
    data.write_all_at(guest, entry.guest.start)
}

impl Inner {
    async fn read(self: &Arc<Self>, offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        let len = buf.len() as u64;
        let size = self.header.virtual_size;
        let end = offset.checked_add(len).filter(|&e| e <= size).ok_or(ReadError::OutOfRange { offset, len, size })?;
        let first = self.index.position(offset);
        let wanted: Vec<usize> = (first..first + self.index.overlapping(offset..end).len())
            .filter(|&i| self.index.entries()[i].encoding != Encoding::Zero)
            .collect();
        let mut waited: Option<Instant> = None;
        let mut asked = Vec::new();
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut claim = Vec::new();
            {
                let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                for &i in &wanted {
                    match state[i] {
                        State::Present | State::Fetching => {}
                        State::Bad if asked.contains(&i) => {
                            return Err(ReadError::BadExtent { guest: self.index.entries()[i].guest.start });
                        }
                        State::Absent | State::Bad => {
                            state[i] = State::Fetching;
                            claim.push(i);
                        }
                    }
                }
                if wanted.iter().all(|&i| state[i] == State::Present) {
                    break;
                }
            }
            if self.stopped.load(Ordering::SeqCst) {
                return Err(ReadError::Closed { offset });
            }
            asked.extend_from_slice(&claim);
            if !claim.is_empty() {
                let _ = self.demand.send((claim, Source::Demand));
            }
            let started = *waited.get_or_insert_with(|| {
                Metrics::add(&self.metrics.misses, 1);
                Instant::now()
            });
            let left = self.opts.read_timeout.saturating_sub(started.elapsed());
            if tokio::time::timeout(left, notified).await.is_err() {
                self.note_wait(started);
                let last = self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone();
                return Err(ReadError::TimedOut { offset, waited: self.opts.read_timeout, last });
            }
        }
        match waited {
            Some(started) => self.note_wait(started),
            None => Metrics::add(&self.metrics.hits, 1),
        }
        self.read_local(offset, buf).await.map_err(ReadError::Local)
    }

    /// Reads present bytes from the local file: straight from the page cache
    /// when they are there (`RWF_NOWAIT`, no thread hop), otherwise on the
    /// blocking pool so that a slow disk does not stall other guests.
    async fn read_local(self: &Arc<Self>, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let mut iov = [io::IoSliceMut::new(&mut buf[done..])];
            match rustix::io::preadv2(&self.data, &mut iov, offset + done as u64, rustix::io::ReadWriteFlags::NOWAIT) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::OPNOTSUPP) => break,
                Err(e) => return Err(e.into()),
            }
        }
        if done < buf.len() {
            let (me, at, want) = (Arc::clone(self), offset + done as u64, buf.len() - done);
            let rest = tokio::task::spawn_blocking(move || {
                let mut tmp = vec![0u8; want];
                me.data.read_exact_at(&mut tmp, at).map(|()| tmp)
            })
            .await
            .map_err(io::Error::other)??;
            buf[done..].copy_from_slice(&rest);
        }
        Ok(())
    }

    fn note_wait(&self, started: Instant) {
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.metrics.miss_wait_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn set_error(&self, why: FetchFailure) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }
}
