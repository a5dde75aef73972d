//! Carrying out a heartbeat's orders: what the node holds is observed,
//! [`plan`](crate::plan) says what to do, and the executor here does it
//! through narrow traits ([`Links`], [`Rules`], [`DhcpService`],
//! [`Runtimes`]): the node's own implementation talks to netlink,
//! iptables, dnsmasq, libvirt and Docker; the tests' fakes keep a map.
//! Everything made is written in the agent's record before it is made, and
//! struck from it once it is gone.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::sync::Arc;

use bootcache_api::Image;
use bootcache_api::agent::{Dhcp, Observed, Orders, names};
use bootcache_api::{InstanceState, InterfaceName, Kind, Name};

use crate::Shared;
use crate::instance::{self, Local};
use crate::own::Record;
use crate::plan::{self, Action, LocalView, World};

/// The node's links.
pub(crate) trait Links: Sync {
    /// Every link, with its alias.
    fn links(&self) -> impl Future<Output = Result<HashMap<String, Option<String>>, String>> + Send;
    /// Makes a bridge marked `mark` (one of that name without it is refused).
    fn make_bridge(&self, name: &InterfaceName, mark: &str) -> impl Future<Output = Result<(), String>> + Send;
    /// Makes a VXLAN link marked `mark` on `bridge` (which carries `mark` too).
    fn make_vxlan(
        &self,
        name: &InterfaceName,
        mark: &str,
        vni: u32,
        bridge: &InterfaceName,
        remotes: &[Ipv4Addr],
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// Deletes a link if it carries `mark`.
    fn remove_link(&self, name: &str, mark: &str) -> impl Future<Output = Result<(), String>> + Send;
}

/// The node's FORWARD rules.
pub(crate) trait Rules: Sync {
    /// The rules with the marks' prefix: bridge, comment.
    fn rules(&self) -> impl Future<Output = Vec<(String, String)>> + Send;
    /// Lets a bridge's frames through, by a rule marked `mark`.
    fn allow_bridge(&self, bridge: &InterfaceName, mark: &str) -> impl Future<Output = Result<(), String>> + Send;
    /// Removes the rule of `bridge` marked `mark`.
    fn remove_rule(&self, bridge: &str, mark: &str) -> impl Future<Output = ()> + Send;
}

/// The node's DHCP servers.
pub(crate) trait DhcpService: Sync {
    /// The segments whose server runs.
    fn running(&self) -> HashSet<u32>;
    /// Makes sure segment `id`'s server runs (its link marked `mark`).
    fn ensure_dhcp(&self, id: u32, bridge: &InterfaceName, mark: &str, dhcp: &Dhcp) -> impl Future<Output = Result<(), String>> + Send;
    /// Stops it.
    fn stop_dhcp(&self, id: u32, mark: &str) -> impl Future<Output = ()> + Send;
}

/// The node's runtimes.
pub(crate) trait Runtimes: Sync {
    /// The instances that carry this agent's mark.
    fn instances(&self) -> impl Future<Output = HashMap<String, Kind>> + Send;
    /// Removes one (and its files).
    fn remove_instance(&self, id: &str, kind: Kind) -> impl Future<Output = Result<(), String>> + Send;
}

/// Everything the executor needs of a node.
pub(crate) trait Host: Links + Rules + DhcpService + Runtimes {}
impl<T: Links + Rules + DhcpService + Runtimes> Host for T {}

/// What the node holds, for the plan (`local`: the instances the agent
/// brings up or runs).
pub(crate) async fn observe(host: &impl Host, local: HashMap<u32, LocalView>) -> Result<World, String> {
    Ok(World { links: host.links().await?, rules: host.rules().await, instances: host.instances().await, dhcp: host.running(), local })
}

fn noted(what: &str, r: Result<(), String>) -> bool {
    match r {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "{what}");
            false
        }
    }
}

fn write(record: &Record, change: impl FnOnce(&mut crate::own::Owned)) {
    if let Err(e) = record.update(change) {
        tracing::error!(error = %e, "the record of what this agent made could not be written");
    }
}

