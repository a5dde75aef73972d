//! A compute node's image service: one cache per image root digest, each
//! exported over NBD under any number of names, and an HTTP API to open
//! and close images and read the metrics ([`api`]).
//!
//! A name is bound to one image for as long as it is open: opening it again
//! with the same URL is answered with what is open, with another URL it is
//! refused (409) until the name is closed, so the disk under a running VM
//! never changes. Opening an image fetches its header and index from the
//! store without holding any lock: a slow store delays that image only, and
//! the API lists it as `opening` meanwhile.

pub mod api;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bootcache_format::RootDigest;
use serde::Serialize;
use tokio::sync::{Notify, OnceCell};

use crate::cache::{CacheError, CacheOptions, NodeCache};
use crate::metrics::Snapshot;
use crate::nbd::{Export, NbdServer};
use crate::remote::{Remote, RemoteError, check_url, redact};

/// Most peers one image is fetched from.
pub const MAX_PEERS: usize = 8;

/// An image opened under a name.
#[derive(Clone, Debug, Serialize)]
pub struct OpenImage {
    /// The export name.
    pub name: String,
    /// Where the container is (without credentials or query).
    pub url: String,
    /// Its root digest (names the cache).
    pub root_digest: RootDigest,
    /// The root digests of its layers, its own first (one for an image
    /// that stands alone): each layer has a cache of its own, shared by
    /// every image over it.
    pub layers: Vec<RootDigest>,
    /// Guest disk size.
    pub virtual_size: u64,
    /// What QEMU opens (as the backing file of its own overlay).
    pub nbd_url: String,
}

/// Where a name stands.
#[derive(Clone, Debug)]
pub enum NameState {
    /// Its image is being opened (since then).
    Opening(Instant),
    /// Open and exported.
    Ready(OpenImage),
    /// Opening failed, for this reason; opening it again retries.
    Failed(String),
}

/// A name and what it is bound to, as listed.
#[derive(Clone, Debug)]
pub struct Named {
    /// The export name.
    pub name: String,
    /// The image's URL (without credentials or query).
    pub url: String,
    /// Where it stands.
    pub state: NameState,
    /// Its cache's counters, when open.
    pub metrics: Option<Snapshot>,
}

/// Why an image could not be opened under a name.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The request itself is wrong (name, URL, peers, digest).
    #[error("{0}")]
    BadRequest(String),
    /// The image could not be opened.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The name was closed while its image was being opened.
    #[error("{0} was closed while its image was being opened")]
    Closed(String),
    /// The name is bound to another image.
    #[error("{name} is bound to {bound}; close it before binding another image to it")]
    Conflict {
        /// The name.
        name: String,
        /// The URL it is bound to.
        bound: String,
    },
    /// Another request opening the same name failed.
    #[error("opening failed: {0}")]
    Failed(String),
    /// The URL holds another image than the one asked for.
    #[error("{url} holds the image with root digest {found}, not {expected}")]
    WrongImage {
        /// Where.
        url: String,
        /// The root digest asked for.
        expected: RootDigest,
        /// The one found.
        found: RootDigest,
    },
}

struct Binding {
    id: u64,
    url: String,
    shown: String,
    /// Known once the headers are fetched; from then on the binding holds
    /// the caches of these roots (its image's and its parents') open.
    roots: Vec<RootDigest>,
    state: NameState,
}

/// The caches and exports of one node.
pub struct Node {
    nbd: Arc<NbdServer>,
    socket: PathBuf,
    opts: CacheOptions,
    /// Who speaks for origins that want a credential (registries).
    authorizers: Option<crate::remote::Authorizers>,
    /// Caches by root digest; an empty cell is one being opened.
    caches: Mutex<HashMap<RootDigest, Arc<OnceCell<Arc<NodeCache>>>>>,
    names: Mutex<BTreeMap<String, Binding>>,
    /// Wakes requests waiting for a name being opened by another.
    changed: Notify,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("socket", &self.socket).finish_non_exhaustive()
    }
}

