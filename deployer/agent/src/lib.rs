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
//! The agent only calls out: it joins the control node it was given (once,
//! with the join token, for a credential of its own) and takes orders from
//! nothing else; its own port serves the delivery node's API behind the
//! cluster's peer token. Each heartbeat's orders are the whole truth: what
//! they list is made (once), what they do not is removed, including what an
//! earlier run of the agent left, so a restarted agent or control node
//! converges. It changes only what it made: each thing carries its mark and
//! is written in its record before it is made (`own`, `plan`).

#![deny(missing_docs)]

mod blobs;
mod fetch;
mod instance;
mod join;
mod own;
mod plan;
mod reconcile;
mod tasks;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bootcache_api::Kind;
use bootcache_api::Name;
use bootcache_api::agent::{Heartbeat, Join, Orders};
use bootcache_delivery::cache::CacheOptions;
use bootcache_delivery::node::Node;
use bootcache_http::auth::Credential;
use bootcache_runtime::{Accel, Runtime};

/// How an agent runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The node's name.
    pub name: Name,
    /// The control node, `http://host:port`.
    pub control: String,
    /// What it joins with: the control node's join token (or the
    /// administrator's). Once joined, the node uses a credential of its own
    /// with the control node and the cluster's peer token with other nodes.
    pub credential: Arc<Credential>,
    /// Where the node's API (peers, metrics) listens.
    pub listen: SocketAddr,
    /// The address the control node and peers use for it (and its VXLAN
    /// tunnel end); default `listen`.
    pub advertise: Option<SocketAddr>,
    /// Its state: caches, overlays, consoles, imported tarballs, DHCP, its
    /// credential and the record of what it made. An absolute path.
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
    /// Docker's `config.json` holding the credentials of registries whose
    /// blobs (VM images by reference) the node reads; none: anonymously
    /// (a registry's token flow is followed either way).
    pub registry_config: Option<PathBuf>,
    /// Registries (`HOST:PORT`) read over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
}

/// The routes a node serves its whole tarballs from (`GET
/// /tarballs/{key}`, behind `credential`: the peer token), over the
/// tarballs in `dir`; the agent serves them beside the delivery node's API
/// (exposed for tests and fuzzing).
pub fn tarball_routes(dir: PathBuf, credential: Arc<Credential>) -> axum::Router {
    fetch::routes(dir, credential)
}

pub use fetch::FetchError;

/// The runtime backend that runs instances of `kind` on a node: the one
/// place a kind meets a backend ([`bootcache_runtime::open`] by name).
pub fn backend(kind: Kind) -> &'static str {
    match kind {
        Kind::Vm => "libvirt",
        Kind::Container => "docker",
    }
}

