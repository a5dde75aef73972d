//! Deploying labs: recording what a lab wants, placing its instances on
//! nodes, answering each agent's heartbeat with its orders, and moving
//! instances through their states as agents report them.
//!
//! Everything is recomputed from the database on every call, so a restarted
//! control node carries on where it stopped: an agent's next heartbeat gets
//! the same orders and reports where its instances stand.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;

use bootcache_api::agent::{self, Dhcp, Heartbeat, ImageOrder, Nic, Observed, Order, Orders, SegmentOrder, names};
use bootcache_api::{InstanceState, Kind, Lab, Name, RootDigest};

use crate::api::{Control, now_ms};
use crate::db::{Db, DbError, InstanceRow, InstanceSpec, NodeRow};
use crate::plan::{self, Capacity, Source, Want};

/// Why a lab could not be deployed.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeployError {
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A VM image's header could not be read from its store.
    #[error("instance {instance}: image {url}: {why}")]
    Image {
        /// The definition.
        instance: Name,
        /// Its image (redacted).
        url: String,
        /// Why.
        why: String,
    },
}

/// States an instance in these is counted against its node's capacity.
fn holds_capacity(s: InstanceState) -> bool {
    matches!(s, InstanceState::Placed | InstanceState::Fetching | InstanceState::Starting | InstanceState::Ready | InstanceState::Stopped)
}

impl Control {
    /// Deploys `lab`: reads its VM images' headers, records it and its
    /// instances (a second deploy of the same lab converges: instances it
    /// still has keep their state, those it dropped are removed) and places
    /// what is pending. Returns the lab's instances.
    ///
    /// # Errors
    /// An image that cannot be read, the database.
    pub async fn deploy(&self, lab: &Lab) -> Result<Vec<InstanceRow>, DeployError> {
        // Headers first, holding nothing (a slow store delays this call only).
        let mut roots: HashMap<String, RootDigest> = HashMap::new();
        for def in lab.instances.iter().filter(|d| d.kind == Kind::Vm) {
            if roots.contains_key(&def.image) {
                continue;
            }
            let header = bootcache_delivery::cache::read_header(&def.image, self.retry).await.map_err(|e| DeployError::Image {
                instance: def.name.clone(),
                url: bootcache_delivery::remote::redact(&def.image),
                why: bootcache_delivery::node::chain(&e),
            })?;
            let root = header.root();
            self.db().register_image(&root, &def.image, header.virtual_size, header.boot.end - header.boot.start, now_ms())?;
            roots.insert(def.image.clone(), root);
        }
        let now = now_ms();
        {
            let db = self.db();
            db.put_lab(lab, now)?;
            let instances = lab.instances();
            for inst in &instances {
                let Some(def) = lab.def(&inst.def) else { continue };
                let image = match def.kind {
                    Kind::Vm => roots[&def.image],
                    Kind::Container => agent::container_image_key(&def.image),
                };
                let spec = InstanceSpec {
                    lab: lab.name.clone(),
                    name: inst.name.clone(),
                    kind: def.kind,
                    image,
                    cores: def.cpus,
                    memory_bytes: def.memory_bytes,
                };
                db.want_instance(&spec, now)?;
            }
            let keep: Vec<Name> = instances.into_iter().map(|i| i.name).collect();
            db.forget_instances_except(&lab.name, &keep)?;
        }
        self.schedule()?;
        Ok(self.db().instances(&lab.name)?)
    }

