//! Containers through Docker (`bollard` against a real dockerd, the API
//! version negotiated: Debian's docker.io 20.10 speaks 1.41). Images come
//! from root file system tarballs on the node, imported by this backend
//! once per tarball, or from a registry image's blobs the node holds
//! (checked by their digests), loaded once per image as the archive
//! `docker load` takes (Docker checks each layer against the config's
//! `diff_ids` again): Docker never speaks to a registry itself. Containers
//! run with no Docker network (the agent
//! gives them veths on the lab's bridges), labelled as made by the agent
//! that made them (and only those listed); readiness is a line of their log.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker as Client;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectContainerOptions, KillContainerOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, StartContainerOptions,
};
use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};

use crate::{Exec, Options, PREFIX, Runtime, RuntimeError, Source, Spec, Status, tail};

/// The label every container made carries: the agent (node) that made it.
pub const OWNER_LABEL: &str = "dev.bootcache.owner";

/// Containers on one dockerd.
#[derive(Clone, Debug)]
pub struct Docker {
    client: Client,
    owner: String,
    /// One import per image, however many containers wait for it.
    importing: std::sync::Arc<tokio::sync::Mutex<HashMap<String, std::sync::Arc<tokio::sync::Mutex<()>>>>>,
}

/// A tar archive of `files` (absolute path, content; mode 0644, their
/// directories 0755), as Docker takes it to put files into a container.
pub fn files_tar(files: &std::collections::BTreeMap<String, String>) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (path, content) in files {
        let rel = path.trim_start_matches('/');
        let mut parent = std::path::Path::new(rel).parent();
        let mut chain = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            chain.push(p.to_owned());
            parent = p.parent();
        }
        for d in chain.into_iter().rev() {
            if dirs.insert(d.clone()) {
                let mut h = tar::Header::new_gnu();
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, &d, std::io::empty())?;
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(content.len() as u64);
        b.append_data(&mut h, rel, content.as_bytes())?;
    }
    b.into_inner()
}

/// The Docker reference a tarball of key `key` is imported as (the whole
/// key: a tag is not cut to where two images could meet).
pub fn reference(key: &str) -> String {
    format!("bootcache/image:{key}")
}

fn docker_err(what: String) -> impl FnOnce(bollard::errors::Error) -> RuntimeError {
    move |e| RuntimeError::new(what, e)
}

fn is_missing(e: &bollard::errors::Error) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code: 404, .. })
}

impl Docker {
    /// Containers on the dockerd listening on unix socket
    /// `options.endpoint`, each labelled as made by `options.owner` (the
    /// agent's node), and only those listed.
    ///
    /// # Errors
    /// dockerd does not answer.
    pub async fn connect(options: &Options) -> Result<Docker, RuntimeError> {
        let (socket, owner) = (options.endpoint.as_str(), options.owner.as_str());
        let what = format!("dockerd at {socket}");
        let client = Client::connect_with_unix(socket, 120, bollard::API_DEFAULT_VERSION).map_err(docker_err(what.clone()))?;
        let client = client.negotiate_version().await.map_err(docker_err(what.clone()))?;
        let v = client.version().await.map_err(docker_err(what))?;
        tracing::info!(
            socket,
            version = v.version.as_deref().unwrap_or("?"),
            api = v.api_version.as_deref().unwrap_or("?"),
            "docker connected"
        );
        Ok(Docker { client, owner: owner.to_owned(), importing: Default::default() })
    }

    /// Whether image `reference` is in this Docker.
    ///
    /// # Errors
    /// dockerd fails.
    pub async fn has_image(&self, reference: &str) -> Result<bool, RuntimeError> {
        match self.client.inspect_image(reference).await {
            Ok(_) => Ok(true),
            Err(e) if is_missing(&e) => Ok(false),
            Err(e) => Err(docker_err(format!("image {reference}"))(e)),
        }
    }

    /// Imports a root file system tarball (`docker import`) as `reference`
    /// (`repo:tag`).
    ///
    /// # Errors
    /// The tarball stream fails, or dockerd refuses it.
    pub async fn import(
        &self,
        reference: &str,
        tarball: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    ) -> Result<(), RuntimeError> {
        let (repo, tag) = reference.rsplit_once(':').unwrap_or((reference, "latest"));
        let opts = CreateImageOptions { from_src: Some("-".into()), repo: Some(repo.into()), tag: Some(tag.into()), ..Default::default() };
        let mut progress = self.client.create_image(Some(opts), Some(bollard::body_try_stream(tarball)), None);
        while let Some(p) = progress.next().await {
            let p = p.map_err(docker_err(format!("importing {reference}")))?;
            if let Some(e) = p.error_detail.and_then(|d| d.message) {
                return Err(RuntimeError::new(format!("importing {reference}"), e));
            }
        }
        Ok(())
    }

