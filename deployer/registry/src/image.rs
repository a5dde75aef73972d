//! Container images by reference: a tag or digest resolved to the
//! linux/amd64 image manifest (through an OCI image index or a Docker
//! manifest list), whose config and layers are blobs named by their
//! digests. A node copies those blobs (from a peer or the registry), checks
//! each against its digest and loads them into its Docker; nothing here
//! trusts what a registry says beyond what its digests prove.

use std::path::Path;

use serde::Deserialize;
use sha2::Digest as _;

use crate::RegistryError;
use crate::artifact::{Descriptor, Manifest};
use crate::client::Registry;
use bootcache_api::image::Blob;
use bootcache_api::reference::{Digest, Reference};

/// The platform a node runs (the one taken from an index).
pub const PLATFORM: (&str, &str) = ("linux", "amd64");
/// The most layers an image may have (Docker's own bound is 127).
pub const MAX_LAYERS: usize = 128;
/// The largest config blob (it is JSON a node hands Docker).
pub const MAX_CONFIG_BYTES: u64 = 8 << 20;

/// Index media types (OCI, Docker).
const INDEX_TYPES: [&str; 2] = ["application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"];
/// Image manifest media types (OCI, Docker).
const MANIFEST_TYPES: [&str; 2] = ["application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"];
/// Config media types (OCI, Docker).
const CONFIG_TYPES: [&str; 2] = ["application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"];
/// Layer media types Docker loads (plain or gzip'd tar; OCI, Docker).
const LAYER_TYPES: [&str; 3] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];
/// The OCI layer type a pushed image's layers are written with.
pub const GZIP_LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A container image in a registry, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerImage {
    /// The reference pinned to its linux/amd64 image manifest's digest.
    pub pinned: Reference,
    /// Its config.
    pub config: Blob,
    /// Its layers, bottom first.
    pub layers: Vec<Blob>,
}

impl ContainerImage {
    /// Its blobs' bytes, config and layers.
    pub fn bytes(&self) -> u64 {
        self.layers.iter().fold(self.config.size, |a, l| a.saturating_add(l.size))
    }
}

/// What a manifest's bytes turned out to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Read {
    /// An index: the digest of its linux/amd64 manifest.
    Index(Digest),
    /// An image manifest.
    Image(ContainerImage),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnyManifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Entry>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Entry {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
}

/// Resolves `reference` to the container image it names: an index to its
/// linux/amd64 manifest (one more request, by digest), that manifest read.
///
/// # Errors
/// As [`Registry::manifest`]; what [`read_manifest`] refuses; an index
/// whose entry is another index.
pub async fn resolve(registry: &Registry, reference: &Reference) -> Result<ContainerImage, RegistryError> {
    let fetched = registry.manifest(reference).await?;
    match read_manifest(reference, &fetched.bytes, fetched.digest, &fetched.media_type)? {
        Read::Image(image) => Ok(image),
        Read::Index(digest) => {
            let pinned = reference.pinned(digest);
            let fetched = registry.manifest(&pinned).await?;
            match read_manifest(&pinned, &fetched.bytes, fetched.digest, &fetched.media_type)? {
                Read::Image(image) => Ok(image),
                Read::Index(_) => Err(not(reference, "its index names another index for linux/amd64".into())),
            }
        }
    }
}

fn not(reference: &Reference, why: String) -> RegistryError {
    RegistryError::NotContainer { reference: reference.to_string(), why }
}

fn blob(reference: &Reference, d: &Descriptor, what: &str) -> Result<Blob, RegistryError> {
    let digest: Digest =
        d.digest.parse().map_err(|e: bootcache_api::reference::BadReference| not(reference, format!("its {what}: {e}")))?;
    Ok(Blob { digest, size: d.size })
}

