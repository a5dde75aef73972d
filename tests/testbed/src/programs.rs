//! The programs run on testbed hosts: nginx (a third-party store), the
//! reference registry (`docker-registry`), `qemu-nbd`, `bootcache node
//! serve`, and QEMU guests booting through overlays of their own. Each is
//! stopped when its handle is dropped.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// `program`, run inside network namespace `netns` when one is given.
pub fn wrap(netns: Option<&str>, program: impl AsRef<std::ffi::OsStr>) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// A port nothing listens on now.
///
/// # Errors
/// When no port can be bound.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until `ok` holds, failing if `child` exits or `limit` passes.
fn wait_until(child: &mut Child, what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !ok() {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited before it answered: {status}");
        }
        if start.elapsed() > limit {
            bail!("{what} does not answer after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Waits until `port` on loopback (of the current namespace) accepts
/// connections.
///
/// # Errors
/// When `child` exits first or 20 s pass.
pub fn wait_port(port: u16, child: &mut Child, what: &str) -> anyhow::Result<()> {
    wait_until(child, what, Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
}

/// A child process killed when dropped.
#[derive(Debug)]
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn curl_ok(netns: Option<&str>, url: &str) -> bool {
    wrap(netns, "curl").args(["-s", "-o", "/dev/null", "--fail", url]).status().is_ok_and(|s| s.success())
}

/// The reference registry (Debian's `docker-registry`, distribution 2.8)
/// on a loopback port, its storage in a directory of its own; anonymous,
/// with Basic auth from an htpasswd file, or behind a token service.
#[derive(Debug)]
pub struct DockerRegistry {
    /// The process (killed when dropped).
    pub child: Killed,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// Where it keeps blobs and manifests.
    pub storage: PathBuf,
    config: PathBuf,
    netns: Option<String>,
}

/// How a [`DockerRegistry`] lets clients in.
#[derive(Clone, Copy, Debug)]
pub enum RegistryAuth<'a> {
    /// Anyone, for anything.
    Anonymous,
    /// HTTP Basic, the users of an htpasswd file (bcrypt).
    Htpasswd(&'a Path),
    /// Bearer tokens from `realm`, signed by the holder of certificate `cert`.
    Token {
        /// The token service's URL.
        realm: &'a str,
        /// The certificate (PEM) it signs with.
        cert: &'a Path,
    },
}

impl DockerRegistry {
    /// Starts one with its configuration and storage under `dir`.
    ///
    /// # Errors
    /// No `docker-registry` (scripts/setup installs it), or it does not listen.
    pub fn start(dir: &Path, htpasswd: Option<&Path>) -> anyhow::Result<DockerRegistry> {
        DockerRegistry::start_with(dir, htpasswd.map_or(RegistryAuth::Anonymous, RegistryAuth::Htpasswd))
    }

    /// Starts one letting clients in by `auth`.
    ///
    /// # Errors
    /// As [`DockerRegistry::start`].
    pub fn start_with(dir: &Path, auth: RegistryAuth<'_>) -> anyhow::Result<DockerRegistry> {
        DockerRegistry::start_in(dir, None, "127.0.0.1", free_port()?, auth)
    }

    /// Starts one on `ip:port` inside network namespace `netns` (a testbed
    /// host's) when one is given.
    ///
    /// # Errors
    /// As [`DockerRegistry::start`].
    pub fn start_in(dir: &Path, netns: Option<&str>, ip: &str, port: u16, auth: RegistryAuth<'_>) -> anyhow::Result<DockerRegistry> {
        DockerRegistry::start_full(dir, netns, ip, port, auth, None)
    }

    /// [`DockerRegistry::start_in`] speaking HTTPS with certificate `cert`
    /// and its key `key` (PEM files).
    ///
    /// # Errors
    /// As [`DockerRegistry::start`].
    pub fn start_tls_in(dir: &Path, netns: Option<&str>, ip: &str, port: u16, cert: &Path, key: &Path) -> anyhow::Result<DockerRegistry> {
        DockerRegistry::start_full(dir, netns, ip, port, RegistryAuth::Anonymous, Some((cert, key)))
    }

    fn start_full(
        dir: &Path,
        netns: Option<&str>,
        ip: &str,
        port: u16,
        auth: RegistryAuth<'_>,
        tls: Option<(&Path, &Path)>,
    ) -> anyhow::Result<DockerRegistry> {
        let addr = format!("{ip}:{port}");
        let storage = dir.join("registry-storage");
        let auth = match auth {
            RegistryAuth::Anonymous => String::new(),
            RegistryAuth::Htpasswd(p) => format!("auth:\n  htpasswd:\n    realm: bootcache\n    path: {}\n", p.display()),
            RegistryAuth::Token { realm, cert } => format!(
                "auth:\n  token:\n    realm: {realm}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                crate::tokens::SERVICE,
                crate::tokens::ISSUER,
                cert.display()
            ),
        };
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n{}{auth}",
                storage.display(),
                tls.map_or_else(String::new, |(c, k)| format!("  tls:\n    certificate: {}\n    key: {}\n", c.display(), k.display())),
            ),
        )?;
        let netns = netns.map(str::to_owned);
        let child = DockerRegistry::spawn(&config, netns.as_deref(), &addr)?;
        Ok(DockerRegistry { child, addr, storage, config, netns })
    }

    fn spawn(config: &Path, netns: Option<&str>, addr: &str) -> anyhow::Result<Killed> {
        let child = wrap(netns, "docker-registry")
            .arg("serve")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting docker-registry (scripts/setup installs it)")?;
        let mut child = Killed(child);
        // Any answer will do (401 behind auth, 400 to plain HTTP behind TLS).
        let url = format!("http://{addr}/v2/");
        wait_until(&mut child.0, "docker-registry", Duration::from_secs(20), || {
            wrap(netns, "curl").args(["-s", "-o", "/dev/null", &url]).status().is_ok_and(|s| s.success())
        })?;
        Ok(child)
    }

    /// Stops it and starts it again on the same address and storage
    /// (reading its configuration, and the files it names, again).
    ///
    /// # Errors
    /// As [`DockerRegistry::start`].
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        self.child = DockerRegistry::spawn(&self.config, self.netns.as_deref(), &self.addr)?;
        Ok(())
    }
}

/// nginx serving `root` (its access log, with bytes sent, in its work dir).
#[derive(Debug)]
pub struct Nginx {
    child: Child,
    /// Its port.
    pub port: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers too (SIGKILL would orphan them).
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

impl Nginx {
    /// nginx on `addr:port` inside `netns` (or the current namespace).
    ///
    /// # Errors
    /// nginx missing, or not answering within 20 s.
    pub fn start_in(netns: Option<&str>, addr: &str, port: u16, root: &Path, work: &Path) -> anyhow::Result<Nginx> {
        std::fs::create_dir_all(work)?;
        let w = work.display();
        let conf = format!(
            "worker_processes 1;\ndaemon off;\nerror_log {w}/error.log;\npid {w}/nginx.pid;\nevents {{}}\n\
             http {{\n  log_format bytes '$bytes_sent $status \"$request\" \"$http_range\"';\n  access_log {w}/access.log bytes;\n\
             client_body_temp_path {w}/body; proxy_temp_path {w}/proxy; fastcgi_temp_path {w}/fastcgi;\n\
             uwsgi_temp_path {w}/uwsgi; scgi_temp_path {w}/scgi;\n\
             server {{ listen {addr}:{port}; root {}; location / {{ }} }}\n}}\n",
            root.display()
        );
        let conf_path = work.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = wrap(netns, "nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(work)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("nginx must be installed (scripts/setup installs it)")?;
        let mut nginx = Nginx { child, port };
        let url = format!("http://{addr}:{port}/");
        wait_until(&mut nginx.child, "nginx", Duration::from_secs(20), || {
            wrap(netns, "curl").args(["-s", "-o", "/dev/null", &url]).status().is_ok_and(|s| s.success())
        })?;
        Ok(nginx)
    }
}

/// `qemu-nbd` exporting `image` read-only as `name` on `addr:port`, for any
/// number of clients.
///
/// # Errors
/// qemu-nbd missing or not listening within 20 s.
pub fn qemu_nbd_in(netns: Option<&str>, addr: &str, port: u16, image: &Path, format: &str, name: &str) -> anyhow::Result<Killed> {
    let child = wrap(netns, "qemu-nbd")
        .args(["--read-only", "--persistent", "--shared=0", "--format", format, "--export-name", name, "--bind", addr])
        .args(["--port", &port.to_string()])
        .arg(image)
        .stdout(Stdio::null())
        .spawn()
        .context("qemu-nbd must be installed (package qemu-utils)")?;
    let mut k = Killed(child);
    let url = format!("nbd://{addr}:{port}/{name}");
    wait_until(&mut k.0, "qemu-nbd", Duration::from_secs(20), || {
        wrap(netns, "qemu-img").args(["info", &url]).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
    })
    .with_context(|| format!("waiting for {url}"))?;
    Ok(k)
}

/// `bootcache node serve` with its API on a loopback port.
#[derive(Debug)]
pub struct NodeProc {
    /// The process.
    pub child: Killed,
    /// Its API, `addr:port`.
    pub api: String,
    /// NBD socket.
    pub socket: PathBuf,
    netns: Option<String>,
    /// A curl header file with the API's credential.
    auth_header: PathBuf,
}

impl NodeProc {
    /// Starts `bootcache` (the binary at `bin`) `node serve` inside `netns`
    /// (its log in `work/node.log`),
    /// its API on `api_addr` (the namespace's loopback when `None`; a host
    /// address for peers), with `extra` arguments (`--background`,
    /// `--prefetch`, `--peer`...). Its API token is in `token` (made by the
    /// first node that uses the file; nodes that are each other's peers
    /// share one).
    ///
    /// # Errors
    /// The node does not start or answer within 20 s.
    pub fn start_in(
        bin: &Path,
        netns: Option<&str>,
        api_addr: Option<&str>,
        cache_dir: &Path,
        work: &Path,
        token: &Path,
        extra: &[&str],
    ) -> anyhow::Result<NodeProc> {
        std::fs::create_dir_all(work)?;
        let api = format!("{}:{}", api_addr.unwrap_or("127.0.0.1"), free_port()?);
        let socket = work.join("nbd.sock");
        let log = std::fs::File::create(work.join("node.log"))?;
        let child = wrap(netns, bin)
            .args(["node", "serve", "--api", &api])
            .args(extra)
            .arg("--cache-dir")
            .arg(cache_dir)
            .arg("--nbd-socket")
            .arg(&socket)
            .arg("--token-file")
            .arg(token)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("running {} node serve", bin.display()))?;
        let auth_header = work.join("auth.header");
        let mut node = NodeProc { child: Killed(child), api, socket, netns: netns.map(str::to_owned), auth_header };
        let url = format!("http://{}/metrics", node.api);
        let ns = node.netns.clone();
        wait_until(&mut node.child.0, "bootcache node serve", Duration::from_secs(20), || curl_ok(ns.as_deref(), &url))?;
        let secret = std::fs::read_to_string(token).with_context(|| format!("reading {}", token.display()))?;
        let first = secret.lines().next().unwrap_or_default();
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&node.auth_header)?;
        writeln!(f, "Authorization: Bearer {first}")?;
        Ok(node)
    }

    fn curl(&self) -> Command {
        let mut c = wrap(self.netns.as_deref(), "curl");
        c.arg("-H").arg(format!("@{}", self.auth_header.display()));
        c
    }

    /// Opens `url` as export `name`, fetching from `peers` (node API URLs)
    /// before the store; returns the API's JSON answer.
    ///
    /// # Errors
    /// The node refuses (the message says why).
    pub fn open(&self, name: &str, url: &str, peers: &[String]) -> anyhow::Result<serde_json::Value> {
        let body = serde_json::json!({ "name": name, "url": url, "peers": peers }).to_string();
        let out = self
            .curl()
            .args(["-sS", "--fail-with-body", "-H", "content-type: application/json", "-d", &body])
            .arg(format!("http://{}/images", self.api))
            .output()
            .context("running curl")?;
        if !out.status.success() {
            bail!("opening {url}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// GET `path` on the API.
    ///
    /// # Errors
    /// Any failure of the request.
    pub fn get(&self, path: &str) -> anyhow::Result<String> {
        let out = self.curl().args(["-sS", "--fail"]).arg(format!("http://{}{path}", self.api)).output().context("running curl")?;
        if !out.status.success() {
            bail!("GET {path}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Resident memory of the node process, bytes.
    ///
    /// # Errors
    /// When the process is gone.
    pub fn rss(&self) -> anyhow::Result<u64> {
        self.status_kb("VmRSS:")
    }

    /// The most resident memory the node process has had, bytes.
    ///
    /// # Errors
    /// When the process is gone.
    pub fn peak_rss(&self) -> anyhow::Result<u64> {
        self.status_kb("VmHWM:")
    }

    fn status_kb(&self, field: &str) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.0.id()))?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .with_context(|| format!("no {field}"))?
            .trim()
            .trim_end_matches(" kB")
            .trim();
        Ok(kb.parse::<u64>()? * 1024)
    }
}

/// A qcow2 overlay at `path` of `size` bytes over `backing` (a file name,
/// `nbd+unix://` or `nbd://` URL, or a `json:` pseudo-protocol string) whose
/// format is `backing_format`.
///
/// # Errors
/// When qemu-img fails.
pub fn overlay(path: &Path, backing: &str, backing_format: &str, size: u64) -> anyhow::Result<()> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", backing_format, "-b", backing])
        .arg(path)
        .arg(size.to_string())
        .output()
        .context("qemu-img must be installed (package qemu-utils)")?;
    if !out.status.success() {
        bail!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Starts QEMU inside `netns` (or here) with `mem_mb` MiB on `disk` (qcow2)
/// with its serial console in `console`, and `extra` arguments (`-smp 2`,
/// a direct kernel boot's `-kernel`, `-initrd` and `-append`, ...).
///
/// # Errors
/// When QEMU cannot be started.
pub fn start_vm(netns: Option<&str>, disk: &Path, console: &Path, accel: &str, mem_mb: u32, extra: &[String]) -> anyhow::Result<Killed> {
    std::fs::write(console, "")?;
    let child = wrap(netns, "qemu-system-x86_64")
        .args(["-accel", accel, "-m", &mem_mb.to_string(), "-display", "none", "-net", "none", "-drive"])
        .arg(format!("file={},format=qcow2,if=virtio", disk.display()))
        .args(extra)
        .arg("-chardev")
        .arg(format!("file,id=con,path={}", console.display()))
        .args(["-serial", "chardev:con"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("qemu-system-x86_64 must be installed")?;
    Ok(Killed(child))
}

/// Waits until every console shows `marker`; returns each VM's time to it
/// from `start`.
///
/// # Errors
/// When `timeout` passes first (the error shows the consoles' last lines).
pub fn wait_markers(consoles: &[PathBuf], marker: &str, start: Instant, timeout: Duration) -> anyhow::Result<Vec<Duration>> {
    let mut seen = vec![None; consoles.len()];
    while seen.iter().any(Option::is_none) {
        for (i, c) in consoles.iter().enumerate() {
            if seen[i].is_none() && std::fs::read_to_string(c).unwrap_or_default().contains(marker) {
                seen[i] = Some(start.elapsed());
            }
        }
        if start.elapsed() > timeout {
            let tails: Vec<String> = consoles
                .iter()
                .map(|c| std::fs::read_to_string(c).unwrap_or_default())
                .map(|s| s.chars().rev().take(400).collect::<String>().chars().rev().collect())
                .collect();
            bail!("not every VM reached the marker within {timeout:?}: {seen:?}\nconsole tails: {tails:#?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(seen.into_iter().flatten().collect())
}

/// A CA of the test's own (`DIR/ca.pem`) and a server certificate it
/// signed for IP address `ip` (`DIR/server.pem`, key `DIR/server.key`):
/// what a TLS server of the testbed presents and its clients trust.
///
/// # Errors
/// No `openssl`, or it fails.
pub fn tls_certificate(dir: &Path, ip: &str) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let (ca, ca_key, cert, key, csr, ext) = (p("ca.pem"), p("ca.key"), p("server.pem"), p("server.key"), p("server.csr"), p("server.ext"));
    let days = ["-days", "2"];
    crate::tokens::openssl(
        &[&["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &ca_key, "-out", &ca, "-subj", "/CN=bootcache test CA"][..], &days]
            .concat(),
        None,
    )?;
    crate::tokens::openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", "/CN=server"], None)?;
    std::fs::write(&ext, format!("subjectAltName=IP:{ip}\n"))?;
    let sign = ["x509", "-req", "-in", &csr, "-CA", &ca, "-CAkey", &ca_key, "-CAcreateserial", "-out", &cert, "-extfile", &ext];
    crate::tokens::openssl(&[&sign[..], &days].concat(), None)?;
    Ok((PathBuf::from(ca), PathBuf::from(cert), PathBuf::from(key)))
}
