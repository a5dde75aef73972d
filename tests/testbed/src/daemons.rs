//! The daemons a compute node of the testbed runs inside its namespace: a
//! libvirtd (with its virtlogd) in a private mount namespace whose libvirt
//! directories are the node's own, and a dockerd with its own root, exec
//! root and socket, so that several run on one machine and every guest's
//! and container's traffic crosses the testbed's links. They enter only the
//! node's network namespace (`nsenter --net`): `ip netns exec` also mounts
//! a fresh /sys, hiding the cgroup file system dockerd needs.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// A libvirtd (and virtlogd) of one node, stopped on drop with every
/// domain it runs.
#[derive(Debug)]
pub struct Libvirtd {
    child: Child,
    dir: PathBuf,
    /// The URI clients in any mount namespace use.
    pub uri: String,
}

fn wait(what: &str, child: &mut Child, timeout: Duration, mut ready: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if ready() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited at once: {status}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!("{what} did not answer within {} s", timeout.as_secs())
}

impl Libvirtd {
    /// Starts one in network namespace `netns`, its state under `dir`.
    pub fn start(netns: &str, dir: &Path) -> anyhow::Result<Libvirtd> {
        let sub = |s: &str| dir.join(s);
        for s in ["run", "lib", "log", "cache", "etc-qemu"] {
            std::fs::create_dir_all(sub(s))?;
        }
        for d in ["/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/cache/libvirt", "/etc/libvirt/qemu"] {
            std::fs::create_dir_all(d)?;
        }
        // Persistent domain definitions too are the node's own (the host's
        // network definitions copied in): a test killed before its clean-up
        // leaves none in the next test's libvirtd.
        let script = format!(
            "set -e; cp -a /etc/libvirt/qemu/networks '{etc}/' 2>/dev/null || true; mount --bind '{etc}' /etc/libvirt/qemu; \
             mount --bind '{run}' /run/libvirt; mount --bind '{lib}' /var/lib/libvirt; mount --bind '{log}' /var/log/libvirt; \
             mount --bind '{cache}' /var/cache/libvirt; virtlogd -d -p /run/libvirt/virtlogd.pid; exec libvirtd -p /run/libvirt/libvirtd.pid",
            etc = sub("etc-qemu").display(),
            run = sub("run").display(),
            lib = sub("lib").display(),
            log = sub("log").display(),
            cache = sub("cache").display(),
        );
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["unshare", "-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(sub("libvirtd.log"))?)
            .stderr(std::fs::File::create(sub("libvirtd.err"))?)
            .spawn()
            .context("starting libvirtd (package libvirt-daemon-system)")?;
        let uri = format!("qemu:///system?socket={}", sub("run/libvirt-sock").display());
        let probe = uri.clone();
        wait("libvirtd", &mut child, Duration::from_secs(30), || {
            Command::new("virsh").args(["-c", &probe, "version"]).output().is_ok_and(|o| o.status.success())
        })?;
        Ok(Libvirtd { child, dir: dir.to_owned(), uri })
    }

    /// `virsh -c URI ARGS`.
    pub fn virsh(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("virsh").args(["-c", &self.uri]).args(args).output()?;
        if !out.status.success() {
            bail!("virsh {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The names of its domains.
    pub fn domains(&self) -> anyhow::Result<Vec<String>> {
        Ok(self.virsh(&["list", "--all", "--name"])?.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for d in self.domains().unwrap_or_default() {
            let _ = self.virsh(&["destroy", &d]);
            let _ = self.virsh(&["undefine", &d]);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("run/virtlogd.pid")) {
            let _ = Command::new("kill").arg(pid.trim()).status();
        }
    }
}

/// A dockerd of one node, stopped on drop with its containers.
#[derive(Debug)]
pub struct Dockerd {
    child: Child,
    /// Its socket.
    pub socket: PathBuf,
}

impl Dockerd {
    /// Starts one in network namespace `netns`, its state under `dir`.
    pub fn start(netns: &str, dir: &Path) -> anyhow::Result<Dockerd> {
        std::fs::create_dir_all(dir)?;
        let socket = dir.join("docker.sock");
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("dockerd")
            .arg(format!("--data-root={}", dir.join("data").display()))
            .arg(format!("--exec-root={}", dir.join("exec").display()))
            .arg(format!("--pidfile={}", dir.join("docker.pid").display()))
            .arg(format!("--host=unix://{}", socket.display()))
            // The testbed's registries speak plain HTTP (`docker pull` from
            // them is what benchmarks compare with).
            .arg("--insecure-registry=10.77.0.0/16")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("dockerd.log"))?)
            .spawn()
            .context("starting dockerd (package docker.io)")?;
        let probe = socket.clone();
        wait("dockerd", &mut child, Duration::from_secs(60), || {
            Command::new("curl")
                .args(["-sf", "--unix-socket"])
                .arg(&probe)
                .arg("http://docker/_ping")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .with_context(|| format!("see {}", dir.join("dockerd.log").display()))?;
        Ok(Dockerd { child, socket })
    }

    /// `docker -H unix://SOCKET ARGS`.
    pub fn docker(&self) -> Command {
        let mut c = Command::new("docker");
        c.arg("-H").arg(format!("unix://{}", self.socket.display()));
        c
    }

    /// The names of its containers, running or not.
    pub fn containers(&self) -> anyhow::Result<Vec<String>> {
        let out = self.docker().args(["ps", "-a", "--format", "{{.Names}}"]).output()?;
        if !out.status.success() {
            bail!("docker ps: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        for c in self.containers().unwrap_or_default() {
            let _ = self.docker().args(["rm", "-f", &c]).output();
        }
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
