//! The control node's API over HTTP on loopback, with a real store and a
//! real SQLite file: nodes join and send heartbeats with their own
//! credentials, an image is registered from its header on the store,
//! nothing without the token, and everything is still there after a restart.

use std::time::Duration;

use bootcache_control::api::Control;
use bootcache_control::db::Db;
use bootcache_http::auth::Credential;

const TOKEN: &str = "control-test-token-0123456789abcdef0123";

async fn store(dir: &std::path::Path) -> String {
    let raw = dir.join("disk.raw");
    std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    let store_dir = dir.join("store");
    std::fs::create_dir(&store_dir).unwrap();
    let src = bootcache_convert::open(&raw, None).unwrap().source;
    let (out, _) = bootcache_convert::convert(src.as_ref(), &[], std::io::Cursor::new(Vec::new()), &Default::default(), &|_| {}).unwrap();
    std::fs::write(store_dir.join("disk.bcimg"), out.into_inner()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/disk.bcimg", listener.local_addr().unwrap());
    tokio::spawn(bootcache_delivery::store::serve(listener, store_dir, Default::default()));
    url
}

async fn serve(db_path: &std::path::Path) -> (String, tokio::task::JoinHandle<()>) {
    let control = Control::new(Db::open(db_path).unwrap(), Duration::from_millis(300));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = control.api(Credential::from_token(TOKEN));
    let task = tokio::spawn(async move {
        let _ = bootcache_http::serve(listener, router, Default::default(), std::future::pending()).await;
    });
    (base, task)
}

fn client() -> reqwest::Client {
    client_with(TOKEN)
}

fn client_with(token: &str) -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    reqwest::Client::builder().default_headers(h).build().unwrap()
}

