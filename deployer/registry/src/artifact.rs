//! A bootcache image as an OCI artifact: an image manifest whose
//! `artifactType` is [`ARTIFACT_TYPE`], with the empty config and one
//! layer, the container file itself ([`LAYER_TYPE`]), annotated with its
//! root digest and boot segment size. One blob, so that a node reads it
//! with HTTP ranges exactly as it reads a container on a store.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::RegistryError;
use crate::client::Registry;
use bootcache_api::reference::{Digest, Reference};

/// The artifact type of a bootcache image.
pub const ARTIFACT_TYPE: &str = "application/vnd.bootcache.image.v1";
/// The media type of its one layer, the container file.
pub const LAYER_TYPE: &str = "application/vnd.bootcache.image.layer.v1";
/// The OCI image manifest's media type.
pub const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// The empty config's media type (OCI 1.1 artifacts).
pub const EMPTY_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// Annotation: the container's root digest (BLAKE3, hex).
pub const ROOT_ANNOTATION: &str = "dev.bootcache.root-digest";
/// Annotation: its boot segment's size in bytes.
pub const BOOT_ANNOTATION: &str = "dev.bootcache.boot-segment-bytes";

/// A content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Its media type.
    pub media_type: String,
    /// Its digest (`sha256:...`).
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image manifest (what of it bootcache reads and writes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// 2.
    pub schema_version: u32,
    /// [`MANIFEST_TYPE`].
    #[serde(default)]
    pub media_type: Option<String>,
    /// What the artifact is.
    #[serde(default)]
    pub artifact_type: Option<String>,
    /// Its config.
    pub config: Descriptor,
    /// Its layers.
    pub layers: Vec<Descriptor>,
    /// Its annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A bootcache image in a registry, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The reference pinned to its manifest's digest.
    pub pinned: Reference,
    /// The container blob's digest.
    pub blob: Digest,
    /// Its size.
    pub size: u64,
    /// Its root digest, as the manifest says (the container's own is
    /// checked when it is opened).
    pub root: String,
    /// Its boot segment's size, as the manifest says.
    pub boot_bytes: u64,
}

/// Reads the manifest `reference` names as a bootcache image.
///
/// # Errors
/// As [`Registry::manifest`]; a manifest that is not a bootcache image
/// (another artifact type, not one layer of [`LAYER_TYPE`], no root digest).
pub async fn resolve(registry: &Registry, reference: &Reference) -> Result<Resolved, RegistryError> {
    let fetched = registry.manifest(reference).await?;
    read_manifest(reference, &fetched.bytes, fetched.digest)
}

/// A manifest's bytes (whose digest is `digest`) read as a bootcache
/// image's.
///
/// # Errors
/// Over [`MAX_MANIFEST_BYTES`](crate::MAX_MANIFEST_BYTES), not JSON, not
/// an OCI image manifest, not a bootcache artifact.
pub fn read_manifest(reference: &Reference, bytes: &[u8], digest: Digest) -> Result<Resolved, RegistryError> {
    let not = |why: String| RegistryError::NotBootcache { reference: reference.to_string(), why };
    if bytes.len() > crate::MAX_MANIFEST_BYTES {
        return Err(not(format!("a manifest over {} bytes", crate::MAX_MANIFEST_BYTES)));
    }
    let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| not(format!("its manifest is not an OCI image manifest: {e}")))?;
    if manifest.schema_version != 2 {
        return Err(not(format!("schema version {}, not 2", manifest.schema_version)));
    }
    if manifest.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
        return Err(not(format!("its artifact type is {:?}, not {ARTIFACT_TYPE}", manifest.artifact_type.unwrap_or_default())));
    }
    let [layer] = manifest.layers.as_slice() else { return Err(not(format!("{} layers, not one", manifest.layers.len()))) };
    if layer.media_type != LAYER_TYPE {
        return Err(not(format!("its layer is {}, not {LAYER_TYPE}", layer.media_type)));
    }
    let blob: Digest = layer.digest.parse().map_err(|e: bootcache_api::reference::BadReference| not(e.0))?;
    let root = layer.annotations.get(ROOT_ANNOTATION).cloned().ok_or_else(|| not(format!("no {ROOT_ANNOTATION}")))?;
    let boot_bytes = layer.annotations.get(BOOT_ANNOTATION).and_then(|b| b.parse().ok()).unwrap_or(0);
    if root.len() != 64 || !root.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
        return Err(not(format!("its {ROOT_ANNOTATION} is not a BLAKE3 digest in lowercase hex")));
    }
    Ok(Resolved { pinned: reference.pinned(digest), blob, size: layer.size, root, boot_bytes })
}

