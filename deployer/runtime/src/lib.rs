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

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bootcache_api::agent::Nic;

/// The prefix of everything a runtime makes.
pub const PREFIX: &str = "bootcache.";

/// Most bytes of a console or log [`Runtime::console`] returns (its end).
pub const CONSOLE_TAIL: usize = 1 << 20;

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
    /// agent, once started).
    pub nics: Vec<Nic>,
    /// What it runs.
    pub image: Image,
}

/// What an instance runs.
#[derive(Clone, Debug)]
pub enum Image {
    /// A VM's disk: a qcow2 overlay (its backing file the node's export).
    Disk(PathBuf),
    /// A container's image reference, and its command (else the image's).
    Container {
        /// The image (as imported).
        reference: String,
        /// The command.
        command: Option<Vec<String>>,
    },
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
#[error("{what}: {why}")]
pub struct RuntimeError {
    /// What was being done (the instance and the step).
    pub what: String,
    /// Why, as the backend said.
    pub why: String,
}

impl RuntimeError {
    /// An error of `what`, because of `why`.
    pub fn new(what: impl Into<String>, why: impl std::fmt::Display) -> RuntimeError {
        RuntimeError { what: what.into(), why: why.to_string() }
    }
}

/// What a Linux guest's console says when its kernel panics.
pub const KERNEL_PANIC: &str = "Kernel panic - not syncing";

/// Runs instances of one kind. Every call is idempotent where it can be:
/// destroying what is not there succeeds.
pub trait Runtime: Send + Sync {
    /// Makes the instance (not started).
    fn create(&self, spec: &Spec) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Starts it.
    fn start(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Stops it (at once: lab instances hold nothing to save).
    fn stop(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Stops and removes it, and what the runtime made for it.
    fn destroy(&self, id: &str) -> impl Future<Output = Result<(), RuntimeError>> + Send;
    /// Where it stands.
    fn status(&self, id: &str) -> impl Future<Output = Result<Status, RuntimeError>> + Send;
    /// Its serial console (VM) or log (container) so far, at most
    /// [`CONSOLE_TAIL`] bytes from its end.
    fn console(&self, id: &str) -> impl Future<Output = Result<String, RuntimeError>> + Send;
    /// Runs `argv` inside it (no shell), waiting at most `timeout`.
    fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> impl Future<Output = Result<Exec, RuntimeError>> + Send;
    /// The ids of everything it made and marked as its agent's (the
    /// [`PREFIX`] and the mark).
    fn list(&self) -> impl Future<Output = Result<Vec<String>, RuntimeError>> + Send;

    /// Waits until it is running and, with a `marker`, until a line of its
    /// console contains it; fails if it stops, if its kernel panics (the
    /// panic's line is the reason: a guest that panicked never gets
    /// ready), or if `timeout` passes.
    fn wait_ready(&self, id: &str, marker: Option<&str>, timeout: Duration) -> impl Future<Output = Result<Duration, RuntimeError>> + Send
    where
        Self: Sized,
    {
        async move {
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
                        // One pass over the console: a panic anywhere fails it.
                        let mut seen = false;
                        for line in self.console(id).await?.lines() {
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
                    let what = marker.map_or_else(|| "running".to_owned(), |m| format!("{m:?} on its console"));
                    return Err(RuntimeError::new(
                        format!("{id}: waiting until ready"),
                        format!("no {what} within {} s", timeout.as_secs()),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
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

    /// A running instance whose console says `console`.
    struct Fake {
        console: &'static str,
    }

    impl Runtime for Fake {
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
        async fn console(&self, _: &str) -> Result<String, RuntimeError> {
            Ok(self.console.to_owned())
        }
        async fn exec(&self, _: &str, _: &[String], _: Duration) -> Result<Exec, RuntimeError> {
            Ok(Exec { code: 0, output: String::new() })
        }
        async fn list(&self) -> Result<Vec<String>, RuntimeError> {
            Ok(Vec::new())
        }
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
