//! What a compute agent and its control node say to each other.
//!
//! The agent calls; the control node answers. Every heartbeat carries what
//! the node has and what its instances are doing ([`Heartbeat`]); its answer
//! is everything the node should run now ([`Orders`]). The agent makes what
//! is ordered and removes what is not, so a restarted agent or control node
//! converges on the next heartbeat, and an agent takes orders from nothing
//! but the control node it calls.
//!
//! The names of what an agent makes on its node (runtime ids, bridges,
//! VXLAN links, veths, MAC addresses) are derived here, injectively, from
//! numbers the control node allocates and records (an instance's `uid`, a
//! segment's `id`), never from a hash of the lab's names: two instances or
//! segments of a cluster never share one, whatever their labs are called.
//!
//! A node joins once with the join token ([`Join`]) and is given a
//! credential of its own ([`Joined`]): its heartbeats are taken only with
//! it, so one node cannot speak for another.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::{Image, InstanceState, InterfaceName, Kind, Name, RootDigest};

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
    /// The whole files it holds (tarballs, disks), each by its key with its
    /// BLAKE3 digest: the first digest the control node hears for a key is
    /// the one every later copy is checked against.
    #[serde(default)]
    pub files: Vec<(RootDigest, RootDigest)>,
    /// Where each instance it was ordered to run stands.
    #[serde(default)]
    pub instances: Vec<Observed>,
}

/// A node joining its control node (`POST /nodes`, with the join token):
/// where it is and what it has. What it claims later is bounded by this.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Join {
    /// Its name.
    pub name: Name,
    /// Its agent's address (`ip:port`).
    pub address: String,
    /// Its CPU cores.
    #[serde(default)]
    pub cores: u32,
    /// Its memory, bytes.
    #[serde(default)]
    pub memory_bytes: u64,
}

/// What a node is given when it joins.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Joined {
    /// Its own credential: its heartbeats carry it (`Authorization: Bearer`),
    /// and the control node takes them for this node only.
    pub secret: String,
    /// What nodes of the cluster present to each other (fetching images
    /// and tarballs from peers); not the administrator's token.
    pub peer_token: String,
}

/// An instance as its node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    /// The instance's number, as ordered (a report for another number of
    /// the same name is about an instance the lab no longer has).
    pub uid: u32,
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
    /// Things to do once in its instances (a command, their logs), each
    /// answered by the node at [`crate::control::routes::task`].
    #[serde(default)]
    pub tasks: Vec<Task>,
}

/// Something to do once in an instance, for someone waiting at the control
/// node (`bootcache exec`, `bootcache logs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    /// Its number (answered with it).
    pub id: u64,
    /// The instance.
    pub uid: u32,
    /// What to do.
    pub what: TaskKind,
}

/// What a task does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum TaskKind {
    /// Run a command (no shell) and give back its exit code and output.
    Exec {
        /// The command.
        argv: Vec<String>,
        /// The most it may run, seconds.
        timeout_s: u64,
    },
    /// Give back what the instance printed (its console or log), the end
    /// of it.
    Logs,
}

/// What a task gave: an exit code and output, or why it could not run.
/// Output is at most [`TaskResult::MAX_OUTPUT`] bytes (its end).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskResult {
    /// A command's exit code.
    pub code: Option<i64>,
    /// What it printed (the end of it).
    pub output: String,
    /// Why it could not be done.
    pub error: Option<String>,
}

impl TaskResult {
    /// The most output a task gives back.
    pub const MAX_OUTPUT: usize = 1 << 20;
}

/// One instance to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    /// Its number, allocated by the control node, unique in the cluster
    /// and never reused: what the node calls it is derived from it
    /// ([`names::instance`]); a changed definition is a new number.
    pub uid: u32,
    /// Its lab.
    pub lab: Name,
    /// Its name.
    pub name: Name,
    /// Its image (its kind follows from it: [`Order::kind`]).
    pub image: Image,
    /// The nodes to fetch the image from before the store (their API
    /// addresses), as the control node chose.
    #[serde(default)]
    pub sources: Vec<String>,
    /// For a layered image, the nodes to fetch a parent's extents from, by
    /// the parent's root digest: nodes that hold the parent (for another
    /// image over it) though not this image. A parent not listed comes
    /// from `sources`, then the store.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_sources: Vec<(RootDigest, Vec<String>)>,
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
    /// A VM's cloud-init user-data (a map; its node sends it as
    /// `#cloud-config` in the VM's NoCloud seed beside the lab's addresses).
    #[serde(default)]
    pub cloud_init: Option<serde_json::Value>,
    /// A container's environment.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Files put into a container before it starts (absolute path, content).
    #[serde(default)]
    pub files: std::collections::BTreeMap<String, String>,
    /// Commands run in it once started, in order (each must succeed).
    #[serde(default)]
    pub exec: Vec<Vec<String>>,
    /// Its host name (else its name).
    #[serde(default)]
    pub hostname: Option<Name>,
    /// A container's sysctls.
    #[serde(default)]
    pub sysctls: std::collections::BTreeMap<String, String>,
    /// A command that succeeds once it is up (else `ready`).
    #[serde(default)]
    pub ready_command: Option<Vec<String>>,
    /// What a VM boots with.
    #[serde(default)]
    pub firmware: crate::lab::Firmware,
    /// Routes besides its segments' and gateway's: destination, via.
    #[serde(default)]
    pub routes: Vec<(crate::lab::Route, Ipv4Addr)>,
    /// Whether it should run (false: stopped on request, kept).
    #[serde(default = "running")]
    pub running: bool,
}

