//! Checking a lab as written, one concern at a time: its segments, each
//! instance's fields, its replicas' names; addresses are [`super::addresses`]'s.
//! Each refusal names the line of the value at fault.

use std::collections::{HashMap, HashSet};

use serde_saphyr::Spanned;

use super::addresses::Addresses;
use super::raw::{RawContent, RawInstance, RawLab, RawSegment, at, err, name_at, parse_memory};
use super::{Delivery, InstanceDef, Lab, LabError, MAX_INSTANCES, MAX_SEGMENTS, Segment, Subnet};
use crate::{InterfaceName, Kind, Name};

/// Default VM memory.
const VM_MEMORY: u64 = 512 << 20;
/// Default container memory.
const CONTAINER_MEMORY: u64 = 64 << 20;
/// The most virtual CPUs an instance may ask for.
const MAX_CPUS: u64 = 64;
/// The most memory an instance may ask for.
const MAX_MEMORY: u64 = 1 << 40;

/// The whole lab: segments, then instances in file order (each checked,
/// its replicas named, its explicit addresses taken), then the addresses
/// of those given none.
pub(super) fn lab(raw: RawLab, attached: &super::Attached) -> Result<Lab, LabError> {
    let name = name_at(&raw.name, "lab name")?;
    let segments = segments(raw.segments.as_ref())?;
    let mut addresses = Addresses::new(&segments);
    let mut names = Replicas::default();
    let mut instances = Vec::new();
    for (key, def) in &raw.instances.value.0 {
        let merged = raw.defaults.as_ref().map(|d| def.with_defaults(&d.value));
        let def = merged.as_ref().unwrap_or(def);
        let mut d = instance(key, def, attached)?;
        names.add(&d, at(key), def.count.as_ref().map_or(at(key), at))?;
        d.segments = addresses.attach(instances.len(), &d, def.segments.as_ref())?;
        d.routes = routes(&d, def.routes.as_ref(), &segments)?;
        instances.push(d);
    }
    if instances.is_empty() {
        return Err(err(at(&raw.instances), "the lab has no instances"));
    }
    addresses.give(&mut instances)?;
    let named =
        |k: &str| raw.instances.value.0.iter().map(|(_, d)| d).chain(raw.defaults.as_ref().map(|d| &d.value)).any(|d| names_from(d, k));
    if let Some(extra) = attached.keys().find(|k| !named(k)) {
        return Err(err(None, format!("file {extra:?} was sent with the lab, but no from: names it")));
    }
    Ok(Lab { name, segments, instances })
}

/// The segments: named once each, with a subnet, and a bridge name of the
/// lab's own if it gives one.
fn segments(raw: Option<&Spanned<super::raw::Entries<RawSegment>>>) -> Result<Vec<Segment>, LabError> {
    let mut segments: Vec<Segment> = Vec::new();
    let mut bridges = HashSet::new();
    let Some(segs) = raw else { return Ok(segments) };
    if segs.value.0.len() > MAX_SEGMENTS {
        return Err(err(at(segs), format!("at most {MAX_SEGMENTS} segments")));
    }
    for (key, seg) in &segs.value.0 {
        let seg_name = name_at(key, "segment name")?;
        if segments.iter().any(|s| s.name == seg_name) {
            return Err(err(at(key), format!("segment {seg_name} is defined twice")));
        }
        let Some(subnet) = &seg.subnet else {
            return Err(err(at(key), format!("segment {seg_name} has no subnet (e.g. subnet: 10.20.0.0/24)")));
        };
        let parsed: Subnet = subnet.value.parse().map_err(|e| err(at(subnet), format!("segment {seg_name}: {e}")))?;
        let bridge = match &seg.bridge {
            None => None,
            Some(b) => {
                let n = bridge(b, &seg_name)?;
                if !bridges.insert(n.clone()) {
                    return Err(err(at(b), format!("bridge {n} is used by two segments")));
                }
                Some(n)
            }
        };
        let gateway = match &seg.gateway {
            None => None,
            Some(g) => {
                let a: std::net::Ipv4Addr =
                    g.value.parse().map_err(|_| err(at(g), format!("segment {seg_name}: gateway {:?} is not an IPv4 address", g.value)))?;
                let index = u32::from(a).wrapping_sub(u32::from(parsed.network)).wrapping_sub(1);
                if !parsed.holds(a) || index >= parsed.instance_hosts() {
                    return Err(err(
                        at(g),
                        format!(
                            "segment {seg_name}: gateway {a} is not a host of {parsed} below the nodes' last {} addresses",
                            super::NODE_ADDRESSES
                        ),
                    ));
                }
                Some(a)
            }
        };
        segments.push(Segment { name: seg_name, subnet: parsed, bridge, gateway });
    }
    Ok(segments)
}

