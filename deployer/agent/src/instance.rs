//! Bringing one ordered instance up: its image fetched (a VM's opened on
//! the node's cache and exported, a container's tarball imported), then
//! made, started, joined to its segments and waited for until ready.

use std::sync::Arc;

use bootcache_api::agent::{ImageOrder, Order, names};
use bootcache_api::{InstanceState, Kind};
use bootcache_network::Veth;
use bootcache_runtime::{Image, Runtime, Spec};

use crate::Shared;

/// An instance this agent was ordered to run.
pub(crate) struct Local {
    /// What was ordered.
    pub order: Order,
    /// Where it stands.
    pub state: InstanceState,
    /// Why it failed.
    pub reason: Option<String>,
    /// Bringing it up.
    pub task: Option<tokio::task::JoinHandle<()>>,
}

/// The export name of a VM image on this node.
pub(crate) fn export_name(root: &bootcache_api::RootDigest) -> String {
    root.to_string()
}

/// The Docker reference a container image is imported as.
pub(crate) fn container_reference(url: &str) -> String {
    // The whole key: a tag is not cut to where two images could meet.
    format!("bootcache/image:{}", bootcache_api::agent::container_image_key(url))
}

/// Claims runtime id `id` for `order` before anything is made under it:
/// recorded as this agent's; whatever an earlier run of this agent left
/// under it (recorded and marked) is removed; anything else there is
/// someone else's, and the instance fails rather than touch it.
async fn claim<R: Runtime>(shared: &Shared, runtime: &R, kind: Kind, id: &str) -> Result<(), String> {
    let recorded = shared.record.get().instances.contains_key(id);
    let status = runtime.status(id).await.map_err(|e| e.to_string())?;
    if status != bootcache_runtime::Status::Missing {
        let marked = runtime.list().await.map_err(|e| e.to_string())?.iter().any(|i| i == id);
        if !(recorded && marked) {
            return Err(format!("a {kind:?} named {id} exists on this node and was not made by this agent: left as it is"));
        }
        runtime.destroy(id).await.map_err(|e| e.to_string())?;
    }
    shared
        .record
        .update(|o| {
            o.instances.insert(id.to_owned(), kind);
        })
        .map_err(|e| format!("recording {id}: {e}"))
}

/// What the runtime makes for `order`.
fn spec(order: &Order, id: &str, image: Image) -> Spec {
    Spec {
        id: id.to_owned(),
        hostname: order.name.to_string(),
        cpus: order.cpus,
        memory_bytes: order.memory_bytes,
        nics: order.nics.clone(),
        image,
    }
}

fn set(shared: &Shared, order: &Order, state: InstanceState, reason: Option<String>) {
    let mut all = shared.instances.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = all.get_mut(&order.uid) {
        l.state = state;
        l.reason = reason;
    }
}

/// Brings `order` up, recording each state; a failure is recorded with
/// its reason (the rest of the lab goes on).
pub(crate) async fn bring_up(shared: Arc<Shared>, order: Order) {
    let id = names::instance(order.uid, &order.lab, &order.name);
    let result = match order.kind {
        Kind::Vm => vm(&shared, &order, &id).await,
        Kind::Container => container(&shared, &order, &id).await,
    };
    match result {
        Ok(took) => {
            tracing::info!(instance = %id, seconds = took.as_secs_f64(), "ready");
            set(&shared, &order, InstanceState::Ready, None);
        }
        Err(why) => {
            tracing::warn!(instance = %id, %why, "failed");
            set(&shared, &order, InstanceState::Failed, Some(why));
        }
    }
}

