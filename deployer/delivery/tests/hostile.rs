//! A node against hostile stores and callers: stores that lie about sizes,
//! trickle, redirect, stall or send garbage, and API callers without the
//! credential or with requests meant to take a node over. Meanwhile the
//! node answers its API at once and keeps serving the images it has.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bootcache_delivery::cache::Background;
use bootcache_delivery::node::Node;
use bootcache_format::RawHeader;
use common::{Fixture, authorized_client, fixture, options, serve_api};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zerocopy::FromBytes;

/// How a hostile store answers.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// A container header claiming a 16 TiB file and an index to match.
    HugeIndex,
    /// One byte a second.
    Trickle,
    /// 302 to the real store.
    Redirect,
    /// Accepts and never answers.
    Stall,
    /// A secret-looking text file where a container should be.
    Garbage,
    /// More bytes than asked for, with the right Content-Range.
    TooLong,
}

const SECRET: &[u8] = b"TOP-SECRET internal file: root password is hunter2\n";

/// The first `len` bytes of a header that claims a 16 TiB container.
fn huge_header(fx: &Fixture) -> Vec<u8> {
    let mut head = std::fs::read(&fx.container).unwrap()[..256].to_vec();
    let claimed: u64 = 16 << 40;
    let (raw, _) = RawHeader::mut_from_prefix(&mut head).unwrap();
    let entries = (claimed / 2) / 64;
    raw.index_count.set(entries);
    raw.virtual_size.set(claimed);
    raw.boot_offset.set(256 + entries * 64);
    raw.boot_length.set(0);
    raw.rest_offset.set(256 + entries * 64);
    raw.rest_length.set(claimed - 256 - entries * 64 - 100);
    raw.meta_offset.set(claimed - 100);
    raw.meta_length.set(100);
    // Another image than the good one (whose cache a node would share).
    raw.root_digest[0] ^= 1;
    let crc = raw.compute_crc();
    raw.header_crc32c.set(crc);
    head
}

