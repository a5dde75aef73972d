//! The fixed 256-byte header at offset 0.
//!
//! [`RawHeader`] is the on-disk layout, read with zerocopy and never trusted;
//! [`Header`] is what [`Header::parse`] returns after checking, in order, the
//! magic, the version, the header size, the checksum, the feature words and
//! every offset and length against the size of the file.

use std::ops::Range;

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// The eight bytes every container starts with. Like PNG's, the high byte and
/// the CR LF / SUB / LF tail catch 7-bit and newline-mangling transfers.
pub const MAGIC: [u8; 8] = *b"\x89BCI\r\n\x1a\n";
/// The major version this crate writes and reads.
pub const VERSION_MAJOR: u16 = 1;
/// The minor version this crate writes for an image that stands alone (a
/// layer is written as 1.1: the `parent` feature, its order table).
pub const VERSION_MINOR: u16 = 0;
/// The minor version of layered images.
pub const VERSION_MINOR_LAYERED: u16 = 1;
/// Size of [`RawHeader`] in bytes.
pub const HEADER_SIZE: u32 = 256;
/// The largest `max_extent_len` a reader accepts (bounds every allocation).
pub const MAX_EXTENT_LIMIT: u32 = 64 << 20;
/// The largest metadata block a reader accepts.
pub const MAX_META_LEN: u64 = 16 << 20;
/// The most layers a chain may have, the image that stands alone included:
/// a layer's `layer_depth` is below this.
pub const MAX_CHAIN_LAYERS: u16 = 16;
/// Size of one boot order entry.
pub const ORDER_ENTRY_SIZE: u32 = 16;

/// Incompatible feature bits: a reader that does not know one must refuse the image.
pub mod incompat {
    /// Some extents are zstd-compressed.
    pub const ZSTD: u64 = 1 << 0;
    /// The image is a layer over a parent image (`parent_digest`), with a
    /// boot order table across its chain.
    pub const PARENT: u64 = 1 << 1;
    /// The bits this version can read.
    pub const SUPPORTED: u64 = ZSTD | PARENT;
    /// The bits this version knows by name.
    pub const KNOWN: u64 = ZSTD | PARENT;
}

/// The on-disk header. All integers are little-endian. See FORMAT.md.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// Major version; a different major is refused.
    pub version_major: U16,
    /// Minor version; a newer minor is readable.
    pub version_minor: U16,
    /// Size of this header in bytes.
    pub header_size: U32,
    /// Features a reader must understand.
    pub incompatible: U64,
    /// Features a reader may ignore.
    pub compatible: U64,
    /// Features a writer that does not know them must clear.
    pub autoclear: U64,
    /// Size of the guest disk in bytes.
    pub virtual_size: U64,
    /// File offset of the index.
    pub index_offset: U64,
    /// Number of index entries.
    pub index_count: U64,
    /// Size of one index entry (64).
    pub index_entry_size: U32,
    /// CRC-32C of the index bytes.
    pub index_crc32c: U32,
    /// File offset of the boot segment.
    pub boot_offset: U64,
    /// Stored bytes in the boot segment.
    pub boot_length: U64,
    /// File offset of the rest segment (= boot_offset + boot_length).
    pub rest_offset: U64,
    /// Stored bytes in the rest segment.
    pub rest_length: U64,
    /// File offset of the metadata block (JSON).
    pub meta_offset: U64,
    /// Length of the metadata block.
    pub meta_length: U64,
    /// Guest-space granularity the writer aligned extents to (informational).
    pub block_size: U32,
    /// Upper bound on the guest length of any extent.
    pub max_extent_len: U32,
    /// BLAKE3 of the metadata block.
    pub meta_digest: [u8; 32],
    /// BLAKE3 of this header (with `root_digest` and `header_crc32c` zeroed) and the index.
    pub root_digest: [u8; 32],
    /// Root digest of the parent image when `incompat::PARENT` is set; zero otherwise.
    pub parent_digest: [u8; 32],
    /// Guest bytes covered by boot-segment extents.
    pub boot_guest_bytes: U64,
    /// Entries in the boot order table (layered images; zero otherwise).
    pub order_count: U64,
    /// Layers below this one: 0 for an image that stands alone.
    pub layer_depth: U16,
    /// Zero.
    pub reserved: [u8; 10],
    /// CRC-32C of this header with this field zeroed.
    pub header_crc32c: U32,
}

const _: () = assert!(size_of::<RawHeader>() == HEADER_SIZE as usize);

