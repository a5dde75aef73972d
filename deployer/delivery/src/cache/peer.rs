//! Caches helping each other: a node serves the stored bytes of its
//! extents to other nodes, and fetches from such peers before the store.
//!
//! A peer answers `Range` requests on the container's own byte offsets, so
//! the fetching node verifies what it gets against the same index digests as
//! the store's bytes: a peer is trusted with nothing. A peer that fails is
//! left alone for a while, and one whose bytes fail their digest for good.
//!
//! A node relays: asked with `Prefer: wait=N` (as fetching nodes always
//! ask), it answers for extents it holds at once, for extents on their way
//! here (being fetched, or in the run its boot stream has asked for) as
//! each is verified, and fetches the others now, as its own guest's miss
//! would, passing them on as they arrive. So nodes that boot the same
//! image take the store's bytes from each other, and the store sends each
//! extent once for all of them, misses and background included. A relay
//! that stalls for `N` seconds ends its answer early and is paused like a
//! failed peer. Without `Prefer`, a node answers only for what it holds
//! (404 otherwise). Relays should form a chain or a tree (a node asks
//! nodes that do not ask it back), or two nodes may wait for each other
//! until that timeout.

use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use bootcache_format::{Encoding, RootDigest};
use bytes::Bytes;
use futures_util::Stream;

use super::{Inner, NodeCache, Source, State};
use crate::metrics::Metrics;
use crate::remote::{Remote, RetryPolicy};

/// Largest range a peer serves in one response (fetchers ask for at most
/// 16 MiB).
pub const MAX_PEER_RANGE: u64 = 64 << 20;

/// How long a peer that failed is not asked.
const PAUSE: Duration = Duration::from_secs(5);

/// How long a fetching boot stream lets a relaying peer go without sending
/// (its `Prefer: wait` and the peer connection's read timeout).
pub(super) const RELAY_WAIT: Duration = Duration::from_secs(2);

/// How long a node asked for an image it has not opened waits for it to
/// be opened (its own order to fetch it may come a heartbeat after the
/// asking node's, or after a control node's restart); a fetching node's
/// first request to a peer waits a little longer. 4 s let a test that
/// restarts the control node mid-deploy send a node to the store.
pub const OPENING_WAIT: Duration = Duration::from_secs(10);

/// The longest `Prefer: wait` a relaying node honours.
pub const MAX_RELAY_WAIT: Duration = Duration::from_secs(30);

/// A peer as seen by the fetching node.
pub(super) struct Peer {
    url: String,
    /// The URL as logged ([`crate::remote::redact`]).
    shown: String,
    root: RootDigest,
    len: u64,
    retry: RetryPolicy,
    authorization: Option<String>,
    /// Its view of the image, once it has answered for it.
    remote: OnceLock<Remote>,
    standing: Mutex<Standing>,
}

/// Whether a peer is asked.
#[derive(Clone, Copy)]
enum Standing {
    Asked,
    /// Not asked until then (it failed, went away or is not up yet).
    Paused(Instant),
    /// Never asked again (it served bytes that failed their digest, or
    /// offers another image under this root).
    Dropped,
}

impl Peer {
    /// The node API at `base` as a peer for the image with root `root` (hex)
    /// and container length `len`. Nothing is asked yet: a peer is opened on
    /// first use, so one that comes up later (a node opening the same image
    /// a moment after this one) is still used.
    pub(super) fn new(base: &str, root: RootDigest, len: u64, retry: RetryPolicy, authorization: Option<String>) -> Peer {
        let url = format!("{}/peer/{root}", base.trim_end_matches('/'));
        Peer {
            shown: crate::remote::redact(&url),
            url,
            root,
            len,
            retry,
            authorization,
            remote: OnceLock::new(),
            standing: Mutex::new(Standing::Asked),
        }
    }

    /// The peer's URL for this image, as logged.
    pub(super) fn shown(&self) -> &str {
        &self.shown
    }

