//! `bootcache convert`, `export`, `info`, `check` and `diff`.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use bootcache_convert::qcow2::Qcow2Sink;
use bootcache_convert::{
    ConvertOptions, Format, ImageSink, RawSink, convert as run_convert, convert_layer, export_chain, layer_changes, open as open_image,
    output, planned_bytes,
};
use bootcache_format::{Chain, Encoding, Image, ParentRef, Segment, feature_names};
use bootcache_trace::{OffsetSpace, Trace};
use clap::Args;
use serde::Serialize;

use super::Output;
use super::progress;

/// Source image formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SrcFormat {
    /// By the file's magic: qcow2 is read, other known formats (VMDK, VHD,
    /// VHDX, VDI, QED, LUKS, compressed files, bootcache containers) are
    /// refused by name, a file with no known magic is raw.
    Auto,
    /// A raw disk image, whatever its first bytes.
    Raw,
    /// A qcow2 image (v2 or v3; zlib or zstd clusters; backing chains).
    Qcow2,
}

impl SrcFormat {
    fn wanted(self) -> Option<Format> {
        match self {
            SrcFormat::Auto => None,
            SrcFormat::Raw => Some(Format::Raw),
            SrcFormat::Qcow2 => Some(Format::Qcow2),
        }
    }
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The source disk image (raw or qcow2).
    src: PathBuf,
    /// The source's format.
    #[arg(long, value_enum, default_value_t = SrcFormat::Auto)]
    src_format: SrcFormat,
    /// The bootcache image to write.
    dst: PathBuf,
    /// Write a layer over this bootcache image: only the 4 KiB blocks where
    /// the source differs from it are stored, the parent named by root digest
    /// and by its file name (beside the layer) or path. The source may be a
    /// qcow2 overlay whose backing file is the parent's source. The layer's
    /// boot order lists the parent's extents its boot reads, so a node that
    /// lacks the parent still fetches one ordered boot stream.
    #[arg(long, value_name = "IMAGE")]
    parent: Option<PathBuf>,
    /// Boot trace(s) whose reads go first; without one the boot segment is empty.
    #[arg(long = "trace", value_name = "TRACE")]
    traces: Vec<PathBuf>,
    /// With several traces, keep bytes read in at least K of them (default: all of the union).
    #[arg(long, value_name = "K", default_value_t = 1)]
    min_boots: usize,
    /// Compress extents with zstd at this level (kept raw where it does not pay).
    #[arg(long, value_name = "LEVEL", num_args = 0..=1, default_missing_value = "3")]
    zstd: Option<i32>,
    /// The longest extent of the boot segment (a power of two, 64K to 16M).
    /// Nodes relaying the image to each other pass an extent on once they
    /// have it whole, so shorter extents shorten each hop of a chain of
    /// nodes (16 nodes: 1.24 x one node's time at 256K, 1.91 x at 1M);
    /// longer ones mean fewer index entries and requests.
    #[arg(long, value_name = "SIZE", default_value = "256K", value_parser = parse_boot_extent)]
    boot_extent: u32,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
    /// Output format of the report.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

fn parse_boot_extent(s: &str) -> Result<u32, String> {
    let n = super::deliver::parse_size(s)?;
    if !n.is_power_of_two() || !(64 << 10..=16 << 20).contains(&n) {
        return Err(format!("{s}: a power of two from 64K to 16M"));
    }
    u32::try_from(n).map_err(|e| e.to_string())
}

pub fn convert(args: &ConvertArgs) -> anyhow::Result<ExitCode> {
    let opened = open_image(&args.src, args.src_format.wanted()).context("opening the source image")?;
    let is_qcow2 = opened.format == Format::Qcow2;
    let src = opened.source;
    let mut traces = Vec::with_capacity(args.traces.len());
    for p in &args.traces {
        let t = Trace::open(p).with_context(|| format!("reading trace {}", p.display()))?;
        // A qcow2 boot recorded with --no-map: map it through this image.
        traces.push(if t.space == OffsetSpace::ImageFile && is_qcow2 { super::trace::map_qcow2(&t, &args.src)? } else { t });
    }
    let opts = ConvertOptions {
        zstd_level: args.zstd,
        min_boots: args.min_boots,
        boot_extent_max: args.boot_extent,
        creator: format!("bootcache {}", env!("CARGO_PKG_VERSION")),
        ..Default::default()
    };
    // Written beside the destination and renamed over it only when complete:
    // a failed conversion leaves no half file and keeps an older one intact.
    let mut inputs: Vec<&Path> = opened.files.iter().map(PathBuf::as_path).collect();
    inputs.extend(args.traces.iter().map(PathBuf::as_path));
    let parent = args.parent.as_deref().map(open_chain).transpose()?;
    if let Some((_, files)) = &parent {
        inputs.extend(files.iter().map(PathBuf::as_path));
    }
    let (file, staged) = output::stage(&args.dst, &inputs)?;
    let out = BufWriter::with_capacity(64 << 10, file);
    let converting = || format!("converting {}", args.src.display());
    let (out, report) = if let (Some((chain, files)), Some(path)) = (&parent, &args.parent) {
        let bar = progress::bytes(chain.virtual_size(), "compare", args.quiet);
        let changed = layer_changes(src.as_ref(), chain, &|n| bar.inc(n)).with_context(converting)?;
        bar.finish_and_clear();
        let locator = locator(path, &files[0], &args.dst)?;
        let bar = progress::bytes(changed.bytes(), "convert", args.quiet);
        let done = convert_layer(src.as_ref(), chain, &locator, &changed, &traces, out, &opts, &|n| bar.inc(n)).with_context(converting)?;
        bar.finish_and_clear();
        done
    } else {
        let bar = progress::bytes(planned_bytes(src.as_ref())?, "convert", args.quiet);
        let done = run_convert(src.as_ref(), &traces, out, &opts, &|n| bar.inc(n)).with_context(converting)?;
        bar.finish_and_clear();
        done
    };
    let file = out.into_inner().map_err(std::io::IntoInnerError::into_error).context("writing the container")?;
    staged.commit(&file)?;
    if args.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("wrote {} ({} bytes, {} extents) in {:.2} s", args.dst.display(), report.file_bytes, report.extents, report.seconds);
        println!(
            "boot set {} bytes -> boot segment {} guest bytes, {} stored (alignment {})",
            report.boot_set_bytes, report.boot_guest_bytes, report.boot_segment_bytes, report.block_size
        );
        println!("rest segment {} stored bytes; {} all-zero extents cost nothing", report.rest_segment_bytes, report.zero_extents);
        if let Some(p) = &report.parent {
            println!(
                "layer over {} (root {}): {} guest bytes differ; its boot reads {} bytes in {} of the parent's extents",
                p.locator, p.root_digest, p.changed_bytes, p.parent_boot_bytes, p.parent_boot_extents
            );
        }
        println!("root digest {}", report.root_digest);
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens one bootcache container file, which may be a layer (a regular
/// file; another format is named).
fn open_layer(path: &Path) -> anyhow::Result<Image<File>> {
    let format = bootcache_convert::detect(path)?;
    if format != Format::Bootcache {
        bail!("{} is not a bootcache image: its magic says {format}", path.display());
    }
    let file = bootcache_convert::open_file(path)?;
    Image::open_layer(file).with_context(|| format!("{} is not a valid bootcache image", path.display()))
}

/// Opens a bootcache image and, for a layer, its parents: each where the
/// layer that names it says (a relative locator from that layer's
/// directory). Returns the chain and its files, the image's first.
fn open_chain(path: &Path) -> anyhow::Result<(Chain<File>, Vec<PathBuf>)> {
    chain_of(open_layer(path)?, path)
}

fn chain_of(top: Image<File>, path: &Path) -> anyhow::Result<(Chain<File>, Vec<PathBuf>)> {
    let mut files = vec![path.to_owned()];
    let chain = Chain::open(top, |p: ParentRef<'_>| {
        let named = p.locator.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "the layer names no file for it"))?;
        let dir = files.last().and_then(|f| f.parent()).map(Path::to_owned).unwrap_or_default();
        let found = dir.join(named);
        let file = bootcache_convert::open_file(&found).map_err(|e| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{e:#}")))?;
        files.push(found);
        Ok(file)
    })
    .with_context(|| format!("opening the layers under {}", path.display()))?;
    Ok((chain, files))
}

/// How a layer written to `dst` names its parent at `parent`: its file name
/// when both are in one directory, else its absolute path.
fn locator(given: &Path, parent: &Path, dst: &Path) -> anyhow::Result<String> {
    let dir_of = |p: &Path| -> anyhow::Result<PathBuf> {
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        dir.canonicalize().with_context(|| format!("resolving {}", dir.display()))
    };
    let name = parent.file_name().and_then(|n| n.to_str()).with_context(|| format!("{} has no UTF-8 file name", given.display()))?;
    if dir_of(parent)? == dir_of(dst)? {
        return Ok(name.to_owned());
    }
    let abs = parent.canonicalize().with_context(|| format!("resolving {}", given.display()))?;
    abs.to_str().map(str::to_owned).with_context(|| format!("{} is not a UTF-8 path", abs.display()))
}

/// Output formats of `export`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DstFormat {
    /// A sparse raw disk image.
    Raw,
    /// A sparse qcow2 (v3, 64 KiB clusters) image.
    Qcow2,
}

pub fn export(src: &Path, dst: &Path, format: DstFormat, quiet: bool) -> anyhow::Result<ExitCode> {
    let (chain, files) = open_chain(src)?;
    let size = chain.virtual_size();
    // Written aside and renamed only once every extent verified: a bad
    // container never destroys a good older output.
    let inputs: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
    let (file, staged) = output::stage(dst, &inputs)?;
    let keep = file.try_clone().context("duplicating the output's descriptor")?;
    let sink: Box<dyn ImageSink> = match format {
        DstFormat::Raw => Box::new(RawSink::new(file, size).with_context(|| format!("creating {}", dst.display()))?),
        DstFormat::Qcow2 => Box::new(Qcow2Sink::new(file, size).with_context(|| format!("creating {}", dst.display()))?),
    };
    let bar = progress::bytes(chain.map().iter().map(|p| p.guest.end - p.guest.start).sum(), "export", quiet);
    export_chain(&chain, sink, &|n| bar.inc(n)).with_context(|| format!("exporting {}", src.display()))?;
    bar.finish_and_clear();
    staged.commit(&keep)?;
    eprintln!(
        "wrote {} ({size} bytes{})",
        dst.display(),
        if files.len() > 1 { format!(", {} layers flattened", files.len()) } else { String::new() }
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct InfoJson {
    format_version: String,
    virtual_size: u64,
    file_bytes: u64,
    root_digest: String,
    features: Vec<String>,
    extents: usize,
    boot_extents: usize,
    zero_extents: usize,
    zstd_extents: usize,
    boot_segment_bytes: u64,
    boot_guest_bytes: u64,
    rest_segment_bytes: u64,
    index_bytes: u64,
    block_size: u32,
    max_extent_len: u32,
    metadata: bootcache_format::Metadata,
    #[serde(skip_serializing_if = "Option::is_none")]
    layer: Option<LayerJson>,
}

/// A layer's place in its chain.
#[derive(Serialize)]
struct LayerJson {
    parent_root_digest: String,
    layer_depth: u16,
    boot_order_entries: usize,
    /// The images under it, parent first, as found.
    chain: Vec<ChainEntry>,
    /// Why the chain could not be followed, if it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    chain_error: Option<String>,
}

#[derive(Serialize)]
struct ChainEntry {
    path: PathBuf,
    root_digest: String,
    file_bytes: u64,
}

pub fn info(path: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let image = open_layer(path)?;
    let h = image.header().clone();
    let entries = image.index().entries();
    let count = |f: &dyn Fn(&bootcache_format::Entry) -> bool| entries.iter().filter(|e| f(e)).count();
    let features = if h.incompatible == 0 { Vec::new() } else { vec![feature_names(h.incompatible)] };
    let info = InfoJson {
        format_version: format!("1.{}", h.version_minor),
        virtual_size: h.virtual_size,
        file_bytes: h.meta.end,
        root_digest: image.root_digest_hex(),
        features,
        extents: entries.len(),
        boot_extents: count(&|e| e.segment == Segment::Boot),
        zero_extents: count(&|e| e.encoding == Encoding::Zero),
        zstd_extents: count(&|e| e.encoding == Encoding::Zstd),
        boot_segment_bytes: h.boot.end - h.boot.start,
        boot_guest_bytes: h.boot_guest_bytes,
        rest_segment_bytes: h.rest.end - h.rest.start,
        index_bytes: h.boot.start - h.index_offset,
        block_size: h.block_size,
        max_extent_len: h.max_extent_len,
        metadata: image.metadata().clone(),
        layer: None,
    };
    let mut info = info;
    if let Some(parent) = h.parent {
        let boot_order_entries = image.boot_refs().len();
        let (chain, chain_error) = match chain_of(image, path) {
            Ok((chain, files)) => {
                let entries = chain.layers().iter().zip(files).skip(1).map(|(l, path)| ChainEntry {
                    path,
                    root_digest: l.root_digest_hex(),
                    file_bytes: l.header().meta.end,
                });
                (entries.collect(), None)
            }
            Err(e) => (Vec::new(), Some(format!("{e:#}"))),
        };
        let parent_root_digest = parent.to_string();
        info.layer = Some(LayerJson { parent_root_digest, layer_depth: h.layer_depth, boot_order_entries, chain, chain_error });
    }
    let failed = info.layer.as_ref().and_then(|l| l.chain_error.clone());
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return match failed {
            Some(e) => Err(anyhow::anyhow!(e)),
            None => Ok(ExitCode::SUCCESS),
        };
    }
    println!("image            {}", path.display());
    println!(
        "format           bootcache {}{}",
        info.format_version,
        if info.features.is_empty() { String::new() } else { format!(" ({})", info.features.join(", ")) }
    );
    println!("virtual size     {} bytes", info.virtual_size);
    println!("file size        {} bytes", info.file_bytes);
    println!(
        "index            {} extents ({} boot, {} zero, {} zstd), {} bytes",
        info.extents, info.boot_extents, info.zero_extents, info.zstd_extents, info.index_bytes
    );
    println!("boot segment     {} bytes stored for {} guest bytes", info.boot_segment_bytes, info.boot_guest_bytes);
    println!("rest segment     {} bytes stored", info.rest_segment_bytes);
    println!("created by       {}", info.metadata.creator);
    println!("root digest      {}", info.root_digest);
    if let Some(l) = &info.layer {
        println!("layer            {} layers above its base; boot order of {} extents across them", l.layer_depth, l.boot_order_entries);
        println!("parent           {} ({})", info.metadata.parent_locator.as_deref().unwrap_or("no locator"), l.parent_root_digest);
        for (i, c) in l.chain.iter().enumerate() {
            println!("  layer {}        {} ({} bytes, root {})", i + 1, c.path.display(), c.file_bytes, c.root_digest);
        }
    }
    match failed {
        Some(e) => Err(anyhow::anyhow!(e)),
        None => Ok(ExitCode::SUCCESS),
    }
}

pub fn check(path: &Path, quiet: bool) -> anyhow::Result<ExitCode> {
    let (chain, files) = open_chain(path)?;
    let stored = chain.layers().iter().map(|l| l.header().rest.end - l.header().boot.start).sum();
    let bar = progress::bytes(stored, "check", quiet);
    let report = chain.check(|n| bar.inc(n)).with_context(|| format!("{} failed verification", path.display()))?;
    bar.finish_and_clear();
    let layers = if files.len() > 1 { format!(" in {} layers", files.len()) } else { String::new() };
    println!(
        "ok: {} extents, {} stored bytes verified{layers}; root digest {}",
        report.extents,
        report.stored_bytes,
        chain.top().root_digest_hex()
    );
    Ok(ExitCode::SUCCESS)
}

/// What `diff` found.
#[derive(Serialize)]
struct DiffJson {
    old_root_digest: String,
    new_root_digest: String,
    /// Guest bytes of the new image that hold data (its non-zero extents, as read).
    new_data_bytes: u64,
    /// Of those, bytes in extents whose content the old image holds.
    shared_bytes: u64,
    /// Guest bytes of the new image's boot stream.
    new_boot_bytes: u64,
    /// Of those, bytes the old image holds.
    shared_boot_bytes: u64,
    /// Stored bytes a node holding the old image would fetch for the new one.
    stored_bytes_to_fetch: u64,
    /// Of those, for the boot.
    boot_stored_bytes_to_fetch: u64,
}

pub fn diff(old: &Path, new: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let (a, _) = open_chain(old)?;
    let (b, _) = open_chain(new)?;
    let held: std::collections::HashSet<[u8; 32]> =
        a.layers().iter().flat_map(|l| l.index().entries()).filter(|e| e.encoding != Encoding::Zero).map(|e| e.digest).collect();
    let mut d = DiffJson {
        old_root_digest: a.top().root_digest_hex(),
        new_root_digest: b.top().root_digest_hex(),
        new_data_bytes: 0,
        shared_bytes: 0,
        new_boot_bytes: 0,
        shared_boot_bytes: 0,
        stored_bytes_to_fetch: 0,
        boot_stored_bytes_to_fetch: 0,
    };
    let mut counted = std::collections::HashSet::new();
    for piece in b.map() {
        let e = b.entry(piece);
        if e.encoding == Encoding::Zero {
            continue;
        }
        let len = piece.guest.end - piece.guest.start;
        d.new_data_bytes += len;
        if held.contains(&e.digest) {
            d.shared_bytes += len;
        } else if counted.insert((piece.layer, piece.entry)) {
            d.stored_bytes_to_fetch += e.stored_len();
        }
    }
    for (_, e) in b.boot_stream() {
        d.new_boot_bytes += e.guest_len();
        if held.contains(&e.digest) {
            d.shared_boot_bytes += e.guest_len();
        } else {
            d.boot_stored_bytes_to_fetch += e.stored_len();
        }
    }
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&d)?);
        return Ok(ExitCode::SUCCESS);
    }
    let pct = |part: u64, whole: u64| if whole == 0 { 0.0 } else { 100.0 * part as f64 / whole as f64 };
    println!("{} holds {:.1} % of the data of {}:", old.display(), pct(d.shared_bytes, d.new_data_bytes), new.display());
    println!(
        "  data             {} of {} guest bytes shared; {} stored bytes to fetch",
        d.shared_bytes, d.new_data_bytes, d.stored_bytes_to_fetch
    );
    println!(
        "  boot             {} of {} guest bytes shared ({:.1} %); {} stored bytes to fetch",
        d.shared_boot_bytes,
        d.new_boot_bytes,
        pct(d.shared_boot_bytes, d.new_boot_bytes),
        d.boot_stored_bytes_to_fetch
    );
    Ok(ExitCode::SUCCESS)
}
