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

use bootcache_api::Image;
use bootcache_api::agent::{self, Dhcp, Heartbeat, Join, Joined, Nic, Observed, Order, Orders, SegmentOrder, names};
use bootcache_api::image::Blob;
use bootcache_api::lab::{Delivery, InstanceDef, LabSource};
use bootcache_api::reference::{Reference, Target};
use bootcache_api::{InstanceState, Kind, Lab, Name, RootDigest};

use crate::db::{Db, DbError, Deployed, ImageRecord, InstanceRow, InstanceSpec, NodeRow, SegmentRow};
use crate::plan::{self, Capacity, Source, Want};
use crate::state::{Control, locked, now_ms};

/// Why a lab could not be deployed.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeployError {
    /// The database failed, or refused the lab as it is.
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
    /// The lab was destroyed, or deployed again, while this deploy read its
    /// images: the later request stands, this one recorded nothing.
    #[error("lab {0} was destroyed or deployed again while this deploy read its images; nothing of this deploy was recorded")]
    Superseded(Name),
}

/// A lab as deployed, its replicas expanded and its segments numbered once.
pub(crate) struct LabView {
    /// The lab.
    pub lab: Lab,
    /// Its instances by name.
    pub expanded: HashMap<Name, bootcache_api::lab::Instance>,
    /// Its segments by name, with their numbers and bridges.
    pub segments: HashMap<Name, SegmentRow>,
}