    /// The peer's view of the image, opened on first use; `None` (logged)
    /// while it is paused or dropped, or when it does not answer (paused)
    /// or offers another image (dropped).
    pub(super) async fn remote(&self) -> Option<&Remote> {
        if !self.usable() {
            return None;
        }
        if let Some(r) = self.remote.get() {
            return Some(r);
        }
        // One attempt (the store is always there to fall back on), given
        // the time a peer takes to open an image it was told to fetch too.
        let quick = RetryPolicy {
            budget: Duration::ZERO,
            request_timeout: self.retry.request_timeout.min(OPENING_WAIT + Duration::from_secs(1)),
            ..self.retry
        };
        match Remote::open_with(&self.url, quick, self.authorization.as_deref()).await {
            Ok(remote) if remote.len() == self.len && remote.etag().and_then(|e| e.parse().ok()) == Some(self.root) => {
                tracing::info!(peer = self.shown, "fetching from peer before the store");
                Some(self.remote.get_or_init(|| remote))
            }
            Ok(remote) => {
                tracing::warn!(peer = self.shown, len = remote.len(), etag = remote.etag(), "peer offers another image; not used");
                self.ban();
                None
            }
            Err(e) => {
                tracing::warn!(peer = self.shown, error = %e, "peer not available; asking the store (and the peer again later)");
                self.pause();
                None
            }
        }
    }

    pub(super) fn usable(&self) -> bool {
        match *self.standing.lock().unwrap_or_else(|p| p.into_inner()) {
            Standing::Asked => true,
            Standing::Paused(until) => Instant::now() >= until,
            Standing::Dropped => false,
        }
    }

    /// Leaves the peer alone for a while (it failed or went away).
    pub(super) fn pause(&self) {
        let mut s = self.standing.lock().unwrap_or_else(|p| p.into_inner());
        if !matches!(*s, Standing::Dropped) {
            *s = Standing::Paused(Instant::now() + PAUSE);
        }
    }

    /// Never asks the peer again (its bytes failed their digest).
    pub(super) fn ban(&self) {
        *self.standing.lock().unwrap_or_else(|p| p.into_inner()) = Standing::Dropped;
    }
}

impl NodeCache {
    /// Length of the container file (what a peer announces).
    pub fn container_len(&self) -> u64 {
        self.inner.remote.len()
    }

    /// The container's bytes in `range`, as the store would send them, when
    /// every extent they belong to is present here; `Ok(None)` otherwise
    /// (including ranges outside the data segments or over
    /// `MAX_PEER_RANGE`, 64 MiB).
    ///
    /// # Errors
    /// When the local files cannot be read.
    pub async fn read_stored(&self, range: Range<u64>) -> io::Result<Option<Vec<u8>>> {
        let inner = std::sync::Arc::clone(&self.inner);
        let Some(pieces) = pieces(&inner, &range, |s, _| s == State::Present) else { return Ok(None) };
        let want = usize::try_from(range.end - range.start).map_err(io::Error::other)?;
        let out = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
            let mut out = vec![0u8; want];
            for (pos, within) in pieces {
                let e = &inner.index.entries()[pos];
                let to = usize::try_from(e.stored.start + within.start - range.start).map_err(io::Error::other)?;
                let len = usize::try_from(within.end - within.start).map_err(io::Error::other)?;
                read_piece(&inner, pos, &within, &mut out[to..to + len])?;
            }
            Ok(out)
        })
        .await
        .map_err(io::Error::other)??;
        Metrics::add(&self.inner.metrics.served_bytes, out.len() as u64);
        Ok(Some(out))
    }

    /// The container's bytes in `range` as a stream, one item per extent:
    /// the relaying form of [`NodeCache::read_stored`]. Extents present here
    /// are sent at once; extents on their way (being fetched, or in the
    /// run the boot stream has asked for) as soon as they are verified
    /// here; extents neither here nor on their way are fetched now, as a
    /// guest's miss would be, so that the store sends them once for this
    /// node and the asking one. An extent that does not arrive within
    /// `wait`, or fails its digest, ends the stream with an error. `None`
    /// when the range is not one this cache serves (outside the data
    /// segments, over `MAX_PEER_RANGE`) or holds an extent that failed its
    /// digest here.
    pub fn stream_stored(&self, range: Range<u64>, wait: Duration) -> Option<impl Stream<Item = io::Result<Bytes>> + Send + use<>> {
        let inner = std::sync::Arc::clone(&self.inner);
        let pieces = pieces(&inner, &range, |s, _| s != State::Bad)?;
        let stopped = inner.stopped.load(std::sync::atomic::Ordering::SeqCst);
        let fetch_now: Vec<usize> = {
            let entries = inner.index.entries();
            let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            pieces
                .iter()
                .map(|&(pos, _)| pos)
                .filter(|&pos| {
                    let on_its_way =
                        inner.prefetched[pos].load(std::sync::atomic::Ordering::Relaxed) && inner.aim.streaming(&entries[pos].stored);
                    let absent = !stopped && state[pos] == State::Absent && !on_its_way;
                    if absent {
                        state[pos] = State::Fetching;
                    }
                    absent
                })
                .collect()
        };
        if !fetch_now.is_empty() {
            let _ = inner.demand.send((fetch_now, Source::ForPeer));
        }
        let wait = wait.min(MAX_RELAY_WAIT);
        Some(futures_util::stream::unfold((inner, pieces.into_iter()), move |(inner, mut left)| async move {
            let (pos, within) = left.next()?;
            let item = relay_one(&inner, pos, within, wait).await;
            if let Ok(b) = &item {
                Metrics::add(&inner.metrics.served_bytes, b.len() as u64);
            }
            // After an error the stream ends: the fetching node resumes elsewhere.
            let rest = if item.is_ok() { left } else { Vec::new().into_iter() };
            Some((item, (inner, rest)))
        }))
    }
}

