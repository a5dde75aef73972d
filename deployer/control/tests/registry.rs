//! A lab's VM image by registry reference, against the reference registry
//! on loopback and a control node on a real SQLite file: the tag resolved
//! once per deploy and pinned (nodes are ordered the blob by digest; a tag
//! moved later changes nothing until the lab is deployed again), an
//! unknown tag refused naming the reference with nothing recorded; the
//! pinned reference shown by inspect; behind
//! a token service, the control node and a node read the blob with the
//! credentials given to each (one token per client and scope), and a node
//! without them is refused naming the registry.

use std::sync::Arc;
use std::time::Duration;

use bootcache_api::agent::{Heartbeat, Join};
use bootcache_api::{Image, Lab, Name};
use bootcache_control::api::Control;
use bootcache_control::db::Db;
use bootcache_registry::{Credentials, Reference, Registry, artifact};
use bootcache_testbed::programs::{DockerRegistry, RegistryAuth};
use bootcache_testbed::tokens::TokenIssuer;

fn n(s: &str) -> Name {
    s.parse().unwrap()
}

/// A small bootcache image of `fill` at `dir/NAME.bcimg`.
fn image(dir: &std::path::Path, name: &str, fill: u8) -> std::path::PathBuf {
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
    let (v1, v2) = (image(dir.path(), "v1", 1), image(dir.path(), "v2", 2));
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
    assert_eq!(url, client.blob_url(&first.pinned, &first.blob).unwrap(), "the blob, by digest");
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

    // An unknown tag: refused naming the reference; the lab stays as it was.
    let missing = text.replace(":stable", ":v9");
    let e = deploy(&c, missing).await.unwrap_err();
    assert!(e.contains("guests/web:v9") && e.contains("MANIFEST_UNKNOWN"), "{e}");
    assert_eq!(ordered(&c), (uid2, url2, root2));
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
    let v1 = image(dir.path(), "v1", 1);
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
