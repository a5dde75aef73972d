//! Recording a QEMU boot: QEMU starts held (`-S`), the probes attach, QMP
//! `cont` lets the guest run, and the serial console is watched for the boot
//! marker. If QEMU dies first, the partial trace is kept and the exit status
//! and last console lines are reported.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use regex::Regex;
use serde_json::{Value, json};

use super::{RecordError, Recorder};
use crate::file::{OffsetSpace, Trace, TraceInfo};

/// What to record.
#[derive(Debug, Clone)]
pub struct QemuOptions {
    /// The image whose reads are recorded.
    pub image: PathBuf,
    /// What its file offsets are: guest offsets (a raw image), or offsets
    /// in an image file that maps them (qcow2), to be mapped later.
    pub space: OffsetSpace,
    /// QEMU's program and arguments (without `-S`, `-qmp` or `-serial`: those are added).
    pub command: Vec<OsString>,
    /// The boot is complete when a console line matches.
    pub marker: Regex,
    /// Give up after this long.
    pub timeout: Duration,
    /// Where the console goes (a temporary file when `None`).
    pub console_log: Option<PathBuf>,
    /// Directory for the QMP socket and logs.
    pub work_dir: PathBuf,
    /// Attach the probes (false runs the same session unrecorded, to measure overhead).
    pub probes: bool,
    /// Keep the guest paused until this long after QEMU started (so that
    /// runs with and without probes start the guest at the same point).
    pub hold: Duration,
}

/// How the recording ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The marker appeared this long after the guest started.
    Marker(Duration),
    /// QEMU exited before the marker.
    QemuExited(ExitStatus),
    /// Neither within the timeout.
    Timeout,
}

/// A finished recording.
#[derive(Debug)]
pub struct QemuRecording {
    /// The trace (complete or partial).
    pub trace: Trace,
    /// How it ended.
    pub outcome: Outcome,
    /// The last console lines.
    pub console_tail: Vec<String>,
}

