//! The control node's API over HTTP on loopback, with a real store and a
//! real SQLite file: nodes register and send heartbeats, an image is
//! registered from its header on the store, nothing without the token, and
//! everything is still there after a restart.

use std::time::Duration;

use bootcache_control::api::Control;
use bootcache_control::db::Db;
use bootcache_delivery::auth::Credential;

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
        let _ = bootcache_delivery::http::serve(listener, router, Default::default(), std::future::pending()).await;
    });
    (base, task)
}

fn client() -> reqwest::Client {
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(reqwest::header::AUTHORIZATION, format!("Bearer {TOKEN}").parse().unwrap());
    reqwest::Client::builder().default_headers(h).build().unwrap()
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
    let reg =
        c.post(format!("{base}/nodes")).json(&serde_json::json!({"name": "node-1", "address": "10.0.0.2:7070"})).send().await.unwrap();
    assert_eq!(reg.status(), 204);
    let bad = c.post(format!("{base}/nodes")).json(&serde_json::json!({"name": "../x", "address": "10.0.0.2:7070"})).send().await.unwrap();
    assert!(bad.status().is_client_error(), "a bad name is refused");
    let bad = c.post(format!("{base}/nodes")).json(&serde_json::json!({"name": "n2", "address": "; rm -rf /"})).send().await.unwrap();
    assert_eq!(bad.status(), 400);

    let image: serde_json::Value =
        c.post(format!("{base}/images")).json(&serde_json::json!({"url": url})).send().await.unwrap().json().await.unwrap();
    let root = image["root_digest"].as_str().unwrap().to_owned();
    assert_eq!(image["virtual_size"], 1 << 20);
    let beat = serde_json::json!({"cores": 2, "memory_bytes": 1u64 << 34, "running": 1, "caches": [[root, 4096]]});
    assert_eq!(c.post(format!("{base}/nodes/node-1/heartbeat")).json(&beat).send().await.unwrap().status(), 204);
    assert_eq!(c.post(format!("{base}/nodes/ghost/heartbeat")).json(&beat).send().await.unwrap().status(), 404);
    let nodes: serde_json::Value = c.get(format!("{base}/nodes")).send().await.unwrap().json().await.unwrap();
    assert_eq!(nodes[0]["up"], true, "{nodes}");
    let img: serde_json::Value = c.get(format!("{base}/images/{root}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(img["cached_by"][0]["node"], "node-1", "{img}");
    let missing = c.post(format!("{base}/images")).json(&serde_json::json!({"url": format!("{url}.nope")})).send().await.unwrap();
    assert_eq!(missing.status(), 502);

    // Restarted: the database holds it all; without heartbeats the node goes down.
    task.abort();
    let (base, _task) = serve(&db).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let nodes: serde_json::Value = c.get(format!("{base}/nodes")).send().await.unwrap().json().await.unwrap();
    assert_eq!((nodes[0]["name"].as_str(), nodes[0]["up"].as_bool()), (Some("node-1"), Some(false)), "{nodes}");
    let img: serde_json::Value = c.get(format!("{base}/images/{root}")).send().await.unwrap().json().await.unwrap();
    assert_eq!(img["url"], url.as_str());
}
