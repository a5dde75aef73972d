//! The lab file: a virtual network of VMs and containers, in YAML, in the
//! spirit of containerlab's topology files.
//!
//! ```yaml
//! name: demo
//! segments:
//!   lan:
//!     subnet: 10.20.0.0/24
//! instances:
//!   web:
//!     kind: vm
//!     image: http://10.0.0.1:8080/reference.bcimg
//!     count: 2                 # web-1, web-2
//!     cpus: 1
//!     memory: 512MiB
//!     segments:
//!       lan: 10.20.0.10        # web-1; web-2 takes 10.20.0.11
//!     ready: BOOTCACHE-BOOTED  # the line on the serial console that means up
//!   legacy:
//!     kind: vm
//!     image: http://10.0.0.1:8080/reference.qcow2
//!     delivery: full           # the whole disk image copied first, then booted
//!   user:
//!     kind: container
//!     image: http://10.0.0.1:8080/busybox.tar
//!     count: 6
//!     segments: [lan]          # addresses given from the subnet
//!     command: [/bin/sh, -c, "echo up; exec sleep infinity"]
//!     ready: up                # a line of its log
//! ```
//!
//! [`Lab::parse`] checks everything a lab names before anything is made
//! (names, counts, subnets, addresses, URLs, markers) and says which line is
//! wrong; [`Lab::instances`] expands replicas into the instances to deploy.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::Ipv4Addr;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

use crate::{InterfaceName, Kind, Name};

/// The most instances one lab may have, replicas counted.
pub const MAX_INSTANCES: u64 = 10_000;
/// The most segments one lab may have.
pub const MAX_SEGMENTS: usize = 256;
/// The largest lab file read.
pub const MAX_FILE_BYTES: usize = 1 << 20;
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
}

/// An IPv4 subnet, `a.b.c.d/len` with no host bits set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Subnet {
    /// The network address.
    pub network: Ipv4Addr,
    /// The prefix length, 8 to 30.
    pub prefix: u8,
}

/// Ranges no lab may use: what they mean to every host is not a lab's to
/// change (RFC 6890).
const SPECIAL: [(Ipv4Addr, u8, &str); 5] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8, "\"this network\""),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback"),
    (Ipv4Addr::new(169, 254, 0, 0), 16, "link-local"),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast"),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved, and the broadcast address"),
];

impl Subnet {
    fn size(self) -> u32 {
        1u32 << (32 - u32::from(self.prefix))
    }

    /// Whether this subnet and `other` share an address.
    pub fn overlaps(self, other: Subnet) -> bool {
        let (a, b) = (u64::from(u32::from(self.network)), u64::from(u32::from(other.network)));
        a < b + u64::from(other.size()) && b < a + u64::from(self.size())
    }

    /// The special-purpose range this subnet overlaps, if any, and what it is.
    fn special(self) -> Option<(Subnet, &'static str)> {
        SPECIAL.iter().map(|(n, p, what)| (Subnet { network: *n, prefix: *p }, *what)).find(|(r, _)| self.overlaps(*r))
    }

    /// Whether `a` is a host address of this subnet (not its network or
    /// broadcast address).
    pub fn holds(self, a: Ipv4Addr) -> bool {
        let (n, a) = (u32::from(self.network), u32::from(a));
        a > n && a < n + self.size() - 1
    }

    /// The `i`-th host address (0 is the first after the network address),
    /// if the subnet has it.
    pub fn host(self, i: u32) -> Option<Ipv4Addr> {
        let hosts = self.size() - 2;
        (i < hosts).then(|| Ipv4Addr::from(u32::from(self.network) + 1 + i))
    }

    /// How many host addresses instances may use (the top
    /// [`NODE_ADDRESSES`] are the nodes').
    pub fn instance_hosts(self) -> u32 {
        (self.size() - 2).saturating_sub(NODE_ADDRESSES)
    }

    /// The address node number `k` (0-based, < [`NODE_ADDRESSES`]) takes
    /// on this segment.
    pub fn node_address(self, k: u32) -> Option<Ipv4Addr> {
        (k < NODE_ADDRESSES).then(|| self.host(self.size() - 3 - k)).flatten()
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl std::str::FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rule = || format!("{s:?} is not a subnet: write it as a.b.c.d/len, len from 8 to 30");
        let (a, len) = s.split_once('/').ok_or_else(rule)?;
        let network: Ipv4Addr = a.parse().map_err(|_| rule())?;
        let prefix: u8 = len.parse().map_err(|_| rule())?;
        if !(8..=30).contains(&prefix) {
            return Err(rule());
        }
        let mask = u32::MAX << (32 - u32::from(prefix));
        if u32::from(network) & !mask != 0 {
            return Err(format!("{s:?} has host bits set: the network is {}/{prefix}", Ipv4Addr::from(u32::from(network) & mask)));
        }
        let subnet = Subnet { network, prefix };
        if let Some((range, what)) = subnet.special() {
            return Err(format!("{s:?} overlaps {range} ({what}): a lab's subnet must be an ordinary unicast range"));
        }
        Ok(subnet)
    }
}

