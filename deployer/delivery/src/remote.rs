//! A container on a store, read by HTTP `Range` requests, with retries.
//!
//! Errors are sorted into transient (connection refused or reset, timeouts,
//! 5xx: retried with exponential backoff until the retry budget is spent) and
//! permanent (404, a store that ignores `Range`, a length that changed, a URL
//! that is not `http://`, a redirect: given up at once).
//!
//! Nothing the remote sends is trusted or repeated: lengths only bound what
//! is read (no buffer is sized by a claim before the bytes arrive), a body
//! that trickles below [`RetryPolicy::min_rate`] fails, redirects are not
//! followed, and errors name the URL without its credentials or query
//! ([`redact`]) and the answer's status, never its bytes.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, ETAG, RANGE};

pub use bootcache_http::{Authorizer, Authorizers};

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
    /// Slowest average rate (bytes per second) a fetched range may arrive
    /// at, after `request_timeout`: a remote that trickles fails instead of
    /// holding the fetch for as long as it likes.
    pub min_rate: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            budget: Duration::from_secs(60),
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            min_rate: 64 << 10,
        }
    }
}

/// A container (or any file) on a store.
#[derive(Clone, Debug)]
pub struct Remote {
    client: reqwest::Client,
    url: String,
    /// The URL as shown in errors and logs.
    shown: String,
    len: u64,
    etag: Option<String>,
    retry: RetryPolicy,
    auth: Option<Auth>,
}

/// What gives the remote's `Authorization` header (a registry's token).
#[derive(Clone)]
struct Auth(Arc<dyn Authorizer>);

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authorizer")
    }
}

enum Failure {
    Transient(reqwest::Error),
    Permanent(String),
}

/// A request that failed before it left (a URL the HTTP stack cannot use)
/// fails the same way every time: permanent. Anything else that failed to
/// send is worth another try.
fn sent(e: reqwest::Error) -> Failure {
    if e.is_builder() {
        return Failure::Permanent(format!("the request cannot be made: {}", e.without_url()));
    }
    Failure::Transient(e)
}

pub use bootcache_http::{MAX_URL, redact};

/// Checks that `url` is one this client fetches: `http://` with a host.
///
/// # Errors
/// [`RemoteError::Protocol`] naming what is wrong.
pub fn check_url(url: &str) -> Result<reqwest::Url, RemoteError> {
    let bad = |why: &str| RemoteError::Protocol { url: redact(url), why: why.into() };
    if url.len() > MAX_URL {
        return Err(bad(&format!("longer than {MAX_URL} bytes")));
    }
    let u = reqwest::Url::parse(url).map_err(|_| bad("not a URL"))?;
    match u.scheme() {
        "http" => {}
        "https" => return Err(bad("https is not supported: stores and peers are reached over plain HTTP on the deployment network")),
        _ => return Err(bad("only http:// URLs are fetched")),
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(bad("the URL has no host"));
    }
    Ok(u)
}

impl Remote {
    /// Asks the store for the file's length (HEAD), retrying per `retry`.
    ///
    /// # Errors
    /// The store is unreachable, the file is missing, or no length is given.
    pub async fn open(url: &str, retry: RetryPolicy) -> Result<Remote, RemoteError> {
        Remote::open_with(url, retry, None).await
    }

    /// Like [`Remote::open`], sending `authorization` (an `Authorization`
    /// header value: another node's credential) with every request.
    ///
    /// # Errors
    /// As [`Remote::open`].
    pub async fn open_with(url: &str, retry: RetryPolicy, authorization: Option<&str>) -> Result<Remote, RemoteError> {
        Remote::open_inner(url, retry, authorization, None).await
    }

    /// Like [`Remote::open`], with every request's `Authorization` from
    /// `auth` (asked again, and the request sent once more, when the
    /// remote refuses it with a 401): a registry's blob.
    ///
    /// # Errors
    /// As [`Remote::open`]; a 401 the authorizer cannot answer.
    pub async fn open_authorized(url: &str, retry: RetryPolicy, auth: Arc<dyn Authorizer>) -> Result<Remote, RemoteError> {
        Remote::open_inner(url, retry, None, Some(Auth(auth))).await
    }

