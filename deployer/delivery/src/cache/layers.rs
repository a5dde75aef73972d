//! A layered image on a node: one cache per layer, read through the
//! chain's map.
//!
//! ```text
//!   NBD read ──► LayeredDisk ──► map: topmost extent at each byte
//!                                 ├─► role's cache   (its own extents)
//!                                 └─► base's cache   (shared by every role on the base)
//! ```
//!
//! Each layer's cache is the cache of that file, named by its root digest,
//! so every image over one base on a node shares the base's cache (and its
//! boot segment, fetched once). A parent is found by the locator its child
//! recorded, resolved against the child's URL on the same origin, and must
//! have the root digest the child names; the format crate's [`Chain`]
//! checks that the layers fit (depth, sizes, boot order).

use std::collections::HashSet;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bootcache_format::{Chain, Encoding, Header, Image, MAX_CHAIN_LAYERS, RootDigest};
use bytes::Bytes;

use super::open::{Regions, head, structure};
use super::{CacheError, NodeCache, ReadError};
use crate::metrics::Snapshot;
use crate::remote::{Remote, RetryPolicy};

/// One layer of a chain as found on the store: where, and its checked
/// structure.
pub(crate) struct Found {
    pub(crate) remote: Remote,
    pub(crate) image: Image<Regions>,
}

/// Guest ranges and the layer each is read from (`None`: zeros), sorted;
/// ranges between them read as zeros.
pub(crate) type Map = Vec<(Range<u64>, Option<usize>)>;

/// What a chain's layers are read as: its map, and its boot stream (the
/// top image's boot order table: each extent's layer and guest offset, in
/// the order that boot first read them).
pub(crate) struct Checked {
    pub(crate) map: Map,
    pub(crate) stream: Vec<(usize, u64)>,
}

/// The URL of the parent a layer at `child` names by `locator`: resolved
/// against the child's URL, and on the same origin (a layer never sends a
/// node to another host).
fn parent_url(child: &str, locator: Option<&str>) -> Result<String, String> {
    let locator = locator.ok_or("it names its parent by digest only (no parent_locator)")?;
    let base = reqwest::Url::parse(child).map_err(|e| e.to_string())?;
    let url = base.join(locator).map_err(|e| format!("its parent_locator {locator:?}: {e}"))?;
    if url.origin() != base.origin() {
        return Err(format!("its parent_locator {locator:?} is on another origin ({url}); a parent is read from the layer's store"));
    }
    Ok(url.into())
}

/// Follows the parents of the layer behind `remote` (its header fetched
/// already) down to an image that stands alone, and checks that they fit.
/// Returns the layers, the one opened first, and how the chain reads.
pub(crate) async fn follow(
    remote: Remote,
    first_head: Bytes,
    header: &Header,
    retry: RetryPolicy,
    max_index_bytes: u64,
) -> Result<(Vec<Found>, Checked), CacheError> {
    let top_url = remote.shown().to_owned();
    let mut found = vec![Found { image: structure(&remote, first_head, header, max_index_bytes, true).await?, remote }];
    let mut seen = HashSet::from([header.root()]);
    while let Some(digest) = found.last().and_then(|l| l.image.header().parent) {
        let child =
            found.last().map(|l| (l.remote.url().to_owned(), l.remote.shown().to_owned(), l.image.metadata().parent_locator.clone()));
        let Some((child_url, child_shown, locator)) = child else { break };
        let fail = |parent: String, source: CacheError| CacheError::Parent { url: child_shown.clone(), parent, source: Box::new(source) };
        if found.len() >= usize::from(MAX_CHAIN_LAYERS) || !seen.insert(digest) {
            let why = format!("the chain under {top_url} is deeper than {MAX_CHAIN_LAYERS} layers or loops (at {digest})");
            return Err(CacheError::BadChain { url: top_url, why });
        }
        let url = parent_url(&child_url, locator.as_deref())
            .map_err(|why| CacheError::BadChain { url: child_shown.clone(), why: format!("its parent {digest}: {why}") })?;
        let parent = async {
            let remote = Remote::open(&url, retry).await?;
            let (bytes, header) = head(&remote).await?;
            if header.root() != digest {
                return Err(CacheError::BadChain {
                    url: remote.shown().into(),
                    why: format!("is the image {}, not the parent {digest} its child names", header.root()),
                });
            }
            let image = structure(&remote, bytes, &header, max_index_bytes, true).await?;
            Ok(Found { remote, image })
        };
        found.push(parent.await.map_err(|e| fail(crate::remote::redact(&url), e))?);
    }
    let checked = check(&found).map_err(|source| CacheError::Image { url: top_url, source })?;
    Ok((found, checked))
}

