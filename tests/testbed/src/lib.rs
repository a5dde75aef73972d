//! A multi-node testbed on one machine: one network namespace per host,
//! joined through a bridge in a namespace of its own, every link shaped
//! (HTB for the rate; `bootcache-netem` on an NFQUEUE for delay and loss,
//! since the kernel here has no `netem` qdisc). Addresses exist only inside
//! the namespaces, and the root namespace routes the testbed's subnet into
//! a blackhole, so a client started outside by mistake fails at once.
//! Everything is torn down when the [`Testbed`] is dropped. Needs root.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

pub mod daemons;
pub mod fanout;
pub mod limit;
pub mod oci;
pub mod plot;
pub mod programs;
pub mod tokens;

/// The median of a benchmark's figures (the mean of the middle two of an
/// even count; NaN for none).
pub fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.into_iter().collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

/// How every host's link behaves.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// Rate of each direction, Mbit/s.
    pub rate_mbit: u32,
    /// Round-trip time added, milliseconds (half on each end's ingress).
    pub rtt_ms: f64,
    /// Percent of packets dropped on each end's ingress.
    pub loss_pct: f64,
}

impl Link {
    /// A link of `rate_mbit` with `rtt_ms` round trip and no loss.
    pub const fn new(rate_mbit: u32, rtt_ms: f64) -> Link {
        Link { rate_mbit, rtt_ms, loss_pct: 0.0 }
    }

    /// The same link, losing `pct` percent of packets.
    pub const fn with_loss(self, pct: f64) -> Link {
        Link { loss_pct: pct, ..self }
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} Mbit/s, {} ms RTT", self.rate_mbit, self.rtt_ms)?;
        if self.loss_pct > 0.0 {
            write!(f, ", {}% loss", self.loss_pct)?;
        }
        Ok(())
    }
}

/// One host of the testbed.
#[derive(Clone, Debug)]
pub struct Host {
    /// Its name in the test.
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its address.
    pub addr: Ipv4Addr,
}

/// The hosts and their links.
#[derive(Debug)]
pub struct Testbed {
    prefix: String,
    subnet: String,
    hosts: Vec<Host>,
    netems: Vec<Child>,
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args[0]))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The `bootcache-netem` program built next to the running test.
pub fn netem_program() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let p = dir.join("bootcache-netem");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "bootcache-netem is not built next to {}: run `cargo build -p bootcache-testbed` (cargo test --workspace builds it)",
        exe.display()
    )
}