/// An instance's routes: each destination a network (0.0.0.0/0 the
/// default), through an address of one of its segments' subnets.
fn routes(
    def: &InstanceDef,
    raw: Option<&Spanned<Vec<super::raw::RawRoute>>>,
    segments: &[Segment],
) -> Result<Vec<(super::Route, std::net::Ipv4Addr)>, LabError> {
    let name = &def.name;
    let Some(r) = raw else { return Ok(Vec::new()) };
    if r.value.len() > 32 {
        return Err(err(at(r), format!("instance {name}: at most 32 routes")));
    }
    let mut out = Vec::new();
    for route in &r.value {
        let to: super::Route = route.to.value.parse().map_err(|e| err(at(&route.to), format!("instance {name}: route to {e}")))?;
        let via: std::net::Ipv4Addr = route
            .via
            .value
            .parse()
            .map_err(|_| err(at(&route.via), format!("instance {name}: via {:?} is not an IPv4 address", route.via.value)))?;
        let on = def.segments.iter().filter_map(|(s, _)| segments.iter().find(|x| x.name == *s)).any(|s| s.subnet.holds(via));
        if !on {
            return Err(err(at(&route.via), format!("instance {name}: via {via} is on none of its segments")));
        }
        out.push((to, via));
    }
    Ok(out)
}

/// A bridge name the lab gives: an interface name, not of the shape of
/// the names bootcache gives its own.
fn bridge(b: &Spanned<String>, seg_name: &Name) -> Result<InterfaceName, LabError> {
    let n: InterfaceName = b.value.parse().map_err(|e: crate::BadName| err(at(b), format!("segment {seg_name} bridge: {e}")))?;
    if is_derived_shape(n.as_str()) {
        return Err(err(
            at(b),
            format!("segment {seg_name} bridge: {n} has the shape of the names bootcache gives (b, a letter of c x d v p, hex digits)"),
        ));
    }
    Ok(n)
}

