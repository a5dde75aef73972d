//! The qcow2 header (big-endian), checked before anything else is trusted.

use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, KnownLayout, Unaligned};

use super::Qcow2Error;

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;

/// Incompatible feature bits (qcow2 v3).
pub mod incompat {
    /// The image was not closed cleanly (refcounts may be stale; L1/L2 are fine).
    pub const DIRTY: u64 = 1 << 0;
    /// Corrupt: must not be used.
    pub const CORRUPT: u64 = 1 << 1;
    /// Data lives in an external file.
    pub const EXTERNAL_DATA: u64 = 1 << 2;
    /// `compression_type` is set.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// 128-bit L2 entries with subclusters.
    pub const EXTENDED_L2: u64 = 1 << 4;
    /// The bits this reader handles.
    pub const SUPPORTED: u64 = DIRTY | COMPRESSION_TYPE;
}

/// The fixed part of the header, versions 2 and 3.
#[derive(FromBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    magic: U32,
    version: U32,
    backing_file_offset: U64,
    backing_file_size: U32,
    cluster_bits: U32,
    size: U64,
    crypt_method: U32,
    l1_size: U32,
    l1_table_offset: U64,
    refcount_table_offset: U64,
    refcount_table_clusters: U32,
    nb_snapshots: U32,
    snapshots_offset: U64,
    // Version 3 only:
    incompatible_features: U64,
    compatible_features: U64,
    autoclear_features: U64,
    refcount_order: U32,
    header_length: U32,
}

/// A checked header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size (9 ..= 21).
    pub cluster_bits: u32,
    /// Virtual disk size.
    pub size: u64,
    /// Entries in the L1 table.
    pub l1_size: u64,
    /// File offset of the L1 table.
    pub l1_table_offset: u64,
    /// File offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u64,
    /// Snapshots.
    pub nb_snapshots: u32,
    /// File offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Backing file name, if any.
    pub backing_file: Option<String>,
    /// The backing file's format as the image declares it (header
    /// extension `0xe2792aca`), if it does.
    pub backing_format: Option<String>,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// How compressed clusters are compressed.
    pub compression: Compression,
}

