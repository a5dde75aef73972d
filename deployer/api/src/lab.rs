//! The lab file: a virtual network of VMs and containers, in YAML, in the
//! spirit of containerlab's topology files.
//!
//! ```yaml
//! name: demo
//! defaults:                    # what every instance takes unless it says
//!   cpus: 1
//! segments:
//!   lan:
//!     subnet: 10.20.0.0/24
//! instances:
//!   web:
//!     kind: vm
//!     image: http://10.0.0.1:8080/reference.bcimg   # or registry:5000/guests/reference:v1
//!     count: 2                 # web-1, web-2
//!     cpus: 1
//!     memory: 512MiB
//!     segments:
//!       lan: 10.20.0.10        # web-1; web-2 takes 10.20.0.11
//!     ready: BOOTCACHE-BOOTED  # the line on the serial console that means up
//!     cloud-init:              # user-data, as #cloud-config (with the lab's
//!       users:                 # addresses, name and gateway as the rest of
//!         - name: alice        # its NoCloud seed)
//!           ssh_authorized_keys: [ssh-ed25519 AAAA... alice]
//!   legacy:
//!     kind: vm
//!     image: http://10.0.0.1:8080/reference.qcow2
//!     delivery: full           # the whole disk image copied first, then booted
//!     firmware: uefi           # OVMF (bios, SeaBIOS, unless said)
//!     routes: [{to: 10.70.0.0/16, via: 10.20.0.1}]
//!   user:
//!     kind: container
//!     image: http://10.0.0.1:8080/busybox.tar
//!     count: 6
//!     segments: [lan]          # addresses given from the subnet
//!     command: [/bin/sh, -c, "echo up; exec sleep infinity"]
//!     ready: up                # a line of its log
//!     env: {ROLE: user}        # its environment
//!     files:                   # files put in before it starts: inline,
//!       /etc/motd: hi          # or from a file beside the lab file that
//!       /etc/app.conf: {from: app.conf}   # `bootcache deploy` sends
//!     exec: [[touch, /ok]]     # commands run once it has started
//!     sysctls: {net.ipv4.ip_forward: 1}
//! ```
//!
//! [`Lab::parse`] checks everything a lab names before anything is made
//! (names, counts, subnets, addresses, URLs, markers) and says which line is
//! wrong ([`Lab::parse_with`] with the files its `from:` names, which
//! [`Lab::attachments`] lists); [`Lab::instances`] expands replicas into the
//! instances to deploy.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::{InterfaceName, Kind, Name};

mod addresses;
mod check;
mod raw;
mod subnet;

pub use check::{check_url, is_derived_shape};
pub use subnet::{Route, Subnet};

/// The most instances one lab may have, replicas counted.
pub const MAX_INSTANCES: u64 = 10_000;
/// The most segments one lab may have.
pub const MAX_SEGMENTS: usize = 256;
/// The largest lab file read.
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// The most files one lab may send with it (`from:`).
pub const MAX_ATTACHED: usize = 256;

/// Files sent with a lab file, by the name its `from:` gives them.
pub type Attached = BTreeMap<String, String>;

/// A lab as it is deployed: its file's text and the files beside it that
/// the text names with `from:` (what `POST /labs` takes as JSON; a lab
/// that names none may be sent as its YAML text alone).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSource {
    /// The lab file.
    pub text: String,
    /// The files it names, by name.
    #[serde(default)]
    pub files: Attached,
}

impl From<String> for LabSource {
    fn from(text: String) -> Self {
        LabSource { text, files: Attached::new() }
    }
}

impl LabSource {
    /// Parses and checks the lab with its files ([`Lab::parse_with`]).
    ///
    /// # Errors
    /// As [`Lab::parse_with`].
    pub fn parse(&self) -> Result<Lab, LabError> {
        Lab::parse_with(&self.text, &self.files)
    }
}

/// Addresses at the top of every subnet kept for the compute nodes (each
/// node that runs VMs on a segment answers their DHCP requests from one).
pub const NODE_ADDRESSES: u32 = 16;

