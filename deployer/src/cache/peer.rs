//! Caches helping each other: a node serves the stored bytes of its
//! verified extents to other nodes, and fetches from such peers before the
//! store.
//!
//! A peer answers `Range` requests on the container's own byte offsets, so
//! the fetching node verifies what it gets against the same index digests as
//! the store's bytes: a peer is trusted with nothing. A peer that lacks a
//! range answers 404 and the store is asked instead; a peer that fails is
//! left alone for a while, and one whose bytes fail their digest for good.

use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bootcache_format::Encoding;

use super::{Inner, NodeCache, State};
use crate::metrics::Metrics;
use crate::remote::{Remote, RetryPolicy};

/// Largest range a peer serves in one response (fetchers ask for at most
/// 16 MiB).
pub const MAX_PEER_RANGE: u64 = 64 << 20;

/// How long a peer that failed is not asked.
const PAUSE: Duration = Duration::from_secs(5);

/// A peer as seen by the fetching node.
pub(super) struct Peer {
    pub(super) remote: Remote,
    standing: Mutex<Standing>,
}

/// Whether a peer is asked.
#[derive(Clone, Copy)]
enum Standing {
    Asked,
    /// Not asked until then (it failed or went away).
    Paused(Instant),
    /// Never asked again (it served bytes that failed their digest).
    Dropped,
}

impl Peer {
    /// Opens the peer's view of the image with root `root` (hex) and length
    /// `len`; `None` (logged) when it does not offer that image.
    pub(super) async fn open(base: &str, root: &str, len: u64, retry: RetryPolicy) -> Option<Peer> {
        let url = format!("{}/peer/{root}", base.trim_end_matches('/'));
        // One quick attempt: the store is always there to fall back on.
        let quick = RetryPolicy { budget: Duration::ZERO, request_timeout: retry.request_timeout.min(Duration::from_secs(2)), ..retry };
        match Remote::open(&url, quick).await {
            Ok(remote) if remote.len() == len && remote.etag() == Some(root) => {
                tracing::info!(peer = url, "fetching from peer before the store");
                Some(Peer { remote, standing: Mutex::new(Standing::Asked) })
            }
            Ok(remote) => {
                tracing::warn!(peer = url, len = remote.len(), etag = remote.etag(), "peer offers another image; not used");
                None
            }
            Err(e) => {
                tracing::warn!(peer = url, error = %e, "peer not available; fetching from the store");
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
    /// [`MAX_PEER_RANGE`]).
    ///
    /// # Errors
    /// When the local files cannot be read.
    pub async fn read_stored(&self, range: Range<u64>) -> io::Result<Option<Vec<u8>>> {
        let inner = std::sync::Arc::clone(&self.inner);
        let Some(pieces) = pieces(&inner, &range) else { return Ok(None) };
        let want = usize::try_from(range.end - range.start).map_err(io::Error::other)?;
        let out = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
            let mut out = vec![0u8; want];
            for (pos, within) in pieces {
                let e = &inner.index.entries()[pos];
                let to = usize::try_from(e.stored.start + within.start - range.start).map_err(io::Error::other)?;
                let buf = &mut out[to..to + usize::try_from(within.end - within.start).map_err(io::Error::other)?];
                match e.encoding {
                    Encoding::Raw => inner.data.read_exact_at(buf, e.guest.start + within.start)?,
                    _ => inner.stored.read_exact_at(buf, e.stored.start + within.start)?,
                }
            }
            Ok(out)
        })
        .await
        .map_err(io::Error::other)??;
        Metrics::add(&self.inner.metrics.served_bytes, out.len() as u64);
        Ok(Some(out))
    }
}

/// The extents that make up `range`, each with the part of its stored bytes
/// (relative to its start) inside the range; `None` unless all are present
/// and they tile the range.
fn pieces(inner: &Inner, range: &Range<u64>) -> Option<Vec<(usize, Range<u64>)>> {
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
        if e.stored.start > at || state[pos] != State::Present {
            return None;
        }
        let end = e.stored.end.min(range.end);
        out.push((pos, at - e.stored.start..end - e.stored.start));
        at = end;
    }
    (at >= range.end).then_some(out)
}
