//! Nodes fetching from each other: a real store and two nodes on loopback,
//! the second told to ask the first before the store.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bootcache_delivery::cache::{Background, NodeCache, Prefetch};
use bootcache_delivery::node::Node;
use bootcache_format::{Encoding, Image, Segment};
use common::{Fixture, authorized_client, fixture, image, options, serve_api, wait_for};

/// A node serving its API (with the peer routes) on loopback; opens the
/// fixture's image in a cache under `sub`.
async fn peer_node(fx: &Fixture, sub: &str, background: Background) -> (Arc<Node>, Arc<NodeCache>, String) {
    let node = Node::new(fx.dir.path().join(format!("{sub}.sock")), options(&fx.dir.path().join(sub), background));
    let api = serve_api(&node).await;
    let opened = node.open("disk", &fx.url, &[], None).await.unwrap();
    let cache = node.cache(&opened.root_digest).unwrap();
    (node, cache, api)
}

/// A peer node "a" that has cached the whole image.
async fn caching_peer(fx: &Fixture) -> (Arc<Node>, Arc<NodeCache>, String) {
    let (node, cache, api) = peer_node(fx, "a", Background::Unlimited).await;
    wait_for("peer A to cache the image", || cache.complete()).await;
    (node, cache, api)
}

/// The bytes the store sends to open an image: header, index, metadata.
fn structure(img: &Image<std::fs::File>) -> u64 {
    let h = img.header();
    256 + (h.index_range().end - h.index_range().start) + (h.meta.end - h.meta.start)
}

fn stored_bytes(img: &Image<std::fs::File>, segment: Option<Segment>) -> u64 {
    img.index().entries().iter().filter(|e| segment.is_none_or(|s| e.segment == s)).map(|e| e.stored_len()).sum()
}