/// Carries out the node-level actions of a plan (links, rules, DHCP,
/// leftovers); returns the instance actions, for the caller.
pub(crate) async fn execute(host: &impl Host, record: &Record, actions: Vec<Action>) -> Vec<Action> {
    let mut instances = Vec::new();
    for action in actions {
        match action {
            Action::RemoveLink { name, mark } => {
                if noted("link not removed", host.remove_link(&name, &mark).await) {
                    write(record, |o| drop(o.links.remove(&name)));
                }
            }
            Action::ForgetLink { name } => write(record, |o| drop(o.links.remove(&name))),
            Action::RemoveRule { bridge, mark } => {
                host.remove_rule(&bridge, &mark).await;
                write(record, |o| drop(o.rules.remove(&bridge)));
            }
            Action::ForgetRule { bridge } => write(record, |o| drop(o.rules.remove(&bridge))),
            Action::StopDhcp { id, mark } => host.stop_dhcp(id, &mark).await,
            Action::RemoveLeftover { id, kind } => {
                tracing::info!(instance = %id, "removing what an earlier run left");
                if noted("leftover not removed", host.remove_instance(&id, kind).await) {
                    write(record, |o| {
                        o.instances.remove(&id);
                    });
                }
            }
            Action::ForgetInstance { id } => write(record, |o| {
                o.instances.remove(&id);
            }),
            Action::MakeBridge { name, mark } => {
                write(record, |o| drop(o.links.insert(name.to_string(), mark.clone())));
                noted("bridge not made", host.make_bridge(&name, &mark).await);
            }
            Action::MakeVxlan { name, mark, vni, bridge, remotes } => {
                write(record, |o| drop(o.links.insert(name.to_string(), mark.clone())));
                noted("VXLAN link not made", host.make_vxlan(&name, &mark, vni, &bridge, &remotes).await);
            }
            Action::AllowBridge { bridge, mark } => {
                write(record, |o| drop(o.rules.insert(bridge.to_string(), mark.clone())));
                noted("no FORWARD rule for the segment (bridged frames may be dropped)", host.allow_bridge(&bridge, &mark).await);
            }
            Action::EnsureDhcp { id, bridge, mark, dhcp } => {
                write(record, |o| drop(o.links.insert(names::dhcp_link(id).to_string(), mark.clone())));
                noted("no DHCP for the segment's VMs", host.ensure_dhcp(id, &bridge, &mark, &dhcp).await);
            }
            Action::Refuse { segment, why } => tracing::warn!(%segment, %why, "segment refused"),
            a @ (Action::Drop { .. } | Action::BringUp(_) | Action::Fail { .. } | Action::Stop(_) | Action::Start(_)) => instances.push(a),
        }
    }
    instances
}

/// The node itself, as the executor sees it.
pub(crate) struct NodeHost<'a>(pub &'a Shared);

impl Links for NodeHost<'_> {
    async fn links(&self) -> Result<HashMap<String, Option<String>>, String> {
        let links = self.0.network.links().await.map_err(|e| bootcache_http::chain(&e))?;
        Ok(links.into_iter().map(|l| (l.name, l.alias)).collect())
    }
    async fn make_bridge(&self, name: &InterfaceName, mark: &str) -> Result<(), String> {
        self.0.network.ensure_bridge(name, mark).await.map(drop).map_err(|e| bootcache_http::chain(&e))
    }
    async fn make_vxlan(
        &self,
        name: &InterfaceName,
        mark: &str,
        vni: u32,
        bridge: &InterfaceName,
        remotes: &[Ipv4Addr],
    ) -> Result<(), String> {
        let net = &self.0.network;
        let index = net.ensure_bridge(bridge, mark).await.map_err(|e| bootcache_http::chain(&e))?;
        net.ensure_vxlan(name, mark, vni, self.0.local_ip, index, remotes).await.map_err(|e| bootcache_http::chain(&e))
    }
    async fn remove_link(&self, name: &str, mark: &str) -> Result<(), String> {
        self.0.network.remove(name, mark).await.map(drop).map_err(|e| bootcache_http::chain(&e))
    }
}

impl Rules for NodeHost<'_> {
    async fn rules(&self) -> Vec<(String, String)> {
        bootcache_network::firewall::rules(names::ALIAS_PREFIX).await
    }
    async fn allow_bridge(&self, bridge: &InterfaceName, mark: &str) -> Result<(), String> {
        bootcache_network::firewall::allow_bridge(bridge, mark).await.map_err(|e| e.to_string())
    }
    async fn remove_rule(&self, bridge: &str, mark: &str) {
        bootcache_network::firewall::remove_bridge(bridge, mark).await;
    }
}

