//! Images in OCI registries: references (`HOST[:PORT]/REPO[:TAG]`,
//! `...@sha256:...`), a client of the distribution API that streams blobs
//! and checks every byte against its digest, and bootcache images stored
//! as OCI artifacts ([`artifact`]: one blob, read lazily with ranges as
//! from a store).
//!
//! ```no_run
//! # async fn f() -> Result<(), bootcache_registry::RegistryError> {
//! use bootcache_registry::{Credentials, Registry, artifact};
//! let registry = Registry::new(Credentials::Anonymous, vec![])?;
//! let reference = "127.0.0.1:5000/guests/reference:v1".parse().unwrap();
//! let pinned = artifact::push(&registry, "guest.bcimg".as_ref(), &reference).await?;
//! artifact::pull(&registry, &pinned, "copy.bcimg".as_ref()).await?;
//! # Ok(()) }
//! ```

pub mod artifact;
pub mod auth;
pub mod blobs;
mod client;
pub mod image;

use std::path::PathBuf;

pub use bootcache_api::reference::{BadReference, Digest, Reference, Target};
pub use client::{Clients, Credentials, Fetched, MANIFEST_TYPES, MAX_MANIFEST_BYTES, READ_TIMEOUT, Registry};

/// What went wrong with a registry. Every message names the reference
/// (never a credential).
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Not reached.
    #[error("{reference}: the registry cannot be reached: {why}")]
    Unreachable {
        /// The reference.
        reference: String,
        /// Why.
        why: String,
    },
    /// The registry answered with an error status.
    #[error("{reference}: {what}: the registry answered {status}{}", if code.is_empty() { String::new() } else { format!(" ({code})") })]
    Refused {
        /// The reference.
        reference: String,
        /// What was asked.
        what: String,
        /// The HTTP status.
        status: u16,
        /// The registry's error code (`MANIFEST_UNKNOWN`, `UNAUTHORIZED`...).
        code: String,
    },
    /// Content that does not match its digest.
    #[error("{reference}: {what} does not match its digest (expected {expected}, got {got})")]
    DigestMismatch {
        /// The reference.
        reference: String,
        /// What.
        what: String,
        /// The digest asked for.
        expected: Digest,
        /// The digest of what came.
        got: Digest,
    },
    /// An answer that breaks the protocol or a bound.
    #[error("{reference}: {why}")]
    Bad {
        /// The reference.
        reference: String,
        /// Why.
        why: String,
    },
    /// A manifest that is not a bootcache image.
    #[error("{reference} is not a bootcache image: {why}")]
    NotBootcache {
        /// The reference.
        reference: String,
        /// Why.
        why: String,
    },
    /// A manifest that is not a container image Docker can load.
    #[error("{reference} is not a container image: {why}")]
    NotContainer {
        /// The reference.
        reference: String,
        /// Why.
        why: String,
    },
    /// A token service named over plain HTTP where HTTPS is wanted.
    #[error(
        "{0}: a token service over plain HTTP is spoken to only on loopback, on the host of a registry named insecure, or when named insecure itself"
    )]
    NeedsTls(String),
    /// A credentials file that cannot be used.
    #[error("credentials {}: {why}", path.display())]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The HTTP client could not be made.
    #[error("the registry client cannot be made: {0}")]
    Client(String),
    /// A local file.
    #[error("{}: {why}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}
