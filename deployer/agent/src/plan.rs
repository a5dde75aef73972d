//! Reconciling as data: what the orders want, what the node holds and
//! what the agent's record says it made go in; a list of actions comes
//! out, for the executor ([`crate::reconcile`]) to carry out. Nothing here
//! touches the node, so every rule is tested with plain values.
//!
//! The rules:
//! - A thing is the agent's when its record and its mark agree. Only such
//!   a thing is changed or removed; one the orders want by a name that
//!   someone else holds (a foreign interface, or one whose mark is not this
//!   agent's) is refused, and whatever needs it fails with the reason.
//! - What the record lists and the node no longer has is forgotten; what
//!   carries the agent's mark but is not in its record is left alone.
//! - Removals come before makes (a name freed by one lab may be another's).

use std::collections::{BTreeMap, HashMap, HashSet};

use bootcache_api::agent::{Dhcp, Order, Orders, SegmentOrder, names};
use bootcache_api::{InstanceState, InterfaceName, Kind, Name};

use crate::own::Owned;

/// An instance the agent is bringing up or runs, as the plan sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct LocalView {
    /// Its runtime id.
    pub id: String,
    /// VM or container.
    pub kind: Kind,
    /// Where it stands.
    pub state: InstanceState,
    /// Whether something is being done for it now (bringing up, stopping).
    pub busy: bool,
}

/// What the node holds now.
#[derive(Clone, Debug, Default)]
pub(crate) struct World {
    /// Every link, with its alias.
    pub links: HashMap<String, Option<String>>,
    /// FORWARD rules whose comment has the marks' prefix: bridge, comment.
    pub rules: Vec<(String, String)>,
    /// Runtime instances that carry this agent's mark, by id.
    pub instances: HashMap<String, Kind>,
    /// Segments whose DHCP server runs.
    pub dhcp: HashSet<u32>,
    /// The instances the agent brings up or runs, by number.
    pub local: HashMap<u32, LocalView>,
}

/// One step for the executor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// An instance no order lists: stop what is done for it, remove it.
    Drop {
        /// Its number.
        uid: u32,
        /// Its runtime id.
        id: String,
        /// VM or container.
        kind: Kind,
    },
    /// A runtime instance an earlier run made (record and mark agree) that
    /// no order lists.
    RemoveLeftover {
        /// Its runtime id.
        id: String,
        /// VM or container.
        kind: Kind,
    },
    /// A record entry whose instance the runtime no longer has.
    ForgetInstance {
        /// Its runtime id.
        id: String,
    },
    /// A link of the agent's that nothing needs.
    RemoveLink {
        /// Its name.
        name: String,
        /// Its mark.
        mark: String,
    },
    /// A record entry whose link is gone, or is not the agent's any more.
    ForgetLink {
        /// Its name.
        name: String,
    },
    /// A FORWARD rule of the agent's that no segment needs.
    RemoveRule {
        /// Its bridge.
        bridge: String,
        /// Its mark.
        mark: String,
    },
    /// A record entry whose rule is gone.
    ForgetRule {
        /// Its bridge.
        bridge: String,
    },
    /// A DHCP server no segment needs.
    StopDhcp {
        /// The segment's number.
        id: u32,
        /// The mark of its link.
        mark: String,
    },
    /// A segment's bridge.
    MakeBridge {
        /// Its name.
        name: InterfaceName,
        /// Its mark.
        mark: String,
    },
    /// A segment's VXLAN link to the other nodes.
    MakeVxlan {
        /// Its name.
        name: InterfaceName,
        /// Its mark.
        mark: String,
        /// Its VNI.
        vni: u32,
        /// The bridge it joins.
        bridge: InterfaceName,
        /// The other nodes.
        remotes: Vec<std::net::Ipv4Addr>,
    },
    /// A segment's FORWARD rule.
    AllowBridge {
        /// The bridge.
        bridge: InterfaceName,
        /// Its mark.
        mark: String,
    },
    /// A segment's DHCP server, in its own namespace.
    EnsureDhcp {
        /// The segment's number.
        id: u32,
        /// Its bridge.
        bridge: InterfaceName,
        /// The segment's mark (its bridge's and its DHCP link's).
        mark: String,
        /// What it serves.
        dhcp: Dhcp,
    },
    /// A segment that is not made: a name it needs is someone else's.
    Refuse {
        /// `lab/segment`.
        segment: String,
        /// Why.
        why: String,
    },
    /// A new instance to bring up.
    BringUp(Order),
    /// An instance that cannot be made (a segment of its was refused).
    Fail {
        /// What was ordered.
        order: Order,
        /// Why.
        why: String,
    },
    /// A ready instance to stop (stopped on request).
    Stop(Order),
    /// A stopped instance to start again.
    Start(Order),
}