/// Whether `name` may name an export: 1 to 255 letters, digits, `.`, `_`
/// and `-`, not starting with a dot (so never `.` or `..`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The node's own peers and `asked`, checked, without duplicates, at most
/// [`MAX_PEERS`].
fn checked_peers(own: &[String], asked: &[String]) -> Result<Vec<String>, NodeError> {
    let mut out: Vec<String> = Vec::new();
    for p in own.iter().chain(asked) {
        check_url(p).map_err(|e| NodeError::BadRequest(format!("peer: {e}")))?;
        let p = p.trim_end_matches('/').to_owned();
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.len() > MAX_PEERS {
        return Err(NodeError::BadRequest(format!("{} peers: at most {MAX_PEERS}", out.len())));
    }
    Ok(out)
}

impl Node {
    /// A node whose exports QEMU reaches at the unix socket `socket` (the
    /// caller serves `nbd()` there).
    pub fn new(socket: PathBuf, opts: CacheOptions) -> Arc<Node> {
        Node::with_authorizers(socket, opts, None)
    }

    /// Like [`Node::new`], opening an origin for which `authorizers` gives
    /// an authorizer with it (a registry's blob, read with its token).
    pub fn with_authorizers(socket: PathBuf, opts: CacheOptions, authorizers: Option<crate::remote::Authorizers>) -> Arc<Node> {
        Arc::new(Node {
            nbd: NbdServer::new(),
            socket,
            opts,
            authorizers,
            caches: Mutex::new(HashMap::new()),
            names: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            next_id: AtomicU64::new(1),
        })
    }

    /// The NBD server of the node's exports.
    pub fn nbd(&self) -> Arc<NbdServer> {
        Arc::clone(&self.nbd)
    }

    /// Opens the image at `url` and exports it as `name`. Images with the
    /// same root digest share one cache, whatever their URL or name. A new
    /// cache fetches from `peers` (and the node's own) before the store.
    /// With `root_digest`, the image must be that one.
    ///
    /// # Errors
    /// See [`NodeError`].
    pub async fn open(&self, name: &str, url: &str, peers: &[String], root_digest: Option<RootDigest>) -> Result<OpenImage, NodeError> {
        self.open_layered(name, url, peers, &[], root_digest).await
    }

    /// Like [`Node::open`], a layer's parents fetched from the peers listed
    /// for each (by root digest; a parent not listed from `peers`): nodes
    /// that hold the parent for another image over it.
    ///
    /// # Errors
    /// See [`NodeError`].
    pub async fn open_layered(
        &self,
        name: &str,
        url: &str,
        peers: &[String],
        layer_peers: &[(RootDigest, Vec<String>)],
        root_digest: Option<RootDigest>,
    ) -> Result<OpenImage, NodeError> {
        if !valid_name(name) {
            return Err(NodeError::BadRequest("name: 1 to 255 letters, digits, '.', '_' and '-', not starting with '.'".into()));
        }
        check_url(url).map_err(|e| NodeError::BadRequest(e.to_string()))?;
        let peers = checked_peers(&self.opts.peers, peers)?;
        if layer_peers.len() > usize::from(bootcache_format::MAX_CHAIN_LAYERS) {
            return Err(NodeError::BadRequest(format!(
                "peers for {} layers: a chain has at most {}",
                layer_peers.len(),
                bootcache_format::MAX_CHAIN_LAYERS
            )));
        }
        let layer_peers: Vec<(RootDigest, Vec<String>)> =
            layer_peers.iter().map(|(r, p)| Ok((*r, checked_peers(&self.opts.peers, p)?))).collect::<Result<_, NodeError>>()?;
        let id = loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
                match names.get(name) {
                    Some(b) if b.url != url && !matches!(b.state, NameState::Failed(_)) => {
                        return Err(NodeError::Conflict { name: name.into(), bound: b.shown.clone() });
                    }
                    Some(Binding { state: NameState::Ready(image), .. }) => return Ok(image.clone()),
                    // The same request is under way: wait for its outcome.
                    Some(Binding { state: NameState::Opening(_), .. }) => {}
                    Some(_) | None => {
                        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                        let binding = Binding {
                            id,
                            url: url.into(),
                            shown: redact(url),
                            roots: Vec::new(),
                            state: NameState::Opening(Instant::now()),
                        };
                        names.insert(name.into(), binding);
                        break id;
                    }
                }
            }
            notified.await;
            let names = self.names.lock().unwrap_or_else(|p| p.into_inner());
            match names.get(name) {
                Some(Binding { state: NameState::Failed(why), .. }) => return Err(NodeError::Failed(why.clone())),
                None => return Err(NodeError::Closed(name.into())),
                Some(_) => {}
            }
        };
        let result = self.open_cache(name, id, url, peers, &layer_peers, root_digest).await;
        self.settle(name, id, result)
    }

    /// Records how opening `name` (binding `id`) ended.
    fn settle(&self, name: &str, id: u64, result: Result<(Arc<dyn Export>, OpenImage), NodeError>) -> Result<OpenImage, NodeError> {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let outcome = match (result, names.get_mut(name).filter(|b| b.id == id)) {
            (Ok((cache, image)), Some(b)) => {
                b.state = NameState::Ready(image.clone());
                self.nbd.add(name, cache);
                Ok(image)
            }
            (Ok(_), None) => Err(NodeError::Closed(name.into())),
            (Err(e), Some(b)) => {
                b.state = NameState::Failed(chain(&e));
                Err(e)
            }
            (Err(e), None) => Err(e),
        };
        let roots: Vec<RootDigest> = names.values().flat_map(|b| b.roots.iter().copied()).collect();
        self.release_unused(&roots);
        drop(names);
        self.changed.notify_waiters();
        outcome
    }

    async fn open_cache(
        &self,
        name: &str,
        id: u64,
        url: &str,
        peers: Vec<String>,
        layer_peers: &[(RootDigest, Vec<String>)],
        expected: Option<RootDigest>,
    ) -> Result<(Arc<dyn Export>, OpenImage), NodeError> {
        let remote = match self.authorizers.as_ref().and_then(|a| a(url)) {
            Some(auth) => Remote::open_authorized(url, self.opts.retry, auth).await,
            None => Remote::open(url, self.opts.retry).await,
        };
        let remote = remote.map_err(|e: RemoteError| NodeError::Cache(e.into()))?;
        // The header names the cache; a new cache goes on from the same
        // connection state and header rather than fetching them again.
        let (head, header) = crate::cache::open::head(&remote).await?;
        let root = header.root();
        if let Some(expected) = expected
            && expected != root
        {
            return Err(NodeError::WrongImage { url: remote.shown().into(), expected, found: root });
        }
        let shown = remote.shown().to_owned();
        let mut opts = self.opts.clone();
        opts.peers = peers;
        let nbd_url = format!("nbd+unix:///{name}?socket={}", self.socket.display());
        // Whether this image's boot is streamed ahead of its reads.
        let boot_first = opts.prefetch == crate::cache::Prefetch::BootSegment;
        if header.parent.is_none() {
            self.hold(name, id, vec![root])?;
            let cell = self.cell(root);
            let cache = cell
                .get_or_try_init(|| async move { crate::cache::open::open_from(remote, head, &header, opts).await.map(Arc::new) })
                .await?;
            // The cache of a base opened first as a layer has no boot stream
            // of its own: this image's boot needs it (a stopped cache ends it).
            if boot_first && !cache.streams_its_boot() {
                let positions = cache.boot_positions();
                cache.mark_prefetched(&positions);
                let cache = Arc::clone(cache);
                tokio::spawn(async move { cache.stream_in_order(positions).await });
            }
            let image = OpenImage {
                name: name.into(),
                url: shown,
                root_digest: root,
                layers: vec![root],
                virtual_size: cache.virtual_size(),
                nbd_url,
            };
            return Ok((Arc::clone(cache) as Arc<dyn Export>, image));
        }
        // A layer: its parents' headers and indexes first (checked to fit),
        // then one cache per layer, each shared with every image over it.
        let (found, checked) = crate::cache::follow(remote, head, &header, self.opts.retry, self.opts.max_index_bytes).await?;
        let layers = crate::cache::roots(&found);
        self.hold(name, id, layers.clone())?;
        // The chain's one boot stream replaces each layer's own.
        if boot_first {
            opts.prefetch = crate::cache::Prefetch::Off;
        }
        let mut caches = Vec::with_capacity(found.len());
        for f in found {
            let layer = f.image.root_digest();
            let cell = self.cell(layer);
            let mut opts = opts.clone();
            if let Some((_, p)) = layer_peers.iter().find(|(r, _)| *r == layer) {
                opts.peers.clone_from(p);
            }
            let cache =
                cell.get_or_try_init(|| async move { crate::cache::open::open_image(f.remote, f.image, opts).await.map(Arc::new) }).await?;
            caches.push(Arc::clone(cache));
        }
        let disk = crate::cache::LayeredDisk::new(caches, checked, boot_first);
        let image = OpenImage { name: name.into(), url: shown, root_digest: root, layers, virtual_size: disk.virtual_size(), nbd_url };
        Ok((Arc::new(disk) as Arc<dyn Export>, image))
    }

    /// Makes binding `id` of `name` hold the caches of `roots` from here on,
    /// so closing another name of the same image (or of another image over
    /// the same base) does not close the caches this one opens.
    fn hold(&self, name: &str, id: u64, roots: Vec<RootDigest>) -> Result<(), NodeError> {
        match self.names.lock().unwrap_or_else(|p| p.into_inner()).get_mut(name) {
            Some(b) if b.id == id => {
                b.roots = roots;
                Ok(())
            }
            _ => Err(NodeError::Closed(name.into())),
        }
    }

    /// The cell of a root's cache (empty while it is being opened).
    fn cell(&self, root: RootDigest) -> Arc<OnceCell<Arc<NodeCache>>> {
        Arc::clone(self.caches.lock().unwrap_or_else(|p| p.into_inner()).entry(root).or_default())
    }

    /// Drops the caches of roots no binding in `in_use` holds; each stops
    /// fetching at once, even while an NBD client still reads it.
    fn release_unused(&self, in_use: &[RootDigest]) {
        let mut caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        caches.retain(|root, cell| {
            let keep = in_use.contains(root);
            if !keep && let Some(cache) = cell.get() {
                cache.stop();
                tracing::info!(%root, "cache closed");
            }
            keep
        });
    }

    /// Closes `name` (open, being opened or failed); the cache stops when no
    /// name uses it. Returns whether the name was bound.
    pub fn close(&self, name: &str) -> bool {
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let Some(binding) = names.remove(name) else { return false };
        if matches!(binding.state, NameState::Ready(_)) {
            self.nbd.remove(name);
        }
        let roots: Vec<RootDigest> = names.values().flat_map(|b| b.roots.iter().copied()).collect();
        self.release_unused(&roots);
        drop(names);
        self.changed.notify_waiters();
        true
    }

    /// Every bound name, with its cache's counters when open.
    pub fn status(&self) -> Vec<Named> {
        let names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        let caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        names
            .iter()
            .map(|(name, b)| {
                let metrics = match &b.state {
                    NameState::Ready(i) => {
                        let layers: Option<Vec<Snapshot>> =
                            i.layers.iter().map(|r| caches.get(r).and_then(|c| c.get()).map(|c| c.metrics())).collect();
                        layers.map(Snapshot::sum)
                    }
                    _ => None,
                };
                Named { name: name.clone(), url: b.shown.clone(), state: b.state.clone(), metrics }
            })
            .collect()
    }

    /// The counters of an image's layers' caches added up (those open).
    pub fn metrics(&self, layers: &[RootDigest]) -> Snapshot {
        Snapshot::sum(layers.iter().filter_map(|r| self.cache(r)).map(|c| c.metrics()))
    }

    /// The counters of each open cache, by root digest.
    pub fn cache_metrics(&self) -> Vec<(RootDigest, Snapshot)> {
        let caches = self.caches.lock().unwrap_or_else(|p| p.into_inner());
        caches.iter().filter_map(|(root, c)| Some((*root, c.get()?.metrics()))).collect()
    }

    /// The cache of a root digest, if open.
    pub fn cache(&self, root_digest: &RootDigest) -> Option<Arc<NodeCache>> {
        self.caches.lock().unwrap_or_else(|p| p.into_inner()).get(root_digest).and_then(|c| c.get().cloned())
    }

    /// The cache of a root digest, waiting up to `wait` for one to be
    /// opened here (a node asked as a relay before its own order to open
    /// the image has arrived).
    pub async fn cache_within(&self, root_digest: &RootDigest, wait: Duration) -> Option<Arc<NodeCache>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(c) = self.cache(root_digest) {
                return Some(c);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

pub use bootcache_http::chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_peers_are_checked() {
        for bad in ["", ".", "..", ".x", "a/b", "a b", "é", &"x".repeat(256)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(valid_name("vm-1.disk_0"));
        let many: Vec<String> = (0..20).map(|i| format!("http://10.0.0.{i}:7070")).collect();
        assert!(checked_peers(&[], &many).unwrap_err().to_string().contains("at most"));
        let dup = ["http://a:1/".to_string(), "http://a:1".to_string(), "http://a:1".to_string()];
        assert_eq!(checked_peers(&dup[..1], &dup[1..]).unwrap(), vec!["http://a:1".to_string()]);
        for bad in ["file:///etc/passwd", "ftp://x/", "not a url", "https://x/"] {
            assert!(checked_peers(&[], &[bad.to_string()]).is_err(), "{bad}");
        }
    }
}