/// What is wrong with a header.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The header's checksum does not match its bytes.
    #[error("header checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        /// Checksum in the header.
        stored: u32,
        /// Checksum of the bytes.
        computed: u32,
    },
    /// A field that must hold a given value does not.
    #[error("invalid header field {field}: {why}")]
    BadField {
        /// Field name as in FORMAT.md.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// The header size field is not one this version can read.
    #[error("unsupported header size {0} (expected {HEADER_SIZE})")]
    BadHeaderSize(u32),
    /// The file does not start with [`MAGIC`].
    #[error("not a bootcache image (bad magic {0:02x?})")]
    BadMagic([u8; 8]),
    /// The file is shorter than a header.
    #[error("file too short for a header: {0} bytes")]
    TooShort(u64),
    /// The image needs features this reader does not have.
    #[error("image requires unsupported features: {names} (bits {bits:#x})")]
    UnsupportedFeatures {
        /// The unsupported bits.
        bits: u64,
        /// Their names, or `unknown`.
        names: String,
    },
    /// The major version is not one this crate reads.
    #[error("unsupported format version {major}.{minor} (this reader supports {VERSION_MAJOR}.x)")]
    UnsupportedVersion {
        /// Major version found.
        major: u16,
        /// Minor version found.
        minor: u16,
    },
}

/// A header whose fields have been checked against each other and the file size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Minor version of the writer.
    pub version_minor: u16,
    /// Incompatible feature bits (all supported).
    pub incompatible: u64,
    /// Compatible feature bits (may include unknown ones).
    pub compatible: u64,
    /// Size of the guest disk in bytes.
    pub virtual_size: u64,
    /// File offset of the index.
    pub index_offset: u64,
    /// Number of index entries.
    pub index_count: u64,
    /// CRC-32C of the index bytes.
    pub index_crc32c: u32,
    /// Boot segment's file range.
    pub boot: Range<u64>,
    /// Rest segment's file range.
    pub rest: Range<u64>,
    /// Metadata's file range.
    pub meta: Range<u64>,
    /// Guest-space alignment used by the writer.
    pub block_size: u32,
    /// Upper bound on any extent's guest length.
    pub max_extent_len: u32,
    /// BLAKE3 of the metadata block.
    pub meta_digest: [u8; 32],
    /// The root digest that pins the whole image.
    pub root_digest: [u8; 32],
    /// Guest bytes covered by boot-segment extents.
    pub boot_guest_bytes: u64,
    /// The parent's root digest, for a layer.
    pub parent: Option<crate::RootDigest>,
    /// Layers below this one (0 for an image that stands alone).
    pub layer_depth: u16,
    /// The boot order table's file range (empty for an image that stands alone).
    pub order: Range<u64>,
}

fn field(field: &'static str, why: impl Into<String>) -> HeaderError {
    HeaderError::BadField { field, why: why.into() }
}

/// Names of the feature bits in `bits`.
pub fn feature_names(bits: u64) -> String {
    let mut names = Vec::new();
    if bits & incompat::ZSTD != 0 {
        names.push("zstd".to_string());
    }
    if bits & incompat::PARENT != 0 {
        names.push("parent".to_string());
    }
    let unknown = bits & !incompat::KNOWN;
    if unknown != 0 {
        names.push(format!("unknown {unknown:#x}"));
    }
    names.join(", ")
}

impl RawHeader {
    /// CRC-32C of the header with the checksum field zeroed.
    pub fn compute_crc(&self) -> u32 {
        let mut copy = self.clone();
        copy.header_crc32c = U32::ZERO;
        crc32c::crc32c(copy.as_bytes())
    }

    /// The bytes the root digest covers from the header: `root_digest` and
    /// `header_crc32c` zeroed.
    pub fn root_bytes(&self) -> Vec<u8> {
        let mut copy = self.clone();
        copy.root_digest = [0; 32];
        copy.header_crc32c = U32::ZERO;
        copy.as_bytes().to_vec()
    }
}

fn segment(name: &'static str, off: u64, len: u64, file_len: u64) -> Result<Range<u64>, HeaderError> {
    let end = off
        .checked_add(len)
        .filter(|&end| end <= file_len)
        .ok_or_else(|| field(name, format!("{off:#x}+{len:#x} lies past the end of the file ({file_len:#x})")))?;
    Ok(off..end)
}

impl Header {
    /// The root digest.
    pub fn root(&self) -> crate::RootDigest {
        crate::RootDigest(self.root_digest)
    }

    /// Checks `bytes` (the first [`HEADER_SIZE`] bytes of a file of `file_len` bytes).
    ///
    /// # Errors
    /// Returns the first problem found, checking magic, then version, then
    /// sizes, checksum, features and the layout of the segments.
    pub fn parse(bytes: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        let raw = RawHeader::ref_from_prefix(bytes).map_err(|_| HeaderError::TooShort(file_len))?.0;
        if raw.magic != MAGIC {
            return Err(HeaderError::BadMagic(raw.magic));
        }
        let (major, minor) = (raw.version_major.get(), raw.version_minor.get());
        if major != VERSION_MAJOR {
            return Err(HeaderError::UnsupportedVersion { major, minor });
        }
        if raw.header_size.get() != HEADER_SIZE {
            return Err(HeaderError::BadHeaderSize(raw.header_size.get()));
        }
        let computed = raw.compute_crc();
        if computed != raw.header_crc32c.get() && !cfg!(fuzzing) {
            return Err(HeaderError::BadChecksum { stored: raw.header_crc32c.get(), computed });
        }
        let unsupported = raw.incompatible.get() & !incompat::SUPPORTED;
        if unsupported != 0 {
            return Err(HeaderError::UnsupportedFeatures { bits: unsupported, names: feature_names(unsupported) });
        }
        Self::check_layout(raw, file_len)
    }

