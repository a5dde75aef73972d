//! Delivering bootcache images to compute nodes.
//!
//! - [`store`]: the embedded image store (any HTTP server with `Range`
//!   support will do; this one needs nothing installed).
//! - [`remote`]: a container on a store, read by `Range` requests with
//!   retries.
//! - [`cache`]: the node cache of one image, shared by every VM on the node
//!   that boots it: boot segment first, misses on demand, the rest in the
//!   background, every extent verified before it is served.
//! - [`nbd`]: the read-only NBD export QEMU boots from, through a qcow2
//!   overlay of its own.
//! - [`node`]: a compute node's caches and exports behind an HTTP API.
//! - [`auth`]: the credential that API requires (a bearer token file).
//! - [`http`]: serving HTTP within limits, and RFC 9110 `Range`.
//! - [`metrics`]: what a cache fetched and how guests fared.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use bootcache_delivery::{cache::{CacheOptions, NodeCache}, nbd::NbdServer};
//!
//! let cache = NodeCache::open("http://store:8080/debian.bcimg", CacheOptions::new("/var/cache/bootcache")).await?;
//! let nbd = NbdServer::new();
//! nbd.add("debian", Arc::new(cache));
//! let listener = tokio::net::UnixListener::bind("/run/bootcache/nbd.sock")?;
//! // QEMU: -drive file=nbd+unix:///debian?socket=/run/bootcache/nbd.sock (through a qcow2 overlay)
//! nbd.serve_unix(listener).await?;
//! # Ok(()) }
//! ```

pub use bootcache_http::auth;
pub mod cache;
pub mod http;
pub mod metrics;
pub mod nbd;
pub mod node;
pub mod remote;
pub mod store;