impl LabView {
    fn new(lab: Lab, segments: Vec<SegmentRow>) -> LabView {
        let expanded = lab.instances().into_iter().map(|i| (i.name.clone(), i)).collect();
        let segments = segments.into_iter().map(|s| (s.name.clone(), s)).collect();
        LabView { lab, expanded, segments }
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

/// An interface as a fingerprint holds it: its segment, subnet, bridge,
/// address and gateway.
type PrintedNic<'a> = (&'a Name, String, Option<&'a bootcache_api::InterfaceName>, Ipv4Addr, Option<Ipv4Addr>);

/// Everything of an instance's definition its node makes it from: what
/// a re-deploy compares to tell a changed instance (made anew) from an
/// unchanged one (left running).
#[derive(serde::Serialize)]
struct Fingerprint<'a> {
    kind: Kind,
    image: &'a str,
    root: Option<RootDigest>,
    delivery: Delivery,
    cpus: u32,
    memory_bytes: u64,
    node: Option<&'a Name>,
    ready: Option<&'a str>,
    command: Option<&'a [String]>,
    nics: Vec<PrintedNic<'a>>,
    cloud_init: Option<&'a serde_json::Value>,
    env: &'a std::collections::BTreeMap<String, String>,
    files: &'a std::collections::BTreeMap<String, String>,
    exec: &'a [Vec<String>],
    hostname: Option<&'a Name>,
    sysctls: &'a std::collections::BTreeMap<String, String>,
    ready_command: Option<&'a [String]>,
    firmware: bootcache_api::lab::Firmware,
    routes: &'a [(bootcache_api::lab::Route, Ipv4Addr)],
}

/// The instances of `lab` as the database records them.
/// An image as a lab names it, for a kind of instance (a reference names a
/// VM image for a VM, a container image for a container).
type ImageOf = (Kind, String);

/// An instance whose image is in `unresolved` is recorded failed with the
/// reason given there.
fn specs(lab: &Lab, roots: &HashMap<ImageOf, RootDigest>, unresolved: &HashMap<ImageOf, String>) -> Vec<InstanceSpec> {
    let mut out = Vec::new();
    for inst in lab.instances() {
        let Some(def) = lab.def(&inst.def) else { continue };
        // A VM delivered lazily: its root digest; a container's registry
        // image: its manifest's digest.
        let of = (def.kind, def.image.clone());
        let root = roots.get(&of).copied().filter(|_| def.kind == Kind::Container || def.delivery == Delivery::Lazy);
        let image = root.unwrap_or_else(|| agent::container_image_key(&def.image));
        let print = Fingerprint {
            kind: def.kind,
            image: &def.image,
            root,
            delivery: def.delivery,
            cpus: def.cpus,
            memory_bytes: def.memory_bytes,
            node: def.node.as_ref(),
            ready: def.ready.as_deref(),
            command: def.command.as_deref(),
            nics: inst
                .addresses
                .iter()
                .filter_map(|(seg, a)| lab.segment(seg).map(|s| (seg, s.subnet.to_string(), s.bridge.as_ref(), *a, s.gateway)))
                .collect(),
            cloud_init: def.cloud_init.as_ref(),
            env: &def.env,
            files: &def.files,
            exec: &def.exec,
            hostname: def.hostname.as_ref(),
            sysctls: &def.sysctls,
            ready_command: def.ready_command.as_deref(),
            firmware: def.firmware,
            routes: &def.routes,
        };
        let fingerprint = blake3::hash(&serde_json::to_vec(&print).unwrap_or_default()).to_hex().to_string();
        out.push(InstanceSpec {
            lab: lab.name.clone(),
            name: inst.name,
            kind: def.kind,
            image,
            cores: def.cpus,
            memory_bytes: def.memory_bytes,
            fingerprint,
            failed: unresolved.get(&of).map(|why| format!("image {why}")),
        });
    }
    out
}

impl Control {
    /// Deploys `lab` (checked from `source`, the lab file and the files it
    /// names, which is what is recorded of it): reads its VM images'
    /// headers and resolves its registry references, holding nothing, then
    /// records the lab whole in one transaction (see [`Db::put_lab`]:
    /// unchanged instances keep their state, changed ones are made anew,
    /// dropped ones go) and places what is pending. An instance whose
    /// registry reference cannot be read is recorded failed with the reason
    /// (naming the reference), the rest of the lab going on; one that was
    /// running from an earlier deploy of the same reference keeps the image
    /// it was pinned to. Returns the lab's instances and what changed.
    ///
    /// # Errors
    /// A store's image that cannot be read, a lab the database refuses (a
    /// bridge of another lab...), a destroy or another deploy of the lab
    /// recorded meanwhile ([`DeployError::Superseded`]), the database.
    pub async fn deploy(self: &Arc<Self>, source: impl Into<LabSource>, lab: Lab) -> Result<(Vec<InstanceRow>, Deployed), DeployError> {
        let source = source.into();
        let epoch = self.epoch(&lab.name);
        let earlier = self.earlier_pins(&lab.name)?;
        // Headers and references first, holding nothing (a slow store or
        // registry delays this call only).
        let mut roots: HashMap<ImageOf, RootDigest> = HashMap::new();
        let mut unresolved: HashMap<ImageOf, String> = HashMap::new();
        let mut images = Vec::new();
        let wanted = |d: &&InstanceDef| match d.kind {
            Kind::Vm => d.delivery == Delivery::Lazy,
            Kind::Container => Reference::looks_like(&d.image),
        };
        for def in lab.instances.iter().filter(wanted) {
            let of = (def.kind, def.image.clone());
            if roots.contains_key(&of) || unresolved.contains_key(&of) {
                continue;
            }
            let read = match def.kind {
                Kind::Vm => self.vm_image(def).await,
                Kind::Container => self.container_image(def).await,
            };
            match read {
                Ok(record) => {
                    roots.insert(of, record.root);
                    images.push(record);
                }
                Err(why) if Reference::looks_like(&def.image) => match earlier.get(&of) {
                    Some(root) => {
                        tracing::warn!(image = %def.image, %why, "reference not read; its instances keep the image pinned at the last deploy");
                        roots.insert(of, *root);
                    }
                    None => {
                        tracing::warn!(image = %def.image, %why, "reference not read; its instances fail");
                        let why = if why.contains(&def.image) { why } else { format!("{}: {why}", def.image) };
                        unresolved.insert(of, why);
                    }
                },
                Err(why) => return Err(DeployError::Image { instance: def.name.clone(), url: bootcache_http::redact(&def.image), why }),
            }
        }
        let me = Arc::clone(self);
        tokio::task::spawn_blocking(move || me.record(&source, lab, &images, &roots, &unresolved, epoch))
            .await
            .map_err(|e| DeployError::Db(DbError::Conflict(format!("deploying: {e}"))))?
    }