    fn check_layout(raw: &RawHeader, file_len: u64) -> Result<Header, HeaderError> {
        if raw.index_entry_size.get() != crate::index::ENTRY_SIZE {
            return Err(field("index_entry_size", format!("{} (expected {})", raw.index_entry_size, crate::index::ENTRY_SIZE)));
        }
        if raw.index_offset.get() != u64::from(HEADER_SIZE) {
            return Err(field("index_offset", format!("{:#x} (expected {HEADER_SIZE:#x})", raw.index_offset)));
        }
        let index_len =
            raw.index_count.get().checked_mul(u64::from(crate::index::ENTRY_SIZE)).ok_or_else(|| field("index_count", "absurd count"))?;
        let index = segment("index_count", raw.index_offset.get(), index_len, file_len)?;
        let (parent, layer_depth) = Self::check_parent(raw)?;
        let order_len =
            raw.order_count.get().checked_mul(u64::from(ORDER_ENTRY_SIZE)).ok_or_else(|| field("order_count", "absurd count"))?;
        let order = segment("order_count", index.end, order_len, file_len)?;
        let boot = segment("boot_length", raw.boot_offset.get(), raw.boot_length.get(), file_len)?;
        let rest = segment("rest_length", raw.rest_offset.get(), raw.rest_length.get(), file_len)?;
        let meta = segment("meta_length", raw.meta_offset.get(), raw.meta_length.get(), file_len)?;
        if boot.start != order.end || rest.start != boot.end || meta.start != rest.end {
            return Err(field("boot_offset", "segments must follow each other: index, boot order, boot, rest, metadata"));
        }
        if meta.end != file_len {
            return Err(field("meta_length", format!("the metadata ends at {:#x} but the file goes on to {file_len:#x}", meta.end)));
        }
        // Extents tile the disk without overlap, each at least one byte long.
        if raw.index_count.get() > raw.virtual_size.get() {
            return Err(field("index_count", format!("{} extents for a disk of {} bytes", raw.index_count, raw.virtual_size)));
        }
        if meta.end - meta.start > MAX_META_LEN {
            return Err(field("meta_length", format!("{:#x} exceeds the limit {MAX_META_LEN:#x}", meta.end - meta.start)));
        }
        let max_extent_len = raw.max_extent_len.get();
        if max_extent_len == 0 || max_extent_len > MAX_EXTENT_LIMIT {
            return Err(field("max_extent_len", format!("{max_extent_len:#x} (must be 1..={MAX_EXTENT_LIMIT:#x})")));
        }
        let block_size = raw.block_size.get();
        if !block_size.is_power_of_two() {
            return Err(field("block_size", format!("{block_size} is not a power of two")));
        }
        Ok(Header {
            version_minor: raw.version_minor.get(),
            incompatible: raw.incompatible.get(),
            compatible: raw.compatible.get(),
            virtual_size: raw.virtual_size.get(),
            index_offset: index.start,
            index_count: raw.index_count.get(),
            index_crc32c: raw.index_crc32c.get(),
            boot,
            rest,
            meta,
            block_size,
            max_extent_len,
            meta_digest: raw.meta_digest,
            root_digest: raw.root_digest,
            boot_guest_bytes: raw.boot_guest_bytes.get(),
            parent,
            layer_depth,
            order,
        })
    }

    /// The parent fields agree with the `parent` feature: a layer names a
    /// parent and sits at a depth within the bound; an image that stands
    /// alone has neither, nor an order table.
    fn check_parent(raw: &RawHeader) -> Result<(Option<crate::RootDigest>, u16), HeaderError> {
        let depth = raw.layer_depth.get();
        if raw.incompatible.get() & incompat::PARENT == 0 {
            if raw.parent_digest != [0; 32] || depth != 0 || raw.order_count.get() != 0 {
                return Err(field("parent_digest", "parent digest, layer depth or boot order set without the parent feature"));
            }
            return Ok((None, 0));
        }
        if raw.parent_digest == [0; 32] {
            return Err(field("parent_digest", "a layer must name its parent's root digest"));
        }
        if depth == 0 || depth >= MAX_CHAIN_LAYERS {
            return Err(field("layer_depth", format!("{depth} (a layer is 1..{MAX_CHAIN_LAYERS} layers above its base)")));
        }
        Ok((Some(crate::RootDigest(raw.parent_digest)), depth))
    }

    /// The file range of the index.
    pub fn index_range(&self) -> Range<u64> {
        self.index_offset..self.order.start
    }

    /// The file range a node reads before any extent: header, index and
    /// boot order table.
    pub fn head_range(&self) -> Range<u64> {
        0..self.boot.start
    }
}
