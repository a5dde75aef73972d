//! Any bytes a client sends the NBD server (handshake, options, requests):
//! the server answers or hangs up, never panics or hangs, and what it holds
//! stays within its limits.
#![no_main]

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bootcache_delivery::nbd::{Export, Limits, NbdServer, ReadError};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A 1 MiB disk whose second half reads as zeros.
struct Disk;

impl Export for Disk {
    fn size(&self) -> u64 {
        1 << 20
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a mut [u8]) -> Pin<Box<dyn Future<Output = Result<(), ReadError>> + Send + 'a>> {
        Box::pin(async move {
            let data = (1u64 << 19).saturating_sub(offset).min(buf.len() as u64) as usize;
            let (head, tail) = buf.split_at_mut(data);
            for (i, b) in head.iter_mut().enumerate() {
                *b = (offset as usize + i) as u8;
            }
            tail.fill(0);
            Ok(())
        })
    }

    fn zeros(&self, range: Range<u64>) -> Vec<Range<u64>> {
        let start = range.start.max(1 << 19);
        if start < range.end { vec![start..range.end] } else { Vec::new() }
    }
}

fn setup() -> &'static (tokio::runtime::Runtime, Arc<NbdServer>) {
    static S: OnceLock<(tokio::runtime::Runtime, Arc<NbdServer>)> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let limits = Limits {
            max_connections: 4,
            connection_bytes: 2 << 20,
            total_bytes: 4 << 20,
            handshake_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(5),
        };
        let server = NbdServer::with_limits(limits);
        server.add("disk", Arc::new(Disk));
        (rt, server)
    })
}

fuzz_target!(|data: &[u8]| {
    let (rt, server) = setup();
    rt.block_on(async {
        let (client, served) = tokio::io::duplex(64 << 10);
        let srv = {
            let server = Arc::clone(server);
            tokio::spawn(async move { server.serve_connection(served).await })
        };
        let (mut rd, mut wr) = tokio::io::split(client);
        let send = async {
            let _ = wr.write_all(data).await;
            let _ = wr.shutdown().await;
        };
        let receive = async {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        };
        let ((), out) = tokio::join!(send, receive);
        srv.await.expect("the connection task");
        assert!(out.starts_with(b"NBDMAGICIHAVEOPT"), "no greeting");
        assert_eq!(server.bytes_in_flight(), 0, "a finished connection still holds read data");
        assert_eq!(server.connections(), 0);
    });
});
