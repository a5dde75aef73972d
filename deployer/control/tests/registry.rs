//! A lab's VM image by registry reference, against the reference registry
//! on loopback and a control node on a real SQLite file: the tag resolved
//! once per deploy and pinned (nodes are ordered the blob by digest; a tag
//! moved later changes nothing until the lab is deployed again, nor the
//! registry gone), an unknown tag failing its instance naming the
//! reference while the rest of the lab goes on; the pinned reference shown
//! by inspect; behind
//! a token service, the control node and a node read the blob with the
//! credentials given to each (one token per client and scope), and a node
//! without them is refused naming the registry.

use std::sync::Arc;
use std::time::Duration;

use bootcache_api::agent::{Heartbeat, Join};
use bootcache_api::{Image, Lab, Name};
use bootcache_control::api::Control;
use bootcache_control::db::Db;
use bootcache_registry::{Credentials, Digest, Reference, Registry, Target, artifact, image};
use bootcache_testbed::programs::{DockerRegistry, RegistryAuth};
use bootcache_testbed::tokens::TokenIssuer;

fn n(s: &str) -> Name {
    s.parse().unwrap()
}

/// A small bootcache image of `fill` at `dir/NAME.bcimg`.
fn image_file(dir: &std::path::Path, name: &str, fill: u8) -> std::path::PathBuf {
    let raw = dir.join(format!("{name}.raw"));
    std::fs::write(&raw, vec![fill; 1 << 20]).unwrap();
    let src = bootcache_convert::open(&raw, None).unwrap().source;
    let (out, _) = bootcache_convert::convert(src.as_ref(), &[], std::io::Cursor::new(Vec::new()), &Default::default(), &|_| {}).unwrap();
    let path = dir.join(format!("{name}.bcimg"));
    std::fs::write(&path, out.into_inner()).unwrap();
    path
}

