//! A compute node's image service: one cache per image root digest, each
//! exported over NBD under any number of names, and a small HTTP API to open
//! and close images and read the metrics.
//!
//! ```text
//! POST   /images          {"name": "vm1-disk", "url": "http://store/debian.bcimg",
//!                           "peers": ["http://node2:7000"]}        -> image info
//! GET    /images          -> every open name with its cache's metrics
//! DELETE /images/{name}   -> closes the name (the cache when no name uses it)
//! GET    /metrics         -> Prometheus text
//! HEAD   /peer/{root}     -> the container's length, ETag = root digest
//! GET    /peer/{root}     -> with Range: the container's bytes, when every
//!                            extent in the range is cached here (else 404);
//!                            with `Prefer: wait=N` also extents this node's
//!                            prefetch is still fetching, sent as they arrive
//! ```
//!
//! `peers` (optional) are other nodes' APIs to fetch from before the store,
//! added to the node's own list; the `/peer` routes are what they serve.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use bootcache_format::hex;
use serde::{Deserialize, Serialize};

use crate::cache::{CacheError, CacheOptions, NodeCache};
use crate::metrics::{Snapshot, prometheus};
use crate::nbd::NbdServer;
use crate::remote::Remote;

/// An image opened under a name.
#[derive(Clone, Debug, Serialize)]
pub struct OpenImage {
    /// The export name.
    pub name: String,
    /// Where the container is.
    pub url: String,
    /// Its root digest (names the cache).
    pub root_digest: String,
    /// Guest disk size.
    pub virtual_size: u64,
    /// What QEMU opens (as the backing file of its own overlay).
    pub nbd_url: String,
}

/// The caches and exports of one node.
pub struct Node {
    nbd: Arc<NbdServer>,
    socket: PathBuf,
    opts: CacheOptions,
    caches: tokio::sync::Mutex<HashMap<String, Arc<NodeCache>>>,
    names: Mutex<BTreeMap<String, OpenImage>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("socket", &self.socket).finish_non_exhaustive()
    }
}

impl Node {
    /// A node whose exports QEMU reaches at the unix socket `socket` (the
    /// caller serves `nbd()` there).
    pub fn new(socket: PathBuf, opts: CacheOptions) -> Arc<Node> {
        Arc::new(Node {
            nbd: NbdServer::new(),
            socket,
            opts,
            caches: tokio::sync::Mutex::new(HashMap::new()),
            names: Mutex::new(BTreeMap::new()),
        })
    }

    /// The NBD server of the node's exports.
    pub fn nbd(&self) -> Arc<NbdServer> {
        Arc::clone(&self.nbd)
    }

    /// Opens the image at `url` and exports it as `name`. Images with the
    /// same root digest share one cache, whatever their URL or name. A new
    /// cache fetches from `peers` (and the node's own) before the store.
    ///
    /// # Errors
    /// See [`CacheError`].
    pub async fn open(&self, name: &str, url: &str, peers: &[String]) -> Result<OpenImage, CacheError> {
        let remote = Remote::open(url, self.opts.retry).await?;
        // The header names the cache; a new cache goes on from the same
        // connection state and header rather than fetching them again.
        let (head, header) = crate::cache::open::head(&remote).await?;
        let root = hex(&header.root_digest);
        let cache = {
            let mut caches = self.caches.lock().await;
            match caches.get(&root) {
                Some(c) => Arc::clone(c),
                None => {
                    let mut opts = self.opts.clone();
                    opts.peers.extend(peers.iter().filter(|p| !opts.peers.contains(p)).cloned().collect::<Vec<_>>());
                    let c = Arc::new(crate::cache::open::open_from(remote, head, &header, opts).await?);
                    caches.insert(root.clone(), Arc::clone(&c));
                    c
                }
            }
        };
        let image = OpenImage {
            name: name.into(),
            url: url.into(),
            root_digest: root,
            virtual_size: cache.virtual_size(),
            nbd_url: format!("nbd+unix:///{name}?socket={}", self.socket.display()),
        };
        self.nbd.add(name, cache);
        self.names.lock().unwrap_or_else(|p| p.into_inner()).insert(name.into(), image.clone());
        Ok(image)
    }

    /// Closes `name`; the cache stops when no name uses it. Returns whether
    /// the name was open.
    pub async fn close(&self, name: &str) -> bool {
        let Some(image) = self.names.lock().unwrap_or_else(|p| p.into_inner()).remove(name) else { return false };
        self.nbd.remove(name);
        let still_used = self.names.lock().unwrap_or_else(|p| p.into_inner()).values().any(|i| i.root_digest == image.root_digest);
        if !still_used {
            self.caches.lock().await.remove(&image.root_digest);
        }
        true
    }