/// The mark of everything made for segment `seg` by the agent of `node`.
pub(crate) fn segment_mark(node: &Name, seg: &SegmentOrder) -> String {
    format!("{}{node} segment {} {}/{}", names::ALIAS_PREFIX, seg.id, seg.lab, seg.segment)
}

/// The mark of everything made for instance `order` by the agent of `node`.
pub(crate) fn instance_mark(node: &Name, order: &Order) -> String {
    format!("{}{node} instance {} {}/{}", names::ALIAS_PREFIX, order.uid, order.lab, order.name)
}

/// Which of the agent's things `orders` want: every link by name with
/// its mark, and every rule by bridge with its mark.
struct Wanted {
    links: BTreeMap<String, String>,
    rules: BTreeMap<String, String>,
}

/// The plan: what to do so that the node holds what `orders` want, given
/// what it holds (`world`) and what the agent made (`owned`).
pub(crate) fn plan(node: &Name, orders: &Orders, world: &World, owned: &Owned) -> Vec<Action> {
    let mut removals = Vec::new();
    let mut makes = Vec::new();
    let mut wanted = Wanted { links: BTreeMap::new(), rules: BTreeMap::new() };
    // A link the agent may make or keep under `name` with `mark`: absent,
    // or its own with that mark, or its own with another mark (removed
    // first). Anything else is someone else's.
    let usable = |name: &str, mark: &str, removals: &mut Vec<Action>| -> bool {
        match world.links.get(name) {
            None => true,
            Some(alias) => match owned.links.get(name) {
                Some(m) if alias.as_deref() == Some(m.as_str()) => {
                    if m != mark {
                        removals.push(Action::RemoveLink { name: name.to_owned(), mark: m.clone() });
                    }
                    true
                }
                _ => false,
            },
        }
    };

    let mut refused: HashMap<&InterfaceName, String> = HashMap::new();
    for seg in &orders.segments {
        let mark = segment_mark(node, seg);
        let needs: Vec<(&str, InterfaceName)> = [
            Some(("bridge", seg.bridge.clone())),
            (!seg.remotes.is_empty()).then(|| ("VXLAN link", seg.vxlan.clone())),
            seg.dhcp.as_ref().map(|_| ("DHCP link", names::dhcp_link(seg.id))),
        ]
        .into_iter()
        .flatten()
        .collect();
        let mut moves = Vec::new();
        if let Some((what, name)) = needs.iter().find(|(_, n)| !usable(n.as_str(), &mark, &mut moves)) {
            let why = format!(
                "{what} {name} exists on node {node} and was not made by its agent: segment {}/{} is not made (name another bridge, or remove {name})",
                seg.lab, seg.segment
            );
            refused.insert(&seg.bridge, why.clone());
            makes.push(Action::Refuse { segment: format!("{}/{}", seg.lab, seg.segment), why });
            continue;
        }
        removals.extend(moves);
        for (_, name) in &needs {
            wanted.links.insert(name.to_string(), mark.clone());
        }
        makes.push(Action::MakeBridge { name: seg.bridge.clone(), mark: mark.clone() });
        if !seg.remotes.is_empty() {
            makes.push(Action::MakeVxlan {
                name: seg.vxlan.clone(),
                mark: mark.clone(),
                vni: seg.vni,
                bridge: seg.bridge.clone(),
                remotes: seg.remotes.clone(),
            });
        }
        wanted.rules.insert(seg.bridge.to_string(), mark.clone());
        makes.push(Action::AllowBridge { bridge: seg.bridge.clone(), mark: mark.clone() });
        if let Some(d) = &seg.dhcp {
            makes.push(Action::EnsureDhcp { id: seg.id, bridge: seg.bridge.clone(), mark: mark.clone(), dhcp: d.clone() });
        }
    }
    let dhcp_wanted: HashSet<u32> =
        orders.segments.iter().filter(|s| s.dhcp.is_some() && !refused.contains_key(&s.bridge)).map(|s| s.id).collect();
    for id in world.dhcp.iter().filter(|id| !dhcp_wanted.contains(id)) {
        let mark = orders.segments.iter().find(|s| s.id == *id).map(|s| segment_mark(node, s));
        let mark = mark.or_else(|| owned.links.get(names::dhcp_link(*id).as_str()).cloned()).unwrap_or_default();
        removals.push(Action::StopDhcp { id: *id, mark });
    }

    // Instances.
    let mut bring = Vec::new();
    let ordered: HashMap<u32, &Order> = orders.instances.iter().map(|o| (o.uid, o)).collect();
    for order in &orders.instances {
        if order.kind() == Kind::Container {
            for (i, _) in order.nics.iter().enumerate() {
                if let Ok(i) = u8::try_from(i) {
                    wanted.links.insert(names::veth(order.uid, i).to_string(), instance_mark(node, order));
                }
            }
        }
        let local = world.local.get(&order.uid);
        if let Some(why) = order.nics.iter().find_map(|n| refused.get(&n.bridge)) {
            if local.is_none_or(|l| l.state != InstanceState::Failed) {
                bring.push(Action::Fail { order: order.clone(), why: why.clone() });
            }
            continue;
        }
        match local {
            None => bring.push(Action::BringUp(order.clone())),
            Some(l) if !l.busy && !order.running && l.state == InstanceState::Ready => bring.push(Action::Stop(order.clone())),
            Some(l) if !l.busy && order.running && l.state == InstanceState::Stopped => bring.push(Action::Start(order.clone())),
            Some(_) => {}
        }
    }
    let mut local: Vec<(&u32, &LocalView)> = world.local.iter().filter(|(uid, _)| !ordered.contains_key(uid)).collect();
    local.sort_by_key(|(uid, _)| **uid);
    for (uid, l) in local {
        removals.push(Action::Drop { uid: *uid, id: l.id.clone(), kind: l.kind });
    }
    let busy: HashSet<&str> = world.local.values().map(|l| l.id.as_str()).collect();
    for (id, kind) in &owned.instances {
        if busy.contains(id.as_str()) || names::uid_of(id).is_some_and(|u| ordered.contains_key(&u)) {
            continue;
        }
        if world.instances.get(id) == Some(kind) {
            removals.push(Action::RemoveLeftover { id: id.clone(), kind: *kind });
        } else {
            removals.push(Action::ForgetInstance { id: id.clone() });
        }
    }

    // Links and rules the agent made that nothing wants (or wants under
    // another mark: taken care of above).
    for (name, mark) in &owned.links {
        if wanted.links.contains_key(name) {
            continue;
        }
        match world.links.get(name) {
            Some(Some(alias)) if alias == mark => removals.push(Action::RemoveLink { name: name.clone(), mark: mark.clone() }),
            _ => removals.push(Action::ForgetLink { name: name.clone() }),
        }
    }
    for (bridge, mark) in &owned.rules {
        if wanted.rules.get(bridge) == Some(mark) {
            continue;
        }
        if world.rules.iter().any(|(b, c)| b == bridge && c == mark) {
            removals.push(Action::RemoveRule { bridge: bridge.clone(), mark: mark.clone() });
        } else {
            removals.push(Action::ForgetRule { bridge: bridge.clone() });
        }
    }
    // Remove what things sit on before what they sit on.
    removals.sort_by_key(|a| match a {
        Action::Drop { .. } | Action::RemoveLeftover { .. } | Action::ForgetInstance { .. } => 0,
        Action::StopDhcp { .. } => 1,
        Action::RemoveLink { name, .. } if name.starts_with("bc") => 3,
        _ => 2,
    });
    removals.dedup();
    removals.into_iter().chain(makes).chain(bring).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bootcache_api::Image;
    use bootcache_api::agent::{Mac, Nic};
    use std::net::Ipv4Addr;

    fn n(s: &str) -> Name {
        s.parse().unwrap()
    }

    fn segment(id: u32, remotes: usize, dhcp: bool) -> SegmentOrder {
        SegmentOrder {
            id,
            lab: n("lab"),
            segment: n("lan"),
            bridge: names::bridge(id),
            vxlan: names::vxlan(id),
            vni: id,
            remotes: (0..remotes).map(|i| Ipv4Addr::new(10, 0, 0, 2 + i as u8)).collect(),
            dhcp: dhcp.then(|| Dhcp {
                server: Ipv4Addr::new(10, 9, 0, 254),
                prefix: 24,
                hosts: vec![(Mac([0x0a, 0, 0, 0, 1, 0]), Ipv4Addr::new(10, 9, 0, 1))],
                gateway: None,
            }),
        }
    }

    fn container(uid: u32, bridge: &InterfaceName) -> Order {
        Order {
            uid,
            lab: n("lab"),
            name: n(&format!("c{uid}")),
            image: Image::Tarball { url: "http://s/x.tar".into(), digest: None },
            sources: vec![],
            layer_sources: vec![],
            cpus: 1,
            memory_bytes: 64 << 20,
            nics: vec![Nic {
                bridge: bridge.clone(),
                mac: names::mac(uid, 0),
                address: Ipv4Addr::new(10, 9, 0, 1),
                prefix: 24,
                gateway: None,
            }],
            ready: None,
            command: None,
            cloud_init: None,
            env: Default::default(),
            files: Default::default(),
            exec: vec![],
            hostname: None,
            sysctls: Default::default(),
            ready_command: None,
            firmware: Default::default(),
            routes: vec![],
            running: true,
        }
    }

    /// A node as the executor's fakes keep it: the plan applied to it.
    #[derive(Default)]
    struct Fake {
        world: World,
        owned: Owned,
    }

    impl Fake {
        fn apply(&mut self, node: &Name, orders: &Orders) -> Vec<Action> {
            let actions = plan(node, orders, &self.world, &self.owned);
            for a in &actions {
                match a {
                    Action::MakeBridge { name, mark } | Action::MakeVxlan { name, mark, .. } => {
                        self.owned.links.insert(name.to_string(), mark.clone());
                        self.world.links.insert(name.to_string(), Some(mark.clone()));
                    }
                    Action::EnsureDhcp { id, mark, .. } => {
                        let link = names::dhcp_link(*id).to_string();
                        self.owned.links.insert(link.clone(), mark.clone());
                        self.world.links.insert(link, Some(mark.clone()));
                        self.world.dhcp.insert(*id);
                    }
                    Action::AllowBridge { bridge, mark } => {
                        self.owned.rules.insert(bridge.to_string(), mark.clone());
                        self.world.rules.push((bridge.to_string(), mark.clone()));
                    }
                    Action::RemoveLink { name, mark } => {
                        assert_eq!(self.world.links.get(name), Some(&Some(mark.clone())), "removes only what carries its mark");
                        self.world.links.remove(name);
                        self.owned.links.remove(name);
                    }
                    Action::ForgetLink { name } => {
                        self.owned.links.remove(name);
                    }
                    Action::RemoveRule { bridge, mark } => {
                        self.world.rules.retain(|(b, c)| !(b == bridge && c == mark));
                        self.owned.rules.remove(bridge);
                    }
                    Action::ForgetRule { bridge } => {
                        self.owned.rules.remove(bridge);
                    }
                    Action::StopDhcp { id, .. } => {
                        self.world.dhcp.remove(id);
                    }
                    Action::BringUp(o) => {
                        let id = names::instance(o.uid, &o.lab, &o.name);
                        self.owned.instances.insert(id.clone(), o.kind());
                        self.world.instances.insert(id.clone(), o.kind());
                        let mark = instance_mark(node, o);
                        for i in 0..o.nics.len() {
                            let v = names::veth(o.uid, i as u8).to_string();
                            self.owned.links.insert(v.clone(), mark.clone());
                            self.world.links.insert(v, Some(mark.clone()));
                        }
                        self.world.local.insert(o.uid, LocalView { id, kind: o.kind(), state: InstanceState::Ready, busy: false });
                    }
                    Action::Fail { order, .. } => {
                        let id = names::instance(order.uid, &order.lab, &order.name);
                        self.world.local.insert(order.uid, LocalView { id, kind: order.kind(), state: InstanceState::Failed, busy: false });
                    }
                    Action::Drop { uid, id, .. } => {
                        self.world.local.remove(uid);
                        self.world.instances.remove(id);
                        self.owned.instances.remove(id);
                    }
                    Action::RemoveLeftover { id, .. } => {
                        self.world.instances.remove(id);
                        self.owned.instances.remove(id);
                    }
                    Action::ForgetInstance { id } => {
                        self.owned.instances.remove(id);
                    }
                    Action::Refuse { .. } | Action::Stop(_) | Action::Start(_) => {}
                }
            }
            actions
        }
    }

    #[test]
    fn create_change_and_remove_converge_and_leave_nothing() {
        let node = n("node-a");
        let seg = segment(7, 1, true);
        let orders = Orders { instances: vec![container(3, &seg.bridge)], segments: vec![seg.clone()], tasks: vec![] };
        let mut f = Fake::default();
        let first = f.apply(&node, &orders);
        assert!(first.contains(&Action::MakeBridge { name: seg.bridge.clone(), mark: segment_mark(&node, &seg) }));
        assert!(first.iter().any(|a| matches!(a, Action::MakeVxlan { .. })));
        assert!(first.iter().any(|a| matches!(a, Action::EnsureDhcp { id: 7, .. })));
        assert!(first.iter().any(|a| matches!(a, Action::BringUp(o) if o.uid == 3)));
        // Again: only the idempotent makes, nothing brought up twice.
        let again = f.apply(&node, &orders);
        assert!(!again.iter().any(|a| matches!(a, Action::BringUp(_) | Action::RemoveLink { .. } | Action::Drop { .. })), "{again:?}");

        // Changed: the other node left, no VM needs DHCP, the container is made anew (new number).
        let seg2 = segment(7, 0, false);
        let changed = Orders { instances: vec![container(4, &seg2.bridge)], segments: vec![seg2.clone()], tasks: vec![] };
        let acts = f.apply(&node, &changed);
        assert!(acts.contains(&Action::RemoveLink { name: seg.vxlan.to_string(), mark: segment_mark(&node, &seg) }), "{acts:?}");
        assert!(acts.iter().any(|a| matches!(a, Action::StopDhcp { id: 7, .. })));
        assert!(acts.iter().any(|a| matches!(a, Action::Drop { uid: 3, .. })));
        assert!(acts.iter().any(|a| matches!(a, Action::BringUp(o) if o.uid == 4)));
        let drop_at = acts.iter().position(|a| matches!(a, Action::Drop { .. })).unwrap();
        let up_at = acts.iter().position(|a| matches!(a, Action::BringUp(_))).unwrap();
        assert!(drop_at < up_at, "removals first");
        assert!(!f.world.links.contains_key(seg.vxlan.as_str()) && !f.world.links.contains_key(names::veth(3, 0).as_str()));

        // Removed: nothing ordered, nothing left, the record empty.
        f.apply(&node, &Orders::default());
        assert_eq!(f.owned, Owned::default());
        assert!(f.world.links.is_empty() && f.world.rules.is_empty() && f.world.instances.is_empty() && f.world.dhcp.is_empty());
        assert!(f.apply(&node, &Orders::default()).is_empty(), "nothing more to do");
    }

    #[test]
    fn a_foreign_interface_of_the_same_name_is_refused_and_left_alone() {
        let node = n("node-a");
        let mut seg = segment(9, 1, true);
        for (name, alias) in [("eth0", None), ("docker0", Some("something else")), ("lo", None)] {
            seg.bridge = name.parse().unwrap();
            let orders = Orders { instances: vec![container(5, &seg.bridge)], segments: vec![seg.clone()], tasks: vec![] };
            let mut f = Fake::default();
            f.world.links.insert(name.into(), alias.map(str::to_owned));
            let acts = f.apply(&node, &orders);
            let why = acts.iter().find_map(|a| if let Action::Refuse { why, .. } = a { Some(why.clone()) } else { None });
            let why = why.unwrap_or_else(|| panic!("{name}: not refused: {acts:?}"));
            assert!(why.contains(name) && why.contains("was not made by its agent"), "{why}");
            assert!(acts.iter().any(|a| matches!(a, Action::Fail { order, .. } if order.uid == 5)), "its instance fails: {acts:?}");
            assert!(
                !acts.iter().any(|a| matches!(
                    a,
                    Action::MakeBridge { .. }
                        | Action::MakeVxlan { .. }
                        | Action::AllowBridge { .. }
                        | Action::EnsureDhcp { .. }
                        | Action::RemoveLink { .. }
                        | Action::BringUp(_)
                )),
                "{name}: {acts:?}"
            );
            assert_eq!(f.world.links.get(name), Some(&alias.map(str::to_owned)), "untouched");
            assert!(f.owned.links.is_empty() && f.owned.rules.is_empty(), "nothing recorded as made");
            // Failed once, it is not failed again at every heartbeat.
            assert!(!f.apply(&node, &orders).iter().any(|a| matches!(a, Action::Fail { .. })));
        }
        // A link marked like ours but missing from the record is not ours either.
        let seg = segment(10, 0, false);
        let mut f = Fake::default();
        f.world.links.insert(seg.bridge.to_string(), Some(segment_mark(&node, &seg)));
        let acts = f.apply(&node, &Orders { instances: vec![], segments: vec![seg.clone()], tasks: vec![] });
        assert!(acts.iter().any(|a| matches!(a, Action::Refuse { .. })), "{acts:?}");
        assert!(f.apply(&node, &Orders::default()).is_empty(), "and it is never removed");
    }

    #[test]
    fn leftovers_of_a_crashed_run_go_and_strangers_stay() {
        let node = n("node-a");
        let seg = segment(11, 0, false);
        let mark = segment_mark(&node, &seg);
        let mut f = Fake::default();
        // Recorded and marked: made by an earlier run of this agent.
        f.owned.links.insert(seg.bridge.to_string(), mark.clone());
        f.world.links.insert(seg.bridge.to_string(), Some(mark.clone()));
        f.owned.rules.insert(seg.bridge.to_string(), mark.clone());
        f.world.rules.push((seg.bridge.to_string(), mark.clone()));
        f.owned.instances.insert("bootcache.1.lab.vm".into(), Kind::Vm);
        f.world.instances.insert("bootcache.1.lab.vm".into(), Kind::Vm);
        // Recorded, gone: forgotten. Marked, not recorded: left.
        f.owned.links.insert("bv0000000200".into(), "bootcache node-a instance 2 lab/c".into());
        f.owned.instances.insert("bootcache.2.lab.c".into(), Kind::Container);
        f.world.instances.insert("bootcache.3.other.c".into(), Kind::Container);
        f.world.links.insert("bc0000000c".into(), Some("bootcache node-a segment 12 other/lan".into()));
        // Recorded, but someone put their own link under the name since.
        f.owned.links.insert("bx00000099".into(), "bootcache node-a segment 153 lab/lan".into());
        f.world.links.insert("bx00000099".into(), Some("theirs".into()));
        let acts = f.apply(&node, &Orders::default());
        assert!(acts.contains(&Action::RemoveLink { name: seg.bridge.to_string(), mark: mark.clone() }));
        assert!(acts.contains(&Action::RemoveRule { bridge: seg.bridge.to_string(), mark }));
        assert!(acts.contains(&Action::RemoveLeftover { id: "bootcache.1.lab.vm".into(), kind: Kind::Vm }));
        assert!(acts.contains(&Action::ForgetLink { name: "bv0000000200".into() }));
        assert!(acts.contains(&Action::ForgetInstance { id: "bootcache.2.lab.c".into() }));
        assert!(acts.contains(&Action::ForgetLink { name: "bx00000099".into() }));
        assert_eq!(f.owned, Owned::default());
        assert!(f.world.instances.contains_key("bootcache.3.other.c") && f.world.links.contains_key("bc0000000c"));
        assert_eq!(f.world.links.get("bx00000099"), Some(&Some("theirs".to_owned())), "not ours any more: left");
    }

    #[test]
    fn a_bridge_another_lab_of_ours_held_is_made_anew_for_the_new_one() {
        let node = n("node-a");
        let mut old = segment(20, 0, false);
        old.bridge = "br-lab".parse().unwrap();
        let mut f = Fake::default();
        f.apply(&node, &Orders { instances: vec![], segments: vec![old.clone()], tasks: vec![] });
        let mut new = segment(21, 0, false);
        new.bridge = old.bridge.clone();
        new.lab = n("lab2");
        let acts = f.apply(&node, &Orders { instances: vec![], segments: vec![new.clone()], tasks: vec![] });
        let removed = acts.iter().position(|a| *a == Action::RemoveLink { name: "br-lab".into(), mark: segment_mark(&node, &old) });
        let made = acts.iter().position(|a| *a == Action::MakeBridge { name: new.bridge.clone(), mark: segment_mark(&node, &new) });
        assert!(removed.unwrap() < made.unwrap(), "{acts:?}");
    }
}