    /// Places every pending instance of every lab on the up nodes with room
    /// (cache-aware); those that fit nowhere stay pending with the reason.
    ///
    /// # Errors
    /// The database.
    pub fn schedule(&self) -> Result<(), DbError> {
        let now = now_ms();
        let db = self.db();
        let nodes: Vec<NodeRow> = db.nodes(now, self.heartbeat)?.into_iter().filter(|n| n.up && n.last.is_some()).collect();
        let labs = db.labs()?;
        let mut rows = Vec::new();
        for lab in &labs {
            rows.extend(db.instances(&lab.name)?);
        }
        let pending: Vec<&InstanceRow> = rows.iter().filter(|r| r.state == InstanceState::Pending).collect();
        if pending.is_empty() || nodes.is_empty() {
            return Ok(());
        }
        let capacities: Vec<Capacity> = nodes
            .iter()
            .map(|n| {
                let last = n.last.as_ref();
                let used = rows.iter().filter(|r| r.node.as_ref() == Some(&n.name) && holds_capacity(r.state));
                let (cores, memory) = used.fold((0u64, 0u64), |(c, m), r| (c + u64::from(r.spec.cores), m + r.spec.memory_bytes));
                let total_cores = u64::from(last.map_or(0, |l| l.cores)) * u64::from(self.cpu_overcommit);
                Capacity {
                    node: n.name.clone(),
                    cores: u32::try_from(total_cores.saturating_sub(cores)).unwrap_or(u32::MAX),
                    memory_bytes: last.map_or(0, |l| l.memory_bytes).saturating_sub(memory),
                    caches: last.map(|l| l.caches.iter().map(|(r, _)| *r).collect()).unwrap_or_default(),
                }
            })
            .collect();
        // The node each instance is pinned to, by lab and name.
        let mut pins: HashMap<(Name, Name), Name> = HashMap::new();
        for lab in &labs {
            for i in lab.instances() {
                if let Some(node) = lab.def(&i.def).and_then(|d| d.node.clone()) {
                    pins.insert((lab.name.clone(), i.name), node);
                }
            }
        }
        // Per lab, so that instance names (unique within a lab) identify.
        let mut capacities = capacities;
        for lab in &labs {
            let wants: Vec<Want> = pending
                .iter()
                .filter(|r| r.spec.lab == lab.name)
                .map(|r| Want {
                    instance: r.spec.name.clone(),
                    image: r.spec.image,
                    cores: r.spec.cores,
                    memory_bytes: r.spec.memory_bytes,
                    pin: pins.get(&(lab.name.clone(), r.spec.name.clone())).cloned(),
                })
                .collect();
            for placed in plan::place(&wants, &capacities, self.policy) {
                match placed {
                    Ok((instance, node)) => {
                        db.set_state(&lab.name, &instance, InstanceState::Placed, Some(&node), None, now)?;
                        if let (Some(c), Some(w)) =
                            (capacities.iter_mut().find(|c| c.node == node), wants.iter().find(|w| w.instance == instance))
                        {
                            c.cores = c.cores.saturating_sub(w.cores);
                            c.memory_bytes = c.memory_bytes.saturating_sub(w.memory_bytes);
                            c.caches.insert(w.image);
                        }
                    }
                    Err(unplaced) => tracing::info!(lab = %lab.name, instance = %unplaced.instance, why = %unplaced.why, "not placed yet"),
                }
            }
        }
        Ok(())
    }

    /// Takes a node's heartbeat: records it and what its instances do,
    /// places what waits, and answers with the node's orders.
    ///
    /// # Errors
    /// A node that never registered, the database.
    pub fn heartbeat(&self, node: &Name, beat: &Heartbeat) -> Result<Orders, DbError> {
        let now = now_ms();
        {
            let db = self.db();
            db.heartbeat(node, beat, now)?;
            db.observe(node, &beat.instances)?;
            for seen in &beat.instances {
                advance(&db, node, seen, now)?;
            }
        }
        self.schedule()?;
        self.orders(node)
    }

