//! The index: one 64-byte entry per extent, sorted by guest offset.
//!
//! Lookup by guest offset is a binary search. [`Index::parse`] checks every
//! entry against the header, and that the two data segments are tiled exactly,
//! with no gap and no overlap, by the extents that claim to live in them.

use std::ops::Range;

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::header::{Header, incompat};

/// Size of one [`RawEntry`].
pub const ENTRY_SIZE: u32 = 64;

/// On-disk index entry. See FORMAT.md.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawEntry {
    /// First guest byte covered.
    pub guest_offset: U64,
    /// File offset of the stored bytes (0 for zero extents).
    pub file_offset: U64,
    /// Guest bytes covered.
    pub guest_len: U32,
    /// Stored bytes in the file.
    pub stored_len: U32,
    /// [`Encoding`] code.
    pub encoding: u8,
    /// [`Segment`] code.
    pub segment: u8,
    /// Zero.
    pub reserved: [u8; 6],
    /// BLAKE3 of the stored bytes (zero for zero extents).
    pub digest: [u8; 32],
}

const _: () = assert!(size_of::<RawEntry>() == ENTRY_SIZE as usize);

/// How an extent's bytes are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// Stored as is.
    Raw,
    /// A zstd frame that decodes to exactly `guest_len` bytes.
    Zstd,
    /// All zero; nothing stored.
    Zero,
}

impl Encoding {
    /// The on-disk code.
    pub fn code(self) -> u8 {
        match self {
            Encoding::Raw => 0,
            Encoding::Zstd => 1,
            Encoding::Zero => 2,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        [Encoding::Raw, Encoding::Zstd, Encoding::Zero].into_iter().find(|e| e.code() == code)
    }
}

/// Which segment an extent's bytes live in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Segment {
    /// The boot segment, in first-access order.
    Boot,
    /// The rest segment, in guest-offset order.
    Rest,
}

impl Segment {
    /// The on-disk code.
    pub fn code(self) -> u8 {
        match self {
            Segment::Boot => 0,
            Segment::Rest => 1,
        }
    }
}

/// A checked index entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Guest bytes covered.
    pub guest: Range<u64>,
    /// File range of the stored bytes (empty for zero extents).
    pub stored: Range<u64>,
    /// How the bytes are stored.
    pub encoding: Encoding,
    /// Where they are stored.
    pub segment: Segment,
    /// BLAKE3 of the stored bytes.
    pub digest: [u8; 32],
}

impl Entry {
    /// Guest length in bytes.
    pub fn guest_len(&self) -> u64 {
        self.guest.end - self.guest.start
    }

    /// Stored length in bytes.
    pub fn stored_len(&self) -> u64 {
        self.stored.end - self.stored.start
    }
}

/// What is wrong with an index.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The index checksum does not match.
    #[error("index checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        /// Checksum in the header.
        stored: u32,
        /// Checksum of the bytes.
        computed: u32,
    },
    /// One entry is invalid.
    #[error("index entry {index} (guest offset {guest_offset:#x}): {why}")]
    BadEntry {
        /// Position in the index.
        index: usize,
        /// Its guest offset as stored.
        guest_offset: u64,
        /// What is wrong.
        why: String,
    },
    /// A segment is not tiled exactly by its extents.
    #[error("{segment:?} segment is not tiled by its extents: {why}")]
    BadTiling {
        /// Which segment.
        segment: Segment,
        /// Where it breaks.
        why: String,
    },
    /// The root digest does not match the header and index.
    #[error("root digest mismatch: the header or index was altered")]
    RootDigestMismatch,
}

/// The checked index.
#[derive(Clone, Debug, Default)]
pub struct Index {
    entries: Vec<Entry>,
}

impl Index {
    /// Parses and checks `bytes` (the index of an image with header `header`).
    ///
    /// # Errors
    /// The first bad entry, an overlap, or a segment not tiled exactly.
    pub fn parse(bytes: &[u8], header: &Header) -> Result<Index, IndexError> {
        let computed = crc32c::crc32c(bytes);
        if computed != header.index_crc32c && !cfg!(fuzzing) {
            return Err(IndexError::BadChecksum { stored: header.index_crc32c, computed });
        }
        let raws = <[RawEntry]>::ref_from_bytes(bytes).map_err(|_| IndexError::BadEntry {
            index: 0,
            guest_offset: 0,
            why: "index length is not a multiple of the entry size".into(),
        })?;
        let mut entries = Vec::with_capacity(raws.len());
        let mut prev_end = 0u64;
        for (index, raw) in raws.iter().enumerate() {
            let bad = |why: String| IndexError::BadEntry { index, guest_offset: raw.guest_offset.get(), why };
            let entry = check_entry(raw, header).map_err(bad)?;
            if entry.guest.start < prev_end {
                return Err(bad(format!("overlaps or precedes the previous extent ending at {prev_end:#x}")));
            }
            prev_end = entry.guest.end;
            entries.push(entry);
        }
        let index = Index { entries };
        index.check_tiling(Segment::Boot, &header.boot)?;
        index.check_tiling(Segment::Rest, &header.rest)?;
        let boot_guest: u64 = index.entries.iter().filter(|e| e.segment == Segment::Boot).map(Entry::guest_len).sum();
        if boot_guest != header.boot_guest_bytes {
            return Err(IndexError::BadTiling {
                segment: Segment::Boot,
                why: format!("extents cover {boot_guest:#x} guest bytes, header says {:#x}", header.boot_guest_bytes),
            });
        }
        Ok(index)
    }