/// What is wrong with a lab file, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", match line { Some(l) => format!("line {l}: "), None => String::new() })]
pub struct LabError {
    /// The line (1-based) of the value at fault, when known.
    pub line: Option<u32>,
    /// What is wrong.
    pub message: String,
}

/// A segment: one layer-2 network (a bridge on every node that has an
/// instance on it, joined across nodes by VXLAN).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Its name in the lab.
    pub name: Name,
    /// Its subnet.
    pub subnet: Subnet,
    /// The bridge's name on the nodes, when the lab sets one.
    pub bridge: Option<InterfaceName>,
    /// The segment's router, when it has one: the default route of its
    /// instances.
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
}

/// An instance of the lab as written (replicas not yet expanded).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceDef {
    /// Its name (replicas are `name-1` .. `name-N`).
    pub name: Name,
    /// VM or container.
    pub kind: Kind,
    /// Its image: a bootcache container (VMs) or a root file system tarball
    /// (containers), by `http://` URL.
    pub image: String,
    /// Replicas.
    pub count: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// The segments it is on, in order (its first, second... interface),
    /// with the first replica's address.
    pub segments: Vec<(Name, Ipv4Addr)>,
    /// The node it must run on.
    pub node: Option<Name>,
    /// The line (VM serial console, container log) that means it is up;
    /// none: up once running.
    pub ready: Option<String>,
    /// The container's command (containers only).
    pub command: Option<Vec<String>>,
    /// How a VM's disk reaches its node.
    #[serde(default)]
    pub delivery: Delivery,
    /// A VM's cloud-init user-data (a map, sent as `#cloud-config`).
    #[serde(default)]
    pub cloud_init: Option<serde_json::Value>,
    /// A container's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Files put into a container before it starts: absolute path, content.
    #[serde(default)]
    pub files: BTreeMap<String, String>,
    /// Commands run in a container once it has started, in order (each
    /// must succeed).
    #[serde(default)]
    pub exec: Vec<Vec<String>>,
    /// A container's host name (else its instance name).
    #[serde(default)]
    pub hostname: Option<Name>,
    /// A container's (namespaced) sysctls, e.g. `net.ipv4.ip_forward: 1`.
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    /// A command that succeeds once the instance is up (else `ready`).
    #[serde(default)]
    pub ready_command: Option<Vec<String>>,
    /// What a VM boots with.
    #[serde(default)]
    pub firmware: Firmware,
    /// Routes besides its segments' and its gateway: a destination through
    /// an address of one of its segments.
    #[serde(default)]
    pub routes: Vec<(Route, Ipv4Addr)>,
}

/// The most bytes a VM's cloud-init user-data may take (as sent).
pub const MAX_CLOUD_INIT_BYTES: usize = 64 << 10;
/// The most bytes one file given to a container may hold.
pub const MAX_FILE_CONTENT: usize = 256 << 10;

/// How a VM's disk reaches its node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Delivery {
    /// The image is a bootcache container: the boot segment first, the VM
    /// started at once, the rest on demand (the default).
    #[default]
    Lazy,
    /// The image is a plain disk image (raw or qcow2): the node copies it
    /// whole, once, from the store, and boots its VMs on overlays of that
    /// copy (the way image services such as OpenStack's work; kept to
    /// compare with).
    Full,
}

/// What a VM boots with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS (the default).
    #[default]
    Bios,
    /// UEFI (OVMF).
    Uefi,
}

/// The least memory a UEFI VM is given (OVMF fails in less under TCG).
pub const UEFI_MIN_MEMORY: u64 = 256 << 20;

/// A checked lab.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lab {
    /// Its name.
    pub name: Name,
    /// Its segments, in file order.
    pub segments: Vec<Segment>,
    /// Its instances, in file order.
    pub instances: Vec<InstanceDef>,
}

/// One instance to deploy (a replica expanded).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Its name in the lab.
    pub name: Name,
    /// The definition it comes from.
    pub def: Name,
    /// Its address on each of its segments, in order.
    pub addresses: Vec<(Name, Ipv4Addr)>,
}

