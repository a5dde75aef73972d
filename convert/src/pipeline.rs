//! The conversion pipeline: source image + traces -> bootcache container, and back.

use std::borrow::Cow;
use std::io::{Seek, Write};
use std::time::Instant;

use bootcache_format::{
    BootRef, Chain, EncodedExtent, Encoding, Image, LayerOf, Metadata, ReadAt, WriteSummary, Writer, WriterOptions, encode_extent_borrowed,
    encode_extent_owned, hex,
};
use bootcache_trace::{AccessOrder, IntervalSet, OffsetSpace, Trace};
use rayon::prelude::*;
use serde::Serialize;

use crate::image::{ImageSink, ImageSource};
use crate::plan::{ParentPiece, Plan, plan, plan_layer};

/// How much guest data is encoded in parallel at a time.
const BATCH_BYTES: u64 = 16 << 20;
/// The guest grain at which a layer's bytes are compared with its parent's:
/// a changed byte makes its 4 KiB block the layer's own.
pub const LAYER_GRAIN: u64 = 4096;
/// How much of both disks is compared at a time.
const COMPARE_CHUNK: u64 = 4 << 20;

/// Errors from conversion.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The container could not be read.
    #[error("cannot read the bootcache image")]
    Image(#[source] bootcache_format::Error),
    /// A trace does not fit the source image.
    #[error("trace {index}: {why}")]
    IncompatibleTrace {
        /// Position in the trace list.
        index: usize,
        /// Why.
        why: String,
    },
    /// The parent image cannot be read, or cannot be this image's parent.
    #[error("the parent image: {0}")]
    Parent(String),
    /// The source image could not be read.
    #[error("cannot read the source image at offset {offset:#x}")]
    Source {
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The source image was written to while it was being converted.
    #[error("the source image changed while it was being converted; convert it again when nothing writes to it")]
    SourceChanged,
    /// The output could not be written.
    #[error("cannot write the output")]
    Write(#[source] std::io::Error),
    /// The container writer refused.
    #[error("cannot write the bootcache image")]
    Writer(#[source] bootcache_format::WriteError),
}

/// Options for [`convert`].
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// zstd level for extents, or `None` to store raw.
    pub zstd_level: Option<i32>,
    /// Keep bytes read in at least this many of the traces (1 = union).
    pub min_boots: usize,
    /// Largest boot extent. Nodes relaying an image pass an extent on once
    /// they have it whole: 256 KiB (the default) keeps each hop short.
    pub boot_extent_max: u32,
    /// Rest extents are cut at multiples of this.
    pub rest_extent_len: u32,
    /// Written into the container's metadata as `creator`.
    pub creator: String,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            zstd_level: None,
            min_boots: 1,
            boot_extent_max: 256 << 10,
            rest_extent_len: 256 << 10,
            creator: format!("bootcache-convert {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// What [`convert`] did.
#[derive(Clone, Debug, Serialize)]
pub struct ConvertReport {
    /// Size of the disk.
    pub virtual_size: u64,
    /// Bytes the source reports allocated.
    pub allocated_bytes: u64,
    /// Exact bytes in the (merged) boot set.
    pub boot_set_bytes: u64,
    /// Guest bytes in the boot segment (after alignment).
    pub boot_guest_bytes: u64,
    /// Stored bytes of the boot segment.
    pub boot_segment_bytes: u64,
    /// Stored bytes of the rest segment.
    pub rest_segment_bytes: u64,
    /// Extents written.
    pub extents: usize,
    /// Extents found to be all zero (no bytes stored).
    pub zero_extents: usize,
    /// Alignment used for the boot set.
    pub block_size: u64,
    /// Length of the container file.
    pub file_bytes: u64,
    /// Root digest, hex.
    pub root_digest: String,
    /// Wall time in seconds.
    pub seconds: f64,
    /// For a layer: its parent and what it shares with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<LayerReport>,
}

/// What a layer holds of its own and takes from its parent.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    /// The parent's root digest, hex.
    pub root_digest: String,
    /// Where the layer says the parent is.
    pub locator: String,
    /// Layers under the new one.
    pub depth: u16,
    /// Guest bytes that differ from the parent (what the layer stores).
    pub changed_bytes: u64,
    /// Guest bytes of the boot set read from the parent's extents.
    pub parent_boot_bytes: u64,
    /// Parent extents in the boot order.
    pub parent_boot_extents: usize,
}

fn boot_order(traces: &[Trace], size: u64, min_boots: usize) -> Result<AccessOrder, ConvertError> {
    let mut orders = Vec::with_capacity(traces.len());
    for (index, t) in traces.iter().enumerate() {
        let bad = |why: String| Err(ConvertError::IncompatibleTrace { index, why });
        if t.space != OffsetSpace::Guest {
            return bad("holds image-file offsets, not guest offsets; map it to guest space first".into());
        }
        if t.image.size != 0 && t.image.size != size {
            return bad(format!("was recorded on an image of {} bytes, the source has {size}", t.image.size));
        }
        if t.lost_records != 0 {
            tracing::warn!(trace = index, lost = t.lost_records, "trace lost records: its boot set may be incomplete");
        }
        let clipped = t.records.iter().filter_map(|r| r.boot_bytes()).filter(|b| b.end > size).count();
        if clipped > 0 {
            tracing::warn!(trace = index, reads = clipped, "reads past the end of the image are clipped");
        }
        orders.push(AccessOrder::from_timed(
            t.records.iter().filter_map(|r| Some((r.boot_bytes()?, r.t_ns))).map(|(b, t)| (b.start.min(size)..b.end.min(size), t)),
        ));
    }
    Ok(AccessOrder::merge(&orders, min_boots))
}

/// Converts `src` into a container written to `out`, the boot segment laid
/// out from `traces`. `progress` is called with guest bytes done.
///
/// # Errors
/// Unreadable source, a trace that does not fit the source, or a write error.
pub fn convert<W: Write + Seek + Send>(
    src: &dyn ImageSource,
    traces: &[Trace],
    out: W,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(W, ConvertReport), ConvertError> {
    let started = Instant::now();
    let size = src.size();
    if traces.is_empty() {
        tracing::warn!("no trace given: the boot segment is empty");
    }
    let order = boot_order(traces, size, opts.min_boots)?;
    let allocated = src.allocated().map_err(|source| ConvertError::Source { offset: 0, source })?;
    // Compressed, whole grains wherever any byte is allocated: where a copy
    // of the same data happens to hold holes (a sparse copy, an allocated
    // run of zeros) does not move extent boundaries, so versions share
    // their extents. The zeros this adds compress to nothing (an all-zero
    // grain is stored as none); stored raw they would cost their length.
    let stored = match opts.zstd_level {
        Some(_) => allocated.align(u64::from(opts.rest_extent_len), size),
        None => allocated.clone(),
    };
    let plan = plan(&order, &stored, size, u64::from(opts.boot_extent_max), u64::from(opts.rest_extent_len));
    let wopts = writer_options(size, &plan, traces, opts, None);
    let (out, mut report) = write_image(src, &plan, wopts, out, opts, progress)?;
    report.allocated_bytes = allocated.bytes();
    report.seconds = started.elapsed().as_secs_f64();
    Ok((out, report))
}

/// The guest ranges where `src` differs from the disk of `parent` (bytes
/// past the parent's size compared with zeros), in blocks of
/// [`LAYER_GRAIN`]: what a layer of `src` over `parent` must hold. Only
/// what either side may hold is read. `progress` is called with guest bytes
/// compared.
///
/// # Errors
/// An unreadable source or parent, or a parent larger than the source.
pub fn layer_changes<R: ReadAt>(src: &dyn ImageSource, parent: &Chain<R>, progress: &dyn Fn(u64)) -> Result<IntervalSet, ConvertError> {
    let size = src.size();
    let parent_size = parent.virtual_size();
    fits_under(parent_size, size)?;
    let parent_data =
        IntervalSet::from_ranges(parent.map().iter().filter(|p| parent.entry(p).encoding != Encoding::Zero).map(|p| p.guest.clone()));
    let allocated = src.allocated().map_err(|source| ConvertError::Source { offset: 0, source })?;
    let candidates = allocated.union(&parent_data).align(LAYER_GRAIN, size);
    let (mut ours, mut theirs) = (vec![0u8; COMPARE_CHUNK as usize], vec![0u8; COMPARE_CHUNK as usize]);
    let mut changed: Vec<std::ops::Range<u64>> = Vec::new();
    for r in candidates.ranges() {
        let mut at = r.start;
        while at < r.end {
            let n = (r.end - at).min(COMPARE_CHUNK);
            let (a, b) = (&mut ours[..n as usize], &mut theirs[..n as usize]);
            src.read_at(a, at).map_err(|source| ConvertError::Source { offset: at, source })?;
            let shared = parent_size.saturating_sub(at).min(n);
            parent.read_at(&mut b[..shared as usize], at).map_err(ConvertError::Image)?;
            b[shared as usize..].fill(0);
            for (i, (x, y)) in a.chunks(LAYER_GRAIN as usize).zip(b.chunks(LAYER_GRAIN as usize)).enumerate() {
                if x != y {
                    let start = at + i as u64 * LAYER_GRAIN;
                    let end = start + x.len() as u64;
                    match changed.last_mut() {
                        Some(last) if last.end == start => last.end = end,
                        _ => changed.push(start..end),
                    }
                }
            }
            progress(n);
            at += n;
        }
    }
    Ok(IntervalSet::from_ranges(changed))
}

/// Converts `src` into a layer over `parent` written to `out`: it stores the
/// `changed` ranges (see [`layer_changes`]), names the parent by root digest
/// and `locator` (where a reader should look for it, commonly its file name
/// beside the layer), and lists its boot stream across the chain from
/// `traces`. `progress` is called with guest bytes done.
///
/// # Errors
/// As [`convert`]; a parent that cannot be this image's parent.
#[allow(clippy::too_many_arguments, reason = "the inputs of a conversion, each needed")]
pub fn convert_layer<W: Write + Seek + Send, R: ReadAt>(
    src: &dyn ImageSource,
    parent: &Chain<R>,
    locator: &str,
    changed: &IntervalSet,
    traces: &[Trace],
    out: W,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(W, ConvertReport), ConvertError> {
    let started = Instant::now();
    let size = src.size();
    fits_under(parent.virtual_size(), size)?;
    let top = parent.top().header();
    if top.layer_depth + 2 > bootcache_format::MAX_CHAIN_LAYERS {
        return Err(ConvertError::Parent(format!("it is {} layers deep already", top.layer_depth)));
    }
    let order = boot_order(traces, size, opts.min_boots)?;
    let pieces: Vec<ParentPiece> = parent
        .map()
        .iter()
        .filter(|p| parent.entry(p).encoding != Encoding::Zero)
        .map(|p| ParentPiece {
            guest: p.guest.clone(),
            extent: BootRef { layer: u16::try_from(p.layer + 1).unwrap_or(u16::MAX), guest_offset: parent.entry(p).guest.start },
        })
        .collect();
    let lp = plan_layer(&order, changed, &pieces, size, u64::from(opts.boot_extent_max), u64::from(opts.rest_extent_len));
    let of = LayerOf { digest: parent.top().root_digest(), depth: top.layer_depth };
    let mut wopts = writer_options(size, &lp.plan, traces, opts, Some(locator));
    wopts.parent = Some(of);
    wopts.boot_order = lp.boot_order.clone();
    let (out, mut report) = write_image(src, &lp.plan, wopts, out, opts, progress)?;
    report.allocated_bytes = changed.bytes();
    report.parent = Some(LayerReport {
        root_digest: of.digest.to_string(),
        locator: locator.to_owned(),
        depth: of.depth + 1,
        changed_bytes: changed.bytes(),
        parent_boot_bytes: lp.parent_boot_bytes,
        parent_boot_extents: lp.boot_order.iter().filter(|r| r.layer > 0).count(),
    });
    report.seconds = started.elapsed().as_secs_f64();
    Ok((out, report))
}

/// A parent's disk is at most as large as its layer's.
fn fits_under(parent_size: u64, size: u64) -> Result<(), ConvertError> {
    if parent_size > size {
        return Err(ConvertError::Parent(format!("its disk ({parent_size} bytes) is larger than the source's ({size} bytes)")));
    }
    Ok(())
}

/// The writer's options for `plan`: metadata from the traces and options.
fn writer_options(size: u64, plan: &Plan, traces: &[Trace], opts: &ConvertOptions, parent_locator: Option<&str>) -> WriterOptions {
    // How long the recorded boots read (the latest of their last reads): a
    // node streams the rest of the image after that, not during the boot.
    let boot_ns = traces.iter().filter_map(|t| t.records.iter().filter(|r| r.boot_bytes().is_some()).map(|r| r.t_ns).max()).max();
    let extra = serde_json::json!({
        "traces": traces.len(),
        "min_boots": opts.min_boots,
        "boot_set_bytes": plan.boot_set_bytes,
        "boot_alignment": plan.block_size,
    });
    let boot_seconds = boot_ns.map(|n| (n as f64 / 1e9).min(86_400.0));
    WriterOptions {
        virtual_size: size,
        block_size: u32::try_from(plan.block_size).unwrap_or(1),
        max_extent_len: opts.boot_extent_max.max(opts.rest_extent_len),
        metadata: Metadata { creator: opts.creator.clone(), boot_seconds, parent_locator: parent_locator.map(str::to_owned), extra },
        ..Default::default()
    }
}

/// Writes the extents of `plan` from `src`; the report's times and
/// allocation are the caller's to fill.
fn write_image<W: Write + Seek + Send>(
    src: &dyn ImageSource,
    plan: &Plan,
    wopts: WriterOptions,
    out: W,
    opts: &ConvertOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(W, ConvertReport), ConvertError> {
    let size = wopts.virtual_size;
    let mut writer = Writer::new(out, wopts, plan.extents.clone()).map_err(ConvertError::Writer)?;
    let zero_extents = write_extents(src, &mut writer, &plan.extents, opts.zstd_level, progress)?;
    if src.changed().map_err(|source| ConvertError::Source { offset: 0, source })? {
        return Err(ConvertError::SourceChanged);
    }
    let (out, s): (W, WriteSummary) = writer.finish().map_err(ConvertError::Writer)?;
    let report = ConvertReport {
        virtual_size: size,
        allocated_bytes: 0,
        boot_set_bytes: plan.boot_set_bytes,
        boot_guest_bytes: s.boot_guest,
        boot_segment_bytes: s.boot_stored,
        rest_segment_bytes: s.rest_stored,
        extents: s.extents,
        zero_extents,
        block_size: plan.block_size,
        file_bytes: s.file_len,
        root_digest: hex(&s.root_digest),
        seconds: 0.0,
        parent: None,
    };
    Ok((out, report))
}

/// An extent's guest length and its encoding, borrowed from the source's
/// mapping where it could be.
type Encoded<'a> = (u64, EncodedExtent<Cow<'a, [u8]>>);

/// Encodes the planned extents in bounded batches, each batch in parallel,
/// while a writer thread appends the batch before, in order. An extent the
/// source holds in a mapped file is hashed and written straight from the
/// mapping, never copied into a buffer; any other is read into one. Returns
/// how many extents were all zero.
fn write_extents<W: Write + Seek + Send>(
    src: &dyn ImageSource,
    writer: &mut Writer<W>,
    extents: &[bootcache_format::PlannedExtent],
    zstd_level: Option<i32>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<usize, ConvertError> {
    let encode = |e: &bootcache_format::PlannedExtent| -> Result<Encoded<'_>, ConvertError> {
        let len = e.guest.end - e.guest.start;
        if let Some(bytes) = src.map(e.guest.clone()) {
            return Ok((len, encode_extent_borrowed(bytes, zstd_level)));
        }
        let mut buf =
            vec![
                0u8;
                usize::try_from(len)
                    .map_err(|_| ConvertError::Source { offset: e.guest.start, source: std::io::ErrorKind::OutOfMemory.into() })?
            ];
        src.read_at(&mut buf, e.guest.start).map_err(|source| ConvertError::Source { offset: e.guest.start, source })?;
        let enc = encode_extent_owned(buf, zstd_level);
        Ok((len, EncodedExtent { encoding: enc.encoding, bytes: Cow::Owned(enc.bytes), digest: enc.digest }))
    };
    let (to_write, encoded_batches) = std::sync::mpsc::sync_channel::<Vec<Encoded<'_>>>(1);
    std::thread::scope(|s| {
        let writing = s.spawn(move || -> Result<usize, ConvertError> {
            let mut zero_extents = 0;
            for batch in encoded_batches {
                for (len, enc) in batch {
                    zero_extents += usize::from(enc.encoding == Encoding::Zero);
                    writer.push(&enc).map_err(ConvertError::Writer)?;
                    progress(len);
                }
            }
            Ok(zero_extents)
        });
        for batch in batches(extents) {
            let encoded: Vec<_> = batch.par_iter().map(encode).collect::<Result<_, _>>()?;
            if to_write.send(encoded).is_err() {
                break; // the writer stopped on an error
            }
        }
        drop(to_write);
        writing.join().map_err(|_| ConvertError::Write(std::io::Error::other("writer thread panicked")))?
    })
}

/// Consecutive runs of extents of at most [`BATCH_BYTES`] guest bytes.
fn batches(extents: &[bootcache_format::PlannedExtent]) -> Vec<&[bootcache_format::PlannedExtent]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, e) in extents.iter().enumerate() {
        bytes += e.guest.end - e.guest.start;
        if bytes >= BATCH_BYTES {
            out.push(&extents[start..=i]);
            (start, bytes) = (i + 1, 0);
        }
    }
    if start < extents.len() {
        out.push(&extents[start..]);
    }
    out
}

/// Total guest bytes [`convert`] will report through `progress` for `src`.
///
/// # Errors
/// When the source's allocation cannot be listed.
pub fn planned_bytes(src: &dyn ImageSource) -> Result<u64, ConvertError> {
    Ok(src.allocated().map_err(|source| ConvertError::Source { offset: 0, source })?.bytes())
}

/// Writes every guest byte of the disk `chain` describes to `sink`, the
/// layers flattened, verifying each extent. `progress` is called with guest
/// bytes done.
///
/// # Errors
/// A bad extent (named by layer and guest offset) or a write error.
pub fn export_chain<R: ReadAt>(chain: &Chain<R>, mut sink: Box<dyn ImageSink>, progress: &dyn Fn(u64)) -> Result<(), ConvertError> {
    let mut buf = Vec::new();
    for piece in chain.map() {
        let len = piece.guest.end - piece.guest.start;
        if chain.entry(piece).encoding != Encoding::Zero {
            buf.resize(usize::try_from(len).unwrap_or(usize::MAX), 0);
            chain.read_at(&mut buf, piece.guest.start).map_err(ConvertError::Image)?;
            sink.write_at(&buf, piece.guest.start).map_err(ConvertError::Write)?;
        }
        progress(len);
    }
    sink.finish().map_err(ConvertError::Write)
}

/// Writes every guest byte of `image` to `sink`, verifying each extent.
/// `progress` is called with guest bytes done.
///
/// # Errors
/// A bad extent (named by guest offset) or a write error.
pub fn export<R: ReadAt>(image: &Image<R>, mut sink: Box<dyn ImageSink>, progress: &dyn Fn(u64)) -> Result<(), ConvertError> {
    let mut entries: Vec<_> = image.index().entries().iter().collect();
    entries.sort_by_key(|e| e.stored.start);
    for e in entries {
        if e.encoding != Encoding::Zero {
            let data = image.read_extent(e).map_err(ConvertError::Image)?;
            sink.write_at(&data, e.guest.start).map_err(ConvertError::Write)?;
        }
        progress(e.guest_len());
    }
    sink.finish().map_err(ConvertError::Write)
}