/// The compression of compressed clusters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (the default).
    Zlib,
    /// zstd frames (compression_type 1).
    Zstd,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Parses the first bytes of a file of `file_len` bytes.
    ///
    /// # Errors
    /// Bad magic, version, cluster size, encryption, unsupported features,
    /// tables past the end of the file or absurd sizes.
    pub fn parse(bytes: &[u8], file_len: u64) -> Result<Header, Qcow2Error> {
        let bad = |why: String| Qcow2Error::BadHeader(why);
        let (raw, _) = RawHeader::ref_from_prefix(bytes).map_err(|_| bad(format!("file too short ({file_len} bytes)")))?;
        if raw.magic.get() != MAGIC {
            return Err(Qcow2Error::NotQcow2);
        }
        let version = raw.version.get();
        if version != 2 && version != 3 {
            return Err(bad(format!("unsupported version {version}")));
        }
        let cluster_bits = raw.cluster_bits.get();
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(format!("cluster_bits {cluster_bits} not in 9..=21")));
        }
        if raw.crypt_method.get() != 0 {
            return Err(bad("encrypted images are not supported".into()));
        }
        let incompatible = if version == 3 { raw.incompatible_features.get() } else { 0 };
        if incompatible & incompat::CORRUPT != 0 {
            return Err(bad("the image is marked corrupt".into()));
        }
        let unsupported = incompatible & !incompat::SUPPORTED;
        if unsupported != 0 {
            return Err(Qcow2Error::Unsupported(unsupported));
        }
        let within = |name: &str, off: u64, len: u64| -> Result<(), Qcow2Error> {
            match off.checked_add(len) {
                Some(end) if end <= file_len => Ok(()),
                _ => Err(Qcow2Error::BadHeader(format!("{name} {off:#x}+{len:#x} lies past the end of the file ({file_len:#x})"))),
            }
        };
        let cluster = 1u64 << cluster_bits;
        let aligned = |name: &str, off: u64| -> Result<(), Qcow2Error> {
            if off.is_multiple_of(cluster) { Ok(()) } else { Err(bad(format!("{name} offset {off:#x} is not cluster-aligned"))) }
        };
        // Version 3 declares its header's length and refcount width; version 2 has fixed ones.
        let (header_length, refcount_order) =
            if version == 3 { (u64::from(raw.header_length.get()), raw.refcount_order.get()) } else { (72, 4) };
        if version == 3 && (header_length < 104 || !header_length.is_multiple_of(8) || header_length > cluster) {
            return Err(bad(format!("header_length {header_length} (must be a multiple of 8 from 104 to the cluster size)")));
        }
        if refcount_order > 6 {
            return Err(bad(format!("refcount_order {refcount_order} (refcounts are at most 64 bits: 0..=6)")));
        }
        let l1_size = u64::from(raw.l1_size.get());
        aligned("L1 table", raw.l1_table_offset.get())?;
        within("L1 table", raw.l1_table_offset.get(), l1_size * 8)?;
        let refcount_table_clusters = u64::from(raw.refcount_table_clusters.get());
        aligned("refcount table", raw.refcount_table_offset.get())?;
        within("refcount table", raw.refcount_table_offset.get(), refcount_table_clusters * cluster)?;
        // Each L2 table covers cluster/8 clusters: the L1 must cover the disk, and no more than 8x.
        let per_l1 = cluster * (cluster / 8);
        let size = raw.size.get();
        if size.div_ceil(per_l1) > l1_size || l1_size > size.div_ceil(per_l1).max(1) * 8 + 64 {
            return Err(bad(format!("L1 size {l1_size} does not fit a {size}-byte disk")));
        }
        let nb_snapshots = raw.nb_snapshots.get();
        if nb_snapshots > MAX_SNAPSHOTS {
            return Err(bad(format!("{nb_snapshots} snapshots (at most {MAX_SNAPSHOTS})")));
        }
        if nb_snapshots > 0 {
            aligned("snapshot table", raw.snapshots_offset.get())?;
            // Each snapshot header is at least 40 bytes.
            within("snapshot table", raw.snapshots_offset.get(), u64::from(nb_snapshots) * 40)?;
        }
        let backing_file = match raw.backing_file_offset.get() {
            0 => None,
            off => {
                let len = u64::from(raw.backing_file_size.get());
                if len == 0 || len > 1023 || off < header_length || off.checked_add(len).is_none_or(|e| e > bytes.len() as u64) {
                    return Err(bad("backing file name out of range".into()));
                }
                let name = std::str::from_utf8(&bytes[off as usize..(off + len) as usize])
                    .map_err(|_| bad("backing file name is not UTF-8".into()))?;
                Some(name.to_owned())
            }
        };
        let extensions_end = match raw.backing_file_offset.get() {
            0 => cluster,
            off => off,
        };
        let backing_format = extensions(bytes, header_length, extensions_end.min(bytes.len() as u64))?;
        let compression = match (incompatible & incompat::COMPRESSION_TYPE != 0, header_length > 104, bytes.get(104)) {
            (false, _, _) => Compression::Zlib,
            (true, true, Some(0)) => Compression::Zlib,
            (true, true, Some(1)) => Compression::Zstd,
            (true, _, other) => return Err(bad(format!("unknown compression type {other:?}"))),
        };
        Ok(Header {
            compression,
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset: raw.l1_table_offset.get(),
            refcount_table_offset: raw.refcount_table_offset.get(),
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset: raw.snapshots_offset.get(),
            backing_file,
            backing_format,
            incompatible,
        })
    }
}

/// Most snapshots an image may list (QEMU's limit).
const MAX_SNAPSHOTS: u32 = 65536;
/// Header extension: the backing file's format name.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// Walks the header extensions in `bytes[start..end]`; returns the backing
/// format they declare. Extensions this reader does not know are skipped
/// (the specification allows that); one that runs past `end` is an error.
fn extensions(bytes: &[u8], start: u64, end: u64) -> Result<Option<String>, Qcow2Error> {
    let bad = |why: String| Qcow2Error::BadHeader(why);
    let mut at = start;
    let mut backing_format = None;
    while at + 8 <= end {
        let word = |o: u64| u32::from_be_bytes(bytes[o as usize..o as usize + 4].try_into().unwrap_or([0; 4]));
        let (kind, len) = (word(at), u64::from(word(at + 4)));
        if kind == 0 {
            return Ok(backing_format);
        }
        let data = at + 8;
        if data + len > end {
            return Err(bad(format!("header extension {kind:#x} at {at:#x} runs past the header ({len} bytes)")));
        }
        if kind == EXT_BACKING_FORMAT {
            let name = std::str::from_utf8(&bytes[data as usize..(data + len) as usize])
                .map_err(|_| bad("backing format name is not UTF-8".into()))?;
            backing_format = Some(name.to_owned());
        }
        at = data + len.next_multiple_of(8);
    }
    Ok(backing_format)
}
