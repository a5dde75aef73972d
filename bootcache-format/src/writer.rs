//! Writing an image from a plan of extents, in one pass over the data.
//!
//! The plan fixes every extent's guest range and segment up front, so the
//! index has a known size: the writer leaves room for it, streams the extents'
//! bytes in file order (boot segment first, in the plan's order), appends the
//! metadata, then seeks back to write the index and the header.

use std::io::{self, Seek, SeekFrom, Write};
use std::ops::Range;

use zerocopy::IntoBytes;
use zerocopy::little_endian::{U16, U32, U64};

use crate::extent::EncodedExtent;
use crate::header::{
    HEADER_SIZE, MAGIC, MAX_CHAIN_LAYERS, MAX_EXTENT_LIMIT, ORDER_ENTRY_SIZE, RawHeader, VERSION_MAJOR, VERSION_MINOR,
    VERSION_MINOR_LAYERED, incompat,
};
use crate::index::{ENTRY_SIZE, Encoding, Entry, Index, Segment};
use crate::meta::Metadata;
use crate::order::BootRef;

/// One extent of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedExtent {
    /// Guest bytes it covers.
    pub guest: Range<u64>,
    /// Segment it goes in.
    pub segment: Segment,
}

/// The parent of a layer being written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerOf {
    /// The parent's root digest.
    pub digest: crate::RootDigest,
    /// The parent's `layer_depth` (0 when it stands alone).
    pub depth: u16,
}

/// Options that shape an image.
#[derive(Clone, Debug, Default)]
pub struct WriterOptions {
    /// Size of the guest disk.
    pub virtual_size: u64,
    /// Guest-space alignment the plan was made with (recorded, not enforced).
    pub block_size: u32,
    /// Largest guest length of an extent in the plan.
    pub max_extent_len: u32,
    /// The metadata block (a layer's `parent_locator` says where its parent is).
    pub metadata: Metadata,
    /// For a layer: its parent. Guest ranges the plan does not cover are
    /// then read from the parent.
    pub parent: Option<LayerOf>,
    /// For a layer: the boot stream across the chain, in first-access order.
    /// Its layer-0 entries are the plan's boot extents, in plan order (one
    /// found to be all zero stays listed and is skipped by readers).
    pub boot_order: Vec<BootRef>,
}

/// Errors from writing an image.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The plan is not valid.
    #[error("invalid extent plan: {0}")]
    BadPlan(String),
    /// Writing the output failed.
    #[error("cannot write the image")]
    Io(#[source] io::Error),
    /// `push` was called with the wrong extent count.
    #[error("expected {expected} extents, got {got}")]
    WrongCount {
        /// Extents in the plan.
        expected: usize,
        /// Extents pushed.
        got: usize,
    },
}

/// What was written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WriteSummary {
    /// The root digest.
    pub root_digest: [u8; 32],
    /// Stored bytes in the boot segment.
    pub boot_stored: u64,
    /// Guest bytes the boot segment covers.
    pub boot_guest: u64,
    /// Stored bytes in the rest segment.
    pub rest_stored: u64,
    /// Total file length.
    pub file_len: u64,
    /// Number of extents.
    pub extents: usize,
}

/// Where the segments ended up.
struct Layout {
    data_start: u64,
    boot_end: u64,
    meta_offset: u64,
    index_count: u64,
    order_count: u64,
}

/// Streams an image to `W`.
#[derive(Debug)]
pub struct Writer<W: Write + Seek> {
    out: W,
    opts: WriterOptions,
    plan: Vec<PlannedExtent>,
    entries: Vec<Entry>,
    pos: u64,
    boot_end: Option<u64>,
}

