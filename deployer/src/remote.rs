//! A container on a store, read by HTTP `Range` requests, with retries.
//!
//! Errors are sorted into transient (connection refused or reset, timeouts,
//! 5xx: retried with exponential backoff until the retry budget is spent) and
//! permanent (404, a store that ignores `Range`, a length that changed: given
//! up at once).

use std::ops::Range;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, ETAG, RANGE};

/// Errors from the store.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The store answered with something other than the requested bytes.
    #[error("{url}: {why}")]
    Protocol {
        /// The image URL.
        url: String,
        /// What was wrong.
        why: String,
    },
    /// The store could not be reached or failed, and retrying did not help.
    #[error("{url}: store unreachable after {attempts} attempts over {waited:?}")]
    Unreachable {
        /// The image URL.
        url: String,
        /// Requests tried.
        attempts: u32,
        /// Time spent.
        waited: Duration,
        /// The last failure.
        #[source]
        source: reqwest::Error,
    },
}

/// How long to keep retrying transient failures.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Give up after this long.
    pub budget: Duration,
    /// First pause; doubled up to `max_backoff`.
    pub first_backoff: Duration,
    /// Longest pause.
    pub max_backoff: Duration,
    /// Time limit of one request's connect and first byte.
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            budget: Duration::from_secs(60),
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// A container (or any file) on a store.
#[derive(Clone, Debug)]
pub struct Remote {
    client: reqwest::Client,
    url: String,
    len: u64,
    etag: Option<String>,
    retry: RetryPolicy,
}

enum Failure {
    Transient(reqwest::Error),
    Permanent(String),
}

impl Remote {
    /// Asks the store for the file's length (HEAD), retrying per `retry`.
    ///
    /// # Errors
    /// The store is unreachable, the file is missing, or no length is given.
    pub async fn open(url: &str, retry: RetryPolicy) -> Result<Remote, RemoteError> {
        let client = reqwest::Client::builder()
            .connect_timeout(retry.request_timeout)
            .read_timeout(retry.request_timeout)
            .build()
            .map_err(|e| RemoteError::Protocol { url: url.into(), why: format!("HTTP client: {e}") })?;
        let mut remote = Remote { client, url: url.into(), len: 0, etag: None, retry };
        let (len, etag) = remote
            .with_retry(|| async {
                let resp = remote.client.head(&remote.url).send().await.map_err(Failure::Transient)?;
                match resp.status() {
                    StatusCode::OK => {}
                    s if s.is_server_error() => return Err(Failure::Transient(resp.error_for_status().unwrap_err())),
                    s => return Err(Failure::Permanent(format!("HEAD answered {s}"))),
                }
                let len = header_u64(resp.headers().get(CONTENT_LENGTH))
                    .ok_or_else(|| Failure::Permanent("HEAD gave no Content-Length".into()))?;
                let etag = resp.headers().get(ETAG).and_then(|v| v.to_str().ok()).map(|s| s.trim_matches('"').to_owned());
                Ok((len, etag))
            })
            .await?;
        remote.len = len;
        remote.etag = etag;
        Ok(remote)
    }

    /// The URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The file's length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The store's entity tag, quotes removed (the root digest for the
    /// embedded store).
    pub fn etag(&self) -> Option<&str> {
        self.etag.as_deref()
    }

    /// Fetches `range` whole, retrying transient failures.
    ///
    /// # Errors
    /// See [`RemoteError`].
    pub async fn get(&self, range: Range<u64>) -> Result<Bytes, RemoteError> {
        let want = range.end - range.start;
        self.with_retry(|| async {
            let mut body = self.request(range.clone(), None).await?;
            let mut out = bytes::BytesMut::with_capacity(usize::try_from(want).unwrap_or(0));
            while let Some(chunk) = body.next().await {
                out.extend_from_slice(&chunk.map_err(Failure::Transient)?);
            }
            if out.len() as u64 != want {
                return Err(Failure::Permanent(format!("asked for {want} bytes, got {}", out.len())));
            }
            Ok(out.freeze())
        })
        .await
    }

    /// Starts a streamed fetch of `range` (one attempt; the caller resumes
    /// from where a broken stream stopped). Chunks arrive as the network
    /// delivers them. With `wait`, asks the server to wait up to that long
    /// for bytes it is itself still receiving (`Prefer: wait=N`, RFC 7240):
    /// what a node relaying its prefetch to another honours.
    ///
    /// # Errors
    /// See [`RemoteError`]; an interrupted body yields an error item.
    pub async fn stream(
        &self,
        range: Range<u64>,
        wait: Option<Duration>,
    ) -> Result<impl futures_util::Stream<Item = Result<Bytes, reqwest::Error>> + use<>, RemoteError> {
        self.with_retry(|| self.request(range.clone(), wait)).await
    }

    async fn request(
        &self,
        range: Range<u64>,
        prefer_wait: Option<Duration>,
    ) -> Result<impl futures_util::Stream<Item = Result<Bytes, reqwest::Error>> + use<>, Failure> {
        if range.start >= range.end || range.end > self.len {
            return Err(Failure::Permanent(format!("range {range:?} outside the file's {} bytes", self.len)));
        }
        let mut req = self.client.get(&self.url).header(RANGE, format!("bytes={}-{}", range.start, range.end - 1));
        if let Some(wait) = prefer_wait {
            req = req.header(reqwest::header::HeaderName::from_static("prefer"), format!("wait={}", wait.as_secs().max(1)));
        }
        let resp = req.send().await.map_err(Failure::Transient)?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::OK => return Err(Failure::Permanent("the store ignores Range requests".into())),
            s if s.is_server_error() => return Err(Failure::Transient(resp.error_for_status().unwrap_err())),
            s => return Err(Failure::Permanent(format!("GET answered {s}"))),
        }
        let expect = format!("bytes {}-{}/{}", range.start, range.end - 1, self.len);
        match resp.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()) {
            Some(got) if got == expect => {}
            got => return Err(Failure::Permanent(format!("Content-Range {got:?}, expected {expect:?} (did the file change?)"))),
        }
        Ok(resp.bytes_stream())
    }

    async fn with_retry<T, F, Fut>(&self, mut attempt: F) -> Result<T, RemoteError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let started = Instant::now();
        let mut backoff = self.retry.first_backoff;
        let mut attempts = 0;
        loop {
            attempts += 1;
            match attempt().await {
                Ok(v) => return Ok(v),
                Err(Failure::Permanent(why)) => return Err(RemoteError::Protocol { url: self.url.clone(), why }),
                Err(Failure::Transient(e)) => {
                    if started.elapsed() + backoff > self.retry.budget {
                        return Err(RemoteError::Unreachable { url: self.url.clone(), attempts, waited: started.elapsed(), source: e });
                    }
                    tracing::warn!(url = %self.url, attempts, error = %e, "store request failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                }
            }
        }
    }
}

fn header_u64(v: Option<&reqwest::header::HeaderValue>) -> Option<u64> {
    v?.to_str().ok()?.parse().ok()
}
