//! The compute agent (`bootcache agent`), one per compute node: it runs a
//! delivery node (caches, NBD exports, the peer service other nodes fetch
//! from) and, as its control node orders, VMs through libvirt and
//! containers through Docker on the lab's bridges.
//!
//! ```text
//!  control node ◄──heartbeat (resources, caches, instance states)── agent
//!               ───orders (instances, images + peers, segments)───►  │
//!                                                                    ├─ network: bridges, VXLAN, veths, DHCP
//!                                                                    ├─ delivery node: image → NBD export
//!                                                                    └─ runtimes: libvirt (VMs), Docker (containers)
//! ```
//!
//! The agent only calls out: it takes orders from the control node it was
//! given and from nothing else, and its own port serves the delivery node's
//! API behind the same credential. Each heartbeat's orders are the whole
//! truth: what they list is made (once), what they do not is removed,
//! including what an earlier run of the agent left (found by name and
//! interface alias), so a restarted agent or control node converges.

#![deny(missing_docs)]

mod fetch;
mod instance;
mod reconcile;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bootcache_api::Name;
use bootcache_api::agent::{Heartbeat, Orders};
use bootcache_delivery::auth::Credential;
use bootcache_delivery::cache::CacheOptions;
use bootcache_delivery::node::Node;
use bootcache_runtime::docker::Docker;
use bootcache_runtime::libvirt::{Accel, Libvirt};

/// How an agent runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The node's name.
    pub name: Name,
    /// The control node, `http://host:port`.
    pub control: String,
    /// The credential: sent to the control node, required from peers.
    pub credential: Arc<Credential>,
    /// Where the node's API (peers, metrics) listens.
    pub listen: SocketAddr,
    /// The address the control node and peers use for it (and its VXLAN
    /// tunnel end); default `listen`.
    pub advertise: Option<SocketAddr>,
    /// Its state: caches, overlays, consoles, imported tarballs, DHCP.
    pub state_dir: PathBuf,
    /// libvirtd (e.g. `qemu:///system`); none: VMs fail with that reason.
    pub libvirt: Option<String>,
    /// dockerd's unix socket; none: containers fail with that reason.
    pub docker: Option<String>,
    /// How QEMU runs guests.
    pub accel: Accel,
    /// Between heartbeats.
    pub heartbeat: Duration,
    /// How long an instance may take to be ready.
    pub ready_timeout: Duration,
    /// What VM image caches fetch after the boot segment.
    pub background: bootcache_delivery::cache::Background,
    /// VM orders are carried out up to holding the boot segment, then
    /// reported ready; no VM is started.
    pub prefetch_only: bool,
}

/// The routes a node serves its whole tarballs from (`GET
/// /tarballs/{key}`, behind `credential`), over the tarballs in `dir`; the
/// agent serves them beside the delivery node's API (exposed for tests and
/// fuzzing).
pub fn tarball_routes(dir: PathBuf, credential: Arc<Credential>) -> axum::Router {
    fetch::routes(dir, credential)
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct AgentError(pub String);

/// What the agent's parts share.
pub(crate) struct Shared {
    pub config: Config,
    pub node: Arc<Node>,
    pub libvirt: Option<Libvirt>,
    pub docker: Option<Docker>,
    pub network: bootcache_network::Network,
    pub dhcp: bootcache_network::dhcp::DhcpServers,
    pub http: reqwest::Client,
    /// For whole files from the store and peers: no credential by default
    /// (the store is not sent it), no limit on a transfer's total time.
    pub files: reqwest::Client,
    pub local_ip: std::net::Ipv4Addr,
    pub instances: std::sync::Mutex<std::collections::HashMap<(Name, Name), instance::Local>>,
    /// Instances no order lists any more, until they are removed (still
    /// reported, so `destroy` waits for them).
    pub removing: std::sync::Mutex<std::collections::HashMap<(Name, Name), bootcache_api::InstanceState>>,
    pub images: tokio::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Runs the agent until `stop` completes.
///
/// # Errors
/// Its state directory, sockets or port cannot be set up.
pub async fn run(config: Config, stop: impl std::future::Future<Output = ()> + Send + 'static) -> Result<(), AgentError> {
    let dir = &config.state_dir;
    for sub in ["cache", "overlays", "consoles", "dhcp", "disks", "tarballs"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(|e| AgentError(format!("making {}: {e}", dir.join(sub).display())))?;
    }
    // QEMU runs as another user under libvirt: it must reach the socket and
    // the overlays (libvirt gives it the files themselves).
    open_to_qemu(dir);
    open_to_qemu(&dir.join("overlays"));
    open_to_qemu(&dir.join("disks"));
    let advertise = config.advertise.unwrap_or(config.listen);
    let IpAddr::V4(local_ip) = advertise.ip() else { return Err(AgentError(format!("--advertise {advertise}: an IPv4 address"))) };
    let mut opts = CacheOptions::new(dir.join("cache"));
    opts.peer_authorization = Some(config.credential.authorization());
    opts.background = config.background;
    let socket = dir.join("nbd.sock");
    let node = Node::new(socket.clone(), opts);
    let unix = bootcache_delivery::nbd::bind_unix(&socket).map_err(|e| AgentError(format!("binding {}: {e}", socket.display())))?;
    socket_to_qemu(&socket);
    tokio::spawn(node.nbd().serve_unix(unix));
    let listener =
        tokio::net::TcpListener::bind(config.listen).await.map_err(|e| AgentError(format!("listening on {}: {e}", config.listen)))?;
    let router = node.api(Arc::clone(&config.credential)).merge(fetch::routes(dir.join("tarballs"), Arc::clone(&config.credential)));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut rx = stop_rx.clone();
    tokio::spawn(async move {
        let _ = bootcache_delivery::http::serve(listener, router, Default::default(), async move {
            let _ = rx.wait_for(|s| *s).await;
        })
        .await;
    });

    let libvirt = match &config.libvirt {
        None => None,
        Some(uri) => match Libvirt::connect(uri, &dir.join("consoles"), config.accel).await {
            Ok(l) => Some(l),
            Err(e) => return Err(AgentError(e.to_string())),
        },
    };
    let docker = match &config.docker {
        None => None,
        Some(sock) => Some(Docker::connect(sock).await.map_err(|e| AgentError(e.to_string()))?),
    };
    let network = bootcache_network::Network::new().map_err(|e| AgentError(bootcache_delivery::node::chain(&e)))?;
    let dhcp = bootcache_network::dhcp::DhcpServers::new(&dir.join("dhcp")).map_err(|e| AgentError(format!("DHCP state: {e}")))?;
    let mut headers = reqwest::header::HeaderMap::new();
    let auth = config.credential.authorization().parse().map_err(|_| AgentError("the credential is not a header value".into()))?;
    headers.insert(reqwest::header::AUTHORIZATION, auth);
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| AgentError(e.to_string()))?;
    let files = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| AgentError(e.to_string()))?;
    let shared = Arc::new(Shared {
        config,
        node,
        libvirt,
        docker,
        network,
        dhcp,
        http,
        files,
        local_ip,
        instances: Default::default(),
        removing: Default::default(),
        images: Default::default(),
    });
    let beating = tokio::spawn(heartbeats(Arc::clone(&shared), advertise));
    stop.await;
    beating.abort();
    let _ = stop_tx.send(true);
    reconcile::stop_all(&shared);
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

fn open_to_qemu(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(dir) {
        let mut p = meta.permissions();
        p.set_mode(p.mode() | 0o711);
        let _ = std::fs::set_permissions(dir, p);
    }
}

/// The NBD socket: mode 0660, group libvirt-qemu when there is one (QEMU
/// under libvirt runs as that user; only it and root may connect).
fn socket_to_qemu(socket: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let group = std::fs::read_to_string("/etc/group").ok().and_then(|g| {
        g.lines().find_map(|l| {
            let mut f = l.split(':');
            (f.next() == Some("libvirt-qemu")).then(|| f.nth(1).and_then(|gid| gid.parse::<u32>().ok())).flatten()
        })
    });
    if let Some(gid) = group {
        let _ = std::os::unix::fs::chown(socket, None, Some(gid));
        let _ = std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o660));
    }
}

