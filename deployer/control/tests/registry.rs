//! A lab's VM image by registry reference, against the reference registry
//! on loopback and a control node on a real SQLite file: the tag resolved
//! once per deploy and pinned (nodes are ordered the blob by digest; a tag
//! moved later changes nothing until the lab is deployed again), an
//! unknown tag refused naming the reference with nothing recorded.

use std::sync::Arc;
use std::time::Duration;

use bootcache_api::agent::{Heartbeat, Join};
use bootcache_api::{Image, Lab, Name};
use bootcache_control::api::Control;
use bootcache_control::db::Db;
use bootcache_registry::{Credentials, Reference, Registry, artifact};
use bootcache_testbed::programs::DockerRegistry;

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
    deploy(&c, text.clone()).await.unwrap();
    let (uid, url, root) = ordered(&c);
    assert_eq!(url, client.blob_url(&first.pinned, &first.blob).unwrap(), "the blob, by digest");
    assert_eq!(root.to_string(), first.root);

    // The tag moves: nothing ordered changes.
    artifact::push(&client, &v2, &tag).await.unwrap();
    assert_eq!(ordered(&c), (uid, url.clone(), root));
    // Deployed again: the new image, a new instance.
    deploy(&c, text.clone()).await.unwrap();
    let (uid2, url2, root2) = ordered(&c);
    assert!(uid2 != uid && url2 != url && root2 != root, "v2 is taken");

    // An unknown tag: refused naming the reference; the lab stays as it was.
    let missing = text.replace(":stable", ":v9");
    let e = deploy(&c, missing).await.unwrap_err();
    assert!(e.contains("guests/web:v9") && e.contains("MANIFEST_UNKNOWN"), "{e}");
    assert_eq!(ordered(&c), (uid2, url2, root2));
    // A reference is for a VM's image delivered lazily, so far.
    let container = format!("name: l\ninstances:\n  c:\n    kind: container\n    image: {tag}\n");
    let e = Lab::parse(&container).unwrap_err();
    assert_eq!(e.line, Some(5), "{e}");
    assert!(e.message.contains("a registry reference is for VM images"), "{e}");
}
