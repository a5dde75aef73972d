//! `bootcache agent`: one per compute node.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bootcache_http::auth::Credential;
use clap::{Args, ValueEnum};

/// How QEMU runs guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// Software emulation (always works).
    Tcg,
    /// KVM (where a stock kernel boots under it; scripts/qemu-accel tells).
    Kvm,
}

/// What an agent needs besides its control node.
#[derive(Clone, Debug, Args)]
pub struct AgentOptions {
    /// Where the node's API (peers, metrics) listens; the control node and
    /// other nodes reach it there (or at --advertise).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7070")]
    pub agent_listen: SocketAddr,
    /// The address others use for this node, when not --agent-listen's
    /// (also its VXLAN tunnel end).
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<SocketAddr>,
    /// The agent's state: image caches, overlays, consoles, DHCP files.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/bootcache/agent")]
    pub agent_state: PathBuf,
    /// libvirtd, for VMs.
    #[arg(long, value_name = "URI", default_value = "qemu:///system")]
    pub libvirt: String,
    /// dockerd's socket, for containers.
    #[arg(long, value_name = "PATH", default_value = "/var/run/docker.sock")]
    pub docker: String,
    /// Run no VMs (no libvirtd needed).
    #[arg(long)]
    pub no_vms: bool,
    /// Run no containers (no dockerd needed).
    #[arg(long)]
    pub no_containers: bool,
    /// How QEMU runs guests.
    #[arg(long, value_enum, default_value_t = Accel::Tcg)]
    pub accel: Accel,
    /// How long an instance may take to be ready before it is failed.
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub ready_timeout: u64,
    /// After a VM image's boot segment: `off`, `full`, or a rate in bytes
    /// per second (K, M, G suffixes), streamed once the recorded boot is over.
    #[arg(long, value_name = "WHAT", default_value = "full", value_parser = super::deliver::parse_background)]
    pub background: bootcache_delivery::cache::Background,
    /// Carry VM orders out only up to holding the image's boot segment, and
    /// report the instance ready then; start no VM (no libvirtd needed).
    /// For warming nodes' caches ahead of a deployment, and for measuring
    /// delivery alone.
    #[arg(long)]
    pub prefetch_only: bool,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The control node (http://HOST:PORT).
    #[arg(long, value_name = "URL")]
    control: String,
    /// This node's name.
    #[arg(long, value_name = "NODE")]
    name: String,
    /// The join token (`bootcache control token --join` prints it): the node
    /// joins with it once and is given a credential of its own (kept in
    /// its state directory), and the cluster's peer token. The
    /// administrator's token works too, but need not be on a compute node.
    #[arg(long, value_name = "PATH", default_value = "/var/lib/bootcache/join.token")]
    token_file: PathBuf,
    /// Seconds between heartbeats (the control node's --heartbeat).
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    heartbeat: f64,
    /// Credentials for the registries whose blobs this node reads (VM and
    /// container images by reference), in Docker's config.json format;
    /// without it, anonymously (a registry's token flow is followed either
    /// way). Checked at start, read for each registry when the node first
    /// reads from it and kept (a changed file takes an agent restart);
    /// never printed.
    #[arg(long, value_name = "FILE", env = "BOOTCACHE_REGISTRY_CONFIG")]
    registry_config: Option<PathBuf>,
    /// A registry (HOST:PORT) read over plain HTTP; loopback ones are
    /// anyway. May be given several times.
    #[arg(long, value_name = "HOST:PORT")]
    insecure_registry: Vec<String>,
    #[command(flatten)]
    options: AgentOptions,
}

/// How an agent reaches registries: credentials file, insecure registries.
pub type RegistryAccess = (Option<PathBuf>, Vec<String>);

/// The agent's configuration from the command line.
pub fn config(
    name: &str,
    control: String,
    credential: std::sync::Arc<Credential>,
    heartbeat: Duration,
    o: &AgentOptions,
    registries: RegistryAccess,
) -> anyhow::Result<bootcache_agent::Config> {
    if let Some(path) = &registries.0 {
        // Refused at start rather than at the first image.
        bootcache_registry::Credentials::from_docker_config(path, "")?;
    }
    Ok(bootcache_agent::Config {
        name: name.parse().map_err(|e| anyhow::anyhow!("--name: {e}"))?,
        control,
        credential,
        listen: o.agent_listen,
        advertise: o.advertise,
        state_dir: std::path::absolute(&o.agent_state).with_context(|| format!("--agent-state {}", o.agent_state.display()))?,
        libvirt: (!o.no_vms && !o.prefetch_only).then(|| o.libvirt.clone()),
        docker: (!o.no_containers).then(|| o.docker.clone()),
        accel: match o.accel {
            Accel::Tcg => bootcache_runtime::libvirt::Accel::Tcg,
            Accel::Kvm => bootcache_runtime::libvirt::Accel::Kvm,
        },
        heartbeat,
        ready_timeout: Duration::from_secs(o.ready_timeout),
        background: o.background,
        prefetch_only: o.prefetch_only,
        registry_config: registries.0,
        insecure_registries: registries.1,
    })
}

pub fn agent(args: AgentArgs) -> anyhow::Result<ExitCode> {
    let credential = Credential::load(&args.token_file)
        .with_context(|| format!("the join token ({}; `bootcache control token --join` prints it)", args.token_file.display()))?;
    let heartbeat = Duration::from_secs_f64(args.heartbeat.clamp(0.1, 3600.0));
    let registries = (args.registry_config, args.insecure_registry);
    let config = config(&args.name, args.control, credential, heartbeat, &args.options, registries)?;
    super::deliver::runtime()?.block_on(async {
        eprintln!("agent {} for {} (node API on {})", config.name, config.control, config.listen);
        bootcache_agent::run(config, super::deliver::until_signal()).await?;
        Ok(ExitCode::SUCCESS)
    })
}