impl Serialize for Subnet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Subnet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
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
}

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

// ---- the file as written ----

/// A YAML mapping read in order, each key with its place.
struct Entries<T>(Vec<(Spanned<String>, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Entries<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Entries<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLab {
    name: Spanned<String>,
    #[serde(default)]
    segments: Option<Spanned<Entries<RawSegment>>>,
    instances: Spanned<Entries<RawInstance>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSegment {
    subnet: Option<Spanned<String>>,
    bridge: Option<Spanned<String>>,
}

/// `segments: [lan, wan]` or `segments: {lan: 10.20.0.10, wan: }`.
enum RawAttach {
    Names(Vec<Spanned<String>>),
    Addresses(Entries<Option<Spanned<String>>>),
}

// Not `#[serde(untagged)]`: that buffers the value and loses its places.
impl<'de> Deserialize<'de> for RawAttach {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawAttach;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of segment names or a mapping of segment names to addresses")
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<RawAttach, A::Error> {
                let mut out = Vec::new();
                while let Some(n) = seq.next_element()? {
                    out.push(n);
                }
                Ok(RawAttach::Names(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawAttach, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    out.push(entry);
                }
                Ok(RawAttach::Addresses(Entries(out)))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    kind: Option<Spanned<String>>,
    image: Option<Spanned<String>>,
    count: Option<Spanned<u64>>,
    cpus: Option<Spanned<u64>>,
    memory: Option<Spanned<MemoryText>>,
    segments: Option<Spanned<RawAttach>>,
    node: Option<Spanned<String>>,
    ready: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    delivery: Option<Spanned<String>>,
}

/// `512MiB`, `1G`, `64M`, `1TiB` or a number of bytes.
struct MemoryText(String);

impl<'de> Deserialize<'de> for MemoryText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = MemoryText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 512MiB or 1G")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<MemoryText, E> {
                Ok(MemoryText(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<MemoryText, E> {
                Ok(MemoryText(v.to_string()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MemoryText, E> {
                Ok(MemoryText(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

fn parse_memory(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        _ => return None,
    };
    num.checked_mul(mult)
}

fn at<T>(s: &Spanned<T>) -> Option<u32> {
    let line = u32::try_from(s.referenced.line()).unwrap_or(0);
    (line > 0).then_some(line)
}

fn err(line: Option<u32>, message: impl Into<String>) -> LabError {
    LabError { line, message: message.into() }
}

fn name_at(s: &Spanned<String>, what: &str) -> Result<Name, LabError> {
    s.value.parse().map_err(|e: crate::BadName| err(at(s), format!("{what}: {e}")))
}

/// Default VM memory.
const VM_MEMORY: u64 = 512 << 20;
/// Default container memory.
const CONTAINER_MEMORY: u64 = 64 << 20;
/// The most virtual CPUs an instance may ask for.
const MAX_CPUS: u64 = 64;
/// The most memory an instance may ask for.
const MAX_MEMORY: u64 = 1 << 40;

impl Lab {
    /// Parses and checks a lab file.
    ///
    /// # Errors
    /// The first thing wrong, with its line: YAML syntax, an unknown key or
    /// kind, a missing image, duplicate or invalid names, counts beyond
    /// [`MAX_INSTANCES`], a segment without a subnet, an address outside
    /// its subnet or given twice, a non-`http://` image URL.
    pub fn parse(text: &str) -> Result<Lab, LabError> {
        if text.len() > MAX_FILE_BYTES {
            return Err(err(None, format!("the lab file is larger than {MAX_FILE_BYTES} bytes")));
        }
        let raw: RawLab = serde_saphyr::from_str(text).map_err(|e| {
            let line = e.location().and_then(|l| u32::try_from(l.line()).ok()).filter(|l| *l > 0);
            // The library's message carries a snippet; the first line says it.
            err(line, plain_message(&e.to_string()))
        })?;
        Lab::check(raw)
    }

    fn check(raw: RawLab) -> Result<Lab, LabError> {
        let name = name_at(&raw.name, "lab name")?;
        let mut segments = Vec::new();
        let mut bridges = HashSet::new();
        if let Some(segs) = &raw.segments {
            if segs.value.0.len() > MAX_SEGMENTS {
                return Err(err(at(segs), format!("at most {MAX_SEGMENTS} segments")));
            }
            for (key, seg) in &segs.value.0 {
                let seg_name = name_at(key, "segment name")?;
                if segments.iter().any(|s: &Segment| s.name == seg_name) {
                    return Err(err(at(key), format!("segment {seg_name} is defined twice")));
                }
                let Some(subnet) = &seg.subnet else {
                    return Err(err(at(key), format!("segment {seg_name} has no subnet (e.g. subnet: 10.20.0.0/24)")));
                };
                let parsed: Subnet = subnet.value.parse().map_err(|e| err(at(subnet), format!("segment {seg_name}: {e}")))?;
                let bridge = match &seg.bridge {
                    None => None,
                    Some(b) => {
                        let n: InterfaceName =
                            b.value.parse().map_err(|e: crate::BadName| err(at(b), format!("segment {seg_name} bridge: {e}")))?;
                        if is_derived_shape(n.as_str()) {
                            return Err(err(
                                at(b),
                                format!(
                                    "segment {seg_name} bridge: {n} has the shape of the names bootcache gives (b, a letter of c x d v p, hex digits)"
                                ),
                            ));
                        }
                        if !bridges.insert(n.clone()) {
                            return Err(err(at(b), format!("bridge {n} is used by two segments")));
                        }
                        Some(n)
                    }
                };
                segments.push(Segment { name: seg_name, subnet: parsed, bridge });
            }
        }
        let by_name: HashMap<&Name, &Segment> = segments.iter().map(|s| (&s.name, s)).collect();

        let mut instances = Vec::new();
        let mut total: u64 = 0;
        let mut names: HashMap<Name, Option<u32>> = HashMap::new();
        // Addresses taken on each segment, and where.
        let mut taken: HashMap<Name, HashMap<Ipv4Addr, Option<u32>>> = HashMap::new();
        // Attachments without an address, given one once every explicit
        // address is known.
        let mut unaddressed: Vec<(usize, usize, Option<u32>)> = Vec::new();
        for (key, def) in &raw.instances.value.0 {
            let line = at(key);
            let name = name_at(key, "instance name")?;
            let kind = match &def.kind {
                None => return Err(err(line, format!("instance {name} has no kind (vm or container)"))),
                Some(k) => match k.value.as_str() {
                    "vm" => Kind::Vm,
                    "container" => Kind::Container,
                    other => return Err(err(at(k), format!("instance {name}: unknown kind {other:?} (vm or container)"))),
                },
            };
            let Some(image) = &def.image else { return Err(err(line, format!("instance {name} has no image"))) };
            check_url(&image.value).map_err(|e| err(at(image), format!("instance {name} image: {e}")))?;
            let count = match &def.count {
                None => 1,
                Some(c) if c.value == 0 || c.value > MAX_INSTANCES => {
                    return Err(err(at(c), format!("instance {name}: count must be 1 to {MAX_INSTANCES}")));
                }
                Some(c) => c.value,
            };
            total += count;
            if total > MAX_INSTANCES {
                let l = def.count.as_ref().map_or(line, at);
                return Err(err(l, format!("the lab has more than {MAX_INSTANCES} instances")));
            }
            let cpus = match &def.cpus {
                None => 1,
                Some(c) if c.value == 0 || c.value > MAX_CPUS => {
                    return Err(err(at(c), format!("instance {name}: cpus must be 1 to {MAX_CPUS}")));
                }
                Some(c) => c.value,
            };
            let memory_bytes = match &def.memory {
                None if kind == Kind::Vm => VM_MEMORY,
                None => CONTAINER_MEMORY,
                Some(m) => match parse_memory(&m.value.0) {
                    Some(b) if (1 << 20..=MAX_MEMORY).contains(&b) => b,
                    _ => {
                        return Err(err(
                            at(m),
                            format!("instance {name}: memory {:?} is not a size from 1MiB to 1TiB (e.g. 512MiB)", m.value.0),
                        ));
                    }
                },
            };
            let node = def.node.as_ref().map(|n| name_at(n, "node")).transpose()?;
            let ready = match &def.ready {
                None => None,
                Some(r) if r.value.is_empty() || r.value.len() > 256 || r.value.chars().any(char::is_control) => {
                    return Err(err(at(r), format!("instance {name}: ready must be 1 to 256 printable characters")));
                }
                Some(r) => Some(r.value.clone()),
            };
            let command = match &def.command {
                None => None,
                Some(_) if kind == Kind::Vm => {
                    return Err(err(line, format!("instance {name}: command is for containers (a VM runs its image's own init)")));
                }
                Some(c) if c.value.is_empty() || c.value.len() > 64 || c.value.iter().any(|a| a.len() > 4096 || a.contains('\0')) => {
                    return Err(err(at(c), format!("instance {name}: command must be 1 to 64 arguments of at most 4096 bytes")));
                }
                Some(c) => Some(c.value.clone()),
            };
            let delivery = match &def.delivery {
                None => Delivery::Lazy,
                Some(d) if kind == Kind::Container => {
                    return Err(err(at(d), format!("instance {name}: delivery is for VMs (a container's tarball is imported whole)")));
                }
                Some(d) => match d.value.as_str() {
                    "lazy" => Delivery::Lazy,
                    "full" => Delivery::Full,
                    other => return Err(err(at(d), format!("instance {name}: unknown delivery {other:?} (lazy or full)"))),
                },
            };
            // Every replica's name, checked now.
            for i in 1..=count {
                let n = if count == 1 { name.clone() } else { replica(&name, i).map_err(|e| err(line, e))? };
                if let Some(prev) = names.insert(n.clone(), line) {
                    let first = prev.map_or(String::new(), |l| format!(" (line {l})"));
                    return Err(err(line, format!("instance name {n} is used twice{first}")));
                }
            }
            let mut attached: Vec<(Name, Ipv4Addr)> = Vec::new();
            let attach: Vec<(&Spanned<String>, Option<&Spanned<String>>)> = match &def.segments {
                None => Vec::new(),
                Some(s) => match &s.value {
                    RawAttach::Names(v) => v.iter().map(|n| (n, None)).collect(),
                    RawAttach::Addresses(e) => e.0.iter().map(|(n, a)| (n, a.as_ref())).collect(),
                },
            };
            for (seg_key, address) in attach {
                let seg_name = name_at(seg_key, "segment")?;
                let Some(seg) = by_name.get(&seg_name) else {
                    return Err(err(at(seg_key), format!("instance {name}: no segment {seg_name} in this lab")));
                };
                if attached.iter().any(|(s, _)| *s == seg_name) {
                    return Err(err(at(seg_key), format!("instance {name} is on segment {seg_name} twice")));
                }
                let used = taken.entry(seg_name.clone()).or_default();
                match address {
                    None => {
                        unaddressed.push((instances.len(), attached.len(), at(seg_key)));
                        attached.push((seg_name, Ipv4Addr::UNSPECIFIED));
                    }
                    Some(a) => {
                        let first: Ipv4Addr =
                            a.value.parse().map_err(|_| err(at(a), format!("instance {name}: {:?} is not an IPv4 address", a.value)))?;
                        for i in 0..count {
                            let addr = u32::from(first).checked_add(u32::try_from(i).unwrap_or(u32::MAX)).map(Ipv4Addr::from);
                            let ok = addr.filter(|x| seg.subnet.holds(*x) && instance_index(seg.subnet, *x) < seg.subnet.instance_hosts());
                            let Some(addr) = ok else {
                                return Err(err(
                                    at(a),
                                    format!(
                                        "instance {name}: {} replicas from {first} do not fit in {} (the last {NODE_ADDRESSES} host addresses are the nodes')",
                                        count, seg.subnet
                                    ),
                                ));
                            };
                            if let Some(prev) = used.insert(addr, at(a)) {
                                let where_ = prev.map_or(String::new(), |l| format!(" on line {l}"));
                                return Err(err(at(a), format!("address {addr} on segment {seg_name} is also given{where_}")));
                            }
                        }
                        attached.push((seg_name, first));
                    }
                }
            }
            instances.push(InstanceDef {
                name,
                kind,
                image: image.value.clone(),
                count: u32::try_from(count).unwrap_or(u32::MAX),
                cpus: u32::try_from(cpus).unwrap_or(1),
                memory_bytes,
                segments: attached,
                node,
                ready,
                command,
                delivery,
            });
        }
        if instances.is_empty() {
            return Err(err(at(&raw.instances), "the lab has no instances"));
        }
        // Attachments without an address get the lowest free block that
        // holds all of the definition's replicas.
        let mut free: HashMap<Name, FirstFit> = HashMap::new();
        for (i, j, line) in unaddressed {
            let def = &instances[i];
            let seg = by_name[&def.segments[j].0];
            let fit = free.entry(seg.name.clone()).or_insert_with(|| {
                let used = taken.get(&seg.name).map(|u| u.keys().map(|a| instance_index(seg.subnet, *a)).collect()).unwrap_or_default();
                FirstFit::new(used, seg.subnet.instance_hosts())
            });
            let count = def.count;
            let Some(start) = fit.take(count) else {
                return Err(err(line, format!("instance {}: segment {} has no room for {count} more addresses", def.name, seg.name)));
            };
            let first = seg.subnet.host(start).unwrap_or(Ipv4Addr::UNSPECIFIED);
            instances[i].segments[j].1 = first;
        }
        Ok(Lab { name, segments, instances })
    }

    /// The instances to deploy, replicas expanded (`name-1` .. `name-N`),
    /// each with its addresses.
    pub fn instances(&self) -> Vec<Instance> {
        let mut out = Vec::new();
        for def in &self.instances {
            for i in 1..=def.count {
                let name =
                    if def.count == 1 { def.name.clone() } else { replica(&def.name, u64::from(i)).unwrap_or_else(|_| def.name.clone()) };
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

/// The library's message without its snippet, place and advice (the line
/// is given once, by [`LabError`]).
fn plain_message(msg: &str) -> String {
    let mut m = msg.lines().next().unwrap_or("not a lab file").trim();
    m = m.strip_prefix("error: ").unwrap_or(m);
    if let Some(rest) = m.strip_prefix("line ")
        && let Some((_, after)) = rest.split_once(": ")
    {
        m = after;
    }
    let m = m.split(", set DuplicateKeyPolicy").next().unwrap_or(m);
    m.replace("duplicate mapping key: ", "given twice: ")
}

/// First-fit blocks of consecutive free host numbers on one segment, in
/// time linear in what it passes over: blocks are only ever taken, so gaps
/// only shrink and the first gap that holds `n` never moves left; each
/// block size resumes its search where the last one of that size ended.
struct FirstFit {
    taken: BTreeSet<u32>,
    hosts: u32,
    resume: HashMap<u32, u32>,
}

impl FirstFit {
    fn new(taken: BTreeSet<u32>, hosts: u32) -> FirstFit {
        FirstFit { taken, hosts, resume: HashMap::new() }
    }

    /// The first host number of the lowest free block of `n`, now taken.
    fn take(&mut self, n: u32) -> Option<u32> {
        let mut start = self.resume.get(&n).copied().unwrap_or(0);
        for &t in self.taken.range(start..) {
            if u64::from(t) >= u64::from(start) + u64::from(n) {
                break;
            }
            start = t + 1;
        }
        if u64::from(start) + u64::from(n) > u64::from(self.hosts) {
            self.resume.insert(n, start);
            return None;
        }
        self.taken.extend(start..start + n);
        self.resume.insert(n, start + n);
        Some(start)
    }
}

fn instance_index(subnet: Subnet, a: Ipv4Addr) -> u32 {
    u32::from(a) - u32::from(subnet.network) - 1
}

fn replica(name: &Name, i: u64) -> Result<Name, String> {
    format!("{name}-{i}")
        .parse()
        .map_err(|_| format!("instance {name}: replica names such as {name}-{i} are longer than {} characters", Name::MAX))
}

/// Checks an image URL: `http://host[:port]/path`, at most 2048 bytes,
/// printable, carrying no credentials (no `user:password@`, no query
/// string, no fragment): what a lab names is stored and shown as it is,
/// so it must hold nothing secret.
pub fn check_url(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("http://") else { return Err(format!("{url:?} is not an http:// URL")) };
    if url.len() > 2048 || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err("a URL of at most 2048 printable characters without spaces".into());
    }
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || host.contains('@') {
        return Err(format!("{url:?} names no host (or carries credentials)"));
    }
    if rest.contains('?') || rest.contains('#') {
        return Err("an image URL has no query string or fragment (they may carry credentials, and labs are stored as written)".into());
    }
    if rest.split_once('/').is_none_or(|(_, p)| p.is_empty()) {
        return Err(format!("{url:?} names no file"));
    }
    Ok(())
}

/// Whether `name` has the shape of a name the agents derive for what they
/// make (`bc`, `bx`, `bd`, `bv` or `bp` and hex digits): a lab may not
/// give its bridge such a name, so no lab's bridge is another's derived one.
pub fn is_derived_shape(name: &str) -> bool {
    let b = name.as_bytes();
    b.len() > 2 && b[0] == b'b' && matches!(b[1], b'c' | b'x' | b'd' | b'v' | b'p') && b[2..].iter().all(u8::is_ascii_hexdigit)
}

#[cfg(test)]
mod tests;