fn check_plan(plan: &[PlannedExtent], opts: &WriterOptions) -> Result<(), WriteError> {
    let bad = |s: String| Err(WriteError::BadPlan(s));
    if opts.max_extent_len == 0 || opts.max_extent_len > MAX_EXTENT_LIMIT || !opts.block_size.is_power_of_two() {
        return bad(format!("max_extent_len {} / block_size {} out of range", opts.max_extent_len, opts.block_size));
    }
    let mut seen_rest = false;
    let mut last_rest_end = 0;
    for e in plan {
        let len = e.guest.end.saturating_sub(e.guest.start);
        if len == 0 || len > u64::from(opts.max_extent_len) || e.guest.end > opts.virtual_size {
            return bad(format!("extent {:#x}..{:#x} is empty, too long or past the disk", e.guest.start, e.guest.end));
        }
        match e.segment {
            Segment::Boot if seen_rest => return bad("boot extents must come before rest extents".into()),
            Segment::Boot => {}
            Segment::Rest if e.guest.start < last_rest_end => return bad("rest extents must be in guest order".into()),
            Segment::Rest => {
                seen_rest = true;
                last_rest_end = e.guest.end;
            }
        }
    }
    match opts.parent {
        None if !opts.boot_order.is_empty() => return bad("a boot order table is for layers".into()),
        None => {}
        Some(p) if p.depth + 1 >= MAX_CHAIN_LAYERS => return bad(format!("the parent is {} layers deep already", p.depth)),
        Some(p) => {
            let own: Vec<u64> = plan.iter().filter(|e| e.segment == Segment::Boot).map(|e| e.guest.start).collect();
            let listed: Vec<u64> = opts.boot_order.iter().filter(|r| r.layer == 0).map(|r| r.guest_offset).collect();
            if own != listed {
                return bad("the boot order's own entries are not the plan's boot extents in order".into());
            }
            if let Some(r) = opts.boot_order.iter().find(|r| r.layer > p.depth + 1 || r.guest_offset >= opts.virtual_size) {
                return bad(format!("boot order entry {r:?} names no layer of the chain or lies past the disk"));
            }
        }
    }
    let mut sorted: Vec<&Range<u64>> = plan.iter().map(|e| &e.guest).collect();
    sorted.sort_unstable_by_key(|r| r.start);
    if let Some(w) = sorted.windows(2).find(|w| w[1].start < w[0].end) {
        return bad(format!("extents overlap at {:#x}", w[1].start));
    }
    Ok(())
}

impl<W: Write + Seek> Writer<W> {
    /// Starts an image with the extents of `plan`, boot extents first in
    /// first-access order, then rest extents in guest order.
    ///
    /// # Errors
    /// A plan with overlapping, empty or out-of-order extents, or an I/O error.
    pub fn new(mut out: W, opts: WriterOptions, plan: Vec<PlannedExtent>) -> Result<Self, WriteError> {
        check_plan(&plan, &opts)?;
        let data_start = data_start(&plan, &opts);
        out.seek(SeekFrom::Start(data_start)).map_err(WriteError::Io)?;
        let entries = Vec::with_capacity(plan.len());
        Ok(Writer { out, opts, plan, entries, pos: data_start, boot_end: None })
    }

    /// The plan, in file order.
    pub fn plan(&self) -> &[PlannedExtent] {
        &self.plan
    }

    /// Appends the next planned extent's encoded bytes.
    ///
    /// # Errors
    /// More pushes than planned extents, or an I/O error.
    pub fn push<B: AsRef<[u8]>>(&mut self, extent: &EncodedExtent<B>) -> Result<(), WriteError> {
        let planned =
            self.plan.get(self.entries.len()).ok_or(WriteError::WrongCount { expected: self.plan.len(), got: self.entries.len() + 1 })?;
        if planned.segment == Segment::Rest && self.boot_end.is_none() {
            self.boot_end = Some(self.pos);
        }
        let stored = if extent.encoding == Encoding::Zero {
            0..0
        } else {
            let bytes = extent.bytes.as_ref();
            self.out.write_all(bytes).map_err(WriteError::Io)?;
            let start = self.pos;
            self.pos += bytes.len() as u64;
            start..self.pos
        };
        self.entries.push(Entry {
            guest: planned.guest.clone(),
            stored,
            encoding: extent.encoding,
            segment: planned.segment,
            digest: extent.digest,
        });
        Ok(())
    }

