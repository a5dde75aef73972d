//! Carrying out a heartbeat's orders: segments made, new instances brought
//! up, and everything no order lists any more removed (instances, their
//! overlays and exports, bridges, VXLAN links, veths, DHCP servers),
//! including what an earlier run of the agent left.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use bootcache_api::agent::{ImageOrder, Observed, Orders, names};
use bootcache_api::{Kind, Name};
use bootcache_runtime::Runtime;

use crate::Shared;
use crate::instance::{self, Local};

/// What the node's instances are doing, for the heartbeat.
pub(crate) fn observed(shared: &Shared) -> Vec<Observed> {
    let all = shared.instances.lock().unwrap_or_else(|p| p.into_inner());
    let mut out: Vec<Observed> = all
        .values()
        .map(|l| Observed { lab: l.order.lab.clone(), name: l.order.name.clone(), state: l.state, reason: l.reason.clone() })
        .collect();
    drop(all);
    let removing = shared.removing.lock().unwrap_or_else(|p| p.into_inner());
    out.extend(removing.iter().map(|((lab, name), state)| Observed { lab: lab.clone(), name: name.clone(), state: *state, reason: None }));
    out.sort_by(|a, b| (&a.lab, &a.name).cmp(&(&b.lab, &b.name)));
    out
}