    /// Loads an image archive (`docker load`'s format) streamed from
    /// `archive`.
    ///
    /// # Errors
    /// The stream fails, or dockerd refuses it (a layer whose content is
    /// not the config's `diff_ids`...).
    pub async fn load(
        &self,
        reference: &str,
        archive: impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    ) -> Result<(), RuntimeError> {
        let opts = bollard::query_parameters::ImportImageOptions { quiet: true, ..Default::default() };
        let mut progress = self.client.import_image_stream(opts, archive, None);
        while let Some(p) = progress.next().await {
            let p = p.map_err(docker_err(format!("loading {reference}")))?;
            if let Some(e) = p.error_detail.and_then(|d| d.message) {
                return Err(RuntimeError::new(format!("loading {reference}"), e));
            }
        }
        if !self.has_image(reference).await? {
            return Err(RuntimeError::new(format!("loading {reference}"), "dockerd took the archive but has no such image"));
        }
        Ok(())
    }

    /// The image of `source` (key `key`), imported or loaded if this
    /// Docker has it not; its reference.
    async fn image_of(&self, source: &Source) -> Result<String, RuntimeError> {
        let key = match source {
            Source::Tarball { key, .. } | Source::Image { key, .. } => key,
            _ => return Err(RuntimeError::new("image", "a container is made from a root file system tarball or a container image")),
        };
        let reference = reference(key);
        let lock = {
            let mut all = self.importing.lock().await;
            std::sync::Arc::clone(all.entry(reference.clone()).or_default())
        };
        let _held = lock.lock().await;
        if self.has_image(&reference).await? {
            return Ok(reference);
        }
        match source {
            Source::Image { config, layers, .. } => {
                let archive = archive(&reference, config, layers).await?;
                self.load(&reference, archive).await?;
                tracing::info!(%reference, layers = layers.len(), "container image loaded");
            }
            Source::Tarball { path, .. } => {
                let file = tokio::fs::File::open(path).await.map_err(|e| RuntimeError::new(format!("{}", path.display()), e))?;
                self.import(&reference, tokio_util::io::ReaderStream::new(file)).await?;
                tracing::info!(%reference, "container image imported");
            }
            _ => {}
        }
        Ok(reference)
    }
}

/// One file of a tar stream: its header, then its content.
fn tar_header(name: &str, size: u64) -> Result<Bytes, std::io::Error> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(Bytes::copy_from_slice(h.as_bytes()))
}

/// The zeros that pad a tar member of `size` bytes to its 512-byte block.
fn tar_padding(size: u64) -> Bytes {
    Bytes::from(vec![0u8; usize::try_from((512 - size % 512) % 512).unwrap_or(0)])
}

/// The archive `docker load` takes for an image of `config` and `layers`
/// (files on the node), tagged `reference`, streamed from the files (each
/// sent at the size it has now, which `docker load` checks).
async fn archive(
    reference: &str,
    config: &std::path::Path,
    layers: &[std::path::PathBuf],
) -> Result<impl Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static, RuntimeError> {
    let mut files = Vec::new();
    for (i, path) in std::iter::once(config).chain(layers.iter().map(std::path::PathBuf::as_path)).enumerate() {
        let size = tokio::fs::metadata(path).await.map_err(|e| RuntimeError::new(format!("{}", path.display()), e))?.len();
        let name = if i == 0 { "config.json".to_owned() } else { format!("layer-{i}.tar") };
        files.push((name, path.to_owned(), size));
    }
    let manifest = serde_json::to_vec(&serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [reference],
        "Layers": files.iter().skip(1).map(|f| f.0.clone()).collect::<Vec<_>>(),
    }]))
    .map_err(|e| RuntimeError::new(reference, e))?;
    let len = manifest.len() as u64;
    let head = futures_util::stream::iter(vec![tar_header("manifest.json", len), Ok(Bytes::from(manifest)), Ok(tar_padding(len))]);
    let members = futures_util::stream::iter(files)
        .then(|(name, path, size)| async move {
            let opened = match tokio::fs::File::open(&path).await {
                Ok(f) => tar_header(&name, size).map(|h| (h, f)),
                Err(e) => Err(e),
            };
            match opened {
                Ok((header, file)) => futures_util::stream::once(async move { Ok(header) })
                    .chain(tokio_util::io::ReaderStream::with_capacity(tokio::io::AsyncReadExt::take(file, size), 1 << 20))
                    .chain(futures_util::stream::once(async move { Ok(tar_padding(size)) }))
                    .boxed(),
                Err(e) => futures_util::stream::once(async move { Err(e) }).boxed(),
            }
        })
        .flatten();
    Ok(head.chain(members).chain(futures_util::stream::once(async { Ok(Bytes::from(vec![0u8; 1024])) })))
}