/// A manifest's bytes (whose digest is `digest`, sent as `media_type`)
/// read as a container image's manifest or index.
///
/// # Errors
/// Over [`MAX_MANIFEST_BYTES`](crate::MAX_MANIFEST_BYTES), not JSON, a
/// bootcache VM image or another artifact, an index without linux/amd64,
/// a config or layer of a type Docker does not load, more than
/// [`MAX_LAYERS`] layers, a config over [`MAX_CONFIG_BYTES`].
pub fn read_manifest(reference: &Reference, bytes: &[u8], digest: Digest, media_type: &str) -> Result<Read, RegistryError> {
    if bytes.len() > crate::MAX_MANIFEST_BYTES {
        return Err(not(reference, format!("a manifest over {} bytes", crate::MAX_MANIFEST_BYTES)));
    }
    let m: AnyManifest = serde_json::from_slice(bytes).map_err(|e| not(reference, format!("its manifest is not one: {e}")))?;
    if m.schema_version != 2 {
        return Err(not(reference, format!("schema version {}, not 2", m.schema_version)));
    }
    if m.artifact_type.as_deref() == Some(crate::artifact::ARTIFACT_TYPE) {
        return Err(not(reference, "it is a bootcache VM image (a VM's image:), not a container image".into()));
    }
    // The manifest's own word first, else what the registry sent it as.
    let kind = m.media_type.as_deref().filter(|t| !t.is_empty()).unwrap_or(media_type);
    if INDEX_TYPES.contains(&kind) || (m.manifests.is_some() && m.config.is_none()) {
        let entries = m.manifests.unwrap_or_default();
        let entry = entries
            .iter()
            .find(|e| e.platform.as_ref().is_some_and(|p| (p.os.as_str(), p.architecture.as_str()) == PLATFORM))
            .ok_or_else(|| {
                let has: Vec<String> =
                    entries.iter().filter_map(|e| e.platform.as_ref()).map(|p| format!("{}/{}", p.os, p.architecture)).collect();
                not(
                    reference,
                    format!("its index has no linux/amd64 image (it has: {})", if has.is_empty() { "none".into() } else { has.join(", ") }),
                )
            })?;
        if !entry.media_type.is_empty()
            && !MANIFEST_TYPES.contains(&entry.media_type.as_str())
            && !INDEX_TYPES.contains(&entry.media_type.as_str())
        {
            return Err(not(reference, format!("its linux/amd64 entry is a {}", entry.media_type)));
        }
        let d = entry.digest.parse().map_err(|e: bootcache_api::reference::BadReference| not(reference, format!("its index: {e}")))?;
        return Ok(Read::Index(d));
    }
    if !kind.is_empty() && !MANIFEST_TYPES.contains(&kind) {
        return Err(not(reference, format!("its manifest is a {kind:?}, neither an image manifest nor an index")));
    }
    let (Some(config), Some(layers)) = (m.config, m.layers) else {
        return Err(not(reference, "its manifest names no config or no layers".into()));
    };
    if !CONFIG_TYPES.contains(&config.media_type.as_str()) {
        return Err(not(reference, format!("its config is a {} (an artifact, not a container image)", config.media_type)));
    }
    if config.size > MAX_CONFIG_BYTES {
        return Err(not(reference, format!("its config is {} bytes, more than {MAX_CONFIG_BYTES}", config.size)));
    }
    if layers.is_empty() || layers.len() > MAX_LAYERS {
        return Err(not(reference, format!("{} layers (1 to {MAX_LAYERS})", layers.len())));
    }
    if let Some(l) = layers.iter().find(|l| !LAYER_TYPES.contains(&l.media_type.as_str())) {
        return Err(not(reference, format!("a layer of type {} (Docker loads tar and tar+gzip layers)", l.media_type)));
    }
    let config = blob(reference, &config, "config")?;
    let layers = layers.iter().map(|l| blob(reference, l, "layer")).collect::<Result<Vec<_>, _>>()?;
    Ok(Read::Image(ContainerImage { pinned: reference.pinned(digest), config, layers }))
}

/// Pushes a container image: its `config` (JSON, whose `rootfs.diff_ids`
/// name the layers' uncompressed digests) and its gzip'd layer files,
/// bottom first (each streamed, skipped if the registry holds it), then
/// an OCI image manifest tagged `reference`. What an image builder does;
/// the reference pinned to the manifest's digest.
///
/// # Errors
/// A layer file that cannot be read, the registry.
pub async fn push(registry: &Registry, reference: &Reference, config: &[u8], layers: &[&Path]) -> Result<Reference, RegistryError> {
    let mut descriptors = Vec::new();
    for path in layers {
        let file_err = |why: String| RegistryError::File { path: path.to_path_buf(), why };
        let owned = path.to_path_buf();
        let (digest, size) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let mut hasher = sha2::Sha256::new();
            let size = std::io::copy(&mut std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&owned)?), &mut hasher)?;
            Ok((Digest(hasher.finalize().into()), size))
        })
        .await
        .map_err(|e| file_err(e.to_string()))?
        .map_err(|e| file_err(e.to_string()))?;
        registry.put_blob_file(reference, path, &digest, size).await?;
        descriptors.push(Descriptor {
            media_type: GZIP_LAYER_TYPE.into(),
            digest: digest.to_string(),
            size,
            annotations: Default::default(),
        });
    }
    let config_digest = registry.put_blob(reference, config.to_vec()).await?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MANIFEST_TYPES[0].into()),
        artifact_type: None,
        config: Descriptor {
            media_type: CONFIG_TYPES[0].into(),
            digest: config_digest.to_string(),
            size: config.len() as u64,
            annotations: Default::default(),
        },
        layers: descriptors,
        annotations: Default::default(),
    };
    let bytes = serde_json::to_vec(&manifest).map_err(|e| RegistryError::Bad { reference: reference.to_string(), why: e.to_string() })?;
    let pinned = registry.put_manifest(reference, MANIFEST_TYPES[0], bytes).await?;
    Ok(reference.pinned(pinned))
}

