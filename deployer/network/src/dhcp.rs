//! DHCP by MAC address for the VMs on a node's segments: one dnsmasq per
//! segment (as libvirt's own networks use), answering only the MACs it is
//! given (`dhcp-ignore=tag:!known`), so the dnsmasq of every node on a
//! segment can run side by side, each for its own VMs. No DNS, no router.
//!
//! Each server runs in a network namespace of its own, joined to the
//! segment's bridge by a veth pair: its address on the segment is there,
//! never in the node's own namespace, so no lab subnet (even the node's
//! own network, or one another lab uses) adds an address or a route to
//! the node. The namespace lives as long as its dnsmasq: when the server
//! stops or dies, the namespace and the veth pair go with it.
//!
//! Its files (hosts, leases, pid, log) live in one directory of the
//! agent's own; a dnsmasq left by an agent that crashed is found by its pid
//! file and stopped.

use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use bootcache_api::InterfaceName;
use bootcache_api::agent::{Dhcp, names};

use crate::{NetError, Network};

/// The DHCP servers of a node, by segment number.
#[derive(Debug)]
pub struct DhcpServers {
    dir: PathBuf,
    running: Mutex<HashMap<u32, Server>>,
}

#[derive(Debug)]
struct Server {
    child: Child,
    /// The bridge, the server's address and prefix, the router it tells
    /// of: a change makes it anew.
    place: (String, Ipv4Addr, u8, Option<Ipv4Addr>),
    hosts: String,
}

fn network_of(d: &Dhcp) -> (Ipv4Addr, Ipv4Addr) {
    let mask = u32::MAX << (32 - u32::from(d.prefix.clamp(1, 32)));
    (Ipv4Addr::from(u32::from(d.server) & mask), Ipv4Addr::from(mask))
}

fn io_error(what: String) -> impl FnOnce(io::Error) -> NetError {
    move |e| NetError { what, source: Box::new(e) }
}

/// A new network namespace (held by the returned descriptor), made on a
/// thread of its own so no other thread of the process changes namespace.
fn new_namespace() -> Result<std::fs::File, NetError> {
    std::thread::spawn(|| -> io::Result<std::fs::File> {
        // SAFETY: only this short-lived thread's network namespace changes
        // (NEWNET alone: no file descriptor table or file system state that
        // other threads rely on is unshared).
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }?;
        std::fs::File::open("/proc/thread-self/ns/net")
    })
    .join()
    .map_err(|_| NetError { what: "making a network namespace".into(), source: "the thread panicked".into() })?
    .map_err(io_error("making a network namespace (needs CAP_SYS_ADMIN)".into()))
}

/// Starts `cmd` inside the namespace `ns` refers to: spawned from a thread
/// that entered it (a child starts in its parent thread's namespaces).
fn spawn_in(ns: &std::fs::File, mut cmd: Command) -> Result<Child, NetError> {
    let ns = ns.try_clone().map_err(io_error("duplicating a namespace descriptor".into()))?;
    std::thread::spawn(move || -> io::Result<Child> {
        rustix::thread::move_into_link_name_space(std::os::fd::AsFd::as_fd(&ns), Some(rustix::thread::LinkNameSpaceType::Network))?;
        cmd.spawn()
    })
    .join()
    .map_err(|_| NetError { what: "starting dnsmasq".into(), source: "the thread panicked".into() })?
    .map_err(io_error("starting dnsmasq (package dnsmasq-base)".into()))
}