    /// What `node` should run now: its placed instances, each VM's image
    /// with the sources the control node chose for it, and the segments
    /// they are on.
    ///
    /// # Errors
    /// The database.
    pub fn orders(&self, node: &Name) -> Result<Orders, DbError> {
        let now = now_ms();
        let db = self.db();
        let nodes: Vec<NodeRow> = db.nodes(now, self.heartbeat)?;
        let address = |n: &Name| nodes.iter().find(|r| r.name == *n).map(|r| r.address.clone());
        let ip = |n: &Name| {
            address(n).and_then(|a| a.parse::<std::net::SocketAddr>().ok()).and_then(|a| match a.ip() {
                std::net::IpAddr::V4(v4) => Some(v4),
                std::net::IpAddr::V6(_) => None,
            })
        };
        let up: HashSet<&Name> = nodes.iter().filter(|n| n.up).map(|n| &n.name).collect();
        let mut orders = Orders::default();
        for lab in db.labs()? {
            let rows = db.instances(&lab.name)?;
            let on_node = |r: &InstanceRow| r.node.is_some() && r.state != InstanceState::Pending && r.state != InstanceState::Lost;
            let expanded: HashMap<Name, bootcache_api::lab::Instance> = lab.instances().into_iter().map(|i| (i.name.clone(), i)).collect();
            // Segment -> nodes with instances on it, and nodes with VMs on it.
            let mut seg_nodes: BTreeMap<Name, BTreeSet<Name>> = BTreeMap::new();
            let mut seg_vm_nodes: BTreeMap<Name, BTreeSet<Name>> = BTreeMap::new();
            for r in rows.iter().filter(|r| on_node(r)) {
                let (Some(n), Some(inst)) = (&r.node, expanded.get(&r.spec.name)) else { continue };
                for (seg, _) in &inst.addresses {
                    seg_nodes.entry(seg.clone()).or_default().insert(n.clone());
                    if r.spec.kind == Kind::Vm {
                        seg_vm_nodes.entry(seg.clone()).or_default().insert(n.clone());
                    }
                }
            }
            let mut dhcp_hosts: BTreeMap<Name, Vec<(agent::Mac, Ipv4Addr)>> = BTreeMap::new();
            for r in rows.iter().filter(|r| on_node(r) && r.node.as_ref() == Some(node)) {
                let (Some(inst), Some(def)) = (expanded.get(&r.spec.name), lab.def(&expanded[&r.spec.name].def)) else { continue };
                let image = match def.kind {
                    Kind::Container => ImageOrder::Container { url: def.image.clone() },
                    Kind::Vm => {
                        let Some(peers) = self.vm_sources(&db, &r.spec.image, node, &up, &address)? else {
                            // Its source has not opened the image yet: next heartbeat.
                            continue;
                        };
                        ImageOrder::Vm { url: def.image.clone(), root: r.spec.image, peers }
                    }
                };
                let mut nics = Vec::new();
                for (i, (seg, addr)) in inst.addresses.iter().enumerate() {
                    let Some(segment) = lab.segment(seg) else { continue };
                    let mac = names::mac(&lab.name, &r.spec.name, i);
                    let bridge = segment.bridge.clone().unwrap_or_else(|| names::bridge(&lab.name, seg));
                    if def.kind == Kind::Vm {
                        dhcp_hosts.entry(seg.clone()).or_default().push((mac, *addr));
                    }
                    nics.push(Nic { bridge, mac, address: *addr, prefix: segment.subnet.prefix });
                }
                orders.instances.push(Order {
                    lab: lab.name.clone(),
                    name: r.spec.name.clone(),
                    kind: def.kind,
                    image,
                    cpus: def.cpus,
                    memory_bytes: def.memory_bytes,
                    nics,
                    ready: def.ready.clone(),
                    command: def.command.clone(),
                    running: r.running,
                });
            }
            for (seg, on) in &seg_nodes {
                if !on.contains(node) {
                    continue;
                }
                let Some(segment) = lab.segment(seg) else { continue };
                let remotes = on.iter().filter(|n| *n != node && up.contains(n)).filter_map(ip).collect();
                let dhcp = dhcp_hosts.remove(seg).map(|hosts| {
                    let k = seg_vm_nodes.get(seg).and_then(|s| s.iter().position(|n| n == node)).unwrap_or(0);
                    Dhcp {
                        server: segment.subnet.node_address(u32::try_from(k).unwrap_or(0)).unwrap_or(Ipv4Addr::UNSPECIFIED),
                        prefix: segment.subnet.prefix,
                        hosts,
                    }
                });
                orders.segments.push(SegmentOrder {
                    lab: lab.name.clone(),
                    segment: seg.clone(),
                    bridge: segment.bridge.clone().unwrap_or_else(|| names::bridge(&lab.name, seg)),
                    vxlan: names::vxlan(&lab.name, seg),
                    vni: names::vni(&lab.name, seg),
                    remotes,
                    dhcp,
                });
            }
        }
        Ok(orders)
    }

