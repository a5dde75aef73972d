//! `bootcache deploy`, `inspect` and `destroy`: labs on a control node, or
//! on this machine's own (a control node and an agent in one background
//! process, started on first use) when no `--control` is given.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bootcache_api::control::InstanceView;
use bootcache_api::lab::LabSource;
use bootcache_api::{InstanceState, Lab, Name};
use bootcache_control::client::{Client, ClientError};
use bootcache_http::auth::Credential;
use clap::Args;

use super::Output;

/// Where this machine's own control node keeps its state.
const LOCAL_DIR: &str = "/var/lib/bootcache/local";
/// Its API.
const LOCAL_CONTROL: &str = "127.0.0.1:7080";
/// Its agent's node API.
const LOCAL_AGENT: &str = "127.0.0.1:7070";

/// Which control node to talk to.
#[derive(Debug, Args)]
pub struct ControlArgs {
    /// The control node (http://HOST:PORT). Without it, this machine's own
    /// (state in /var/lib/bootcache/local), started when first needed.
    #[arg(long, value_name = "URL", env = "BOOTCACHE_CONTROL")]
    control: Option<String>,
    /// The control node's token file (default: /var/lib/bootcache/control.token
    /// with --control, the local one's without).
    #[arg(long, value_name = "PATH", env = "BOOTCACHE_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The lab file (YAML: name, segments, instances). Files that its
    /// instances take `{from: NAME}` are read from beside it and sent with
    /// it.
    #[arg(short, long, value_name = "LAB.yaml")]
    file: PathBuf,
    #[command(flatten)]
    control: ControlArgs,
    /// Return once the lab is recorded and placed, without waiting for its instances.
    #[arg(long)]
    no_wait: bool,
    /// How long to wait for every instance to be ready or failed.
    #[arg(long, value_name = "SECS", default_value_t = 900)]
    timeout: u64,
    /// Output format of the final table.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The lab (without: every lab, with its instances by state).
    lab: Option<String>,
    #[command(flatten)]
    control: ControlArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Args)]
pub struct DestroyArgs {
    /// The lab.
    lab: String,
    #[command(flatten)]
    control: ControlArgs,
    /// How long to wait for the nodes to remove what they run of it.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    timeout: u64,
}

#[derive(Debug, Args)]
pub struct InstanceArgs {
    /// The lab.
    lab: String,
    /// The instances (as `inspect` names them).
    #[arg(required = true)]
    instances: Vec<String>,
    #[command(flatten)]
    control: ControlArgs,
    /// How long to wait until each is stopped (or ready again).
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    timeout: u64,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The lab.
    lab: String,
    /// The instance (as `inspect` names it).
    instance: String,
    /// The command and its arguments (no shell: `-- sh -c '...'` for one).
    #[arg(last = true, required = true, value_name = "CMD")]
    argv: Vec<String>,
    #[command(flatten)]
    control: ControlArgs,
    /// The most the command may run.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    timeout: u64,
}

#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The lab.
    lab: String,
    /// The instance (as `inspect` names it).
    instance: String,
    #[command(flatten)]
    control: ControlArgs,
    /// Keep printing what it prints, every 2 s, until interrupted.
    #[arg(short, long)]
    follow: bool,
}

/// `bootcache exec`: the command's output on stdout, its exit code as ours
/// (0-255), or an error saying why it could not run.
pub fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let (lab, name) = (lab_name(&args.lab)?, lab_name(&args.instance)?);
    super::deliver::runtime()?.block_on(async {
        let client = connect(&args.control).await?;
        let r = client.exec(&lab, &name, &args.argv, Duration::from_secs(args.timeout.clamp(1, 600))).await?;
        if let Some(e) = r.error {
            bail!("{lab}/{name}: {e}");
        }
        print!("{}", r.output);
        Ok(ExitCode::from(u8::try_from(r.code.unwrap_or(1).clamp(0, 255)).unwrap_or(1)))
    })
}

