//! Lab networks on a compute node, made through netlink (never by running
//! `ip`): a Linux bridge per segment, a VXLAN link joining it to the other
//! nodes that have instances on the segment (head-end replication: one
//! all-zero FDB entry per remote node), veth pairs whose far end is moved
//! into a container's network namespace and addressed there, and DHCP by
//! MAC address for the node's VMs (dnsmasq on the bridge, [`dhcp`]).
//!
//! Everything made carries a mark as its interface alias (what the caller
//! gives: the agent's node and what the link is for), and nothing is
//! changed or deleted unless it carries the mark it is asked for: a link of
//! the same name made by anyone else is refused, never adopted, addressed,
//! enslaved or deleted. [`Network::links`] lists what there is, marks
//! included, for the caller to hold against its own record.
//! Nothing of a lab's subnets is addressed or routed in the node's own
//! namespace: the DHCP server of a segment answers from a namespace of its
//! own ([`dhcp`]). Bridges are made with `nf_call_iptables` off, and where the namespace
//! still sends bridged frames to iptables, [`firewall`] lets them through a
//! Docker daemon's FORWARD policy with one rule per bridge, found and
//! removed the same way.

#![deny(missing_docs)]

pub mod dhcp;
pub mod firewall;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use bootcache_api::InterfaceName;
use bootcache_api::agent::Mac;
use futures_util::TryStreamExt;
use netlink_packet_core::{NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::{NeighbourFlags, NeighbourMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, LinkVxlan};

/// The VXLAN UDP port (IANA).
pub const VXLAN_PORT: u16 = 4789;

/// A netlink request that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct NetError {
    /// What was being done.
    pub what: String,
    /// Why it failed.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

fn failed<E: std::error::Error + Send + Sync + 'static>(what: impl Into<String>) -> impl FnOnce(E) -> NetError {
    let what = what.into();
    move |e| NetError { what, source: Box::new(e) }
}

/// A link as [`Network::links`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Its name.
    pub name: String,
    /// Its kernel index.
    pub index: u32,
    /// Its interface alias (the mark of whoever made it), if any.
    pub alias: Option<String>,
}

/// Why a link was not touched: one of its name exists and does not carry
/// the mark asked for (someone else's).
#[derive(Debug, thiserror::Error)]
#[error("a link named {name} exists and was not made by this agent (its alias is {alias:?}): left as it is")]
pub struct NotOurs {
    /// The link.
    pub name: String,
    /// Its alias.
    pub alias: Option<String>,
}

impl NetError {
    /// Whether this failed because the link is someone else's ([`NotOurs`]).
    pub fn is_not_ours(&self) -> bool {
        self.source.downcast_ref::<NotOurs>().is_some()
    }
}

/// The links of one network namespace (the one current when it was made).
#[derive(Clone, Debug)]
pub struct Network {
    handle: Handle,
}

/// Turns IPv6 off on link `name` of the calling thread's namespace: a
/// link made for a lab carries its frames, and the node takes no
/// link-local address or route of its own on it.
fn no_ipv6(name: &str) {
    let path = format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6");
    if let Err(e) = std::fs::write(&path, "1")
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(link = name, error = %e, "IPv6 not turned off");
    }
}

fn link_of(l: &LinkMessage) -> Link {
    let (mut name, mut alias) = (String::new(), None);
    for a in &l.attributes {
        match a {
            LinkAttribute::IfName(n) => name.clone_from(n),
            LinkAttribute::IfAlias(s) => alias = Some(s.clone()),
            _ => {}
        }
    }
    Link { name, index: l.header.index, alias }
}

/// A container's interface: the host end, and what the far end becomes.
#[derive(Clone, Debug)]
pub struct Veth {
    /// The host end's name (stays on the node, on the bridge).
    pub host: InterfaceName,
    /// The bridge it joins.
    pub bridge: InterfaceName,
    /// The name inside the container (`eth0`, `eth1`...).
    pub inside: String,
    /// Its MAC address.
    pub mac: Mac,
    /// Its address and prefix length inside the container.
    pub address: (Ipv4Addr, u8),
    /// The default route through it, if its segment has a gateway.
    pub gateway: Option<Ipv4Addr>,
}

