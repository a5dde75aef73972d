//! Registry images' blobs (container images' configs and layers) a node
//! holds, each under its digest (`blobs/HEX`), written only once its bytes
//! were checked against it. A node copies a blob from the peers the
//! control node names (nodes that hold the whole image, serving it at
//! `GET /blobs/{digest}` behind the peer token), else from the registry
//! with the node's credentials for it; what it holds already is not
//! copied again, whatever image it came with. An image whose blobs are all
//! here is recorded (`images/HEX.json`, the manifest's digest) and reported
//! in heartbeats, so that it is a source for other nodes.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::response::{IntoResponse, Response};
use bootcache_api::RootDigest;
use bootcache_api::image::Blob;
use bootcache_api::reference::{Digest, Reference};
use bootcache_runtime::Source;
use futures_util::TryStreamExt;
use sha2::Digest as _;
use tokio::io::AsyncWriteExt;

use crate::{AgentError, Shared};

/// How long a peer's request for a blob this node neither holds nor
/// copies waits for its copy to begin (its order may come a heartbeat
/// after the peer's).
const WAIT_FOR_COPY: std::time::Duration = std::time::Duration::from_secs(15);

/// How far a copy has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    /// Bytes in its staging file.
    Bytes(u64),
    /// Whole and checked.
    Done,
    /// Given up (the staging file is gone or will be).
    Failed,
}

/// A copy under way: its staging file, the blob's size, how far it came.
type Copy = (PathBuf, u64, tokio::sync::watch::Receiver<Progress>);

/// The blobs a node is copying, each with its staging file, size and
/// progress; what peers are sent as it arrives.
#[derive(Debug)]
pub(crate) struct Inflight {
    copies: std::sync::Mutex<std::collections::HashMap<Digest, Copy>>,
    began: tokio::sync::Notify,
    /// How long a request waits for a copy to begin.
    wait: std::time::Duration,
}

impl Default for Inflight {
    fn default() -> Inflight {
        Inflight::waiting(WAIT_FOR_COPY)
    }
}

impl Inflight {
    fn waiting(wait: std::time::Duration) -> Inflight {
        Inflight { copies: Default::default(), began: tokio::sync::Notify::new(), wait }
    }

    fn begin(&self, digest: Digest, part: PathBuf, size: u64) -> tokio::sync::watch::Sender<Progress> {
        let (tx, rx) = tokio::sync::watch::channel(Progress::Bytes(0));
        self.copies.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(digest, (part, size, rx));
        self.began.notify_waiters();
        tx
    }

    fn end(&self, digest: &Digest) {
        self.copies.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(digest);
    }

    fn get(&self, digest: &Digest) -> Option<Copy> {
        self.copies.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(digest).cloned()
    }
}

/// The hex of a digest (a file name).
fn hex(d: &Digest) -> String {
    RootDigest(d.0).to_string()
}

/// Where a node keeps blob `digest`.
pub(crate) fn blob_path(state_dir: &Path, digest: &Digest) -> PathBuf {
    state_dir.join("blobs").join(hex(digest))
}

/// Where a node records that it holds every blob of the image whose
/// manifest's digest is `manifest`.
fn image_path(state_dir: &Path, manifest: &Digest) -> PathBuf {
    state_dir.join("images").join(format!("{}.json", hex(manifest)))
}

/// The registry images this node holds whole (each recorded, with every
/// blob it lists still here), by key with the key as their digest (a
/// manifest's digest names its content).
pub(crate) fn held(state_dir: &Path) -> Vec<(RootDigest, RootDigest)> {
    let mut out: Vec<(RootDigest, RootDigest)> = std::fs::read_dir(state_dir.join("images"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let key: RootDigest = e.file_name().to_str()?.strip_suffix(".json")?.parse().ok()?;
            let text = std::fs::read(e.path()).ok().filter(|t| t.len() < 1 << 20)?;
            let blobs: Vec<Blob> = serde_json::from_slice(&text).ok()?;
            let whole = blobs.iter().all(|b| std::fs::metadata(blob_path(state_dir, &b.digest)).is_ok_and(|m| m.len() == b.size));
            whole.then_some((key, key))
        })
        .collect();
    out.sort();
    out
}

/// The routes other nodes fetch blobs from (`dir`: the blobs; `inflight`:
/// those being copied).
pub(crate) fn routes(dir: PathBuf, inflight: Arc<Inflight>, credential: Arc<bootcache_http::auth::Credential>) -> axum::Router {
    axum::Router::new()
        .route(bootcache_api::control::routes::BLOB, axum::routing::get(serve))
        .with_state((Arc::new(dir), inflight))
        .layer(axum::middleware::from_fn_with_state(credential, bootcache_http::auth::require))
}

