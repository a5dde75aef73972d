//! Deploying labs: recording what a lab wants, placing its instances on
//! nodes, answering each agent's heartbeat with its orders, and moving
//! instances through their states as agents report them.
//!
//! Everything is recomputed from the database on every call, so a restarted
//! control node carries on where it stopped: an agent's next heartbeat gets
//! the same orders and reports where its instances stand.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use bootcache_api::agent::{self, Dhcp, Heartbeat, ImageOrder, Nic, Observed, Order, Orders, SegmentOrder, names};
use bootcache_api::lab::Delivery;
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

/// A lab as deployed, its replicas expanded once.
pub(crate) struct LabView {
    /// The lab.
    pub lab: Lab,
    /// Its instances by name.
    pub expanded: HashMap<Name, bootcache_api::lab::Instance>,
}

impl LabView {
    fn new(lab: Lab) -> LabView {
        let expanded = lab.instances().into_iter().map(|i| (i.name.clone(), i)).collect();
        LabView { lab, expanded }
    }

    /// The node `instance` is pinned to.
    fn pin(&self, instance: &Name) -> Option<Name> {
        self.expanded.get(instance).and_then(|i| self.lab.def(&i.def)).and_then(|d| d.node.clone())
    }
}

/// Where a lab's instances are, by segment and by VM image.
#[derive(Default)]
pub(crate) struct Members {
    seg_nodes: BTreeMap<Name, BTreeSet<Name>>,
    seg_vm_nodes: BTreeMap<Name, BTreeSet<Name>>,
    image_nodes: HashMap<RootDigest, BTreeSet<Name>>,
}

