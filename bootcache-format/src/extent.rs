//! Encoding and decoding one extent's bytes, with its digest.
//!
//! These are pure functions so that a converter can run them in parallel and
//! a network cache can verify fetched bytes without an open [`crate::Image`].

use std::borrow::Cow;

use crate::index::{Encoding, Entry};

/// An extent ready to be written: its encoding, stored bytes and digest.
/// The bytes are owned by default; [`encode_extent_borrowed`] leaves raw
/// extents borrowed from the caller's memory.
#[derive(Clone, Debug)]
pub struct EncodedExtent<B = Vec<u8>> {
    /// How the bytes are stored.
    pub encoding: Encoding,
    /// The stored bytes (empty for [`Encoding::Zero`]).
    pub bytes: B,
    /// BLAKE3 of `bytes` (zero for [`Encoding::Zero`]).
    pub digest: [u8; 32],
}

/// What is wrong with an extent's stored bytes.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
pub enum ExtentError {
    /// The zstd frame does not decode.
    #[error("zstd frame does not decode")]
    Decompress(#[source] std::io::Error),
    /// The stored bytes do not match the digest in the index.
    #[error("digest mismatch")]
    DigestMismatch,
    /// The decoded length differs from the index.
    #[error("decoded to {got:#x} bytes, index says {want:#x}")]
    LengthMismatch {
        /// Bytes decoded.
        got: u64,
        /// Guest length in the index.
        want: u64,
    },
}

/// Encodes `data`: all-zero data becomes [`Encoding::Zero`]; with `zstd_level`
/// the data is compressed and kept compressed only when that saves at least
/// one eighth. A raw extent's stored bytes stay borrowed from `data` (no
/// copy); only a compressed one is allocated.
pub fn encode_extent_borrowed(data: &[u8], zstd_level: Option<i32>) -> EncodedExtent<Cow<'_, [u8]>> {
    if is_zero(data) {
        return EncodedExtent { encoding: Encoding::Zero, bytes: Cow::Borrowed(&[]), digest: [0; 32] };
    }
    // Compressing from a slice into a Vec cannot fail except on allocation.
    if let Some(level) = zstd_level
        && let Ok(packed) = zstd::bulk::compress(data, level)
        && packed.len() <= data.len() - data.len() / 8
    {
        let digest = *blake3::hash(&packed).as_bytes();
        return EncodedExtent { encoding: Encoding::Zstd, bytes: Cow::Owned(packed), digest };
    }
    EncodedExtent { encoding: Encoding::Raw, bytes: Cow::Borrowed(data), digest: *blake3::hash(data).as_bytes() }
}

/// Like [`encode_extent_borrowed`], with the stored bytes owned (a raw
/// extent's are copied).
pub fn encode_extent(data: &[u8], zstd_level: Option<i32>) -> EncodedExtent {
    let e = encode_extent_borrowed(data, zstd_level);
    EncodedExtent { encoding: e.encoding, bytes: e.bytes.into_owned(), digest: e.digest }
}

/// Like [`encode_extent`], but takes the buffer: a raw extent keeps it as
/// its stored bytes (no copy).
pub fn encode_extent_owned(data: Vec<u8>, zstd_level: Option<i32>) -> EncodedExtent {
    let EncodedExtent { encoding, bytes, digest } = encode_extent_borrowed(&data, zstd_level);
    let packed = match bytes {
        Cow::Owned(packed) => packed,
        Cow::Borrowed(_) => Vec::new(),
    };
    EncodedExtent { encoding, bytes: if encoding == Encoding::Raw { data } else { packed }, digest }
}

/// Verifies `stored` against `entry` and returns the guest bytes (raw
/// extents are returned in the same allocation, without a copy).
///
/// # Errors
/// A digest mismatch, or a zstd frame that does not decode to exactly the
/// guest length. Never allocates more than the entry's guest length.
pub fn decode_extent(entry: &Entry, stored: Vec<u8>) -> Result<Vec<u8>, ExtentError> {
    let want = entry.guest_len();
    let want_usize = usize::try_from(want).map_err(|_| ExtentError::LengthMismatch { got: 0, want })?;
    match entry.encoding {
        Encoding::Zero => return Ok(vec![0; want_usize]),
        Encoding::Raw | Encoding::Zstd => {}
    }
    if blake3::hash(&stored).as_bytes() != &entry.digest && !cfg!(fuzzing) {
        return Err(ExtentError::DigestMismatch);
    }
    match entry.encoding {
        Encoding::Raw if stored.len() as u64 == want => Ok(stored),
        Encoding::Raw => Err(ExtentError::LengthMismatch { got: stored.len() as u64, want }),
        _ => {
            // Decompress into a buffer one byte larger than expected, so an
            // over-long frame is detected instead of truncated.
            let mut out = vec![0u8; want_usize + 1];
            let got = zstd::bulk::decompress_to_buffer(&stored, &mut out).map_err(ExtentError::Decompress)?;
            if got as u64 != want {
                return Err(ExtentError::LengthMismatch { got: got as u64, want });
            }
            out.truncate(got);
            Ok(out)
        }
    }
}

/// True when every byte is zero (compared 16 bytes at a time).
pub fn is_zero(data: &[u8]) -> bool {
    let chunks = data.chunks_exact(16);
    let tail = chunks.remainder();
    chunks.into_iter().all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0) && tail.iter().all(|&b| b == 0)
}