/// One instance definition's fields (its segments are attached apart).
fn instance(key: &Spanned<String>, def: &RawInstance, attached: &super::Attached) -> Result<InstanceDef, LabError> {
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
    let count = bounded(def.count.as_ref(), 1, MAX_INSTANCES, |c| format!("instance {name}: count must be 1 to {c}"))?;
    let cpus = bounded(def.cpus.as_ref(), 1, MAX_CPUS, |c| format!("instance {name}: cpus must be 1 to {c}"))?;
    let memory_bytes = match &def.memory {
        None if kind == Kind::Vm => VM_MEMORY,
        None => CONTAINER_MEMORY,
        Some(m) => match parse_memory(&m.value.0) {
            Some(b) if (1 << 20..=MAX_MEMORY).contains(&b) => b,
            _ => {
                return Err(err(at(m), format!("instance {name}: memory {:?} is not a size from 1MiB to 1TiB (e.g. 512MiB)", m.value.0)));
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
        Some(c) if !argv_ok(&c.value) => {
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
    // An http:// URL, or a registry reference for a container or a VM
    // delivered lazily.
    if crate::reference::Reference::looks_like(&image.value) {
        if kind == Kind::Vm && delivery != Delivery::Lazy {
            return Err(err(
                at(image),
                format!(
                    "instance {name} image: a registry reference is for VM images delivered lazily (a full disk's image is an http:// URL)"
                ),
            ));
        }
        image.value.parse::<crate::reference::Reference>().map_err(|e| err(at(image), format!("instance {name} image: {e}")))?;
    } else {
        check_url(&image.value).map_err(|e| err(at(image), format!("instance {name} image: {e}")))?;
    }
    let cloud_init = match &def.cloud_init {
        None => None,
        Some(c) if kind == Kind::Container => {
            return Err(err(at(c), format!("instance {name}: cloud-init is for VMs (a container takes env, files and command)")));
        }
        Some(c) if !c.value.is_object() => {
            return Err(err(at(c), format!("instance {name}: cloud-init is user-data as a map (users:, write_files:, runcmd: ...)")));
        }
        Some(c) => {
            let bytes = serde_json::to_vec(&c.value).map(|v| v.len()).unwrap_or(usize::MAX);
            if bytes > super::MAX_CLOUD_INIT_BYTES {
                return Err(err(at(c), format!("instance {name}: cloud-init is {bytes} bytes, more than {}", super::MAX_CLOUD_INIT_BYTES)));
            }
            Some(c.value.clone())
        }
    };
    let container_only = |what: &str, line: Option<u32>| -> Result<(), LabError> {
        if kind == Kind::Vm {
            return Err(err(line, format!("instance {name}: {what} is for containers (a VM is configured by cloud-init)")));
        }
        Ok(())
    };
    let mut env = std::collections::BTreeMap::new();
    if let Some(e) = &def.env {
        container_only("env", at(e))?;
        if e.value.0.len() > 256 {
            return Err(err(at(e), format!("instance {name}: at most 256 environment variables")));
        }
        for (k, v) in &e.value.0 {
            let ok = k.value.bytes().next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && k.value.len() <= 256
                && k.value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(err(
                    at(k),
                    format!("instance {name}: {:?} is not an environment variable's name (letters, digits, _)", k.value),
                ));
            }
            if v.value.0.len() > 4096 || v.value.0.contains('\0') {
                return Err(err(at(v), format!("instance {name}: {} is more than 4096 bytes or holds a NUL", k.value)));
            }
            env.insert(k.value.clone(), v.value.0.clone());
        }
    }
    let mut files = std::collections::BTreeMap::new();
    if let Some(f) = &def.files {
        container_only("files", at(f))?;
        if f.value.0.len() > 64 {
            return Err(err(at(f), format!("instance {name}: at most 64 files")));
        }
        for (path, content) in &f.value.0 {
            check_path(&path.value).map_err(|why| err(at(path), format!("instance {name}: file {:?}: {why}", path.value)))?;
            let text = match &content.value {
                RawContent::Inline(text) => text,
                RawContent::From(from) => {
                    check_from(from)
                        .map_err(|why| err(at(content), format!("instance {name}: file {}: from: {from:?}: {why}", path.value)))?;
                    attached.get(from).ok_or_else(|| {
                        err(
                            at(content),
                            format!(
                                "instance {name}: file {} is from {from:?}, which was not sent with the lab (`bootcache deploy` sends what from: names, from beside the lab file)",
                                path.value
                            ),
                        )
                    })?
                }
            };
            if text.len() > super::MAX_FILE_CONTENT {
                return Err(err(
                    at(content),
                    format!("instance {name}: file {} is more than {} bytes", path.value, super::MAX_FILE_CONTENT),
                ));
            }
            files.insert(path.value.clone(), text.clone());
        }
    }
    let exec = match &def.exec {
        None => Vec::new(),
        Some(x) => {
            container_only("exec", at(x))?;
            if x.value.len() > 16 || x.value.iter().any(|c| !argv_ok(c)) {
                return Err(err(
                    at(x),
                    format!("instance {name}: exec is at most 16 commands, each 1 to 64 arguments of at most 4096 bytes"),
                ));
            }
            x.value.clone()
        }
    };
    let hostname = match &def.hostname {
        None => None,
        Some(h) => {
            container_only("hostname", at(h))?;
            Some(name_at(h, "hostname")?)
        }
    };
    let mut sysctls = std::collections::BTreeMap::new();
    if let Some(sc) = &def.sysctls {
        container_only("sysctls", at(sc))?;
        if sc.value.0.len() > 64 {
            return Err(err(at(sc), format!("instance {name}: at most 64 sysctls")));
        }
        for (k, v) in &sc.value.0 {
            let ok = !k.value.is_empty()
                && k.value.len() <= 128
                && k.value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
            if !ok {
                return Err(err(at(k), format!("instance {name}: {:?} is not a sysctl (e.g. net.ipv4.ip_forward)", k.value)));
            }
            if v.value.0.len() > 256 || v.value.0.chars().any(char::is_control) {
                return Err(err(at(v), format!("instance {name}: sysctl {} takes at most 256 printable characters", k.value)));
            }
            sysctls.insert(k.value.clone(), v.value.0.clone());
        }
    }
    let ready_command = match &def.ready_command {
        None => None,
        Some(_) if ready.is_some() => {
            return Err(err(line, format!("instance {name}: ready or ready-command, not both")));
        }
        Some(c) => {
            container_only("ready-command", at(c))?;
            if !argv_ok(&c.value) {
                return Err(err(at(c), format!("instance {name}: ready-command must be 1 to 64 arguments of at most 4096 bytes")));
            }
            Some(c.value.clone())
        }
    };
    let firmware = match &def.firmware {
        None => super::Firmware::Bios,
        Some(f) if kind == Kind::Container => {
            return Err(err(at(f), format!("instance {name}: firmware is for VMs")));
        }
        Some(f) => match f.value.as_str() {
            "bios" => super::Firmware::Bios,
            "uefi" => {
                if memory_bytes < super::UEFI_MIN_MEMORY {
                    let l = def.memory.as_ref().map_or(at(f), at);
                    return Err(err(l, format!("instance {name}: firmware: uefi needs at least 256MiB of memory (OVMF)")));
                }
                super::Firmware::Uefi
            }
            other => return Err(err(at(f), format!("instance {name}: unknown firmware {other:?} (bios or uefi)"))),
        },
    };
    Ok(InstanceDef {
        routes: Vec::new(),
        firmware,
        cloud_init,
        env,
        files,
        exec,
        hostname,
        sysctls,
        ready_command,
        name,
        kind,
        image: image.value.clone(),
        count: u32::try_from(count).unwrap_or(u32::MAX),
        cpus: u32::try_from(cpus).unwrap_or(1),
        memory_bytes,
        segments: Vec::new(),
        node,
        ready,
        command,
        delivery,
    })
}

/// An argument vector: 1 to 64 arguments of at most 4096 bytes, no NUL.
fn argv_ok(argv: &[String]) -> bool {
    !argv.is_empty() && argv.len() <= 64 && argv.iter().all(|a| a.len() <= 4096 && !a.contains('\0'))
}

/// A path inside an instance: absolute, no `.` or `..` component, no NUL,
/// at most 1024 bytes.
fn check_path(p: &str) -> Result<(), &'static str> {
    if !p.starts_with('/') || p.len() > 1024 || p.contains('\0') {
        return Err("an absolute path of at most 1024 bytes");
    }
    if p.split('/').skip(1).any(|c| c.is_empty() || c == "." || c == "..") {
        return Err("a path without empty, . or .. components");
    }
    Ok(())
}

/// A file named by `from:`: a relative path below the lab file's folder
/// (no `.`, `..` or empty component, no NUL), at most 1024 bytes.
pub(super) fn check_from(p: &str) -> Result<(), &'static str> {
    if p.is_empty() || p.starts_with('/') || p.len() > 1024 || p.contains('\0') || p.contains('\\') {
        return Err("a relative path below the lab file's folder, of at most 1024 bytes");
    }
    if p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err("a path without empty, . or .. components");
    }
    Ok(())
}

