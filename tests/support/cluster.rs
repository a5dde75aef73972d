//! A deployment on the namespace testbed: a store, a control node and
//! compute nodes, each with its own libvirtd and dockerd (or none, for
//! prefetch-only nodes) and a `bootcache agent`, on shaped links.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bootcache_testbed::daemons::{Dockerd, Libvirtd};
use bootcache_testbed::programs::Killed;
use bootcache_testbed::{Link, Testbed};

use super::bootcache;

const BIN: &str = env!("CARGO_BIN_EXE_bootcache");

/// The container tarball (scripts/container-image).
pub fn container_image() -> PathBuf {
    script_path("scripts/container-image")
}

/// The small guest's disk and its root file system tarball
/// (scripts/small-guest).
pub fn small_guest() -> (PathBuf, PathBuf) {
    let raw = script_path("scripts/small-guest");
    let tar = raw.with_extension("tar");
    (raw, tar)
}

/// The small guest's realistic-size sibling: 1.6 GiB more data its boot
/// never reads (scripts/small-guest-large).
pub fn small_guest_large() -> PathBuf {
    script_path("scripts/small-guest-large")
}

fn script_path(script: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(script);
    let out = Command::new(&path).output().unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(out.status.success(), "{script} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// What the store holds and what each image costs to send once.
pub struct Images {
    /// The bootcache image's boot segment, header and index.
    pub boot_bytes: u64,
    /// The traditional configuration's whole disk image (qcow2).
    pub disk_bytes: u64,
    /// The container tarball.
    pub tar_bytes: u64,
    /// The mean stored size of a boot-segment extent.
    pub boot_extent_bytes: f64,
}

/// The small guest recorded and converted into `store` (small.bcimg), as
/// qcow2 (small.qcow2) and its tarball (small.tar).
pub fn fill_store(store: &Path, work: &Path) -> Images {
    fill_store_with(store, work, "256K")
}

/// Records the small guest's boot (from `raw`, in 96 MiB) into `trace`.
pub fn record_small_guest(raw: &Path, trace: &Path) {
    record_boot(raw, trace, "96", 120, &[]);
}

/// Records the boot of the raw image `raw` to its marker into `trace`:
/// QEMU with `memory_mib`, no network, the image as the first virtio disk
/// and `drives` (`-drive` values) after it; at most `timeout_s` seconds.
pub fn record_boot(raw: &Path, trace: &Path, memory_mib: &str, timeout_s: u32, drives: &[String]) {
    let (raw_s, trace_s) = (raw.to_str().unwrap(), trace.to_str().unwrap());
    let drive = format!("file={raw_s},format=raw,if=virtio,cache=none,aio=threads");
    let (accel, timeout) = (super::accel(), timeout_s.to_string());
    let mut args = vec!["record", "--image", raw_s, "--out", trace_s, "--timeout", &timeout, "--"];
    args.extend([
        "qemu-system-x86_64",
        "-accel",
        &accel,
        "-m",
        memory_mib,
        "-display",
        "none",
        "-snapshot",
        "-net",
        "none",
        "-drive",
        &drive,
    ]);
    for d in drives {
        args.extend(["-drive", d.as_str()]);
    }
    bootcache(&args);
}

/// [`fill_store`] with boot-segment extents of at most `boot_extent`.
pub fn fill_store_with(store: &Path, work: &Path, boot_extent: &str) -> Images {
    fill_store_from(store, work, &small_guest().0, boot_extent)
}

/// [`fill_store_with`] from `raw`, a disk of the small guest's family
/// (the images keep the small guest's names; the tarball is its).
pub fn fill_store_from(store: &Path, work: &Path, raw: &Path, boot_extent: &str) -> Images {
    let (_, tar) = small_guest();
    let raw = raw.to_owned();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let trace = work.join("small.bctrace");
    record_small_guest(&raw, &trace);
    let image = store.join("small.bcimg");
    bootcache(&["convert", &s(&raw), &s(&image), "--trace", &s(&trace), "--zstd", "-q", "--boot-extent", boot_extent]);
    let info: serde_json::Value = serde_json::from_str(&bootcache(&["info", &s(&image), "--output", "json"])).unwrap();
    let boot_segment = info["boot_segment_bytes"].as_u64().unwrap();
    let boot_bytes = boot_segment + 256 + info["index_bytes"].as_u64().unwrap();
    let boot_extent_bytes = boot_segment as f64 / info["boot_extents"].as_f64().unwrap().max(1.0);
    let qcow2 = store.join("small.qcow2");
    let out = Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "qcow2"]).arg(&raw).arg(&qcow2).output().unwrap();
    assert!(out.status.success(), "qemu-img convert: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::copy(&tar, store.join("small.tar")).unwrap();
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();
    Images { boot_bytes, disk_bytes: len(&qcow2), tar_bytes: len(&tar), boot_extent_bytes }
}

/// What the cluster is made of.
pub struct Spec {
    /// The compute nodes' names.
    pub nodes: Vec<String>,
    /// Whether they run libvirtd and dockerd (else agents are prefetch-only).
    pub daemons: bool,
    /// Arguments given to every agent, besides the usual.
    pub agent_args: Vec<String>,
    /// Arguments given to the control node, besides the usual.
    pub control_args: Vec<String>,
    /// Names the logs kept in the target directory.
    pub log: &'static str,
    /// Seconds between heartbeats (agents and control node).
    pub heartbeat: f64,
}

/// A compute node: its daemons and its agent.
pub struct Node {
    pub name: String,
    pub netns: String,
    pub addr: String,
    pub dir: PathBuf,
    pub libvirtd: Option<Libvirtd>,
    pub dockerd: Option<Dockerd>,
    pub agent: Option<Killed>,
    args: Vec<String>,
    log: PathBuf,
    heartbeat: String,
}

impl Drop for Node {
    /// Its agent stopped, then what that agent left running outside the
    /// testbed's namespaces: its DHCP servers, each in a network namespace
    /// of its own (a test that failed never destroyed its lab).
    fn drop(&mut self) {
        self.agent = None;
        let dhcp = format!("{}/agent/dhcp/", self.dir.display());
        let _ = Command::new("pkill").args(["-9", "-f", &dhcp]).status();
    }
}

impl Node {
    pub fn libvirt(&self) -> &Libvirtd {
        self.libvirtd.as_ref().expect("a node with daemons")
    }

    pub fn docker(&self) -> &Dockerd {
        self.dockerd.as_ref().expect("a node with daemons")
    }

    pub fn start_agent(&mut self, control: &str, token: &Path) {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, BIN, "-v", "agent", "--control", control, "--name", &self.name, "--token-file"])
            .arg(token)
            .args(["--heartbeat", &self.heartbeat, "--agent-listen", &format!("{}:7070", self.addr), "--agent-state"])
            .arg(self.dir.join("agent"));
        match (&self.libvirtd, &self.dockerd) {
            (Some(l), Some(d)) => {
                c.args(["--libvirt", &l.uri, "--docker"]).arg(&d.socket);
            }
            _ => {
                c.args(["--prefetch-only", "--no-containers"]);
            }
        }
        let child = c
            .args(&self.args)
            .stdin(Stdio::null())
            // Kept after the test, for a failure's story.
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap())
            .spawn()
            .unwrap();
        self.agent = Some(Killed(child));
    }

    /// Its agent stopped and started again, with `extra` arguments besides
    /// those it had (it keeps its credential and state).
    pub fn restart_agent(&mut self, control: &str, token: &Path, extra: &[&str]) {
        self.agent = None;
        self.args.extend(extra.iter().map(|a| (*a).to_owned()));
        self.start_agent(control, token);
    }

    /// Empties its caches: no VM image, disk or container image is held.
    pub fn cold(&self) {
        for sub in ["agent/cache", "agent/disks", "agent/tarballs", "agent/blobs", "agent/images"] {
            let _ = std::fs::remove_dir_all(self.dir.join(sub));
        }
        if let Some(d) = &self.dockerd {
            let out = d.docker().args(["images", "-q", "bootcache/image"]).output().unwrap();
            for img in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = d.docker().args(["rmi", "-f", img]).output();
            }
        }
    }

    /// `docker exec` in one of its containers.
    pub fn docker_exec(&self, container: &str, argv: &[&str]) -> Output {
        self.docker().docker().args(["exec", container]).args(argv).output().unwrap()
    }

    pub fn links(&self) -> String {
        let out = Command::new("ip").args(["-n", &self.netns, "-br", "link"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// What a failed ping's story needs from the node: its links, the
    /// VXLAN links' forwarding entries, the FORWARD chain with its counters,
    /// and the end of its agent's log.
    pub fn network_story(&self) -> String {
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(["netns", "exec", &self.netns]).args(args).output().unwrap();
            format!("$ {}\n{}{}", args.join(" "), String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        format!(
            "--- {} ---\n{}{}{}{}--- its agent's log, last lines ---\n{}\n",
            self.name,
            run(&["ip", "-br", "link"]),
            run(&["ip", "-d", "link", "show", "type", "vxlan"]),
            run(&["bridge", "fdb", "show"]).lines().filter(|l| l.contains("dev bx") || l.starts_with('$')).collect::<Vec<_>>().join("\n")
                + "\n",
            run(&["iptables", "-L", "FORWARD", "-v", "-n"]),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    pub fn forward_rules(&self) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.netns, "iptables", "-S", "FORWARD"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// CPU seconds its agent, libvirtd, dockerd and their children (QEMU,
    /// containers) have used, and their resident memory now, bytes: every
    /// process whose network namespace is the node's.
    pub fn usage(&self) -> (f64, u64) {
        let Ok(ns) = std::fs::metadata(format!("/run/netns/{}", self.netns)) else { return (0.0, 0) };
        use std::os::unix::fs::MetadataExt;
        let (dev, ino) = (ns.dev(), ns.ino());
        let tick = 100.0; // USER_HZ
        let (mut cpu, mut rss) = (0.0, 0);
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let p = e.path();
            let same = std::fs::metadata(p.join("ns/net")).is_ok_and(|m| m.dev() == dev && m.ino() == ino);
            if !same {
                continue;
            }
            if let Ok(stat) = std::fs::read_to_string(p.join("stat")) {
                let f: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
                let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
                cpu += (n(11) + n(12)) / tick; // utime, stime
                rss += (n(21) as u64) * 4096;
            }
        }
        (cpu, rss)
    }

    /// Runs `argv` in a VM through its guest agent; its exit code and output.
    pub fn vm_exec(&self, domain: &str, argv: &[&str]) -> (i64, String) {
        let libvirt = self.libvirt();
        let cmd = serde_json::json!({"execute": "guest-exec", "arguments": {"path": argv[0], "arg": &argv[1..], "capture-output": true}});
        let started: serde_json::Value =
            serde_json::from_str(&libvirt.virsh(&["qemu-agent-command", domain, &cmd.to_string()]).unwrap()).unwrap();
        let pid = started["return"]["pid"].as_i64().unwrap();
        let start = Instant::now();
        loop {
            let q = serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
            let st: serde_json::Value =
                serde_json::from_str(&libvirt.virsh(&["qemu-agent-command", domain, &q.to_string()]).unwrap()).unwrap();
            if st["return"]["exited"] == true {
                let out = st["return"]["out-data"].as_str().unwrap_or("");
                let text = Command::new("base64").arg("-d").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().and_then(|mut c| {
                    use std::io::Write;
                    c.stdin.take().unwrap().write_all(out.as_bytes())?;
                    c.wait_with_output()
                });
                return (st["return"]["exitcode"].as_i64().unwrap_or(-1), String::from_utf8_lossy(&text.unwrap().stdout).into_owned());
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{argv:?} in {domain} did not end");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The store, the control node and the compute nodes, up.
/// Fields drop in order: the nodes' daemons and agents stop before the
/// testbed (last) kills what is left in its namespaces and removes them.
pub struct Cluster {
    pub control_url: String,
    pub token: PathBuf,
    pub db: PathBuf,
    pub dir: PathBuf,
    pub store_addr: String,
    pub control: Option<Killed>,
    pub control_args: Vec<String>,
    pub heartbeat: String,
    pub nodes: Vec<Node>,
    pub _store: Killed,
    pub tb: Testbed,
}

impl Cluster {
    /// Everything up on `link`: the store serving `store_dir`, the control
    /// node, and the nodes of `spec` with their daemons and agents (all
    /// registered before this returns).
    pub fn start(dir: &Path, store_dir: &Path, link: Link, spec: Spec) -> Cluster {
        let mut names = vec!["store", "control"];
        names.extend(spec.nodes.iter().map(String::as_str));
        let mut tb = Testbed::new(&names).unwrap();
        tb.shape(link).unwrap();
        let store_addr = tb.host("store").addr.to_string();
        let store = Killed(
            tb.command("store", BIN).args(["store", "serve", "--listen", &format!("{store_addr}:8080")]).arg(store_dir).spawn().unwrap(),
        );
        let token = dir.join("control.token");
        let t = "lab-test-token-0123456789abcdef0123456789";
        std::fs::write(&token, t).unwrap();
        std::fs::write(dir.join("auth.header"), format!("Authorization: Bearer {t}\n")).unwrap();
        // Agents are given the join token, as on a real cluster; nodes
        // speak to each other with the peer token.
        let admin = bootcache_http::auth::Credential::from_token(t);
        let join = dir.join("join.token");
        std::fs::write(&join, bootcache_control::api::join_token(&admin)).unwrap();
        std::fs::write(dir.join("peer.header"), format!("Authorization: Bearer {}\n", bootcache_control::api::peer_token(&admin))).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            for f in [&token, &join] {
                std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
        }
        let mut nodes = Vec::new();
        for name in &spec.nodes {
            let host = tb.host(name).clone();
            let ndir = dir.join(name);
            let (libvirtd, dockerd) = if spec.daemons {
                (
                    Some(Libvirtd::start(&host.netns, &ndir.join("libvirt")).unwrap()),
                    Some(Dockerd::start(&host.netns, &ndir.join("docker")).unwrap()),
                )
            } else {
                (None, None)
            };
            let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{name}.log", spec.log));
            nodes.push(Node {
                name: name.clone(),
                netns: host.netns,
                addr: host.addr.to_string(),
                dir: ndir,
                libvirtd,
                dockerd,
                agent: None,
                args: spec.agent_args.clone(),
                log,
                heartbeat: spec.heartbeat.to_string(),
            });
        }
        let control_url = format!("http://{}:7080", tb.host("control").addr);
        let mut c = Cluster {
            tb,
            control_url: control_url.clone(),
            token: token.clone(),
            db: dir.join("control.db"),
            dir: dir.to_owned(),
            store_addr,
            control: None,
            control_args: spec.control_args,
            heartbeat: spec.heartbeat.to_string(),
            nodes,
            _store: store,
        };
        c.start_control();
        for n in &mut c.nodes {
            n.start_agent(&control_url, &join);
        }
        c.wait_nodes_up();
        c
    }

    /// Waits until every node is up.
    pub fn wait_nodes_up(&self) {
        let start = Instant::now();
        while self.nodes_up().iter().filter(|(_, up)| *up).count() < self.nodes.len() {
            assert!(start.elapsed() < Duration::from_secs(60), "the agents did not come up: {:?}", self.nodes_up());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn start_control(&mut self) {
        let addr = format!("{}:7080", self.tb.host("control").addr);
        let child = self
            .tb
            .command("control", BIN)
            .args(["-v", "control", "serve", "--listen", &addr, "--heartbeat", &self.heartbeat, "--db"])
            .arg(&self.db)
            .arg("--token-file")
            .arg(&self.token)
            .args(&self.control_args)
            .stdin(Stdio::null())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("control.log")).unwrap())
            .spawn()
            .unwrap();
        self.control = Some(Killed(child));
        let start = Instant::now();
        while !self.curl(&["-o", "/dev/null", &format!("{}/nodes", self.control_url)]).status.success() {
            assert!(start.elapsed() < Duration::from_secs(20), "the control node did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The control node restarted with other arguments (same database).
    pub fn restart_control(&mut self, args: &[&str]) {
        self.control = None;
        self.control_args = args.iter().map(|a| (*a).to_owned()).collect();
        self.start_control();
        self.wait_nodes_up();
    }

    /// curl in the control host's namespace, with the credential.
    pub fn curl(&self, args: &[&str]) -> Output {
        let header = self.dir.join("auth.header");
        self.tb.command("control", "curl").args(["-sS", "--fail", "-H"]).arg(format!("@{}", header.display())).args(args).output().unwrap()
    }

    /// curl in the control host's namespace, with the nodes' peer token.
    pub fn curl_peer(&self, args: &[&str]) -> Output {
        let header = self.dir.join("peer.header");
        self.tb.command("control", "curl").args(["-sS", "-H"]).arg(format!("@{}", header.display())).args(args).output().unwrap()
    }

    /// The join token's file (what agents are given).
    pub fn join_token(&self) -> PathBuf {
        self.dir.join("join.token")
    }

    /// `bootcache ARGS --control URL --token-file T` in the control host's namespace.
    /// (Before a `--`, if there is one: what follows it is a command's own.)
    pub fn cli(&self, args: &[&str]) -> Output {
        let split = args.iter().position(|a| *a == "--").unwrap_or(args.len());
        let (ours, theirs) = args.split_at(split);
        self.tb
            .command("control", BIN)
            .args(ours)
            .args(["--control", &self.control_url, "--token-file"])
            .arg(&self.token)
            .args(theirs)
            .output()
            .unwrap()
    }

    pub fn nodes_up(&self) -> Vec<(String, bool)> {
        let out = self.curl(&[&format!("{}/nodes", self.control_url)]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array().map(|a| a.iter().map(|n| (n["name"].as_str().unwrap_or("").to_owned(), n["up"] == true)).collect()).unwrap_or_default()
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }

    pub fn instances(&self, lab: &str) -> Vec<serde_json::Value> {
        let out = self.cli(&["inspect", lab, "--output", "json"]);
        assert!(out.status.success(), "inspect: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["instances"].as_array().unwrap().clone()
    }

    /// A node API's counter (summed over images), from its /metrics.
    pub fn node_metric(&self, node: &str, name: &str) -> f64 {
        let out =
            self.tb.command("control", "curl").args(["-s"]).arg(format!("http://{}:7070/metrics", self.node(node).addr)).output().unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum::<f64>()
            + 0.0 // an empty sum is -0.0
    }

    /// Nothing of any lab on any node: domains, containers, links, rules, overlays.
    pub fn assert_clean(&self, when: &str) {
        for n in &self.nodes {
            if n.libvirtd.is_some() {
                assert_eq!(n.libvirt().domains().unwrap(), Vec::<String>::new(), "{when}: domains on {}", n.name);
                assert_eq!(n.docker().containers().unwrap(), Vec::<String>::new(), "{when}: containers on {}", n.name);
            }
            let links = n.links();
            assert!(
                !links.lines().any(|l| ["bc", "bx", "bv", "bd"].iter().any(|p| l.starts_with(p))),
                "{when}: links on {}:\n{links}",
                n.name
            );
            let rules = n.forward_rules();
            assert!(!rules.contains("bootcache"), "{when}: iptables rules on {}:\n{rules}", n.name);
            let overlays = std::fs::read_dir(n.dir.join("agent/overlays")).map(|d| d.count()).unwrap_or(0);
            assert_eq!(overlays, 0, "{when}: overlays left on {}", n.name);
        }
    }
}