    /// What each registry reference of `lab`, as last deployed, was pinned
    /// to, for the instances of it that are not failed.
    fn earlier_pins(&self, lab: &Name) -> Result<HashMap<ImageOf, RootDigest>, DeployError> {
        let db = self.db();
        let mut out = HashMap::new();
        let Some(view) = self.view(&db, lab)? else { return Ok(out) };
        for r in db.instances(lab)?.into_iter().filter(|r| r.state != InstanceState::Failed) {
            let Some(inst) = view.expanded.get(&r.spec.name) else { continue };
            let Some(def) = view.lab.def(&inst.def) else { continue };
            if Reference::looks_like(&def.image) && db.image_reference(&r.spec.image)?.is_some() {
                out.insert((def.kind, def.image.clone()), r.spec.image);
            }
        }
        Ok(out)
    }

    /// A lazily delivered VM's image: its header read from the store, or
    /// for a registry reference the tag resolved to a manifest digest now,
    /// once, and the header read from its blob by that digest (a tag moved
    /// later changes nothing this deploy recorded). Why not, on one line.
    async fn vm_image(&self, def: &InstanceDef) -> Result<ImageRecord, String> {
        let (url, annotated, auth, pinned) = match def.image.parse::<Reference>() {
            Ok(reference) if Reference::looks_like(&def.image) => {
                let registry = self.registry_client(&reference).map_err(|e| e.to_string())?;
                let resolved = bootcache_registry::artifact::resolve(&registry, &reference).await.map_err(|e| e.to_string())?;
                let url = registry.blob_url(&resolved.pinned, &resolved.blob);
                tracing::info!(instance = %def.name, image = %def.image, pinned = %resolved.pinned, "image reference resolved");
                // Its header read with the same client (its token held).
                let auth: Arc<dyn bootcache_http::Authorizer> =
                    Arc::new(bootcache_registry::blobs::BlobAuthorizer::new(registry, resolved.pinned.clone()));
                let pinned = resolved.pinned.to_string();
                (url, Some(resolved.root), Some(auth), Some(pinned))
            }
            _ => (def.image.clone(), None, None, None),
        };
        // A layer's parents too: placement and source planning go by layer.
        let chain = bootcache_delivery::cache::read_chain(&url, self.retry, auth).await.map_err(|e| bootcache_http::chain(&e))?;
        let Some((header, parents)) = chain.split_first() else { return Err("no header".into()) };
        let parents = parents.iter().map(|h| (h.root(), h.boot.end - h.boot.start)).collect();
        let root = header.root();
        if let Some(said) = annotated.filter(|said| *said != root.to_string()) {
            return Err(format!("its blob's root digest is {root}, its manifest says {said}"));
        }
        let boot_bytes = header.boot.end - header.boot.start;
        Ok(ImageRecord { root, url, virtual_size: header.virtual_size, boot_bytes, reference: pinned, blobs: None, parents })
    }

    /// A container's registry image: resolved now, once, to its linux/amd64
    /// manifest and pinned to it, its config and layers recorded with it,
    /// keyed by its digest. Why not, on one line.
    async fn container_image(&self, def: &InstanceDef) -> Result<ImageRecord, String> {
        let reference: Reference = def.image.parse().map_err(|e: bootcache_api::reference::BadReference| e.0)?;
        let registry = self.registry_client(&reference).map_err(|e| e.to_string())?;
        let image = bootcache_registry::image::resolve(&registry, &reference).await.map_err(|e| e.to_string())?;
        tracing::info!(instance = %def.name, image = %def.image, pinned = %image.pinned, layers = image.layers.len(), "image reference resolved");
        let Target::Digest(manifest) = image.pinned.target else { return Err(format!("{reference}: not pinned to a digest")) };
        let all: Vec<Blob> = std::iter::once(image.config).chain(image.layers.iter().copied()).collect();
        let blobs = serde_json::to_string(&all).map_err(|e| e.to_string())?;
        let pinned = image.pinned.to_string();
        Ok(ImageRecord {
            root: RootDigest(manifest.0),
            url: pinned.clone(),
            virtual_size: image.bytes(),
            boot_bytes: 0,
            reference: Some(pinned),
            blobs: Some(blobs),
            parents: Vec::new(),
        })
    }

