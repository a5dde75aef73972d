//! Stores and nodes for the delivery tests: nginx (the third-party store),
//! `bootcache store serve`, `bootcache node serve`, and QEMU booting from an
//! export through its own overlay.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until `port` on loopback accepts connections.
pub fn wait_port(port: u16, child: &mut Child, what: &str) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited before listening: {status}");
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{what} does not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child process killed when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// nginx serving `root` (its access log, with bytes sent, in its work dir).
pub struct Nginx {
    child: Child,
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
    pub fn start_in(netns: Option<&str>, addr: &str, port: u16, root: &Path, work: &Path) -> Nginx {
        std::fs::create_dir_all(work).unwrap();
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
        std::fs::write(&conf_path, conf).unwrap();
        let mut child = wrap(netns, "nginx")
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(work)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("nginx must be installed (scripts/setup installs it)");
        let url = format!("http://{addr}:{port}/");
        let start = Instant::now();
        while !wrap(netns, "curl").args(["-s", "-o", "/dev/null", &url]).status().unwrap().success() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("nginx exited before listening: {status}");
            }
            assert!(start.elapsed() < Duration::from_secs(20), "nginx does not answer on {url}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx { child, port }
    }
}

/// `bootcache node serve` with its API on a loopback port.
pub struct NodeProc {
    pub child: Killed,
    pub api: u16,
    pub socket: PathBuf,
    netns: Option<String>,
}

impl NodeProc {
    pub fn start(cache_dir: &Path, work: &Path, background: &str) -> NodeProc {
        NodeProc::start_in(None, cache_dir, work, background)
    }

    /// The node inside `netns` (its API on that namespace's loopback).
    pub fn start_in(netns: Option<&str>, cache_dir: &Path, work: &Path, background: &str) -> NodeProc {
        std::fs::create_dir_all(work).unwrap();
        let api = free_port();
        let socket = work.join("nbd.sock");
        let child = wrap(netns, env!("CARGO_BIN_EXE_bootcache"))
            .args(["node", "serve", "--background", background, "--api", &format!("127.0.0.1:{api}")])
            .arg("--cache-dir")
            .arg(cache_dir)
            .arg("--nbd-socket")
            .arg(&socket)
            .spawn()
            .expect("run bootcache node serve");
        let node = NodeProc { child: Killed(child), api, socket, netns: netns.map(str::to_owned) };
        let start = Instant::now();
        while !node.curl().args(["-s", "-o", "/dev/null", &format!("http://127.0.0.1:{api}/images")]).status().unwrap().success() {
            assert!(start.elapsed() < Duration::from_secs(20), "bootcache node serve does not answer on port {api}");
            std::thread::sleep(Duration::from_millis(50));
        }
        node
    }

    fn curl(&self) -> Command {
        wrap(self.netns.as_deref(), "curl")
    }

    /// Opens `url` as export `name`; returns the API's JSON answer.
    pub fn open(&self, name: &str, url: &str) -> serde_json::Value {
        let body = serde_json::json!({ "name": name, "url": url }).to_string();
        let out = self
            .curl()
            .args(["-sS", "--fail-with-body", "-H", "content-type: application/json", "-d", &body])
            .arg(format!("http://127.0.0.1:{}/images", self.api))
            .output()
            .expect("curl");
        assert!(out.status.success(), "opening {url}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// GET `path` on the API.
    pub fn get(&self, path: &str) -> String {
        let out = self.curl().args(["-sS", "--fail"]).arg(format!("http://127.0.0.1:{}{path}", self.api)).output().expect("curl");
        assert!(out.status.success(), "GET {path}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Resident memory of the node process, bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.0.id())).unwrap();
        let kb: u64 = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").trim().parse().unwrap();
        kb * 1024
    }
}

/// The source image and an NBD export of it compare equal, byte for byte
/// (`qemu-img compare` through QEMU's NBD client).
pub fn assert_export_equals(image: &Path, nbd_url: &str) {
    let cmp = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(image).arg(nbd_url).output().unwrap();
    assert!(
        cmp.status.success(),
        "the export differs from the source: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
}

/// A qcow2 overlay of `size` bytes over the NBD export at `nbd_url`.
pub fn overlay(path: &Path, nbd_url: &str, size: u64) {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", nbd_url])
        .arg(path)
        .arg(size.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
}

/// Starts QEMU on `disk` (qcow2) with its serial console in `console`.
pub fn start_vm(disk: &Path, console: &Path, accel: &str) -> Killed {
    std::fs::write(console, "").unwrap();
    let child = Command::new("qemu-system-x86_64")
        .args(["-accel", accel, "-m", "512", "-display", "none", "-net", "none", "-drive"])
        .arg(format!("file={},format=qcow2,if=virtio", disk.display()))
        .arg("-chardev")
        .arg(format!("file,id=con,path={}", console.display()))
        .args(["-serial", "chardev:con"])
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-system-x86_64");
    Killed(child)
}

/// Waits until every console shows `marker`; returns each VM's time to it.
pub fn wait_markers(consoles: &[PathBuf], marker: &str, timeout: Duration) -> Vec<Duration> {
    let start = Instant::now();
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
            panic!("not every VM reached the marker within {timeout:?}: {seen:?}\nconsole tails: {tails:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    seen.into_iter().map(Option::unwrap).collect()
}
