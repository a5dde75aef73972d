//! What a compute agent and its control node say to each other.
//!
//! The agent calls; the control node answers. Every heartbeat carries what
//! the node has and what its instances are doing ([`Heartbeat`]); its answer
//! is everything the node should run now ([`Orders`]). The agent makes what
//! is ordered and removes what is not, so a restarted agent or control node
//! converges on the next heartbeat, and an agent takes orders from nothing
//! but the control node it calls.
//!
//! The names of what an agent makes on its node (bridges, VXLAN links,
//! veths, MAC addresses) are derived here from the lab's names, so both
//! sides and the clean-up after a crash agree on them.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::{InstanceState, InterfaceName, Kind, Name, RootDigest};

/// What a node reports on each heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// CPU cores.
    pub cores: u32,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Instances running.
    pub running: u32,
    /// The images it caches, each with the bytes of its boot segment it holds.
    pub caches: Vec<(RootDigest, u64)>,
    /// Where each instance it was ordered to run stands.
    #[serde(default)]
    pub instances: Vec<Observed>,
}

/// An instance as its node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// Its lab.
    pub lab: Name,
    /// The instance.
    pub name: Name,
    /// Where it stands (fetching, starting, ready or failed).
    pub state: InstanceState,
    /// Why it failed.
    pub reason: Option<String>,
}

/// Everything a node should run now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Orders {
    /// The instances.
    pub instances: Vec<Order>,
    /// The segments they are on.
    pub segments: Vec<SegmentOrder>,
}

/// One instance to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Its lab.
    pub lab: Name,
    /// Its name.
    pub name: Name,
    /// VM or container.
    pub kind: Kind,
    /// Its image and where to fetch it.
    pub image: ImageOrder,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// Its network interfaces, in order.
    pub nics: Vec<Nic>,
    /// The line that means it is up (serial console or log); none: up once running.
    pub ready: Option<String>,
    /// A container's command.
    pub command: Option<Vec<String>>,
    /// Whether it should run (false: stopped on request, kept).
    #[serde(default = "running")]
    pub running: bool,
}

fn running() -> bool {
    true
}

/// Where an instance's image comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum ImageOrder {
    /// A bootcache container, delivered boot segment first.
    Vm {
        /// The container on the store.
        url: String,
        /// Its root digest (what the node checks it opened).
        root: RootDigest,
        /// The nodes to fetch from before the store (their API addresses),
        /// as the control node chose.
        peers: Vec<String>,
    },
    /// A plain disk image (raw or qcow2), copied whole to the node before
    /// its VMs start (`delivery: full`).
    Disk {
        /// The disk image on the store.
        url: String,
    },
    /// A root file system tarball, imported into the node's Docker.
    Container {
        /// The tarball on the store.
        url: String,
        /// Nodes holding it whole to copy it from before the store (their
        /// API addresses), as the control node chose.
        #[serde(default)]
        peers: Vec<String>,
    },
}

/// A network interface of an instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// The bridge of its segment on this node.
    pub bridge: InterfaceName,
    /// Its MAC address.
    pub mac: Mac,
    /// Its address.
    pub address: Ipv4Addr,
    /// The segment's prefix length.
    pub prefix: u8,
}

/// A segment on a node: its bridge, the VXLAN link to the other nodes that
/// have instances on it, and the DHCP service for this node's VMs on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentOrder {
    /// Its lab.
    pub lab: Name,
    /// Its name in the lab.
    pub segment: Name,
    /// The bridge.
    pub bridge: InterfaceName,
    /// The VXLAN link (made only when `remotes` is not empty).
    pub vxlan: InterfaceName,
    /// The VXLAN network identifier.
    pub vni: u32,
    /// The other nodes' addresses (VXLAN tunnel ends).
    pub remotes: Vec<Ipv4Addr>,
    /// DHCP for this node's VMs on the segment.
    pub dhcp: Option<Dhcp>,
}

/// DHCP by MAC address for a node's VMs on a segment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dhcp {
    /// The node's own address on the segment (answers from it).
    pub server: Ipv4Addr,
    /// The segment's prefix length.
    pub prefix: u8,
    /// Each VM's MAC address and the address it gets.
    pub hosts: Vec<(Mac, Ipv4Addr)>,
}

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Mac, String> {
        let mut out = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("{s:?} is not a MAC address"));
        }
        for (o, p) in out.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(format!("{s:?} is not a MAC address"));
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