impl Testbed {
    /// Creates one namespace per name, all on one bridge, unshaped.
    ///
    /// # Errors
    /// Missing `ip`, or not root.
    pub fn new(names: &[&str]) -> anyhow::Result<Testbed> {
        // Another testbed of the same process (tests run in parallel) gets
        // other names and addresses.
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = (std::process::id() + MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) % 200 + 20;
        let prefix = format!("bc{id}");
        let subnet = format!("10.77.{id}");
        let mut tb = Testbed { prefix: prefix.clone(), subnet: subnet.clone(), hosts: Vec::new(), netems: Vec::new() };
        let sw = format!("{prefix}sw");
        run(&["ip", "netns", "add", &sw]).context("creating network namespaces (root and iproute2 needed)")?;
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        let _ = run(&["ip", "route", "add", "blackhole", &format!("{subnet}.0/24")]);
        for (i, name) in names.iter().enumerate() {
            let netns = format!("{prefix}{name}");
            let addr = Ipv4Addr::new(10, 77, u8::try_from(id).unwrap_or(77), u8::try_from(i + 1).unwrap_or(1));
            run(&["ip", "netns", "add", &netns])?;
            let (a, b) = (format!("{prefix}h{i}"), format!("{prefix}s{i}"));
            run(&["ip", "link", "add", &a, "netns", &netns, "type", "veth", "peer", "name", &b, "netns", &sw])?;
            run(&["ip", "-n", &netns, "link", "set", &a, "name", "eth0"])?;
            run(&["ip", "-n", &netns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
            run(&["ip", "-n", &netns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &netns, "link", "set", "lo", "up"])?;
            run(&["ip", "-n", &sw, "link", "set", &b, "master", "br0"])?;
            run(&["ip", "-n", &sw, "link", "set", &b, "up"])?;
            tb.hosts.push(Host { name: (*name).into(), netns, addr });
        }
        Ok(tb)
    }

    /// The host called `name`.
    ///
    /// # Panics
    /// When there is none.
    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no testbed host {name}"))
    }

    /// `f` run on a thread inside host `name`'s network namespace (what it
    /// connects to, it connects to from there); what it returns.
    ///
    /// # Panics
    /// When the namespace cannot be entered, or `f` panics.
    pub fn within<T: Send>(&self, name: &str, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.host(name).netns);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: setns on this thread only, with a descriptor it holds.
                let r = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "entering {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// A command that runs `program` inside host `name`'s namespace.
    pub fn command(&self, name: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host(name).netns]).arg(program);
        c
    }

    /// Bytes host `name` has sent on its link so far.
    ///
    /// # Errors
    /// When the counter cannot be read.
    pub fn tx_bytes(&self, name: &str) -> anyhow::Result<u64> {
        let out = self.command(name, "cat").arg("/sys/class/net/eth0/statistics/tx_bytes").output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    }

    /// Shapes every host's link as `link` (replacing earlier shaping).
    ///
    /// # Errors
    /// Missing `tc`/`iptables`, or the delay program would not start.
    pub fn shape(&mut self, link: Link) -> anyhow::Result<()> {
        self.unshape();
        let netem = if link.rtt_ms > 0.0 || link.loss_pct > 0.0 { Some(netem_program()?) } else { None };
        let rate = format!("{}mbit", link.rate_mbit);
        for (i, h) in self.hosts.clone().iter().enumerate() {
            let ns = h.netns.as_str();
            run(&["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10"])?;
            run(&[
                "ip", "netns", "exec", ns, "tc", "class", "replace", "dev", "eth0", "parent", "1:", "classid", "1:10", "htb", "rate",
                &rate, "ceil", &rate,
            ])?;
            if let Some(program) = &netem {
                let queue = (i + 1).to_string();
                run(&["ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-i", "eth0", "-j", "NFQUEUE", "--queue-num", &queue])
                    .context("iptables with NFQUEUE is needed for delay and loss")?;
                let child = Command::new("ip")
                    .args(["netns", "exec", ns])
                    .arg(program)
                    .args(["--queue", &queue, "--delay-ms", &(link.rtt_ms / 2.0).to_string(), "--loss", &link.loss_pct.to_string()])
                    .args(["--seed", &(i + 7).to_string()])
                    .stdin(Stdio::null())
                    .spawn()
                    .context("starting bootcache-netem")?;
                self.netems.push(child);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200)); // the queues are bound
        for c in &mut self.netems {
            if let Some(status) = c.try_wait()? {
                bail!("bootcache-netem exited at once: {status}");
            }
        }
        Ok(())
    }

    /// Removes all shaping.
    pub fn unshape(&mut self) {
        for mut c in self.netems.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for h in &self.hosts {
            let _ = run(&["ip", "netns", "exec", &h.netns, "iptables", "-F", "INPUT"]);
            let _ = run(&["ip", "netns", "exec", &h.netns, "tc", "qdisc", "del", "dev", "eth0", "root"]);
        }
    }
}

/// Kills what still runs in namespace `netns` (a process left there by an
/// interrupted test: a daemon's child, an agent's DHCP server), naming it.
fn kill_leftovers(netns: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", netns]).output() else { return };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        let cmd = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        eprintln!("testbed: killing {} (pid {pid}), left running in {netns}", cmd.trim());
        let _ = run(&["kill", "-9", pid]);
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.unshape();
        for h in &self.hosts {
            kill_leftovers(&h.netns);
            let _ = run(&["ip", "netns", "del", &h.netns]);
        }
        let _ = run(&["ip", "netns", "del", &format!("{}sw", self.prefix)]);
        let _ = run(&["ip", "route", "del", "blackhole", &format!("{}.0/24", self.subnet)]);
    }
}