impl DhcpServers {
    /// Servers keeping their files in `dir` (made if missing). Stops any a
    /// previous run left behind (their namespaces go with them).
    ///
    /// # Errors
    /// The directory cannot be made or read.
    pub fn new(dir: &Path) -> io::Result<DhcpServers> {
        std::fs::create_dir_all(dir)?;
        let servers = DhcpServers { dir: dir.to_owned(), running: Mutex::new(HashMap::new()) };
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "pid") {
                stop_by_pid_file(&path);
            }
        }
        Ok(servers)
    }

    fn file(&self, id: u32, ext: &str) -> PathBuf {
        self.dir.join(format!("{id:08x}.{ext}"))
    }

    /// Makes sure a server answers `dhcp` on segment `id`'s `bridge` (which
    /// must carry `bridge_mark`): started in a namespace of its own, its
    /// veth to the bridge ([`names::dhcp_link`]) marked `mark`; told to
    /// reread its hosts when only they changed; made anew when its place did.
    ///
    /// # Errors
    /// A link of the veth's name that is not ours ([`crate::NotOurs`]),
    /// netlink, dnsmasq missing, files that cannot be written.
    pub async fn ensure(
        &self,
        net: &Network,
        id: u32,
        bridge: &InterfaceName,
        bridge_mark: &str,
        mark: &str,
        dhcp: &Dhcp,
    ) -> Result<(), NetError> {
        let hosts: String = dhcp.hosts.iter().map(|(mac, ip)| format!("{mac},{ip}\n")).collect();
        let place = (bridge.to_string(), dhcp.server, dhcp.prefix, dhcp.gateway);
        let hosts_file = self.file(id, "hosts");
        {
            let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(s) = running.get_mut(&id)
                && s.place == place
                && matches!(s.child.try_wait(), Ok(None))
            {
                if s.hosts != hosts {
                    std::fs::write(&hosts_file, &hosts).map_err(io_error(format!("writing {}", hosts_file.display())))?;
                    // SIGHUP: reread the hosts file.
                    if let Some(pid) = rustix::process::Pid::from_raw(i32::try_from(s.child.id()).unwrap_or(0)) {
                        let _ = rustix::process::kill_process(pid, rustix::process::Signal::HUP);
                    }
                    s.hosts = hosts;
                }
                return Ok(());
            }
        }
        self.stop(net, id, mark).await;
        let link = names::dhcp_link(id);
        let doing = format!("DHCP for segment {id}");
        let bridge_index = net
            .ours(bridge.as_str(), bridge_mark, &doing)
            .await?
            .ok_or_else(|| NetError { what: doing.clone(), source: format!("no bridge {bridge}").into() })?;
        // What an earlier server left (its namespace gone, the host end kept).
        net.remove(link.as_str(), mark).await?;
        let peer = format!("be{id:08x}");
        let ns = new_namespace()?;
        net.make_veth(&link, &peer, mark, bridge_index).await?;
        let made = async {
            net.move_to(&peer, &ns).await?;
            let inside = Network::of_namespace(&ns).await?;
            inside.configure(&peer, "eth0", dhcp.server, dhcp.prefix).await?;
            std::fs::write(&hosts_file, &hosts).map_err(io_error(format!("writing {}", hosts_file.display())))?;
            let (network, mask) = network_of(dhcp);
            let mut cmd = Command::new("dnsmasq");
            cmd.arg("--keep-in-foreground")
                .arg("--conf-file=/dev/null")
                .arg("--port=0")
                .arg("--user=root")
                .arg("--interface=eth0")
                .arg("--bind-interfaces")
                .arg(format!("--dhcp-range={network},static,{mask},1h"))
                .arg(format!("--dhcp-hostsfile={}", hosts_file.display()))
                .arg("--dhcp-ignore=tag:!known")
                // The segment's router, or none.
                .arg(dhcp.gateway.map_or_else(|| "--dhcp-option=3".to_owned(), |g| format!("--dhcp-option=3,{g}")))
                .arg("--dhcp-option=6")
                .arg("--dhcp-authoritative")
                .arg(format!("--dhcp-leasefile={}", self.file(id, "leases").display()))
                .arg(format!("--pid-file={}", self.file(id, "pid").display()))
                .arg(format!("--log-facility={}", self.file(id, "log").display()))
                .arg("--log-dhcp")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            spawn_in(&ns, cmd)
        }
        .await;
        let child = match made {
            Ok(c) => c,
            Err(e) => {
                let _ = net.remove(link.as_str(), mark).await;
                return Err(e);
            }
        };
        // The namespace now lives as long as the dnsmasq in it.
        drop(ns);
        tracing::info!(segment = id, %bridge, server = %dhcp.server, hosts = dhcp.hosts.len(), "DHCP server started in its own namespace");
        self.running.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Server { child, place, hosts });
        Ok(())
    }

    /// Stops segment `id`'s server, if one runs, removes its files and the
    /// host end of its veth (if it still carries `mark`).
    pub async fn stop(&self, net: &Network, id: u32, mark: &str) {
        let server = self.running.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        if let Some(mut s) = server {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
        stop_by_pid_file(&self.file(id, "pid"));
        for ext in ["hosts", "leases", "pid", "log"] {
            let _ = std::fs::remove_file(self.file(id, ext));
        }
        if let Err(e) = net.remove(names::dhcp_link(id).as_str(), mark).await {
            tracing::warn!(segment = id, error = %e, "DHCP link left");
        }
    }

    /// The segments servers run for.
    pub fn running(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.running.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        v.sort_unstable();
        v
    }
}

impl Drop for DhcpServers {
    fn drop(&mut self) {
        let all: Vec<Server> = self.running.lock().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, s)| s).collect();
        for mut s in all {
            let _ = s.child.kill();
            let _ = s.child.wait();
        }
    }
}

/// Stops the dnsmasq a pid file names, if that process is a dnsmasq.
fn stop_by_pid_file(path: &Path) {
    let Ok(text) = std::fs::read_to_string(path) else { return };
    let Ok(pid) = text.trim().parse::<i32>() else { return };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim() == "dnsmasq"
        && let Some(p) = rustix::process::Pid::from_raw(pid)
    {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
    }
    let _ = std::fs::remove_file(path);
}