    /// The part of [`Control::deploy`] that holds the database: one
    /// transaction, the in-memory view changed under the same lock.
    fn record(
        &self,
        source: &LabSource,
        lab: Lab,
        images: &[ImageRecord],
        roots: &HashMap<ImageOf, RootDigest>,
        unresolved: &HashMap<ImageOf, String>,
        epoch: u64,
    ) -> Result<(Vec<InstanceRow>, Deployed), DeployError> {
        let specs = specs(&lab, roots, unresolved);
        let name = lab.name.clone();
        let done = {
            let db = self.db();
            if self.epoch(&name) != epoch {
                return Err(DeployError::Superseded(name));
            }
            let done = db.put_lab(&lab, source, images, &specs, now_ms())?;
            self.bump_epoch(&name);
            let segments = db.segments(&name)?;
            locked(&self.views).insert(name.clone(), Arc::new(LabView::new(lab, segments)));
            self.changed();
            done
        };
        tracing::info!(lab = %name, added = done.added, recreated = done.recreated, removed = done.removed, kept = done.kept, "lab deployed");
        self.schedule()?;
        Ok((self.db().instances(&name)?, done))
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
        let mut views = HashMap::new();
        for lab in by_lab.keys() {
            if let Some(v) = self.view(&db, lab)? {
                views.insert(*lab, v);
            }
        }
        // Each pending image's layers (itself and its parents), once.
        let mut layers: HashMap<RootDigest, Vec<(RootDigest, u64)>> = HashMap::new();
        for r in by_lab.values().flatten() {
            if let std::collections::hash_map::Entry::Vacant(v) = layers.entry(r.spec.image) {
                let mut l = db.image_layers(&r.spec.image)?;
                if l.is_empty() {
                    l.push((r.spec.image, 0));
                }
                v.insert(l);
            }
        }
        // Pinned instances of every lab first: a node's room goes to what
        // can run nowhere else before what can run anywhere.
        for pinned in [true, false] {
            for (lab, pending) in &by_lab {
                let Some(view) = views.get(lab) else { continue };
                let wants: Vec<Want> = pending
                    .iter()
                    .map(|r| Want {
                        instance: r.spec.name.clone(),
                        layers: layers.get(&r.spec.image).cloned().unwrap_or_default(),
                        cores: r.spec.cores,
                        memory_bytes: r.spec.memory_bytes,
                        pin: view.pin(&r.spec.name),
                    })
                    .filter(|w| w.pin.is_some() == pinned)
                    .collect();
                if wants.is_empty() {
                    continue;
                }
                let results = plan::place(&wants, &capacities, self.policy);
                let mut moves = Vec::new();
                let mut waiting = Vec::new();
                for (w, placed) in wants.iter().zip(&results) {
                    match placed {
                        Ok((_, node)) => {
                            if let Some(c) = capacities.iter_mut().find(|c| c.node == *node) {
                                c.cores = c.cores.saturating_sub(w.cores);
                                c.memory_bytes = c.memory_bytes.saturating_sub(w.memory_bytes);
                                c.caches.extend(w.layers.iter().map(|(r, _)| *r));
                            }
                            moves.push((*lab, &w.instance, InstanceState::Placed, Some(node), None));
                        }
                        Err(unplaced) => waiting.push((*lab, &w.instance, format!("waiting for room: {}", unplaced.why))),
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
        }
        if placed_any {
            self.changed();
        }
        Ok(())
    }

    /// Takes a node's heartbeat: records it and what of its reports are
    /// about instances ordered to it (the rest is ignored), moves those
    /// instances through their states, places what waits, and answers with
    /// the node's orders. Call it only for a node whose credential the
    /// request carried ([`Control::authenticate`]).
    ///
    /// # Errors
    /// A node that never registered, a report of more than it could have,
    /// the database.
    pub fn heartbeat(&self, node: &Name, beat: &Heartbeat) -> Result<Orders, DbError> {
        let now = now_ms();
        {
            let db = self.db();
            db.heartbeat(node, beat, now)?;
            let taken = db.observe(node, &beat.instances)?;
            // Every state change the heartbeat brings, in one transaction.
            let mut steps = Vec::new();
            for seen in &taken {
                advance(&db, node, seen, &mut steps)?;
            }
            let moves: Vec<_> = steps
                .iter()
                .map(|(seen, to)| {
                    (&seen.lab, &seen.name, *to, Some(node), if *to == InstanceState::Failed { seen.reason.as_deref() } else { None })
                })
                .collect();
            db.set_states(&moves, now)?;
            // An instance back from lost (its node answers again) is on
            // its node's segments again: what [`Control::members`] keeps
            // is stale. Bumped under the database's lock, like every
            // change of placement.
            if moves.iter().any(|m| matches!(m.2, InstanceState::Placed | InstanceState::Lost)) {
                self.changed();
            }
        }
        self.schedule()?;
        let mut orders = self.orders(node)?;
        orders.tasks = self.take_tasks(node);
        Ok(orders)
    }

    /// Takes a node into the cluster: a new credential of its own (only
    /// its digest is kept) and `peer_token`, what nodes present to each
    /// other. `by_admin`: asked with the administrator's token (which may
    /// take over a node that is down; the join token may not).
    ///
    /// # Errors
    /// A node of that name that is up ([`DbError::NodeUp`]) or has joined
    /// ([`DbError::NodeKnown`]), the database.
    pub fn join(&self, join: &Join, peer_token: String, by_admin: bool) -> Result<Joined, DbError> {
        let secret = bootcache_http::auth::new_token().map_err(|e| DbError::Conflict(format!("making a credential: {e}")))?;
        let digest = blake3::hash(secret.as_bytes()).to_hex().to_string();
        self.db().join(join, &digest, by_admin, now_ms(), self.heartbeat)?;
        tracing::info!(node = %join.name, address = %join.address, "node joined");
        Ok(Joined { secret, peer_token })
    }

    /// Whether an `Authorization` header value carries `node`'s own
    /// credential (compared by digest, in constant time).
    ///
    /// # Errors
    /// The database.
    pub fn authenticate(&self, node: &Name, authorization: Option<&[u8]>) -> Result<bool, DbError> {
        let Some(token) = authorization.and_then(|v| v.strip_prefix(b"Bearer ")) else { return Ok(false) };
        let Some(stored) = self.db().node_secret(node)? else { return Ok(false) };
        let Ok(stored) = blake3::Hash::from_hex(stored.as_bytes()) else { return Ok(false) };
        Ok(blake3::hash(token.trim_ascii()) == stored)
    }

    /// Removes `node` from the cluster (its instances are placed again);
    /// whether it was there.
    ///
    /// # Errors
    /// The database.
    pub fn remove_node(&self, node: &Name) -> Result<bool, DbError> {
        let gone = self.db().remove_node(node, now_ms())?;
        self.changed();
        if gone {
            tracing::warn!(%node, "node removed");
            self.schedule()?;
        }
        Ok(gone)
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
        let mut digests: HashMap<RootDigest, Option<RootDigest>> = HashMap::new();
        let mut urls: HashMap<RootDigest, Option<String>> = HashMap::new();
        let mut oci: HashMap<RootDigest, Option<Image>> = HashMap::new();
        let mut parents: HashMap<RootDigest, Vec<(RootDigest, Vec<String>)>> = HashMap::new();
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
                    // VM images and registry blobs are passed on as they arrive.
                    let relayed = def.kind == Kind::Vm || Reference::looks_like(&def.image);
                    let p = self.image_sources(&db, key, relayed, node, fetchers, &up, &address)?;
                    sources.insert(*key, p.clone());
                    Ok(p)
                };
                // The image as resolved at deploy (a VM image's root is its
                // row's key), with a whole file's digest once it is known.
                let mut digest_of = |key: &RootDigest| -> Result<Option<RootDigest>, DbError> {
                    if let Some(d) = digests.get(key) {
                        return Ok(*d);
                    }
                    let d = db.file_digest(key)?;
                    digests.insert(*key, d);
                    Ok(d)
                };
                let (image, sources) = match def.kind {
                    Kind::Vm if def.delivery == Delivery::Full => {
                        (Image::Disk { url: def.image.clone(), digest: digest_of(&r.spec.image)? }, Vec::new())
                    }
                    Kind::Container if Reference::looks_like(&def.image) => {
                        let Some(peers) = from(&r.spec.image)? else { continue };
                        let image = match oci.get(&r.spec.image) {
                            Some(i) => i.clone(),
                            None => {
                                let i = self.registry_image(&db, &r.spec.image)?;
                                oci.insert(r.spec.image, i.clone());
                                i
                            }
                        };
                        let Some(image) = image else { continue };
                        (image, peers)
                    }
                    Kind::Container => {
                        let Some(peers) = from(&r.spec.image)? else { continue };
                        (Image::Tarball { url: def.image.clone(), digest: digest_of(&r.spec.image)? }, peers)
                    }
                    Kind::Vm => {
                        let Some(peers) = from(&r.spec.image)? else { continue };
                        // A registry reference was read, at deploy, from its
                        // blob by digest: that URL, as recorded with the image.
                        let url = if Reference::looks_like(&def.image) {
                            let url = match urls.get(&r.spec.image) {
                                Some(u) => u.clone(),
                                None => {
                                    let u = db.image_url(&r.spec.image)?;
                                    urls.insert(r.spec.image, u.clone());
                                    u
                                }
                            };
                            let Some(url) = url else { continue };
                            url
                        } else {
                            def.image.clone()
                        };
                        (Image::Bootcache { url, root: r.spec.image }, peers)
                    }
                };
                let layer_sources = match &image {
                    Image::Bootcache { root, .. } => match parents.get(root) {
                        Some(p) => p.clone(),
                        None => {
                            let p = self.parent_sources(&db, root, node, &sources, &up, &address)?;
                            parents.insert(*root, p.clone());
                            p
                        }
                    },
                    _ => Vec::new(),
                };
                let mut nics = Vec::new();
                for (i, (seg, addr)) in inst.addresses.iter().enumerate() {
                    let (Some(segment), Some(numbered), Ok(i)) = (lab.segment(seg), view.segments.get(seg), u8::try_from(i)) else {
                        continue;
                    };
                    let mac = names::mac(r.uid, i);
                    if def.kind == Kind::Vm {
                        dhcp_hosts.entry(seg.clone()).or_default().push((mac, *addr));
                    }
                    nics.push(Nic {
                        bridge: numbered.bridge.clone(),
                        mac,
                        address: *addr,
                        prefix: segment.subnet.prefix,
                        gateway: segment.gateway.filter(|g| g != addr),
                    });
                }
                orders.instances.push(Order {
                    uid: r.uid,
                    lab: lab.name.clone(),
                    name: r.spec.name.clone(),
                    image,
                    sources,
                    layer_sources,
                    cpus: def.cpus,
                    memory_bytes: def.memory_bytes,
                    nics,
                    ready: def.ready.clone(),
                    command: def.command.clone(),
                    cloud_init: def.cloud_init.clone(),
                    env: def.env.clone(),
                    files: def.files.clone(),
                    exec: def.exec.clone(),
                    hostname: def.hostname.clone(),
                    sysctls: def.sysctls.clone(),
                    ready_command: def.ready_command.clone(),
                    firmware: def.firmware,
                    routes: def.routes.clone(),
                    running: r.running,
                });
            }
            for (seg, on) in &members.seg_nodes {
                if !on.contains(node) {
                    continue;
                }
                let (Some(segment), Some(numbered)) = (lab.segment(seg), view.segments.get(seg)) else { continue };
                let Some(vni) = names::vni(numbered.id) else { continue };
                // Every other node of the segment, up or not: a peer that
                // misses a heartbeat (a loaded control node, a slow link)
                // must not take the segment's tunnel down on the nodes that
                // are fine; frames sent to a node that is gone are lost,
                // which is all a gone node could have had anyway.
                let remotes = on.iter().filter(|n| *n != node).filter_map(ip).collect();
                let dhcp = dhcp_hosts.remove(seg).map(|hosts| {
                    let k = members.seg_vm_nodes.get(seg).and_then(|s| s.iter().position(|n| n == node)).unwrap_or(0);
                    Dhcp {
                        server: segment.subnet.node_address(u32::try_from(k).unwrap_or(0)).unwrap_or(Ipv4Addr::UNSPECIFIED),
                        prefix: segment.subnet.prefix,
                        hosts,
                        gateway: segment.gateway,
                    }
                });
                orders.segments.push(SegmentOrder {
                    id: numbered.id,
                    lab: lab.name.clone(),
                    segment: seg.clone(),
                    bridge: numbered.bridge.clone(),
                    vxlan: names::vxlan(numbered.id),
                    vni,
                    remotes,
                    dhcp,
                });
            }
        }
        Ok(orders)
    }