impl Network {
    /// A netlink connection in the calling thread's network namespace (call
    /// inside a Tokio runtime).
    ///
    /// # Errors
    /// The socket cannot be opened.
    pub fn new() -> Result<Network, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(failed("opening a netlink socket"))?;
        tokio::spawn(conn);
        Ok(Network { handle })
    }

    /// A connection in the network namespace of process `pid` (a
    /// container's), opened from a thread that enters it for just that: a
    /// netlink socket stays in the namespace it was made in.
    ///
    /// # Errors
    /// The namespace cannot be entered, or the socket opened.
    pub async fn of_process(pid: u32) -> Result<Network, NetError> {
        let path = format!("/proc/{pid}/ns/net");
        let ns = std::fs::File::open(&path).map_err(failed(format!("opening {path}")))?;
        Network::of_namespace(&ns).await
    }

    /// A connection in the network namespace `ns` refers to (an open
    /// `/proc/.../ns/net` or a namespace of [`dhcp`]'s), opened from a
    /// thread that enters it for just that.
    ///
    /// # Errors
    /// The namespace cannot be entered, or the socket opened.
    pub async fn of_namespace(ns: &std::fs::File) -> Result<Network, NetError> {
        let rt = tokio::runtime::Handle::current();
        let ns = ns.try_clone().map_err(failed("duplicating a namespace descriptor"))?;
        let made = std::thread::spawn(move || -> Result<Network, NetError> {
            let _enter = rt.enter();
            rustix::thread::move_into_link_name_space(std::os::fd::AsFd::as_fd(&ns), Some(rustix::thread::LinkNameSpaceType::Network))
                .map_err(failed("entering a network namespace"))?;
            Network::new()
        })
        .join();
        made.map_err(|_| NetError { what: "entering a network namespace".into(), source: "the thread panicked".into() })?
    }

    /// Moves link `name` into the network namespace `ns` refers to.
    ///
    /// # Errors
    /// Netlink.
    pub async fn move_to(&self, name: &str, ns: &std::fs::File) -> Result<(), NetError> {
        use std::os::fd::AsRawFd;
        let index = self.index(name).await?.ok_or_else(|| NetError { what: format!("moving {name}"), source: "no such link".into() })?;
        self.set(&format!("moving {name} into a namespace"), LinkUnspec::new_with_index(index).setns_by_fd(ns.as_raw_fd()).build()).await
    }

    /// Makes a veth pair `host` (marked `mark`, on the bridge of index
    /// `bridge`, up) and `peer` (left as it is made, for the caller to move).
    ///
    /// # Errors
    /// Netlink.
    pub async fn make_veth(&self, host: &InterfaceName, peer: &str, mark: &str, bridge: u32) -> Result<(), NetError> {
        self.add(&format!("making veth {host}"), LinkVeth::new(host.as_str(), peer).build()).await?;
        no_ipv6(host.as_str());
        let index = self.index(host.as_str()).await?.unwrap_or(0);
        let msg = LinkUnspec::new_with_index(index)
            .append_extra_attribute(LinkAttribute::IfAlias(mark.to_owned()))
            .controller(bridge)
            .up()
            .build();
        self.set(&format!("joining {host} to its bridge"), msg).await
    }

    /// Names link `from` `to`, gives it `address/prefix` and brings it and
    /// `lo` up (in a namespace of its own, what a DHCP server answers from).
    ///
    /// # Errors
    /// Netlink.
    pub async fn configure(&self, from: &str, to: &str, address: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        let i = self.index(from).await?.ok_or_else(|| NetError { what: format!("configuring {from}"), source: "no such link".into() })?;
        self.set(&format!("naming {from} {to}"), LinkUnspec::new_with_index(i).name(to.to_owned()).build()).await?;
        self.set(&format!("bringing {to} up"), LinkUnspec::new_with_index(i).up().build()).await?;
        self.ensure_address(to, address, prefix).await?;
        if let Some(lo) = self.index("lo").await? {
            self.set("bringing lo up", LinkUnspec::new_with_index(lo).up().build()).await?;
        }
        Ok(())
    }

    async fn index(&self, name: &str) -> Result<Option<u32>, NetError> {
        let mut links = self.handle.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(Some(l)) => Ok(Some(l.header.index)),
            Ok(None) => Ok(None),
            // ENODEV: no such link.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
            Err(e) => Err(failed(format!("looking up link {name}"))(e)),
        }
    }

    async fn add(&self, what: &str, msg: LinkMessage) -> Result<(), NetError> {
        self.handle.link().add(msg).execute().await.map_err(failed(what.to_owned()))
    }

    async fn set(&self, what: &str, msg: LinkMessage) -> Result<(), NetError> {
        self.handle.link().set(msg).execute().await.map_err(failed(what.to_owned()))
    }

    /// The link called `name`, if there is one.
    ///
    /// # Errors
    /// Netlink.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, NetError> {
        let mut links = self.handle.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(Some(l)) => Ok(Some(link_of(&l))),
            Ok(None) => Ok(None),
            // ENODEV: no such link.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(None),
            Err(e) => Err(failed(format!("looking up link {name}"))(e)),
        }
    }

    /// The index of link `name` if it is there and carries `mark`; `None`
    /// if it is not there; [`NotOurs`] if it is someone else's.
    async fn ours(&self, name: &str, mark: &str, doing: &str) -> Result<Option<u32>, NetError> {
        match self.link(name).await? {
            None => Ok(None),
            Some(l) if l.alias.as_deref() == Some(mark) => Ok(Some(l.index)),
            Some(l) => Err(NetError { what: doing.to_owned(), source: Box::new(NotOurs { name: l.name, alias: l.alias }) }),
        }
    }

    /// Makes bridge `name` marked `mark` if it is not there, up, without
    /// iptables; returns its index. One of that name that does not carry
    /// the mark is refused ([`NotOurs`]), never adopted.
    ///
    /// # Errors
    /// [`NotOurs`], netlink.
    pub async fn ensure_bridge(&self, name: &InterfaceName, mark: &str) -> Result<u32, NetError> {
        let doing = format!("making bridge {name}");
        if let Some(i) = self.ours(name.as_str(), mark, &doing).await? {
            return Ok(i);
        }
        let msg = LinkBridge::new(name.as_str()).nf_call_iptables(false).nf_call_ip6tables(false).nf_call_arptables(false).build();
        self.add(&doing, msg).await?;
        let index = self
            .index(name.as_str())
            .await?
            .ok_or_else(|| NetError { what: format!("bridge {name}"), source: "vanished once made".into() })?;
        no_ipv6(name.as_str());
        // The kernel takes an alias when a link is changed, not made.
        let msg = LinkUnspec::new_with_index(index).append_extra_attribute(LinkAttribute::IfAlias(mark.to_owned())).up().build();
        self.set(&format!("marking bridge {name}"), msg).await?;
        Ok(index)
    }

    /// Makes VXLAN link `name` marked `mark` (network `vni`, tunnel end
    /// `local`) on `bridge` if it is not there, with one flooding entry per
    /// remote node: a link already there gets the entries it lacks and loses
    /// those of nodes no longer listed, one by one. It is never made anew
    /// for what a listing of the forwarding table says: such a dump may miss
    /// entries when the table changes under it (a busy bridge learning), and
    /// making the link anew drops every packet in flight and every learned
    /// entry. One of that name without the mark is refused.
    ///
    /// # Errors
    /// [`NotOurs`], netlink.
    pub async fn ensure_vxlan(
        &self,
        name: &InterfaceName,
        mark: &str,
        vni: u32,
        local: Ipv4Addr,
        bridge: u32,
        remotes: &[Ipv4Addr],
    ) -> Result<(), NetError> {
        let want: HashSet<Ipv4Addr> = remotes.iter().copied().collect();
        if let Some(i) = self.ours(name.as_str(), mark, &format!("making VXLAN link {name}")).await? {
            let have = self.flood_list(i).await?;
            for r in want.difference(&have) {
                tracing::info!(link = %name, remote = %r, "VXLAN link floods to a new node");
                self.flood_to(i, *r).await?;
            }
            for r in have.difference(&want) {
                tracing::info!(link = %name, remote = %r, "VXLAN link no longer floods to a node");
                self.unflood(i, *r).await?;
            }
            return Ok(());
        }
        let msg = LinkVxlan::new(name.as_str(), vni).local(local).port(VXLAN_PORT).learning(true).build();
        self.add(&format!("making VXLAN link {name} (VNI {vni}, local {local})"), msg).await?;
        let index = self
            .index(name.as_str())
            .await?
            .ok_or_else(|| NetError { what: format!("VXLAN link {name}"), source: "vanished once made".into() })?;
        no_ipv6(name.as_str());
        let alias = LinkUnspec::new_with_index(index)
            .append_extra_attribute(LinkAttribute::IfAlias(mark.to_owned()))
            .controller(bridge)
            .up()
            .build();
        self.set(&format!("joining {name} to its bridge"), alias).await?;
        for r in remotes {
            self.flood_to(index, *r).await?;
        }
        Ok(())
    }

    /// Adds the all-zero FDB entry sending broadcast and unknown frames to
    /// `remote` (`bridge fdb append 00:00:00:00:00:00 dev VX dst REMOTE`).
    async fn flood_to(&self, index: u32, remote: Ipv4Addr) -> Result<(), NetError> {
        let mut req = self.handle.neighbours().add_bridge(index, &[0; 6]).destination(IpAddr::V4(remote)).flags(NeighbourFlags::Own);
        let message: NeighbourMessage = req.message_mut().clone();
        let mut nl = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(message));
        nl.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
        let what = format!("adding the VXLAN flooding entry to {remote}");
        let mut handle = self.handle.clone();
        let mut resp = handle.request(nl).map_err(failed(what.clone()))?;
        while let Some(m) = futures_util::StreamExt::next(&mut resp).await {
            if let NetlinkPayload::Error(e) = m.payload {
                // EEXIST: already there.
                if e.raw_code() != -17 {
                    return Err(failed(what)(rtnetlink::Error::NetlinkError(e)));
                }
            }
        }
        Ok(())
    }

    /// Removes the all-zero FDB entry to `remote` (`bridge fdb del
    /// 00:00:00:00:00:00 dev VX dst REMOTE`); one already gone is fine.
    async fn unflood(&self, index: u32, remote: Ipv4Addr) -> Result<(), NetError> {
        let mut req = self.handle.neighbours().add_bridge(index, &[0; 6]).destination(IpAddr::V4(remote)).flags(NeighbourFlags::Own);
        let message: NeighbourMessage = req.message_mut().clone();
        match self.handle.neighbours().del(message).execute().await {
            Ok(()) => Ok(()),
            // ENOENT: already gone.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -2 => Ok(()),
            Err(e) => Err(failed(format!("removing the VXLAN flooding entry to {remote}"))(e)),
        }
    }

    /// The remotes a VXLAN link floods to.
    async fn flood_list(&self, index: u32) -> Result<HashSet<Ipv4Addr>, NetError> {
        use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
        let mut out = HashSet::new();
        let mut req = self.handle.neighbours().get();
        req.message_mut().header.family = netlink_packet_route::AddressFamily::Bridge;
        let mut entries = req.execute();
        while let Some(n) = entries.try_next().await.map_err(failed("listing FDB entries"))? {
            if n.header.ifindex != index {
                continue;
            }
            let zero = n.attributes.iter().any(|a| matches!(a, NeighbourAttribute::LinkLocalAddress(l) if l.iter().all(|b| *b == 0)));
            // In a dump of the bridge family the kernel's NDA_DST is not
            // parsed as an IP address: four bytes of `Other` are the IPv4 one.
            for a in n.attributes.iter().filter(|_| zero) {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                        out.insert(*ip);
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) if b.len() == 4 => {
                        out.insert(Ipv4Addr::new(b[0], b[1], b[2], b[3]));
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    }

    /// Gives link `name` the address `address/prefix` unless it has it.
    ///
    /// # Errors
    /// No such link; netlink.
    pub async fn ensure_address(&self, name: &str, address: Ipv4Addr, prefix: u8) -> Result<(), NetError> {
        let index =
            self.index(name).await?.ok_or_else(|| NetError { what: format!("addressing {name}"), source: "no such link".into() })?;
        match self.handle.address().add(index, IpAddr::V4(address), prefix).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -17 => Ok(()),
            Err(e) => Err(failed(format!("giving {name} the address {address}/{prefix}"))(e)),
        }
    }

    /// Gives the container whose init is `pid` its interfaces: a veth pair
    /// per entry, the host end marked `mark` on its bridge (which must carry
    /// `bridge_mark`), the far end moved into the container, renamed, given
    /// its MAC and address, and up (with `lo`); then its default route (the
    /// first gateway) and `routes` (network, prefix, via). A host end left by an
    /// earlier start is made anew; a link of its name that is not ours is
    /// refused.
    ///
    /// # Errors
    /// [`NotOurs`], netlink, or the container's namespace cannot be entered.
    pub async fn attach_container(
        &self,
        pid: u32,
        mark: &str,
        veths: &[(Veth, String)],
        routes: &[(Ipv4Addr, u8, Ipv4Addr)],
    ) -> Result<(), NetError> {
        let inside = Network::of_process(pid).await?;
        for (v, bridge_mark) in veths {
            let joining = format!("joining bridge {}", v.bridge);
            let bridge = self
                .ours(v.bridge.as_str(), bridge_mark, &joining)
                .await?
                .ok_or_else(|| NetError { what: joining, source: "no such bridge".into() })?;
            if self.ours(v.host.as_str(), mark, &format!("making veth {}", v.host)).await?.is_some() {
                self.remove(v.host.as_str(), mark).await?;
            }
            // The far end's name on the node, for the moment it is there.
            let peer = format!("bp{}", &v.host.as_str()[2..]);
            self.add(&format!("making veth {}", v.host), LinkVeth::new(v.host.as_str(), &peer).build()).await?;
            no_ipv6(v.host.as_str());
            let host = self.index(v.host.as_str()).await?.unwrap_or(0);
            let msg = LinkUnspec::new_with_index(host)
                .append_extra_attribute(LinkAttribute::IfAlias(mark.to_owned()))
                .controller(bridge)
                .up()
                .build();
            self.set(&format!("joining {} to {}", v.host, v.bridge), msg).await?;
            let peer_index = self.index(&peer).await?.unwrap_or(0);
            self.set(&format!("moving {peer} into the container"), LinkUnspec::new_with_index(peer_index).setns_by_pid(pid).build())
                .await?;
            let far = inside
                .index(&peer)
                .await?
                .ok_or_else(|| NetError { what: format!("{peer} in the container"), source: "not there after the move".into() })?;
            let msg = LinkUnspec::new_with_index(far).name(v.inside.clone()).address(v.mac.0.to_vec()).build();
            inside.set(&format!("naming {} in the container", v.inside), msg).await?;
            inside.set(&format!("bringing {} up", v.inside), LinkUnspec::new_with_index(far).up().build()).await?;
            inside.ensure_address(&v.inside, v.address.0, v.address.1).await?;
        }
        if let Some((v, _)) = veths.iter().find(|(v, _)| v.gateway.is_some()) {
            let gw = v.gateway.unwrap_or(Ipv4Addr::UNSPECIFIED);
            let route = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().gateway(gw).build();
            match inside.handle.route().add(route).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -17 => {}
                Err(e) => return Err(failed(format!("the default route through {gw} in the container"))(e)),
            }
        }
        for (net, prefix, via) in routes {
            let route = rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(*net, *prefix).gateway(*via).build();
            match inside.handle.route().add(route).execute().await {
                Ok(()) => {}
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -17 => {}
                Err(e) => return Err(failed(format!("the route to {net}/{prefix} via {via} in the container"))(e)),
            }
        }
        if let Some(lo) = inside.index("lo").await? {
            inside.set("bringing lo up", LinkUnspec::new_with_index(lo).up().build()).await?;
        }
        Ok(())
    }

    /// Every link of the namespace, with its alias: what the caller holds
    /// against its own record of what it made.
    ///
    /// # Errors
    /// Netlink.
    pub async fn links(&self) -> Result<Vec<Link>, NetError> {
        let mut links = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(l) = links.try_next().await.map_err(failed("listing links"))? {
            out.push(link_of(&l));
        }
        Ok(out)
    }

    /// Deletes link `name` if it carries `mark`; nothing if it is not
    /// there. Whether it was deleted.
    ///
    /// # Errors
    /// [`NotOurs`] (a link of that name without the mark), netlink.
    pub async fn remove(&self, name: &str, mark: &str) -> Result<bool, NetError> {
        let Some(i) = self.ours(name, mark, &format!("deleting link {name}")).await? else { return Ok(false) };
        match self.handle.link().del(i).execute().await {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(false),
            Err(e) => Err(failed(format!("deleting link {name}"))(e)),
        }
    }

    /// Whether link `name` is up.
    ///
    /// # Errors
    /// Netlink.
    pub async fn is_up(&self, name: &str) -> Result<bool, NetError> {
        let mut links = self.handle.link().get().match_name(name.to_owned()).execute();
        match links.try_next().await {
            Ok(Some(l)) => Ok(l.header.flags.contains(LinkFlags::Up)),
            Ok(None) => Ok(false),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(false),
            Err(e) => Err(failed(format!("looking up link {name}"))(e)),
        }
    }
}
