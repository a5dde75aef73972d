//! HTTP for the store and the node API: serving within limits and bounded
//! bodies come from [`bootcache_http`] (re-exported here); `Range` handling
//! shared by everything that serves bytes is [`range`].

pub mod range;

pub use bootcache_http::{BodyLimits, Limits, bounded_body, is_transient, serve};