    /// The registry container image of key `root` (its manifest's digest)
    /// as recorded at deploy; none if the record is not one (an order not
    /// given rather than a wrong one).
    fn registry_image(&self, db: &Db, root: &RootDigest) -> Result<Option<Image>, DbError> {
        let (Some(reference), Some(blobs)) = (db.image_reference(root)?, db.image_blobs(root)?) else { return Ok(None) };
        let Ok(all) = serde_json::from_str::<Vec<Blob>>(&blobs) else {
            tracing::warn!(image = %reference, "its recorded blobs are not readable; not ordered");
            return Ok(None);
        };
        let Some((config, layers)) = all.split_first() else { return Ok(None) };
        let manifest = bootcache_api::reference::Digest(root.0);
        Ok(Some(Image::Oci { reference, manifest, config: *config, layers: layers.to_vec() }))
    }

    /// The peers `node` fetches image `root` from (empty: the store), or
    /// `None` while the peer chosen does not hold it yet. A `relayed` image
    /// (a VM image, a registry's container image) is passed on as it arrives, so a node is given its
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

    /// For a layered image, where `node` fetches each parent it does not
    /// hold: a node that holds it (for another image over it), chosen among
    /// them by `node`'s name, then the image's own `sources` (which fetch
    /// the whole chain). Parents no other node holds are not listed.
    fn parent_sources(
        &self,
        db: &Db,
        root: &RootDigest,
        node: &Name,
        sources: &[String],
        up: &HashSet<&Name>,
        address: &dyn Fn(&Name) -> Option<String>,
    ) -> Result<Vec<(RootDigest, Vec<String>)>, DbError> {
        let layers = db.image_layers(root)?;
        if !self.peers || layers.len() < 2 {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (parent, _) in &layers[1..] {
            let holders: Vec<Name> = db.holders(parent)?.into_iter().map(|(n, _)| n).filter(|n| up.contains(n)).collect();
            if holders.is_empty() || holders.contains(node) {
                continue;
            }
            let spread = node.as_str().bytes().map(usize::from).sum::<usize>() % holders.len();
            let Some(holder) = address(&holders[spread]).map(|a| format!("http://{a}")) else { continue };
            let mut list = vec![holder];
            list.extend(sources.iter().filter(|s| !list.contains(s)).cloned().collect::<Vec<_>>());
            list.truncate(bootcache_delivery::node::MAX_PEERS);
            out.push((*parent, list));
        }
        Ok(out)
    }

    /// The lab as deployed, with its replicas expanded (kept in memory until
    /// it is deployed again or destroyed).
    /// Call holding the database (`db`): the view is read from it and
    /// kept under the same lock.
    pub(crate) fn view(&self, db: &Db, lab: &Name) -> Result<Option<Arc<LabView>>, DbError> {
        if let Some(v) = locked(&self.views).get(lab) {
            return Ok(Some(Arc::clone(v)));
        }
        let Some(spec) = db.lab(lab)? else { return Ok(None) };
        let view = Arc::new(LabView::new(spec, db.segments(lab)?));
        locked(&self.views).insert(lab.clone(), Arc::clone(&view));
        Ok(Some(view))
    }

    /// Which nodes a lab's segments and VM images are on, recomputed only
    /// when placement changed ([`Control::changed`]).
    fn members(&self, db: &Db, view: &LabView) -> Result<Arc<Members>, DbError> {
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        if let Some((g, m)) = locked(&self.members).get(&view.lab.name)
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
        locked(&self.members).insert(view.lab.name.clone(), (generation, Arc::clone(&m)));
        Ok(m)
    }

    /// Forgets `lab`: agents remove what they run of it on their next
    /// heartbeat; a deploy of it under way when this is recorded records
    /// nothing. Whether it was there.
    ///
    /// # Errors
    /// The database.
    pub fn destroy(&self, lab: &Name) -> Result<bool, DbError> {
        let db = self.db();
        let gone = db.delete_lab(lab)?;
        self.bump_epoch(lab);
        locked(&self.views).remove(lab);
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
    if row.node.as_ref() != Some(node) || row.uid != seen.uid || row.state == seen.state {
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
