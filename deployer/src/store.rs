//! The embedded image store: the files of one directory over HTTP/1.1 with
//! `Range`, `HEAD` and, for bootcache containers, `ETag` = the root digest.
//!
//! Any HTTP server that honours single `Range` requests can be a store (the
//! tests use nginx); this one is the default that needs nothing installed.
//! Only plain file names directly inside the directory are served: no
//! subdirectories, no dot files, no symbolic links, so nothing outside the
//! directory is reachable.

use std::collections::HashMap;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bootcache_format::{HEADER_SIZE, Header, hex};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

/// Bytes the store has sent in response bodies (for tests and metrics).
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Body bytes sent (counted as they are handed to the connection).
    pub body_bytes: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
}

/// A file's ETag as computed for one (length, modification time).
type Tagged = (u64, SystemTime, Option<String>);

struct Shared {
    dir: PathBuf,
    /// ETag per file.
    etags: Mutex<HashMap<PathBuf, Tagged>>,
    stats: Arc<StoreStats>,
}

/// Serves `dir` on `listener` until the listener fails. `stats` counts what
/// is sent.
///
/// # Errors
/// When the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, dir: PathBuf, stats: Arc<StoreStats>) -> std::io::Result<()> {
    serve_until(listener, dir, stats, std::future::pending()).await
}

/// Like [`serve`], until `stop` completes; then it stops accepting, closes
/// idle connections and returns when the responses under way are sent.
///
/// # Errors
/// When the listener fails.
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    dir: PathBuf,
    stats: Arc<StoreStats>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let shared = Arc::new(Shared { dir, etags: Mutex::new(HashMap::new()), stats });
    let app = Router::new().route("/{name}", get(file).head(file)).with_state(shared);
    axum::serve(listener, app).with_graceful_shutdown(stop).await
}

fn plain(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, msg.into() + "\n").into_response()
}

/// A name that can only mean a file directly inside the store directory.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name.len() <= 255
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

async fn file(State(shared): State<Arc<Shared>>, method: Method, UrlPath(name): UrlPath<String>, headers: HeaderMap) -> Response {
    shared.stats.requests.fetch_add(1, Ordering::Relaxed);
    if !valid_name(&name) {
        return plain(StatusCode::NOT_FOUND, "no such image");
    }
    let path = shared.dir.join(&name);
    // symlink_metadata: a link is refused, whatever it points at.
    let meta = match tokio::fs::symlink_metadata(&path).await {
        Ok(m) if m.is_file() => m,
        _ => return plain(StatusCode::NOT_FOUND, "no such image"),
    };
    let len = meta.len();
    let etag = etag(&shared, &path, len, meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)).await;
    let range = match headers.get(header::RANGE).map(|v| v.to_str().map(http_range_header::parse_range_header)) {
        None => None,
        Some(Ok(Ok(parsed))) => match parsed.validate(len) {
            Ok(ranges) if ranges.len() == 1 => Some(ranges[0].clone()),
            Ok(_) => None, // several ranges: allowed to answer with the whole file
            Err(_) => {
                let mut r = plain(StatusCode::RANGE_NOT_SATISFIABLE, format!("range outside the file's {len} bytes"));
                r.headers_mut().insert(header::CONTENT_RANGE, hv(&format!("bytes */{len}")));
                return r;
            }
        },
        Some(_) => return plain(StatusCode::BAD_REQUEST, "malformed Range header"),
    };
    let (status, start, count) = match &range {
        Some(r) => (StatusCode::PARTIAL_CONTENT, *r.start(), r.end() - r.start() + 1),
        None => (StatusCode::OK, 0, len),
    };
    let mut resp = if method == Method::HEAD {
        Response::new(Body::empty())
    } else {
        let mut f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot open: {e}")),
        };
        if let Err(e) = f.seek(SeekFrom::Start(start)).await {
            return plain(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot seek: {e}"));
        }
        let stats = Arc::clone(&shared.stats);
        let stream = ReaderStream::with_capacity(f.take(count), 256 << 10);
        let counted = futures_util::StreamExt::inspect(stream, move |chunk| {
            if let Ok(c) = chunk {
                stats.body_bytes.fetch_add(c.len() as u64, Ordering::Relaxed);
            }
        });
        Response::new(Body::from_stream(counted))
    };
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, hv(&count.to_string()));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if let Some(r) = range {
        h.insert(header::CONTENT_RANGE, hv(&format!("bytes {}-{}/{len}", r.start(), r.end())));
    }
    if let Some(tag) = etag {
        h.insert(header::ETAG, hv(&format!("\"{tag}\"")));
    }
    resp
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static(""))
}

/// The root digest of a bootcache container (checked header), or `None` for
/// any other file.
async fn etag(shared: &Shared, path: &Path, len: u64, mtime: SystemTime) -> Option<String> {
    if let Some((l, m, tag)) = shared.etags.lock().unwrap_or_else(|p| p.into_inner()).get(path)
        && (*l, *m) == (len, mtime)
    {
        return tag.clone();
    }
    let mut head = vec![0u8; HEADER_SIZE as usize];
    let read = async {
        let mut f = tokio::fs::File::open(path).await?;
        f.read_exact(&mut head).await
    };
    let tag = match read.await {
        Ok(_) => Header::parse(&head, len).ok().map(|h| hex(&h.root_digest)),
        Err(_) => None,
    };
    shared.etags.lock().unwrap_or_else(|p| p.into_inner()).insert(path.to_owned(), (len, mtime, tag.clone()));
    tag
}

#[cfg(test)]
mod tests {
    use super::valid_name;

    #[test]
    fn names_that_could_leave_the_directory_are_refused() {
        for bad in ["", ".", "..", ".hidden", "a/b", "../etc", "a\\b", "x%2fy", "a b"] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        for good in ["debian.bcimg", "img-1_2.raw"] {
            assert!(valid_name(good), "{good:?}");
        }
    }
}