    /// Builds an index from entries already sorted by guest offset (used by the writer).
    pub(crate) fn from_sorted(entries: Vec<Entry>) -> Index {
        Index { entries }
    }

    fn check_tiling(&self, segment: Segment, range: &Range<u64>) -> Result<(), IndexError> {
        let mut stored: Vec<&Range<u64>> =
            self.entries.iter().filter(|e| e.segment == segment && e.encoding != Encoding::Zero).map(|e| &e.stored).collect();
        stored.sort_unstable_by_key(|r| r.start);
        let mut at = range.start;
        for r in stored {
            if r.start != at {
                let why = if r.start < at { "overlapping" } else { "gap before" };
                return Err(IndexError::BadTiling { segment, why: format!("{why} stored bytes at {:#x}", r.start) });
            }
            at = r.end;
        }
        if at != range.end {
            return Err(IndexError::BadTiling { segment, why: format!("extents end at {at:#x}, segment at {:#x}", range.end) });
        }
        Ok(())
    }

    /// All entries, sorted by guest offset.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Position of the first entry that ends after `guest_offset`. O(log n).
    pub fn position(&self, guest_offset: u64) -> usize {
        self.entries.partition_point(|e| e.guest.end <= guest_offset)
    }

    /// The entry containing `guest_offset`, if any. O(log n).
    pub fn find(&self, guest_offset: u64) -> Option<&Entry> {
        self.entries.get(self.position(guest_offset)).filter(|e| e.guest.start <= guest_offset)
    }

    /// The entries that overlap `range`, in guest order. O(log n) plus the result.
    pub fn overlapping(&self, range: Range<u64>) -> &[Entry] {
        let first = self.position(range.start);
        let count = self.entries[first..].partition_point(|e| e.guest.start < range.end);
        &self.entries[first..first + count]
    }

    /// The boot-segment entries that store bytes, in stream (first-access)
    /// order. Zero extents store nothing and so have no place in the stream.
    pub fn boot_order(&self) -> impl Iterator<Item = &Entry> {
        let mut boot: Vec<&Entry> = self.entries.iter().filter(|e| e.segment == Segment::Boot && e.encoding != Encoding::Zero).collect();
        boot.sort_by_key(|e| (e.stored.start, e.guest.start));
        boot.into_iter()
    }

    /// Serialises the entries.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * ENTRY_SIZE as usize);
        for e in &self.entries {
            out.extend_from_slice(to_raw(e).as_bytes());
        }
        out
    }
}

fn to_raw(e: &Entry) -> RawEntry {
    RawEntry {
        guest_offset: U64::new(e.guest.start),
        file_offset: U64::new(e.stored.start),
        guest_len: U32::new(u32::try_from(e.guest_len()).expect("writer bounds extent length")),
        stored_len: U32::new(u32::try_from(e.stored_len()).expect("writer bounds extent length")),
        encoding: e.encoding.code(),
        segment: e.segment.code(),
        reserved: [0; 6],
        digest: e.digest,
    }
}

fn check_entry(raw: &RawEntry, header: &Header) -> Result<Entry, String> {
    let encoding = Encoding::from_code(raw.encoding).ok_or_else(|| format!("unknown encoding {}", raw.encoding))?;
    let segment = match raw.segment {
        0 => Segment::Boot,
        1 => Segment::Rest,
        other => return Err(format!("unknown segment {other}")),
    };
    if raw.reserved != [0; 6] {
        return Err("reserved bytes are not zero".into());
    }
    let (guest_len, stored_len) = (raw.guest_len.get(), raw.stored_len.get());
    if guest_len == 0 || guest_len > header.max_extent_len {
        return Err(format!("guest length {guest_len:#x} not in 1..={:#x}", header.max_extent_len));
    }
    let start = raw.guest_offset.get();
    let guest = start
        .checked_add(u64::from(guest_len))
        .filter(|&end| end <= header.virtual_size)
        .map(|end| start..end)
        .ok_or_else(|| format!("extends past the virtual size {:#x}", header.virtual_size))?;
    match encoding {
        Encoding::Raw if stored_len != guest_len => return Err("raw extent with stored length != guest length".into()),
        Encoding::Zstd if header.incompatible & incompat::ZSTD == 0 => return Err("zstd extent without the zstd feature".into()),
        Encoding::Zstd if stored_len == 0 || stored_len > guest_len => {
            return Err(format!("zstd stored length {stored_len:#x} out of range"));
        }
        Encoding::Zero if stored_len != 0 || raw.file_offset.get() != 0 => return Err("zero extent with stored bytes".into()),
        _ => {}
    }
    let file_start = raw.file_offset.get();
    let stored = if encoding == Encoding::Zero {
        0..0
    } else {
        let seg = match segment {
            Segment::Boot => &header.boot,
            Segment::Rest => &header.rest,
        };
        let end = file_start
            .checked_add(u64::from(stored_len))
            .filter(|&end| file_start >= seg.start && end <= seg.end)
            .ok_or_else(|| format!("stored bytes {file_start:#x}+{stored_len:#x} lie outside the {segment:?} segment"))?;
        file_start..end
    };
    Ok(Entry { guest, stored, encoding, segment, digest: raw.digest })
}
