//! Any bytes sent to the store's, the node API's (with the agent's tarball
//! routes) or the control node's HTTP
//! server (request lines, headers such as Range and If-Range, JSON bodies):
//! an answer or a closed connection, never a panic, never a byte from
//! outside the store's directory, never the token.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bootcache_http::auth::Credential;
use bootcache_delivery::cache::CacheOptions;
use bootcache_delivery::node::Node;
use bootcache_delivery::store::{self, StoreStats};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The node's token (the seeds carry it, so the fuzzer reaches the routes behind it).
const TOKEN: &str = "fuzz-token-0123456789abcdef0123456789";
/// What a file outside the store's directory holds.
const OUTSIDE: &[u8] = b"OUTSIDE-THE-STORE-7f3a";

struct Setup {
    rt: tokio::runtime::Runtime,
    store: axum::Router,
    node: axum::Router,
    control: axum::Router,
    _dir: tempfile::TempDir,
}

fn setup() -> &'static Setup {
    static S: OnceLock<Setup> = OnceLock::new();
    S.get_or_init(|| {
        // A static is never dropped: fuzz/run removes bootcache-fuzz-* after each target.
        let dir = tempfile::Builder::new().prefix("bootcache-fuzz-").tempdir().expect("temp dir");
        let served = dir.path().join("store");
        std::fs::create_dir(&served).expect("store dir");
        std::fs::write(served.join("ten"), b"0123456789").expect("file");
        std::fs::write(served.join("empty"), b"").expect("file");
        std::fs::write(dir.path().join("secret"), OUTSIDE).expect("file");
        let _ = std::os::unix::fs::symlink(dir.path().join("secret"), served.join("link"));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let store = store::router(&served, Arc::new(StoreStats::default())).expect("store router");
        let mut opts = CacheOptions::new(dir.path().join("cache"));
        // One quick attempt: a URL in a body is never waited for.
        opts.retry.budget = Duration::ZERO;
        opts.retry.request_timeout = Duration::from_millis(20);
        // The agent serves its tarballs beside the node API.
        let tarballs = dir.path().join("tarballs");
        std::fs::create_dir(&tarballs).expect("tarballs dir");
        std::fs::write(tarballs.join(format!("{}.tar", "ab".repeat(32))), b"a tarball").expect("file");
        let _ = std::os::unix::fs::symlink(dir.path().join("secret"), tarballs.join(format!("{}.tar", "cd".repeat(32))));
        let node = rt.block_on(async {
            Node::new(dir.path().join("nbd.sock"), opts)
                .api(Credential::from_token(TOKEN))
                .merge(bootcache_agent::tarball_routes(tarballs, Credential::from_token(TOKEN)))
        });
        let db = bootcache_control::db::Db::open(&dir.path().join("control.db")).expect("control database");
        let mut control = bootcache_control::api::Control::new(db, Duration::from_secs(2));
        if let Some(c) = std::sync::Arc::get_mut(&mut control) {
            c.retry.budget = Duration::ZERO;
            c.retry.request_timeout = Duration::from_millis(20);
        }
        let control = control.api(Credential::from_token(TOKEN));
        Setup { rt, store, node, control, _dir: dir }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, request)) = data.split_first() else { return };
    let s = setup();
    let router = match which % 3 {
        0 => s.store.clone(),
        1 => s.node.clone(),
        _ => s.control.clone(),
    };
    let out = s.rt.block_on(async {
        let (client, served) = tokio::io::duplex(64 << 10);
        let conn = tokio::spawn(async move {
            let _ =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(served), TowerToHyperService::new(router)).await;
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let send = async {
            let _ = wr.write_all(request).await;
            let _ = wr.shutdown().await;
        };
        let receive = async {
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), rd.read_to_end(&mut out)).await;
            out
        };
        let ((), out) = tokio::join!(send, receive);
        conn.abort();
        out
    });
    assert!(
        out.is_empty() || out.starts_with(b"HTTP/1.1 ") || out.starts_with(b"HTTP/1.0 "),
        "not an HTTP answer: {:?}",
        String::from_utf8_lossy(&out[..out.len().min(64)])
    );
    let has = |needle: &[u8]| out.windows(needle.len()).any(|w| w == needle);
    // A JSON error may quote what the caller sent; the file's bytes must not
    // appear otherwise.
    let sent = |needle: &[u8]| request.windows(needle.len()).any(|w| w == needle);
    assert!(sent(OUTSIDE) || !has(OUTSIDE), "a file outside the store was served");
    // The node may repeat what a caller sent (a JSON error names the input);
    // the token must not appear unless the caller sent it outside its header.
    let sent_elsewhere = request
        .split(|&b| b == b'\n')
        .filter(|l| !l.to_ascii_lowercase().starts_with(b"authorization:"))
        .any(|l| l.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()));
    assert!(sent_elsewhere || !has(TOKEN.as_bytes()), "the token was echoed");
});
