//! Image references as registries name them: `HOST[:PORT]/REPO[:TAG]` or
//! `HOST[:PORT]/REPO@sha256:HEX` (the OCI distribution spec's grammar,
//! with the registry always written out: there is no default registry).

use std::fmt;
use std::str::FromStr;

/// A `sha256:` digest of content in a registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(bytes).into())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl FromStr for Digest {
    type Err = BadReference;
    fn from_str(s: &str) -> Result<Digest, BadReference> {
        let bad = || BadReference(format!("{s:?} is not a sha256 digest (sha256: and 64 lowercase hex digits)"));
        let hex = s.strip_prefix("sha256:").ok_or_else(bad)?;
        if hex.len() != 64 || !hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Digest(out))
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a reference points at: a tag (which may move) or a digest (which
/// cannot).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// `:TAG`, `latest` when none is written.
    Tag(String),
    /// `@sha256:...`.
    Digest(Digest),
}

/// An image in a registry.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `HOST[:PORT]`.
    pub registry: String,
    /// The repository, `team/web`.
    pub repository: String,
    /// Its tag or digest.
    pub target: Target,
}

/// Why a string is not a reference.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadReference(pub String);

/// The longest reference taken (the spec bounds a repository name at 255).
const MAX_LEN: usize = 512;

impl Reference {
    /// The same image pinned to `digest`.
    pub fn pinned(&self, digest: Digest) -> Reference {
        Reference { registry: self.registry.clone(), repository: self.repository.clone(), target: Target::Digest(digest) }
    }

    /// Whether `s` is written as a reference rather than a URL (it has no
    /// scheme): what a lab's `image:` tells apart.
    pub fn looks_like(s: &str) -> bool {
        !s.contains("://") && s.contains('/')
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Tag(t) => write!(f, "{}/{}:{t}", self.registry, self.repository),
            Target::Digest(d) => write!(f, "{}/{}@{d}", self.registry, self.repository),
        }
    }
}

fn component_ok(c: &str) -> bool {
    // [a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        let ch = b[i];
        if ch.is_ascii_lowercase() || ch.is_ascii_digit() {
            i += 1;
            continue;
        }
        let sep_start = i;
        while i < b.len() && matches!(b[i], b'.' | b'_' | b'-') {
            i += 1;
        }
        let sep = &c[sep_start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok || sep.is_empty() {
            return false;
        }
    }
    true
}

fn host_ok(h: &str) -> bool {
    let (host, port) = match h.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (h, None),
    };
    let host_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        });
    let port_ok = port
        .is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|c| c.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|n| n > 0));
    host_ok && port_ok
}

impl FromStr for Reference {
    type Err = BadReference;
    fn from_str(s: &str) -> Result<Reference, BadReference> {
        let bad = |why: &str| BadReference(format!("{s:?}: {why}"));
        if s.len() > MAX_LEN {
            return Err(BadReference(format!("a reference of {} bytes (at most {MAX_LEN})", s.len())));
        }
        if s.contains("://") {
            return Err(bad("a reference has no scheme: HOST[:PORT]/REPO[:TAG] or HOST[:PORT]/REPO@sha256:..."));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d.parse::<Digest>()?)),
            None => (s, None),
        };
        let (registry, path) = rest.split_once('/').ok_or_else(|| bad("no registry: write HOST[:PORT]/REPO"))?;
        let registry_like = registry.contains('.') || registry.contains(':') || registry == "localhost";
        if !registry_like || !host_ok(registry) {
            return Err(bad("the registry is a host name or address, with a port if it has one (registry.example:5000)"));
        }
        // A tag is after the last '/', after a ':'.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t)),
            _ => (path, None),
        };
        if repository.is_empty() || repository.len() > 255 || !repository.split('/').all(component_ok) {
            return Err(bad("the repository is lowercase path components (a-z 0-9 and . _ - between them), at most 255 bytes"));
        }
        let target = match (tag, digest) {
            (Some(_), Some(_)) => return Err(bad("a tag or a digest, not both")),
            (None, Some(d)) => Target::Digest(d),
            (Some(t), None) => {
                let ok = !t.is_empty()
                    && t.len() <= 128
                    && (t.as_bytes()[0].is_ascii_alphanumeric() || t.as_bytes()[0] == b'_')
                    && t.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
                if !ok {
                    return Err(bad("a tag is 1 to 128 of A-Z a-z 0-9 _ . - (not starting with . or -)"));
                }
                Target::Tag(t.to_owned())
            }
            (None, None) => Target::Tag("latest".into()),
        };
        Ok(Reference { registry: registry.to_owned(), repository: repository.to_owned(), target })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_as_registries_write_them() {
        let r: Reference = "registry.example:5000/team/web:1.2".parse().unwrap();
        assert_eq!((r.registry.as_str(), r.repository.as_str()), ("registry.example:5000", "team/web"));
        assert_eq!(r.target, Target::Tag("1.2".into()));
        assert_eq!(r.to_string(), "registry.example:5000/team/web:1.2");
        let r: Reference = "127.0.0.1:5000/guest".parse().unwrap();
        assert_eq!(r.target, Target::Tag("latest".into()));
        let hex = "ab".repeat(32);
        let r: Reference = format!("localhost/a/b_c/d-e@sha256:{hex}").parse().unwrap();
        assert_eq!(r.target, Target::Digest(Digest([0xab; 32])));
        assert_eq!(r.to_string(), format!("localhost/a/b_c/d-e@sha256:{hex}"));
        assert_eq!(r.pinned(Digest([1; 32])).to_string(), format!("localhost/a/b_c/d-e@{}", Digest([1; 32])));
    }

    #[test]
    fn what_is_not_a_reference_is_refused_saying_why() {
        for (s, why) in [
            ("http://r:5000/a:1", "no scheme"),
            ("web:1.2", "no registry"),
            ("team/web:1.2", "the registry is a host name"),
            ("r:5000/Team/web", "lowercase path components"),
            ("r:5000/a//b", "lowercase path components"),
            ("r:5000/a-/b", "lowercase path components"),
            ("r:5000/a:-x", "a tag is"),
            ("r:5000/a:", "a tag is"),
            ("r:5000/a@sha256:00", "not a sha256 digest"),
            ("r:99999/a", "the registry is a host name"),
        ] {
            let e = s.parse::<Reference>().unwrap_err().to_string();
            assert!(e.contains(why), "{s}: {e}");
        }
        let long = format!("r:5000/{}", "a".repeat(600));
        assert!(long.parse::<Reference>().unwrap_err().to_string().contains("at most 512"));
        let tag_and_digest = format!("r:5000/a:1@sha256:{}", "0".repeat(64));
        assert!(tag_and_digest.parse::<Reference>().unwrap_err().to_string().contains("not both"));
    }

    #[test]
    fn digests_are_sha256_in_lowercase_hex() {
        let d = Digest::of(b"");
        assert_eq!(d.to_string(), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert!("sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855".parse::<Digest>().is_err());
        assert!("sha512:00".parse::<Digest>().is_err());
    }
}