/// A file the node wrote (a link is not followed).
async fn open_own(path: &Path) -> std::io::Result<tokio::fs::File> {
    let mut open = tokio::fs::OpenOptions::new();
    open.read(true).custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32);
    open.open(path).await
}

fn whole(file: tokio::fs::File, len: u64) -> Response {
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    ([(axum::http::header::CONTENT_LENGTH, len.to_string())], body).into_response()
}

async fn serve(State((dir, inflight)): State<(Arc<PathBuf>, Arc<Inflight>)>, UrlPath(digest): UrlPath<String>) -> Response {
    let Ok(digest) = digest.parse::<Digest>() else {
        return (axum::http::StatusCode::BAD_REQUEST, "a blob is named by its digest, sha256: and 64 hex digits").into_response();
    };
    let path = dir.join(hex(&digest));
    let deadline = tokio::time::Instant::now() + inflight.wait;
    let (part, size, progress) = loop {
        let began = inflight.began.notified();
        if let Ok(file) = open_own(&path).await {
            let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
            return whole(file, len);
        }
        if let Some(copy) = inflight.get(&digest) {
            break copy;
        }
        if tokio::time::timeout_at(deadline, began).await.is_err() {
            return (axum::http::StatusCode::NOT_FOUND, "this node holds no such blob").into_response();
        }
    };
    let mut progress = progress;
    let file = loop {
        if let Ok(file) = open_own(&part).await {
            break file;
        }
        // Not begun writing (its source has not answered yet), done
        // meanwhile (renamed), or given up.
        if let Ok(file) = open_own(&path).await {
            return whole(file, size);
        }
        let failed = *progress.borrow_and_update() == Progress::Failed;
        let until = deadline.max(tokio::time::Instant::now() + inflight.wait);
        if failed || !matches!(tokio::time::timeout_at(until, progress.changed()).await, Ok(Ok(()))) {
            return (axum::http::StatusCode::NOT_FOUND, "this node holds no such blob").into_response();
        }
    };
    let body = futures_util::stream::unfold(Some((file, progress, 0u64)), move |state| async move {
        let (mut file, mut progress, sent) = state?;
        if sent >= size {
            return None;
        }
        loop {
            let there = match *progress.borrow_and_update() {
                Progress::Bytes(n) => n.min(size),
                Progress::Done => size,
                Progress::Failed => return Some((Err(std::io::Error::other("the copy being passed on failed")), None)),
            };
            if there > sent {
                let mut buf = vec![0u8; usize::try_from((there - sent).min(1 << 20)).unwrap_or(1 << 20)];
                return match tokio::io::AsyncReadExt::read(&mut file, &mut buf).await {
                    Ok(0) => Some((Err(std::io::Error::other("the copy being passed on is shorter than said")), None)),
                    Ok(n) => {
                        buf.truncate(n);
                        Some((Ok(bytes::Bytes::from(buf)), Some((file, progress, sent + n as u64))))
                    }
                    Err(e) => Some((Err(e), None)),
                };
            }
            if progress.changed().await.is_err() {
                return Some((Err(std::io::Error::other("the copy being passed on stopped")), None));
            }
        }
    });
    ([(axum::http::header::CONTENT_LENGTH, size.to_string())], axum::body::Body::from_stream(body)).into_response()
}

/// Copies blob `blob` from `url` (a peer, presenting `authorization`) to
/// `dest`: exactly its size, its digest checked before the file appears.
async fn copy_from_peer(
    http: &reqwest::Client,
    url: &str,
    authorization: &str,
    blob: &Blob,
    dest: &Path,
    progress: &(dyn Fn(u64) + Send + Sync),
) -> Result<(), String> {
    let resp = http.get(url).header(reqwest::header::AUTHORIZATION, authorization).send().await.map_err(|e| bootcache_http::chain(&e))?;
    if !resp.status().is_success() {
        return Err(format!("answered {}", resp.status().as_u16()));
    }
    if resp.content_length().is_some_and(|n| n != blob.size) {
        return Err(format!("announced {} bytes, the blob has {}", resp.content_length().unwrap_or(0), blob.size));
    }
    let part = dest.with_extension("part");
    let result = async {
        let mut file = tokio::fs::File::create(&part).await.map_err(|e| e.to_string())?;
        let mut body = resp.bytes_stream();
        let (mut got, mut hasher) = (0u64, sha2::Sha256::new());
        while let Some(chunk) = body.try_next().await.map_err(|e| bootcache_http::chain(&e))? {
            got += chunk.len() as u64;
            if got > blob.size {
                return Err(format!("more than the blob's {} bytes", blob.size));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(|e| e.to_string())?;
            // In the file (not only queued) before it is said to be.
            file.flush().await.map_err(|e| e.to_string())?;
            progress(got);
        }
        if got != blob.size {
            return Err(format!("{got} of the blob's {} bytes", blob.size));
        }
        if Digest(hasher.finalize().into()) != blob.digest {
            return Err(format!("the bytes sent are not {} (not kept)", blob.digest));
        }
        file.sync_all().await.map_err(|e| e.to_string())?;
        tokio::fs::rename(&part, dest).await.map_err(|e| e.to_string())
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&part).await;
    }
    result
}

