//! Whole files a node copies before it can use them: plain disk images
//! (`delivery: full`) and container tarballs. A node keeps each under its
//! state directory, named by its key, and serves its tarballs to other
//! nodes (`GET /tarballs/{key}`, behind the credential), so that the store
//! sends each tarball once however many nodes import it: the control node
//! names a node that holds it as the source, as it does for VM images.
//! Peers are nodes of the same deployment, authenticated by the peer
//! token; the length they send must be whole, and once the cluster knows a
//! file's digest (the first one a node reported) every copy, from a peer or
//! the store, is checked against it before it is kept. Each file's digest
//! is kept beside it (`KEY.blake3`) and reported in heartbeats.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::response::{IntoResponse, Response};
use bootcache_api::RootDigest;
use futures_util::TryStreamExt;
use tokio::io::AsyncWriteExt;

use crate::Shared;

/// The most one copied file may be.
const MAX_BYTES: u64 = 1 << 40;

/// Where a node keeps the tarball of key `key`.
pub(crate) fn tarball_path(state_dir: &Path, key: &RootDigest) -> PathBuf {
    state_dir.join("tarballs").join(format!("{key}.tar"))
}

/// Where the digest of the whole file at `path` is kept.
fn digest_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".blake3");
    PathBuf::from(p)
}

/// The tarballs and disk images this node holds whole, each by its key
/// with its digest (reported in heartbeats): only a file whose digest was
/// kept beside it when it was written counts.
pub(crate) fn held(state_dir: &Path) -> Vec<(RootDigest, RootDigest)> {
    let mut out: Vec<(RootDigest, RootDigest)> = [("tarballs", ".tar"), ("disks", ".img")]
        .into_iter()
        .flat_map(|(dir, ext)| {
            std::fs::read_dir(state_dir.join(dir)).into_iter().flatten().flatten().filter_map(move |e| {
                let key: RootDigest = e.file_name().to_str()?.strip_suffix(ext)?.parse().ok()?;
                let digest = std::fs::read_to_string(digest_path(&e.path())).ok()?.trim().parse().ok()?;
                Some((key, digest))
            })
        })
        .collect();
    out.sort();
    out
}

/// The routes other nodes fetch tarballs from (`dir`: the tarballs).
pub(crate) fn routes(dir: PathBuf, credential: Arc<bootcache_http::auth::Credential>) -> axum::Router {
    axum::Router::new()
        .route(bootcache_api::control::routes::TARBALL, axum::routing::get(serve))
        .with_state(Arc::new(dir))
        .layer(axum::middleware::from_fn_with_state(credential, bootcache_http::auth::require))
}

async fn serve(State(dir): State<Arc<PathBuf>>, UrlPath(key): UrlPath<String>) -> Response {
    let Ok(key) = key.parse::<RootDigest>() else {
        return (axum::http::StatusCode::BAD_REQUEST, "a tarball's key is 64 hex digits").into_response();
    };
    let path = dir.join(format!("{key}.tar"));
    // Only a file the node wrote there: a link is not followed.
    let mut open = tokio::fs::OpenOptions::new();
    open.read(true).custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    let Ok(file) = open.open(&path).await else {
        return (axum::http::StatusCode::NOT_FOUND, "this node holds no such tarball").into_response();
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    ([(axum::http::header::CONTENT_LENGTH, len.to_string())], body).into_response()
}

/// Why a whole file was not copied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// It could not be asked for or read (the URL without secrets).
    #[error("{url}: {why}")]
    Transfer {
        /// Where from.
        url: String,
        /// What failed, on one line.
        why: String,
    },
    /// The answer was not the file.
    #[error("{url}: answered {status}")]
    Status {
        /// Where from.
        url: String,
        /// What it answered.
        status: u16,
    },
    /// Longer than announced or than any file is allowed.
    #[error("{url}: {got} bytes, more than {limit}")]
    TooLong {
        /// Where from.
        url: String,
        /// What it sent or announced.
        got: u64,
        /// The limit.
        limit: u64,
    },
    /// Shorter than announced.
    #[error("{url}: {got} bytes received of {expected}")]
    Short {
        /// Where from.
        url: String,
        /// What came.
        got: u64,
        /// What was announced.
        expected: u64,
    },
    /// Its digest is not the one the cluster recorded for it.
    #[error("{url}: the copy's digest is not the one the cluster recorded for it ({want}); not kept")]
    Digest {
        /// Where from.
        url: String,
        /// The digest it should have.
        want: RootDigest,
    },
    /// A file of the node's own could not be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io { path: path.to_owned(), source }
}