fn ordered(c: &Control) -> (u32, String, bootcache_api::RootDigest) {
    let orders = c.orders(&n("node-a")).unwrap();
    let vm = &orders.instances[0];
    let Image::Bootcache { url, root } = &vm.image else { panic!("{:?}", vm.image) };
    (vm.uid, url.clone(), *root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_image_by_reference_is_pinned_when_the_lab_is_deployed() {
    let dir = tempfile::tempdir().unwrap();
    let served = DockerRegistry::start(dir.path(), None).unwrap();
    let client = Registry::new(Credentials::Anonymous, vec![]).unwrap();
    let (v1, v2) = (image_file(dir.path(), "v1", 1), image_file(dir.path(), "v2", 2));
    let tag: Reference = format!("{}/guests/web:stable", served.addr).parse().unwrap();
    let pinned = artifact::push(&client, &v1, &tag).await.unwrap();
    let first = artifact::resolve(&client, &pinned).await.unwrap();

    let c = Control::new(Db::open(&dir.path().join("control.db")).unwrap(), Duration::from_secs(60));
    let join = Join { name: n("node-a"), address: "10.0.0.2:7070".into(), cores: 8, memory_bytes: 64 << 30 };
    c.join(&join, "peer".into(), true).unwrap();
    let beat = Heartbeat { cores: 8, memory_bytes: 64 << 30, running: 0, caches: vec![], files: vec![], instances: vec![] };
    c.heartbeat(&n("node-a"), &beat).unwrap();
    let text = format!("name: l\ninstances:\n  web:\n    kind: vm\n    image: {tag}\n    node: node-a\n");
    let deploy = |c: &Arc<Control>, text: String| {
        let c = Arc::clone(c);
        async move {
            let lab = Lab::parse(&text).map_err(|e| e.to_string())?;
            c.deploy(text, lab).await.map(drop).map_err(|e| e.to_string())
        }
    };
    // What inspect shows of the instance: the reference pinned at deploy.
    let pinned_shown = |c: &Control| {
        let views = bootcache_control::api::views(&c.db(), &n("l")).unwrap().unwrap();
        views[0].pinned.clone().unwrap_or_default()
    };
    deploy(&c, text.clone()).await.unwrap();
    let (uid, url, root) = ordered(&c);
    assert_eq!(url, client.blob_url(&first.pinned, &first.blob), "the blob, by digest");
    assert_eq!(root.to_string(), first.root);
    assert_eq!(pinned_shown(&c), first.pinned.to_string());

    // The tag moves: nothing ordered or shown changes.
    let second = artifact::push(&client, &v2, &tag).await.unwrap();
    assert_eq!(ordered(&c), (uid, url.clone(), root));
    assert_eq!(pinned_shown(&c), first.pinned.to_string());
    // Deployed again: the new image, a new instance.
    deploy(&c, text.clone()).await.unwrap();
    let (uid2, url2, root2) = ordered(&c);
    assert!(uid2 != uid && url2 != url && root2 != root, "v2 is taken");
    assert_eq!(pinned_shown(&c), second.to_string());

    // The registry gone: deploying again keeps the image pinned before.
    let addr = served.addr.clone();
    drop(served);
    deploy(&c, text.clone()).await.unwrap();
    assert_eq!(ordered(&c), (uid2, url2, root2));
    let served = DockerRegistry::start(dir.path(), None).unwrap();
    let tag_now = |t: &str| t.replace(&addr, &served.addr);

    // An unknown tag: that instance fails naming the reference (never
    // placed, never ordered); the rest of the lab goes on.
    let missing = tag_now(&text).replace(":stable", ":v9") + "  other:\n    kind: container\n    image: http://10.0.0.9/c.tar\n";
    deploy(&c, missing).await.unwrap();
    let views = bootcache_control::api::views(&c.db(), &n("l")).unwrap().unwrap();
    let web = views.iter().find(|v| v.name.as_str() == "web").unwrap();
    let reason = web.reason.clone().unwrap_or_default();
    assert_eq!(web.state, bootcache_api::InstanceState::Failed);
    assert!(reason.contains("guests/web:v9") && reason.contains("MANIFEST_UNKNOWN"), "{reason}");
    let orders = c.orders(&n("node-a")).unwrap();
    assert_eq!(orders.instances.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), ["other"]);
    // A reference is for a container's image or a VM's delivered lazily.
    let full = format!("name: l\ninstances:\n  c:\n    kind: vm\n    delivery: full\n    image: {tag}\n");
    let e = Lab::parse(&full).unwrap_err();
    assert_eq!(e.line, Some(6), "{e}");
    assert!(e.message.contains("a registry reference is for VM images"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_read_a_blob_behind_a_token_service_with_their_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = TokenIssuer::start(dir.path(), "alice", "s3cret-pass").unwrap();
    let served = DockerRegistry::start_with(dir.path(), RegistryAuth::Token { realm: &issuer.realm, cert: &issuer.cert }).unwrap();
    let config = dir.path().join("config.json");
    let auth = base64_auth("alice:s3cret-pass");
    std::fs::write(&config, format!(r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#, served.addr)).unwrap();
    let alice = Credentials::from_docker_config(&config, &served.addr).unwrap();
    let v1 = image_file(dir.path(), "v1", 1);
    let tag: Reference = format!("{}/guests/web:v1", served.addr).parse().unwrap();
    artifact::push(&Registry::new(alice, vec![]).unwrap(), &v1, &tag).await.unwrap();

    // The control node resolves the tag and reads the header with its credentials.
    let mut c = Control::new(Db::open(&dir.path().join("control.db")).unwrap(), Duration::from_secs(60));
    Arc::get_mut(&mut c).unwrap().registry_config = Some(config.clone());
    let join = Join { name: n("node-a"), address: "10.0.0.2:7070".into(), cores: 8, memory_bytes: 64 << 30 };
    c.join(&join, "peer".into(), true).unwrap();
    let beat = Heartbeat { cores: 8, memory_bytes: 64 << 30, running: 0, caches: vec![], files: vec![], instances: vec![] };
    c.heartbeat(&n("node-a"), &beat).unwrap();
    let text = format!("name: l\ninstances:\n  web:\n    kind: vm\n    image: {tag}\n    node: node-a\n");
    let lab = Lab::parse(&text).unwrap();
    c.deploy(text, lab).await.unwrap();
    let (_, url, root) = ordered(&c);

    // A node with the credentials opens the image as ordered (header,
    // index, boot segment) and reads the whole blob by ranges, byte for byte.
    let authorizers = bootcache_registry::blobs::authorizers(Some(config.clone()), vec![]);
    let mut opts = bootcache_delivery::cache::CacheOptions::new(dir.path().join("cache"));
    opts.background = bootcache_delivery::cache::Background::Off;
    let node = bootcache_delivery::node::Node::with_authorizers(dir.path().join("node.sock"), opts, Some(authorizers.clone()));
    let opened = node.open("web", &url, &[], Some(root)).await.unwrap();
    assert_eq!(opened.root_digest, root);
    let retry = bootcache_delivery::remote::RetryPolicy::default();
    let remote = bootcache_delivery::remote::Remote::open_authorized(&url, retry, authorizers(&url).unwrap()).await.unwrap();
    assert_eq!(remote.get(0..remote.len()).await.unwrap().as_ref(), std::fs::read(&v1).unwrap().as_slice(), "bytes identical");
    assert_eq!(issuer.issued(), 3, "one token each: the push, the control node, the node (however many ranges)");

    // A node without them: refused, naming the registry; nothing opened.
    let mut opts = bootcache_delivery::cache::CacheOptions::new(dir.path().join("cache-b"));
    opts.retry.budget = Duration::from_secs(2);
    let anonymous = bootcache_registry::blobs::authorizers(None, vec![]);
    let node = bootcache_delivery::node::Node::with_authorizers(dir.path().join("node-b.sock"), opts, Some(anonymous));
    let e = bootcache_http::chain(&node.open("web", &url, &[], Some(root)).await.unwrap_err());
    assert!(e.contains("401") && e.contains(&served.addr) && !e.contains("s3cret"), "{e}");
}

fn base64_auth(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_references_resolve_to_their_blobs_and_those_that_cannot_fail_alone() {
    let dir = tempfile::tempdir().unwrap();
    for d in ["open", "locked"] {
        std::fs::create_dir(dir.path().join(d)).unwrap();
    }
    let open = DockerRegistry::start(&dir.path().join("open"), None).unwrap();
    let htpasswd = dir.path().join("htpasswd");
    let made = std::process::Command::new("htpasswd").args(["-Bbc"]).arg(&htpasswd).args(["alice", "s3cret-pass"]).output().unwrap();
    assert!(made.status.success(), "htpasswd: {}", String::from_utf8_lossy(&made.stderr));
    let locked = DockerRegistry::start(&dir.path().join("locked"), Some(&htpasswd)).unwrap();
    let client = Registry::new(Credentials::Anonymous, vec![]).unwrap();
    let at = |registry: &str, repo: &str| -> Reference { format!("{registry}/{repo}").parse().unwrap() };

    // A two-layer image; the same behind an index (with arm64 beside it);
    // an index without linux/amd64; a VM image. (A manifest over 4 MiB the
    // reference registry refuses to store; the client's bound on what it
    // reads is shown against an endless answer in the registry's tests.)
    let tar = dir.path().join("a.tar");
    bootcache_testbed::oci::tar_of(&tar, &[("etc/a", b"a\n")]).unwrap();
    let tar2 = dir.path().join("b.tar");
    bootcache_testbed::oci::tar_of(&tar2, &[("etc/b", b"b\n")]).unwrap();
    let built = bootcache_testbed::oci::image(&dir.path().join("layers"), &[&tar, &tar2], &["/bin/sh"]).unwrap();
    let layers: Vec<&std::path::Path> = built.layers.iter().map(|p| p.as_path()).collect();
    let web = image::push(&client, &at(&open.addr, "lab/web:v1"), &built.config, &layers).await.unwrap();
    let Target::Digest(web_digest) = web.target else { panic!() };
    let web_size = client.manifest(&web).await.unwrap().bytes.len() as u64;
    // (An index names manifests of its own repository.)
    let multi = at(&open.addr, "lab/multi:v1");
    for repo in ["lab/multi:plain", "lab/arm:plain"] {
        image::push(&client, &at(&open.addr, repo), &built.config, &layers).await.unwrap();
    }
    image::push_index(&client, &multi, &[(web_digest, web_size, "linux/arm64"), (web_digest, web_size, "linux/amd64")]).await.unwrap();
    image::push_index(&client, &at(&open.addr, "lab/arm:v1"), &[(web_digest, web_size, "linux/arm64")]).await.unwrap();
    artifact::push(&client, &image_file(dir.path(), "vm", 3), &at(&open.addr, "guests/vm:v1")).await.unwrap();
    // The control node's credentials for the locked registry are wrong.
    let config = dir.path().join("config.json");
    let auth = base64_auth("alice:wrong-pass");
    std::fs::write(&config, format!(r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#, locked.addr)).unwrap();
    let mut c = Control::new(Db::open(&dir.path().join("control.db")).unwrap(), Duration::from_secs(60));
    Arc::get_mut(&mut c).unwrap().registry_config = Some(config);
    let join = Join { name: n("node-a"), address: "10.0.0.2:7070".into(), cores: 8, memory_bytes: 64 << 30 };
    c.join(&join, "peer".into(), true).unwrap();
    let beat = Heartbeat { cores: 8, memory_bytes: 64 << 30, running: 0, caches: vec![], files: vec![], instances: vec![] };
    c.heartbeat(&n("node-a"), &beat).unwrap();

    let mut text = String::from("name: l\ninstances:\n");
    let cases: [(&str, &str, String, &str); 7] = [
        ("web", "container", format!("{}/lab/web:v1", open.addr), ""),
        ("multi", "container", multi.to_string(), ""),
        ("unknown", "container", format!("{}/lab/web:nope", open.addr), "MANIFEST_UNKNOWN"),
        ("arm", "container", format!("{}/lab/arm:v1", open.addr), "no linux/amd64 image (it has: linux/arm64)"),
        ("vm-image", "container", format!("{}/guests/vm:v1", open.addr), "a bootcache VM image"),
        ("container-image", "vm", format!("{}/lab/web:v1", open.addr), "is not a bootcache image"),
        ("locked", "container", format!("{}/lab/web:v1", locked.addr), "401"),
    ];
    for (name, kind, image, _) in &cases {
        text += &format!("  {name}:\n    kind: {kind}\n    image: {image}\n    node: node-a\n");
    }
    let lab = Lab::parse(&text).unwrap();
    c.deploy(text.clone(), lab).await.unwrap();
    let views = bootcache_control::api::views(&c.db(), &n("l")).unwrap().unwrap();
    for (name, _, image, says) in &cases {
        let v = views.iter().find(|v| v.name.as_str() == *name).unwrap();
        let reason = v.reason.clone().unwrap_or_default();
        if says.is_empty() {
            assert_ne!(v.state, bootcache_api::InstanceState::Failed, "{name}: {reason}");
        } else {
            assert_eq!(v.state, bootcache_api::InstanceState::Failed, "{name}");
            assert!(reason.contains(image.as_str()) && reason.contains(says), "{name}: {reason}");
            assert!(!reason.contains("wrong-pass") && !reason.contains("s3cret"), "{name}: {reason}");
        }
    }
    // Both good ones ordered as the image's blobs, pinned to the
    // linux/amd64 manifest (through the index for `multi`).
    let orders = c.orders(&n("node-a")).unwrap();
    assert_eq!(orders.instances.len(), 2, "{:?}", orders.instances.iter().map(|o| &o.name).collect::<Vec<_>>());
    for o in &orders.instances {
        let Image::Oci { reference, manifest, config, layers } = &o.image else { panic!("{:?}", o.image) };
        assert_eq!(*manifest, web_digest, "{}", o.name);
        assert!(reference.ends_with(&format!("@{web_digest}")), "{reference}");
        assert_eq!(config.digest, Digest::of(&built.config));
        let sizes: Vec<u64> = built.layers.iter().map(|p| std::fs::metadata(p).unwrap().len()).collect();
        assert_eq!(layers.iter().map(|l| l.size).collect::<Vec<_>>(), sizes);
        assert_eq!(layers[0].digest, Digest::of(&std::fs::read(&built.layers[0]).unwrap()));
    }
}