fn running() -> bool {
    true
}

impl Order {
    /// VM or container, as its image says.
    pub fn kind(&self) -> Kind {
        self.image.kind()
    }
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
    /// The segment's gateway, if it has one (the instance's default route).
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
}

/// A segment on a node: its bridge, the VXLAN link to the other nodes that
/// have instances on it, and the DHCP service for this node's VMs on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentOrder {
    /// Its number, allocated by the control node, unique in the cluster
    /// (its derived link names and VNI come from it).
    pub id: u32,
    /// Its lab.
    pub lab: Name,
    /// Its name in the lab.
    pub segment: Name,
    /// The bridge (the lab's name for it, or [`names::bridge`]): made by
    /// the agent, never adopted (one that exists and is not the agent's
    /// own is refused).
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

/// DHCP by MAC address for a node's VMs on a segment, served from a
/// network namespace of its own attached to the bridge: nothing of the
/// lab's subnet is addressed or routed in the node's own namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dhcp {
    /// The server's address on the segment (in its own namespace).
    pub server: Ipv4Addr,
    /// The segment's prefix length.
    pub prefix: u8,
    /// Each VM's MAC address and the address it gets.
    pub hosts: Vec<(Mac, Ipv4Addr)>,
    /// The router it tells them of, if the segment has one.
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
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

/// Names of what agents make on nodes, derived injectively from the numbers
/// the control node allocates: every one holds its number in full, in
/// fixed width, behind a prefix of its own kind.
pub mod names {
    use super::*;

    /// What every bridge, VXLAN link, veth and firewall rule an agent makes
    /// carries as its interface alias or comment (followed by the node and
    /// what it is for): the agent's mark, checked beside its own record.
    pub const ALIAS_PREFIX: &str = "bootcache ";

    /// The prefix of every runtime id.
    pub const INSTANCE_PREFIX: &str = "bootcache.";

    /// The largest segment number (VNIs are 24 bits, 0 is not one).
    pub const MAX_SEGMENT: u32 = (1 << 24) - 1;

    fn link(prefix: &str, hex: String) -> InterfaceName {
        // 2 + at most 10 hex digits: inside the kernel's 15 bytes.
        format!("{prefix}{hex}").parse().unwrap_or_else(|_| unreachable!("a prefix and hex digits make an interface name"))
    }

    /// What instance `uid` (of `lab`, called `instance` there) is called by
    /// its runtime, and its overlay, console and seed files:
    /// `bootcache.<uid>.<lab>.<instance>`; the number makes it unique, the
    /// names make it readable.
    pub fn instance(uid: u32, lab: &Name, instance: &Name) -> String {
        format!("{INSTANCE_PREFIX}{uid}.{lab}.{instance}")
    }

    /// The instance number in a runtime id, if it is one of ours.
    pub fn uid_of(id: &str) -> Option<u32> {
        let rest = id.strip_prefix(INSTANCE_PREFIX)?;
        let (num, _) = rest.split_once('.')?;
        if num.is_empty() || num.len() > 10 || !num.bytes().all(|b| b.is_ascii_digit()) || (num.len() > 1 && num.starts_with('0')) {
            return None;
        }
        num.parse().ok()
    }

    /// The bridge of segment `id` (unless the lab names one).
    pub fn bridge(id: u32) -> InterfaceName {
        link("bc", format!("{id:08x}"))
    }

    /// The VXLAN link of segment `id`.
    pub fn vxlan(id: u32) -> InterfaceName {
        link("bx", format!("{id:08x}"))
    }

    /// The host end of the link between segment `id`'s bridge and its DHCP
    /// server's namespace.
    pub fn dhcp_link(id: u32) -> InterfaceName {
        link("bd", format!("{id:08x}"))
    }

    /// The VXLAN network identifier of segment `id`: the number itself
    /// (1 to [`MAX_SEGMENT`]).
    pub fn vni(id: u32) -> Option<u32> {
        (1..=MAX_SEGMENT).contains(&id).then_some(id)
    }

    /// The host end of instance `uid`'s veth on its `nic`-th interface.
    pub fn veth(uid: u32, nic: u8) -> InterfaceName {
        link("bv", format!("{uid:08x}{nic:02x}"))
    }

