//! Subnets: parsed, and kept away from the ranges no lab may use.

use std::fmt;
use std::net::Ipv4Addr;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

use super::NODE_ADDRESSES;

/// An IPv4 subnet, `a.b.c.d/len` with no host bits set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Subnet {
    /// The network address.
    pub network: Ipv4Addr,
    /// The prefix length, 8 to 30.
    pub prefix: u8,
}

/// Ranges no lab may use: what they mean to every host is not a lab's to
/// change (RFC 6890).
const SPECIAL: [(Ipv4Addr, u8, &str); 5] = [
    (Ipv4Addr::new(0, 0, 0, 0), 8, "\"this network\""),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback"),
    (Ipv4Addr::new(169, 254, 0, 0), 16, "link-local"),
    (Ipv4Addr::new(224, 0, 0, 0), 4, "multicast"),
    (Ipv4Addr::new(240, 0, 0, 0), 4, "reserved, and the broadcast address"),
];

impl Subnet {
    pub(super) fn size(self) -> u32 {
        1u32 << (32 - u32::from(self.prefix))
    }

    /// Whether this subnet and `other` share an address.
    pub fn overlaps(self, other: Subnet) -> bool {
        let (a, b) = (u64::from(u32::from(self.network)), u64::from(u32::from(other.network)));
        a < b + u64::from(other.size()) && b < a + u64::from(self.size())
    }

    /// The special-purpose range this subnet overlaps, if any, and what it is.
    fn special(self) -> Option<(Subnet, &'static str)> {
        SPECIAL.iter().map(|(n, p, what)| (Subnet { network: *n, prefix: *p }, *what)).find(|(r, _)| self.overlaps(*r))
    }

    /// Whether `a` is a host address of this subnet (not its network or
    /// broadcast address).
    pub fn holds(self, a: Ipv4Addr) -> bool {
        let (n, a) = (u32::from(self.network), u32::from(a));
        a > n && a < n + self.size() - 1
    }

    /// The `i`-th host address (0 is the first after the network address),
    /// if the subnet has it.
    pub fn host(self, i: u32) -> Option<Ipv4Addr> {
        let hosts = self.size() - 2;
        (i < hosts).then(|| Ipv4Addr::from(u32::from(self.network) + 1 + i))
    }

    /// How many host addresses instances may use (the top
    /// [`NODE_ADDRESSES`] are the nodes').
    pub fn instance_hosts(self) -> u32 {
        (self.size() - 2).saturating_sub(NODE_ADDRESSES)
    }

    /// The address node number `k` (0-based, < [`NODE_ADDRESSES`]) takes
    /// on this segment.
    pub fn node_address(self, k: u32) -> Option<Ipv4Addr> {
        (k < NODE_ADDRESSES).then(|| self.host(self.size() - 3 - k)).flatten()
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl std::str::FromStr for Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rule = || format!("{s:?} is not a subnet: write it as a.b.c.d/len, len from 8 to 30");
        let (a, len) = s.split_once('/').ok_or_else(rule)?;
        let network: Ipv4Addr = a.parse().map_err(|_| rule())?;
        let prefix: u8 = len.parse().map_err(|_| rule())?;
        if !(8..=30).contains(&prefix) {
            return Err(rule());
        }
        let mask = u32::MAX << (32 - u32::from(prefix));
        if u32::from(network) & !mask != 0 {
            return Err(format!("{s:?} has host bits set: the network is {}/{prefix}", Ipv4Addr::from(u32::from(network) & mask)));
        }
        let subnet = Subnet { network, prefix };
        if let Some((range, what)) = subnet.special() {
            return Err(format!("{s:?} overlaps {range} ({what}): a lab's subnet must be an ordinary unicast range"));
        }
        Ok(subnet)
    }
}

impl Serialize for Subnet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Subnet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// A route's destination: `a.b.c.d/len` (0 to 32, no host bits set;
/// `0.0.0.0/0` the default route), not a special-purpose range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    /// The network address.
    pub network: Ipv4Addr,
    /// The prefix length.
    pub prefix: u8,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl std::str::FromStr for Route {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let rule = || format!("{s:?} is not a network: write it as a.b.c.d/len, len from 0 to 32");
        let (a, len) = s.split_once('/').ok_or_else(rule)?;
        let network: Ipv4Addr = a.parse().map_err(|_| rule())?;
        let prefix: u8 = len.parse().map_err(|_| rule())?;
        if prefix > 32 {
            return Err(rule());
        }
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
        if u32::from(network) & !mask != 0 {
            return Err(format!("{s:?} has host bits set"));
        }
        if prefix >= 1 {
            let sub = Subnet { network, prefix };
            if let Some((range, what)) = sub.special() {
                return Err(format!("{s:?} overlaps {range} ({what})"));
            }
        }
        Ok(Route { network, prefix })
    }
}

impl Serialize for Route {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Route {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}
