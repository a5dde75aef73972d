//! `bootcache trace ...` and `bootcache analyze`.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use bootcache_convert::output;
use bootcache_trace::{ImageIdentity, OffsetSpace, Trace, TraceInfo, analyze as analyze_trace, csv};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum TraceCmd {
    /// Make a trace file from CSV with a header line naming t_ns,offset,length
    /// (optional columns: op, tid, result). Rows are reads unless op says write.
    Import {
        /// The CSV file (`-` for stdin).
        #[arg(long, value_name = "FILE")]
        csv: PathBuf,
        /// The trace file to write.
        #[arg(long, value_name = "TRACE")]
        out: PathBuf,
        /// The traced image: its size (and with --digest its BLAKE3) is stored in the trace.
        #[arg(long, value_name = "IMG")]
        image: Option<PathBuf>,
        /// Also hash the whole image (slow for large images).
        #[arg(long, requires = "image")]
        digest: bool,
    },
    /// Synthesise a boot-shaped trace over an image's allocated ranges (for
    /// demos and tests: a real trace comes from recording a boot).
    Synth {
        /// The raw image the trace should fit.
        #[arg(long, value_name = "IMG")]
        image: PathBuf,
        /// The trace file to write.
        #[arg(long, value_name = "TRACE")]
        out: PathBuf,
        /// Number of read requests.
        #[arg(long, default_value_t = 1794)]
        reads: usize,
        /// Random seed (the same seed gives the same trace).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Map a trace of a qcow2 image (image-file offsets) to guest offsets;
    /// reads of qcow2 metadata are kept apart as metadata records.
    Map {
        /// The qcow2 image the trace was recorded on.
        #[arg(long, value_name = "IMG")]
        image: PathBuf,
        /// The trace to map.
        trace: PathBuf,
        /// The guest-space trace to write.
        #[arg(long, value_name = "TRACE")]
        out: PathBuf,
    },
    /// How much of one boot's reads the boot set of other traces covers (the
    /// set `convert` would build from them): the bytes and reads a deployment
    /// booted as in AGAINST would miss, and the set's bytes it would not use.
    Cover {
        /// A trace the boot set is made from (repeat, as for `convert`).
        #[arg(long = "trace", value_name = "TRACE", required = true)]
        traces: Vec<PathBuf>,
        /// Keep only bytes read in at least this many of them (as for `convert`).
        #[arg(long, value_name = "K", default_value_t = 1)]
        min_boots: usize,
        /// The boot to check the set against.
        against: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a trace's records as CSV (t_ns,offset,length,op,tid,result,class).
    Export {
        /// Write CSV (the only export format).
        #[arg(long)]
        csv: bool,
        /// The trace file.
        trace: PathBuf,
        /// Write here instead of stdout.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

pub fn run(cmd: TraceCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TraceCmd::Import { csv: input, out, image, digest } => import(&input, &out, image.as_deref(), digest),
        TraceCmd::Map { image, trace, out } => {
            let t = Trace::open(&trace).with_context(|| format!("reading trace {}", trace.display()))?;
            let mapped = map_qcow2(&t, &image)?;
            save(&mapped, &out, &[&trace, &image])?;
            Ok(ExitCode::SUCCESS)
        }
        TraceCmd::Synth { image, out, reads, seed } => synth(&image, &out, reads, seed),
        TraceCmd::Cover { traces, min_boots, against, json } => cover(&traces, min_boots, &against, json),
        TraceCmd::Export { csv: _, trace, out } => {
            let t = Trace::open(&trace).with_context(|| format!("reading trace {}", trace.display()))?;
            match &out {
                Some(p) => {
                    let (file, staged) = output::stage(p, &[&trace])?;
                    let mut w = BufWriter::new(file);
                    csv::export(&t.records, &mut w).context("writing CSV")?;
                    let file = w.into_inner().map_err(std::io::IntoInnerError::into_error).context("writing CSV")?;
                    staged.commit(&file)?;
                }
                None => csv::export(&t.records, BufWriter::new(std::io::stdout().lock())).context("writing CSV")?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn guest_trace(path: &Path) -> anyhow::Result<Trace> {
    let t = Trace::open(path).with_context(|| format!("reading trace {}", path.display()))?;
    if t.space != OffsetSpace::Guest {
        bail!("{} holds image-file offsets: map it to guest offsets first (bootcache trace map)", path.display());
    }
    Ok(t)
}

fn cover(traces: &[PathBuf], min_boots: usize, against: &Path, json: bool) -> anyhow::Result<ExitCode> {
    if min_boots == 0 || min_boots > traces.len() {
        bail!("--min-boots {min_boots}: must be between 1 and the number of traces ({})", traces.len());
    }
    let orders = traces.iter().map(|p| Ok(guest_trace(p)?.first_access_order())).collect::<anyhow::Result<Vec<_>>>()?;
    let set = bootcache_trace::AccessOrder::merge(&orders, min_boots).set();
    let boot = guest_trace(against)?;
    let c = bootcache_trace::coverage(&set, &boot);
    if json {
        println!("{}", serde_json::to_string_pretty(&c)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mb = |b: u64| b as f64 / 1e6;
    let pct = |a: u64, b: u64| if b == 0 { 0.0 } else { 100.0 * a as f64 / b as f64 };
    println!("boot set         {:.1} MB from {} trace(s), bytes read in at least {min_boots}", mb(c.set_bytes), traces.len());
    println!("boot read        {:.1} MB in {} reads", mb(c.boot_bytes), c.requests);
    println!("covered          {:.1} MB ({:.1}%)", mb(c.covered_bytes), pct(c.covered_bytes, c.boot_bytes));
    println!(
        "missed           {:.2} MB in {} intervals; {} reads ({:.1}%) need a missed byte",
        mb(c.missed_bytes),
        c.missed_intervals,
        c.missed_requests,
        pct(c.missed_requests, c.requests)
    );
    println!("unused           {:.1} MB of the set ({:.1}%)", mb(c.unused_bytes), pct(c.unused_bytes, c.set_bytes));
    Ok(ExitCode::SUCCESS)
}

/// Writes `trace` to `out`, which appears only once complete and is never
/// one of `inputs`.
pub fn save(trace: &Trace, out: &Path, inputs: &[&Path]) -> anyhow::Result<()> {
    let (file, staged) = output::stage(out, inputs)?;
    let w = trace.write_to(BufWriter::new(file)).with_context(|| format!("writing {}", out.display()))?;
    let file = w.into_inner().map_err(std::io::IntoInnerError::into_error).with_context(|| format!("writing {}", out.display()))?;
    staged.commit(&file)?;
    Ok(())
}

/// Maps an image-file-space trace of a qcow2 image to guest space.
pub fn map_qcow2(trace: &Trace, image: &Path) -> anyhow::Result<Trace> {
    if trace.space != OffsetSpace::ImageFile {
        bail!("the trace already holds guest offsets");
    }
    let format = bootcache_convert::detect(image)?;
    if format != bootcache_convert::Format::Qcow2 {
        bail!("{} is a {format} image, not qcow2: only a qcow2 image's file offsets can be mapped to guest offsets", image.display());
    }
    let q = bootcache_convert::qcow2::Qcow2::open(image).with_context(|| format!("opening {} as qcow2", image.display()))?;
    let (mapped, stats) = bootcache_convert::qcow2::map_trace(trace, &q).context("mapping the trace to guest offsets")?;
    eprintln!(
        "mapped to guest offsets: {} data pieces, {} metadata reads kept apart, {} unmapped bytes dropped",
        stats.data_pieces, stats.metadata_pieces, stats.unmapped_bytes
    );
    Ok(mapped)
}

fn identity(image: Option<&Path>, digest: bool) -> anyhow::Result<ImageIdentity> {
    let Some(path) = image else { return Ok(ImageIdentity::default()) };
    let size = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
    let digest = if digest {
        let mut hasher = blake3::Hasher::new();
        hasher.update_mmap_rayon(path).with_context(|| format!("hashing {}", path.display()))?;
        Some(*hasher.finalize().as_bytes())
    } else {
        None
    };
    Ok(ImageIdentity { size, digest })
}

fn import(input: &Path, out: &Path, image: Option<&Path>, digest: bool) -> anyhow::Result<ExitCode> {
    let reader: Box<dyn Read> = if input == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(File::open(input).with_context(|| format!("opening {}", input.display()))?)
    };
    let records = csv::import(BufReader::new(reader)).with_context(|| format!("importing {}", input.display()))?;
    if records.is_empty() {
        bail!("{} holds no records", input.display());
    }
    let info = TraceInfo {
        recorder: format!("bootcache {} (csv import)", env!("CARGO_PKG_VERSION")),
        extra: serde_json::json!({ "source": input.display().to_string() }),
    };
    let trace = Trace { image: identity(image, digest)?, space: OffsetSpace::Guest, lost_records: 0, info, records };
    let mut inputs = vec![input];
    inputs.extend(image);
    save(&trace, out, &inputs)?;
    eprintln!("wrote {} records to {}", trace.records.len(), out.display());
    Ok(ExitCode::SUCCESS)
}

fn synth(image: &Path, out: &Path, reads: usize, seed: u64) -> anyhow::Result<ExitCode> {
    let src = bootcache_convert::open(image, None)?.source;
    let allocated = src.allocated().with_context(|| format!("listing allocated ranges of {}", image.display()))?;
    let records = bootcache_trace::synth::boot_like(&allocated, src.size(), reads, seed);
    let info = TraceInfo {
        recorder: format!("bootcache {} (synthetic, seed {seed})", env!("CARGO_PKG_VERSION")),
        extra: serde_json::json!({ "image": image.display().to_string() }),
    };
    let trace =
        Trace { image: ImageIdentity { size: src.size(), digest: None }, space: OffsetSpace::Guest, lost_records: 0, info, records };
    save(&trace, out, &[image])?;
    eprintln!("wrote {} synthetic records to {}", trace.records.len(), out.display());
    Ok(ExitCode::SUCCESS)
}

pub fn analyze(path: &Path, json: bool, plot: Option<&Path>) -> anyhow::Result<ExitCode> {
    let trace = Trace::open(path).with_context(|| format!("reading trace {}", path.display()))?;
    let a = analyze_trace(&trace);
    let plots = match plot {
        Some(dir) => bootcache_trace::plot::plot_all(&trace, &a, dir)?,
        None => Vec::new(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&a)?);
    } else {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        println!("trace            {}", path.display());
        println!("recorder         {}", trace.info.recorder);
        println!("read requests    {}", a.requests);
        println!("bytes read       {} ({:.1} MiB)", a.total_bytes, mib(a.total_bytes));
        println!("unique bytes     {} ({:.1} MiB)", a.unique_bytes, mib(a.unique_bytes));
        if a.image_size > 0 {
            println!("  of image       {:.2}% of {:.1} MiB", 100.0 * a.unique_bytes as f64 / a.image_size as f64, mib(a.image_size));
        }
        println!("intervals        {} (merged); {} first-access pieces", a.intervals, a.first_access_pieces);
        println!("re-read factor   {:.3}", a.reread_factor);
        println!("writes           {}; failed or empty reads {}", a.writes, a.failed_or_empty_reads);
        println!("duration         {:.3} s", a.duration_ns as f64 / 1e9);
        println!("request sizes:");
        for b in &a.histogram {
            println!("  >= {:>8} B  {:>6} requests  {:>10} bytes", b.min, b.count, b.bytes);
        }
        for p in &plots {
            println!("plot             {}", p.display());
        }
    }
    if a.lost_records > 0 {
        eprintln!("WARNING: the recorder lost {} records: this trace is incomplete", a.lost_records);
    }
    Ok(ExitCode::SUCCESS)
}

/// `analyze` of several traces side by side: a table (or a JSON array) and,
/// with `plot`, one figure of the three plots per trace.
pub fn compare(specs: &[String], json: bool, plot: Option<&Path>) -> anyhow::Result<ExitCode> {
    let mut named = Vec::with_capacity(specs.len());
    for spec in specs {
        let (name, path) = match spec.split_once('=') {
            Some((n, p)) if !n.is_empty() && !n.contains('/') => (n.to_owned(), PathBuf::from(p)),
            _ => {
                let p = PathBuf::from(spec);
                (p.file_stem().map_or_else(|| spec.clone(), |s| s.to_string_lossy().into_owned()), p)
            }
        };
        let trace = Trace::open(&path).with_context(|| format!("reading trace {}", path.display()))?;
        let a = analyze_trace(&trace);
        if a.lost_records > 0 {
            eprintln!("WARNING: the recorder lost {} records of {}: that trace is incomplete", a.lost_records, path.display());
        }
        named.push((name, trace, a));
    }
    let plots = match plot {
        Some(dir) => {
            let refs: Vec<(&str, &Trace, &bootcache_trace::analysis::Analysis)> =
                named.iter().map(|(n, t, a)| (n.as_str(), t, a)).collect();
            bootcache_trace::plot::plot_compare(&refs, dir)?
        }
        None => Vec::new(),
    };
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    if json {
        let rows: Vec<serde_json::Value> = named.iter().map(|(n, _, a)| serde_json::json!({"name": n, "analysis": a})).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "| trace | image MiB | read requests | unique MiB | of image | intervals | re-read factor | median request | most bytes in | last read (s) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for (n, _, a) in &named {
            let share = if a.image_size > 0 { format!("{:.1}%", 100.0 * a.unique_bytes as f64 / a.image_size as f64) } else { "-".into() };
            // The bucket holding the median request, and the one holding most bytes.
            let mut seen = 0;
            let median = a.histogram.iter().find(|b| {
                seen += b.count;
                seen * 2 >= a.requests
            });
            let heaviest = a.histogram.iter().max_by_key(|b| b.bytes);
            let bucket = |b: Option<&bootcache_trace::analysis::Bucket>| b.map_or("-".into(), |b| format!(">= {} B", b.min));
            println!(
                "| {n} | {:.0} | {} | {:.1} | {share} | {} | {:.2} | {} | {} | {:.1} |",
                mib(a.image_size),
                a.requests,
                mib(a.unique_bytes),
                a.intervals,
                a.reread_factor,
                bucket(median),
                bucket(heaviest),
                a.duration_ns as f64 / 1e9
            );
        }
        for p in &plots {
            println!("plot: {}", p.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