#[async_trait::async_trait]
impl Runtime for Docker {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn netns_pid(&self, id: &str) -> Result<Option<u32>, RuntimeError> {
        let c =
            self.client.inspect_container(id, None::<InspectContainerOptions>).await.map_err(docker_err(format!("{id}: inspecting")))?;
        let pid = c.state.and_then(|s| s.pid).unwrap_or(0);
        u32::try_from(pid).ok().filter(|p| *p > 0).map(Some).ok_or_else(|| RuntimeError::new(format!("{id}: its process"), "not running"))
    }

    async fn create(&self, spec: &Spec) -> Result<(), RuntimeError> {
        let reference = self.image_of(&spec.source).await.map_err(|e| RuntimeError::new(&spec.id, e))?;
        let command = &spec.command;
        let body = ContainerCreateBody {
            image: Some(reference),
            hostname: Some(spec.hostname.clone()),
            cmd: command.clone(),
            env: (!spec.env.is_empty()).then(|| spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(HashMap::from([(OWNER_LABEL.to_owned(), self.owner.clone())])),
            network_disabled: Some(false),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                memory: i64::try_from(spec.memory_bytes).ok(),
                nano_cpus: Some(i64::from(spec.cpus) * 1_000_000_000),
                // ping needs raw sockets.
                cap_add: Some(vec!["NET_RAW".into()]),
                init: Some(true),
                sysctls: (!spec.sysctls.is_empty()).then(|| spec.sysctls.clone().into_iter().collect()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let opts = CreateContainerOptions { name: Some(spec.id.clone()), ..Default::default() };
        match self.client.create_container(Some(opts), body).await {
            Ok(_) => {}
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => {}
            Err(e) => return Err(docker_err(format!("{}: creating", spec.id))(e)),
        }
        if !spec.files.is_empty() {
            let tar = files_tar(&spec.files).map_err(|e| RuntimeError::new(format!("{}: its files", spec.id), e))?;
            let opts = bollard::query_parameters::UploadToContainerOptions { path: "/".into(), ..Default::default() };
            self.client
                .upload_to_container(&spec.id, Some(opts), bollard::body_full(tar.into()))
                .await
                .map_err(docker_err(format!("{}: putting its files in", spec.id)))?;
        }
        Ok(())
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        match self.client.start_container(id, None::<StartContainerOptions>).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
            Err(e) => Err(docker_err(format!("{id}: starting"))(e)),
        }
    }

    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        match self.client.kill_container(id, Some(KillContainerOptions { signal: "KILL".into() })).await {
            Ok(()) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
            Err(e) => Err(docker_err(format!("{id}: stopping"))(e)),
        }
    }

    async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        let opts = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        match self.client.remove_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(docker_err(format!("{id}: removing"))(e)),
        }
    }

    async fn status(&self, id: &str) -> Result<Status, RuntimeError> {
        match self.client.inspect_container(id, None::<InspectContainerOptions>).await {
            Ok(c) => Ok(if c.state.and_then(|s| s.running).unwrap_or(false) { Status::Running } else { Status::Stopped }),
            Err(e) if is_missing(&e) => Ok(Status::Missing),
            Err(e) => Err(docker_err(format!("{id}: inspecting"))(e)),
        }
    }

    async fn logs(&self, id: &str) -> Result<String, RuntimeError> {
        let opts = LogsOptions { stdout: true, stderr: true, tail: "2000".into(), ..Default::default() };
        let chunks: Vec<_> = self.client.logs(id, Some(opts)).try_collect().await.map_err(docker_err(format!("{id}: reading its log")))?;
        let mut out = String::new();
        for c in chunks {
            out += &String::from_utf8_lossy(&c.into_bytes());
        }
        Ok(tail(out))
    }

    async fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<Exec, RuntimeError> {
        use bollard::exec::{CreateExecOptions, StartExecResults};
        let what = format!("{id}: {}", argv.first().map_or("", String::as_str));
        let opts =
            CreateExecOptions { cmd: Some(argv.to_vec()), attach_stdout: Some(true), attach_stderr: Some(true), ..Default::default() };
        let exec = self.client.create_exec(id, opts).await.map_err(docker_err(what.clone()))?;
        let run = async {
            let mut output = String::new();
            if let StartExecResults::Attached { output: mut stream, .. } =
                self.client.start_exec(&exec.id, None).await.map_err(docker_err(what.clone()))?
            {
                while let Some(chunk) = stream.next().await {
                    output += &String::from_utf8_lossy(&chunk.map_err(docker_err(what.clone()))?.into_bytes());
                }
            }
            let code = self.client.inspect_exec(&exec.id).await.map_err(docker_err(what.clone()))?.exit_code.unwrap_or(-1);
            Ok(Exec { code, output })
        };
        tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| RuntimeError::new(what.clone(), format!("still running after {} s", timeout.as_secs())))?
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        let opts = ListContainersOptions {
            all: true,
            filters: Some(HashMap::from([("label".to_owned(), vec![format!("{OWNER_LABEL}={}", self.owner)])])),
            ..Default::default()
        };
        let all = self.client.list_containers(Some(opts)).await.map_err(docker_err("listing containers".into()))?;
        Ok(all
            .into_iter()
            .flat_map(|c| c.names.unwrap_or_default())
            .map(|n| n.trim_start_matches('/').to_owned())
            .filter(|n| n.starts_with(PREFIX))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_image_archive_is_what_docker_load_reads() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config");
        std::fs::write(&config, b"{\"rootfs\": {}}").unwrap();
        let layers: Vec<std::path::PathBuf> = (0..2u8).map(|i| dir.path().join(format!("l{i}"))).collect();
        std::fs::write(&layers[0], vec![7u8; 1000]).unwrap();
        std::fs::write(&layers[1], vec![9u8; 512]).unwrap();
        let stream = archive("bootcache/image:ab", &config, &layers).await.unwrap();
        let bytes: Vec<u8> = stream.try_collect::<Vec<Bytes>>().await.unwrap().concat();
        assert_eq!(bytes.len() % 512, 0);
        let mut a = tar::Archive::new(&bytes[..]);
        let mut seen = std::collections::BTreeMap::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut content = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut content).unwrap();
            seen.insert(path, content);
        }
        let manifest: serde_json::Value = serde_json::from_slice(&seen["manifest.json"]).unwrap();
        assert_eq!(
            manifest,
            serde_json::json!([{"Config": "config.json", "RepoTags": ["bootcache/image:ab"], "Layers": ["layer-1.tar", "layer-2.tar"]}])
        );
        assert_eq!(seen["config.json"], std::fs::read(&config).unwrap());
        assert_eq!(seen["layer-1.tar"], vec![7u8; 1000]);
        assert_eq!(seen["layer-2.tar"], vec![9u8; 512]);
        // A layer gone: the stream fails rather than sending a short image.
        std::fs::remove_file(&layers[1]).unwrap();
        assert!(archive("bootcache/image:ab", &config, &layers).await.is_err());
    }

    #[test]
    fn files_go_into_a_tar_with_their_directories() {
        let files = std::collections::BTreeMap::from([
            ("/etc/motd".to_owned(), "hello\n".to_owned()),
            ("/srv/app/conf/a.ini".to_owned(), "a=1\n".to_owned()),
        ]);
        let bytes = files_tar(&files).unwrap();
        let mut a = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut content = String::new();
            std::io::Read::read_to_string(&mut e, &mut content).unwrap();
            seen.push((path, e.header().entry_type().is_dir(), content));
        }
        let names: Vec<&str> = seen.iter().map(|(p, _, _)| p.trim_end_matches('/')).collect();
        assert_eq!(names, ["etc", "etc/motd", "srv", "srv/app", "srv/app/conf", "srv/app/conf/a.ini"]);
        assert!(seen[1].2 == "hello\n" && !seen[1].1 && seen[0].1);
    }
}
