//! The embedded image store: the files of one directory over HTTP/1.1 with
//! `Range`, `HEAD` and, for bootcache containers, `ETag` = the root digest.
//!
//! Any HTTP server that honours single `Range` requests can be a store (the
//! tests use nginx); this one is the default that needs nothing installed.
//! Only plain file names directly inside the directory are served: no
//! subdirectories, no dot files, no symbolic links (a name is opened inside
//! the directory opened at start, without following a link, and what was
//! opened is checked to be a regular file), so nothing outside the
//! directory is reachable, even by swapping a file for a link meanwhile.
//! `Range` and `If-Range` follow RFC 9110 ([`crate::http::range`]); the
//! server's limits are [`crate::http::Limits`]'s defaults.

use std::collections::{HashMap, VecDeque};
use std::io::SeekFrom;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::http::range::{self, Ranged};
use bootcache_format::{HEADER_SIZE, Header, hex};
use rustix::fs::{Mode, OFlags};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

/// Bytes the store has sent in response bodies (for tests and metrics).
#[derive(Debug, Default)]
pub struct StoreStats {
    /// Body bytes sent (counted as they are handed to the connection).
    pub body_bytes: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
    /// The latest ranged GET requests (file name, byte range), at most
    /// [`RECENT_REQUESTS`], oldest first: what was asked for, in order.
    pub recent: Mutex<VecDeque<(String, std::ops::Range<u64>)>>,
}

/// How many requests [`StoreStats::recent`] keeps.
pub const RECENT_REQUESTS: usize = 1024;

/// A file's ETag as computed for one (device, inode, length, modification time).
type Tagged = ((u64, u64, u64, SystemTime), Option<String>);

struct Shared {
    /// The directory, opened once: names are looked up inside it, never
    /// through a path that could be swapped.
    dir: rustix::fd::OwnedFd,
    /// ETag per file name.
    etags: Mutex<HashMap<String, Tagged>>,
    stats: Arc<StoreStats>,
}

/// Serves `dir` on `listener` until the listener fails. `stats` counts what
/// is sent.
///
/// # Errors
/// When the directory cannot be opened or the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, dir: PathBuf, stats: Arc<StoreStats>) -> std::io::Result<()> {
    serve_until(listener, dir, stats, std::future::pending()).await
}

/// Like [`serve`], until `stop` completes; then it stops accepting, closes
/// idle connections and returns when the responses under way are sent.
///
/// # Errors
/// When the directory cannot be opened or the listener fails.
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    dir: PathBuf,
    stats: Arc<StoreStats>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, dir, stats, crate::http::Limits::default(), stop).await
}

/// Like [`serve_until`], within `limits`.
///
/// # Errors
/// When the directory cannot be opened or the listener fails.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    dir: PathBuf,
    stats: Arc<StoreStats>,
    limits: crate::http::Limits,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::http::serve(listener, router(&dir, stats)?, limits, stop).await
}

/// The store's routes over `dir`, to serve with any HTTP server.
///
/// # Errors
/// When the directory cannot be opened.
pub fn router(dir: &std::path::Path, stats: Arc<StoreStats>) -> std::io::Result<Router> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
    let dir = rustix::fs::open(dir, flags, Mode::empty()).map_err(std::io::Error::from)?;
    let shared = Arc::new(Shared { dir, etags: Mutex::new(HashMap::new()), stats });
    Ok(Router::new().route("/{name}", get(file).head(file)).with_state(shared))
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

/// A regular file directly inside the directory, opened without following
/// a link, with its metadata (taken from what was opened).
fn open_in(shared: &Shared, name: &str) -> Option<(std::fs::File, std::fs::Metadata)> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(&shared.dir, name, flags, Mode::empty()).ok()?;
    let file = std::fs::File::from(fd);
    let meta = file.metadata().ok()?;
    meta.is_file().then_some((file, meta))
}

async fn file(State(shared): State<Arc<Shared>>, method: Method, UrlPath(name): UrlPath<String>, headers: HeaderMap) -> Response {
    shared.stats.requests.fetch_add(1, Ordering::Relaxed);
    if !valid_name(&name) {
        return plain(StatusCode::NOT_FOUND, "no such image");
    }
    let looked_up = {
        let (shared, name) = (Arc::clone(&shared), name.clone());
        tokio::task::spawn_blocking(move || {
            let (file, meta) = open_in(&shared, &name)?;
            let etag = etag(&shared, &name, &file, &meta);
            Some((file, meta, etag))
        })
        .await
    };
    let Ok(Some((file, meta, etag))) = looked_up else { return plain(StatusCode::NOT_FOUND, "no such image") };
    let len = meta.len();
    let etag = etag.map(|t| format!("\"{t}\""));
    let last_modified = meta.modified().ok().map(httpdate::fmt_http_date);
    let applies =
        range::if_range_holds(headers.get(header::IF_RANGE).map(HeaderValue::as_bytes), etag.as_deref(), last_modified.as_deref());
    let ranged = if applies { range::evaluate(headers.get(header::RANGE).map(HeaderValue::as_bytes), len) } else { Ranged::Full };
    let (status, bytes) = match ranged {
        Ranged::Full => (StatusCode::OK, 0..len),
        Ranged::Partial(r) => (StatusCode::PARTIAL_CONTENT, r),
        Ranged::Unsatisfiable => {
            let mut r = plain(StatusCode::RANGE_NOT_SATISFIABLE, format!("no range of the file's {len} bytes"));
            r.headers_mut().insert(header::CONTENT_RANGE, hv(&format!("bytes */{len}")));
            return r;
        }
    };
    let count = bytes.end - bytes.start;
    let mut resp = if method == Method::HEAD {
        Response::new(Body::empty())
    } else {
        let mut f = tokio::fs::File::from_std(file);
        if let Err(e) = f.seek(SeekFrom::Start(bytes.start)).await {
            return plain(StatusCode::INTERNAL_SERVER_ERROR, format!("cannot seek: {e}"));
        }
        let stats = Arc::clone(&shared.stats);
        {
            let mut recent = stats.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() >= RECENT_REQUESTS {
                recent.pop_front();
            }
            recent.push_back((name.clone(), bytes.clone()));
        }
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
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(header::CONTENT_RANGE, hv(&format!("bytes {}-{}/{len}", bytes.start, bytes.end - 1)));
    }
    if let Some(tag) = etag {
        h.insert(header::ETAG, hv(&tag));
    }
    if let Some(date) = last_modified {
        h.insert(header::LAST_MODIFIED, hv(&date));
    }
    resp
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static(""))
}

/// The root digest of a bootcache container (checked header), or `None` for
/// any other file; read from the open `file`.
fn etag(shared: &Shared, name: &str, file: &std::fs::File, meta: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let stamp = (meta.dev(), meta.ino(), meta.len(), meta.modified().unwrap_or(SystemTime::UNIX_EPOCH));
    if let Some((s, tag)) = shared.etags.lock().unwrap_or_else(|p| p.into_inner()).get(name)
        && *s == stamp
    {
        return tag.clone();
    }
    let mut head = vec![0u8; HEADER_SIZE as usize];
    let tag = match file.read_exact_at(&mut head, 0) {
        Ok(()) => Header::parse(&head, meta.len()).ok().map(|h| hex(&h.root_digest)),
        Err(_) => None,
    };
    let mut etags = shared.etags.lock().unwrap_or_else(|p| p.into_inner());
    if etags.len() >= 4096 {
        etags.clear(); // a store with more names than this recomputes
    }
    etags.insert(name.to_owned(), (stamp, tag.clone()));
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
