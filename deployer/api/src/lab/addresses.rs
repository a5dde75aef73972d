//! Addresses: each attachment's own (checked in its subnet, below the
//! nodes' addresses, never twice), then, once every explicit one is known,
//! the lowest free block for each definition that gave none, in time linear
//! in what the lab holds.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;

use serde_saphyr::Spanned;

use super::raw::{RawAttach, at, err, name_at};
use super::{InstanceDef, LabError, NODE_ADDRESSES, Segment, Subnet};
use crate::Name;

/// What is known of a lab's addresses so far.
pub(super) struct Addresses<'a> {
    by_name: HashMap<&'a Name, &'a Segment>,
    /// Addresses taken on each segment, and where.
    taken: HashMap<Name, HashMap<Ipv4Addr, Option<u32>>>,
    /// Attachments without an address (definition, attachment, line), given
    /// one once every explicit address is known.
    unaddressed: Vec<(usize, usize, Option<u32>)>,
}

impl<'a> Addresses<'a> {
    pub(super) fn new(segments: &'a [Segment]) -> Addresses<'a> {
        Addresses { by_name: segments.iter().map(|s| (&s.name, s)).collect(), taken: HashMap::new(), unaddressed: Vec::new() }
    }

    /// Definition number `index`'s attachments as written: each segment
    /// once, each address its replicas' block, taken.
    pub(super) fn attach(
        &mut self,
        index: usize,
        def: &InstanceDef,
        raw: Option<&Spanned<RawAttach>>,
    ) -> Result<Vec<(Name, Ipv4Addr)>, LabError> {
        let name = &def.name;
        let count = u64::from(def.count);
        let mut attached: Vec<(Name, Ipv4Addr)> = Vec::new();
        let attach: Vec<(&Spanned<String>, Option<&Spanned<String>>)> = match raw {
            None => Vec::new(),
            Some(s) => match &s.value {
                RawAttach::Names(v) => v.iter().map(|n| (n, None)).collect(),
                RawAttach::Addresses(e) => e.0.iter().map(|(n, a)| (n, a.as_ref())).collect(),
            },
        };
        for (seg_key, address) in attach {
            let seg_name = name_at(seg_key, "segment")?;
            let Some(seg) = self.by_name.get(&seg_name).copied() else {
                return Err(err(at(seg_key), format!("instance {name}: no segment {seg_name} in this lab")));
            };
            if attached.iter().any(|(s, _)| *s == seg_name) {
                return Err(err(at(seg_key), format!("instance {name} is on segment {seg_name} twice")));
            }
            let used = self.taken.entry(seg_name.clone()).or_default();
            match address {
                None => {
                    self.unaddressed.push((index, attached.len(), at(seg_key)));
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
                                    "instance {name}: {count} replicas from {first} do not fit in {} (the last {NODE_ADDRESSES} host addresses are the nodes')",
                                    seg.subnet
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
        Ok(attached)
    }

    /// Attachments without an address get the lowest free block that
    /// holds all of the definition's replicas.
    pub(super) fn give(self, instances: &mut [InstanceDef]) -> Result<(), LabError> {
        let mut free: HashMap<Name, FirstFit> = HashMap::new();
        for (i, j, line) in self.unaddressed {
            let def = &instances[i];
            let seg = self.by_name[&def.segments[j].0];
            let fit = free.entry(seg.name.clone()).or_insert_with(|| {
                let used =
                    self.taken.get(&seg.name).map(|u| u.keys().map(|a| instance_index(seg.subnet, *a)).collect()).unwrap_or_default();
                FirstFit::new(used, seg.subnet.instance_hosts())
            });
            let count = def.count;
            let Some(start) = fit.take(count) else {
                return Err(err(line, format!("instance {}: segment {} has no room for {count} more addresses", def.name, seg.name)));
            };
            instances[i].segments[j].1 = seg.subnet.host(start).unwrap_or(Ipv4Addr::UNSPECIFIED);
        }
        Ok(())
    }
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