/// Pushes the bootcache image at `path` as `reference`: the container
/// blob (streamed; skipped if the registry holds it), the empty config,
/// the manifest. Returns the reference pinned to the manifest's digest.
///
/// # Errors
/// A file that is not a bootcache image, the registry.
pub async fn push(registry: &Registry, path: &Path, reference: &Reference) -> Result<Reference, RegistryError> {
    let file_err = |why: String| RegistryError::File { path: path.to_owned(), why };
    let owned = path.to_owned();
    let (root, boot_bytes, digest, size) = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let file = std::fs::File::open(&owned).map_err(|e| e.to_string())?;
        let image = bootcache_format::Image::open(file.try_clone().map_err(|e| e.to_string())?)
            .map_err(|e| format!("not a bootcache image: {e}"))?;
        let boot = image.header().boot.end - image.header().boot.start;
        let mut hasher = sha2::Sha256::new();
        let size = std::io::copy(&mut std::io::BufReader::with_capacity(1 << 20, file), &mut hasher).map_err(|e| e.to_string())?;
        Ok((image.root_digest_hex(), boot, Digest(hasher.finalize().into()), size))
    })
    .await
    .map_err(|e| file_err(e.to_string()))?
    .map_err(file_err)?;
    registry.put_blob_file(reference, path, &digest, size).await?;
    let config = registry.put_blob(reference, b"{}".to_vec()).await?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MANIFEST_TYPE.into()),
        artifact_type: Some(ARTIFACT_TYPE.into()),
        config: Descriptor { media_type: EMPTY_TYPE.into(), digest: config.to_string(), size: 2, annotations: BTreeMap::new() },
        layers: vec![Descriptor {
            media_type: LAYER_TYPE.into(),
            digest: digest.to_string(),
            size,
            annotations: [(ROOT_ANNOTATION.to_owned(), root), (BOOT_ANNOTATION.to_owned(), boot_bytes.to_string())].into(),
        }],
        annotations: BTreeMap::new(),
    };
    let bytes = serde_json::to_vec(&manifest).map_err(|e| RegistryError::Bad { reference: reference.to_string(), why: e.to_string() })?;
    let pinned = registry.put_manifest(reference, MANIFEST_TYPE, bytes).await?;
    Ok(reference.pinned(pinned))
}

/// Pulls the bootcache image `reference` names into `path`: the blob
/// checked against its digest, then opened as a container whose root
/// digest must be the manifest's. Nothing is left at `path` otherwise.
///
/// # Errors
/// As [`resolve`] and [`Registry::get_blob_file`]; a container whose root
/// digest is not the manifest's.
pub async fn pull(registry: &Registry, reference: &Reference, path: &Path) -> Result<Resolved, RegistryError> {
    let resolved = resolve(registry, reference).await?;
    let tmp = path.with_extension("pulled");
    registry.get_blob_file(&resolved.pinned, &resolved.blob, resolved.size, &tmp).await?;
    let check = tmp.clone();
    let opened = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&check).map_err(|e| e.to_string())?;
        bootcache_format::Image::open(file).map(|i| i.root_digest_hex()).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let wrong = match opened {
        Ok(root) if root == resolved.root => None,
        Ok(root) => Some(format!("its container's root digest is {root}, its manifest says {}", resolved.root)),
        Err(why) => Some(format!("its blob is not a bootcache image: {why}")),
    };
    if let Some(why) = wrong {
        let _ = std::fs::remove_file(&tmp);
        return Err(RegistryError::NotBootcache { reference: reference.to_string(), why });
    }
    std::fs::rename(&tmp, path).map_err(|e| RegistryError::File { path: path.to_owned(), why: e.to_string() })?;
    Ok(resolved)
}
