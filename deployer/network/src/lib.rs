//! Lab networks on a compute node, made through netlink (never by running
//! `ip`): a Linux bridge per segment, a VXLAN link joining it to the other
//! nodes that have instances on the segment (head-end replication: one
//! all-zero FDB entry per remote node), veth pairs whose far end is moved
//! into a container's network namespace and addressed there, and DHCP by
//! MAC address for the node's VMs (dnsmasq on the bridge, [`dhcp`]).
//!
//! Everything made carries an interface alias starting with
//! [`names::ALIAS_PREFIX`](bootcache_api::agent::names::ALIAS_PREFIX), so
//! [`Network::made`] finds what this node made, and only that, after a crash.
//! Bridges are made with `nf_call_iptables` off, and where the namespace
//! still sends bridged frames to iptables, [`firewall`] lets them through a
//! Docker daemon's FORWARD policy with one rule per bridge, found and
//! removed the same way.

#![deny(missing_docs)]

pub mod dhcp;
pub mod firewall;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};

use bootcache_api::InterfaceName;
use bootcache_api::agent::{Mac, names::ALIAS_PREFIX};
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

/// A link this node made, as [`Network::made`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Made {
    /// Its name.
    pub name: String,
    /// Its kernel index.
    pub index: u32,
    /// What its alias says after the prefix (the lab and segment or instance).
    pub owner: String,
}

/// The links of one network namespace (the one current when it was made).
#[derive(Clone, Debug)]
pub struct Network {
    handle: Handle,
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
        let rt = tokio::runtime::Handle::current();
        let path = format!("/proc/{pid}/ns/net");
        let made = std::thread::spawn(move || -> Result<Network, NetError> {
            let _enter = rt.enter();
            let ns = std::fs::File::open(&path).map_err(failed(format!("opening {path}")))?;
            rustix::thread::move_into_link_name_space(std::os::fd::AsFd::as_fd(&ns), Some(rustix::thread::LinkNameSpaceType::Network))
                .map_err(failed(format!("entering {path}")))?;
            Network::new()
        })
        .join();
        made.map_err(|_| NetError { what: "entering a container's namespace".into(), source: "the thread panicked".into() })?
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

    /// Makes bridge `name` (owned by `owner`, e.g. `lab/segment`) if it is
    /// not there, up, without iptables; returns its index.
    ///
    /// # Errors
    /// Netlink.
    pub async fn ensure_bridge(&self, name: &InterfaceName, owner: &str) -> Result<u32, NetError> {
        if let Some(i) = self.index(name.as_str()).await? {
            return Ok(i);
        }
        let msg = LinkBridge::new(name.as_str()).nf_call_iptables(false).nf_call_ip6tables(false).nf_call_arptables(false).build();
        self.add(&format!("making bridge {name}"), msg).await?;
        let index = self
            .index(name.as_str())
            .await?
            .ok_or_else(|| NetError { what: format!("bridge {name}"), source: "vanished once made".into() })?;
        // The kernel takes an alias when a link is changed, not made.
        let msg =
            LinkUnspec::new_with_index(index).append_extra_attribute(LinkAttribute::IfAlias(format!("{ALIAS_PREFIX}{owner}"))).up().build();
        self.set(&format!("naming bridge {name}'s owner"), msg).await?;
        Ok(index)
    }

    /// Makes VXLAN link `name` (network `vni`, tunnel end `local`) on
    /// `bridge` if it is not there, with one flooding entry per remote node
    /// (entries for nodes no longer listed are dropped by making it anew).
    ///
    /// # Errors
    /// Netlink.
    pub async fn ensure_vxlan(
        &self,
        name: &InterfaceName,
        owner: &str,
        vni: u32,
        local: Ipv4Addr,
        bridge: u32,
        remotes: &[Ipv4Addr],
    ) -> Result<(), NetError> {
        let want: HashSet<Ipv4Addr> = remotes.iter().copied().collect();
        if let Some(i) = self.index(name.as_str()).await? {
            if self.flood_list(i).await? == want {
                return Ok(());
            }
            self.delete(name.as_str()).await?;
        }
        let msg = LinkVxlan::new(name.as_str(), vni).local(local).port(VXLAN_PORT).learning(true).build();
        self.add(&format!("making VXLAN link {name} (VNI {vni}, local {local})"), msg).await?;
        let index = self
            .index(name.as_str())
            .await?
            .ok_or_else(|| NetError { what: format!("VXLAN link {name}"), source: "vanished once made".into() })?;
        let alias = LinkUnspec::new_with_index(index)
            .append_extra_attribute(LinkAttribute::IfAlias(format!("{ALIAS_PREFIX}{owner}")))
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
            for a in &n.attributes {
                if let (true, NeighbourAttribute::Destination(NeighbourAddress::Inet(ip))) = (zero, a) {
                    out.insert(*ip);
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
    /// per entry, the host end on its bridge, the far end moved into the
    /// container, renamed, given its MAC and address, and up (with `lo`).
    ///
    /// # Errors
    /// Netlink, or the container's namespace cannot be entered.
    pub async fn attach_container(&self, pid: u32, owner: &str, veths: &[Veth]) -> Result<(), NetError> {
        let inside = Network::of_process(pid).await?;
        for v in veths {
            let bridge = self
                .index(v.bridge.as_str())
                .await?
                .ok_or_else(|| NetError { what: format!("joining bridge {}", v.bridge), source: "no such bridge".into() })?;
            if self.index(v.host.as_str()).await?.is_some() {
                self.delete(v.host.as_str()).await?;
            }
            // The far end's name on the node, for the moment it is there.
            let peer = format!("bp{}", &v.host.as_str()[2..]);
            self.add(&format!("making veth {}", v.host), LinkVeth::new(v.host.as_str(), &peer).build()).await?;
            let host = self.index(v.host.as_str()).await?.unwrap_or(0);
            let msg = LinkUnspec::new_with_index(host)
                .append_extra_attribute(LinkAttribute::IfAlias(format!("{ALIAS_PREFIX}{owner}")))
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
        if let Some(lo) = inside.index("lo").await? {
            inside.set("bringing lo up", LinkUnspec::new_with_index(lo).up().build()).await?;
        }
        Ok(())
    }

    /// The links this node made (their alias starts with the prefix).
    ///
    /// # Errors
    /// Netlink.
    pub async fn made(&self) -> Result<Vec<Made>, NetError> {
        let mut links = self.handle.link().get().execute();
        let mut out = Vec::new();
        while let Some(l) = links.try_next().await.map_err(failed("listing links"))? {
            let (mut name, mut alias) = (None, None);
            for a in &l.attributes {
                match a {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::IfAlias(s) => alias = s.strip_prefix(ALIAS_PREFIX).map(str::to_owned),
                    _ => {}
                }
            }
            if let (Some(name), Some(owner)) = (name, alias) {
                out.push(Made { name, index: l.header.index, owner });
            }
        }
        Ok(out)
    }

    /// Deletes link `name`; nothing if it is not there.
    ///
    /// # Errors
    /// Netlink.
    pub async fn delete(&self, name: &str) -> Result<(), NetError> {
        let Some(i) = self.index(name).await? else { return Ok(()) };
        match self.handle.link().del(i).execute().await {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -19 => Ok(()),
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
