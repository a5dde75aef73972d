//! Bringing one ordered instance up: its source fetched (a VM image opened
//! on the node's cache and exported, a whole disk or a container's tarball
//! copied), then made by its runtime (which prepares the rest itself),
//! started, joined to its segments and waited for until ready. The runtime
//! is the one the node has for the order's kind ([`Shared::runtime`]),
//! whatever backend that is.

use std::sync::Arc;

use bootcache_api::agent::{Order, names};
use bootcache_api::{Image, InstanceState, Kind};
use bootcache_network::Veth;
use bootcache_runtime::{DiskFormat, Runtime, Source, Spec};

use crate::{AgentError, Shared};

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

/// Claims runtime id `id` for `order` before anything is made under it:
/// recorded as this agent's; whatever an earlier run of this agent left
/// under it (recorded and marked) is removed; anything else there is
/// someone else's, and the instance fails rather than touch it.
async fn claim(shared: &Shared, runtime: &dyn Runtime, kind: Kind, id: &str) -> Result<(), AgentError> {
    let recorded = shared.record.get().instances.contains_key(id);
    let status = runtime.status(id).await?;
    if status != bootcache_runtime::Status::Missing {
        let marked = runtime.list().await?.iter().any(|i| i == id);
        if !(recorded && marked) {
            return Err(AgentError::Foreign(format!(
                "a {kind:?} named {id} exists on this node and was not made by this agent: left as it is"
            )));
        }
        runtime.destroy(id).await?;
    }
    shared
        .record
        .update(|o| {
            o.instances.insert(id.to_owned(), kind);
        })
        .map_err(|e| AgentError::State { path: shared.config.state_dir.join("owned.json"), why: e.to_string() })
}

/// What the runtime makes for `order`, from `source`.
fn spec(order: &Order, id: &str, source: Source) -> Spec {
    Spec {
        id: id.to_owned(),
        hostname: order.hostname.as_ref().unwrap_or(&order.name).to_string(),
        cpus: order.cpus,
        memory_bytes: order.memory_bytes,
        nics: order.nics.clone(),
        source,
        command: order.command.clone(),
        cloud_init: (order.kind() == Kind::Vm).then(|| no_cloud(order, id)),
        env: order.env.clone(),
        files: order.files.clone(),
        sysctls: order.sysctls.clone(),
        uefi: order.firmware == bootcache_api::lab::Firmware::Uefi,
    }
}