async fn vm(shared: &Shared, order: &Order, id: &str) -> Result<std::time::Duration, String> {
    if shared.config.prefetch_only {
        return prefetch(shared, order).await;
    }
    let Some(libvirt) = &shared.libvirt else { return Err("this node runs no VMs (the agent has no --libvirt)".into()) };
    set(shared, order, InstanceState::Fetching, None);
    claim(shared, libvirt, Kind::Vm, id).await?;
    let (backing, format, size) = match &order.image {
        ImageOrder::Vm { url, root, peers } => {
            let image = shared
                .node
                .open(&export_name(root), url, peers, Some(*root))
                .await
                .map_err(|e| format!("image: {}", bootcache_delivery::node::chain(&e)))?;
            (image.nbd_url, "raw", Some(image.virtual_size))
        }
        ImageOrder::Disk { url } => {
            let (path, format) = whole_disk(shared, url).await?;
            (path.to_string_lossy().into_owned(), format, None)
        }
        ImageOrder::Container { .. } => return Err("a VM's order carries a disk image".into()),
    };
    let overlay = shared.config.state_dir.join("overlays").join(format!("{id}.qcow2"));
    let _ = std::fs::remove_file(&overlay);
    let mut make = tokio::process::Command::new("qemu-img");
    make.args(["create", "-q", "-f", "qcow2", "-F", format, "-b", &backing]).arg(&overlay);
    // The export's size is known (and opening it here would count as a
    // guest's reads); a local disk's is read from it.
    if let Some(size) = size {
        make.arg("-u").arg(size.to_string());
    }
    let out = make.output().await.map_err(|e| format!("qemu-img (package qemu-utils): {e}"))?;
    if !out.status.success() {
        return Err(format!("making the overlay: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    set(shared, order, InstanceState::Starting, None);
    let spec = spec(order, id, Image::Disk(overlay));
    libvirt.create(&spec).await.map_err(|e| e.to_string())?;
    libvirt.start(id).await.map_err(|e| e.to_string())?;
    libvirt.wait_ready(id, order.ready.as_deref(), shared.config.ready_timeout).await.map_err(|e| e.to_string())
}

/// A VM order carried out up to holding its image's boot segment (the
/// agent's prefetch-only mode): how long that took.
async fn prefetch(shared: &Shared, order: &Order) -> Result<std::time::Duration, String> {
    let ImageOrder::Vm { url, root, peers } = &order.image else {
        return Err("prefetch-only nodes take bootcache images only".into());
    };
    let started = std::time::Instant::now();
    set(shared, order, InstanceState::Fetching, None);
    shared
        .node
        .open(&export_name(root), url, peers, Some(*root))
        .await
        .map_err(|e| format!("image: {}", bootcache_delivery::node::chain(&e)))?;
    let cache = shared.node.cache(root).ok_or("the image was closed while its boot segment came")?;
    if !cache.wait_prefetched(shared.config.ready_timeout).await {
        return Err(format!("the boot segment was not all here after {:?}", shared.config.ready_timeout));
    }
    Ok(started.elapsed())
}

/// A plain disk image copied whole from the store to this node, once
/// however many VMs use it (`delivery: full`): its path and format.
async fn whole_disk(shared: &Shared, url: &str) -> Result<(std::path::PathBuf, &'static str), String> {
    let key = bootcache_api::agent::container_image_key(url);
    let path = shared.config.state_dir.join("disks").join(format!("{key}.img"));
    crate::fetch::whole(shared, &key, url, &[], &path).await?;
    // By its magic, as convert reads images; what QEMU is given must be
    // what the file is, never a guess.
    match bootcache_convert::detect(&path) {
        Ok(bootcache_convert::Format::Raw) => Ok((path, "raw")),
        Ok(bootcache_convert::Format::Qcow2) => Ok((path, "qcow2")),
        Ok(other) => Err(format!("image {}: a {other} disk; delivery: full takes raw or qcow2", bootcache_delivery::remote::redact(url))),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

async fn container(shared: &Shared, order: &Order, id: &str) -> Result<std::time::Duration, String> {
    let Some(docker) = &shared.docker else { return Err("this node runs no containers (the agent has no --docker)".into()) };
    let ImageOrder::Container { url, peers } = &order.image else { return Err("a container's order carries a tarball".into()) };
    set(shared, order, InstanceState::Fetching, None);
    claim(shared, docker, Kind::Container, id).await?;
    let reference = container_reference(url);
    // One import per image, however many containers wait for it.
    let lock = {
        let mut images = shared.images.lock().await;
        Arc::clone(images.entry(reference.clone()).or_default())
    };
    {
        let _held = lock.lock().await;
        if !docker.has_image(&reference).await.map_err(|e| e.to_string())? {
            let key = bootcache_api::agent::container_image_key(url);
            let path = crate::fetch::tarball_path(&shared.config.state_dir, &key);
            crate::fetch::whole(shared, &key, url, peers, &path).await?;
            let file = tokio::fs::File::open(&path).await.map_err(|e| format!("{}: {e}", path.display()))?;
            docker.import(&reference, tokio_util::io::ReaderStream::new(file)).await.map_err(|e| e.to_string())?;
            tracing::info!(image = %bootcache_delivery::remote::redact(url), %reference, "container image imported");
        }
    }
    set(shared, order, InstanceState::Starting, None);
    let spec = spec(order, id, Image::Container { reference, command: order.command.clone() });
    docker.create(&spec).await.map_err(|e| e.to_string())?;
    docker.start(id).await.map_err(|e| e.to_string())?;
    attach(shared, docker, order, id).await?;
    docker.wait_ready(id, order.ready.as_deref(), shared.config.ready_timeout).await.map_err(|e| e.to_string())
}

/// Gives a running container its veths (a started container has a new
/// network namespace each time).
async fn attach(shared: &Shared, docker: &bootcache_runtime::docker::Docker, order: &Order, id: &str) -> Result<(), String> {
    let pid = docker.pid(id).await.map_err(|e| e.to_string())?;
    let marks = shared.bridge_marks.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut veths = Vec::new();
    for (i, n) in order.nics.iter().enumerate() {
        let i = u8::try_from(i).map_err(|_| "more than 256 interfaces".to_owned())?;
        let bridge_mark =
            marks.get(n.bridge.as_str()).cloned().ok_or_else(|| format!("segment bridge {} is not made on this node", n.bridge))?;
        let veth = Veth {
            host: names::veth(order.uid, i),
            bridge: n.bridge.clone(),
            inside: format!("eth{i}"),
            mac: n.mac,
            address: (n.address, n.prefix),
        };
        veths.push((veth, bridge_mark));
    }
    let mark = crate::reconcile::instance_mark(&shared.config.name, order);
    shared
        .record
        .update(|o| {
            for (v, _) in &veths {
                o.links.insert(v.host.to_string(), mark.clone());
            }
        })
        .map_err(|e| format!("recording its links: {e}"))?;
    shared.network.attach_container(pid, &mark, &veths).await.map_err(|e| bootcache_delivery::node::chain(&e))
}

/// Stops a ready instance on request (it stays, with its disk or image).
pub(crate) async fn stop(shared: Arc<Shared>, order: Order) {
    let id = names::instance(order.uid, &order.lab, &order.name);
    let r = match order.kind {
        Kind::Vm => match &shared.libvirt {
            Some(l) => l.stop(&id).await,
            None => Ok(()),
        },
        Kind::Container => match &shared.docker {
            Some(d) => d.stop(&id).await,
            None => Ok(()),
        },
    };
    match r {
        Ok(()) => set(&shared, &order, InstanceState::Stopped, None),
        Err(e) => set(&shared, &order, InstanceState::Failed, Some(format!("stopping: {e}"))),
    }
}

/// Starts a stopped instance again, until ready.
pub(crate) async fn start(shared: Arc<Shared>, order: Order) {
    let id = names::instance(order.uid, &order.lab, &order.name);
    set(&shared, &order, InstanceState::Starting, None);
    let r = async {
        match order.kind {
            Kind::Vm => {
                let l = shared.libvirt.as_ref().ok_or("this node runs no VMs")?;
                l.start(&id).await.map_err(|e| e.to_string())?;
                l.wait_ready(&id, None, shared.config.ready_timeout).await.map_err(|e| e.to_string())
            }
            Kind::Container => {
                let d = shared.docker.as_ref().ok_or("this node runs no containers")?;
                d.start(&id).await.map_err(|e| e.to_string())?;
                attach(&shared, d, &order, &id).await?;
                d.wait_ready(&id, None, shared.config.ready_timeout).await.map_err(|e| e.to_string())
            }
        }
    };
    match r.await {
        Ok(_) => set(&shared, &order, InstanceState::Ready, None),
        Err(e) => set(&shared, &order, InstanceState::Failed, Some(format!("starting: {e}"))),
    }
}

/// Removes runtime instance `id` (recorded as this agent's) and its files:
/// only what its runtime lists as marked by this agent is destroyed.
pub(crate) async fn remove(shared: &Shared, kind: Kind, id: &str) -> Result<(), String> {
    async fn gone<R: Runtime>(r: &R, id: &str) -> Result<(), String> {
        if r.list().await.map_err(|e| e.to_string())?.iter().any(|i| i == id) {
            r.destroy(id).await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
    match kind {
        Kind::Vm => {
            if let Some(lv) = &shared.libvirt {
                gone(lv, id).await?;
            }
        }
        Kind::Container => {
            if let Some(d) = &shared.docker {
                gone(d, id).await?;
            }
        }
    }
    let _ = std::fs::remove_file(shared.config.state_dir.join("overlays").join(format!("{id}.qcow2")));
    Ok(())
}
