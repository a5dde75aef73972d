//! The node's HTTP API.
//!
//! ```text
//! POST   /images          {"name": "vm1-disk", "url": "http://store/debian.bcimg",
//!                          "peers": ["http://node2:7000"], "root_digest": "..."}
//!                         -> 200 image info; 409 if the name holds another image
//! GET    /images          -> every name: state (opening, ready, failed), metrics
//! DELETE /images/{name}   -> closes the name (the cache when no name uses it)
//! GET    /metrics         -> Prometheus text                  (no credential)
//! HEAD   /peer/{root}     -> the container's length, ETag = root digest
//! GET    /peer/{root}     -> with Range: the container's bytes, when every
//!                            extent in the range is cached here (else 404);
//!                            with `Prefer: wait=N` also extents this node's
//!                            prefetch is still fetching, sent as they arrive
//! ```
//!
//! Every route but `/metrics` requires `Authorization: Bearer <token>`
//! ([`crate::auth`]); without it the answer is 401 and nothing is done or
//! read. `peers` and `root_digest` are optional: peers are other nodes'
//! APIs to fetch from before the store (at most [`super::MAX_PEERS`], the
//! node's own included); `root_digest` pins the image the URL must hold.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use bootcache_format::RootDigest;
use serde::Deserialize;

use super::{NameState, Node, NodeError, OpenImage, chain};
use crate::auth::Credential;
use crate::http::range::{self, Ranged};
use crate::metrics::prometheus;

/// Largest request body accepted.
const MAX_BODY: usize = 64 << 10;
/// Time a client has to send a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

impl Node {
    /// The HTTP API (see the module documentation), requiring `credential`.
    pub fn api(self: &Arc<Self>, credential: Arc<Credential>) -> axum::Router {
        let guarded = axum::Router::new()
            .route("/images", get(list).post(open))
            .route("/images/{name}", delete(close))
            .route("/peer/{root}", get(peer))
            .layer(axum::middleware::from_fn_with_state(credential, crate::auth::require))
            .with_state(Arc::clone(self));
        axum::Router::new().route("/metrics", get(metrics)).with_state(Arc::clone(self)).merge(guarded)
    }
}

fn plain(status: StatusCode, msg: &str) -> Response {
    (status, format!("{msg}\n")).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenRequest {
    name: String,
    url: String,
    #[serde(default)]
    peers: Vec<String>,
    #[serde(default)]
    root_digest: Option<RootDigest>,
}

async fn open(State(node): State<Arc<Node>>, body: Body) -> Response {
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => return plain(StatusCode::PAYLOAD_TOO_LARGE, &format!("the request body is over {MAX_BODY} bytes or broken")),
        Err(_) => return plain(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time"),
    };
    let req: OpenRequest = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("request body: {e}")),
    };
    match node.open(&req.name, &req.url, &req.peers, req.root_digest).await {
        Ok(image) => Json::<OpenImage>(image).into_response(),
        Err(e) => {
            let status = match &e {
                NodeError::BadRequest(_) => StatusCode::BAD_REQUEST,
                NodeError::Conflict { .. } | NodeError::Closed(_) => StatusCode::CONFLICT,
                _ => StatusCode::BAD_GATEWAY,
            };
            plain(status, &chain(&e))
        }
    }
}

async fn list(State(node): State<Arc<Node>>) -> Json<Vec<serde_json::Value>> {
    let listed = node.status().into_iter().map(|n| {
        let mut v = match &n.state {
            NameState::Opening(since) => {
                serde_json::json!({ "state": "opening", "opening_seconds": since.elapsed().as_secs_f64() })
            }
            NameState::Ready(image) => {
                let mut v = serde_json::to_value(image).unwrap_or_default();
                v["state"] = "ready".into();
                v["metrics"] = serde_json::to_value(&n.metrics).unwrap_or_default();
                v
            }
            NameState::Failed(why) => serde_json::json!({ "state": "failed", "error": why }),
        };
        v["name"] = n.name.into();
        v["url"] = n.url.into();
        v
    });
    Json(listed.collect())
}

async fn close(State(node): State<Arc<Node>>, UrlPath(name): UrlPath<String>) -> StatusCode {
    if node.close(&name) { StatusCode::NO_CONTENT } else { StatusCode::NOT_FOUND }
}

async fn metrics(State(node): State<Arc<Node>>) -> String {
    prometheus(&node.cache_metrics())
}

/// What another node fetches: the container's bytes at their own offsets
/// (HEAD for the length and root digest), only for cached extents.
async fn peer(State(node): State<Arc<Node>>, method: Method, UrlPath(root): UrlPath<String>, headers: HeaderMap) -> Response {
    let Ok(root_digest) = root.parse() else { return plain(StatusCode::NOT_FOUND, "image not cached here") };
    // A node the control node named as a source may be asked a moment
    // before its own order to open the image arrives.
    let Some(cache) = node.cache_within(&root_digest, crate::cache::OPENING_WAIT).await else {
        return plain(StatusCode::NOT_FOUND, "image not cached here");
    };
    let len = cache.container_len();
    let mut resp = if method == Method::HEAD {
        let mut r = Response::new(Body::empty());
        r.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        r
    } else {
        if !headers.contains_key(header::RANGE) {
            return plain(StatusCode::BAD_REQUEST, "a peer serves Range requests only");
        }
        let range = match range::evaluate(headers.get(header::RANGE).map(HeaderValue::as_bytes), len) {
            Ranged::Partial(r) => r,
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
fn prefer_wait(headers: &HeaderMap) -> Option<Duration> {
    let secs = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("wait=")?.trim().parse::<u64>().ok())?;
    (secs > 0).then(|| Duration::from_secs(secs))
}