/// Whether an instance is on its node (placed and neither pending nor lost).
fn on_node(r: &InstanceRow) -> bool {
    r.node.is_some() && r.state != InstanceState::Pending && r.state != InstanceState::Lost
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
        for def in lab.instances.iter().filter(|d| d.kind == Kind::Vm && d.delivery == Delivery::Lazy) {
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
            let mut specs = Vec::with_capacity(instances.len());
            for inst in &instances {
                let Some(def) = lab.def(&inst.def) else { continue };
                let image = match (def.kind, def.delivery) {
                    (Kind::Vm, Delivery::Lazy) => roots[&def.image],
                    _ => agent::container_image_key(&def.image),
                };
                specs.push(InstanceSpec {
                    lab: lab.name.clone(),
                    name: inst.name.clone(),
                    kind: def.kind,
                    image,
                    cores: def.cpus,
                    memory_bytes: def.memory_bytes,
                });
            }
            db.want_instances(&specs, now)?;
            let keep: Vec<Name> = instances.into_iter().map(|i| i.name).collect();
            db.forget_instances_except(&lab.name, &keep)?;
        }
        self.views.lock().unwrap_or_else(|p| p.into_inner()).insert(lab.name.clone(), Arc::new(LabView::new(lab.clone())));
        self.changed();
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
        // Every heartbeat asks: cheap when nothing waits.
        if !db.any_pending()? {
            return Ok(());
        }
        let nodes: Vec<NodeRow> = db.nodes(now, self.heartbeat)?.into_iter().filter(|n| n.up && n.last.is_some()).collect();
        if nodes.is_empty() {
            return Ok(());
        }
        let rows = db.all_instances()?;
        let mut used: HashMap<&Name, (u64, u64)> = HashMap::new();
        for r in rows.iter().filter(|r| holds_capacity(r.state)) {
            if let Some(n) = &r.node {
                let u = used.entry(n).or_default();
                u.0 += u64::from(r.spec.cores);
                u.1 += r.spec.memory_bytes;
            }
        }
        let mut capacities: Vec<Capacity> = nodes
            .iter()
            .map(|n| {
                let last = n.last.as_ref();
                let (cores, memory) = used.get(&n.name).copied().unwrap_or_default();
                let total_cores = u64::from(last.map_or(0, |l| l.cores)) * u64::from(self.cpu_overcommit);
                Capacity {
                    node: n.name.clone(),
                    cores: u32::try_from(total_cores.saturating_sub(cores)).unwrap_or(u32::MAX),
                    memory_bytes: last.map_or(0, |l| l.memory_bytes).saturating_sub(memory),
                    caches: last.map(|l| l.caches.iter().map(|(r, _)| *r).collect()).unwrap_or_default(),
                }
            })
            .collect();
        // Per lab, so that instance names (unique within a lab) identify.
        let mut by_lab: BTreeMap<&Name, Vec<&InstanceRow>> = BTreeMap::new();
        for r in rows.iter().filter(|r| r.state == InstanceState::Pending) {
            by_lab.entry(&r.spec.lab).or_default().push(r);
        }
        let mut placed_any = false;
        for (lab, pending) in by_lab {
            let Some(view) = self.view(&db, lab)? else { continue };
            let wants: Vec<Want> = pending
                .iter()
                .map(|r| Want {
                    instance: r.spec.name.clone(),
                    image: r.spec.image,
                    cores: r.spec.cores,
                    memory_bytes: r.spec.memory_bytes,
                    pin: view.pin(&r.spec.name),
                })
                .collect();
            let results = plan::place(&wants, &capacities, self.policy);
            let mut moves = Vec::new();
            let mut waiting = Vec::new();
            for (w, placed) in wants.iter().zip(&results) {
                match placed {
                    Ok((_, node)) => {
                        if let Some(c) = capacities.iter_mut().find(|c| c.node == *node) {
                            c.cores = c.cores.saturating_sub(w.cores);
                            c.memory_bytes = c.memory_bytes.saturating_sub(w.memory_bytes);
                            c.caches.insert(w.image);
                        }
                        moves.push((lab, &w.instance, InstanceState::Placed, Some(node), None));
                    }
                    Err(unplaced) => waiting.push((lab, &w.instance, format!("waiting for room: {}", unplaced.why))),
                }
            }
            // Why the others wait, for inspect (pending stays pending).
            db.note_pending(&waiting)?;
            if !moves.is_empty() {
                db.set_states(&moves, now)?;
                placed_any = true;
                tracing::info!(%lab, placed = moves.len(), waiting = results.len() - moves.len(), "instances placed");
            }
        }
        if placed_any {
            self.changed();
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
            // Every state change the heartbeat brings, in one transaction.
            let mut steps = Vec::new();
            for seen in &beat.instances {
                advance(&db, node, seen, &mut steps)?;
            }
            let moves: Vec<_> = steps
                .iter()
                .map(|(seen, to)| {
                    (&seen.lab, &seen.name, *to, Some(node), if *to == InstanceState::Failed { seen.reason.as_deref() } else { None })
                })
                .collect();
            db.set_states(&moves, now)?;
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
        let mine: Vec<InstanceRow> = db.instances_on(node)?.into_iter().filter(on_node).collect();
        let mut orders = Orders::default();
        if mine.is_empty() {
            return Ok(orders);
        }
        let nodes = db.liveness(now, self.heartbeat)?;
        let address = |n: &Name| nodes.iter().find(|r| r.0 == *n).map(|r| r.1.clone());
        let ip = |n: &Name| {
            address(n).and_then(|a| a.parse::<std::net::SocketAddr>().ok()).and_then(|a| match a.ip() {
                std::net::IpAddr::V4(v4) => Some(v4),
                std::net::IpAddr::V6(_) => None,
            })
        };
        let up: HashSet<&Name> = nodes.iter().filter(|n| n.2).map(|n| &n.0).collect();
        let mut by_lab: BTreeMap<&Name, Vec<&InstanceRow>> = BTreeMap::new();
        for r in &mine {
            by_lab.entry(&r.spec.lab).or_default().push(r);
        }
        let mut sources: HashMap<RootDigest, Option<Vec<String>>> = HashMap::new();
        for (lab_name, rows) in by_lab {
            let Some(view) = self.view(&db, lab_name)? else { continue };
            let members = self.members(&db, &view)?;
            let lab = &view.lab;
            let mut dhcp_hosts: BTreeMap<Name, Vec<(agent::Mac, Ipv4Addr)>> = BTreeMap::new();
            for r in rows {
                let Some(inst) = view.expanded.get(&r.spec.name) else { continue };
                let Some(def) = lab.def(&inst.def) else { continue };
                // Where the node copies the image from (another node or the
                // store), or none yet: its source has not got it, next heartbeat.
                let mut from = |key: &RootDigest| -> Result<Option<Vec<String>>, DbError> {
                    if let Some(p) = sources.get(key) {
                        return Ok(p.clone());
                    }
                    let fetchers = members.image_nodes.get(key).cloned().unwrap_or_default();
                    let p = self.image_sources(&db, key, def.kind == Kind::Vm, node, fetchers, &up, &address)?;
                    sources.insert(*key, p.clone());
                    Ok(p)
                };
                let image = match def.kind {
                    Kind::Vm if def.delivery == Delivery::Full => ImageOrder::Disk { url: def.image.clone() },
                    Kind::Container => {
                        let Some(peers) = from(&r.spec.image)? else { continue };
                        ImageOrder::Container { url: def.image.clone(), peers }
                    }
                    Kind::Vm => {
                        let Some(peers) = from(&r.spec.image)? else { continue };
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
            for (seg, on) in &members.seg_nodes {
                if !on.contains(node) {
                    continue;
                }
                let Some(segment) = lab.segment(seg) else { continue };
                let remotes = on.iter().filter(|n| *n != node && up.contains(n)).filter_map(ip).collect();
                let dhcp = dhcp_hosts.remove(seg).map(|hosts| {
                    let k = members.seg_vm_nodes.get(seg).and_then(|s| s.iter().position(|n| n == node)).unwrap_or(0);
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

    /// The peers `node` fetches image `root` from (empty: the store), or
    /// `None` while the peer chosen does not hold it yet. A `relayed` image
    /// (a VM image) is passed on as it arrives, so a node is given its
    /// source at once, before the source has opened it (a source waits a
    /// moment for its own order when asked first); a tarball only once its
    /// source holds it whole. `fetchers`: the nodes with an instance of the
    /// image. A whole disk image (`delivery: full`) is not planned: the
    /// store.
    #[allow(clippy::too_many_arguments, reason = "one private call site")]
    fn image_sources(
        &self,
        db: &Db,
        root: &RootDigest,
        relayed: bool,
        node: &Name,
        mut fetchers: BTreeSet<Name>,
        up: &HashSet<&Name>,
        address: &dyn Fn(&Name) -> Option<String>,
    ) -> Result<Option<Vec<String>>, DbError> {
        let holders: Vec<Name> = db.holders(root)?.into_iter().map(|(n, _)| n).filter(|n| up.contains(n)).collect();
        if holders.contains(node) || !self.peers {
            return Ok(Some(Vec::new()));
        }
        // Those that do not hold it yet fetch it, in name order.
        fetchers.retain(|n| !holders.contains(n) && up.contains(n));
        fetchers.insert(node.clone());
        let fetchers: Vec<Name> = fetchers.into_iter().collect();
        // A tarball is passed on only once whole: a level of the tree costs
        // a heartbeat, so its tree is wide.
        let fan_out = match (self.fan_out, relayed) {
            (0, true) => plan::auto_fan_out(fetchers.len() + holders.len()),
            (0, false) => 4,
            (n, _) => n,
        };
        let plan = plan::sources(&fetchers, &holders, fan_out);
        match plan.into_iter().find(|(f, _)| f == node).map(|(_, s)| s) {
            Some(Source::Node(peer)) if relayed || holders.contains(&peer) => {
                Ok(Some(address(&peer).map(|a| format!("http://{a}")).into_iter().collect()))
            }
            Some(Source::Node(_)) => Ok(None),
            _ => Ok(Some(Vec::new())),
        }
    }

    /// The lab as deployed, with its replicas expanded (kept in memory until
    /// it is deployed again or destroyed).
    pub(crate) fn view(&self, db: &Db, lab: &Name) -> Result<Option<Arc<LabView>>, DbError> {
        if let Some(v) = self.views.lock().unwrap_or_else(|p| p.into_inner()).get(lab) {
            return Ok(Some(Arc::clone(v)));
        }
        let Some(spec) = db.lab(lab)? else { return Ok(None) };
        let view = Arc::new(LabView::new(spec));
        self.views.lock().unwrap_or_else(|p| p.into_inner()).insert(lab.clone(), Arc::clone(&view));
        Ok(Some(view))
    }

    /// Which nodes a lab's segments and VM images are on, recomputed only
    /// when placement changed ([`Control::changed`]).
    fn members(&self, db: &Db, view: &LabView) -> Result<Arc<Members>, DbError> {
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        if let Some((g, m)) = self.members.lock().unwrap_or_else(|p| p.into_inner()).get(&view.lab.name)
            && *g == generation
        {
            return Ok(Arc::clone(m));
        }
        let mut m = Members::default();
        for r in db.instances_brief(&view.lab.name)?.iter().filter(|r| on_node(r)) {
            let (Some(n), Some(inst)) = (&r.node, view.expanded.get(&r.spec.name)) else { continue };
            for (seg, _) in &inst.addresses {
                m.seg_nodes.entry(seg.clone()).or_default().insert(n.clone());
                if r.spec.kind == Kind::Vm {
                    m.seg_vm_nodes.entry(seg.clone()).or_default().insert(n.clone());
                }
            }
            if holds_capacity(r.state) {
                m.image_nodes.entry(r.spec.image).or_default().insert(n.clone());
            }
        }
        let m = Arc::new(m);
        self.members.lock().unwrap_or_else(|p| p.into_inner()).insert(view.lab.name.clone(), (generation, Arc::clone(&m)));
        Ok(m)
    }

    /// Placement changed (instances placed, lost, forgotten): what
    /// [`Control::members`] keeps is recomputed on next use.
    pub(crate) fn changed(&self) {
        self.generation.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Forgets `lab`: agents remove what they run of it on their next
    /// heartbeat. Whether it was there.
    ///
    /// # Errors
    /// The database.
    pub fn destroy(&self, lab: &Name) -> Result<bool, DbError> {
        let gone = self.db().delete_lab(lab)?;
        self.views.lock().unwrap_or_else(|p| p.into_inner()).remove(lab);
        self.changed();
        Ok(gone)
    }
}

/// The steps that move an instance toward the state its node reports,
/// through the states between (a node may report `ready` for one still
/// `placed`), added to `steps`.
fn advance<'a>(db: &Db, node: &Name, seen: &'a Observed, steps: &mut Vec<(&'a Observed, InstanceState)>) -> Result<(), DbError> {
    use InstanceState::*;
    let Some(row) = db.instance(&seen.lab, &seen.name)? else { return Ok(()) };
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
        steps.push((seen, next));
        cur = next;
    }
    Ok(())
}