/// Waits (at most `wait`) for extent `pos` to be verified here, then reads
/// the part `within` of its stored bytes.
async fn relay_one(inner: &std::sync::Arc<Inner>, pos: usize, within: Range<u64>, wait: Duration) -> io::Result<Bytes> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let notified = inner.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match inner.state.lock().unwrap_or_else(|p| p.into_inner())[pos] {
            State::Present => break,
            State::Bad => return Err(io::Error::other("extent failed its digest check here")),
            State::Absent | State::Fetching => {}
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, format!("extent not here within {wait:?}")));
        }
    }
    let me = std::sync::Arc::clone(inner);
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; usize::try_from(within.end - within.start).map_err(io::Error::other)?];
        read_piece(&me, pos, &within, &mut buf)?;
        Ok(Bytes::from(buf))
    })
    .await
    .map_err(io::Error::other)?
}

/// Reads the part `within` (relative to its start) of extent `pos`'s stored
/// bytes into `buf`: a raw extent's from the guest data, a compressed one's
/// from the kept stored bytes.
fn read_piece(inner: &Inner, pos: usize, within: &Range<u64>, buf: &mut [u8]) -> io::Result<()> {
    let e = &inner.index.entries()[pos];
    match e.encoding {
        Encoding::Raw => inner.data.read_exact_at(buf, e.guest.start + within.start),
        _ => inner.stored.read_exact_at(buf, e.stored.start + within.start),
    }
}

/// The extents that make up `range`, each with the part of its stored bytes
/// (relative to its start) inside the range; `None` unless `ok` holds for
/// each (given its state and position) and they tile the range.
fn pieces(inner: &Inner, range: &Range<u64>, ok: impl Fn(State, usize) -> bool) -> Option<Vec<(usize, Range<u64>)>> {
    if range.start >= range.end || range.end - range.start > MAX_PEER_RANGE {
        return None;
    }
    let entries = inner.index.entries();
    let first = inner.by_stored.partition_point(|&i| entries[i].stored.end <= range.start);
    let state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
    let mut at = range.start;
    let mut out = Vec::new();
    for &pos in &inner.by_stored[first..] {
        let e = &entries[pos];
        if at >= range.end {
            break;
        }
        if e.stored.start > at || !ok(state[pos], pos) {
            return None;
        }
        let end = e.stored.end.min(range.end);
        out.push((pos, at - e.stored.start..end - e.stored.start));
        at = end;
    }
    (at >= range.end).then_some(out)
}
