//! The shared fixture: a disk, its container on a real store over HTTP on
//! loopback, and helpers.

#![allow(dead_code, reason = "each test file uses its own part")]

pub mod raw_client;

use std::fs::OpenOptions;
use std::io::Cursor;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bootcache_convert::{ConvertOptions, RawSource, convert};
use bootcache_delivery::cache::{Background, CacheOptions};
use bootcache_delivery::store::{self, StoreStats};
use bootcache_format::Image;
use bootcache_trace::{ImageIdentity, Record, Trace};

pub const MIB: u64 = 1 << 20;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub source: PathBuf,
    pub model: Vec<u8>,
    pub container: PathBuf,
    pub reads: Vec<(u64, u64)>,
    pub url: String,
    pub stats: Arc<StoreStats>,
}

/// A 48 MiB disk (random, text-like, allocated zeros, a hole, random),
/// converted with a boot trace into a container the store serves.
pub async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("disk.raw");
    let f = OpenOptions::new().create(true).write(true).truncate(true).open(&source).unwrap();
    let size = 48 * MIB;
    f.set_len(size).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (i, b) in model.iter_mut().enumerate() {
        let i = i as u64;
        *b = match i / (8 * MIB) {
            0 | 5 => {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }
            1 => b"the quick brown fox jumps over the lazy dog\n"[(i % 44) as usize],
            _ => 0,
        };
    }
    f.write_all_at(&model[..(24 * MIB) as usize], 0).unwrap(); // 16-24 MiB: allocated zeros
    f.write_all_at(&model[(40 * MIB) as usize..], 40 * MIB).unwrap();
    let reads = vec![(0, 64 << 10), (10 * MIB, 512 << 10), (41 * MIB, MIB), (5 * MIB, 200 << 10), (3 * MIB + 17, 4000)];
    let trace = Trace {
        image: ImageIdentity { size, digest: None },
        records: reads.iter().enumerate().map(|(t, &(o, l))| Record::read(t as u64 * 1000, o, l)).collect(),
        ..Trace::default()
    };
    let store_dir = dir.path().join("store");
    std::fs::create_dir(&store_dir).unwrap();
    let container = store_dir.join("disk.bcimg");
    let src = RawSource::open(&source).unwrap();
    let opts = ConvertOptions { zstd_level: Some(3), ..ConvertOptions::default() };
    let (out, _) = convert(&src, &[trace], Cursor::new(Vec::new()), &opts, &|_| {}).unwrap();
    std::fs::write(&container, out.into_inner()).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/disk.bcimg", listener.local_addr().unwrap());
    let stats = Arc::new(StoreStats::default());
    tokio::spawn(store::serve(listener, store_dir, Arc::clone(&stats)));
    Fixture { dir, source, model, container, reads, url, stats }
}

/// The API token the test nodes share.
pub const TOKEN: &str = "0123456789abcdef0123456789abcdef-test";

/// Serves `node`'s API (requiring [`TOKEN`]) on loopback; its base URL.
pub async fn serve_api(node: &Arc<bootcache_delivery::node::Node>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    let router = node.api(bootcache_delivery::auth::Credential::from_token(TOKEN));
    tokio::spawn(async move { axum::serve(listener, router).await });
    api
}

/// A client that sends [`TOKEN`].
pub fn authorized_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {TOKEN}").parse().unwrap());
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

pub fn options(dir: &Path, background: Background) -> CacheOptions {
    let mut o = CacheOptions::new(dir.join("cache"));
    o.peer_authorization = Some(format!("Bearer {TOKEN}"));
    o.background = background;
    o.read_timeout = Duration::from_secs(10);
    o.retry.budget = Duration::from_secs(5);
    o
}

pub fn image(path: &Path) -> Image<std::fs::File> {
    Image::open(std::fs::File::open(path).unwrap()).unwrap()
}

pub async fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(cmd).args(args).output().await.unwrap_or_else(|e| panic!("{cmd} must be installed: {e}"))
}
