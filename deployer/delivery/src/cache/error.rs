//! Why a guest read could not be served, typed until the NBD reply maps it
//! to an errno ([`crate::nbd`]); and the fetch failure a waiting read is
//! told about.

use std::io;
use std::time::Duration;

/// What last went wrong fetching for a cache (what a read that waited in
/// vain reports).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchFailure {
    /// The local cache file could not be written.
    #[error("cache file: {0}")]
    CacheFile(String),
    /// A response broke off.
    #[error("{0}")]
    Interrupted(String),
    /// The store could not be reached or refused.
    #[error("{0}")]
    Store(String),
    /// An extent's bytes failed their digest.
    #[error("extent at guest offset {guest:#x} failed verification")]
    Verification {
        /// First guest byte of the extent.
        guest: u64,
    },
}

/// Why a guest read failed.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// An extent the read needs failed its digest on the store.
    #[error("extent at guest offset {guest:#x} failed its digest check on the store; not served")]
    BadExtent {
        /// First guest byte of the extent.
        guest: u64,
    },
    /// The image was closed on this node and the read needs bytes it lacks.
    #[error("guest offset {offset:#x}: the image was closed on this node; only bytes cached before are served")]
    Closed {
        /// Where the read starts.
        offset: u64,
    },
    /// Reading the local cache file failed.
    #[error("reading the cache file")]
    Local(#[source] io::Error),
    /// The read lies past the end of the disk (or is over 4 GiB).
    #[error("read of {len} bytes at {offset:#x} past the disk's {size} bytes")]
    OutOfRange {
        /// Where the read starts.
        offset: u64,
        /// Its length.
        len: u64,
        /// The disk's size.
        size: u64,
    },
    /// The bytes did not arrive within the read timeout.
    #[error("guest offset {offset:#x}: waited {waited:?} for the store ({})", last.as_ref().map_or("no answer".to_owned(), ToString::to_string))]
    TimedOut {
        /// Where the read starts.
        offset: u64,
        /// How long it waited.
        waited: Duration,
        /// What last went wrong fetching, if anything did.
        last: Option<FetchFailure>,
    },
}

impl From<ReadError> for io::Error {
    fn from(e: ReadError) -> io::Error {
        let kind = match &e {
            ReadError::OutOfRange { .. } => io::ErrorKind::InvalidInput,
            ReadError::TimedOut { .. } => io::ErrorKind::TimedOut,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}