/// Why the agent could not start or stopped, or an instance could not be
/// made (its reason, as the control node shows it).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// `--advertise` is not an IPv4 address (it is the VXLAN tunnel end).
    #[error("--advertise {0}: an IPv4 address")]
    Advertise(SocketAddr),
    /// Something of that name on the node is someone else's.
    #[error("{0}")]
    Foreign(String),
    /// An instance's image could not be had.
    #[error("image: {0}")]
    Image(String),
    /// A command of `exec:` failed.
    #[error("exec {argv}: exit {code}: {output}")]
    Exec {
        /// The command.
        argv: String,
        /// Its exit code.
        code: i64,
        /// The end of its output.
        output: String,
    },
    /// It did not become ready.
    #[error("not ready: {0}")]
    NotReady(String),
    /// A whole file (a tarball, a disk) could not be copied.
    #[error("image {0}")]
    Fetch(#[from] fetch::FetchError),
    /// The node runs no instances of a kind (its agent was given no
    /// endpoint for that backend).
    #[error("this node runs no {kind}s (the agent has no --{backend})")]
    NoRuntime {
        /// The kind.
        kind: &'static str,
        /// Its backend.
        backend: &'static str,
    },
    /// An HTTP client could not be made.
    #[error("making an HTTP client: {0}")]
    Http(String),
    /// The node's API port cannot be listened on.
    #[error("listening on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Netlink cannot be used.
    #[error("networking: {0}")]
    Network(String),
    /// The state directory was given as a relative path (dnsmasq, libvirt
    /// and QEMU would each read it from their own directory).
    #[error("the agent's state directory {0:?} is relative: give an absolute path")]
    RelativeState(PathBuf),
    /// libvirtd or dockerd does not answer.
    #[error(transparent)]
    Runtime(#[from] bootcache_runtime::RuntimeError),
    /// Something of the state directory cannot be made, read or written.
    #[error("{}: {why}", path.display())]
    State {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

/// What the agent's parts share.
pub(crate) struct Shared {
    pub config: Config,
    pub node: Arc<Node>,
    /// The runtimes this node has, by the kind they run.
    pub runtimes: std::collections::BTreeMap<Kind, Box<dyn Runtime>>,
    pub network: bootcache_network::Network,
    pub dhcp: bootcache_network::dhcp::DhcpServers,
    pub http: reqwest::Client,
    /// For whole files from the store and peers: no credential by default
    /// (the store is not sent it), no limit on a transfer's total time.
    pub files: reqwest::Client,
    pub local_ip: std::net::Ipv4Addr,
    /// The cluster's peer token: what this node presents to other nodes and
    /// wants from them.
    pub peer: Arc<Credential>,
    /// The node's own credential with the control node.
    pub secret: Mutex<String>,
    /// What this agent made (see [`own`]).
    pub record: own::Record,
    /// The mark of each ordered segment's bridge (containers join by it).
    pub bridge_marks: Mutex<std::collections::HashMap<String, String>>,
    /// The instances it was ordered to run, by number.
    pub instances: Mutex<std::collections::HashMap<u32, instance::Local>>,
    /// Instances no order lists any more, until they are removed (still
    /// reported, so `destroy` waits for them).
    pub removing: Mutex<std::collections::HashMap<u32, (Name, Name, bootcache_api::InstanceState)>>,
    /// A lock per file a copy is made to (see [`Shared::hold`]).
    pub images: tokio::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// A client per registry, with the node's credentials for it.
    pub registries: bootcache_registry::Clients,
    /// The registry blobs being copied (passed on to peers as they arrive).
    pub inflight: Arc<blobs::Inflight>,
}

impl Shared {
    /// Holds `path` against other copies to it: whoever holds it makes the
    /// file (or finds it made), however many instances wait for it.
    pub(crate) async fn hold(&self, path: &std::path::Path) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut held = self.images.lock().await;
            Arc::clone(held.entry(path.to_string_lossy().into_owned()).or_default())
        };
        lock.lock_owned().await
    }

    /// The runtime of `kind` on this node.
    pub fn runtime(&self, kind: Kind) -> Result<&dyn Runtime, AgentError> {
        self.runtimes.get(&kind).map(AsRef::as_ref).ok_or(AgentError::NoRuntime {
            kind: match kind {
                Kind::Vm => "VM",
                Kind::Container => "container",
            },
            backend: backend(kind),
        })
    }
}

fn state_error(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
    move |e| AgentError::State { path: path.to_owned(), why: e.to_string() }
}

/// Runs the agent until `stop` completes: joins the control node (once;
/// the credential is kept), then serves the node API, sends heartbeats and
/// carries out their orders.
///
/// # Errors
/// Its state directory, sockets or port cannot be set up.
pub async fn run(config: Config, stop: impl std::future::Future<Output = ()> + Send + 'static) -> Result<(), AgentError> {
    let dir = config.state_dir.clone();
    if !dir.is_absolute() {
        return Err(AgentError::RelativeState(dir));
    }
    for sub in ["cache", "overlays", "consoles", "dhcp", "disks", "tarballs", "blobs", "images"] {
        std::fs::create_dir_all(dir.join(sub)).map_err(state_error(&dir.join(sub)))?;
    }
    let record_path = dir.join("owned.json");
    let record = own::Record::open(&record_path).map_err(|why| AgentError::State { path: record_path.clone(), why })?;
    // QEMU runs as another user under libvirt: it must reach the socket and
    // the overlays (libvirt gives it the files themselves).
    open_to_qemu(&dir);
    open_to_qemu(&dir.join("overlays"));
    open_to_qemu(&dir.join("disks"));
    let advertise = config.advertise.unwrap_or(config.listen);
    let IpAddr::V4(local_ip) = advertise.ip() else { return Err(AgentError::Advertise(advertise)) };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| AgentError::Http(e.to_string()))?;
    let base = config.control.trim_end_matches('/').to_owned();
    let join = Join {
        name: config.name.clone(),
        address: advertise.to_string(),
        cores: u32::try_from(std::thread::available_parallelism().map_or(1, |n| n.get())).unwrap_or(1),
        memory_bytes: mem_total(),
    };
    let mut stop = std::pin::pin!(stop);
    let joined = match join::stored(&dir, &base, &config.name) {
        Some(j) => j,
        None => loop {
            match join::join(&http, &base, &config.credential.authorization(), &join, &dir).await? {
                Ok(j) => break j,
                Err(why) => tracing::warn!(%why, "not joined yet; trying again"),
            }
            tokio::select! {
                () = tokio::time::sleep(config.heartbeat) => {}
                () = &mut stop => return Ok(()),
            }
        },
    };
    let peer = Credential::from_token(&joined.peer_token);
    let mut opts = CacheOptions::new(dir.join("cache"));
    opts.peer_authorization = Some(peer.authorization());
    opts.background = config.background;
    let socket = dir.join("nbd.sock");
    let authorizers = bootcache_registry::blobs::authorizers(config.registry_config.clone(), config.insecure_registries.clone());
    let node = Node::with_authorizers(socket.clone(), opts, Some(authorizers));
    let unix = bootcache_delivery::nbd::bind_unix(&socket).map_err(state_error(&socket))?;
    socket_to_qemu(&socket);
    tokio::spawn(node.nbd().serve_unix(unix));
    let listener =
        tokio::net::TcpListener::bind(config.listen).await.map_err(|source| AgentError::Listen { addr: config.listen, source })?;
    let inflight = Arc::new(blobs::Inflight::default());
    let router = node.api(Arc::clone(&peer)).merge(fetch::routes(dir.join("tarballs"), Arc::clone(&peer))).merge(blobs::routes(
        dir.join("blobs"),
        Arc::clone(&inflight),
        Arc::clone(&peer),
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut rx = stop_rx.clone();
    tokio::spawn(async move {
        let _ = bootcache_http::serve(listener, router, Default::default(), async move {
            let _ = rx.wait_for(|s| *s).await;
        })
        .await;
    });

    let mut runtimes = std::collections::BTreeMap::new();
    for (kind, endpoint) in [(Kind::Vm, &config.libvirt), (Kind::Container, &config.docker)] {
        let Some(endpoint) = endpoint else { continue };
        let options = bootcache_runtime::Options {
            endpoint: endpoint.clone(),
            state_dir: dir.clone(),
            owner: config.name.to_string(),
            accel: config.accel,
        };
        runtimes.insert(kind, bootcache_runtime::open(backend(kind), &options).await?);
    }
    let network = bootcache_network::Network::new().map_err(|e| AgentError::Network(bootcache_http::chain(&e)))?;
    let dhcp = bootcache_network::dhcp::DhcpServers::new(&dir.join("dhcp")).map_err(state_error(&dir.join("dhcp")))?;
    let files = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| AgentError::Http(e.to_string()))?;
    let registries = bootcache_registry::Clients::new(config.registry_config.clone(), config.insecure_registries.clone());
    let shared = Arc::new(Shared {
        config,
        node,
        runtimes,
        network,
        dhcp,
        http,
        files,
        local_ip,
        peer,
        secret: Mutex::new(joined.secret),
        record,
        bridge_marks: Mutex::default(),
        instances: Mutex::default(),
        removing: Mutex::default(),
        images: Default::default(),
        registries,
        inflight,
    });
    let beating = tokio::spawn(heartbeats(Arc::clone(&shared), base, join));
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

/// Sends a heartbeat every interval with the node's own credential and
/// carries out the orders each brings back; a control node that does not
/// answer is tried again at the next interval (instances keep running
/// meanwhile); one that no longer knows the node or its credential is
/// joined again.
async fn heartbeats(shared: Arc<Shared>, base: String, join: Join) {
    let name = shared.config.name.clone();
    // Carrying out orders may take a while (removing many instances): it
    // runs beside the heartbeats, which must not stop meanwhile, and the
    // orders of a heartbeat that comes while it runs are left to the next.
    let mut applying: Option<tokio::task::JoinHandle<()>> = None;
    let mut tick = tokio::time::interval(shared.config.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let beat = heartbeat(&shared);
        let auth = format!("Bearer {}", shared.secret.lock().unwrap_or_else(|p| p.into_inner()));
        let sent = shared
            .http
            .post(format!("{base}{}", bootcache_api::control::routes::heartbeat(&name)))
            .header(reqwest::header::AUTHORIZATION, auth)
            .json(&beat)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => match r.json::<Orders>().await {
                Ok(mut orders) => {
                    // Tasks are done beside the orders, whatever else runs.
                    for task in std::mem::take(&mut orders.tasks) {
                        tokio::spawn(tasks::run(Arc::clone(&shared), base.clone(), task));
                    }
                    if applying.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) {
                        let s = Arc::clone(&shared);
                        applying = Some(tokio::spawn(async move { reconcile::apply(&s, orders).await }));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "orders not understood"),
            },
            // Forgotten (a new database) or removed: join again.
            Ok(r) if matches!(r.status().as_u16(), 401 | 404) => {
                tracing::warn!(status = %r.status(), "the control node does not know this node's credential; joining again");
                match join::join(&shared.http, &base, &shared.config.credential.authorization(), &join, &shared.config.state_dir).await {
                    Ok(Ok(j)) => {
                        if j.peer_token != shared.peer.token() {
                            tracing::error!(
                                "the cluster's peer token changed (the administrator's token was rotated): restart this agent to use it"
                            );
                        }
                        *shared.secret.lock().unwrap_or_else(|p| p.into_inner()) = j.secret;
                    }
                    Ok(Err(why)) => tracing::warn!(%why, "not joined again yet"),
                    Err(e) => tracing::error!(error = %e, "cannot keep the node's credential"),
                }
            }
            Ok(r) => tracing::warn!(status = %r.status(), "heartbeat refused"),
            Err(e) => tracing::warn!(error = %bootcache_http::chain(&e), "heartbeat not delivered"),
        }
    }
}

fn heartbeat(shared: &Shared) -> Heartbeat {
    let mut caches: Vec<(bootcache_api::RootDigest, u64)> =
        shared.node.cache_metrics().into_iter().map(|(root, m)| (root, m.boot_prefetch_bytes.max(1))).collect();
    let instances = reconcile::observed(shared);
    // Tarballs and whole disks held, by key (placement and sources go by
    // them too), with their digests.
    let mut files = fetch::held(&shared.config.state_dir);
    files.extend(blobs::held(&shared.config.state_dir));
    caches.extend(files.iter().map(|(k, _)| (*k, 1)));
    let running = u32::try_from(instances.iter().filter(|o| o.state == bootcache_api::InstanceState::Ready).count()).unwrap_or(u32::MAX);
    Heartbeat {
        cores: u32::try_from(std::thread::available_parallelism().map_or(1, |n| n.get())).unwrap_or(1),
        memory_bytes: mem_total(),
        running,
        caches,
        files,
        instances,
    }
}

fn mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0, |kib| kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A relative state directory broke dnsmasq (which runs elsewhere)
    /// while the agent said it had started it: refused before anything.
    #[tokio::test]
    async fn a_relative_state_directory_is_refused() {
        let config = Config {
            name: "n".parse().unwrap(),
            control: "http://127.0.0.1:9".into(),
            credential: Credential::from_token("t".repeat(40).as_str()),
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise: None,
            state_dir: PathBuf::from("relative/state"),
            libvirt: None,
            docker: None,
            accel: Accel::Tcg,
            heartbeat: Duration::from_secs(1),
            ready_timeout: Duration::from_secs(1),
            background: bootcache_delivery::cache::Background::Off,
            prefetch_only: false,
            registry_config: None,
            insecure_registries: Vec::new(),
        };
        let e = run(config, std::future::pending()).await.unwrap_err();
        assert!(matches!(e, AgentError::RelativeState(_)), "{e}");
        assert!(!std::path::Path::new("relative").exists(), "nothing made");
    }
}
