//! The plumbing the deployer's services share (the store, a node's API,
//! the control node's API, agents among themselves): bearer credentials
//! ([`auth`]), serving HTTP within limits (a cap on connections, a time
//! limit on each request's headers, which also closes a connection left
//! idle between requests, and on a response write that makes no progress),
//! request bodies read within a size and a time ([`bounded_body`]), errors
//! on one line ([`chain`]) and URLs shown without their secrets ([`redact`]).
//! No policy, no images: small enough for anything that serves or calls.

#![deny(missing_docs)]

pub mod auth;

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Limits of a server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; one more is closed at once.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, counted from the
    /// connection's start or the end of the previous response.
    pub header_timeout: Duration,
    /// Time a response write may wait for the client to read.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_connections: 512, header_timeout: Duration::from_secs(10), write_timeout: Duration::from_secs(60) }
    }
}

/// What [`bounded_body`] allows a request's body.
#[derive(Clone, Copy, Debug)]
pub struct BodyLimits {
    /// The most bytes.
    pub max_bytes: usize,
    /// The most time it may take to arrive, from the end of the headers.
    pub timeout: Duration,
}

/// Middleware (for `axum::middleware::from_fn_with_state`) that reads a
/// request's whole body before the handler runs, within `limits`: one
/// that is larger gets 413, one that trickles in slower 408, and neither
/// holds a connection past the timeout. Place it inside the credential
/// check, so a stranger's body is never read.
pub async fn bounded_body(
    axum::extract::State(limits): axum::extract::State<BodyLimits>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    let (parts, body) = request.into_parts();
    let bytes = match tokio::time::timeout(limits.timeout, axum::body::to_bytes(body, limits.max_bytes)).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return (StatusCode::PAYLOAD_TOO_LARGE, format!("the request body is over {} bytes or broken\n", limits.max_bytes))
                .into_response();
        }
        Err(_) => {
            let msg = format!("the request body did not arrive within {} s\n", limits.timeout.as_secs());
            let mut r = (StatusCode::REQUEST_TIMEOUT, msg).into_response();
            r.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
            return r;
        }
    };
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// Serves `router` on `listener` within `limits` until `stop` completes;
/// then stops accepting and returns once the connections under way end.
///
/// # Errors
/// When the listener fails for good (running out of descriptors is waited
/// out, not fatal).
pub async fn serve(listener: TcpListener, router: axum::Router, limits: Limits, stop: impl Future<Output = ()>) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) if is_transient(&e) => {
                    tracing::warn!(error = %e, "accept failed; waiting");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(e),
            },
            () = &mut stop => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(%peer, limit = limits.max_connections, "too many connections; closing a new one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mut timed = tokio_io_timeout::TimeoutStream::new(stream);
        timed.set_write_timeout(Some(limits.write_timeout));
        let io = TokioIo::new(Box::pin(timed));
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(io, TowerToHyperService::new(router.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
            drop(slot);
        });
    }
    graceful.shutdown().await;
    Ok(())
}

/// Accept errors that pass: out of descriptors or memory, a connection
/// aborted before it was accepted.
pub fn is_transient(e: &io::Error) -> bool {
    use rustix::io::Errno;
    let passing = [Errno::MFILE, Errno::NFILE, Errno::NOBUFS, Errno::NOMEM].map(Errno::raw_os_error);
    e.raw_os_error().is_some_and(|n| passing.contains(&n)) || e.kind() == io::ErrorKind::ConnectionAborted
}

/// An error with its chain of causes, on one line (what an API answers).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// The longest URL fetched (and shown).
pub const MAX_URL: usize = 2048;

/// `url` without what may be a secret: the password of its user part and
/// its query (a signed URL's signature), each replaced by `***`. Anything
/// that does not parse as a URL is shown as `<invalid URL>`, and one longer
/// than [`MAX_URL`] bytes as its length: a message never carries more.
pub fn redact(url: &str) -> String {
    if url.len() > MAX_URL {
        return format!("<a URL of {} bytes>", url.len());
    }
    let Ok(mut u) = url::Url::parse(url) else { return "<invalid URL>".into() };
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    if u.query().is_some() {
        u.set_query(Some("***"));
    }
    u.to_string()
}

/// Bytes as lowercase hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What an HTTP client asks for the `Authorization` header of a remote
/// that wants one it cannot know beforehand (a registry's token, which
/// expires): the value to send now, and a new one once the remote refused
/// a request (401) with its `WWW-Authenticate` challenge. Implemented
/// where the protocol is known (the registry crate); used by whoever
/// fetches (delivery's ranged reader). The values are secrets: never
/// logged, never put in a URL.
pub trait Authorizer: Send + Sync {
    /// The value to send (`None`: nothing yet); with `refused`, the
    /// challenge of the 401 that refused the last one: a value that
    /// answers it, or why none can.
    fn authorization<'a>(
        &'a self,
        refused: Option<&'a str>,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Option<String>, String>> + Send + 'a>>;
}

/// Which [`Authorizer`], if any, speaks for an origin URL (a registry's
/// blob URL: its registry's client); asked once per image a node opens.
pub type Authorizers = Arc<dyn Fn(&str) -> Option<Arc<dyn Authorizer>> + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_chain_and_urls_lose_their_secrets() {
        #[derive(Debug, thiserror::Error)]
        #[error("reading the file")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("disk gone"));
        assert_eq!(chain(&e), "reading the file: disk gone");
        assert_eq!(redact("http://u:pw@h/x?sig=1"), "http://u:***@h/x?***");
        assert_eq!(redact(&format!("http://h/{}", "a".repeat(3000))), "<a URL of 3009 bytes>");
        assert_eq!(hex(&[0, 255]), "00ff");
    }
}