    /// The peers `node` fetches VM image `root` from (empty: the store), or
    /// `None` while the peer chosen has not opened it yet.
    fn vm_sources(
        &self,
        db: &Db,
        root: &RootDigest,
        node: &Name,
        up: &HashSet<&Name>,
        address: &dyn Fn(&Name) -> Option<String>,
    ) -> Result<Option<Vec<String>>, DbError> {
        let holders: Vec<Name> = db.holders(root)?.into_iter().map(|(n, _)| n).filter(|n| up.contains(n)).collect();
        if holders.contains(node) {
            return Ok(Some(Vec::new()));
        }
        // Every node with a VM of this image (any lab) that does not hold
        // it yet fetches it, in name order.
        let mut fetchers = BTreeSet::new();
        for lab in db.labs()? {
            for r in db.instances(&lab.name)? {
                if r.spec.kind == Kind::Vm
                    && r.spec.image == *root
                    && holds_capacity(r.state)
                    && let Some(n) = r.node.filter(|n| !holders.contains(n) && up.contains(n))
                {
                    fetchers.insert(n);
                }
            }
        }
        fetchers.insert(node.clone());
        let fetchers: Vec<Name> = fetchers.into_iter().collect();
        let plan = plan::sources(&fetchers, &holders, self.fan_out);
        match plan.into_iter().find(|(f, _)| f == node).map(|(_, s)| s) {
            Some(Source::Node(peer)) if holders.contains(&peer) => {
                Ok(Some(address(&peer).map(|a| format!("http://{a}")).into_iter().collect()))
            }
            Some(Source::Node(_)) => Ok(None),
            _ => Ok(Some(Vec::new())),
        }
    }

    /// Forgets `lab`: agents remove what they run of it on their next
    /// heartbeat. Whether it was there.
    ///
    /// # Errors
    /// The database.
    pub fn destroy(&self, lab: &Name) -> Result<bool, DbError> {
        self.db().delete_lab(lab)
    }
}

/// Moves an instance toward the state its node reports, through the
/// states between (a node may report `ready` for one still `placed`).
fn advance(db: &Db, node: &Name, seen: &Observed, now: i64) -> Result<(), DbError> {
    use InstanceState::*;
    let Some(row) = db.instances(&seen.lab)?.into_iter().find(|r| r.spec.name == seen.name) else { return Ok(()) };
    if row.node.as_ref() != Some(node) || row.state == seen.state {
        return Ok(());
    }
    let path = [Placed, Fetching, Starting, Ready];
    let mut cur = row.state;
    for _ in 0..path.len() + 1 {
        if cur == seen.state {
            break;
        }
        let next = if cur.can_become(seen.state) {
            seen.state
        } else if let Some(n) = path
            .iter()
            .copied()
            .find(|s| cur.can_become(*s) && path.iter().position(|p| p == s) <= path.iter().position(|p| *p == seen.state))
        {
            n
        } else {
            return Ok(());
        };
        let reason = if next == Failed { seen.reason.as_deref() } else { None };
        db.set_state(&seen.lab, &seen.name, next, Some(node), reason, now)?;
        cur = next;
    }
    Ok(())
}
