//! What an NBD client can make the server hold: connections, handshakes
//! and requests that never end, replies never read. Each is bounded by the
//! server's limits, and what a closed connection held is given back.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bootcache_delivery::cache::{Background, NodeCache};
use bootcache_delivery::nbd::{Limits, NbdServer};
use common::{Fixture, MIB, fixture, options, raw_client, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn serve(fx: &Fixture, limits: Limits) -> (Arc<NbdServer>, PathBuf) {
    let cache = NodeCache::open(&fx.url, options(fx.dir.path(), Background::Unlimited)).await.unwrap();
    wait_for("the image to be cached", || cache.complete()).await;
    let nbd = NbdServer::with_limits(limits);
    nbd.add("disk", Arc::new(cache));
    let sock = fx.dir.path().join("limits.sock");
    tokio::spawn(Arc::clone(&nbd).serve_unix(bootcache_delivery::nbd::bind_unix(&sock).unwrap()));
    (nbd, sock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_and_silent_handshakes_closed() {
    let fx = fixture().await;
    let limits = Limits { max_connections: 3, handshake_timeout: Duration::from_secs(1), ..Limits::default() };
    let (nbd, sock) = serve(&fx, limits).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).await.unwrap();
        open.push(s);
    }
    let mut extra = tokio::net::UnixStream::connect(&sock).await.unwrap();
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut byte)).await.expect("the fourth connection is closed at once");
    assert!(matches!(n, Ok(0) | Err(_)), "a connection over the limit was greeted");
    assert_eq!(nbd.connections(), 3);
    // Saying nothing after the greeting: closed after the handshake limit.
    for s in &mut open {
        assert!(raw_client::closed_within(s, Duration::from_secs(5)).await, "a silent handshake stayed open");
    }
    wait_for("the slots to be free", || nbd.connections() == 0).await;
    let (_s, size, _) = raw_client::go(&sock, "disk").await.unwrap();
    assert_eq!(size, fx.model.len() as u64, "a new connection is served again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_replies_and_half_sent_requests_hold_no_more_than_the_budget() {
    let fx = fixture().await;
    let limits = Limits {
        connection_bytes: 4 * MIB,
        total_bytes: 6 * MIB,
        request_timeout: Duration::from_secs(1),
        write_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let (nbd, sock) = serve(&fx, limits).await;
    // Two clients each ask for 64 MiB of reads and read no reply.
    let mut floods = Vec::new();
    for c in 0..2u64 {
        let (mut s, _, _) = raw_client::go(&sock, "disk").await.unwrap();
        for i in 0..64 {
            raw_client::send_read(&mut s, c * 100 + i, (i % 40) * MIB, MIB as u32).await;
        }
        floods.push(s);
    }
    let mut peak = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(nbd.bytes_in_flight());
    }
    assert!(peak > 0 && peak <= 6 * MIB, "read data held: {peak} bytes (budget 6 MiB)");
    // A request cut short is dropped after the request limit.
    let (mut half, _, _) = raw_client::go(&sock, "disk").await.unwrap();
    half.write_all(&0x2560_9513u32.to_be_bytes()).await.unwrap();
    assert!(raw_client::closed_within(&mut half, Duration::from_secs(5)).await, "a half-sent request stayed open");
    // Replies nobody reads fail their connection after the write limit, and
    // give their budget back (the clients still hold their sockets, unread).
    wait_for("the clients that read nothing to be disconnected", || nbd.connections() == 0).await;
    wait_for("the budget to come back", || nbd.bytes_in_flight() == 0).await;
    drop(floods);
    let (mut s, _, _) = raw_client::go(&sock, "disk").await.unwrap();
    let (error, data) = raw_client::request(&mut s, 0, 1, 0, 4096, &[]).await;
    assert!(error == 0 && data == fx.model[..4096], "the server still serves");
}