/// Joins `node` at `address`; a client carrying its own credential.
async fn join(c: &reqwest::Client, base: &str, node: &str, address: &str) -> reqwest::Client {
    let r = c
        .post(format!("{base}/nodes"))
        .json(&serde_json::json!({"name": node, "address": address, "cores": 2, "memory_bytes": 8u64 << 30}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let joined: serde_json::Value = r.json().await.unwrap();
    assert_eq!(joined["peer_token"].as_str().unwrap().len(), 64);
    assert_ne!(joined["peer_token"], TOKEN);
    client_with(joined["secret"].as_str().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_images_and_the_credential_over_http_and_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let url = store(dir.path()).await;
    let db = dir.path().join("control.db");
    let (base, task) = serve(&db).await;
    let c = client();

    let anon = reqwest::Client::new();
    for r in [
        anon.get(format!("{base}/nodes")),
        anon.post(format!("{base}/nodes")).json(&serde_json::json!({"name": "x", "address": "10.0.0.9:1"})),
    ] {
        assert_eq!(r.send().await.unwrap().status(), 401);
    }
    let n1 = join(&c, &base, "node-1", "10.0.0.2:7070").await;
    let bad = c.post(format!("{base}/nodes")).json(&serde_json::json!({"name": "../x", "address": "10.0.0.2:7070"})).send().await.unwrap();
    assert!(bad.status().is_client_error(), "a bad name is refused");
    let bad = c.post(format!("{base}/nodes")).json(&serde_json::json!({"name": "n2", "address": "; rm -rf /"})).send().await.unwrap();
    assert_eq!(bad.status(), 400);

    let image: serde_json::Value =
        c.post(format!("{base}/images")).json(&serde_json::json!({"url": url})).send().await.unwrap().json().await.unwrap();
    let root = image["root_digest"].as_str().unwrap().to_owned();
    assert_eq!(image["virtual_size"], 1 << 20);
    let beat = serde_json::json!({"cores": 2, "memory_bytes": 1u64 << 34, "running": 1, "caches": [[root, 4096]]});
    let orders = n1.post(format!("{base}/nodes/node-1/heartbeat")).json(&beat).send().await.unwrap();
    assert_eq!(orders.status(), 200);
    assert_eq!(orders.json::<serde_json::Value>().await.unwrap(), serde_json::json!({"instances": [], "segments": [], "tasks": []}));
    assert_eq!(n1.post(format!("{base}/nodes/ghost/heartbeat")).json(&beat).send().await.unwrap().status(), 401);
    // Not with the administrator's token, nor another node's credential: only its own.
    assert_eq!(c.post(format!("{base}/nodes/node-1/heartbeat")).json(&beat).send().await.unwrap().status(), 401);
    let n2 = join(&c, &base, "node-2", "10.0.0.3:7070").await;
    assert_eq!(n2.post(format!("{base}/nodes/node-1/heartbeat")).json(&beat).send().await.unwrap().status(), 401);
    // Up: nobody joins as it again, from anywhere, with any token.
    let again =
        c.post(format!("{base}/nodes")).json(&serde_json::json!({"name": "node-1", "address": "10.6.6.6:7070"})).send().await.unwrap();
    assert_eq!(again.status(), 409);
    assert!(again.text().await.unwrap().contains("node remove node-1"));
    // A node's credential does nothing else.
    assert_eq!(n1.get(format!("{base}/labs")).send().await.unwrap().status(), 401);
    assert_eq!(
        n1.post(format!("{base}/nodes")).json(&serde_json::json!({"name": "n3", "address": "10.0.0.9:1"})).send().await.unwrap().status(),
        401
    );
    let nodes: serde_json::Value = c.get(format!("{base}/nodes")).send().await.unwrap().json().await.unwrap();
    assert_eq!(nodes[0]["up"], true, "{nodes}");
    let img: serde_json::Value = c.get(format!("{base}/images/{root}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(img["cached_by"][0]["node"], "node-1", "{img}");
    let missing = c.post(format!("{base}/images")).json(&serde_json::json!({"url": format!("{url}.nope")})).send().await.unwrap();
    assert_eq!(missing.status(), 502);

    // Restarted: the database holds it all; without heartbeats the node goes down.
    task.abort();
    let (base, _task) = serve(&db).await;
    assert_eq!(
        n1.post(format!("{base}/nodes/node-1/heartbeat")).json(&beat).send().await.unwrap().status(),
        200,
        "its credential survives"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let nodes: serde_json::Value = c.get(format!("{base}/nodes")).send().await.unwrap().json().await.unwrap();
    assert_eq!((nodes[0]["name"].as_str(), nodes[0]["up"].as_bool()), (Some("node-1"), Some(false)), "{nodes}");
    // Removed by the administrator: its credential goes with it.
    assert_eq!(c.delete(format!("{base}/nodes/node-1")).send().await.unwrap().status(), 204);
    assert_eq!(n1.post(format!("{base}/nodes/node-1/heartbeat")).json(&beat).send().await.unwrap().status(), 401);
    assert_eq!(c.delete(format!("{base}/nodes/node-1")).send().await.unwrap().status(), 404);
    let img: serde_json::Value = c.get(format!("{base}/images/{root}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(img["url"], url.as_str());
}

async fn beat(c: &reqwest::Client, base: &str, node: &str, caches: serde_json::Value, seen: serde_json::Value) -> serde_json::Value {
    let c = &NODES.lock().unwrap().get(&(base.to_owned(), node.to_owned())).cloned().unwrap_or_else(|| c.clone());
    let beat = serde_json::json!({"cores": 2, "memory_bytes": 8u64 << 30, "running": 0, "caches": caches, "instances": seen});
    let r = c.post(format!("{base}/nodes/{node}/heartbeat")).json(&beat).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Each node's own client, by control node and name.
static NODES: std::sync::Mutex<std::collections::BTreeMap<(String, String), reqwest::Client>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

fn lab_file(url: &str) -> String {
    format!(
        "name: lab1
segments:
  lan:
    subnet: 10.20.0.0/24
instances:
  vm:
    kind: vm
    image: {url}
    segments: {{lan: 10.20.0.10}}
    node: node-a
  vm2:
    kind: vm
    image: {url}
    segments: {{lan: 10.20.0.11}}
    node: node-b
  user:
    kind: container
    image: http://10.0.0.1:8080/busybox.tar
    count: 2
    segments: [lan]
    node: node-a
  other:
    kind: container
    image: http://10.0.0.1:8080/busybox.tar
    segments: [lan]
    node: node-b
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_is_placed_ordered_reported_and_destroyed() {
    let dir = tempfile::tempdir().unwrap();
    let url = store(dir.path()).await;
    let db = dir.path().join("control.db");
    let (base, task) = serve(&db).await;
    let c = client();
    let mut own = Vec::new();
    for (n, a) in [("node-a", "10.0.0.2:7070"), ("node-b", "10.0.0.3:7070")] {
        let mine = join(&c, &base, n, a).await;
        own.push((n, mine.clone()));
        NODES.lock().unwrap().insert((base.clone(), n.to_owned()), mine);
        beat(&c, &base, n, serde_json::json!([]), serde_json::json!([])).await;
    }

    // A bad lab file: refused with its line, nothing recorded.
    let bad = c.post(format!("{base}/labs")).body(lab_file(&url).replace("count: 2", "count: 1000000000")).send().await.unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().starts_with("line 19: "));
    let anon = reqwest::Client::new().post(format!("{base}/labs")).body(lab_file(&url)).send().await.unwrap();
    assert_eq!(anon.status(), 401);
    let labs: serde_json::Value = c.get(format!("{base}/labs")).send().await.unwrap().json().await.unwrap();
    assert_eq!(labs, serde_json::json!([]));

    let rows: serde_json::Value = c.post(format!("{base}/labs")).body(lab_file(&url)).send().await.unwrap().json().await.unwrap();
    let placed: Vec<(String, String)> =
        rows.as_array().unwrap().iter().map(|r| (r["name"].as_str().unwrap().into(), r["node"].as_str().unwrap_or("").into())).collect();
    assert_eq!(placed.len(), 5, "{rows}");
    assert!(placed.contains(&("vm".into(), "node-a".into())) && placed.contains(&("vm2".into(), "node-b".into())), "pins: {placed:?}");
    let root = rows.as_array().unwrap().iter().find(|r| r["name"] == "vm").unwrap()["image"].as_str().unwrap().to_owned();

    let tarball = rows.as_array().unwrap().iter().find(|r| r["name"] == "other").unwrap()["image"].as_str().unwrap().to_owned();

    // node-a fetches both images from the store. node-b is told at once to
    // fetch the VM image from node-a (which relays what it receives), and
    // the tarball only once node-a holds it whole, from node-a.
    let a = beat(&c, &base, "node-a", serde_json::json!([]), serde_json::json!([])).await;
    let vm = a["instances"].as_array().unwrap().iter().find(|o| o["name"] == "vm").expect("vm ordered on node-a");
    let vm_uid = vm["uid"].as_u64().unwrap();
    assert_eq!(vm["sources"], serde_json::json!([]), "{vm}");
    assert_eq!(vm["nics"][0]["address"], "10.20.0.10");
    let user = a["instances"].as_array().unwrap().iter().find(|o| o["name"] == "user-1").expect("user-1 ordered on node-a");
    assert_eq!(user["sources"], serde_json::json!([]), "{user}");
    let b = beat(&c, &base, "node-b", serde_json::json!([]), serde_json::json!([])).await;
    let vm2 = b["instances"].as_array().unwrap().iter().find(|o| o["name"] == "vm2").expect("vm2 ordered at once");
    assert_eq!(vm2["sources"], serde_json::json!(["http://10.0.0.2:7070"]), "{vm2}");
    assert!(b["instances"].as_array().unwrap().iter().all(|o| o["name"] != "other"), "other waits for its tarball's source: {b}");
    beat(
        &c,
        &base,
        "node-a",
        serde_json::json!([[root, 0], [tarball, 1]]),
        serde_json::json!([{"uid": vm_uid, "lab": "lab1", "name": "vm", "state": "fetching"}]),
    )
    .await;
    let b = beat(&c, &base, "node-b", serde_json::json!([]), serde_json::json!([])).await;
    let other = b["instances"].as_array().unwrap().iter().find(|o| o["name"] == "other").expect("other ordered once node-a holds it");
    assert_eq!(other["sources"], serde_json::json!(["http://10.0.0.2:7070"]), "{other}");
    // One segment on both nodes: joined by VXLAN; each node answers DHCP
    // for its own VM from an address of its own.
    let seg_a = &a["segments"][0];
    let seg_b = &b["segments"][0];
    assert_eq!(seg_a["remotes"], serde_json::json!(["10.0.0.3"]), "{a}");
    assert_eq!(seg_b["remotes"], serde_json::json!(["10.0.0.2"]), "{b}");
    assert_eq!((&seg_a["bridge"], &seg_a["vni"]), (&seg_b["bridge"], &seg_b["vni"]));
    assert_ne!(seg_a["dhcp"]["server"], seg_b["dhcp"]["server"]);
    assert_eq!(seg_a["dhcp"]["hosts"][0][1], "10.20.0.10");

    // Reported ready (straight from placed: the states between are recorded too).
    let seen = serde_json::json!([{"uid": vm_uid, "lab": "lab1", "name": "vm", "state": "ready"}]);
    beat(&c, &base, "node-a", serde_json::json!([[root, 4096]]), seen.clone()).await;
    let rows: serde_json::Value = c.get(format!("{base}/labs/lab1/instances")).send().await.unwrap().json().await.unwrap();
    let vm = rows.as_array().unwrap().iter().find(|r| r["name"] == "vm").unwrap();
    assert_eq!(vm["state"], "ready");
    let history: Vec<&str> = vm["history"].as_array().unwrap().iter().map(|h| h[0].as_str().unwrap()).collect();
    assert_eq!(history, ["pending", "placed", "fetching", "starting", "ready"]);

    // The control node restarts: the same orders, nothing placed again.
    task.abort();
    let (base, task) = serve(&db).await;
    for (n, mine) in own {
        NODES.lock().unwrap().insert((base.clone(), n.to_owned()), mine);
    }
    let again = beat(&c, &base, "node-a", serde_json::json!([[root, 4096]]), seen.clone()).await;
    assert_eq!(again["instances"], a["instances"]);
    // A second deploy converges: nothing new, states kept.
    let rows2: serde_json::Value = c.post(format!("{base}/labs")).body(lab_file(&url)).send().await.unwrap().json().await.unwrap();
    assert_eq!(rows2.as_array().unwrap().iter().find(|r| r["name"] == "vm").unwrap()["state"], "ready");

    // Destroyed: no orders; what node-a still runs is listed until it says it is gone.
    assert_eq!(c.delete(format!("{base}/labs/lab1")).send().await.unwrap().status(), 204);
    let a = beat(&c, &base, "node-a", serde_json::json!([]), seen).await;
    assert_eq!(a, serde_json::json!({"instances": [], "segments": [], "tasks": []}));
    let rem: serde_json::Value = c.get(format!("{base}/labs/lab1/remaining")).send().await.unwrap().json().await.unwrap();
    assert_eq!(rem["remaining"][0]["name"], "vm", "{rem}");
    beat(&c, &base, "node-a", serde_json::json!([]), serde_json::json!([])).await;
    let rem: serde_json::Value = c.get(format!("{base}/labs/lab1/remaining")).send().await.unwrap().json().await.unwrap();
    assert_eq!(rem["remaining"], serde_json::json!([]));
    assert_eq!(c.delete(format!("{base}/labs/lab1")).send().await.unwrap().status(), 204, "a second destroy succeeds");
    drop(task);
}