/// Pushes an OCI image index tagged `reference` naming `manifests` (each
/// an image manifest's digest and size with its `os/architecture`); its
/// digest. What multi-platform images are.
///
/// # Errors
/// The registry.
pub async fn push_index(registry: &Registry, reference: &Reference, manifests: &[(Digest, u64, &str)]) -> Result<Digest, RegistryError> {
    let entries: Vec<serde_json::Value> = manifests
        .iter()
        .map(|(d, size, platform)| {
            let (os, arch) = platform.split_once('/').unwrap_or((platform, ""));
            serde_json::json!({"mediaType": MANIFEST_TYPES[0], "digest": d.to_string(), "size": size,
                "platform": {"os": os, "architecture": arch}})
        })
        .collect();
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": INDEX_TYPES[0], "manifests": entries});
    let bytes = serde_json::to_vec(&index).map_err(|e| RegistryError::Bad { reference: reference.to_string(), why: e.to_string() })?;
    registry.put_manifest(reference, INDEX_TYPES[0], bytes).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Reference {
        "127.0.0.1:5000/lab/web:v1".parse().unwrap()
    }

    fn d(b: u8) -> String {
        format!("sha256:{}", format!("{b:02x}").repeat(32))
    }

    fn manifest(config_type: &str, layer_type: &str, layers: usize) -> Vec<u8> {
        let layers: Vec<_> = (0..layers).map(|i| serde_json::json!({"mediaType": layer_type, "digest": d(2), "size": 100 + i})).collect();
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": MANIFEST_TYPES[1],
            "config": {"mediaType": config_type, "digest": d(1), "size": 7}, "layers": layers}))
        .unwrap()
    }

    #[test]
    fn an_image_manifest_names_its_config_and_layers() {
        let bytes = manifest(CONFIG_TYPES[1], LAYER_TYPES[2], 2);
        let Read::Image(image) = read_manifest(&r(), &bytes, Digest::of(&bytes), "").unwrap() else { panic!("not an image") };
        assert_eq!(image.pinned, r().pinned(Digest::of(&bytes)));
        assert_eq!(image.config, Blob { digest: d(1).parse().unwrap(), size: 7 });
        assert_eq!(image.layers.iter().map(|l| l.size).collect::<Vec<_>>(), [100, 101]);
        assert_eq!(image.bytes(), 208);
    }

    #[test]
    fn an_index_gives_its_linux_amd64_manifest_or_says_what_it_has() {
        let index = |platforms: &[(&str, &str, u8)]| {
            let m: Vec<_> = platforms
                .iter()
                .map(|(os, arch, b)| {
                    serde_json::json!({"mediaType": MANIFEST_TYPES[0], "digest": d(*b), "size": 1,
                    "platform": {"os": os, "architecture": arch}})
                })
                .collect();
            serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": m})).unwrap()
        };
        let bytes = index(&[("linux", "arm64", 3), ("linux", "amd64", 4), ("windows", "amd64", 5)]);
        assert_eq!(read_manifest(&r(), &bytes, Digest::of(&bytes), INDEX_TYPES[1]).unwrap(), Read::Index(d(4).parse().unwrap()));
        let bytes = index(&[("linux", "arm64", 3), ("linux", "s390x", 5)]);
        let e = read_manifest(&r(), &bytes, Digest::of(&bytes), INDEX_TYPES[0]).unwrap_err().to_string();
        assert!(e.contains("lab/web:v1") && e.contains("no linux/amd64") && e.contains("linux/arm64, linux/s390x"), "{e}");
    }

    #[test]
    fn what_is_not_a_container_image_docker_loads_is_refused_naming_it() {
        let vm = serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "mediaType": MANIFEST_TYPES[0],
            "artifactType": crate::artifact::ARTIFACT_TYPE, "config": {"mediaType": "x", "digest": d(1), "size": 2}, "layers": []}))
        .unwrap();
        let zstd = manifest(CONFIG_TYPES[0], "application/vnd.oci.image.layer.v1.tar+zstd", 1);
        let foreign = manifest(CONFIG_TYPES[1], "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", 1);
        let artifact = manifest("application/vnd.example.config+json", LAYER_TYPES[1], 1);
        let too_many = manifest(CONFIG_TYPES[0], LAYER_TYPES[1], MAX_LAYERS + 1);
        let none = manifest(CONFIG_TYPES[0], LAYER_TYPES[1], 0);
        let huge_config =
            String::from_utf8(manifest(CONFIG_TYPES[0], LAYER_TYPES[1], 1)).unwrap().replace("\"size\":7", "\"size\":999999999");
        for (bytes, says) in [
            (vm, "bootcache VM image"),
            (zstd, "tar+zstd"),
            (foreign, "foreign"),
            (artifact, "an artifact"),
            (too_many, "129 layers"),
            (none, "0 layers"),
            (huge_config.into_bytes(), "more than"),
            (b"{\"schemaVersion\": 1}".to_vec(), "schema version 1"),
            (b"<html>".to_vec(), "not one"),
            (vec![b' '; crate::MAX_MANIFEST_BYTES + 1], "over"),
        ] {
            let e = read_manifest(&r(), &bytes, Digest::of(&bytes), "").unwrap_err().to_string();
            assert!(e.contains("lab/web:v1") && e.contains("not a container image") && e.contains(says), "{says}: {e}");
        }
    }
}
