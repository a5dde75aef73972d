//! `bootcache record`: trace a VM boot (or any process) with the eBPF recorder.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bootcache_convert::Format;
use bootcache_trace::recorder::Recorder;
use bootcache_trace::recorder::qemu::{Outcome, QemuOptions, record_qemu};
use bootcache_trace::{OffsetSpace, Trace, TraceInfo};
use clap::Args;

/// The marker the reference guest prints on ttyS0 when multi-user.target is reached.
pub const REFERENCE_MARKER: &str = "BOOTCACHE-BOOTED";

#[derive(Debug, Args)]
pub struct RecordArgs {
    /// The image file whose reads are recorded.
    #[arg(long, value_name = "IMG")]
    image: PathBuf,
    /// The trace file to write.
    #[arg(long, value_name = "TRACE")]
    out: PathBuf,
    /// Stop when a console line matches this regular expression.
    #[arg(long, value_name = "REGEX", default_value = REFERENCE_MARKER)]
    marker: String,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    timeout: u64,
    /// Attach to this running process instead of starting QEMU; records until
    /// it exits, the timeout, or Ctrl-C.
    #[arg(long, value_name = "PID", conflicts_with = "qemu")]
    pid: Option<u32>,
    /// Keep QEMU's serial console here.
    #[arg(long, value_name = "FILE")]
    console_log: Option<PathBuf>,
    /// For a qcow2 image, keep image-file offsets instead of mapping the trace
    /// to guest offsets (`bootcache trace map` does it later).
    #[arg(long)]
    no_map: bool,
    /// Run the same session without attaching the probes (an empty trace):
    /// the baseline for measuring the recorder's overhead.
    #[arg(long)]
    no_probes: bool,
    /// Keep the guest paused until SECS after QEMU started (benchmarks give
    /// both arms the same start-up time this way).
    #[arg(long, value_name = "SECS", default_value_t = 0.0)]
    hold: f64,
    /// Write the trace and exit 0 even if the recorder lost records.
    #[arg(long)]
    accept_losses: bool,
    /// QEMU and its arguments, after `--` (e.g. `-- qemu-system-x86_64 -accel tcg ...`).
    /// Do not pass -S, -qmp or -serial: the recorder adds its own.
    #[arg(last = true, value_name = "QEMU")]
    qemu: Vec<OsString>,
}

fn write(trace: &Trace, out: &Path, image: &Path) -> anyhow::Result<()> {
    super::trace::save(trace, out, &[image])
}

/// What the recorded file offsets of `image` are, by its format: guest
/// offsets of a raw disk, or qcow2 file offsets to map; other formats are
/// refused (their reads could not be mapped to the guest).
fn offset_space(image: &Path) -> anyhow::Result<OffsetSpace> {
    match bootcache_convert::detect(image)? {
        Format::Raw => Ok(OffsetSpace::Guest),
        Format::Qcow2 => Ok(OffsetSpace::ImageFile),
        other => {
            bail!("{} is a {other} image: only raw and qcow2 images can be recorded (their reads map to guest offsets)", image.display())
        }
    }
}