    async fn open_inner(url: &str, retry: RetryPolicy, authorization: Option<&str>, auth: Option<Auth>) -> Result<Remote, RemoteError> {
        check_url(url)?;
        let shown = redact(url);
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(auth) = authorization {
            let mut v = reqwest::header::HeaderValue::from_str(auth)
                .map_err(|_| RemoteError::Protocol { url: shown.clone(), why: "the credential is not a valid header value".into() })?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(retry.request_timeout)
            .read_timeout(retry.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .default_headers(headers)
            .build()
            .map_err(|e| RemoteError::Protocol { url: shown.clone(), why: format!("HTTP client: {e}") })?;
        let mut remote = Remote { client, url: url.into(), shown, len: 0, etag: None, retry, auth };
        let (len, etag) = remote
            .with_retry(|| async {
                let resp = remote.send(|url| remote.client.head(url)).await?;
                match resp.status() {
                    StatusCode::OK => {}
                    s => return Err(refused(resp, s, "HEAD")),
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

    /// The URL without credentials or query, for messages ([`redact`]).
    pub fn shown(&self) -> &str {
        &self.shown
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
        // The whole range must arrive at no less than the minimum rate.
        let allowed = self.retry.request_timeout + Duration::from_secs_f64(want as f64 / self.retry.min_rate.max(1) as f64);
        self.with_retry(|| async {
            let fetch = async {
                let mut body = self.request(range.clone(), None).await?;
                // Grown as bytes arrive, never sized by the claim up front.
                let mut out = bytes::BytesMut::with_capacity(usize::try_from(want.min(1 << 20)).unwrap_or(0));
                while let Some(chunk) = body.next().await {
                    let chunk = chunk.map_err(Failure::Transient)?;
                    if (out.len() + chunk.len()) as u64 > want {
                        return Err(Failure::Permanent(format!("sent more than the {want} bytes asked for")));
                    }
                    out.extend_from_slice(&chunk);
                }
                if out.len() as u64 != want {
                    return Err(Failure::Permanent(format!("asked for {want} bytes, got {}", out.len())));
                }
                Ok(out.freeze())
            };
            match tokio::time::timeout(allowed, fetch).await {
                Ok(r) => r,
                Err(_) => Err(Failure::Permanent(format!(
                    "{want} bytes did not arrive within {allowed:.0?} (slower than {} KiB/s)",
                    self.retry.min_rate >> 10
                ))),
            }
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
        let make = |url: &str| {
            let req = self.client.get(url).header(RANGE, format!("bytes={}-{}", range.start, range.end - 1));
            match prefer_wait {
                Some(wait) => req.header(reqwest::header::HeaderName::from_static("prefer"), format!("wait={}", wait.as_secs().max(1))),
                None => req,
            }
        };
        let resp = self.send(make).await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::OK => return Err(Failure::Permanent("the store ignores Range requests".into())),
            s => return Err(refused(resp, s, "GET")),
        }
        let expect = format!("bytes {}-{}/{}", range.start, range.end - 1, self.len);
        if resp.headers().get(CONTENT_RANGE).and_then(|v| v.to_str().ok()) != Some(expect.as_str()) {
            // What it sent instead is not repeated: it is the remote's.
            return Err(Failure::Permanent(format!("the answer's Content-Range is not {expect:?} (did the file change?)")));
        }
        Ok(resp.bytes_stream())
    }

    /// Sends what `make` makes of the URL, with the authorizer's
    /// `Authorization` if there is one; a 401 is answered by it once (its
    /// challenge given), and the request sent again. A registry's redirect
    /// (its blobs kept on a storage service) is followed, a few times,
    /// without the credential.
    async fn send(&self, make: impl Fn(&str) -> reqwest::RequestBuilder) -> Result<reqwest::Response, Failure> {
        let Some(Auth(auth)) = &self.auth else { return make(&self.url).send().await.map_err(sent) };
        let mut refused: Option<String> = None;
        loop {
            let value = auth.authorization(refused.as_deref()).await.map_err(Failure::Permanent)?;
            let mut req = make(&self.url);
            if let Some(v) = value {
                let mut v = reqwest::header::HeaderValue::from_str(&v)
                    .map_err(|_| Failure::Permanent("the credential is not a valid header value".into()))?;
                v.set_sensitive(true);
                req = req.header(reqwest::header::AUTHORIZATION, v);
            }
            let mut resp = req.send().await.map_err(sent)?;
            for _ in 0..4 {
                if !resp.status().is_redirection() {
                    break;
                }
                let to = resp.headers().get(reqwest::header::LOCATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
                let to = resp.url().join(to).map_err(|_| Failure::Permanent("a redirect without a usable Location".into()))?;
                if !matches!(to.scheme(), "http" | "https") || to.as_str().len() > MAX_URL {
                    return Err(Failure::Permanent("a redirect to a URL this client does not fetch".into()));
                }
                resp = make(to.as_str()).send().await.map_err(sent)?;
            }
            if resp.status() != StatusCode::UNAUTHORIZED || refused.is_some() {
                return Ok(resp);
            }
            let challenge = resp.headers().get(reqwest::header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or_default();
            refused = Some(challenge.to_owned());
        }
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
                Err(Failure::Permanent(why)) => return Err(RemoteError::Protocol { url: self.shown.clone(), why }),
                Err(Failure::Transient(e)) => {
                    let e = e.without_url();
                    if started.elapsed() + backoff > self.retry.budget {
                        return Err(RemoteError::Unreachable { url: self.shown.clone(), attempts, waited: started.elapsed(), source: e });
                    }
                    tracing::warn!(url = %self.shown, attempts, error = %e, "store request failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                }
            }
        }
    }
}

/// What a status other than the expected one means: a server error is
/// worth retrying, anything else (404, 401, a redirect) is final.
fn refused(resp: reqwest::Response, status: StatusCode, method: &str) -> Failure {
    if status.is_server_error() {
        return match resp.error_for_status() {
            Err(e) => Failure::Transient(e),
            Ok(_) => Failure::Permanent(format!("{method} answered {status}")),
        };
    }
    if status.is_redirection() {
        return Failure::Permanent(format!("{method} answered {status}: redirects are not followed"));
    }
    Failure::Permanent(format!("{method} answered {status}"))
}

fn header_u64(v: Option<&reqwest::header::HeaderValue>) -> Option<u64> {
    v?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn a_url_is_shown_without_secrets_and_never_long() {
        assert_eq!(redact("http://u:pw@h/x?sig=1"), "http://u:***@h/x?***");
        let long = format!("http://h/{}", "a".repeat(1_500_000));
        assert_eq!(redact(&long), "<a URL of 1500009 bytes>");
        let e = check_url(&long).unwrap_err().to_string();
        assert!(e.len() < 100 && e.contains("longer than 2048 bytes"), "{e}");
    }

    #[tokio::test]
    async fn a_url_refused_once_is_not_tried_again() {
        // Too long: refused before any request, with a short message.
        let long = format!("http://127.0.0.1:9/{}", "a".repeat(1_500_000));
        let started = Instant::now();
        let e = Remote::open(&long, RetryPolicy::default()).await.unwrap_err();
        assert!(matches!(e, RemoteError::Protocol { .. }) && e.to_string().len() < 100, "{e}");
        assert!(started.elapsed() < Duration::from_secs(5), "not retried");
    }

    /// Gives "Bearer first" until refused, then "Bearer second".
    struct Tokens;

    impl Authorizer for Tokens {
        fn authorization<'a>(
            &'a self,
            refused: Option<&'a str>,
        ) -> std::pin::Pin<Box<dyn Future<Output = Result<Option<String>, String>> + Send + 'a>> {
            Box::pin(async move { Ok(Some(if refused.is_some() { "Bearer second" } else { "Bearer first" }.to_owned())) })
        }
    }

    /// A registry that refuses "Bearer first" and redirects the rest to a
    /// storage server; what each saw of the credential.
    fn registry_and_storage(data: &'static [u8]) -> (String, Arc<Mutex<Vec<String>>>) {
        use std::io::{Read, Write};
        let seen = Arc::new(Mutex::new(Vec::new()));
        let storage = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let registry = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let storage_url = format!("http://{}/blob?signed=1", storage.local_addr().unwrap());
        let url = format!("http://{}/v2/r/blobs/x", registry.local_addr().unwrap());
        let serve = move |l: std::net::TcpListener, seen: Arc<Mutex<Vec<String>>>, storage_url: Option<String>, who: &'static str| {
            std::thread::spawn(move || {
                for c in l.incoming() {
                    let Ok(mut c) = c else { return };
                    let mut head = Vec::new();
                    let mut b = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut b) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => head.extend_from_slice(&b[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).to_lowercase();
                    let auth = head.lines().find_map(|l| l.strip_prefix("authorization: ")).unwrap_or("none").to_owned();
                    seen.lock().unwrap().push(format!("{who}: {auth}"));
                    let answer = match &storage_url {
                        Some(_) if auth == "bearer first" => {
                            "HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Bearer realm=\"x\"\r\ncontent-length: 0\r\n\r\n".to_owned()
                        }
                        Some(to) => format!("HTTP/1.1 307 Temporary Redirect\r\nlocation: {to}\r\ncontent-length: 0\r\n\r\n"),
                        None => {
                            let range = head.lines().find_map(|l| l.strip_prefix("range: bytes=")).map(|r| {
                                let (a, b) = r.split_once('-').unwrap();
                                (a.trim().parse::<usize>().unwrap(), b.trim().parse::<usize>().unwrap())
                            });
                            match range {
                                Some((a, z)) if head.starts_with("get") => {
                                    let body = &data[a..=z];
                                    let mut r = format!(
                                        "HTTP/1.1 206 Partial Content\r\ncontent-range: bytes {a}-{z}/{}\r\ncontent-length: {}\r\n\r\n",
                                        data.len(),
                                        body.len()
                                    )
                                    .into_bytes();
                                    r.extend_from_slice(body);
                                    let _ = c.write_all(&r);
                                    continue;
                                }
                                _ => format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", data.len()),
                            }
                        }
                    };
                    let _ = c.write_all(answer.as_bytes());
                }
            })
        };
        serve(storage, Arc::clone(&seen), None, "storage");
        serve(registry, Arc::clone(&seen), Some(storage_url), "registry");
        (url, seen)
    }

    #[tokio::test]
    async fn a_refused_credential_is_renewed_and_a_redirect_followed_without_it() {
        static DATA: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let (url, seen) = registry_and_storage(DATA);
        let remote = Remote::open_authorized(&url, RetryPolicy::default(), Arc::new(Tokens)).await.unwrap();
        assert_eq!(remote.len(), DATA.len() as u64);
        assert_eq!(remote.get(3..20).await.unwrap().as_ref(), &DATA[3..20]);
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen[..3], ["registry: bearer first", "registry: bearer second", "storage: none"], "{seen:?}");
        assert!(seen.iter().all(|s| !s.starts_with("storage") || s.ends_with("none")), "storage never sees it: {seen:?}");
    }
}