/// Whether `def` takes a file from `from`.
fn names_from(def: &RawInstance, from: &str) -> bool {
    def.files.as_ref().is_some_and(|f| f.value.0.iter().any(|(_, c)| matches!(&c.value, RawContent::From(n) if n == from)))
}

/// A number from 1 to `max` (`default` when not given).
fn bounded(v: Option<&Spanned<u64>>, default: u64, max: u64, msg: impl Fn(u64) -> String) -> Result<u64, LabError> {
    match v {
        None => Ok(default),
        Some(c) if c.value == 0 || c.value > max => Err(err(at(c), msg(max))),
        Some(c) => Ok(c.value),
    }
}

/// The instances' names, replicas expanded: each once, and no more than a
/// lab may have.
#[derive(Default)]
struct Replicas {
    names: HashMap<Name, Option<u32>>,
    total: u64,
}

impl Replicas {
    fn add(&mut self, def: &InstanceDef, line: Option<u32>, count_line: Option<u32>) -> Result<(), LabError> {
        let count = u64::from(def.count);
        self.total += count;
        if self.total > MAX_INSTANCES {
            return Err(err(count_line, format!("the lab has more than {MAX_INSTANCES} instances")));
        }
        for i in 1..=count {
            let n = if count == 1 { def.name.clone() } else { replica(&def.name, i).map_err(|e| err(line, e))? };
            if let Some(prev) = self.names.insert(n.clone(), line) {
                let first = prev.map_or(String::new(), |l| format!(" (line {l})"));
                return Err(err(line, format!("instance name {n} is used twice{first}")));
            }
        }
        Ok(())
    }
}

pub(super) fn replica(name: &Name, i: u64) -> Result<Name, String> {
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
