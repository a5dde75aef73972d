//! Opening an image and reading guest bytes from it, verified.

use std::io;
use std::sync::{Arc, Mutex};

use crate::extent::{ExtentError, decode_extent};
use crate::header::{HEADER_SIZE, Header, HeaderError, RawHeader};
use crate::index::{Encoding, Entry, Index, IndexError};
use crate::io::ReadAt;
use crate::meta::Metadata;
use zerocopy::FromBytes;

/// Errors from opening or reading an image.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An extent failed verification; the guest offset names it.
    #[error("extent at guest offset {guest_offset:#x} is bad")]
    BadExtent {
        /// First guest byte of the extent.
        guest_offset: u64,
        /// What is wrong.
        #[source]
        source: ExtentError,
    },
    /// The metadata block is not valid.
    #[error("metadata block is invalid: {0}")]
    BadMetadata(String),
    /// The boot order table of a layer is not valid.
    #[error("boot order table is invalid: {0}")]
    BadOrder(String),
    /// Layers that do not fit together.
    #[error("layer {layer} of the chain: {why}")]
    Chain {
        /// 0 the image opened, 1 its parent, ...
        layer: usize,
        /// What does not fit.
        why: String,
    },
    /// The header is invalid.
    #[error("invalid header")]
    Header(#[source] HeaderError),
    /// The index is invalid.
    #[error("invalid index")]
    Index(#[source] IndexError),
    /// Reading the underlying file failed.
    #[error("cannot read {what} at file offset {offset:#x}")]
    Io {
        /// What was being read.
        what: &'static str,
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The image is a layer: its guest bytes are read with its parent.
    #[error("the image is a layer over {parent}{}: open it with its parent", locator.as_deref().map(|l| format!(" ({l})")).unwrap_or_default())]
    Layered {
        /// The parent's root digest.
        parent: crate::RootDigest,
        /// Where the layer says the parent is.
        locator: Option<String>,
    },
    /// A guest read lies past the end of the disk.
    #[error("read {offset:#x}+{len:#x} past the virtual size {size:#x}")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Virtual size.
        size: u64,
    },
    /// A parent of the chain could not be opened, or is not the image named.
    #[error("parent {}(root {digest}) of layer {child}", locator.as_deref().map(|l| format!("{l} ")).unwrap_or_default())]
    Parent {
        /// The layer naming it: 0 the image opened, 1 its parent, ...
        child: usize,
        /// Where the child says it is.
        locator: Option<String>,
        /// The root digest the child names.
        digest: crate::RootDigest,
        /// What went wrong.
        #[source]
        source: Box<ParentError>,
    },
}

/// Why a parent could not be used.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
pub enum ParentError {
    /// It is not a valid image.
    #[error("is not a valid bootcache image")]
    Invalid(#[source] Error),
    /// The file found has another root digest.
    #[error("does not match: the file found has root {found}")]
    Mismatch {
        /// The root digest of what was found.
        found: crate::RootDigest,
    },
    /// It could not be found or opened.
    #[error("cannot be opened")]
    Missing(#[source] io::Error),
    /// The chain has more layers than a reader follows.
    #[error("the chain is deeper than {} layers", crate::header::MAX_CHAIN_LAYERS)]
    TooDeep,
}

fn read_vec<R: ReadAt + ?Sized>(src: &R, what: &'static str, offset: u64, len: u64) -> Result<Vec<u8>, Error> {
    // Callers only pass lengths already checked against the file length.
    let mut buf = vec![0u8; usize::try_from(len).map_err(|_| Error::Io { what, offset, source: io::ErrorKind::OutOfMemory.into() })?];
    src.read_exact_at(&mut buf, offset).map_err(|source| Error::Io { what, offset, source })?;
    Ok(buf)
}

/// An open bootcache image over any positional reader.
#[derive(Debug)]
pub struct Image<R> {
    src: R,
    header: Header,
    index: Index,
    order: Vec<crate::BootRef>,
    meta: Metadata,
    last: Mutex<Option<(usize, Arc<Vec<u8>>)>>,
}

impl<R: ReadAt> Image<R> {
    /// Opens and checks an image that stands alone: header, index, root
    /// digest and metadata. Extent data is checked when it is read. A layer
    /// is refused ([`Error::Layered`]): read it through a [`crate::Chain`].
    ///
    /// # Errors
    /// Any structural problem, named; never panics on bad input, and never
    /// allocates more than the file's own length justifies.
    pub fn open(src: R) -> Result<Self, Error> {
        let image = Self::open_layer(src)?;
        if let Some(parent) = image.header.parent {
            return Err(Error::Layered { parent, locator: image.meta.parent_locator.clone() });
        }
        Ok(image)
    }

    /// Opens and checks one file, which may be a layer: as [`Image::open`],
    /// and a layer's boot order table. Guest reads of a layer are refused;
    /// its extents can be read and checked.
    ///
    /// # Errors
    /// As [`Image::open`].
    pub fn open_layer(src: R) -> Result<Self, Error> {
        let file_len = src.size().map_err(|source| Error::Io { what: "length", offset: 0, source })?;
        if file_len < u64::from(HEADER_SIZE) {
            return Err(Error::Header(HeaderError::TooShort(file_len)));
        }
        let head = read_vec(&src, "header", 0, u64::from(HEADER_SIZE))?;
        let header = Header::parse(&head, file_len).map_err(Error::Header)?;
        let range = header.index_range();
        let index_bytes = read_vec(&src, "index", range.start, range.end - range.start)?;
        let index = Index::parse(&index_bytes, &header).map_err(Error::Index)?;
        let order_bytes = read_vec(&src, "boot order", header.order.start, header.order.end - header.order.start)?;
        let order = crate::order::parse(&order_bytes, &header, &index).map_err(Error::BadOrder)?;
        let raw = RawHeader::ref_from_prefix(&head).map_err(|_| Error::Header(HeaderError::TooShort(file_len)))?.0;
        let mut hasher = blake3::Hasher::new();
        hasher.update(&raw.root_bytes());
        hasher.update(&index_bytes);
        hasher.update(&order_bytes);
        if hasher.finalize().as_bytes() != &header.root_digest && !cfg!(fuzzing) {
            return Err(Error::Index(IndexError::RootDigestMismatch));
        }
        let meta_bytes = read_vec(&src, "metadata", header.meta.start, header.meta.end - header.meta.start)?;
        if blake3::hash(&meta_bytes).as_bytes() != &header.meta_digest && !cfg!(fuzzing) {
            return Err(Error::BadMetadata("digest mismatch".into()));
        }
        let mut meta: Metadata = serde_json::from_slice(&meta_bytes).map_err(|e| Error::BadMetadata(e.to_string()))?;
        // Containers written before `boot_seconds` had a field of its own kept it in `extra`.
        if meta.boot_seconds.is_none() {
            meta.boot_seconds = meta.extra.get("boot_seconds").and_then(serde_json::Value::as_f64);
        }
        if let Some(s) = meta.boot_seconds
            && !(0.0..=crate::meta::MAX_BOOT_SECONDS).contains(&s)
        {
            return Err(Error::BadMetadata(format!("boot_seconds {s} is not a time from 0 to a day")));
        }
        Ok(Image { src, header, index, order, meta, last: Mutex::new(None) })
    }

    /// What the image is read from.
    pub fn source(&self) -> &R {
        &self.src
    }

    /// The checked header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The checked index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// A layer's boot order table (empty for an image that stands alone,
    /// whose boot stream is its boot segment).
    pub fn boot_refs(&self) -> &[crate::BootRef] {
        &self.order
    }

    /// The metadata block.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    /// Size of the guest disk.
    pub fn virtual_size(&self) -> u64 {
        self.header.virtual_size
    }

    /// The root digest, as lowercase hex.
    pub fn root_digest_hex(&self) -> String {
        hex(&self.header.root_digest)
    }

    /// The root digest.
    pub fn root_digest(&self) -> crate::RootDigest {
        self.header.root()
    }

    /// Reads, verifies and decodes one extent.
    ///
    /// # Errors
    /// An I/O error, or [`Error::BadExtent`] naming the extent's guest offset.
    pub fn read_extent(&self, entry: &Entry) -> Result<Vec<u8>, Error> {
        let stored = read_vec(&self.src, "extent", entry.stored.start, entry.stored_len())?;
        decode_extent(entry, stored).map_err(|source| Error::BadExtent { guest_offset: entry.guest.start, source })
    }

    pub(crate) fn cached_extent(&self, pos: usize) -> Result<Arc<Vec<u8>>, Error> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((p, data)) = &*last
            && *p == pos
        {
            return Ok(Arc::clone(data));
        }
        let data = Arc::new(self.read_extent(&self.index.entries()[pos])?);
        *last = Some((pos, Arc::clone(&data)));
        Ok(data)
    }

    /// Fills `buf` with the guest bytes at `offset`. Ranges no extent covers
    /// read as zero. Every byte returned has been verified.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] past the virtual size, a bad extent, or
    /// [`Error::Layered`] for a layer opened alone.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        if let Some(parent) = self.header.parent {
            return Err(Error::Layered { parent, locator: self.meta.parent_locator.clone() });
        }
        let len = buf.len() as u64;
        let end = offset.checked_add(len).filter(|&e| e <= self.header.virtual_size).ok_or(Error::OutOfRange {
            offset,
            len,
            size: self.header.virtual_size,
        })?;
        buf.fill(0);
        let first = self.index.position(offset);
        for (i, entry) in self.index.overlapping(offset..end).iter().enumerate() {
            if entry.encoding == Encoding::Zero {
                continue; // already zero-filled; nothing to fetch or allocate
            }
            let data = self.cached_extent(first + i)?;
            let from = entry.guest.start.max(offset);
            let to = entry.guest.end.min(end);
            let src = &data[usize_of(from - entry.guest.start)..usize_of(to - entry.guest.start)];
            buf[usize_of(from - offset)..usize_of(to - offset)].copy_from_slice(src);
        }
        Ok(())
    }

    /// Verifies every extent in file order.
    ///
    /// # Errors
    /// The first bad extent, by its guest offset.
    pub fn check(&self, mut progress: impl FnMut(u64)) -> Result<CheckReport, Error> {
        let mut entries: Vec<&Entry> = self.index.entries().iter().collect();
        entries.sort_by_key(|e| e.stored.start);
        let mut report = CheckReport::default();
        for entry in entries {
            if entry.encoding != Encoding::Zero {
                self.read_extent(entry)?;
            }
            report.extents += 1;
            report.stored_bytes += entry.stored_len();
            report.guest_bytes += entry.guest_len();
            progress(entry.stored_len());
        }
        Ok(report)
    }
}

/// What [`Image::check`] verified.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Extents verified.
    pub extents: u64,
    /// Stored bytes hashed.
    pub stored_bytes: u64,
    /// Guest bytes they cover.
    pub guest_bytes: u64,
}

/// Offsets within one extent fit in usize (extents are at most 64 MiB).
fn usize_of(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