/// Registers, then sends a heartbeat every interval and carries out the
/// orders each brings back; a control node that does not answer is tried
/// again at the next interval (instances keep running meanwhile).
async fn heartbeats(shared: Arc<Shared>, advertise: SocketAddr) {
    let base = shared.config.control.trim_end_matches('/').to_owned();
    let name = shared.config.name.clone();
    let mut registered = false;
    // Carrying out orders may take a while (removing many instances): it
    // runs beside the heartbeats, which must not stop meanwhile, and the
    // orders of a heartbeat that comes while it runs are left to the next.
    let mut applying: Option<tokio::task::JoinHandle<()>> = None;
    let mut tick = tokio::time::interval(shared.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !registered {
            let body = serde_json::json!({"name": name, "address": advertise.to_string()});
            match shared.http.post(format!("{base}/nodes")).json(&body).send().await {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(%name, control = %base, "registered");
                    registered = true;
                }
                Ok(r) => {
                    tracing::warn!(status = %r.status(), "the control node refused the registration");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %bootcache_delivery::node::chain(&e), "the control node does not answer");
                    continue;
                }
            }
        }
        let beat = heartbeat(&shared);
        match shared.http.post(format!("{base}/nodes/{name}/heartbeat")).json(&beat).send().await {
            Ok(r) if r.status().is_success() => match r.json::<Orders>().await {
                Ok(orders) => {
                    if applying.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) {
                        let s = Arc::clone(&shared);
                        applying = Some(tokio::spawn(async move { reconcile::apply(&s, orders).await }));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "orders not understood"),
            },
            // Forgotten (a new database): register again.
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => registered = false,
            Ok(r) => tracing::warn!(status = %r.status(), "heartbeat refused"),
            Err(e) => tracing::warn!(error = %bootcache_delivery::node::chain(&e), "heartbeat not delivered"),
        }
    }
}

fn heartbeat(shared: &Shared) -> Heartbeat {
    let mut caches: Vec<(bootcache_api::RootDigest, u64)> =
        shared.node.cache_metrics().into_iter().map(|(root, m)| (root, m.boot_prefetch_bytes.max(1))).collect();
    let instances = reconcile::observed(shared);
    // Tarballs and whole disks held, by key (placement and sources go by them too).
    caches.extend(fetch::held(&shared.config.state_dir).into_iter().map(|k| (k, 1)));
    let running = u32::try_from(instances.iter().filter(|o| o.state == bootcache_api::InstanceState::Ready).count()).unwrap_or(u32::MAX);
    Heartbeat {
        cores: u32::try_from(std::thread::available_parallelism().map_or(1, |n| n.get())).unwrap_or(1),
        memory_bytes: mem_total(),
        running,
        caches,
        instances,
    }
}

fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0, |kib| kib * 1024)
}