/// The format crate's checks of the chain as a whole, its map and its
/// boot stream.
fn check(found: &[Found]) -> Result<Checked, bootcache_format::Error> {
    let regions = |i: usize| found[i].image.source().clone();
    let top = Image::open_layer(regions(0))?;
    let mut next = 1;
    let chain = Chain::open(top, |_| {
        let r = found.get(next).map(|f| f.image.source().clone()).ok_or_else(|| std::io::Error::other("not fetched"));
        next += 1;
        r
    })?;
    let map = chain.map().iter().map(|p| (p.guest.clone(), (chain.entry(p).encoding != Encoding::Zero).then_some(p.layer))).collect();
    let stream = chain.boot_stream().map(|(layer, e)| (layer, e.guest.start)).collect();
    Ok(Checked { map, stream })
}

/// A layered image on a node: the caches of its layers (the image opened
/// first), read as one disk.
///
/// Its boot stream is one: the top image's boot order table, the extents
/// its boot reads across the chain in the order that boot first read them,
/// fetched one run after the other from whichever layer's cache holds each
/// (a run: neighbours in both the table and one layer's file). The layers'
/// caches have no boot stream of their own then; what a role's boot does
/// not read of its base comes in their background streams, and a base's
/// extents another role already fetched are not fetched again.
pub struct LayeredDisk {
    layers: Vec<Arc<NodeCache>>,
    map: Map,
    size: u64,
    stream: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for LayeredDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayeredDisk").field("layers", &self.layers).finish_non_exhaustive()
    }
}

impl Drop for LayeredDisk {
    fn drop(&mut self) {
        if let Some(t) = &self.stream {
            t.abort();
        }
    }
}

