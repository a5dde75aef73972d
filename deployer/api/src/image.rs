//! An instance's image as the control node resolves it, once, when the lab
//! is deployed, and as orders carry it: what the instance is made from,
//! and so what kind of instance it is. A whole file (a disk, a tarball) is
//! checked by its digest like everything else once the cluster knows it.

use serde::{Deserialize, Serialize};

use crate::reference::Digest;
use crate::{Kind, RootDigest};

/// A blob of a registry's image: content named by its digest, checked
/// against it wherever it comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Blob {
    /// Its `sha256:` digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
}

/// An instance's image.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "type")]
#[non_exhaustive]
pub enum Image {
    /// A bootcache container on a store: a VM's disk, delivered boot
    /// segment first, pinned by its root digest (read from its header).
    Bootcache {
        /// Where it is.
        url: String,
        /// Its root digest.
        root: RootDigest,
    },
    /// A whole disk image (raw or qcow2) a node copies before its VMs boot
    /// (`delivery: full`).
    Disk {
        /// Where it is.
        url: String,
        /// Its BLAKE3 digest, once the cluster knows it: every copy is
        /// checked against it before use.
        #[serde(default)]
        digest: Option<RootDigest>,
    },
    /// A root file system tarball a node imports for its containers.
    Tarball {
        /// Where it is.
        url: String,
        /// As a disk's.
        #[serde(default)]
        digest: Option<RootDigest>,
    },
    /// A container image from a registry, pinned when the lab was
    /// deployed: its config and layers, which a node copies (from a peer
    /// that holds the image, else the registry), checks and loads into
    /// its Docker.
    Oci {
        /// The reference pinned to its (linux/amd64) manifest's digest.
        reference: String,
        /// That manifest's digest: the key nodes hold the image under.
        manifest: Digest,
        /// Its config blob.
        config: Blob,
        /// Its layers, bottom first.
        layers: Vec<Blob>,
    },
}

impl Image {
    /// What runs it.
    pub fn kind(&self) -> Kind {
        match self {
            Image::Bootcache { .. } | Image::Disk { .. } => Kind::Vm,
            Image::Tarball { .. } | Image::Oci { .. } => Kind::Container,
        }
    }

    /// Where it is (a registry image: its pinned reference).
    pub fn url(&self) -> &str {
        match self {
            Image::Bootcache { url, .. } | Image::Disk { url, .. } | Image::Tarball { url, .. } => url,
            Image::Oci { reference, .. } => reference,
        }
    }

    /// The key nodes cache it under and the control node knows it by: a
    /// bootcache image's root digest, a whole file's [`file_key`], a
    /// registry image's manifest digest.
    pub fn key(&self) -> RootDigest {
        match self {
            Image::Bootcache { root, .. } => *root,
            Image::Oci { manifest, .. } => RootDigest(manifest.0),
            Image::Disk { url, .. } | Image::Tarball { url, .. } => file_key(url),
        }
    }

    /// Whether nodes copy it whole before use (and pass it on only whole).
    pub fn whole(&self) -> bool {
        !matches!(self, Image::Bootcache { .. })
    }

    /// A whole file's digest, when the cluster knows it.
    pub fn digest(&self) -> Option<RootDigest> {
        match self {
            Image::Bootcache { .. } | Image::Oci { .. } => None,
            Image::Disk { digest, .. } | Image::Tarball { digest, .. } => *digest,
        }
    }
}

/// The key a whole file at `url` (a tarball or disk image, not a bootcache
/// container) is cached under on a node and known by to the control node:
/// its URL names it until its digest is known.
pub fn file_key(url: &str) -> RootDigest {
    let mut h = blake3::Hasher::new();
    for p in ["container image", url] {
        // Length-prefixed (what it always was: keys stay the same).
        h.update(&(p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    RootDigest(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_says_its_kind_key_and_digest() {
        let b = Image::Bootcache { url: "http://s/a.bcimg".into(), root: RootDigest([1; 32]) };
        let t = Image::Tarball { url: "http://s/b.tar".into(), digest: None };
        let d = Image::Disk { url: "http://s/c.qcow2".into(), digest: Some(RootDigest([2; 32])) };
        assert_eq!((b.kind(), t.kind(), d.kind()), (Kind::Vm, Kind::Container, Kind::Vm));
        assert_eq!(b.key(), RootDigest([1; 32]));
        assert_eq!(t.key(), file_key("http://s/b.tar"));
        assert!(!b.whole() && t.whole() && d.whole());
        assert_eq!(d.digest(), Some(RootDigest([2; 32])));
        let blob = |b: u8, size| Blob { digest: Digest([b; 32]), size };
        let o =
            Image::Oci { reference: "r:5000/a@sha256:x".into(), manifest: Digest([3; 32]), config: blob(4, 10), layers: vec![blob(5, 20)] };
        assert_eq!((o.kind(), o.key(), o.whole(), o.digest()), (Kind::Container, RootDigest([3; 32]), true, None));
        let back: Image = serde_json::from_str(&serde_json::to_string(&o).unwrap()).unwrap();
        assert_eq!(back, o);
        assert!(serde_json::to_string(&o).unwrap().contains(&format!("\"sha256:{}\"", "04".repeat(32))));
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"{"type":"tarball","url":"http://s/b.tar","digest":null}"#);
        assert_eq!(serde_json::from_str::<Image>(r#"{"type":"tarball","url":"http://s/b.tar"}"#).unwrap(), t);
    }
}
