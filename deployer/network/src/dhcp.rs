//! DHCP by MAC address for the VMs on a node's segments: one dnsmasq per
//! bridge (as libvirt's own networks use), answering only the MACs it is
//! given (`dhcp-ignore=tag:!known`), so the dnsmasq of every node on a
//! segment can run side by side, each for its own VMs. No DNS, no router.
//!
//! Its files (hosts, leases, pid, log) live in one directory; a dnsmasq left
//! by an agent that crashed is found by its pid file and stopped.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use bootcache_api::InterfaceName;
use bootcache_api::agent::Dhcp;

/// The DHCP servers of a node.
#[derive(Debug)]
pub struct DhcpServers {
    dir: PathBuf,
    running: Mutex<HashMap<String, (Child, String)>>,
}

fn network_of(d: &Dhcp) -> (std::net::Ipv4Addr, std::net::Ipv4Addr) {
    let mask = u32::MAX << (32 - u32::from(d.prefix.min(32)));
    (std::net::Ipv4Addr::from(u32::from(d.server) & mask), std::net::Ipv4Addr::from(mask))
}

impl DhcpServers {
    /// Servers keeping their files in `dir` (made if missing). Stops any a
    /// previous run left behind.
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

    /// Makes sure a server answers `dhcp` on `bridge` (which must carry
    /// the server's address): started, or told to reread its hosts.
    ///
    /// # Errors
    /// dnsmasq is missing or cannot be started; files cannot be written.
    pub fn ensure(&self, bridge: &InterfaceName, dhcp: &Dhcp) -> io::Result<()> {
        let hosts: String = dhcp.hosts.iter().map(|(mac, ip)| format!("{mac},{ip}\n")).collect();
        let (network, mask) = network_of(dhcp);
        let config = format!("{network}/{mask}\n{hosts}");
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let hosts_file = self.dir.join(format!("{bridge}.hosts"));
        if let Some((child, was)) = running.get_mut(bridge.as_str())
            && child.try_wait()?.is_none()
        {
            if *was != config {
                std::fs::write(&hosts_file, &hosts)?;
                // SIGHUP: reread the hosts file.
                let pid = rustix::process::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
                if let Some(pid) = pid {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::HUP);
                }
                *was = config;
            }
            return Ok(());
        }
        std::fs::write(&hosts_file, &hosts)?;
        let file = |ext: &str| self.dir.join(format!("{bridge}.{ext}"));
        let mut cmd = Command::new("dnsmasq");
        cmd.arg("--keep-in-foreground")
            .arg("--conf-file=/dev/null")
            .arg("--port=0")
            .arg("--user=root")
            .arg(format!("--interface={bridge}"))
            .arg("--bind-dynamic")
            .arg("--except-interface=lo")
            .arg(format!("--dhcp-range={network},static,{mask},1h"))
            .arg(format!("--dhcp-hostsfile={}", hosts_file.display()))
            .arg("--dhcp-ignore=tag:!known")
            .arg("--dhcp-option=3")
            .arg("--dhcp-option=6")
            .arg("--dhcp-authoritative")
            .arg(format!("--dhcp-leasefile={}", file("leases").display()))
            .arg(format!("--pid-file={}", file("pid").display()))
            .arg(format!("--log-facility={}", file("log").display()))
            .arg("--log-dhcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child =
            cmd.spawn().map_err(|e| io::Error::new(e.kind(), format!("starting dnsmasq (package dnsmasq-base) for {bridge}: {e}")))?;
        tracing::info!(%bridge, hosts = dhcp.hosts.len(), "DHCP server started");
        running.insert(bridge.as_str().to_owned(), (child, config));
        Ok(())
    }

    /// Stops the server on `bridge`, if one runs, and removes its files.
    pub fn stop(&self, bridge: &str) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((mut child, _)) = running.remove(bridge) {
            let _ = child.kill();
            let _ = child.wait();
        }
        stop_by_pid_file(&self.dir.join(format!("{bridge}.pid")));
        for ext in ["hosts", "leases", "pid", "log"] {
            let _ = std::fs::remove_file(self.dir.join(format!("{bridge}.{ext}")));
        }
    }

    /// The bridges servers run on.
    pub fn bridges(&self) -> Vec<String> {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }
}

impl Drop for DhcpServers {
    fn drop(&mut self) {
        for b in self.bridges() {
            self.stop(&b);
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
