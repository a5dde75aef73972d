//! Where extents' stored bytes come from: one trait for the store and for
//! peers, and the list a cache asks in order (its peers, then the store).
//! The cache chooses nothing about where bytes come from: it asks
//! [`Sources`] for a range and says how the bytes fared.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::Stream;

use super::peer::{Peer, RELAY_WAIT};
use crate::remote::{Remote, RemoteError};

/// Stored bytes of a range, as they arrive.
pub(super) type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, reqwest::Error>> + Send>>;

/// What [`ExtentSource::open`] gives: a stream, `None` when the source does
/// not have the range (ask the next), or the source's failure.
type Opened<'a> = Pin<Box<dyn Future<Output = Result<Option<ByteStream>, RemoteError>> + Send + 'a>>;

/// One place stored bytes come from.
pub(super) trait ExtentSource: Send + Sync {
    /// How logs name it (no credentials).
    fn shown(&self) -> &str;

    /// Whether it is a peer (whose bytes count as peer bytes).
    fn is_peer(&self) -> bool;

    /// Starts a stream of `range`. A peer may send extents it is still
    /// fetching (or fetches for this node) as they arrive.
    fn open(&self, range: Range<u64>) -> Opened<'_>;

    /// It failed or broke off: leave it alone for a while.
    fn failed(&self) {}

    /// Its bytes failed their digest: never ask it again.
    fn lied(&self) {}
}

impl ExtentSource for Remote {
    fn shown(&self) -> &str {
        Remote::shown(self)
    }

    fn is_peer(&self) -> bool {
        false
    }

    fn open(&self, range: Range<u64>) -> Opened<'_> {
        Box::pin(async move { Ok(Some(Box::pin(self.stream(range, None).await?) as ByteStream)) })
    }
}

impl ExtentSource for Peer {
    fn shown(&self) -> &str {
        Peer::shown(self)
    }

    fn is_peer(&self) -> bool {
        true
    }

    fn open(&self, range: Range<u64>) -> Opened<'_> {
        Box::pin(async move {
            let Some(remote) = self.remote().await else { return Ok(None) };
            match remote.stream(range, Some(RELAY_WAIT)).await {
                Ok(s) => Ok(Some(Box::pin(s) as ByteStream)),
                // It lacks part of the range (404): the next source has it.
                Err(RemoteError::Protocol { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    fn failed(&self) {
        self.pause();
    }

    fn lied(&self) {
        self.ban();
    }
}

/// The sources of one cache, asked in order: peers first, the store last.
pub(super) struct Sources {
    list: Vec<Box<dyn ExtentSource>>,
}

impl Sources {
    pub(super) fn new(peers: Vec<Peer>, store: Remote) -> Sources {
        let mut list: Vec<Box<dyn ExtentSource>> = peers.into_iter().map(|p| Box::new(p) as Box<dyn ExtentSource>).collect();
        list.push(Box::new(store));
        Sources { list }
    }

    /// A stream of `range` from the first source that has it (or relays
    /// it: a peer that is fetching it, or fetches it for this node), and
    /// which source it is. A peer that fails is left alone and the next
    /// asked; the store's failure is the answer.
    pub(super) async fn open(&self, range: Range<u64>) -> Result<(ByteStream, usize), RemoteError> {
        let last = self.list.len() - 1;
        for (i, source) in self.list.iter().enumerate() {
            match source.open(range.clone()).await {
                Ok(Some(stream)) => return Ok((stream, i)),
                Ok(None) => {}
                Err(e) if i == last => return Err(e),
                Err(e) => {
                    tracing::warn!(source = source.shown(), error = %e, "source unreachable; asking the next");
                    source.failed();
                }
            }
        }
        Err(RemoteError::Protocol { url: self.list[last].shown().into(), why: "no source has the range".into() })
    }

    /// Source `i`.
    pub(super) fn get(&self, i: usize) -> &dyn ExtentSource {
        self.list[i].as_ref()
    }
}