/// Blob `blob` of `reference`'s image held on this node (copied once,
/// however many instances wait for it): from the first of `peers` that
/// gives it, else from the registry.
async fn blob(shared: &Shared, reference: &Reference, blob: &Blob, peers: &[String]) -> Result<PathBuf, AgentError> {
    let dest = blob_path(&shared.config.state_dir, &blob.digest);
    let _held = shared.hold(&dest).await;
    // Only a checked copy is ever renamed there.
    if std::fs::metadata(&dest).is_ok_and(|m| m.len() == blob.size) {
        return Ok(dest);
    }
    if let Some(d) = dest.parent() {
        std::fs::create_dir_all(d).map_err(|e| AgentError::State { path: d.to_owned(), why: e.to_string() })?;
    }
    let authorization = shared.peer.authorization();
    let part = dest.with_extension("part");
    // Each attempt is passed on as it arrives; one that fails ends what
    // peers were sent of it.
    let attempt = |copy: &'_ str| {
        let tx = shared.inflight.begin(blob.digest, part.clone(), blob.size);
        tracing::debug!(digest = %blob.digest, from = copy, "copying a blob");
        tx
    };
    for peer in peers {
        let from = format!("{}{}", peer.trim_end_matches('/'), bootcache_api::control::routes::blob(&blob.digest));
        let tx = attempt(peer);
        let copied = copy_from_peer(&shared.files, &from, &authorization, blob, &dest, &|n| {
            tx.send_replace(Progress::Bytes(n));
        })
        .await;
        tx.send_replace(if copied.is_ok() { Progress::Done } else { Progress::Failed });
        shared.inflight.end(&blob.digest);
        match copied {
            Ok(()) => {
                tracing::info!(%peer, digest = %blob.digest, bytes = blob.size, "blob copied from a peer");
                return Ok(dest);
            }
            Err(why) => tracing::warn!(%peer, digest = %blob.digest, %why, "peer could not give the blob; trying the next source"),
        }
    }
    let registry = shared.registries.get(&reference.registry).map_err(|e| AgentError::Image(e.to_string()))?;
    let tx = attempt("registry");
    let copied = registry
        .get_blob_file_with(reference, &blob.digest, blob.size, &dest, &|n| {
            tx.send_replace(Progress::Bytes(n));
        })
        .await;
    tx.send_replace(if copied.is_ok() { Progress::Done } else { Progress::Failed });
    shared.inflight.end(&blob.digest);
    copied.map_err(|e| AgentError::Image(e.to_string()))?;
    tracing::info!(image = %reference, digest = %blob.digest, bytes = blob.size, "blob copied from the registry");
    Ok(dest)
}

