//! A read-only NBD server: fixed newstyle handshake with `NBD_OPT_GO`,
//! `NBD_OPT_INFO`, `NBD_OPT_LIST` and `NBD_OPT_EXPORT_NAME`; simple replies;
//! many connections, many requests in flight on each.
//!
//! QEMU connects with `nbd+unix:///NAME?socket=PATH` or
//! `nbd://HOST:PORT/NAME`. Writes, trims and zeroing are refused with
//! `EPERM` (the export is advertised read-only); a VM writes to its own
//! qcow2 overlay on top of the export.

pub mod proto;
mod session;

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, RwLock};

/// What an export must do: say its size and read.
pub trait Export: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the bytes at `offset` (within the size).
    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>>;

    /// Ranges within `range` known to read as zeros, sorted; clients that
    /// negotiated structured replies get them as holes, without data.
    fn zeros(&self, _range: Range<u64>) -> Vec<Range<u64>> {
        Vec::new()
    }
}

/// The exports of a node, by name.
#[derive(Default)]
pub struct NbdServer {
    exports: RwLock<BTreeMap<String, Arc<dyn Export>>>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer").field("exports", &self.names()).finish()
    }
}

impl NbdServer {
    /// A server with no exports.
    pub fn new() -> Arc<Self> {
        Arc::new(NbdServer::default())
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
            let (stream, _) = listener.accept().await?;
            tokio::spawn(session::run(Arc::clone(&self), stream));
        }
    }

    /// Accepts connections on TCP until the listener fails.
    ///
    /// # Errors
    /// When accepting fails.
    pub async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) -> io::Result<()> {
        loop {
            let (stream, peer) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tracing::debug!(%peer, "NBD connection");
            tokio::spawn(session::run(Arc::clone(&self), stream));
        }
    }
}

impl Export for crate::cache::NodeCache {
    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'a>> {
        Box::pin(self.read_into(offset, buf))
    }

    fn zeros(&self, range: Range<u64>) -> Vec<Range<u64>> {
        self.zero_ranges(range)
    }
}