impl Lab {
    /// Parses and checks a lab file.
    ///
    /// # Errors
    /// The first thing wrong, with its line: YAML syntax, an unknown key or
    /// kind, a missing image, duplicate or invalid names, counts beyond
    /// [`MAX_INSTANCES`], a segment without a subnet, an address outside
    /// its subnet or given twice, a non-`http://` image URL.
    pub fn parse(text: &str) -> Result<Lab, LabError> {
        Lab::parse_with(text, &Attached::new())
    }

    /// Parses and checks a lab file sent with the files its `from:` names.
    ///
    /// # Errors
    /// As [`Lab::parse`]; and a `from:` that names a file not sent, a file
    /// sent that no `from:` names, more than [`MAX_ATTACHED`] files.
    pub fn parse_with(text: &str, attached: &Attached) -> Result<Lab, LabError> {
        if attached.len() > MAX_ATTACHED {
            return Err(raw::err(None, format!("a lab sends at most {MAX_ATTACHED} files")));
        }
        check::lab(Self::raw(text)?, attached)
    }

    /// The files a lab file names with `from:`, each with its line and
    /// once, in file order: what `bootcache deploy` reads from beside it.
    ///
    /// # Errors
    /// YAML syntax, an unknown key, a name that is not a relative path
    /// below the lab file's folder.
    pub fn attachments(text: &str) -> Result<Vec<(String, Option<u32>)>, LabError> {
        let raw = Self::raw(text)?;
        let mut out: Vec<(String, Option<u32>)> = Vec::new();
        let defs = raw.instances.value.0.iter().map(|(_, d)| d).chain(raw.defaults.as_ref().map(|d| &d.value));
        for files in defs.filter_map(|d| d.files.as_ref()) {
            for (_, content) in &files.value.0 {
                if let raw::RawContent::From(name) = &content.value {
                    check::check_from(name).map_err(|why| raw::err(raw::at(content), format!("from: {name:?}: {why}")))?;
                    if !out.iter().any(|(n, _)| n == name) {
                        out.push((name.clone(), raw::at(content)));
                    }
                }
            }
        }
        if out.len() > MAX_ATTACHED {
            return Err(raw::err(None, format!("a lab sends at most {MAX_ATTACHED} files")));
        }
        Ok(out)
    }

    fn raw(text: &str) -> Result<raw::RawLab, LabError> {
        if text.len() > MAX_FILE_BYTES {
            return Err(raw::err(None, format!("the lab file is larger than {MAX_FILE_BYTES} bytes")));
        }
        serde_saphyr::from_str(text).map_err(|e| {
            let line = e.location().and_then(|l| u32::try_from(l.line()).ok()).filter(|l| *l > 0);
            // The library's message carries a snippet; the first line says it.
            raw::err(line, raw::plain_message(&e.to_string()))
        })
    }

    /// The instances to deploy, replicas expanded (`name-1` .. `name-N`),
    /// each with its addresses.
    pub fn instances(&self) -> Vec<Instance> {
        let mut out = Vec::new();
        for def in &self.instances {
            for i in 1..=def.count {
                let name = if def.count == 1 {
                    def.name.clone()
                } else {
                    check::replica(&def.name, u64::from(i)).unwrap_or_else(|_| def.name.clone())
                };
                let addresses = def.segments.iter().map(|(s, a)| (s.clone(), Ipv4Addr::from(u32::from(*a) + (i - 1)))).collect();
                out.push(Instance { name, def: def.name.clone(), addresses });
            }
        }
        out
    }

    /// The definition named `def`.
    pub fn def(&self, def: &Name) -> Option<&InstanceDef> {
        self.instances.iter().find(|d| d.name == *def)
    }

    /// The segment named `name`.
    pub fn segment(&self, name: &Name) -> Option<&Segment> {
        self.segments.iter().find(|s| s.name == *name)
    }

    /// The lab's instance names by definition (what `inspect` groups by).
    pub fn counts(&self) -> BTreeMap<Kind, u64> {
        let mut out = BTreeMap::new();
        for d in &self.instances {
            *out.entry(d.kind).or_insert(0) += u64::from(d.count);
        }
        out
    }
}

#[cfg(test)]
mod tests;