/// A VM's NoCloud seed: its instance id and name, its addresses by MAC
/// with its gateway (network-config version 2), and the lab's user-data
/// as `#cloud-config` (JSON is YAML: nothing is re-serialised by hand). A
/// guest without cloud-init ignores it and keeps its DHCP address.
pub(crate) fn no_cloud(order: &Order, id: &str) -> bootcache_runtime::NoCloud {
    let meta = serde_json::json!({"instance-id": id, "local-hostname": order.name});
    let mut ethernets = serde_json::Map::new();
    for (i, nic) in order.nics.iter().enumerate() {
        let mut eth = serde_json::json!({
            "match": {"macaddress": nic.mac.to_string()},
            "dhcp4": false,
            "addresses": [format!("{}/{}", nic.address, nic.prefix)],
        });
        let mut routes: Vec<serde_json::Value> =
            nic.gateway.iter().map(|gw| serde_json::json!({"to": "0.0.0.0/0", "via": gw.to_string()})).collect();
        // The lab's routes go on the interface whose subnet holds their `via`.
        let mask = u32::MAX.checked_shl(32 - u32::from(nic.prefix)).unwrap_or(0);
        for (to, via) in &order.routes {
            if u32::from(*via) & mask == u32::from(nic.address) & mask {
                routes.push(serde_json::json!({"to": to.to_string(), "via": via.to_string()}));
            }
        }
        if !routes.is_empty() {
            eth["routes"] = serde_json::Value::Array(routes);
        }
        ethernets.insert(format!("nic{i}"), eth);
    }
    let network = serde_json::json!({"version": 2, "ethernets": ethernets});
    bootcache_runtime::NoCloud {
        meta_data: format!("{meta}\n"),
        user_data: order.cloud_init.as_ref().map(|v| format!("#cloud-config\n{v}\n")),
        network_config: format!("{network}\n"),
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
    let result = if shared.config.prefetch_only && order.kind() == Kind::Vm {
        prefetch(&shared, &order).await
    } else {
        make(&shared, &order, &id).await
    };
    match result {
        Ok(took) => {
            tracing::info!(instance = %id, seconds = took.as_secs_f64(), "ready");
            set(&shared, &order, InstanceState::Ready, None);
        }
        Err(why) => {
            let why = why.to_string();
            tracing::warn!(instance = %id, %why, "failed");
            set(&shared, &order, InstanceState::Failed, Some(why));
        }
    }
}

/// Fetches its source, makes it with its runtime, starts it, gives it its
/// interfaces if the runtime does not, waits until ready.
async fn make(shared: &Shared, order: &Order, id: &str) -> Result<std::time::Duration, AgentError> {
    let runtime = shared.runtime(order.kind())?;
    set(shared, order, InstanceState::Fetching, None);
    claim(shared, runtime, order.kind(), id).await?;
    let source = fetch_source(shared, order).await?;
    set(shared, order, InstanceState::Starting, None);
    runtime.create(&spec(order, id, source)).await?;
    runtime.start(id).await?;
    attach(shared, runtime, order, id).await?;
    let started = std::time::Instant::now();
    for argv in &order.exec {
        let done = runtime.exec(id, argv, EXEC_TIMEOUT).await?;
        if done.code != 0 {
            return Err(AgentError::Exec { argv: argv.join(" "), code: done.code, output: tail(&done.output) });
        }
    }
    match &order.ready_command {
        Some(argv) => ready_by_command(shared, runtime, id, argv).await.map(|()| started.elapsed()),
        None => Ok(runtime.wait_ready(id, order.ready.as_deref(), shared.config.ready_timeout).await?),
    }
}

/// The longest a command of `exec:` (or one try of `ready-command:`) may run.
const EXEC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The end of a command's output, for a reason (at most 512 bytes).
fn tail(output: &str) -> String {
    let t = output.trim();
    let mut from = t.len().saturating_sub(512);
    while !t.is_char_boundary(from) {
        from += 1;
    }
    t[from..].to_owned()
}

/// Runs `argv` in the instance every second until it succeeds or the ready
/// timeout passes.
async fn ready_by_command(shared: &Shared, runtime: &dyn Runtime, id: &str, argv: &[String]) -> Result<(), AgentError> {
    let deadline = std::time::Instant::now() + shared.config.ready_timeout;
    loop {
        let tried = runtime.exec(id, argv, EXEC_TIMEOUT).await;
        if let Ok(done) = &tried
            && done.code == 0
        {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let last = match tried {
                Ok(done) => format!("exit {}: {}", done.code, tail(&done.output)),
                Err(e) => e.to_string(),
            };
            return Err(AgentError::NotReady(format!(
                "{} did not succeed within {} s (last: {last})",
                argv.join(" "),
                shared.config.ready_timeout.as_secs()
            )));
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// What an instance is made from, as this node comes to hold it.
async fn fetch_source(shared: &Shared, order: &Order) -> Result<Source, AgentError> {
    match &order.image {
        Image::Bootcache { url, root } => {
            let image = shared
                .node
                .open_layered(&export_name(root), url, &order.sources, &order.layer_sources, Some(*root))
                .await
                .map_err(|e| AgentError::Image(bootcache_http::chain(&e)))?;
            Ok(Source::Export { url: image.nbd_url, virtual_size: image.virtual_size })
        }
        Image::Disk { url, digest } => {
            let (path, format) = whole_disk(shared, url, *digest).await?;
            Ok(Source::Disk { path, format })
        }
        Image::Tarball { url, digest } => {
            let key = order.image.key();
            let path = crate::fetch::tarball_path(&shared.config.state_dir, &key);
            crate::fetch::whole(shared, &key, url, &order.sources, &path, *digest).await?;
            Ok(Source::Tarball { path, key: key.to_string() })
        }
        Image::Oci { reference, manifest, config, layers } => {
            crate::blobs::image(shared, reference, manifest, config, layers, &order.sources).await
        }
        other => Err(AgentError::Image(format!("this agent cannot use an image of kind {other:?}"))),
    }
}

/// A VM order carried out up to holding its image's boot segment (the
/// agent's prefetch-only mode): how long that took.
async fn prefetch(shared: &Shared, order: &Order) -> Result<std::time::Duration, AgentError> {
    let Image::Bootcache { url, root } = &order.image else {
        return Err(AgentError::Image("prefetch-only nodes take bootcache images only".into()));
    };
    let peers = &order.sources;
    let started = std::time::Instant::now();
    set(shared, order, InstanceState::Fetching, None);
    let image = shared
        .node
        .open_layered(&export_name(root), url, peers, &order.layer_sources, Some(*root))
        .await
        .map_err(|e| AgentError::Image(bootcache_http::chain(&e)))?;
    let deadline = tokio::time::Instant::now() + shared.config.ready_timeout;
    // Each layer's boot segment (a layer over a base: the base's too).
    for layer in &image.layers {
        let closed = || AgentError::Image("the image was closed while its boot segment came".into());
        let cache = shared.node.cache(layer).ok_or_else(closed)?;
        if !cache.wait_prefetched(deadline.saturating_duration_since(tokio::time::Instant::now())).await {
            return Err(AgentError::Image(format!("the boot segment was not all here after {:?}", shared.config.ready_timeout)));
        }
    }
    Ok(started.elapsed())
}

/// A plain disk image copied whole from the store to this node, once
/// however many VMs use it (`delivery: full`): its path and format.
async fn whole_disk(
    shared: &Shared,
    url: &str,
    digest: Option<bootcache_api::RootDigest>,
) -> Result<(std::path::PathBuf, DiskFormat), AgentError> {
    let key = bootcache_api::image::file_key(url);
    let path = shared.config.state_dir.join("disks").join(format!("{key}.img"));
    crate::fetch::whole(shared, &key, url, &[], &path, digest).await?;
    // By its magic, as convert reads images; what QEMU is given must be
    // what the file is, never a guess.
    match bootcache_convert::detect(&path) {
        Ok(bootcache_convert::Format::Raw) => Ok((path, DiskFormat::Raw)),
        Ok(bootcache_convert::Format::Qcow2) => Ok((path, DiskFormat::Qcow2)),
        Ok(other) => {
            Err(AgentError::Image(format!("image {}: a {other} disk; delivery: full takes raw or qcow2", bootcache_http::redact(url))))
        }
        Err(e) => Err(AgentError::Image(format!("{}: {e}", path.display()))),
    }
}

/// Gives a running instance its veths when its runtime leaves that to the
/// agent (a container: a started one has a new network namespace each time).
async fn attach(shared: &Shared, runtime: &dyn Runtime, order: &Order, id: &str) -> Result<(), AgentError> {
    let Some(pid) = runtime.netns_pid(id).await? else { return Ok(()) };
    let marks = shared.bridge_marks.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut veths = Vec::new();
    for (i, n) in order.nics.iter().enumerate() {
        let i = u8::try_from(i).map_err(|_| AgentError::Network("more than 256 interfaces".into()))?;
        let bridge_mark = marks
            .get(n.bridge.as_str())
            .cloned()
            .ok_or_else(|| AgentError::Network(format!("segment bridge {} is not made on this node", n.bridge)))?;
        let veth = Veth {
            host: names::veth(order.uid, i),
            bridge: n.bridge.clone(),
            inside: format!("eth{i}"),
            mac: n.mac,
            address: (n.address, n.prefix),
            gateway: n.gateway,
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
        .map_err(|e| AgentError::State { path: shared.config.state_dir.join("owned.json"), why: e.to_string() })?;
    let routes: Vec<(std::net::Ipv4Addr, u8, std::net::Ipv4Addr)> =
        order.routes.iter().map(|(to, via)| (to.network, to.prefix, *via)).collect();
    shared.network.attach_container(pid, &mark, &veths, &routes).await.map_err(|e| AgentError::Network(bootcache_http::chain(&e)))
}

/// Stops a ready instance on request (it stays, with its disk or image).
pub(crate) async fn stop(shared: Arc<Shared>, order: Order) {
    let id = names::instance(order.uid, &order.lab, &order.name);
    let r = match shared.runtime(order.kind()) {
        Ok(rt) => rt.stop(&id).await.map_err(AgentError::from),
        Err(e) => Err(e),
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
        let rt = shared.runtime(order.kind())?;
        rt.start(&id).await?;
        attach(&shared, rt, &order, &id).await?;
        Ok::<_, AgentError>(rt.wait_ready(&id, None, shared.config.ready_timeout).await?)
    };
    match r.await {
        Ok(_) => set(&shared, &order, InstanceState::Ready, None),
        Err(e) => set(&shared, &order, InstanceState::Failed, Some(format!("starting: {e}"))),
    }
}

/// Removes runtime instance `id` (recorded as this agent's) and what its
/// runtime prepared for it: only what its runtime lists as marked by this
/// agent is destroyed.
pub(crate) async fn remove(shared: &Shared, kind: Kind, id: &str) -> Result<(), String> {
    if let Ok(rt) = shared.runtime(kind)
        && rt.list().await.map_err(|e| e.to_string())?.iter().any(|i| i == id)
    {
        rt.destroy(id).await.map_err(|e| e.to_string())?;
    }
    let _ = std::fs::remove_file(shared.config.state_dir.join("overlays").join(format!("{id}.qcow2")));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bootcache_api::agent::Nic;

    #[test]
    fn a_vms_seed_says_its_name_addresses_gateway_and_user_data() {
        let order = Order {
            uid: 7,
            lab: "lab".parse().unwrap(),
            name: "web-1".parse().unwrap(),
            image: Image::Disk { url: "http://s/d.qcow2".into(), digest: None },
            sources: vec![],
            layer_sources: vec![],
            cpus: 1,
            memory_bytes: 1 << 29,
            nics: vec![
                Nic {
                    bridge: names::bridge(1),
                    mac: names::mac(7, 0),
                    address: "10.1.0.5".parse().unwrap(),
                    prefix: 24,
                    gateway: Some("10.1.0.1".parse().unwrap()),
                },
                Nic { bridge: names::bridge(2), mac: names::mac(7, 1), address: "10.2.0.5".parse().unwrap(), prefix: 16, gateway: None },
            ],
            ready: None,
            command: None,
            cloud_init: Some(serde_json::json!({"users": [{"name": "alice", "ssh_authorized_keys": ["ssh-ed25519 AAAA alice"]}]})),
            env: Default::default(),
            files: Default::default(),
            exec: vec![],
            hostname: None,
            sysctls: Default::default(),
            ready_command: None,
            firmware: Default::default(),
            routes: vec![("10.70.0.0/16".parse().unwrap(), "10.2.0.1".parse().unwrap())],
            running: true,
        };
        let seed = no_cloud(&order, "bootcache.7.lab.web-1");
        let meta: serde_json::Value = serde_json::from_str(&seed.meta_data).unwrap();
        assert_eq!((meta["instance-id"].as_str(), meta["local-hostname"].as_str()), (Some("bootcache.7.lab.web-1"), Some("web-1")));
        let net: serde_json::Value = serde_json::from_str(&seed.network_config).unwrap();
        assert_eq!(net["version"], 2);
        assert_eq!(net["ethernets"]["nic0"]["match"]["macaddress"], "0a:00:00:00:07:00");
        assert_eq!(net["ethernets"]["nic0"]["addresses"][0], "10.1.0.5/24");
        assert_eq!(net["ethernets"]["nic0"]["routes"][0]["via"], "10.1.0.1");
        assert_eq!(
            net["ethernets"]["nic1"]["routes"],
            serde_json::json!([{"to": "10.70.0.0/16", "via": "10.2.0.1"}]),
            "on the interface that reaches its via"
        );
        let user = seed.user_data.unwrap();
        let (head, body) = user.split_once('\n').unwrap();
        assert_eq!(head, "#cloud-config");
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["users"][0]["name"], "alice");
    }
}
