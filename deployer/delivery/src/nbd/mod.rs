//! A read-only NBD server: fixed newstyle handshake with `NBD_OPT_GO`,
//! `NBD_OPT_INFO`, `NBD_OPT_LIST` and `NBD_OPT_EXPORT_NAME`; simple replies;
//! many connections, many requests in flight on each.
//!
//! QEMU connects with `nbd+unix:///NAME?socket=PATH` or
//! `nbd://HOST:PORT/NAME`. Writes, trims and zeroing are refused with
//! `EPERM` (the export is advertised read-only); a VM writes to its own
//! qcow2 overlay on top of the export.
//!
//! What a client can make the server hold is bounded ([`Limits`]): read
//! data in flight or waiting to be sent counts against a per-connection and
//! a server-wide budget until it is written to the socket, reply buffers
//! kept for reuse are capped, connections are counted, a handshake must end
//! and a request once begun must arrive within time limits, and a reply the
//! client does not read fails the connection after a while. The server's
//! memory for reads is therefore at most `total_bytes + pool` (plus a few
//! KiB per connection), however clients behave.

pub mod proto;
mod session;

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

pub use crate::cache::ReadError;
use tokio::sync::Semaphore;

/// What an export must do: say its size and read.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the bytes at `offset` (within the size). The error
    /// stays typed until the reply, where one function maps it to an errno.
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> Pin<Box<dyn Future<Output = Result<(), ReadError>> + Send + 'a>>;

    /// Ranges within `range` known to read as zeros, sorted; clients that
    /// negotiated structured replies get them as holes, without data.
    fn zeros(&self, _range: Range<u64>) -> Vec<Range<u64>> {
        Vec::new()
    }
}

/// What one NBD server lets its clients use.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once; another is closed at once.
    pub max_connections: usize,
    /// Read data one connection may have in flight or queued for sending.
    pub connection_bytes: u64,
    /// Read data all connections together may have in flight or queued.
    pub total_bytes: u64,
    /// Time a client has for the whole handshake.
    pub handshake_timeout: Duration,
    /// Time a request has to arrive whole once its first byte has (an idle
    /// connection between requests is fine: a VM may not read for hours).
    pub request_timeout: Duration,
    /// Time a reply may wait for the client to read it.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            connection_bytes: 64 << 20,
            total_bytes: 256 << 20,
            handshake_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
        }
    }
}

/// The exports of a node, by name.
pub struct NbdServer {
    exports: RwLock<BTreeMap<String, Arc<dyn Export>>>,
    limits: Limits,
    /// Connections open.
    connections: Arc<Semaphore>,
    /// The server-wide read budget, in pages.
    budget: Arc<Semaphore>,
    /// Reply buffers kept for reuse.
    pool: session::Pool,
}

impl Default for NbdServer {
    fn default() -> Self {
        NbdServer::with_limits_inner(Limits::default())
    }
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer").field("exports", &self.names()).finish()
    }
}

impl NbdServer {
    /// A server with no exports and the default [`Limits`].
    pub fn new() -> Arc<Self> {
        Arc::new(NbdServer::default())
    }

    /// A server with no exports and these limits.
    pub fn with_limits(limits: Limits) -> Arc<Self> {
        Arc::new(NbdServer::with_limits_inner(limits))
    }

    fn with_limits_inner(limits: Limits) -> Self {
        NbdServer {
            exports: RwLock::default(),
            limits,
            connections: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            budget: Arc::new(Semaphore::new(session::pages_of(limits.total_bytes))),
            pool: session::Pool::default(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Bytes of read data in flight or waiting to be sent, over all
    /// connections (in 4 KiB units, as the budget counts them).
    pub fn bytes_in_flight(&self) -> u64 {
        let total = session::pages_of(self.limits.total_bytes);
        (total.saturating_sub(self.budget.available_permits()) as u64) * 4096
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.limits.max_connections.max(1) - self.connections.available_permits()
    }

    /// Adds (or replaces) an export. Connections already open keep the
    /// export they chose.
    pub fn add(&self, name: &str, export: Arc<dyn Export>) {
        self.exports.write().unwrap_or_else(|p| p.into_inner()).insert(name.to_owned(), export);
    }

    /// Removes an export; returns whether it existed.
    pub fn remove(&self, name: &str) -> bool {
        self.exports.write().unwrap_or_else(|p| p.into_inner()).remove(name).is_some()
    }

    /// The export names.
    pub fn names(&self) -> Vec<String> {
        self.exports.read().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    fn get(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.exports.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// Accepts connections on a unix socket until the listener fails.
    ///
    /// # Errors
    /// When accepting fails.
    pub async fn serve_unix(self: Arc<Self>, listener: tokio::net::UnixListener) -> io::Result<()> {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) if crate::http::is_transient(&e) => {
                    tracing::warn!(error = %e, "NBD accept failed; waiting");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.start(stream);
        }
    }

    /// Accepts connections on TCP until the listener fails.
    ///
    /// # Errors
    /// When accepting fails.
    pub async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) -> io::Result<()> {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) if crate::http::is_transient(&e) => {
                    tracing::warn!(error = %e, "NBD accept failed; waiting");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            let _ = stream.set_nodelay(true);
            tracing::debug!(%peer, "NBD connection");
            self.start(stream);
        }
    }

    /// Serves one connection on any byte stream (a socket, a pipe, a test's
    /// in-memory stream) until it ends, within this server's limits.
    pub async fn serve_connection<S: AsyncRead + AsyncWrite + Send + 'static>(self: &Arc<Self>, stream: S) {
        let Ok(slot) = Arc::clone(&self.connections).try_acquire_owned() else {
            tracing::warn!(limit = self.limits.max_connections, "too many NBD connections; closing a new one");
            return;
        };
        let mut timed = tokio_io_timeout::TimeoutStream::new(stream);
        timed.set_write_timeout(Some(self.limits.write_timeout));
        session::run(Arc::clone(self), Box::pin(timed)).await;
        drop(slot);
    }

    /// Serves one connection, if there is room for it.
    fn start<S: AsyncRead + AsyncWrite + Send + 'static>(self: &Arc<Self>, stream: S) {
        let server = Arc::clone(self);
        tokio::spawn(async move { server.serve_connection(stream).await });
    }
}

/// Binds a unix socket at `path` for NBD clients, refusing to replace what
/// is not a socket, or a socket another server still answers on; a stale
/// socket (nothing listening) is replaced.
///
/// # Errors
/// `AlreadyExists` naming the problem, or any error binding the socket.
pub fn bind_unix(path: &std::path::Path) -> io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket; not replacing it", path.display()),
            ));
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use: another server answers on it", path.display()),
                ));
            }
            Err(_) => std::fs::remove_file(path)?, // stale: nothing listens
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    tokio::net::UnixListener::bind(path)
}

impl Export for crate::cache::NodeCache {
    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> Pin<Box<dyn Future<Output = Result<(), ReadError>> + Send + 'a>> {
        Box::pin(self.read_into(offset, buf))
    }

    fn zeros(&self, range: Range<u64>) -> Vec<Range<u64>> {
        self.zero_ranges(range)
    }
}