fn digest(parts: &[&str]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    for p in parts {
        // Length-prefixed, so ("ab","c") and ("a","bc") differ.
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    *h.finalize().as_bytes()
}

fn interface(prefix: &str, d: &[u8; 32]) -> InterfaceName {
    let hex: String = d[..5].iter().map(|b| format!("{b:02x}")).collect();
    // "bc" + 10 hex digits: 12 bytes, inside the kernel's 15.
    format!("{prefix}{hex}").parse().unwrap_or_else(|_| unreachable!("a prefix and hex digits make an interface name"))
}

/// Names of what agents make on nodes, derived from the lab's names.
pub mod names {
    use super::*;

    /// What every bridge, VXLAN link and veth an agent makes carries as its
    /// interface alias (followed by the lab and segment or instance), so
    /// the agent finds what it made, and nothing else, after a crash.
    pub const ALIAS_PREFIX: &str = "bootcache ";

    /// The bridge of a lab's segment (unless the lab names one).
    pub fn bridge(lab: &Name, segment: &Name) -> InterfaceName {
        interface("bc", &digest(&["bridge", lab.as_str(), segment.as_str()]))
    }

    /// The VXLAN link of a lab's segment.
    pub fn vxlan(lab: &Name, segment: &Name) -> InterfaceName {
        interface("bx", &digest(&["bridge", lab.as_str(), segment.as_str()]))
    }

    /// The VXLAN network identifier of a lab's segment (24 bits, never 0).
    pub fn vni(lab: &Name, segment: &Name) -> u32 {
        let d = digest(&["bridge", lab.as_str(), segment.as_str()]);
        (u32::from_le_bytes([d[5], d[6], d[7], 0]) % 0x00ff_fffe) + 1
    }

    /// The host end of a container's veth on its `nic`-th interface.
    pub fn veth(lab: &Name, instance: &Name, nic: usize) -> InterfaceName {
        interface("bv", &digest(&["veth", lab.as_str(), instance.as_str(), &nic.to_string()]))
    }

    /// The MAC address of an instance's `nic`-th interface: locally
    /// administered, unicast (52:54:00, QEMU's prefix, for VMs and
    /// containers alike), stable across deploys.
    pub fn mac(lab: &Name, instance: &Name, nic: usize) -> Mac {
        let d = digest(&["mac", lab.as_str(), instance.as_str(), &nic.to_string()]);
        Mac([0x52, 0x54, 0x00, d[0], d[1], d[2]])
    }

    /// What a VM's libvirt domain and a container are called on the node.
    pub fn instance(lab: &Name, instance: &Name) -> String {
        format!("bootcache.{lab}.{instance}")
    }
}

/// The key a container image (a tarball at `url`) is cached under on a
/// node and known by to the control node, beside VM images' root digests:
/// the tarball is not a bootcache container, so its URL names it.
pub fn container_image_key(url: &str) -> RootDigest {
    RootDigest(digest(&["container image", url]))
}

/// The kind of an instance's image, as an order carries it.
pub fn kind_of(image: &ImageOrder) -> Kind {
    match image {
        ImageOrder::Vm { .. } | ImageOrder::Disk { .. } => Kind::Vm,
        ImageOrder::Container { .. } => Kind::Container,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names_fit_and_differ() {
        let (lab, a, b): (Name, Name, Name) = ("demo".parse().unwrap(), "lan".parse().unwrap(), "wan".parse().unwrap());
        let br = names::bridge(&lab, &a);
        assert_eq!(br.as_str().len(), 12);
        assert_ne!(br, names::bridge(&lab, &b));
        assert_ne!(names::bridge(&"demo2".parse().unwrap(), &a), br);
        assert_eq!(names::bridge(&lab, &a), br, "stable");
        assert!(names::vni(&lab, &a) > 0 && names::vni(&lab, &a) < 1 << 24);
        let m = names::mac(&lab, &"web-1".parse().unwrap(), 0);
        assert_eq!(m.0[..3], [0x52, 0x54, 0x00]);
        assert_eq!(m.to_string().parse::<Mac>().unwrap(), m);
        assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{m}\""));
        for bad in ["", "52:54:00:00:00", "52:54:00:00:00:0g", "525400000000", "52:54:00:00:00:000"] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        assert_eq!(names::instance(&lab, &"web-1".parse().unwrap()), "bootcache.demo.web-1");
    }

    #[test]
    fn a_heartbeat_without_instances_is_read() {
        let beat: Heartbeat = serde_json::from_str(r#"{"cores":2,"memory_bytes":1,"running":0,"caches":[]}"#).unwrap();
        assert!(beat.instances.is_empty());
    }
}
