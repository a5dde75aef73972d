//! A real store over HTTP on loopback, a node cache, and the NBD export read
//! by QEMU's own NBD client (qemu-img, qemu-io).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bootcache_delivery::cache::{Background, NodeCache};
use bootcache_delivery::nbd::NbdServer;
use bootcache_delivery::store;
use bootcache_format::{Encoding, Segment};

mod common;

use common::{Fixture, MIB, authorized_client, fixture, image, options, raw_client, run, serve_api, wait_for};

/// The fixture's image in a node cache, exported as "disk" on a unix socket.
async fn export_over_unix(fx: &Fixture) -> (Arc<NbdServer>, PathBuf) {
    let cache = NodeCache::open(&fx.url, options(fx.dir.path(), Background::Off)).await.unwrap();
    let nbd = NbdServer::new();
    nbd.add("disk", Arc::new(cache));
    let sock = fx.dir.path().join("nbd.sock");
    tokio::spawn(Arc::clone(&nbd).serve_unix(tokio::net::UnixListener::bind(&sock).unwrap()));
    (nbd, sock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_reads_the_export_byte_for_byte_over_unix_and_tcp_at_once() {
    let fx = fixture().await;
    let (nbd, sock) = export_over_unix(&fx).await;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = tcp.local_addr().unwrap().port();
    tokio::spawn(Arc::clone(&nbd).serve_tcp(tcp));

    let src = fx.source.to_str().unwrap();
    let unix_url = format!("nbd+unix:///disk?socket={}", sock.display());
    let tcp_url = format!("nbd://127.0.0.1:{port}/disk");
    // Two clients at once (several connections, each with requests in flight).
    let over_unix = ["compare", "-f", "raw", "-F", "raw", src, &unix_url];
    let over_tcp = ["compare", "-f", "raw", "-F", "raw", src, &tcp_url];
    let (a, b) = tokio::join!(run("qemu-img", &over_unix), run("qemu-img", &over_tcp));
    for out in [a, b] {
        assert!(out.status.success(), "qemu-img compare: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    let copy = fx.dir.path().join("copy.raw");
    let out = run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &unix_url, copy.to_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read(&copy).unwrap() == fx.model, "converted copy differs from the source");

    // Unknown exports and writes are refused.
    let out = run("qemu-img", &["info", &format!("nbd+unix:///nosuch?socket={}", sock.display())]).await;
    assert!(!out.status.success());
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 0x55 0 4k", &unix_url]).await;
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success() || said.contains("Operation not permitted"), "write was not refused: {said}");
    assert!(said.contains("Permission denied") || said.contains("Operation not permitted"), "unexpected refusal: {said}");
    let out = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", src, &unix_url]).await;
    assert!(out.status.success(), "the export changed after a refused write");
}

/// A minimal NBD client speaking the wire protocol directly, for what QEMU's
/// client will not send (a write to a read-only export, a bad length).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wire_protocol_refuses_writes_bad_ranges_and_unknown_exports() {
    let fx = fixture().await;
    let (_nbd, sock) = export_over_unix(&fx).await;

    let err = raw_client::go(&sock, "other").await.unwrap_err();
    assert!(err.contains("other"), "{err}");
    let (mut s, size, flags) = raw_client::go(&sock, "disk").await.unwrap();
    assert_eq!(size, fx.model.len() as u64);
    assert_ne!(flags & 2, 0, "advertised read-only");
    let (error, _) = raw_client::request(&mut s, 1, 7, 0, 4096, &[0x55; 4096]).await; // WRITE
    assert_eq!(error, 1, "EPERM for a write");
    let (error, _) = raw_client::request(&mut s, 0, 8, size - 100, 4096, &[]).await; // READ past the end
    assert_eq!(error, 22, "EINVAL for a read past the end");
    let (error, data) = raw_client::request(&mut s, 0, 9, 0, 4096, &[]).await;
    assert_eq!(error, 0);
    assert!(data == fx.model[..4096], "the refused write changed nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_boot_segment_arrives_first_and_boot_reads_need_nothing_else() {
    let fx = fixture().await;
    let img = image(&fx.container);
    let boot_len = img.header().boot.end - img.header().boot.start;
    let cache = NodeCache::open(&fx.url, options(fx.dir.path(), Background::Off)).await.unwrap();
    wait_for("the boot segment", || cache.metrics().boot_prefetch_bytes == boot_len).await;
    for &(offset, len) in &fx.reads {
        let got = cache.read(offset, len as u32).await.unwrap();
        assert!(got == fx.model[offset as usize..(offset + len) as usize], "read at {offset:#x} differs");
    }
    let m = cache.metrics();
    assert_eq!((m.demand_bytes, m.background_bytes, m.discarded_bytes), (0, 0, 0), "{m:?}");
    assert_eq!(m.hits, fx.reads.len() as u64, "every boot read is a hit: {m:?}");
    // The store sent the header, index, metadata and the boot segment: nothing more.
    let h = img.header();
    let structure = 256 + (h.index_range().end - h.index_range().start) + (h.meta.end - h.meta.start);
    assert_eq!(fx.stats.body_bytes.load(Ordering::Relaxed), structure + boot_len);

    // A read outside the boot set is a miss, fetched on demand as whole extents.
    let got = cache.read(45 * MIB + 3, 10_000).await.unwrap();
    assert!(got == fx.model[(45 * MIB + 3) as usize..(45 * MIB + 10_003) as usize]);
    let m = cache.metrics();
    assert_eq!(m.misses, 1);
    let extent = img.index().find(45 * MIB + 3).unwrap();
    assert!(m.demand_bytes >= extent.stored_len() && m.demand_bytes <= 2 * extent.stored_len(), "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_extent_is_never_served_and_is_named_by_guest_offset() {
    let fx = fixture().await;
    let img = image(&fx.container);
    let victim = img.index().entries().iter().find(|e| e.segment == Segment::Rest && e.encoding != Encoding::Zero).unwrap().clone();
    let f = OpenOptions::new().write(true).open(&fx.container).unwrap();
    let mut byte = [0u8];
    std::fs::File::open(&fx.container).unwrap().read_exact_at(&mut byte, victim.stored.start + 7).unwrap();
    f.write_all_at(&[byte[0] ^ 0x20], victim.stored.start + 7).unwrap();

    let cache = NodeCache::open(&fx.url, options(fx.dir.path(), Background::Off)).await.unwrap();
    let err = cache.read(victim.guest.start + 100, 4096).await.unwrap_err();
    assert!(err.to_string().contains(&format!("{:#x}", victim.guest.start)), "error does not name the extent: {err}");
    let m = cache.metrics();
    assert_eq!(m.bad_extents, 1);
    assert_eq!(m.read_errors, 1);
    // Never written to the cache file: its range is still a hole of zeros.
    let data = std::fs::read(fx.dir.path().join("cache").join(img.root_digest_hex()).join("data")).unwrap();
    assert!(data[victim.guest.start as usize..victim.guest.end as usize].iter().all(|&b| b == 0));
    // Other extents are still served.
    let other = img.index().entries().iter().find(|e| e.encoding != Encoding::Zero && e.guest != victim.guest).unwrap();
    let got = cache.read(other.guest.start, 4096).await.unwrap();
    assert!(got == fx.model[other.guest.start as usize..other.guest.start as usize + 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_trusts_only_journaled_extents_and_fetches_the_rest_again() {
    let fx = fixture().await;
    let img = image(&fx.container);
    let root = img.root_digest_hex();
    let stored_total: u64 = img.index().entries().iter().map(|e| e.stored_len()).sum();
    {
        let cache = NodeCache::open(&fx.url, options(fx.dir.path(), Background::Unlimited)).await.unwrap();
        wait_for("the whole image", || cache.complete()).await;
        assert_eq!(cache.metrics().fetched_bytes(), stored_total);
        tokio::time::sleep(Duration::from_millis(400)).await; // the journal is written in 100 ms batches
    }
    // Reopened: everything is present, nothing fetched but the structure.
    let before = fx.stats.body_bytes.load(Ordering::Relaxed);
    {
        let cache = NodeCache::open(&fx.url, options(fx.dir.path(), Background::Off)).await.unwrap();
        assert!(cache.complete());
        let all = cache.read(0, u32::try_from(fx.model.len()).unwrap()).await.unwrap();
        assert!(all == fx.model);
        assert_eq!(cache.metrics().fetched_bytes(), 0);
    }
    let h = img.header();
    let structure = 256 + (h.index_range().end - h.index_range().start) + (h.meta.end - h.meta.start);
    assert_eq!(fx.stats.body_bytes.load(Ordering::Relaxed) - before, structure);

    // A crash lost the last journal records (torn write), and the data of
    // those extents on disk is garbage: they must be fetched again.
    let dir = fx.dir.path().join("cache").join(&root);
    let journal = dir.join("present");
    let len = std::fs::metadata(&journal).unwrap().len();
    let records = (len - 48) / 8;
    let kept = records / 2;
    let lost: Vec<u32> = std::fs::read(&journal).unwrap()[(48 + kept * 8) as usize..]
        .chunks_exact(8)
        .map(|r| u32::from_le_bytes([r[0], r[1], r[2], r[3]]))
        .collect();
    OpenOptions::new().write(true).open(&journal).unwrap().set_len(48 + kept * 8 + 5).unwrap();
    let data = OpenOptions::new().write(true).open(dir.join("data")).unwrap();
    for &n in &lost {
        let e = &img.index().entries()[n as usize];
        data.write_all_at(&vec![0xEE; e.guest_len() as usize], e.guest.start).unwrap();
    }
    let cache = NodeCache::open(&fx.url, options(fx.dir.path(), Background::Off)).await.unwrap();
    let all = cache.read(0, u32::try_from(fx.model.len()).unwrap()).await.unwrap();
    assert!(all == fx.model, "served unverified bytes after a restart");
    let refetched: u64 = lost.iter().map(|&n| img.index().entries()[n as usize].stored_len()).sum();
    assert_eq!(cache.metrics().fetched_bytes(), refetched);
}

/// Serves the fixture's store directory on `addr` until `stop` fires.
async fn store_on(fx: &Fixture, addr: std::net::SocketAddr) -> tokio::sync::oneshot::Sender<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let dir = fx.container.parent().unwrap().to_owned();
    tokio::spawn(store::serve_until(listener, dir, Arc::clone(&fx.stats), async {
        let _ = rx.await;
    }));
    tx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_waits_while_the_store_is_briefly_away_and_fails_with_a_reason_after_the_timeout() {
    let fx = fixture().await;
    let img = image(&fx.container);
    // A second store on a port of its own, which the test can stop and restart.
    let probe = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let stop = store_on(&fx, addr).await;
    let url = format!("http://{addr}/disk.bcimg");
    let mut opts = options(fx.dir.path(), Background::Off);
    opts.read_timeout = Duration::from_secs(2);
    opts.retry.budget = Duration::from_secs(1);
    let cache = NodeCache::open(&url, opts.clone()).await.unwrap();
    let boot_len = img.header().boot.end - img.header().boot.start;
    wait_for("the boot segment", || cache.metrics().boot_prefetch_bytes == boot_len).await;
    let _ = stop.send(());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Away for good: the read fails after the timeout, naming where and why.
    let rest: Vec<_> =
        img.index().entries().iter().filter(|e| e.segment == Segment::Rest && e.encoding != Encoding::Zero).cloned().collect();
    let started = Instant::now();
    let err = cache.read(rest[0].guest.start, 4096).await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_secs(2), "failed before the timeout: {err}");
    assert!(
        matches!(
            &err,
            bootcache_delivery::cache::ReadError::TimedOut { last: Some(bootcache_delivery::cache::FetchFailure::Store(_)), .. }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains(&format!("{:#x}", rest[0].guest.start)) && msg.contains("unreachable"), "{msg}");

    // Away for one second: the read waits and succeeds.
    let read = {
        let offset = rest[1].guest.start;
        let cache = &cache;
        async move { cache.read(offset, 4096).await }
    };
    let restart = async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        store_on(&fx, addr).await
    };
    let (got, _stop) = tokio::join!(read, restart);
    let o = rest[1].guest.start as usize;
    assert!(got.unwrap() == fx.model[o..o + 4096]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_gives_ranges_and_the_root_digest_as_etag_and_nothing_outside_its_directory() {
    let fx = fixture().await;
    let img = image(&fx.container);
    let remote = bootcache_delivery::remote::Remote::open(&fx.url, Default::default()).await.unwrap();
    assert_eq!(remote.len(), std::fs::metadata(&fx.container).unwrap().len());
    assert_eq!(remote.etag(), Some(img.root_digest_hex().as_str()), "ETag is the root digest");
    let bytes = remote.get(100..4196).await.unwrap();
    assert!(bytes[..] == std::fs::read(&fx.container).unwrap()[100..4196]);

    // A link inside the directory to a file outside it, and names that climb out.
    let store_dir = fx.container.parent().unwrap();
    std::os::unix::fs::symlink("/etc/hostname", store_dir.join("escape")).unwrap();
    std::fs::write(fx.dir.path().join("secret"), "outside").unwrap();
    let base = fx.url.trim_end_matches("disk.bcimg");
    let client = reqwest::Client::new();
    for path in ["escape", "..%2Fsecret", "%2E%2E/secret", ".hidden", "sub/disk.bcimg"] {
        let status = client.get(format!("{base}{path}")).send().await.unwrap().status();
        assert_eq!(status, reqwest::StatusCode::NOT_FOUND, "{path} was served");
    }
    // A range past the end is refused with the file's length.
    let resp = client.get(&fx.url).header("range", format!("bytes={}-", remote.len() + 10)).send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(resp.headers()["content-range"], format!("bytes */{}", remote.len()).as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_api_opens_shares_lists_measures_and_closes_images() {
    let fx = fixture().await;
    let sock = fx.dir.path().join("node.sock");
    let node = bootcache_delivery::node::Node::new(sock.clone(), options(fx.dir.path(), Background::Off));
    tokio::spawn(node.nbd().serve_unix(tokio::net::UnixListener::bind(&sock).unwrap()));
    let api = serve_api(&node).await;
    let client = authorized_client();
    let open = |name: &str| client.post(format!("{api}/images")).json(&serde_json::json!({"name": name, "url": fx.url})).send();
    let a: serde_json::Value = open("a").await.unwrap().json().await.unwrap();
    let b: serde_json::Value = open("b").await.unwrap().json().await.unwrap();
    assert_eq!(a["root_digest"], b["root_digest"], "one image, one cache");
    assert_eq!(a["nbd_url"], format!("nbd+unix:///a?socket={}", sock.display()));
    let bad = client.post(format!("{api}/images")).json(&serde_json::json!({"name": "x/y", "url": fx.url})).send().await.unwrap();
    assert_eq!(bad.status(), reqwest::StatusCode::BAD_REQUEST);
    let missing = client
        .post(format!("{api}/images"))
        .json(&serde_json::json!({"name": "m", "url": format!("{}.nope", fx.url)}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), reqwest::StatusCode::BAD_GATEWAY);
    assert!(missing.text().await.unwrap().contains("404"), "the reason reaches the caller");

    // Read through one name; both names see the same cache's counters.
    let out = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", fx.source.to_str().unwrap(), a["nbd_url"].as_str().unwrap()]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let all: serde_json::Value = client.get(format!("{api}/images")).send().await.unwrap().json().await.unwrap();
    let failed: Vec<_> = all.as_array().unwrap().iter().filter(|v| v["state"] == "failed").collect();
    assert!(failed.len() == 1 && failed[0]["name"] == "m" && failed[0]["error"].as_str().unwrap().contains("404"), "{all}");
    let listed: Vec<_> = all.as_array().unwrap().iter().filter(|v| v["state"] == "ready").collect();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["metrics"], listed[1]["metrics"]);
    // Zero ranges go out as holes without touching the cache; the data was read.
    let read = listed[0]["metrics"]["guest_read_bytes"].as_u64().unwrap();
    assert!(read > 0 && read <= fx.model.len() as u64, "{all}");
    let text = client.get(format!("{api}/metrics")).send().await.unwrap().text().await.unwrap();
    let root = a["root_digest"].as_str().unwrap();
    assert!(text.contains("# TYPE bootcache_fetched_bytes_total counter"), "{text}");
    let line =
        text.lines().find(|l| l.starts_with(&format!("bootcache_guest_read_bytes_total{{image=\"{root}\"}}"))).expect("a sample per cache");
    assert_eq!(line.split(' ').nth(1).unwrap().parse::<f64>().unwrap(), read as f64, "Prometheus and JSON agree");

    // Closing one name keeps the export of the other.
    assert_eq!(client.delete(format!("{api}/images/a")).send().await.unwrap().status(), reqwest::StatusCode::NO_CONTENT);
    assert_eq!(client.delete(format!("{api}/images/a")).send().await.unwrap().status(), reqwest::StatusCode::NOT_FOUND);
    let gone = run("qemu-img", &["info", a["nbd_url"].as_str().unwrap()]).await;
    assert!(!gone.status.success(), "closed export still served");
    let kept = run("qemu-img", &["info", b["nbd_url"].as_str().unwrap()]).await;
    assert!(kept.status.success(), "{}", String::from_utf8_lossy(&kept.stderr));
}
