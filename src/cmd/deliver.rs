//! `bootcache store serve`, `bootcache node serve` and `bootcache boot`:
//! delivering images to compute nodes.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bootcache_delivery::cache::{Background, CacheOptions, Prefetch};
use bootcache_delivery::node::Node;
use bootcache_delivery::store::{self, StoreStats};
use bootcache_http::Limits;
use bootcache_http::auth::Credential;
use bootcache_http::redact;
use bootcache_trace::{OffsetSpace, Trace};
use clap::{Args, Subcommand};
use serde_json::json;

use super::record::REFERENCE_MARKER;

#[derive(Debug, Subcommand)]
pub enum StoreCmd {
    /// Serve the bootcache images in DIR over HTTP (Range, HEAD, ETag = root digest).
    Serve {
        /// Directory of images; only plain files directly inside it are served.
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Run a node's caches and NBD exports, with an HTTP API to open and close images.
    ///
    /// POST /images {"name": N, "url": URL} opens an image (shared cache per root
    /// digest) and exports it as N; GET /images lists them with their state and
    /// metrics; DELETE /images/N closes; GET /metrics gives Prometheus text.
    /// Every call but /metrics needs `Authorization: Bearer TOKEN`, the token in
    /// --token-file (made on first start; `bootcache node token` prints it).
    Serve {
        #[command(flatten)]
        cache: CacheArgs,
        /// Unix socket for NBD clients (QEMU: nbd+unix:///NAME?socket=PATH). A
        /// file that is not a socket, or a socket another node serves, is refused.
        #[arg(long, value_name = "PATH")]
        nbd_socket: PathBuf,
        /// Also serve NBD on this TCP address. NBD has no authentication: an
        /// address other than loopback also needs --nbd-insecure.
        #[arg(long, value_name = "ADDR")]
        nbd_listen: Option<SocketAddr>,
        /// Allow --nbd-listen on a non-loopback address (anyone who reaches
        /// it can read the exported images).
        #[arg(long)]
        nbd_insecure: bool,
        /// Address of the HTTP API.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7070")]
        api: SocketAddr,
        #[command(flatten)]
        token: TokenArgs,
    },
    /// Print the node API's token (made if there is none), or rotate it.
    ///
    /// Nodes that fetch from each other share one token file. After
    /// --rotate the previous token is still accepted until the next
    /// rotation; copy the new file to every node in between.
    Token {
        #[command(flatten)]
        token: TokenArgs,
        /// Make a new token; the current one stays accepted until the next rotation.
        #[arg(long)]
        rotate: bool,
    },
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The file holding the API's token (mode 0600; made on first use).
    #[arg(long, value_name = "PATH", default_value = "/var/lib/bootcache/node.token")]
    token_file: PathBuf,
}

#[derive(Debug, Args)]
pub struct CacheArgs {
    /// The node's cache directory (one subdirectory per image root digest).
    #[arg(long, value_name = "DIR", default_value = "/var/cache/bootcache")]
    cache_dir: PathBuf,
    /// After the boot segment: `off`, `full`, or a rate in bytes per second
    /// (suffixes K, M, G: powers of 1024), e.g. `20M`.
    #[arg(long, value_name = "WHAT", default_value = "full", value_parser = parse_background)]
    background: Background,
    /// Start the background stream this many seconds after the image is
    /// opened (never before the prefetch is done). Default: when the
    /// image's recorded boot would be over and the guests have not read for
    /// 2 s (at most a minute later), so the rest of the image does not
    /// compete with booting guests; at once for images without a trace.
    #[arg(long, value_name = "SECS")]
    background_after: Option<f64>,
    /// A guest read waiting for an unreachable store fails after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    read_timeout: f64,
    /// Another node to fetch extents from before the store: the base URL of
    /// its node API (`bootcache node serve --api`), e.g. http://10.0.0.2:7000.
    /// Repeatable. Its bytes are verified like the store's; what it lacks
    /// comes from the store. A peer still fetching the same boot segment
    /// relays it as it arrives (chain nodes that deploy at once: each names
    /// the one before it).
    #[arg(long, value_name = "URL")]
    peer: Vec<String>,
    /// What to fetch before the guest asks: `boot` (the boot segment, in
    /// first-access order), `off` (guest misses only), or a trace file
    /// (guest offsets): the extents it read, in its order, wherever they
    /// lie in the container. The last two are for comparisons.
    #[arg(long, value_name = "WHAT", default_value = "boot")]
    prefetch: String,
}

impl CacheArgs {
    fn options(&self) -> anyhow::Result<CacheOptions> {
        let mut o = CacheOptions::new(&self.cache_dir);
        o.prefetch = match self.prefetch.as_str() {
            "boot" => Prefetch::BootSegment,
            "off" => Prefetch::Off,
            path => Prefetch::Ranges(trace_order(Path::new(path))?),
        };
        o.background = self.background;
        o.background_after = self.background_after.map(|s| Duration::from_secs_f64(s.clamp(0.0, 86_400.0)));
        o.read_timeout = Duration::from_secs_f64(self.read_timeout.max(0.0));
        o.retry.budget = o.read_timeout.max(Duration::from_secs(1));
        o.peers.clone_from(&self.peer);
        Ok(o)
    }
}

/// The guest ranges a trace read, in first-access order.
fn trace_order(path: &Path) -> anyhow::Result<Vec<std::ops::Range<u64>>> {
    let t = Trace::open(path).with_context(|| format!("--prefetch: reading trace {}", path.display()))?;
    if t.space != OffsetSpace::Guest {
        bail!("--prefetch: {} holds image-file offsets; map it to guest offsets first (bootcache trace map)", path.display());
    }
    Ok(t.first_access_order().pieces().iter().map(|p| p.range.clone()).collect())
}

pub(super) fn parse_background(s: &str) -> Result<Background, String> {
    match s {
        "off" => Ok(Background::Off),
        "full" => Ok(Background::Unlimited),
        _ => {
            let n = parse_size(s).map_err(|_| format!("expected off, full or a rate like 20M, not {s:?}"))?;
            Ok(Background::Rate(n.max(1)))
        }
    }
}

/// `256K`, `1M`, `2G` or a number (binary multiples).
pub(super) fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size such as 256K or 1M"))?;
    Ok(n.saturating_mul(mult))
}

