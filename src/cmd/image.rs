//! `bootcache convert`, `export`, `info` and `check`.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use bootcache_convert::qcow2::Qcow2Sink;
use bootcache_convert::{
    ConvertOptions, Format, ImageSink, RawSink, convert as run_convert, export as run_export, open as open_image, output, planned_bytes,
};
use bootcache_format::{Encoding, Image, Segment, feature_names};
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
    let (file, staged) = output::stage(&args.dst, &inputs)?;
    let bar = progress::bytes(planned_bytes(src.as_ref())?, "convert", args.quiet);
    let (out, report) = run_convert(src.as_ref(), &traces, BufWriter::with_capacity(64 << 10, file), &opts, &|n| bar.inc(n))
        .with_context(|| format!("converting {}", args.src.display()))?;
    bar.finish_and_clear();
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
        println!("root digest {}", report.root_digest);
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens a bootcache container (a regular file; another format is named).
fn open(path: &Path) -> anyhow::Result<Image<File>> {
    let format = bootcache_convert::detect(path)?;
    if format != Format::Bootcache {
        bail!("{} is not a bootcache image: its magic says {format}", path.display());
    }
    let file = bootcache_convert::open_file(path)?;
    Image::open(file).with_context(|| format!("{} is not a valid bootcache image", path.display()))
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
    let image = open(src)?;
    let size = image.virtual_size();
    // Written aside and renamed only once every extent verified: a bad
    // container never destroys a good older output.
    let (file, staged) = output::stage(dst, &[src])?;
    let keep = file.try_clone().context("duplicating the output's descriptor")?;
    let sink: Box<dyn ImageSink> = match format {
        DstFormat::Raw => Box::new(RawSink::new(file, size).with_context(|| format!("creating {}", dst.display()))?),
        DstFormat::Qcow2 => Box::new(Qcow2Sink::new(file, size).with_context(|| format!("creating {}", dst.display()))?),
    };
    let bar = progress::bytes(image.index().entries().iter().map(|e| e.guest_len()).sum(), "export", quiet);
    run_export(&image, sink, &|n| bar.inc(n)).with_context(|| format!("exporting {}", src.display()))?;
    bar.finish_and_clear();
    staged.commit(&keep)?;
    eprintln!("wrote {} ({} bytes)", dst.display(), image.virtual_size());
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
}

pub fn info(path: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let image = open(path)?;
    let h = image.header();
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
    };
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(ExitCode::SUCCESS);
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
    Ok(ExitCode::SUCCESS)
}

pub fn check(path: &Path, quiet: bool) -> anyhow::Result<ExitCode> {
    let image = open(path)?;
    let bar = progress::bytes(image.header().rest.end - image.header().boot.start, "check", quiet);
    let report = image.check(|n| bar.inc(n)).with_context(|| format!("{} failed verification", path.display()))?;
    bar.finish_and_clear();
    println!("ok: {} extents, {} stored bytes verified; root digest {}", report.extents, report.stored_bytes, image.root_digest_hex());
    Ok(ExitCode::SUCCESS)
}