impl DhcpService for NodeHost<'_> {
    fn running(&self) -> HashSet<u32> {
        self.0.dhcp.running().into_iter().collect()
    }
    async fn ensure_dhcp(&self, id: u32, bridge: &InterfaceName, mark: &str, dhcp: &Dhcp) -> Result<(), String> {
        self.0.dhcp.ensure(&self.0.network, id, bridge, mark, mark, dhcp).await.map_err(|e| bootcache_http::chain(&e))
    }
    async fn stop_dhcp(&self, id: u32, mark: &str) {
        self.0.dhcp.stop(&self.0.network, id, mark).await;
    }
}

impl Runtimes for NodeHost<'_> {
    async fn instances(&self) -> HashMap<String, Kind> {
        let mut out = HashMap::new();
        for (kind, rt) in &self.0.runtimes {
            match rt.list().await {
                Ok(ids) => out.extend(ids.into_iter().map(|id| (id, *kind))),
                Err(e) => tracing::warn!(runtime = rt.name(), error = %e, "cannot list instances"),
            }
        }
        out
    }
    async fn remove_instance(&self, id: &str, kind: Kind) -> Result<(), String> {
        instance::remove(self.0, kind, id).await
    }
}

/// What the node's instances are doing, for the heartbeat.
pub(crate) fn observed(shared: &Shared) -> Vec<Observed> {
    let all = shared.instances.lock().unwrap_or_else(|p| p.into_inner());
    let mut out: Vec<Observed> = all
        .values()
        .map(|l| Observed {
            uid: l.order.uid,
            lab: l.order.lab.clone(),
            name: l.order.name.clone(),
            state: l.state,
            reason: l.reason.clone(),
        })
        .collect();
    drop(all);
    let removing = shared.removing.lock().unwrap_or_else(|p| p.into_inner());
    out.extend(removing.iter().map(|(uid, (lab, name, state))| Observed {
        uid: *uid,
        lab: lab.clone(),
        name: name.clone(),
        state: *state,
        reason: None,
    }));
    out.sort_by(|a, b| (&a.lab, &a.name, a.uid).cmp(&(&b.lab, &b.name, b.uid)));
    out
}

