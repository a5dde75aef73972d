//! One interface to run a lab's instances on a compute node, whatever runs
//! them: [`libvirt`] for VMs (a domain per VM, its disk a qcow2 overlay on
//! the node's NBD export of the image, its serial console in a file) and
//! [`docker`] for containers (a container per instance, its image imported
//! from a root file system tarball, no network of Docker's own: the agent
//! gives it veths on the lab's bridges).
//!
//! ```text
//!   agent ──Spec──► Runtime::{create, start, stop, destroy, status, console, exec, list}
//!                      ├── libvirt/  (virt crate → libvirtd → QEMU)
//!                      └── docker/   (bollard → dockerd)
//! ```
//!
//! Everything a runtime makes is named `bootcache.<uid>.<lab>.<instance>`
//! ([`names::instance`](bootcache_api::agent::names::instance)) and marked
//! as made by its agent (a libvirt `<metadata>` element, a Docker label);
//! [`Runtime::list`] lists only what carries the mark, which the agent holds
//! against its own record before it removes anything.

#![deny(missing_docs)]

pub mod docker;
pub mod libvirt;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bootcache_api::agent::Nic;

/// The prefix of everything a runtime makes.
pub const PREFIX: &str = "bootcache.";

/// Most bytes of a console or log [`Runtime::logs`] returns (its end).
pub const CONSOLE_TAIL: usize = 1 << 20;

/// The backends [`open`] knows, by name.
pub const BACKENDS: [&str; 2] = ["libvirt", "docker"];

/// How QEMU runs guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation (domain type `qemu`).
    Tcg,
    /// Hardware virtualisation (domain type `kvm`).
    Kvm,
}

/// What a backend is opened with.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where the backend's daemon is (a libvirt URI, dockerd's socket).
    pub endpoint: String,
    /// The agent's state directory: the backend keeps its files under it
    /// (a VM's overlay and console).
    pub state_dir: PathBuf,
    /// The mark of what it makes (the agent's node): it lists only that.
    pub owner: String,
    /// How QEMU runs guests (VM backends).
    pub accel: Accel,
}

/// Opens the backend called `name` (one of [`BACKENDS`]): the one place a
/// backend is chosen.
///
/// # Errors
/// An unknown name, or the backend's daemon does not answer.
pub async fn open(name: &str, options: &Options) -> Result<Box<dyn Runtime>, RuntimeError> {
    match name {
        "libvirt" => Ok(Box::new(libvirt::Libvirt::connect(options).await?)),
        "docker" => Ok(Box::new(docker::Docker::connect(options).await?)),
        other => Err(RuntimeError::UnknownBackend(other.to_owned())),
    }
}

/// The format of a whole disk image on the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    /// Raw.
    Raw,
    /// qcow2.
    Qcow2,
}

impl DiskFormat {
    /// QEMU's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// What an instance is made from, as the node holds it; the backend
/// prepares the rest itself (a VM's overlay, a container's image).
#[derive(Clone, Debug)]
pub enum Source {
    /// A disk the node exports over NBD (a bootcache image), and its size.
    Export {
        /// The export (`nbd+unix:///NAME?socket=PATH`).
        url: String,
        /// The disk's size, bytes.
        virtual_size: u64,
    },
    /// A whole disk image file on the node.
    Disk {
        /// The file.
        path: PathBuf,
        /// Its format (read from its magic, never guessed).
        format: DiskFormat,
    },
    /// A root file system tarball on the node, known by `key` (imported
    /// once however many instances use it).
    Tarball {
        /// The file.
        path: PathBuf,
        /// Its key (hex).
        key: String,
    },
    /// A registry's container image, its blobs on the node, each checked
    /// against its digest (loaded once however many instances use it).
    Image {
        /// Its key (hex of its manifest's digest).
        key: String,
        /// Its config (JSON).
        config: PathBuf,
        /// Its layers (tar, or tar+gzip), bottom first.
        layers: Vec<PathBuf>,
    },
}

/// What a VM is told at its first boot (cloud-init's NoCloud data source):
/// the files of its seed disk, which its backend makes and attaches
/// read-only.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoCloud {
    /// `meta-data` (its instance id and host name).
    pub meta_data: String,
    /// `user-data` (a `#cloud-config`), if the lab gives one.
    pub user_data: Option<String>,
    /// `network-config` (version 2: its addresses by MAC, gateway, DNS).
    pub network_config: String,
}