    fn header(&self, layout: &Layout, zstd: bool, boot_guest: u64, meta: &[u8], index_bytes: &[u8]) -> RawHeader {
        let parent = self.opts.parent;
        let features = if zstd { incompat::ZSTD } else { 0 } | if parent.is_some() { incompat::PARENT } else { 0 };
        RawHeader {
            magic: MAGIC,
            version_major: U16::new(VERSION_MAJOR),
            version_minor: U16::new(if parent.is_some() { VERSION_MINOR_LAYERED } else { VERSION_MINOR }),
            header_size: U32::new(HEADER_SIZE),
            incompatible: U64::new(features),
            compatible: U64::ZERO,
            autoclear: U64::ZERO,
            virtual_size: U64::new(self.opts.virtual_size),
            index_offset: U64::new(u64::from(HEADER_SIZE)),
            index_count: U64::new(layout.index_count),
            index_entry_size: U32::new(ENTRY_SIZE),
            index_crc32c: U32::new(crc32c::crc32c(index_bytes)),
            boot_offset: U64::new(layout.data_start),
            boot_length: U64::new(layout.boot_end - layout.data_start),
            rest_offset: U64::new(layout.boot_end),
            rest_length: U64::new(layout.meta_offset - layout.boot_end),
            meta_offset: U64::new(layout.meta_offset),
            meta_length: U64::new(meta.len() as u64),
            block_size: U32::new(self.opts.block_size),
            max_extent_len: U32::new(self.opts.max_extent_len),
            meta_digest: *blake3::hash(meta).as_bytes(),
            root_digest: [0; 32],
            parent_digest: parent.map(|p| p.digest.0).unwrap_or_default(),
            boot_guest_bytes: U64::new(boot_guest),
            order_count: U64::new(layout.order_count),
            layer_depth: U16::new(parent.map(|p| p.depth + 1).unwrap_or(0)),
            reserved: [0; 10],
            header_crc32c: U32::ZERO,
        }
    }

    /// Writes metadata, index and header.
    ///
    /// # Errors
    /// Fewer pushes than planned extents, or an I/O error.
    pub fn finish(mut self) -> Result<(W, WriteSummary), WriteError> {
        if self.entries.len() != self.plan.len() {
            return Err(WriteError::WrongCount { expected: self.plan.len(), got: self.entries.len() });
        }
        let data_start = data_start(&self.plan, &self.opts);
        let boot_end = self.boot_end.unwrap_or(self.pos);
        let meta = serde_json::to_vec(&self.opts.metadata).map_err(|e| WriteError::Io(e.into()))?;
        self.out.write_all(&meta).map_err(WriteError::Io)?;
        let meta_offset = self.pos;
        let file_len = meta_offset + meta.len() as u64;

        let boot_guest: u64 = self.entries.iter().filter(|e| e.segment == Segment::Boot).map(Entry::guest_len).sum();
        let zstd = self.entries.iter().any(|e| e.encoding == Encoding::Zstd);
        let mut sorted = std::mem::take(&mut self.entries);
        sorted.sort_unstable_by_key(|e| e.guest.start);
        let summary_extents = sorted.len();
        let order_bytes = crate::order::to_bytes(&self.opts.boot_order);
        let index_bytes = Index::from_sorted(sorted).to_bytes();

        let order_count = self.opts.boot_order.len() as u64;
        let layout = Layout { data_start, boot_end, meta_offset, index_count: summary_extents as u64, order_count };
        let mut raw = self.header(&layout, zstd, boot_guest, &meta, &index_bytes);
        let mut hasher = blake3::Hasher::new();
        hasher.update(&raw.root_bytes());
        hasher.update(&index_bytes);
        hasher.update(&order_bytes);
        raw.root_digest = *hasher.finalize().as_bytes();
        raw.header_crc32c = U32::new(raw.compute_crc());

        self.out.seek(SeekFrom::Start(0)).map_err(WriteError::Io)?;
        self.out.write_all(raw.as_bytes()).map_err(WriteError::Io)?;
        self.out.write_all(&index_bytes).map_err(WriteError::Io)?;
        self.out.write_all(&order_bytes).map_err(WriteError::Io)?;
        self.out.flush().map_err(WriteError::Io)?;
        let summary = WriteSummary {
            root_digest: raw.root_digest,
            boot_stored: boot_end - data_start,
            boot_guest,
            rest_stored: meta_offset - boot_end,
            file_len,
            extents: summary_extents,
        };
        Ok((self.out, summary))
    }
}

/// Where the data starts: after the header, the index and the boot order table.
fn data_start(plan: &[PlannedExtent], opts: &WriterOptions) -> u64 {
    u64::from(HEADER_SIZE) + plan.len() as u64 * u64::from(ENTRY_SIZE) + opts.boot_order.len() as u64 * u64::from(ORDER_ENTRY_SIZE)
}