async fn assert_reads_model(cache: &NodeCache, fx: &Fixture) {
    let mut at = 0;
    while at < fx.model.len() as u64 {
        let got = cache.read(at, 1 << 20).await.unwrap();
        assert!(got == fx.model[at as usize..(at + (1 << 20)) as usize], "guest bytes at {at:#x} differ");
        at += 1 << 20;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_takes_everything_from_a_caching_peer_and_the_store_sends_only_the_structure() {
    let fx = fixture().await;
    let img = image(&fx.container);
    let (_a, a_cache, a_api) = caching_peer(&fx).await;

    let before = fx.stats.body_bytes.load(Ordering::Relaxed);
    let mut opts = options(&fx.dir.path().join("b"), Background::Unlimited);
    // A peer that is not there is skipped.
    opts.peers = vec!["http://127.0.0.1:1".into(), a_api];
    let b = NodeCache::open(&fx.url, opts).await.unwrap();
    wait_for("node B to cache the image", || b.complete()).await;
    let from_store = fx.stats.body_bytes.load(Ordering::Relaxed) - before;

    let all = stored_bytes(&img, None);
    let m = b.metrics();
    assert_eq!(from_store, structure(&img), "the store sent only header, index and metadata: {m:?}");
    assert_eq!(m.peer_bytes, all, "every extent came from the peer: {m:?}");
    assert_eq!(m.fetched_bytes(), all, "{m:?}");
    assert_eq!(a_cache.metrics().served_to_peers_bytes, all);
    assert_reads_model(&b, &fx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_fetches_what_it_lacks_for_the_asking_node_and_the_store_sends_it_once() {
    let fx = fixture().await;
    let img = image(&fx.container);
    let boot = stored_bytes(&img, Some(Segment::Boot));
    // Peer A holds the boot segment only.
    let (_a, a_cache, a_api) = peer_node(&fx, "a", Background::Off).await;
    wait_for("peer A's boot segment", || a_cache.metrics().boot_prefetch_bytes == boot).await;

    // Its peer routes refuse what they cannot serve.
    let client = authorized_client();
    let root = bootcache_format::hex(&img.header().root_digest);
    let peer_url = format!("{a_api}/peer/{root}");
    let get = |range: Option<String>, url: String| {
        let req = client.get(url);
        async move { if let Some(r) = range { req.header("range", r) } else { req }.send().await.unwrap().status().as_u16() }
    };
    let rest = img.header().rest.clone();
    assert_eq!(get(Some(format!("bytes={}-{}", rest.start, rest.start + 99)), peer_url.clone()).await, 404, "uncached range, no Prefer");
    assert_eq!(get(None, peer_url.clone()).await, 400, "no Range");
    assert_eq!(get(Some(format!("bytes={}-", img.header().meta.end + 10)), peer_url.clone()).await, 416);
    assert_eq!(get(Some("bytes=0-99".into()), format!("{a_api}/peer/{}", "0".repeat(64))).await, 404, "unknown image");
    let b = img.header().boot.clone();
    assert_eq!(get(Some(format!("bytes={}-{}", b.start, b.end - 1)), peer_url).await, 206, "the boot segment");

    let before = fx.stats.body_bytes.load(Ordering::Relaxed);
    let mut opts = options(&fx.dir.path().join("b"), Background::Unlimited);
    opts.peers = vec![a_api];
    let b = NodeCache::open(&fx.url, opts).await.unwrap();
    wait_for("node B to cache the image", || b.complete()).await;
    let from_store = fx.stats.body_bytes.load(Ordering::Relaxed) - before;
    // B's background asked A for the rest, which A fetched once and relayed.
    let (m, a_m) = (b.metrics(), a_cache.metrics());
    let rest = stored_bytes(&img, Some(Segment::Rest));
    assert_eq!(m.peer_bytes, stored_bytes(&img, None), "everything came from the peer: {m:?}");
    assert_eq!((a_m.for_peers_bytes, a_m.discarded_bytes), (rest, 0), "A fetched the rest for B, once: {a_m:?}");
    assert_eq!(from_store, structure(&img) + rest, "the store sent B's structure and the rest once: {m:?}");
    assert!(a_cache.complete(), "A holds what it relayed");
    assert_reads_model(&b, &fx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_bytes_fail_their_digest_is_dropped_and_the_store_serves() {
    let fx = fixture().await;
    let img = image(&fx.container);
    let (_a, _a_cache, a_api) = caching_peer(&fx).await;
    // Rot in A's cache: a byte of a raw extent (in its guest data) and of a
    // compressed one (in its stored bytes).
    let root = bootcache_format::hex(&img.header().root_digest);
    let dir = fx.dir.path().join("a/cache").join(&root);
    let raw = img.index().entries().iter().find(|e| e.encoding == Encoding::Raw).unwrap();
    let zstd = img.index().entries().iter().find(|e| e.encoding == Encoding::Zstd).unwrap();
    let data = std::fs::OpenOptions::new().write(true).open(dir.join("data")).unwrap();
    data.write_all_at(&[!fx.model[raw.guest.start as usize + 5]], raw.guest.start + 5).unwrap();
    let stored = std::fs::OpenOptions::new().read(true).write(true).open(dir.join("stored")).unwrap();
    let mut byte = [0u8];
    stored.read_exact_at(&mut byte, zstd.stored.start + 9).unwrap();
    stored.write_all_at(&[!byte[0]], zstd.stored.start + 9).unwrap();

    let mut opts = options(&fx.dir.path().join("b"), Background::Unlimited);
    opts.peers = vec![a_api];
    let b = NodeCache::open(&fx.url, opts).await.unwrap();
    // Reads of both extents wait for good bytes and get them.
    for e in [raw, zstd] {
        let got = b.read(e.guest.start, u32::try_from(e.guest_len()).unwrap()).await.unwrap();
        assert!(got == fx.model[e.guest.start as usize..e.guest.end as usize], "extent at {:#x}", e.guest.start);
    }
    wait_for("node B to cache the image", || b.complete()).await;
    let m = b.metrics();
    assert!(m.bad_extents >= 1, "the bad bytes were noticed: {m:?}");
    assert!(m.peer_bytes < stored_bytes(&img, None), "the store served what the peer could not: {m:?}");
    assert_eq!(m.read_errors, 0, "{m:?}");
    assert_reads_model(&b, &fx).await;
}

/// A TCP proxy to `upstream` that sends its answers at about `rate` bytes
/// per second (a slow link between a node and the store).
async fn slow_proxy(upstream: std::net::SocketAddr, rate: u64) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(upstream).await else { return };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                tokio::spawn(async move { tokio::io::copy(&mut cr, &mut sw).await });
                let mut buf = vec![0u8; 16 << 10];
                while let Ok(n @ 1..) = sr.read(&mut buf).await {
                    tokio::time::sleep(std::time::Duration::from_secs_f64(n as f64 / rate as f64)).await;
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Node A fetches by `prefetch` over a slow link to the store; node B,
/// opened just after A with A as its peer, has a fast link to the store and
/// would take the prefetch from it at once if A did not relay what is still
/// on its way. Checks that the store sends the prefetched bytes once.
async fn relay_case(prefetch: Prefetch) {
    let fx = fixture().await;
    let img = image(&fx.container);
    let entries = img.index().entries();
    let wanted: u64 = match &prefetch {
        Prefetch::Ranges(ranges) => {
            let mut seen = vec![false; entries.len()];
            for r in ranges {
                let first = img.index().position(r.start);
                let n = img.index().overlapping(r.clone()).len();
                seen[first..first + n].fill(true);
            }
            (0..entries.len()).filter(|&i| seen[i]).map(|i| entries[i].stored_len()).sum()
        }
        _ => stored_bytes(&img, Some(Segment::Boot)),
    };
    let store: std::net::SocketAddr = fx.url.trim_start_matches("http://").split('/').next().unwrap().parse().unwrap();
    // About a second for A's prefetch (and for its largest extent, 1 MiB of
    // random bytes, less than the relay's wait).
    let slow_url = fx.url.replace(&store.to_string(), &slow_proxy(store, wanted).await.to_string());
    let mut a_opts = options(&fx.dir.path().join("a"), Background::Off);
    a_opts.prefetch = prefetch.clone();
    let a = Node::new(fx.dir.path().join("a.sock"), a_opts);
    let a_api = serve_api(&a).await;
    let before = fx.stats.body_bytes.load(Ordering::Relaxed);
    let root = a.open("disk", &slow_url, &[], None).await.unwrap().root_digest;
    let a_cache = a.cache(&root).unwrap();

    let mut opts = options(&fx.dir.path().join("b"), Background::Off);
    opts.peers = vec![a_api.clone()];
    opts.prefetch = prefetch;
    let b = NodeCache::open(&fx.url, opts).await.unwrap();
    assert!(a_cache.metrics().boot_prefetch_bytes < wanted, "A still fetching when B starts");
    wait_for("node B's prefetch", || b.metrics().boot_prefetch_bytes == wanted).await;
    let from_store = fx.stats.body_bytes.load(Ordering::Relaxed) - before;
    let m = b.metrics();
    assert_eq!(m.peer_bytes, wanted, "B's prefetch came from A: {m:?}");
    assert_eq!(from_store, 2 * structure(&img) + wanted, "the store sent the prefetch once: {m:?}");
    assert_eq!(a_cache.metrics().served_to_peers_bytes, wanted);

    // A range its prefetch leaves out (A streams no background): refused
    // without Prefer, fetched for the asker with it, and the same bytes as
    // the store's.
    let outside = entries.iter().find(|e| e.segment == Segment::Rest && e.stored_len() > 0).unwrap();
    let ask = |prefer: bool| {
        let req = authorized_client()
            .get(format!("{a_api}/peer/{root}"))
            .header("range", format!("bytes={}-{}", outside.stored.start, outside.stored.end - 1));
        async move { if prefer { req.header("prefer", "wait=5") } else { req }.send().await.unwrap() }
    };
    assert_eq!(ask(false).await.status(), 404, "not held: refused without Prefer");
    let before = fx.stats.body_bytes.load(Ordering::Relaxed);
    let answer = ask(true).await;
    assert_eq!(answer.status(), 206);
    let body = answer.bytes().await.unwrap();
    let mut want = vec![0u8; usize::try_from(outside.stored_len()).unwrap()];
    std::fs::File::open(&fx.container).unwrap().read_exact_at(&mut want, outside.stored.start).unwrap();
    assert!(body[..] == want[..], "the relayed bytes are the store's");
    assert_eq!(a_cache.metrics().for_peers_bytes, outside.stored_len(), "{:?}", a_cache.metrics());
    assert_eq!(fx.stats.body_bytes.load(Ordering::Relaxed) - before, outside.stored_len(), "fetched once, from the store");

    // Hostile asks make A fetch nothing: a range outside the data segments
    // (the header), one past the container, a malformed Prefer (as none:
    // only what A holds), and an absurd wait (capped: served at once).
    let before = (fx.stats.body_bytes.load(Ordering::Relaxed), a_cache.metrics().for_peers_bytes);
    let other = entries.iter().filter(|e| e.segment == Segment::Rest && e.stored_len() > 0).nth(1).unwrap();
    let hostile = [
        ("bytes=0-255".to_owned(), "wait=5", 404),
        (format!("bytes={}-", img.header().meta.end + 10), "wait=5", 416),
        (format!("bytes={}-{}", other.stored.start, other.stored.end - 1), "wait=-1, wait=x", 404),
        (format!("bytes={}-{}", outside.stored.start, outside.stored.end - 1), "wait=18446744073709551615", 206),
    ];
    for (range, prefer, code) in hostile {
        let status = authorized_client()
            .get(format!("{a_api}/peer/{root}"))
            .header("range", &range)
            .header("prefer", prefer)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert_eq!(status, code, "{range} with Prefer: {prefer}");
    }
    let after = (fx.stats.body_bytes.load(Ordering::Relaxed), a_cache.metrics().for_peers_bytes);
    assert_eq!(after, before, "nothing fetched for hostile asks");
    assert_reads_model(&b, &fx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_relays_its_boot_stream_while_it_arrives_and_the_store_sends_it_once() {
    relay_case(Prefetch::BootSegment).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_relays_a_trace_order_prefetch_while_it_arrives() {
    let fx_reads = [(41u64 << 20, 1u64 << 20), (10 << 20, 512 << 10)];
    relay_case(Prefetch::Ranges(fx_reads.iter().map(|&(o, l)| o..o + l).collect())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_opens_the_image_later_is_asked_then() {
    let fx = fixture().await;
    let img = image(&fx.container);
    // Node A's API is up, but A has not opened the image yet.
    let a = Node::new(fx.dir.path().join("a.sock"), options(&fx.dir.path().join("a"), Background::Unlimited));
    let a_api = serve_api(&a).await;
    let mut opts = options(&fx.dir.path().join("b"), Background::Off);
    opts.peers = vec![a_api];
    let b = NodeCache::open(&fx.url, opts).await.unwrap();
    let boot = stored_bytes(&img, Some(Segment::Boot));
    wait_for("node B's boot segment", || b.metrics().boot_prefetch_bytes == boot).await;
    assert_eq!(b.metrics().peer_bytes, 0, "A had nothing to give");

    let root = a.open("disk", &fx.url, &[], None).await.unwrap().root_digest;
    let a_cache = a.cache(&root).unwrap();
    wait_for("peer A to cache the image", || a_cache.complete()).await;
    // B asked A when it did not have the image; once that pause is over,
    // B's misses go to A.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    let rest = img.index().entries().iter().find(|e| e.segment == Segment::Rest && e.stored_len() > 0).unwrap();
    let got = b.read(rest.guest.start, u32::try_from(rest.guest_len()).unwrap()).await.unwrap();
    assert!(got == fx.model[rest.guest.start as usize..rest.guest.end as usize]);
    assert_eq!(b.metrics().peer_bytes, rest.stored_len(), "{:?}", b.metrics());
}