    /// The MAC address of instance `uid`'s `nic`-th interface: locally
    /// administered and unicast (`0a`), then the number and the interface
    /// (VMs and containers alike; stable while the instance is).
    pub fn mac(uid: u32, nic: u8) -> Mac {
        let u = uid.to_be_bytes();
        Mac([0x0a, u[0], u[1], u[2], u[3], nic])
    }
}

/// The key a whole file (a tarball or disk at `url`) is cached under on a
/// node and known by to the control node ([`crate::image::file_key`]).
pub fn container_image_key(url: &str) -> RootDigest {
    crate::image::file_key(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_names_fit_and_differ() {
        let (lab, web): (Name, Name) = ("demo".parse().unwrap(), "web-1".parse().unwrap());
        let br = names::bridge(7);
        assert_eq!(br.as_str(), "bc00000007");
        assert_ne!(br, names::bridge(8));
        assert_eq!(names::vxlan(7).as_str(), "bx00000007");
        assert_eq!(names::dhcp_link(u32::MAX).as_str(), "bdffffffff");
        assert_eq!(names::veth(u32::MAX, 255).as_str(), "bvffffffffff");
        for n in [names::bridge(7), names::vxlan(7), names::dhcp_link(7), names::veth(7, 0)] {
            assert!(crate::lab::is_derived_shape(n.as_str()), "{n}");
        }
        assert_eq!(names::vni(1), Some(1));
        assert_eq!(names::vni(0), None);
        assert_eq!(names::vni(1 << 24), None);
        let m = names::mac(0x0102_0304, 5);
        assert_eq!(m.to_string(), "0a:01:02:03:04:05");
        assert_eq!(m.0[0] & 0b11, 0b10, "locally administered, unicast");
        assert_eq!(m.to_string().parse::<Mac>().unwrap(), m);
        assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{m}\""));
        for bad in ["", "52:54:00:00:00", "52:54:00:00:00:0g", "525400000000", "52:54:00:00:00:000"] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
        assert_eq!(names::instance(12, &lab, &web), "bootcache.12.demo.web-1");
        assert_eq!(names::uid_of("bootcache.12.demo.web-1"), Some(12));
        for other in ["bootcache.demo.web-1", "bootcache..x", "bootcache.012.x.y", "docker.12.x", "bootcache.99999999999.x.y"] {
            assert_eq!(names::uid_of(other), None, "{other}");
        }
    }

    /// The two labs of the finding: lab `x.y` with instance `z` and lab `x`
    /// with instance `y.z` were both `bootcache.x.y.z`.
    #[test]
    fn runtime_ids_of_dotted_names_differ() {
        let n = |s: &str| s.parse::<Name>().unwrap();
        assert_ne!(names::instance(1, &n("x.y"), &n("z")), names::instance(2, &n("x"), &n("y.z")));
    }

    proptest::proptest! {
        /// Every derived name holds its numbers whole: different numbers,
        /// different names, whatever the labs are called.
        #[test]
        fn derived_names_are_injective(
            a in (0u32.., 0u8.., "[a-z0-9][a-z0-9._-]{0,8}", "[a-z0-9][a-z0-9._-]{0,8}"),
            b in (0u32.., 0u8.., "[a-z0-9][a-z0-9._-]{0,8}", "[a-z0-9][a-z0-9._-]{0,8}"),
        ) {
            let (ua, na, la, ia) = a;
            let (ub, nb, lb, ib) = b;
            let (la, ia, lb, ib): (Name, Name, Name, Name) = (la.parse().unwrap(), ia.parse().unwrap(), lb.parse().unwrap(), ib.parse().unwrap());
            proptest::prop_assert_eq!(names::instance(ua, &la, &ia) == names::instance(ub, &lb, &ib), (ua, &la, &ia) == (ub, &lb, &ib));
            proptest::prop_assert_eq!(names::uid_of(&names::instance(ua, &la, &ia)), Some(ua));
            proptest::prop_assert_eq!(names::mac(ua, na) == names::mac(ub, nb), (ua, na) == (ub, nb));
            proptest::prop_assert_eq!(names::veth(ua, na) == names::veth(ub, nb), (ua, na) == (ub, nb));
            proptest::prop_assert_eq!(names::bridge(ua) == names::bridge(ub), ua == ub);
            proptest::prop_assert_ne!(names::bridge(ua), names::vxlan(ub));
            proptest::prop_assert_ne!(names::dhcp_link(ua), names::bridge(ub));
        }
    }

    #[test]
    fn a_heartbeat_without_instances_is_read() {
        let beat: Heartbeat = serde_json::from_str(r#"{"cores":2,"memory_bytes":1,"running":0,"caches":[]}"#).unwrap();
        assert!(beat.instances.is_empty());
    }
}