/// The registry image `reference` (pinned to `manifest`) held whole on
/// this node: each of its blobs, then its record (a source for peers from
/// then on); what the runtime loads.
pub(crate) async fn image(
    shared: &Shared,
    reference: &str,
    manifest: &Digest,
    config: &Blob,
    layers: &[Blob],
    peers: &[String],
) -> Result<Source, AgentError> {
    let pinned: Reference = reference.parse().map_err(|e| AgentError::Image(format!("{reference}: {e}")))?;
    let config_path = blob(shared, &pinned, config, peers).await?;
    let mut layer_paths = Vec::with_capacity(layers.len());
    for l in layers {
        layer_paths.push(blob(shared, &pinned, l, peers).await?);
    }
    let record = image_path(&shared.config.state_dir, manifest);
    let _held = shared.hold(&record).await;
    if !record.is_file() {
        let all: Vec<Blob> = std::iter::once(*config).chain(layers.iter().copied()).collect();
        let text = serde_json::to_vec(&all).map_err(|e| AgentError::Image(e.to_string()))?;
        let state = |e: std::io::Error| AgentError::State { path: record.clone(), why: e.to_string() };
        let part = record.with_extension("part");
        if let Some(d) = record.parent() {
            std::fs::create_dir_all(d).map_err(|e| AgentError::State { path: d.to_owned(), why: e.to_string() })?;
        }
        std::fs::write(&part, text).map_err(state)?;
        std::fs::rename(&part, &record).map_err(state)?;
    }
    Ok(Source::Image { key: hex(manifest), config: config_path, layers: layer_paths })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_blob_is_served_by_its_digest_and_a_link_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (good, link) = (Digest::of(b"layer"), Digest::of(b"other"));
        std::fs::write(dir.path().join(hex(&good)), b"layer").unwrap();
        std::fs::write(dir.path().join("outside"), b"secret").unwrap();
        std::os::unix::fs::symlink(dir.path().join("outside"), dir.path().join(hex(&link))).unwrap();
        let state = State((Arc::new(dir.path().to_path_buf()), Arc::new(Inflight::waiting(std::time::Duration::from_millis(100)))));
        let status = |r: Response| r.status().as_u16();
        assert_eq!(status(serve(state.clone(), UrlPath(good.to_string())).await), 200);
        assert_eq!(status(serve(state.clone(), UrlPath(link.to_string())).await), 404);
        assert_eq!(status(serve(state.clone(), UrlPath(hex(&good))).await), 400);
        assert_eq!(status(serve(state.clone(), UrlPath("../outside".into())).await), 400);
    }

    /// What `serve` sends for `digest`, whole or cut short.
    async fn fetched(state: State<(Arc<PathBuf>, Arc<Inflight>)>, digest: Digest) -> (u16, Result<Vec<u8>, String>) {
        let r = serve(state, UrlPath(digest.to_string())).await;
        let status = r.status().as_u16();
        let body = axum::body::to_bytes(r.into_body(), usize::MAX).await.map(|b| b.to_vec()).map_err(|e| e.to_string());
        (status, body)
    }

    #[tokio::test]
    async fn a_blob_being_copied_is_passed_on_as_it_arrives_and_a_failed_copy_cut_short() {
        let dir = tempfile::tempdir().unwrap();
        let inflight = Arc::new(Inflight::default());
        let state = || State((Arc::new(dir.path().to_path_buf()), Arc::clone(&inflight)));
        let content: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let digest = Digest::of(&content);
        let (part, dest) = (dir.path().join(format!("{}.part", hex(&digest))), dir.path().join(hex(&digest)));
        // Asked before the copy begins: the request waits for it.
        let asked = tokio::spawn(fetched(state(), digest));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let tx = inflight.begin(digest, part.clone(), content.len() as u64);
        let mut file = tokio::fs::File::create(&part).await.unwrap();
        for chunk in content.chunks(700_000) {
            file.write_all(chunk).await.unwrap();
            file.flush().await.unwrap();
            let Progress::Bytes(n) = *tx.borrow() else { panic!() };
            tx.send_replace(Progress::Bytes(n + chunk.len() as u64));
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        std::fs::rename(&part, &dest).unwrap();
        tx.send_replace(Progress::Done);
        inflight.end(&digest);
        let (status, body) = asked.await.unwrap();
        assert_eq!((status, body.unwrap() == content), (200, true));

        // A copy that fails midway: what was sent of it ends short.
        let other = Digest::of(b"other");
        let part = dir.path().join(format!("{}.part", hex(&other)));
        std::fs::write(&part, vec![1u8; 1000]).unwrap();
        let tx = inflight.begin(other, part.clone(), 5000);
        tx.send_replace(Progress::Bytes(1000));
        let asked = tokio::spawn(fetched(state(), other));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        tx.send_replace(Progress::Failed);
        inflight.end(&other);
        let (status, body) = asked.await.unwrap();
        assert_eq!(status, 200);
        assert!(body.is_err(), "a failed copy was passed on as whole");
    }

    #[test]
    fn an_image_counts_as_held_only_with_every_blob_it_lists() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("blobs")).unwrap();
        std::fs::create_dir_all(dir.path().join("images")).unwrap();
        let blob = |content: &[u8]| {
            let b = Blob { digest: Digest::of(content), size: content.len() as u64 };
            std::fs::write(blob_path(dir.path(), &b.digest), content).unwrap();
            b
        };
        let (config, layer) = (blob(b"{}"), blob(b"layer bytes"));
        let missing = Blob { digest: Digest::of(b"gone"), size: 4 };
        let (whole, partial) = (Digest::of(b"manifest 1"), Digest::of(b"manifest 2"));
        std::fs::write(image_path(dir.path(), &whole), serde_json::to_vec(&[config, layer]).unwrap()).unwrap();
        std::fs::write(image_path(dir.path(), &partial), serde_json::to_vec(&[config, missing]).unwrap()).unwrap();
        std::fs::write(dir.path().join("images/not-a-digest.json"), b"[]").unwrap();
        assert_eq!(held(dir.path()), vec![(RootDigest(whole.0), RootDigest(whole.0))]);
        // A blob cut short no longer counts.
        std::fs::write(blob_path(dir.path(), &layer.digest), b"layer").unwrap();
        assert!(held(dir.path()).is_empty());
    }
}
