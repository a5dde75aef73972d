//! The bootcache container format (v1): a disk image laid out so that one
//! sequential stream from offset 0 delivers what a guest needs to boot first.
//!
//! ```text
//!  offset 0
//!  +--------+-----------------+--------------------+---------------------+------+
//!  | header |      index      |    boot segment    |    rest segment     | meta |
//!  | 256 B  | 64 B per extent | first-access order | guest-offset order  | JSON |
//!  +--------+-----------------+--------------------+---------------------+------+
//! ```
//!
//! Every extent carries a BLAKE3 digest of its stored bytes that is checked
//! before any byte is returned; the header and index have CRC-32C checksums,
//! and one root digest over the header and index pins the whole image. The
//! index is sorted by guest offset, so a lookup is a binary search.
//! FORMAT.md is the specification. This crate holds no policy (which bytes go
//! in the boot segment is the converter's choice) and does no networking.
//!
//! ```
//! use std::io::Cursor;
//! use bootcache_format::{Image, PlannedExtent, Segment, Writer, WriterOptions, encode_extent};
//!
//! let disk = vec![7u8; 8192];
//! let plan = vec![
//!     PlannedExtent { guest: 4096..8192, segment: Segment::Boot },
//!     PlannedExtent { guest: 0..4096, segment: Segment::Rest },
//! ];
//! let opts = WriterOptions { virtual_size: 8192, block_size: 4096, max_extent_len: 4096, metadata: Default::default(), ..Default::default() };
//! let mut writer = Writer::new(Cursor::new(Vec::new()), opts, plan.clone())?;
//! for p in &plan {
//!     let range = p.guest.start as usize..p.guest.end as usize;
//!     writer.push(&encode_extent(&disk[range], Some(3)))?;
//! }
//! let (file, _summary) = writer.finish()?;
//!
//! let image = Image::open(file.into_inner())?;
//! let mut buf = vec![0u8; 100];
//! image.read_at(&mut buf, 4000)?;
//! assert_eq!(buf, vec![7u8; 100]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

mod chain;
mod digest;
mod extent;
mod header;
mod index;
mod io;
mod meta;
mod order;
mod reader;
mod writer;

pub use chain::{Chain, ParentRef, Piece};
pub use digest::{BadRootDigest, RootDigest};
pub use extent::{EncodedExtent, ExtentError, decode_extent, encode_extent, encode_extent_borrowed, encode_extent_owned, is_zero};
pub use header::{HEADER_SIZE, Header, HeaderError, MAGIC, MAX_CHAIN_LAYERS, MAX_EXTENT_LIMIT, RawHeader, feature_names, incompat};
pub use index::{ENTRY_SIZE, Encoding, Entry, Index, IndexError, RawEntry, Segment};
pub use io::ReadAt;
pub use meta::Metadata;
pub use order::BootRef;
pub use reader::{CheckReport, Error, Image, ParentError, hex};
pub use writer::{LayerOf, PlannedExtent, WriteError, WriteSummary, Writer, WriterOptions};

#[cfg(test)]
mod tests;