/// Carries out `orders`.
pub(crate) async fn apply(shared: &Arc<Shared>, orders: Orders) {
    let local: HashMap<u32, LocalView> = shared
        .instances
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(uid, l)| {
            let busy = l.task.as_ref().is_some_and(|t| !t.is_finished());
            (*uid, LocalView { id: names::instance(*uid, &l.order.lab, &l.order.name), kind: l.order.kind(), state: l.state, busy })
        })
        .collect();
    let host = NodeHost(shared);
    let world = match observe(&host, local).await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot see what the node holds; orders left to the next heartbeat");
            return;
        }
    };
    let actions = plan::plan(&shared.config.name, &orders, &world, &shared.record.get());
    // Containers join their bridges by these marks.
    let marks: HashMap<String, String> =
        orders.segments.iter().map(|s| (s.bridge.to_string(), plan::segment_mark(&shared.config.name, s))).collect();
    *shared.bridge_marks.lock().unwrap_or_else(|p| p.into_inner()) = marks;
    for action in execute(&host, &shared.record, actions).await {
        carry_out(shared, action).await;
    }
    // Exports no ordered VM uses.
    let roots: HashSet<String> = orders
        .instances
        .iter()
        .filter_map(|o| match &o.image {
            Image::Bootcache { root, .. } => Some(instance::export_name(root)),
            _ => None,
        })
        .collect();
    for named in shared.node.status() {
        if !roots.contains(&named.name) {
            shared.node.close(&named.name);
        }
    }
    // Overlays, consoles and seeds (the agent's own directory) of instances no order lists.
    let ordered: HashSet<String> = orders.instances.iter().map(|o| names::instance(o.uid, &o.lab, &o.name)).collect();
    for (dir, ext) in [("overlays", ".qcow2")] {
        if let Ok(entries) = std::fs::read_dir(shared.config.state_dir.join(dir)) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.strip_suffix(ext).is_some_and(|id| !ordered.contains(id)) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// Carries out an instance action.
async fn carry_out(shared: &Arc<Shared>, action: Action) {
    use bootcache_api::InstanceState::Placed;
    match action {
        Action::BringUp(order) => {
            let mut all = shared.instances.lock().unwrap_or_else(|p| p.into_inner());
            let task = tokio::spawn(instance::bring_up(Arc::clone(shared), order.clone()));
            all.insert(order.uid, Local { order, state: Placed, reason: None, task: Some(task) });
        }
        Action::Fail { order, why } => {
            let mut all = shared.instances.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(t) = all.get_mut(&order.uid).and_then(|l| l.task.take()) {
                t.abort();
            }
            tracing::warn!(instance = %names::instance(order.uid, &order.lab, &order.name), %why, "failed");
            all.insert(order.uid, Local { order, state: InstanceState::Failed, reason: Some(why), task: None });
        }
        Action::Stop(order) => {
            let mut all = shared.instances.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = all.get_mut(&order.uid) {
                l.order = order.clone();
                l.task = Some(tokio::spawn(instance::stop(Arc::clone(shared), order)));
            }
        }
        Action::Start(order) => {
            let mut all = shared.instances.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = all.get_mut(&order.uid) {
                l.order = order.clone();
                l.task = Some(tokio::spawn(instance::start(Arc::clone(shared), order)));
            }
        }
        Action::Drop { uid, id, kind } => {
            let local = shared.instances.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
            if let Some(mut l) = local {
                if let Some(t) = l.task.take() {
                    t.abort();
                }
                // Still reported until gone, so destroy waits for it.
                shared.removing.lock().unwrap_or_else(|p| p.into_inner()).insert(uid, (l.order.lab.clone(), l.order.name.clone(), l.state));
            }
            tracing::info!(instance = %id, "removing");
            let mine = shared.record.get().instances.contains_key(&id);
            if mine {
                match instance::remove(shared, kind, &id).await {
                    Ok(()) => write(&shared.record, |o| {
                        o.instances.remove(&id);
                    }),
                    Err(e) => tracing::warn!(instance = %id, error = %e, "not removed"),
                }
            }
            shared.removing.lock().unwrap_or_else(|p| p.into_inner()).remove(&uid);
        }
        other => tracing::error!(action = ?other, "not an instance action"),
    }
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

/// The mark of instance `order`'s links on this node.
pub(crate) fn instance_mark(node: &Name, order: &bootcache_api::agent::Order) -> String {
    plan::instance_mark(node, order)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A node in memory: what the executor does to it, and what it refuses.
    #[derive(Default)]
    struct FakeHost {
        links: Mutex<HashMap<String, Option<String>>>,
        rules: Mutex<Vec<(String, String)>>,
        dhcp: Mutex<HashSet<u32>>,
        instances: Mutex<HashMap<String, Kind>>,
    }

    impl FakeHost {
        fn ours(&self, name: &str, mark: &str) -> Result<bool, String> {
            match self.links.lock().unwrap().get(name) {
                None => Ok(false),
                Some(Some(a)) if a == mark => Ok(true),
                Some(_) => Err(format!("{name} is not ours")),
            }
        }
    }

    impl Links for FakeHost {
        async fn links(&self) -> Result<HashMap<String, Option<String>>, String> {
            Ok(self.links.lock().unwrap().clone())
        }
        async fn make_bridge(&self, name: &InterfaceName, mark: &str) -> Result<(), String> {
            self.ours(name.as_str(), mark)?;
            self.links.lock().unwrap().insert(name.to_string(), Some(mark.to_owned()));
            Ok(())
        }
        async fn make_vxlan(&self, name: &InterfaceName, mark: &str, _: u32, bridge: &InterfaceName, _: &[Ipv4Addr]) -> Result<(), String> {
            if !self.ours(bridge.as_str(), mark)? {
                return Err("no bridge".into());
            }
            self.make_bridge(name, mark).await
        }
        async fn remove_link(&self, name: &str, mark: &str) -> Result<(), String> {
            if self.ours(name, mark)? {
                self.links.lock().unwrap().remove(name);
            }
            Ok(())
        }
    }

    impl Rules for FakeHost {
        async fn rules(&self) -> Vec<(String, String)> {
            self.rules.lock().unwrap().clone()
        }
        async fn allow_bridge(&self, bridge: &InterfaceName, mark: &str) -> Result<(), String> {
            self.rules.lock().unwrap().push((bridge.to_string(), mark.to_owned()));
            Ok(())
        }
        async fn remove_rule(&self, bridge: &str, mark: &str) {
            self.rules.lock().unwrap().retain(|(b, m)| !(b == bridge && m == mark));
        }
    }

    impl DhcpService for FakeHost {
        fn running(&self) -> HashSet<u32> {
            self.dhcp.lock().unwrap().clone()
        }
        async fn ensure_dhcp(&self, id: u32, _: &InterfaceName, mark: &str, _: &Dhcp) -> Result<(), String> {
            let link = names::dhcp_link(id).to_string();
            self.ours(&link, mark)?;
            self.links.lock().unwrap().insert(link, Some(mark.to_owned()));
            self.dhcp.lock().unwrap().insert(id);
            Ok(())
        }
        async fn stop_dhcp(&self, id: u32, _: &str) {
            self.dhcp.lock().unwrap().remove(&id);
            self.links.lock().unwrap().remove(names::dhcp_link(id).as_str());
        }
    }

    impl Runtimes for FakeHost {
        async fn instances(&self) -> HashMap<String, Kind> {
            self.instances.lock().unwrap().clone()
        }
        async fn remove_instance(&self, id: &str, _: Kind) -> Result<(), String> {
            self.instances.lock().unwrap().remove(id);
            Ok(())
        }
    }

    fn orders(remotes: usize, dhcp: bool) -> Orders {
        let seg = bootcache_api::agent::SegmentOrder {
            id: 3,
            lab: "lab".parse().unwrap(),
            segment: "lan".parse().unwrap(),
            bridge: names::bridge(3),
            vxlan: names::vxlan(3),
            vni: 3,
            remotes: (0..remotes).map(|i| Ipv4Addr::new(10, 0, 0, 2 + i as u8)).collect(),
            dhcp: dhcp.then(|| Dhcp { server: Ipv4Addr::new(10, 9, 0, 254), prefix: 24, hosts: vec![], gateway: None }),
        };
        Orders { instances: vec![], segments: vec![seg], tasks: vec![] }
    }

    async fn round(host: &FakeHost, record: &Record, o: &Orders) {
        let node: Name = "node-a".parse().unwrap();
        let world = observe(host, HashMap::new()).await.unwrap();
        let actions = plan::plan(&node, o, &world, &record.get());
        assert!(execute(host, record, actions).await.is_empty());
    }

    #[tokio::test]
    async fn the_executor_records_what_it_makes_and_removes_only_that() {
        let dir = tempfile::tempdir().unwrap();
        let record = Record::open(&dir.path().join("owned.json")).unwrap();
        let host = FakeHost::default();
        host.links.lock().unwrap().insert("eth0".into(), None);
        host.rules.lock().unwrap().push(("docker0".into(), "bootcache someone else".into()));
        round(&host, &record, &orders(1, true)).await;
        let owned = record.get();
        assert_eq!(owned.links.keys().map(String::as_str).collect::<Vec<_>>(), ["bc00000003", "bd00000003", "bx00000003"]);
        assert_eq!(owned.rules.len(), 1);
        assert!(host.dhcp.lock().unwrap().contains(&3));
        // Restarted (a new record read from the same file): the same, nothing changes.
        let record = Record::open(&dir.path().join("owned.json")).unwrap();
        round(&host, &record, &orders(1, true)).await;
        assert_eq!(record.get(), owned);
        // Changed, then gone: only what it made goes, and its record with it.
        round(&host, &record, &orders(0, false)).await;
        assert!(!host.links.lock().unwrap().contains_key("bx00000003") && host.dhcp.lock().unwrap().is_empty());
        round(&host, &record, &Orders::default()).await;
        assert_eq!(record.get(), crate::own::Owned::default());
        let links = host.links.lock().unwrap().clone();
        assert_eq!(links, HashMap::from([("eth0".to_owned(), None)]), "the node's own link stays");
        assert_eq!(*host.rules.lock().unwrap(), vec![("docker0".to_owned(), "bootcache someone else".to_owned())], "their rule stays");
    }
}