/// An instance to make.
#[derive(Clone, Debug)]
pub struct Spec {
    /// What the runtime calls it (`bootcache.<uid>.<lab>.<instance>`).
    pub id: String,
    /// The host name inside (the instance's name).
    pub hostname: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Its interfaces (VMs get them from the runtime; containers from the
    /// agent, once started: [`Runtime::netns_pid`]).
    pub nics: Vec<Nic>,
    /// What it is made from.
    pub source: Source,
    /// A container's command (else its image's).
    pub command: Option<Vec<String>>,
    /// A VM's cloud-init seed.
    pub cloud_init: Option<NoCloud>,
    /// A container's environment.
    pub env: std::collections::BTreeMap<String, String>,
    /// Files put into a container before it starts (absolute path, content).
    pub files: std::collections::BTreeMap<String, String>,
    /// A container's sysctls.
    pub sysctls: std::collections::BTreeMap<String, String>,
    /// A VM's firmware: UEFI (OVMF) rather than BIOS.
    pub uefi: bool,
}

/// Where an instance stands as its runtime sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Running.
    Running,
    /// Made but not running (stopped, exited, crashed).
    Stopped,
    /// Not there.
    Missing,
}

/// What a command run inside an instance printed and returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exec {
    /// Its exit code.
    pub code: i64,
    /// Its standard output and error.
    pub output: String,
}

/// Why a runtime could not do something.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The backend failed at something.
    #[error("{what}: {why}")]
    Failed {
        /// What was being done (the instance and the step).
        what: String,
        /// Why, as the backend said.
        why: String,
    },
    /// The backend cannot do this at all.
    #[error("the {backend} runtime cannot {capability}")]
    Unsupported {
        /// The backend.
        backend: &'static str,
        /// What was asked.
        capability: &'static str,
    },
    /// No backend of that name.
    #[error("no runtime backend {0:?} (there are: libvirt, docker)")]
    UnknownBackend(String),
}

impl RuntimeError {
    /// A failure of `what`, because of `why`.
    pub fn new(what: impl Into<String>, why: impl std::fmt::Display) -> RuntimeError {
        RuntimeError::Failed { what: what.into(), why: why.to_string() }
    }
}

/// What a Linux guest's console says when its kernel panics.
pub const KERNEL_PANIC: &str = "Kernel panic - not syncing";

/// Runs instances of one kind: object-safe, one per backend directory,
/// chosen by name ([`open`]). Every call is idempotent where it can be:
/// destroying what is not there succeeds. The optional capabilities
/// (`logs`, `exec`) answer [`RuntimeError::Unsupported`] unless the backend
/// has them.
#[async_trait]
pub trait Runtime: Send + Sync {
    /// The backend's name (as [`open`] knows it).
    fn name(&self) -> &'static str;
    /// Prepares what the instance needs from its source (a VM's overlay, a
    /// container's image) and makes it (not started).
    async fn create(&self, spec: &Spec) -> Result<(), RuntimeError>;
    /// Starts it.
    async fn start(&self, id: &str) -> Result<(), RuntimeError>;
    /// Stops it (at once: lab instances hold nothing to save).
    async fn stop(&self, id: &str) -> Result<(), RuntimeError>;
    /// Stops and removes it, and what the runtime prepared for it.
    async fn destroy(&self, id: &str) -> Result<(), RuntimeError>;
    /// Where it stands.
    async fn status(&self, id: &str) -> Result<Status, RuntimeError>;
    /// The ids of everything it made and marked as its agent's (the
    /// [`PREFIX`] and the mark).
    async fn list(&self) -> Result<Vec<String>, RuntimeError>;
    /// The process whose network namespace a running instance's interfaces
    /// go into, when the agent gives it its interfaces (containers); `None`
    /// when the runtime gives them itself (VMs).
    async fn netns_pid(&self, _id: &str) -> Result<Option<u32>, RuntimeError> {
        Ok(None)
    }
    /// What it printed so far (a VM's serial console, a container's log), at
    /// most [`CONSOLE_TAIL`] bytes from its end.
    async fn logs(&self, _id: &str) -> Result<String, RuntimeError> {
        Err(RuntimeError::Unsupported { backend: self.name(), capability: "show an instance's logs" })
    }
    /// Runs `argv` inside it (no shell), waiting at most `timeout`.
    async fn exec(&self, _id: &str, _argv: &[String], _timeout: Duration) -> Result<Exec, RuntimeError> {
        Err(RuntimeError::Unsupported { backend: self.name(), capability: "run a command in an instance" })
    }