fn finish(trace: &Trace, args: &RecordArgs) -> anyhow::Result<ExitCode> {
    let (out, accept_losses) = (&args.out, args.accept_losses);
    let mapped;
    let trace = if trace.space == OffsetSpace::ImageFile && !args.no_map {
        mapped = super::trace::map_qcow2(trace, &args.image)?;
        &mapped
    } else {
        trace
    };
    write(trace, out, &args.image)?;
    eprintln!("wrote {} records to {}", trace.records.len(), out.display());
    if trace.lost_records > 0 {
        eprintln!("WARNING: the recorder lost {} records: this trace is incomplete", trace.lost_records);
        if !accept_losses {
            bail!("{} records lost (--accept-losses keeps such a trace and exits 0)", trace.lost_records);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn record(args: &RecordArgs) -> anyhow::Result<ExitCode> {
    let timeout = Duration::from_secs(args.timeout);
    if let Some(pid) = args.pid {
        return record_pid(pid, args, timeout);
    }
    if args.qemu.is_empty() {
        bail!("give QEMU's command line after `--`, or --pid PID to attach to a running process");
    }
    let marker = regex::Regex::new(&args.marker).with_context(|| format!("bad --marker {:?}", args.marker))?;
    let work = tempfile::tempdir().context("creating a working directory")?;
    let opts = QemuOptions {
        image: args.image.clone(),
        space: offset_space(&args.image)?,
        command: args.qemu.clone(),
        marker,
        timeout,
        console_log: args.console_log.clone(),
        work_dir: work.path().to_path_buf(),
        probes: !args.no_probes,
        hold: Duration::from_secs_f64(args.hold.max(0.0)),
    };
    let rec = record_qemu(&opts, |_| {}).context("recording the boot")?;
    match &rec.outcome {
        Outcome::Marker(after) => eprintln!("boot marker after {:.3} s", after.as_secs_f64()),
        Outcome::QemuExited(status) => {
            write(&rec.trace, &args.out, &args.image)?;
            eprintln!(
                "QEMU exited before the marker ({status}); partial trace of {} records in {}",
                rec.trace.records.len(),
                args.out.display()
            );
            eprintln!("last console lines:\n  {}", rec.console_tail.join("\n  "));
            let log = std::fs::read_to_string(work.path().join("qemu.log")).unwrap_or_default();
            bail!("QEMU exited early ({status}): {}", log.lines().last().unwrap_or(""));
        }
        Outcome::Timeout => {
            write(&rec.trace, &args.out, &args.image)?;
            eprintln!("last console lines:\n  {}", rec.console_tail.join("\n  "));
            bail!("no boot marker matching {:?} within {} s; partial trace in {}", args.marker, args.timeout, args.out.display());
        }
    }
    finish(&rec.trace, args)
}

fn record_pid(pid: u32, args: &RecordArgs, timeout: Duration) -> anyhow::Result<ExitCode> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("installing a signal handler")?;
    }
    let mut rec = Recorder::attach(pid, &args.image, offset_space(&args.image)?).context("attaching the recorder")?;
    eprintln!("recording process {pid} on {} (descriptors {:?}); Ctrl-C stops", args.image.display(), rec.fds());
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < timeout && Path::new(&format!("/proc/{pid}")).exists() {
        rec.poll(Duration::from_millis(100))?;
    }
    let info = TraceInfo {
        recorder: format!("bootcache {} (eBPF, syscall tracepoints)", env!("CARGO_PKG_VERSION")),
        extra: serde_json::json!({ "pid": pid }),
    };
    finish(&rec.finish(info), args)
}

#[derive(Debug, Args)]
pub struct SeedArgs {
    /// The seed disk to write (raw; mode 0640).
    out: PathBuf,
    /// The guest's host name (meta-data's local-hostname).
    #[arg(long, value_name = "NAME", default_value = "reference")]
    hostname: String,
    /// meta-data's instance-id (cloud-init's first boot is once per id;
    /// default: the host name).
    #[arg(long, value_name = "ID")]
    instance_id: Option<String>,
    /// user-data: a #cloud-config file (at most 64 KiB); default, none.
    #[arg(long, value_name = "FILE")]
    user_data: Option<PathBuf>,
    /// network-config (version 2); default: DHCP on every ethernet
    /// interface.
    #[arg(long, value_name = "FILE")]
    network_config: Option<PathBuf>,
}

/// `bootcache seed`: a NoCloud seed for a recorded first boot.
pub fn seed(args: &SeedArgs) -> anyhow::Result<ExitCode> {
    let name: bootcache_api::Name = args.hostname.parse().map_err(|e| anyhow::anyhow!("--hostname {:?}: {e}", args.hostname))?;
    let id = args.instance_id.clone().unwrap_or_else(|| name.to_string());
    if id.is_empty() || id.len() > 255 || id.chars().any(char::is_control) {
        bail!("--instance-id: 1 to 255 printable characters");
    }
    let read = |path: &Path, what: &str| -> anyhow::Result<String> {
        let limit = bootcache_api::lab::MAX_CLOUD_INIT_BYTES;
        let mut bytes = Vec::new();
        let file = std::fs::File::open(path).with_context(|| format!("reading {what} {}", path.display()))?;
        std::io::Read::read_to_end(&mut std::io::Read::take(file, limit as u64 + 1), &mut bytes)
            .with_context(|| format!("reading {what} {}", path.display()))?;
        if bytes.len() > limit {
            bail!("{what} {}: at most {limit} bytes", path.display());
        }
        String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{what} {}: not UTF-8 text", path.display()))
    };
    let user_data = args.user_data.as_deref().map(|p| read(p, "user-data")).transpose()?;
    if let Some(u) = &user_data
        && !u.starts_with("#cloud-config")
    {
        bail!("user-data: a #cloud-config file (its first line says so)");
    }
    let network_config = match &args.network_config {
        Some(p) => read(p, "network-config")?,
        None => "{\"version\": 2, \"ethernets\": {\"all\": {\"match\": {\"name\": \"e*\"}, \"dhcp4\": true}}}\n".to_owned(),
    };
    let meta = serde_json::json!({"instance-id": id, "local-hostname": name.as_str()});
    let cloud = bootcache_runtime::NoCloud { meta_data: format!("{meta}\n"), user_data, network_config };
    bootcache_runtime::libvirt::seed::write(&args.out, &cloud, None)?;
    eprintln!("wrote {} (cidata: meta-data, user-data, network-config)", args.out.display());
    Ok(ExitCode::SUCCESS)
}