/// A store on loopback that misbehaves as `mode` says; its URL.
async fn hostile_store(mode: Mode, fx: &Fixture) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/disk.bcimg", listener.local_addr().unwrap());
    let header = huge_header(fx);
    let real = fx.url.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let (header, real) = (header.clone(), real.clone());
            tokio::spawn(async move {
                loop {
                    let mut req = Vec::new();
                    let mut byte = [0u8];
                    while !req.ends_with(b"\r\n\r\n") {
                        if sock.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        req.push(byte[0]);
                    }
                    let req = String::from_utf8_lossy(&req).to_lowercase();
                    let head = req.starts_with("head");
                    let range = req.lines().find_map(|l| l.strip_prefix("range: bytes=")).map(|r| {
                        let (a, b) = r.trim().split_once('-').unwrap();
                        (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap())
                    });
                    let total: u64 = match mode {
                        Mode::HugeIndex => 16 << 40,
                        Mode::Garbage => SECRET.len() as u64 * 8,
                        _ => 1 << 30,
                    };
                    let answer = match (mode, head, range) {
                        (Mode::Stall, _, _) => {
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                            return;
                        }
                        (Mode::Redirect, _, _) => {
                            format!("HTTP/1.1 302 Found\r\nlocation: {real}\r\ncontent-length: 0\r\n\r\n").into_bytes()
                        }
                        (_, true, _) => format!("HTTP/1.1 200 OK\r\ncontent-length: {total}\r\n\r\n").into_bytes(),
                        (_, false, Some((a, b))) => {
                            let body: Vec<u8> = match mode {
                                Mode::HugeIndex => (a..=b).map(|i| header.get(i as usize).copied().unwrap_or(0)).collect(),
                                Mode::Garbage => (a..=b).map(|i| SECRET[i as usize % SECRET.len()]).collect(),
                                Mode::TooLong => vec![0u8; (b - a + 1) as usize * 2],
                                _ => vec![0u8; (b - a + 1) as usize],
                            };
                            let mut out = format!(
                                "HTTP/1.1 206 Partial Content\r\ncontent-range: bytes {a}-{b}/{total}\r\ncontent-length: {}\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            if let Mode::Trickle = mode {
                                let _ = sock.write_all(&out).await;
                                for b in body {
                                    if sock.write_all(&[b]).await.is_err() {
                                        return;
                                    }
                                    tokio::time::sleep(Duration::from_secs(1)).await;
                                }
                                continue;
                            }
                            out.extend(body);
                            out
                        }
                        _ => b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n".to_vec(),
                    };
                    if sock.write_all(&answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    url
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut c = e.source();
    while let Some(x) = c {
        s = format!("{s}: {x}");
        c = x.source();
    }
    s
}

/// Every misbehaving store fails its own open with a reason (never a
/// crash, never its bytes repeated), while the node answers its API within
/// a second and keeps serving an image it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_stores_fail_their_own_opens_and_nothing_else() {
    let fx = fixture().await;
    let mut opts = options(fx.dir.path(), Background::Off);
    opts.retry.request_timeout = Duration::from_secs(2);
    opts.retry.budget = Duration::from_secs(3);
    let node = Node::new(fx.dir.path().join("node.sock"), opts);
    let api = serve_api(&node).await;
    let good = node.open("good", &fx.url, &[], None).await.unwrap();
    let cache = node.cache(&good.root_digest).unwrap();

    let modes = [Mode::HugeIndex, Mode::Trickle, Mode::Redirect, Mode::Stall, Mode::Garbage, Mode::TooLong];
    let mut opens = Vec::new();
    for (i, mode) in modes.into_iter().enumerate() {
        let url = hostile_store(mode, &fx).await;
        let node = Arc::clone(&node);
        opens.push((mode, tokio::spawn(async move { node.open(&format!("bad{i}"), &url, &[], None).await.map(|_| ()) })));
    }
    // While those are under way: the API answers at once, the good image reads.
    let client = authorized_client();
    let mut saw_opening = false;
    for _ in 0..5 {
        let t = Instant::now();
        let listed: serde_json::Value = client.get(format!("{api}/images")).send().await.unwrap().json().await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(1), "GET /images took {:?}", t.elapsed());
        saw_opening |= listed.as_array().unwrap().iter().any(|v| v["state"] == "opening");
        let t = Instant::now();
        let got = cache.read(0, 1 << 20).await.unwrap();
        assert!(got == fx.model[..1 << 20] && t.elapsed() < Duration::from_secs(1), "the good image stalled");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(saw_opening, "slow opens are listed as opening");

    for (mode, open) in opens {
        let err = match tokio::time::timeout(Duration::from_secs(60), open).await {
            Ok(joined) => chain(&joined.unwrap().err().unwrap_or_else(|| panic!("{mode:?}: a hostile store's image opened"))),
            Err(_) => panic!("{mode:?}: the open never ended"),
        };
        let want = match mode {
            Mode::HugeIndex => "larger than this node accepts",
            Mode::Trickle => "did not arrive within",
            Mode::Redirect => "redirects are not followed",
            Mode::Stall => "unreachable",
            Mode::Garbage => "not a bootcache container",
            Mode::TooLong => "more than the",
        };
        assert!(err.contains(want), "{mode:?}: {err}");
        assert!(!err.contains("TOP-SECRET") && !err.contains("54, 4f, 50"), "{mode:?} leaks the remote's bytes: {err}");
    }
    let listed: serde_json::Value = client.get(format!("{api}/images")).send().await.unwrap().json().await.unwrap();
    let failed = listed.as_array().unwrap().iter().filter(|v| v["state"] == "failed").count();
    assert_eq!(failed, 6, "{listed}");
    assert_eq!(node.cache_metrics().len(), 1, "only the good image has a cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_credential_nothing_is_done_or_read() {
    let fx = fixture().await;
    let node = Node::new(fx.dir.path().join("node.sock"), options(fx.dir.path(), Background::Off));
    let api = serve_api(&node).await;
    let root = node.open("disk", &fx.url, &[], None).await.unwrap().root_digest;
    let body = serde_json::json!({"name": "other", "url": fx.url});
    for token in [None, Some("Bearer wrong-token-wrong-token-wrong-token"), Some("Basic dXNlcjpwYXNz")] {
        let with = |r: reqwest::RequestBuilder| match token {
            Some(t) => r.header("authorization", t),
            None => r,
        };
        let client = reqwest::Client::new();
        let requests = [
            with(client.post(format!("{api}/images")).json(&body)),
            with(client.get(format!("{api}/images"))),
            with(client.delete(format!("{api}/images/disk"))),
            with(client.get(format!("{api}/peer/{root}")).header("range", "bytes=0-255")),
            with(client.head(format!("{api}/peer/{root}"))),
        ];
        for r in requests {
            let resp = r.send().await.unwrap();
            assert_eq!(resp.status(), 401, "{token:?}");
            assert!(resp.headers().contains_key("www-authenticate"));
        }
    }
    let names: Vec<String> = node.status().into_iter().map(|n| n.name).collect();
    assert_eq!(names, ["disk"], "nothing opened or closed");
    assert_eq!(node.cache(&root).unwrap().metrics().served_to_peers_bytes, 0, "nothing read");
    let metrics = reqwest::get(format!("{api}/metrics")).await.unwrap();
    assert_eq!(metrics.status(), 200, "the metrics stay open");
}

/// A counting HTTP server: answers 404 to everything; how many requests.
async fn counting_server() -> (String, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let count = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&count);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut seen = Vec::new();
                while let Ok(n) = sock.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        c.fetch_add(1, Ordering::Relaxed);
                        if sock.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (url, count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_urls_and_peers_cannot_take_the_node_over() {
    let fx = fixture().await;
    let node = Node::new(fx.dir.path().join("node.sock"), options(fx.dir.path(), Background::Unlimited));
    let api = serve_api(&node).await;
    let client = authorized_client();
    let post = |body: serde_json::Value| client.post(format!("{api}/images")).json(&body).send();

    // A second image on the same store.
    let other = fx.container.with_file_name("other.bcimg");
    let src = bootcache_convert::RawSource::open(&fx.source).unwrap();
    let (out, _) = bootcache_convert::convert(
        &src,
        &[],
        std::io::Cursor::new(Vec::new()),
        &bootcache_convert::ConvertOptions { creator: "other".into(), ..Default::default() },
        &|_| {},
    )
    .unwrap();
    std::fs::write(&other, out.into_inner()).unwrap();
    let other_url = fx.url.replace("disk.bcimg", "other.bcimg");

    // A name keeps its image: another URL is a conflict, the same one is the same answer.
    let first: serde_json::Value = post(serde_json::json!({"name": "vm1", "url": fx.url})).await.unwrap().json().await.unwrap();
    let conflict = post(serde_json::json!({"name": "vm1", "url": other_url})).await.unwrap();
    assert_eq!(conflict.status(), 409);
    assert!(conflict.text().await.unwrap().contains("bound to"));
    let again: serde_json::Value = post(serde_json::json!({"name": "vm1", "url": fx.url})).await.unwrap().json().await.unwrap();
    assert_eq!(first, again);
    assert_eq!(node.cache_metrics().len(), 1, "the refused image opened no cache");
    // Pinned to another root digest: refused, naming both.
    let pinned = post(serde_json::json!({"name": "vm2", "url": other_url, "root_digest": first["root_digest"]})).await.unwrap();
    assert_eq!(pinned.status(), 502);
    assert!(pinned.text().await.unwrap().contains(first["root_digest"].as_str().unwrap()));

    // Closing the name closes its cache, which stops streaming.
    let root: bootcache_format::RootDigest = first["root_digest"].as_str().unwrap().parse().unwrap();
    let cache = node.cache(&root).unwrap();
    assert_eq!(client.delete(format!("{api}/images/vm1")).send().await.unwrap().status(), 204);
    assert!(node.cache(&root).is_none() && node.cache_metrics().is_empty(), "no cache left open");
    // An extent being delivered at that instant may still land; then nothing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let fetched = cache.metrics().fetched_bytes();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cache.metrics().fetched_bytes(), fetched, "a closed cache still streams");

    // Names, URLs and peers that are not what they should be.
    let bad = [
        serde_json::json!({"name": ".", "url": fx.url}),
        serde_json::json!({"name": "..", "url": fx.url}),
        serde_json::json!({"name": "a/b", "url": fx.url}),
        serde_json::json!({"name": "f", "url": "file:///etc/passwd"}),
        serde_json::json!({"name": "f", "url": "ftp://127.0.0.1/x"}),
        serde_json::json!({"name": "f", "url": fx.url, "peers": ["file:///etc/passwd"]}),
        serde_json::json!({"name": "f", "url": fx.url, "peers": (0..20).map(|i| format!("http://10.0.0.{i}:1")).collect::<Vec<_>>()}),
        serde_json::json!({"name": "f", "url": fx.url, "root_digest": "xyz"}),
        serde_json::json!({"name": "f", "url": fx.url, "unknown": 1}),
    ];
    for body in bad {
        let t = Instant::now();
        let resp = post(body.clone()).await.unwrap();
        assert_eq!(resp.status(), 400, "{body}: {}", resp.text().await.unwrap());
        assert!(t.elapsed() < Duration::from_secs(2), "{body} was retried");
    }

    // A thousand copies of one peer are one peer: it gets a handful of requests.
    let (peer, count) = counting_server().await;
    let peers: Vec<String> = (0..1000).map(|i| if i % 2 == 0 { peer.clone() } else { format!("{peer}/") }).collect();
    let opened = post(serde_json::json!({"name": "p", "url": fx.url, "peers": peers})).await.unwrap();
    assert_eq!(opened.status(), 200, "{}", opened.text().await.unwrap());
    common::wait_for("the image to be cached", || {
        node.status().iter().any(|n| n.metrics.as_ref().is_some_and(|m| m.present_extents == m.extents))
    })
    .await;
    assert!(count.load(Ordering::Relaxed) <= 4, "one request made the node send {} requests", count.load(Ordering::Relaxed));

    // Credentials in a URL are never shown.
    let secret_url = fx.url.replace("http://", "http://user:s3cr3t@") + "?sig=s3cr3t";
    let resp = post(serde_json::json!({"name": "cred", "url": secret_url})).await.unwrap();
    assert!(!resp.text().await.unwrap().contains("s3cr3t"));
    let listed = client.get(format!("{api}/images")).send().await.unwrap().text().await.unwrap();
    assert!(listed.contains("cred") && !listed.contains("s3cr3t"), "{listed}");
}

/// The store never serves a file outside its directory, even with a file
/// swapped for a link to one while it serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_swapped_in_is_never_followed() {
    let fx = fixture().await;
    let store_dir = fx.container.parent().unwrap().to_owned();
    let outside = fx.dir.path().join("outside.txt");
    std::fs::write(&outside, SECRET).unwrap();
    let target = store_dir.join("swap.img");
    std::fs::write(&target, b"inside the store\n").unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (stop, dir, outside) = (Arc::clone(&stop), store_dir.clone(), outside.clone());
        std::thread::spawn(move || {
            let (file, link) = (dir.join("swap.file"), dir.join("swap.link"));
            std::fs::write(&file, b"inside the store\n").unwrap();
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&outside, &link).unwrap();
            let mut linked = false;
            while !stop.load(Ordering::Relaxed) {
                // rename(2) swaps the name atomically between a file and a link.
                let from = if linked { dir.join("swap.file") } else { dir.join("swap.link") };
                let keep = dir.join("swap.keep");
                std::fs::rename(dir.join("swap.img"), &keep).unwrap();
                std::fs::rename(&from, dir.join("swap.img")).unwrap();
                std::fs::rename(&keep, if linked { dir.join("swap.link") } else { dir.join("swap.file") }).unwrap();
                linked = !linked;
            }
        })
    };
    let url = fx.url.replace("disk.bcimg", "swap.img");
    let client = reqwest::Client::new();
    let (mut served, mut refused) = (0, 0);
    for _ in 0..2000 {
        let resp = client.get(&url).send().await.unwrap();
        match resp.status().as_u16() {
            200 => {
                served += 1;
                let body = resp.bytes().await.unwrap();
                assert_eq!(&body[..], b"inside the store\n", "the store followed a link out of its directory");
            }
            404 => refused += 1,
            s => panic!("status {s}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    assert!(served > 0 && refused > 0, "the swap raced: {served} served, {refused} refused");
}

/// RFC 9110 ranges on the store, and its time limits on clients that send
/// half a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_answers_ranges_as_rfc_9110_says_and_drops_half_sent_requests() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("empty"), b"").unwrap();
    std::fs::write(dir.path().join("ten"), b"0123456789").unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = bootcache_delivery::http::Limits {
        max_connections: 150,
        header_timeout: Duration::from_secs(1),
        write_timeout: Duration::from_secs(5),
    };
    let stats = Arc::new(bootcache_delivery::store::StoreStats::default());
    tokio::spawn(bootcache_delivery::store::serve_with(listener, dir.path().to_owned(), stats, limits, std::future::pending()));
    let client = reqwest::Client::new();
    let get = |file: &str, headers: &[(&str, &str)]| {
        let mut r = client.get(format!("http://{addr}/{file}"));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.send()
    };
    let etag_less = get("ten", &[]).await.unwrap();
    let last_modified = etag_less.headers()["last-modified"].to_str().unwrap().to_owned();
    // (file, request headers, status, Content-Range, body start)
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, u16, Option<&'a str>, &'a [u8]);
    let cases: Vec<Case> = vec![
        ("empty", vec![("range", "bytes=0-")], 416, Some("bytes */0"), b"no range"),
        ("ten", vec![("range", "bytes=-100")], 206, Some("bytes 0-9/10"), b"0123456789"),
        ("ten", vec![("range", "bytes=2-3,2-3")], 206, Some("bytes 2-3/10"), b"23"),
        ("ten", vec![("range", "bytes=0-1,5-6")], 200, None, b"0123456789"),
        ("ten", vec![("range", "items=0-1")], 200, None, b"0123456789"),
        ("ten", vec![("range", "bytes=7-3")], 416, Some("bytes */10"), b"no range"),
        ("ten", vec![("range", "bytes=8-"), ("if-range", "\"other\"")], 200, None, b"0123456789"),
        ("ten", vec![("range", "bytes=8-"), ("if-range", &last_modified)], 206, Some("bytes 8-9/10"), b"89"),
    ];
    for (file, headers, status, content_range, body) in cases {
        let resp = get(file, &headers).await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{file} {headers:?}");
        assert_eq!(resp.headers().get("content-range").map(|v| v.to_str().unwrap()), content_range, "{file} {headers:?}");
        let got = resp.bytes().await.unwrap();
        assert!(got.starts_with(body), "{file} {headers:?}: {got:?}");
    }

    // A hundred half-sent requests are closed after the header time limit.
    let mut socks = Vec::new();
    for _ in 0..100 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /ten HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        socks.push(s);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for mut s in socks {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await.expect("a half-sent request is still open");
        assert!(!String::from_utf8_lossy(&buf[..n.unwrap_or(0)]).contains("0123456789"));
    }
    assert_eq!(get("ten", &[]).await.unwrap().status(), 200, "the store still serves");
}