fn qmp(stream: &mut UnixStream, reader: &mut BufReader<UnixStream>, command: &str) -> Result<Value, RecordError> {
    let io = |source| RecordError::Qemu { what: format!("QMP {command}"), source };
    writeln!(stream, "{}", json!({ "execute": command })).map_err(io)?;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(io)? == 0 {
            return Err(io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if v.get("return").is_some() {
            return Ok(v);
        }
        if let Some(e) = v.get("error") {
            return Err(io(std::io::Error::other(e.to_string())));
        }
    }
}

fn connect(sock: &Path, child: &mut Child) -> Result<UnixStream, RecordError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = UnixStream::connect(sock) {
            return Ok(s);
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(RecordError::Qemu {
                what: format!("QEMU exited at start ({status})"),
                source: std::io::ErrorKind::NotConnected.into(),
            });
        }
        if Instant::now() > deadline {
            return Err(RecordError::Qemu { what: "QMP socket never appeared".into(), source: std::io::ErrorKind::TimedOut.into() });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tail(path: &Path, n: usize) -> Vec<String> {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].iter().map(|l| l.to_string()).collect()
}

/// Appends what the console wrote since the last call to `window`, keeping
/// only its last 4 KiB (a marker line may straddle two reads). True when
/// anything new arrived. Reads only the new bytes, not the whole log.
fn console_grew(log: &mut std::fs::File, window: &mut Vec<u8>) -> bool {
    use std::io::Read;
    let before = window.len();
    let _ = log.read_to_end(window);
    let grew = window.len() > before;
    if window.len() > 4096 {
        window.drain(..window.len() - 4096);
    }
    grew
}

/// Starts QEMU held, records its reads of the image until the marker, its
/// exit or the timeout. `progress` is called with the record count now and then.
///
/// # Errors
/// QEMU cannot be started or controlled, or the recorder cannot attach.
pub fn record_qemu(opts: &QemuOptions, mut progress: impl FnMut(usize)) -> Result<QemuRecording, RecordError> {
    if opts.command.iter().any(|a| a == "-serial" || a == "-qmp" || a == "-S") {
        return Err(RecordError::Qemu {
            what: "do not pass -serial, -qmp or -S: the recorder adds its own (use --console-log to keep the console)".into(),
            source: std::io::ErrorKind::InvalidInput.into(),
        });
    }
    if opts.command.iter().any(|a| a.to_string_lossy().contains("aio=io_uring")) {
        return Err(RecordError::Qemu {
            what: "aio=io_uring submits reads through a shared ring, not a syscall the probes see: use aio=threads or aio=native to record"
                .into(),
            source: std::io::ErrorKind::Unsupported.into(),
        });
    }
    let sock = opts.work_dir.join("qmp.sock");
    let console = opts.console_log.clone().unwrap_or_else(|| opts.work_dir.join("console.log"));
    let _ = std::fs::remove_file(&sock);
    std::fs::write(&console, b"").map_err(|source| RecordError::Qemu { what: format!("creating {}", console.display()), source })?;
    let stderr = std::fs::File::create(opts.work_dir.join("qemu.log"))
        .map_err(|source| RecordError::Qemu { what: "creating qemu.log".into(), source })?;
    let (program, args) = opts
        .command
        .split_first()
        .ok_or(RecordError::Qemu { what: "no QEMU command given".into(), source: std::io::ErrorKind::InvalidInput.into() })?;
    let mut child = Command::new(program)
        .args(args)
        .arg("-S")
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .arg("-chardev")
        .arg(format!("file,id=bcserial,path={}", console.display()))
        .arg("-serial")
        .arg("chardev:bcserial")
        .stdin(Stdio::null())
        .stdout(stderr.try_clone().map_err(|source| RecordError::Qemu { what: "qemu.log".into(), source })?)
        .stderr(stderr)
        .spawn()
        .map_err(|source| RecordError::Qemu { what: format!("starting {}", program.to_string_lossy()), source })?;
    let result = run(opts, &mut child, &sock, &console, &mut progress);
    if result.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

fn run(
    opts: &QemuOptions,
    child: &mut Child,
    sock: &Path,
    console: &Path,
    progress: &mut impl FnMut(usize),
) -> Result<QemuRecording, RecordError> {
    let spawned = Instant::now();
    let mut stream = connect(sock, child)?;
    let mut reader = BufReader::new(stream.try_clone().map_err(|source| RecordError::Qemu { what: "QMP".into(), source })?);
    let mut greeting = String::new();
    reader.read_line(&mut greeting).map_err(|source| RecordError::Qemu { what: "QMP greeting".into(), source })?;
    qmp(&mut stream, &mut reader, "qmp_capabilities")?;
    let mut rec = if opts.probes { Some(Recorder::attach(child.id(), &opts.image, opts.space)?) } else { None };
    if let Some(wait) = opts.hold.checked_sub(spawned.elapsed()) {
        std::thread::sleep(wait);
    }
    if let Some(rec) = rec.as_mut() {
        rec.restart_clock(); // time zero: the guest starts running
    }
    qmp(&mut stream, &mut reader, "cont")?;
    let started = Instant::now();
    let mut log =
        std::fs::File::open(console).map_err(|source| RecordError::Qemu { what: format!("opening {}", console.display()), source })?;
    let mut window = Vec::new();
    let outcome = loop {
        match rec.as_mut() {
            Some(rec) => {
                rec.poll(Duration::from_millis(50))?;
                progress(rec.records().len());
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
        if console_grew(&mut log, &mut window) && opts.marker.is_match(&String::from_utf8_lossy(&window)) {
            break Outcome::Marker(started.elapsed());
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Outcome::QemuExited(status);
        }
        if started.elapsed() > opts.timeout {
            break Outcome::Timeout;
        }
    };
    if let Some(rec) = rec.as_mut() {
        rec.poll(Duration::from_millis(100))?;
    }
    if !matches!(outcome, Outcome::QemuExited(_)) {
        let _ = qmp(&mut stream, &mut reader, "quit");
        let deadline = Instant::now() + Duration::from_secs(5);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    let info = TraceInfo {
        recorder: format!("bootcache {} (eBPF, syscall tracepoints)", env!("CARGO_PKG_VERSION")),
        extra: json!({
            "command": opts.command.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>(),
            "marker": opts.marker.as_str(),
            "outcome": format!("{outcome:?}"),
        }),
    };
    let trace = match rec {
        Some(rec) => rec.finish(info),
        None => Trace { info, ..Trace::default() },
    };
    Ok(QemuRecording { trace, outcome, console_tail: tail(console, 15) })
}
