//! The root digest: what names an image everywhere (caches, peers, the
//! control node), as a type rather than a hex string.

use std::fmt;
use std::str::FromStr;

/// The BLAKE3 root digest of a container (its header and index), which pins
/// every byte of the image. Shown and parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RootDigest(pub [u8; 32]);

/// A string that is not 64 lowercase hex digits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a root digest is 64 lowercase hex digits")]
pub struct BadRootDigest;

impl fmt::Display for RootDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for RootDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootDigest({self})")
    }
}

impl FromStr for RootDigest {
    type Err = BadRootDigest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return Err(BadRootDigest);
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(BadRootDigest),
        };
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Ok(RootDigest(out))
    }
}

impl serde::Serialize for RootDigest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for RootDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_root_digest_is_64_lowercase_hex_digits_both_ways() {
        let d = RootDigest(std::array::from_fn(|i| i as u8 * 7));
        let s = d.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<RootDigest>(), Ok(d));
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{s}\""));
        assert_eq!(serde_json::from_str::<RootDigest>(&format!("\"{s}\"")).unwrap(), d);
        for bad in ["", "ab", &s.to_uppercase(), &format!("{s}0"), &s.replace('0', "g")] {
            assert_eq!(bad.parse::<RootDigest>(), Err(BadRootDigest), "{bad}");
        }
    }
}