/// Carries out `orders`.
pub(crate) async fn apply(shared: &Arc<Shared>, orders: Orders) {
    // Segments first: instances join them.
    let mut bridges: HashSet<String> = HashSet::new();
    for seg in &orders.segments {
        bridges.insert(seg.bridge.to_string());
        let owner = format!("{}/{}", seg.lab, seg.segment);
        let made = async {
            let index = shared.network.ensure_bridge(&seg.bridge, &owner).await?;
            if seg.remotes.is_empty() {
                shared.network.delete(seg.vxlan.as_str()).await?;
            } else {
                bridges.insert(seg.vxlan.to_string());
                shared.network.ensure_vxlan(&seg.vxlan, &owner, seg.vni, shared.local_ip, index, &seg.remotes).await?;
            }
            if let Some(d) = &seg.dhcp {
                shared.network.ensure_address(seg.bridge.as_str(), d.server, d.prefix).await?;
            }
            Ok::<_, bootcache_network::NetError>(())
        };
        if let Err(e) = made.await {
            tracing::error!(segment = %owner, error = %bootcache_delivery::node::chain(&e), "segment not made");
            continue;
        }
        if let Err(e) = bootcache_network::firewall::allow_bridge(&seg.bridge, &owner).await {
            tracing::warn!(segment = %owner, error = %e, "no FORWARD rule for the segment (bridged frames may be dropped)");
        }
        match &seg.dhcp {
            Some(d) => {
                if let Err(e) = shared.dhcp.ensure(&seg.bridge, d) {
                    tracing::error!(segment = %owner, error = %e, "no DHCP for its VMs");
                }
            }
            None => shared.dhcp.stop(seg.bridge.as_str()),
        }
    }

    // Instances: new ones brought up, gone ones removed.
    let wanted: HashMap<(Name, Name), &bootcache_api::agent::Order> =
        orders.instances.iter().map(|o| ((o.lab.clone(), o.name.clone()), o)).collect();
    let mut gone = Vec::new();
    {
        let mut all = shared.instances.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|key, local| {
            if wanted.contains_key(key) {
                return true;
            }
            if let Some(t) = local.task.take() {
                t.abort();
            }
            shared.removing.lock().unwrap_or_else(|p| p.into_inner()).insert(key.clone(), local.state);
            gone.push(local.order.clone());
            false
        });
        for (key, order) in &wanted {
            use bootcache_api::InstanceState::{Ready, Stopped};
            match all.get_mut(key) {
                None => {
                    let task = tokio::spawn(instance::bring_up(Arc::clone(shared), (*order).clone()));
                    all.insert(
                        key.clone(),
                        Local { order: (*order).clone(), state: bootcache_api::InstanceState::Placed, reason: None, task: Some(task) },
                    );
                }
                // Stopped or started on request, once nothing else runs for it.
                Some(local) if local.task.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) => {
                    local.order = (*order).clone();
                    if !order.running && local.state == Ready {
                        local.task = Some(tokio::spawn(instance::stop(Arc::clone(shared), (*order).clone())));
                    } else if order.running && local.state == Stopped {
                        local.task = Some(tokio::spawn(instance::start(Arc::clone(shared), (*order).clone())));
                    }
                }
                Some(_) => {}
            }
        }
    }
    let ordered_ids: HashSet<String> = wanted.keys().map(|(lab, name)| names::instance(lab, name)).collect();
    for order in gone {
        remove(shared, order.kind, &names::instance(&order.lab, &order.name)).await;
        shared.removing.lock().unwrap_or_else(|p| p.into_inner()).remove(&(order.lab.clone(), order.name.clone()));
    }
    // Leftovers of an earlier run: made by us, ordered by no one.
    if let Some(lv) = &shared.libvirt {
        for id in lv.list().await.unwrap_or_default().into_iter().filter(|id| !ordered_ids.contains(id)) {
            remove(shared, Kind::Vm, &id).await;
        }
    }
    if let Some(d) = &shared.docker {
        for id in d.list().await.unwrap_or_default().into_iter().filter(|id| !ordered_ids.contains(id)) {
            remove(shared, Kind::Container, &id).await;
        }
    }
    // Overlays no ordered VM uses.
    if let Ok(dir) = std::fs::read_dir(shared.config.state_dir.join("overlays")) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.strip_suffix(".qcow2").is_some_and(|id| !ordered_ids.contains(id)) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    // Exports no ordered VM uses.
    let roots: HashSet<String> = orders
        .instances
        .iter()
        .filter_map(|o| match &o.image {
            ImageOrder::Vm { root, .. } => Some(instance::export_name(root)),
            ImageOrder::Disk { .. } | ImageOrder::Container { .. } => None,
        })
        .collect();
    for named in shared.node.status() {
        if !roots.contains(&named.name) {
            shared.node.close(&named.name);
        }
    }
    // Links we made that no segment or ordered container needs.
    let veths: HashSet<String> = orders
        .instances
        .iter()
        .filter(|o| o.kind == Kind::Container)
        .flat_map(|o| (0..o.nics.len()).map(|i| names::veth(&o.lab, &o.name, i).to_string()))
        .collect();
    match shared.network.made().await {
        Ok(made) => {
            for m in made.into_iter().filter(|m| !bridges.contains(&m.name) && !veths.contains(&m.name)) {
                tracing::info!(link = %m.name, owner = %m.owner, "removing a link no order needs");
                if let Err(e) = shared.network.delete(&m.name).await {
                    tracing::warn!(link = %m.name, error = %bootcache_delivery::node::chain(&e), "link not removed");
                }
            }
        }
        Err(e) => tracing::warn!(error = %bootcache_delivery::node::chain(&e), "cannot list links"),
    }
    for (b, _) in bootcache_network::firewall::rules().await {
        if !orders.segments.iter().any(|s| s.bridge.as_str() == b) {
            bootcache_network::firewall::remove_bridge(&b).await;
        }
    }
    for b in shared.dhcp.bridges() {
        if !orders.segments.iter().any(|s| s.bridge.as_str() == b && s.dhcp.is_some()) {
            shared.dhcp.stop(&b);
        }
    }
}

async fn remove(shared: &Shared, kind: Kind, id: &str) {
    tracing::info!(instance = %id, "removing");
    let result = match kind {
        Kind::Vm => match &shared.libvirt {
            Some(lv) => lv.destroy(id).await,
            None => Ok(()),
        },
        Kind::Container => match &shared.docker {
            Some(d) => d.destroy(id).await,
            None => Ok(()),
        },
    };
    if let Err(e) = result {
        tracing::warn!(instance = %id, error = %e, "not removed");
    }
    let _ = std::fs::remove_file(shared.config.state_dir.join("overlays").join(format!("{id}.qcow2")));
}

/// Stops bringing anything up (the agent is stopping; what runs, runs on).
pub(crate) fn stop_all(shared: &Shared) {
    let mut all = shared.instances.lock().unwrap_or_else(|p| p.into_inner());
    for l in all.values_mut() {
        if let Some(t) = l.task.take() {
            t.abort();
        }
    }
}