/// `bootcache logs`: what an instance printed; with `--follow`, what it
/// prints next as well.
pub fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let (lab, name) = (lab_name(&args.lab)?, lab_name(&args.instance)?);
    super::deliver::runtime()?.block_on(async {
        let client = connect(&args.control).await?;
        let mut shown = String::new();
        loop {
            let r = client.logs(&lab, &name).await?;
            if let Some(e) = r.error {
                bail!("{lab}/{name}: {e}");
            }
            // Only what is new since the last look (all of it if the end moved past it).
            let new = r.output.strip_prefix(shown.as_str()).unwrap_or(&r.output);
            print!("{new}");
            std::io::stdout().flush()?;
            if !args.follow {
                return Ok(ExitCode::SUCCESS);
            }
            shown = r.output;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    })
}

/// `bootcache stop` (`running` false) and `bootcache start`: each instance
/// stopped on its node and kept, or started again; waits until done.
pub fn set_running(args: InstanceArgs, running: bool) -> anyhow::Result<ExitCode> {
    let lab = lab_name(&args.lab)?;
    let names: Vec<Name> = args.instances.iter().map(|n| lab_name(n)).collect::<anyhow::Result<_>>()?;
    let want = if running { InstanceState::Ready } else { InstanceState::Stopped };
    super::deliver::runtime()?.block_on(async {
        let client = connect(&args.control).await?;
        for n in &names {
            match client.set_running(&lab, n, running).await {
                Err(ClientError::Refused { status: 404, message }) => bail!("{message}"),
                r => r?,
            }
        }
        let start = Instant::now();
        loop {
            let views = client.instances(&lab).await?;
            let pending: Vec<&InstanceView> = views.iter().filter(|v| names.contains(&v.name) && v.state != want).collect();
            if let Some(f) = pending.iter().find(|v| v.state == InstanceState::Failed) {
                bail!("{}: {}", f.name, f.reason.as_deref().unwrap_or("failed"));
            }
            if pending.is_empty() {
                eprintln!("{} {}", if running { "started" } else { "stopped" }, args.instances.join(", "));
                return Ok(ExitCode::SUCCESS);
            }
            if start.elapsed() > Duration::from_secs(args.timeout) {
                bail!(
                    "not {want} after {} s: {}",
                    args.timeout,
                    pending.iter().map(|v| format!("{} ({})", v.name, v.state)).collect::<Vec<_>>().join(", ")
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

fn lab_name(s: &str) -> anyhow::Result<Name> {
    s.parse().map_err(|e| anyhow::anyhow!("{e}"))
}

/// The client of the control node the arguments name, starting this
/// machine's own when none is named.
async fn connect(args: &ControlArgs) -> anyhow::Result<Client> {
    match &args.control {
        Some(url) => {
            let file = args.token_file.clone().unwrap_or_else(|| PathBuf::from("/var/lib/bootcache/control.token"));
            // A token file others may read is refused: it is the administrator's.
            let credential = Credential::load(&file).with_context(|| format!("the control node's token ({})", file.display()))?;
            Ok(Client::new(url, &credential)?)
        }
        None => local().await,
    }
}

/// This machine's own control node and agent, started in the background
/// when they do not answer.
async fn local() -> anyhow::Result<Client> {
    let dir = Path::new(LOCAL_DIR);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {LOCAL_DIR} (run as root)"))?;
    let credential = Credential::load_or_create(&dir.join("token"))?;
    let client = Client::new(&format!("http://{LOCAL_CONTROL}"), &credential)?;
    if local_node_up(&client).await {
        return Ok(client);
    }
    let log_path = dir.join("service.log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let exe = std::env::current_exe().context("finding this program")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["-v", "control", "serve", "--db"])
        .arg(dir.join("control.db"))
        .args(["--listen", LOCAL_CONTROL, "--heartbeat", "1", "--token-file"])
        .arg(dir.join("token"))
        .args(["--agent", "local", "--agent-listen", LOCAL_AGENT, "--agent-state"])
        .arg(dir.join("agent"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("starting this machine's control node")?;
    // `kill $(cat /var/lib/bootcache/local/service.pid)` stops it.
    std::fs::write(dir.join("service.pid"), format!("{}\n", child.id()))?;
    eprintln!("started this machine's control node and agent (log {})", log_path.display());
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(8).collect();
            bail!("this machine's control node stopped ({status}):\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        if local_node_up(&client).await {
            return Ok(client);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    bail!("this machine's control node did not come up within 60 s (see {})", log_path.display())
}

async fn local_node_up(client: &Client) -> bool {
    match client.nodes().await {
        Ok(nodes) => nodes.iter().any(|n| n.name.as_str() == "local" && n.up),
        Err(_) => false,
    }
}

/// Reads a lab file, no more than a lab file may hold (`/dev/zero` is
/// refused at once).
fn read_lab_file(path: &Path) -> anyhow::Result<String> {
    read_text(path, bootcache_api::lab::MAX_FILE_BYTES, "a lab file")
}

/// At most `limit` bytes of UTF-8 text from `path`, refused beyond.
fn read_text(path: &Path, limit: usize, what: &str) -> anyhow::Result<String> {
    use std::io::Read;
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(limit as u64 + 1).read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() > limit {
        bail!("{}: {what} is at most {limit} bytes", path.display());
    }
    String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{}: {what} is UTF-8 text", path.display()))
}

/// The lab file at `path` with the files its `from:` names, read from
/// beside it (each bounded as a container's file is).
fn lab_source(path: &Path, text: String) -> anyhow::Result<LabSource> {
    let names = Lab::attachments(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut files = bootcache_api::lab::Attached::new();
    for (name, line) in names {
        let at = line.map_or(String::new(), |l| format!("line {l}: "));
        let content = read_text(&dir.join(&name), bootcache_api::lab::MAX_FILE_CONTENT, "a file given to an instance")
            .map_err(|e| anyhow::anyhow!("{}: {at}from: {name}: {e:#}", path.display()))?;
        files.insert(name, content);
    }
    Ok(LabSource { text, files })
}

pub fn deploy(args: DeployArgs) -> anyhow::Result<ExitCode> {
    let text = read_lab_file(&args.file)?;
    let source = lab_source(&args.file, text)?;
    // Checked here first: a bad file starts nothing, not even a control node.
    let lab = source.parse().map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    super::deliver::runtime()?.block_on(async {
        let client = connect(&args.control).await?;
        let started = Instant::now();
        client.deploy(&source).await.map_err(refused(&args.file))?;
        if args.no_wait {
            eprintln!("lab {} deployed ({} instances); `bootcache inspect {}` follows it", lab.name, lab.instances().len(), lab.name);
            return Ok(ExitCode::SUCCESS);
        }
        let views = follow(&client, &lab.name, Duration::from_secs(args.timeout)).await?;
        print_views(&lab.name, &views, args.output)?;
        let failed = views.iter().filter(|v| v.state != InstanceState::Ready).count();
        eprintln!(
            "lab {}: {} of {} instances ready in {:.1} s",
            lab.name,
            views.len() - failed,
            views.len(),
            started.elapsed().as_secs_f64()
        );
        Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    })
}

fn refused(file: &Path) -> impl FnOnce(ClientError) -> anyhow::Error + '_ {
    move |e| match e {
        ClientError::Refused { status: 400, message } => anyhow::anyhow!("{}: {message}", file.display()),
        e => e.into(),
    }
}

/// Follows a lab until every instance is ready, failed or lost, printing
/// each change (with a summary line on a terminal); rides out a control
/// node that restarts.
async fn follow(client: &Client, lab: &Name, timeout: Duration) -> anyhow::Result<Vec<InstanceView>> {
    let tty = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new_spinner();
    if !tty {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    let start = Instant::now();
    let mut seen: BTreeMap<Name, InstanceState> = BTreeMap::new();
    let mut last_error = None;
    loop {
        match client.instances(lab).await {
            Ok(views) => {
                last_error = None;
                for v in &views {
                    if seen.get(&v.name) != Some(&v.state) {
                        seen.insert(v.name.clone(), v.state);
                        let reason = v.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
                        let line = format!(
                            "{:>7.1} s  {:<20} {:<9} {:<12} {}{reason}",
                            start.elapsed().as_secs_f64(),
                            v.name.as_str(),
                            kind(v),
                            v.node.as_ref().map_or("-", Name::as_str),
                            v.state
                        );
                        bar.suspend(|| eprintln!("{line}"));
                    }
                }
                let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
                for v in &views {
                    *counts.entry(v.state.as_str()).or_default() += 1;
                }
                bar.set_message(counts.iter().map(|(s, n)| format!("{n} {s}")).collect::<Vec<_>>().join(", "));
                let done = views.iter().all(|v| {
                    matches!(v.state, InstanceState::Ready | InstanceState::Failed | InstanceState::Lost | InstanceState::Stopped)
                });
                if done && !views.is_empty() {
                    bar.finish_and_clear();
                    return Ok(views);
                }
            }
            Err(e) if e.is_transient() => {
                if last_error.is_none() {
                    bar.suspend(|| eprintln!("the control node does not answer; waiting ({e})"));
                }
                last_error = Some(e);
            }
            Err(e) => return Err(e.into()),
        }
        if start.elapsed() > timeout {
            bar.finish_and_clear();
            bail!(
                "lab {lab}: not every instance is ready or failed after {} s (`bootcache inspect {lab}` shows where each stands)",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn kind(v: &InstanceView) -> &'static str {
    match v.kind {
        bootcache_api::Kind::Vm => "vm",
        bootcache_api::Kind::Container => "container",
    }
}

fn print_views(lab: &Name, views: &[InstanceView], output: Output) -> anyhow::Result<()> {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"lab": lab, "instances": views}))?);
        return Ok(());
    }
    println!("{:<20} {:<9} {:<12} {:<9} {:<16} {:>9}  reason", "instance", "kind", "node", "state", "address", "ready (s)");
    for v in views {
        let address = v.addresses.iter().map(|(_, a)| a.to_string()).collect::<Vec<_>>().join(",");
        let ready = v.ready_after_ms.map_or_else(|| "-".to_owned(), |ms| format!("{:.1}", ms as f64 / 1000.0));
        println!(
            "{:<20} {:<9} {:<12} {:<9} {:<16} {:>9}  {}",
            v.name.as_str(),
            kind(v),
            v.node.as_ref().map_or("-", Name::as_str),
            v.state.as_str(),
            if address.is_empty() { "-" } else { &address },
            ready,
            v.reason.as_deref().unwrap_or("")
        );
    }
    // Registry images, as pinned when the lab was deployed.
    let mut pinned: std::collections::BTreeMap<&str, Vec<&str>> = std::collections::BTreeMap::new();
    for v in views {
        if let Some(p) = &v.pinned {
            pinned.entry(p.as_str()).or_default().push(v.name.as_str());
        }
    }
    for (reference, names) in pinned {
        println!("image {reference}: {}", names.join(", "));
    }
    Ok(())
}

pub fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    super::deliver::runtime()?.block_on(async {
        let client = connect(&args.control).await?;
        match &args.lab {
            Some(lab) => {
                let lab = lab_name(lab)?;
                let views = match client.instances(&lab).await {
                    Err(ClientError::Refused { status: 404, .. }) => bail!("no lab {lab} on this control node"),
                    r => r?,
                };
                print_views(&lab, &views, args.output)?;
            }
            None => {
                let labs = client.labs().await?;
                if args.output == Output::Json {
                    println!("{}", serde_json::to_string_pretty(&labs)?);
                } else if labs.is_empty() {
                    println!("no labs");
                } else {
                    for l in labs {
                        let states: Vec<String> = l.states.iter().map(|(s, n)| format!("{n} {s}")).collect();
                        println!("{:<24} {:>5} instances  {}", l.name.as_str(), l.instances, states.join(", "));
                    }
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn destroy(args: DestroyArgs) -> anyhow::Result<ExitCode> {
    let lab = lab_name(&args.lab)?;
    super::deliver::runtime()?.block_on(async {
        let client = connect(&args.control).await?;
        client.destroy(&lab).await?;
        let start = Instant::now();
        loop {
            let r = client.remaining(&lab).await?;
            if r.remaining.is_empty() {
                if !r.on_down_nodes.is_empty() {
                    eprintln!("lab {lab} destroyed; {} instances on nodes that are down go when those come back", r.on_down_nodes.len());
                } else {
                    eprintln!("lab {lab} destroyed; nothing of it runs");
                }
                return Ok(ExitCode::SUCCESS);
            }
            if start.elapsed() > Duration::from_secs(args.timeout) {
                bail!("lab {lab}: {} instances still run after {} s: {:?}", r.remaining.len(), args.timeout, r.remaining);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}