    /// Waits until it is running and, with a `marker`, until a line of its
    /// logs contains it; fails if it stops, if its kernel panics (the
    /// panic's line is the reason: a guest that panicked never gets
    /// ready), or if `timeout` passes.
    async fn wait_ready(&self, id: &str, marker: Option<&str>, timeout: Duration) -> Result<Duration, RuntimeError> {
        let start = Instant::now();
        loop {
            let status = self.status(id).await?;
            match status {
                Status::Running => {}
                s if start.elapsed() > Duration::from_secs(2) => {
                    return Err(RuntimeError::new(format!("{id}: waiting until ready"), format!("it is {s:?}, not running")));
                }
                _ => {}
            }
            let ready = match marker {
                None => status == Status::Running,
                Some(m) => {
                    // One pass over the logs: a panic anywhere fails it.
                    let mut seen = false;
                    for line in self.logs(id).await?.lines() {
                        if let Some(at) = line.find(KERNEL_PANIC) {
                            return Err(RuntimeError::new(format!("{id}: booting"), line[at..].trim()));
                        }
                        seen |= line.contains(m);
                    }
                    seen
                }
            };
            if ready {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                let what = marker.map_or_else(|| "running".to_owned(), |m| format!("{m:?} in its logs"));
                return Err(RuntimeError::new(format!("{id}: waiting until ready"), format!("no {what} within {} s", timeout.as_secs())));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Escapes text for an XML attribute or element (libvirt XML). Everything
/// put there is checked before (names, MACs, paths the agent made); this is
/// the second line.
pub(crate) fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

/// The end of `s`, at most [`CONSOLE_TAIL`] bytes, cut at a character.
pub(crate) fn tail(s: String) -> String {
    if s.len() <= CONSOLE_TAIL {
        return s;
    }
    let mut from = s.len() - CONSOLE_TAIL;
    while !s.is_char_boundary(from) {
        from += 1;
    }
    s[from..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A running instance whose logs say `console`; nothing optional but logs.
    struct Fake {
        console: &'static str,
    }

    #[async_trait]
    impl Runtime for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        async fn create(&self, _: &Spec) -> Result<(), RuntimeError> {
            Ok(())
        }
        async fn start(&self, _: &str) -> Result<(), RuntimeError> {
            Ok(())
        }
        async fn stop(&self, _: &str) -> Result<(), RuntimeError> {
            Ok(())
        }
        async fn destroy(&self, _: &str) -> Result<(), RuntimeError> {
            Ok(())
        }
        async fn status(&self, _: &str) -> Result<Status, RuntimeError> {
            Ok(Status::Running)
        }
        async fn list(&self) -> Result<Vec<String>, RuntimeError> {
            Ok(Vec::new())
        }
        async fn logs(&self, _: &str) -> Result<String, RuntimeError> {
            Ok(self.console.to_owned())
        }
    }

    #[tokio::test]
    async fn what_a_backend_lacks_says_so_and_unknown_backends_are_refused() {
        let r: Box<dyn Runtime> = Box::new(Fake { console: "" });
        let e = r.exec("x", &["true".into()], Duration::from_secs(1)).await.unwrap_err();
        assert!(matches!(e, RuntimeError::Unsupported { backend: "fake", .. }), "{e}");
        assert_eq!(r.netns_pid("x").await.unwrap(), None);
        let opts = Options { endpoint: String::new(), state_dir: "/nonexistent".into(), owner: "n".into(), accel: Accel::Tcg };
        let e = open("lxc", &opts).await.err().unwrap();
        assert!(e.to_string().contains("no runtime backend \"lxc\""), "{e}");
    }

    #[tokio::test]
    async fn a_panicked_guest_fails_at_once_with_its_panic() {
        let panicked = Fake {
            console: "[    0.068000]  start_kernel+0x665/0x720\n[    0.068000] ---[ end Kernel panic - not syncing: IO-APIC + timer doesn't work! ]---\n",
        };
        let started = Instant::now();
        let e = panicked.wait_ready("vm", Some("BOOTCACHE-BOOTED"), Duration::from_secs(60)).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(e.to_string().contains("Kernel panic - not syncing: IO-APIC + timer doesn't work!"), "{e}");
        assert!(!e.to_string().contains("0.068000"), "{e}");
        let booted = Fake { console: "udhcpc: lease obtained\nBOOTCACHE-BOOTED\n" };
        assert!(booted.wait_ready("vm", Some("BOOTCACHE-BOOTED"), Duration::from_secs(5)).await.is_ok());
    }
}