impl LayeredDisk {
    /// The disk of a chain's caches; with `boot_stream`, starts fetching
    /// the chain's boot stream (and counts its extents among what each
    /// layer's prefetch fetches, so [`NodeCache::wait_prefetched`] of each
    /// layer waits for its part).
    pub(crate) fn new(layers: Vec<Arc<NodeCache>>, checked: Checked, boot_stream: bool) -> Self {
        let size = layers.first().map_or(0, |l| l.virtual_size());
        let stream = boot_stream.then(|| {
            // Consecutive entries of one layer: that layer's positions, in order.
            let mut steps: Vec<(usize, Vec<usize>)> = Vec::new();
            for (layer, guest) in checked.stream {
                let Some(cache) = layers.get(layer) else { continue };
                let Some(&pos) = cache.positions([guest]).first() else { continue };
                match steps.last_mut() {
                    Some((l, positions)) if *l == layer => positions.push(pos),
                    _ => steps.push((layer, vec![pos])),
                }
            }
            for (layer, cache) in layers.iter().enumerate() {
                let mine: Vec<usize> = steps.iter().filter(|(l, _)| *l == layer).flat_map(|(_, p)| p.iter().copied()).collect();
                cache.mark_prefetched(&mine);
            }
            let layers = layers.clone();
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                for (layer, positions) in steps {
                    layers[layer].stream_in_order(positions).await;
                }
                tracing::info!(seconds = started.elapsed().as_secs_f64(), "the chain's boot stream is cached");
            })
        });
        LayeredDisk { layers, map: checked.map, size, stream }
    }

    /// Size of the guest disk.
    pub fn virtual_size(&self) -> u64 {
        self.size
    }

    /// The caches of the layers, the image opened first.
    pub fn layers(&self) -> &[Arc<NodeCache>] {
        &self.layers
    }

    /// The counters of every layer's cache added up (one cache's counters
    /// are its own; a base's are shared by the images over it).
    pub fn metrics(&self) -> Snapshot {
        Snapshot::sum(self.layers.iter().map(|l| l.metrics()))
    }

    /// Waits until every layer's prefetch is done, at most `timeout`.
    pub async fn wait_prefetched(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        for l in &self.layers {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !l.wait_prefetched(left).await {
                return false;
            }
        }
        true
    }

    /// Fills `buf` with the guest bytes at `offset`, each from the layer
    /// that holds it, fetching what is missing (the layers at once).
    ///
    /// # Errors
    /// As [`NodeCache::read`], from whichever layer failed.
    pub async fn read_into(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        let len = buf.len() as u64;
        let end = offset.checked_add(len).filter(|&e| e <= self.size).ok_or(ReadError::OutOfRange { offset, len, size: self.size })?;
        buf.fill(0);
        let first = self.map.partition_point(|p| p.0.end <= offset);
        let (mut rest, mut at) = (buf, offset);
        let mut reads = Vec::new();
        for (range, layer) in self.map[first..].iter().take_while(|p| p.0.start < end) {
            let (from, to) = (range.start.max(offset), range.end.min(end));
            let tail = std::mem::take(&mut rest);
            let (_, tail) = tail.split_at_mut(to_usize(from - at));
            let (mine, tail) = tail.split_at_mut(to_usize(to - from));
            (rest, at) = (tail, to);
            if let Some(layer) = layer {
                reads.push(self.layers[*layer].read_into(from, mine));
            }
        }
        futures_util::future::try_join_all(reads).await.map(drop)
    }

    /// Ranges within `range` that read as zeros without data (runs of at
    /// least 4 KiB, sorted).
    pub fn zero_ranges(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let first = self.map.partition_point(|p| p.0.end <= range.start);
        let end = range.end;
        let mapped = self.map[first..].iter().take_while(|p| p.0.start < end).map(|(r, layer)| (r.clone(), layer.is_none()));
        super::zero_ranges(range, mapped)
    }
}

impl crate::nbd::Export for LayeredDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> Pin<Box<dyn Future<Output = Result<(), ReadError>> + Send + 'a>> {
        Box::pin(self.read_into(offset, buf))
    }

    fn zeros(&self, range: Range<u64>) -> Vec<Range<u64>> {
        self.zero_ranges(range)
    }
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Which root digests a chain's layers have, the image opened first.
pub(crate) fn roots(found: &[Found]) -> Vec<RootDigest> {
    found.iter().map(|f| f.image.root_digest()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parent_is_read_from_the_layers_own_store() {
        let child = "http://store:8080/images/role.bcimg";
        assert_eq!(parent_url(child, Some("base.bcimg")).unwrap(), "http://store:8080/images/base.bcimg");
        assert_eq!(parent_url(child, Some("../v1/base.bcimg")).unwrap(), "http://store:8080/v1/base.bcimg");
        assert_eq!(parent_url(child, Some("/srv/base.bcimg")).unwrap(), "http://store:8080/srv/base.bcimg");
        for other in ["http://evil:8080/base.bcimg", "//evil/base.bcimg", "https://store:8080/base.bcimg", "http://store:9090/b"] {
            let e = parent_url(child, Some(other)).unwrap_err();
            assert!(e.contains("another origin"), "{other}: {e}");
        }
        assert!(parent_url(child, None).unwrap_err().contains("no parent_locator"));
    }
}