    /// Every open name with its cache's counters.
    pub async fn status(&self) -> Vec<(OpenImage, Snapshot)> {
        let names: Vec<OpenImage> = self.names.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let caches = self.caches.lock().await;
        names
            .into_iter()
            .filter_map(|i| {
                let m = caches.get(&i.root_digest)?.metrics();
                Some((i, m))
            })
            .collect()
    }

    /// The counters of each cache, by root digest.
    pub async fn cache_metrics(&self) -> Vec<(String, Snapshot)> {
        self.caches.lock().await.iter().map(|(root, c)| (root.clone(), c.metrics())).collect()
    }

    /// The cache of a root digest, if open.
    pub async fn cache(&self, root_digest: &str) -> Option<Arc<NodeCache>> {
        self.caches.lock().await.get(root_digest).cloned()
    }

    /// The HTTP API (see the module documentation).
    pub fn api(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route("/images", get(list).post(open))
            .route("/images/{name}", delete(close))
            .route("/metrics", get(metrics))
            .route("/peer/{root}", get(peer))
            .with_state(Arc::clone(self))
    }
}

#[derive(Deserialize)]
struct OpenRequest {
    name: String,
    url: String,
    #[serde(default)]
    peers: Vec<String>,
}

#[derive(Serialize)]
struct Listed {
    #[serde(flatten)]
    image: OpenImage,
    metrics: Snapshot,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

async fn open(State(node): State<Arc<Node>>, Json(req): Json<OpenRequest>) -> Response {
    if !valid_name(&req.name) {
        return (StatusCode::BAD_REQUEST, "name: letters, digits, '.', '_' and '-' only\n").into_response();
    }
    match node.open(&req.name, &req.url, &req.peers).await {
        Ok(image) => Json(image).into_response(),
        Err(e) => (StatusCode::BAD_GATEWAY, format!("{}\n", anyhow_like(&e))).into_response(),
    }
}

async fn list(State(node): State<Arc<Node>>) -> Json<Vec<Listed>> {
    Json(node.status().await.into_iter().map(|(image, metrics)| Listed { image, metrics }).collect())
}

async fn close(State(node): State<Arc<Node>>, UrlPath(name): UrlPath<String>) -> StatusCode {
    if node.close(&name).await { StatusCode::NO_CONTENT } else { StatusCode::NOT_FOUND }
}

async fn metrics(State(node): State<Arc<Node>>) -> String {
    prometheus(&node.cache_metrics().await)
}

/// What another node fetches: the container's bytes at their own offsets
/// (HEAD for the length and root digest), only for cached extents.
async fn peer(State(node): State<Arc<Node>>, method: Method, UrlPath(root): UrlPath<String>, headers: HeaderMap) -> Response {
    let plain = |status: StatusCode, msg: &str| (status, format!("{msg}\n")).into_response();
    let Some(cache) = node.cache(&root).await else { return plain(StatusCode::NOT_FOUND, "image not cached here") };
    let len = cache.container_len();
    let mut resp = if method == Method::HEAD {
        let mut r = Response::new(Body::empty());
        r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        r
    } else {
        let Some(Ok(Ok(parsed))) = headers.get(header::RANGE).map(|v| v.to_str().map(http_range_header::parse_range_header)) else {
            return plain(StatusCode::BAD_REQUEST, "a peer serves Range requests only");
        };
        let range = match parsed.validate(len) {
            Ok(r) if r.len() == 1 => *r[0].start()..*r[0].end() + 1,
            _ => return plain(StatusCode::RANGE_NOT_SATISFIABLE, "one range inside the container, please"),
        };
        let answer = match prefer_wait(&headers) {
            Some(wait) => Ok(cache.stream_stored(range.clone(), wait).map(Body::from_stream)),
            None => cache.read_stored(range.clone()).await.map(|b| b.map(Body::from)),
        };
        match answer {
            Ok(Some(body)) => {
                let mut r = Response::new(body);
                *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                let h = r.headers_mut();
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(range.end - range.start));
                if let Ok(v) = HeaderValue::from_str(&format!("bytes {}-{}/{len}", range.start, range.end - 1)) {
                    h.insert(header::CONTENT_RANGE, v);
                }
                r
            }
            Ok(None) => return plain(StatusCode::NOT_FOUND, "range not cached here"),
            Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("cache: {e}")),
        }
    };
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&format!("\"{root}\"")) {
        h.insert(header::ETAG, v);
    }
    resp
}

/// The `wait` of a `Prefer` header (RFC 7240), when above zero.
fn prefer_wait(headers: &HeaderMap) -> Option<std::time::Duration> {
    let secs = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("wait=")?.trim().parse::<u64>().ok())?;
    (secs > 0).then(|| std::time::Duration::from_secs(secs))
}

/// An error with its chain of causes, on one line.
fn anyhow_like(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}