#[derive(Debug, Args)]
pub struct BootArgs {
    /// Base URL of the store (e.g. http://store:8080).
    #[arg(long, value_name = "URL")]
    store: String,
    /// The image's file name on the store.
    image: String,
    #[command(flatten)]
    cache: CacheArgs,
    /// The guest's disk interface.
    #[arg(long, value_name = "IF", default_value = "virtio")]
    drive_if: String,
    /// Report when a console line matches this regular expression.
    #[arg(long, value_name = "REGEX", default_value = REFERENCE_MARKER)]
    marker: String,
    /// Stop QEMU once the marker is seen.
    #[arg(long)]
    exit_at_marker: bool,
    /// Stop QEMU after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    timeout: u64,
    /// Print one JSON object (outcome, marker time, cache metrics) on stdout.
    #[arg(long)]
    json: bool,
    /// QEMU and its arguments, after `--`, without the disk: bootcache adds
    /// the drive (a qcow2 overlay over the cache's NBD export) and the serial
    /// console it watches.
    #[arg(last = true, required = true, value_name = "QEMU")]
    qemu: Vec<OsString>,
}

pub(super) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

pub(super) async fn until_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
    }
}

pub fn store(cmd: StoreCmd) -> anyhow::Result<ExitCode> {
    let StoreCmd::Serve { dir, listen } = cmd;
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    runtime()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
        eprintln!("serving {} on http://{}/", dir.display(), listener.local_addr()?);
        store::serve_until(listener, dir, Arc::new(StoreStats::default()), until_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn node(cmd: NodeCmd) -> anyhow::Result<ExitCode> {
    let (cache, nbd_socket, nbd_listen, nbd_insecure, api, token) = match cmd {
        NodeCmd::Token { token, rotate } => {
            let t = if rotate { Credential::rotate(&token.token_file)? } else { Credential::load_or_create(&token.token_file)?.token() };
            println!("{t}");
            return Ok(ExitCode::SUCCESS);
        }
        NodeCmd::Serve { cache, nbd_socket, nbd_listen, nbd_insecure, api, token } => {
            (cache, nbd_socket, nbd_listen, nbd_insecure, api, token)
        }
    };
    if let Some(addr) = nbd_listen
        && !addr.ip().is_loopback()
        && !nbd_insecure
    {
        bail!(
            "--nbd-listen {addr}: NBD has no authentication, so anyone reaching {addr} could read the images; add --nbd-insecure to serve it anyway"
        );
    }
    let credential = Credential::load_or_create(&token.token_file)?;
    runtime()?.block_on(async {
        let mut opts = cache.options()?;
        opts.peer_authorization = Some(credential.authorization());
        let node = Node::new(nbd_socket.clone(), opts);
        let unix = bootcache_delivery::nbd::bind_unix(&nbd_socket).with_context(|| format!("binding {}", nbd_socket.display()))?;
        tokio::spawn(node.nbd().serve_unix(unix));
        if let Some(addr) = nbd_listen {
            let tcp = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listening on {addr}"))?;
            tokio::spawn(node.nbd().serve_tcp(tcp));
        }
        let listener = tokio::net::TcpListener::bind(api).await.with_context(|| format!("listening on {api}"))?;
        eprintln!(
            "node API on http://{}/ (token in {}), NBD on {}",
            listener.local_addr()?,
            token.token_file.display(),
            nbd_socket.display()
        );
        let served = bootcache_http::serve(listener, node.api(credential), Limits::default(), until_signal()).await;
        let _ = std::fs::remove_file(&nbd_socket);
        served?;
        Ok(ExitCode::SUCCESS)
    })
}

pub fn boot(args: &BootArgs) -> anyhow::Result<ExitCode> {
    let marker = regex::Regex::new(&args.marker).with_context(|| format!("--marker {:?}", args.marker))?;
    if args.qemu.iter().any(|a| a == "-serial") {
        bail!("do not pass -serial: bootcache boot attaches the serial console it watches for the marker");
    }
    let work = tempfile::Builder::new().prefix("bootcache-boot-").tempdir().context("creating a work directory")?;
    let url = format!("{}/{}", args.store.trim_end_matches('/'), args.image);
    runtime()?.block_on(async {
        let sock = work.path().join("nbd.sock");
        let node = Node::new(sock.clone(), args.cache.options()?);
        tokio::spawn(node.nbd().serve_unix(tokio::net::UnixListener::bind(&sock)?));
        let opened = Instant::now();
        let image = node.open("disk", &url, &[], None).await.with_context(|| format!("opening {}", redact(&url)))?;
        tracing::info!(root = %image.root_digest, seconds = opened.elapsed().as_secs_f64(), "image open");
        let overlay = work.path().join("overlay.qcow2");
        let size = image.virtual_size.to_string();
        let out = tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", &image.nbd_url])
            .arg(&overlay)
            .arg(&size)
            .output()
            .await
            .context("running qemu-img (install qemu-utils)")?;
        if !out.status.success() {
            bail!("qemu-img create failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let console = work.path().join("console.log");
        std::fs::File::create(&console)?;
        let mut cmd = tokio::process::Command::new(&args.qemu[0]);
        cmd.args(&args.qemu[1..])
            .arg("-drive")
            .arg(format!("file={},format=qcow2,if={}", overlay.display(), args.drive_if))
            .arg("-chardev")
            .arg(format!("file,id=bcserial,path={}", console.display()))
            .arg("-serial")
            .arg("chardev:bcserial")
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("starting {}", args.qemu[0].to_string_lossy()))?;
        let (outcome, marker_at) = watch(&mut child, &console, &marker, args, started).await?;
        let metrics = node.metrics(&image.layers);
        if args.json {
            println!(
                "{}",
                json!({
                    "outcome": outcome,
                    "marker_seconds": marker_at.map(|d| d.as_secs_f64()),
                    "root_digest": image.root_digest,
                    "metrics": metrics,
                })
            );
        } else {
            eprintln!(
                "{outcome}; fetched {} bytes (boot prefetch {}, on demand {}, background {}), {} of {} guest reads waited ({:.2} s in all)",
                metrics.fetched_bytes(),
                metrics.boot_prefetch_bytes,
                metrics.demand_bytes,
                metrics.background_bytes,
                metrics.misses,
                metrics.guest_reads,
                metrics.miss_wait_seconds
            );
        }
        Ok(if outcome == "qemu failed" || outcome == "timeout" { ExitCode::FAILURE } else { ExitCode::SUCCESS })
    })
}

/// Follows the console until the marker (and exit if asked), QEMU's exit or
/// the timeout. Returns the outcome and when the marker was seen.
async fn watch(
    child: &mut tokio::process::Child,
    console: &Path,
    marker: &regex::Regex,
    args: &BootArgs,
    started: Instant,
) -> anyhow::Result<(&'static str, Option<Duration>)> {
    use std::io::Read;
    // The file position follows what has been read: each pass reads only new bytes.
    let mut log = std::fs::File::open(console)?;
    let mut window = Vec::new();
    let mut marker_at = None;
    loop {
        if marker_at.is_none() && log.read_to_end(&mut window)? > 0 {
            if marker.is_match(&String::from_utf8_lossy(&window)) {
                marker_at = Some(started.elapsed());
                eprintln!("boot marker after {:.3} s", started.elapsed().as_secs_f64());
                if args.exit_at_marker {
                    let _ = child.kill().await;
                    return Ok(("marker", marker_at));
                }
            }
            // Keep the tail only: a marker split across reads is still found.
            window.drain(..window.len().saturating_sub(4096));
        }
        tokio::select! {
            status = child.wait() => {
                let status = status?;
                return Ok((if status.success() { if marker_at.is_some() { "marker" } else { "qemu exited" } } else { "qemu failed" }, marker_at));
            }
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        if started.elapsed() > Duration::from_secs(args.timeout) {
            let _ = child.kill().await;
            return Ok(("timeout", marker_at));
        }
    }
}