/// Copies `url` whole to `dest` (staged beside it, renamed once complete
/// and, with `want`, only if its BLAKE3 digest is that: a half or wrong
/// copy is never used), sending `authorization` if given; the bytes and
/// the digest (also kept beside the file).
async fn download(
    http: &reqwest::Client,
    url: &str,
    authorization: Option<&str>,
    dest: &Path,
    want: Option<RootDigest>,
) -> Result<(u64, RootDigest), FetchError> {
    let shown = bootcache_http::redact(url);
    let transfer = |e: reqwest::Error| FetchError::Transfer { url: shown.clone(), why: bootcache_http::chain(&e) };
    let mut req = http.get(url);
    if let Some(a) = authorization {
        req = req.header(reqwest::header::AUTHORIZATION, a);
    }
    let resp = req.send().await.map_err(transfer)?;
    if !resp.status().is_success() {
        return Err(FetchError::Status { url: shown, status: resp.status().as_u16() });
    }
    let expected = resp.content_length();
    if let Some(n) = expected.filter(|n| *n > MAX_BYTES) {
        return Err(FetchError::TooLong { url: shown, got: n, limit: MAX_BYTES });
    }
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let part = dest.with_extension("part");
    let result = async {
        let mut file = tokio::fs::File::create(&part).await.map_err(io(&part))?;
        let mut body = resp.bytes_stream();
        let mut got: u64 = 0;
        let mut hasher = blake3::Hasher::new();
        while let Some(chunk) = body.try_next().await.map_err(transfer)? {
            got += chunk.len() as u64;
            let limit = expected.unwrap_or(MAX_BYTES).min(MAX_BYTES);
            if got > limit {
                return Err(FetchError::TooLong { url: shown.clone(), got, limit });
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io(&part))?;
        }
        if let Some(expected) = expected.filter(|n| *n != got) {
            return Err(FetchError::Short { url: shown.clone(), got, expected });
        }
        let digest = RootDigest(*hasher.finalize().as_bytes());
        if let Some(want) = want.filter(|w| *w != digest) {
            return Err(FetchError::Digest { url: shown.clone(), want });
        }
        file.sync_all().await.map_err(io(&part))?;
        std::fs::write(digest_path(dest), format!("{digest}\n")).map_err(io(&digest_path(dest)))?;
        std::fs::rename(&part, dest).map_err(io(dest))?;
        Ok((got, digest))
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

/// A file keyed `key` held whole on this node at `dest`: copied (once,
/// however many instances wait for it) from the first of `peers` that has
/// it, else from the store at `url`; with `digest`, a copy is kept only if
/// it has it (one held already that has another is copied again).
pub(crate) async fn whole(
    shared: &Shared,
    key: &RootDigest,
    url: &str,
    peers: &[String],
    dest: &Path,
    digest: Option<RootDigest>,
) -> Result<(), FetchError> {
    let _held = shared.hold(dest).await;
    let kept: Option<RootDigest> = std::fs::read_to_string(digest_path(dest)).ok().and_then(|d| d.trim().parse().ok());
    if dest.is_file() && kept.is_some() && (digest.is_none() || kept == digest) {
        return Ok(());
    }
    let _ = std::fs::remove_file(dest);
    let authorization = shared.peer.authorization();
    for peer in peers {
        let from = format!("{}{}", peer.trim_end_matches('/'), bootcache_api::control::routes::tarball(key));
        match download(&shared.files, &from, Some(&authorization), dest, digest).await {
            Ok((bytes, _)) => {
                tracing::info!(%peer, bytes, file = %dest.display(), "copied from a peer");
                return Ok(());
            }
            Err(why) => tracing::warn!(%peer, %why, "peer could not give the file; trying the next source"),
        }
    }
    // The store needs no credential (it serves images to anyone on the
    // deployment network); ours is not sent there.
    let (bytes, _) = download(&shared.files, url, None, dest, digest).await?;
    tracing::info!(image = %bootcache_http::redact(url), bytes, "copied from the store");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// A server that answers one request with `head` then `body`, then closes.
    async fn answer_once(head: String, body: Vec<u8>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&body).await;
        });
        format!("http://{addr}/small.tar")
    }

    #[tokio::test]
    async fn a_short_an_absurd_or_a_refused_answer_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("t/x.tar");
        let http = reqwest::Client::new();
        // Fewer bytes than announced: refused, nothing kept.
        let url = answer_once("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n".into(), b"12345".to_vec()).await;
        let e = download(&http, &url, None, &dest, None).await.unwrap_err().to_string();
        assert!(e.contains("small.tar"), "{e}");
        assert!(!dest.exists() && !dest.with_extension("part").exists());
        // An absurd length is refused before anything is written.
        let url = answer_once(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", MAX_BYTES + 1), Vec::new()).await;
        let e = download(&http, &url, None, &dest, None).await.unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
        assert!(!dest.exists() && !dest.with_extension("part").exists());
        // A refusal names the status.
        let url = answer_once("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".into(), Vec::new()).await;
        let e = download(&http, &url, None, &dest, None).await.unwrap_err().to_string();
        assert!(e.contains("404"), "{e}");
        // A whole answer whose digest is not the cluster's: not kept.
        let other = RootDigest(*blake3::hash(b"54321").as_bytes());
        let url = answer_once("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".into(), b"12345".to_vec()).await;
        let e = download(&http, &url, None, &dest, Some(other)).await.unwrap_err();
        assert!(matches!(e, FetchError::Digest { .. }), "{e}");
        assert!(!dest.exists() && !dest.with_extension("part").exists());
        // A whole answer is kept whole, with its digest beside it.
        let url = answer_once("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".into(), b"12345".to_vec()).await;
        let (n, digest) = download(&http, &url, None, &dest, None).await.unwrap();
        assert_eq!((n, digest), (5, RootDigest(*blake3::hash(b"12345").as_bytes())));
        assert_eq!(std::fs::read(&dest).unwrap(), b"12345");
        assert_eq!(std::fs::read_to_string(digest_path(&dest)).unwrap().trim(), digest.to_string());
    }

    #[tokio::test]
    async fn a_tarball_is_served_by_its_key_and_a_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (good, link) = ("ab".repeat(32), "cd".repeat(32));
        std::fs::write(dir.path().join(format!("{good}.tar")), b"tarball").unwrap();
        std::fs::write(dir.path().join("outside"), b"secret").unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside"), dir.path().join(format!("{link}.tar"))).unwrap();
        let state = State(Arc::new(dir.path().to_path_buf()));
        let status = |r: Response| r.status().as_u16();
        assert_eq!(status(serve(state.clone(), UrlPath(good)).await), 200);
        assert_eq!(status(serve(state.clone(), UrlPath(link)).await), 404);
        assert_eq!(status(serve(state.clone(), UrlPath("../outside".into())).await), 400);
    }

    #[test]
    fn only_whole_files_named_by_a_key_with_their_digest_count_as_held() {
        let dir = tempfile::tempdir().unwrap();
        let key = bootcache_api::agent::container_image_key("http://s/x.tar");
        let other = bootcache_api::agent::container_image_key("http://s/y.tar");
        std::fs::create_dir_all(dir.path().join("tarballs")).unwrap();
        let digest = RootDigest(*blake3::hash(b"t").as_bytes());
        std::fs::write(tarball_path(dir.path(), &key), b"t").unwrap();
        std::fs::write(digest_path(&tarball_path(dir.path(), &key)), digest.to_string()).unwrap();
        std::fs::write(tarball_path(dir.path(), &other), b"no digest kept").unwrap();
        std::fs::write(dir.path().join("tarballs").join(format!("{key}.part")), b"half").unwrap();
        std::fs::write(dir.path().join("tarballs/not-a-key.tar"), b"?").unwrap();
        assert_eq!(held(dir.path()), vec![(key, digest)]);
    }
}
