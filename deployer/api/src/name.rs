//! Names checked once, where they enter (a lab file, an API request), so
//! that nothing downstream (libvirt XML, Docker, netlink, file paths) ever
//! sees one that could mean something else.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a valid {what}: {rule}")]
pub struct BadName {
    /// The string given (cut to 80 characters).
    pub value: String,
    /// What it was to name.
    pub what: &'static str,
    /// The rule it breaks.
    pub rule: &'static str,
}

fn bad(value: &str, what: &'static str, rule: &'static str) -> BadName {
    BadName { value: value.chars().take(80).collect(), what, rule }
}

/// The name of a lab, node, instance or image: 1 to 63 characters of
/// lowercase letters, digits, `-`, `_` and `.`, starting with a letter or a
/// digit (what a host name, a libvirt domain, a Docker container and a file
/// name all accept).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    /// The longest name.
    pub const MAX: usize = 63;
    const RULE: &'static str = "1 to 63 lowercase letters, digits, '-', '_' or '.', starting with a letter or a digit";

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Name {
    type Err = BadName;

    fn from_str(s: &str) -> Result<Self, BadName> {
        let ok_first = s.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let ok_rest = s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'));
        if s.len() > Self::MAX || !ok_first || !ok_rest {
            return Err(bad(s, "name", Self::RULE));
        }
        Ok(Name(s.to_owned()))
    }
}

/// The name of a network interface (a bridge, a veth end, a VXLAN link):
/// 1 to 15 bytes (the kernel's limit) of letters, digits, `-` and `_`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InterfaceName(String);

impl InterfaceName {
    /// The longest interface name the kernel takes (IFNAMSIZ less the NUL).
    pub const MAX: usize = 15;
    const RULE: &'static str = "1 to 15 letters, digits, '-' or '_' (the kernel's interface name limit)";

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for InterfaceName {
    type Err = BadName;

    fn from_str(s: &str) -> Result<Self, BadName> {
        if s.is_empty() || s.len() > Self::MAX || !s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_')) {
            return Err(bad(s, "interface name", Self::RULE));
        }
        Ok(InterfaceName(s.to_owned()))
    }
}

macro_rules! text_type {
    ($t:ty) => {
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }

        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

text_type!(Name);
text_type!(InterfaceName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_where_they_enter() {
        for good in ["a", "web-1", "db_2.lab", "0node", &"x".repeat(63)] {
            assert_eq!(good.parse::<Name>().unwrap().as_str(), good);
        }
        for bad in ["", ".", "..", "-a", "_a", "A", "a/b", "a b", "a;rm", "é", "a\n", &"x".repeat(64)] {
            let err = bad.parse::<Name>().unwrap_err();
            assert!(err.to_string().contains("not a valid name"), "{bad:?}: {err}");
        }
        let n: Name = serde_json::from_str("\"web-1\"").unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"web-1\"");
        assert!(serde_json::from_str::<Name>("\"../etc\"").is_err(), "checked when read from JSON too");
    }

    #[test]
    fn interface_names_fit_the_kernel() {
        for good in ["br0", "bc-lan0", "vx-0123456789a", &"x".repeat(15)] {
            assert!(good.parse::<InterfaceName>().is_ok(), "{good}");
        }
        for bad in ["", &"x".repeat(16), "a.b", "a/b", "a b", "..", "eth0:1"] {
            assert!(bad.parse::<InterfaceName>().is_err(), "{bad:?}");
        }
    }
}
