//! A node that holds one image fetches, for another, only the extents it
//! does not hold in any cache: a new version of an image sends what changed.

mod common;

use std::collections::HashSet;
use std::io::Cursor;
use std::os::unix::fs::FileExt;
use std::time::Duration;

use bootcache_convert::{ConvertOptions, RawSource, convert};
use bootcache_delivery::cache::{Background, NodeCache};
use bootcache_trace::{ImageIdentity, Record, Trace};
use common::*;

/// Version 2 of the fixture's disk: 64 KiB changed at 1 MiB, 4 KiB at 41 MiB,
/// converted with the same boot trace; its disk, container path and URL.
fn v2(fx: &Fixture) -> (Vec<u8>, std::path::PathBuf, String) {
    let mut model = fx.model.clone();
    model[MIB as usize..(MIB as usize + 65536)].fill(0x11);
    model[(41 * MIB) as usize..(41 * MIB) as usize + 4096].fill(0x22);
    let source = fx.dir.path().join("v2.raw");
    std::fs::copy(&fx.source, &source).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&source).unwrap();
    f.write_all_at(&model[MIB as usize..(MIB as usize + 65536)], MIB).unwrap();
    f.write_all_at(&model[(41 * MIB) as usize..(41 * MIB) as usize + 4096], 41 * MIB).unwrap();
    let trace = Trace {
        image: ImageIdentity { size: model.len() as u64, digest: None },
        records: fx.reads.iter().enumerate().map(|(t, &(o, l))| Record::read(t as u64 * 1000, o, l)).collect(),
        ..Trace::default()
    };
    let opts = ConvertOptions { zstd_level: Some(3), ..ConvertOptions::default() };
    let (out, _) = convert(&RawSource::open(&source).unwrap(), &[trace], Cursor::new(Vec::new()), &opts, &|_| {}).unwrap();
    let container = fx.container.with_file_name("v2.bcimg");
    std::fs::write(&container, out.into_inner()).unwrap();
    let url = fx.url.replace("disk.bcimg", "v2.bcimg");
    (model, container, url)
}

async fn read_all(cache: &NodeCache, len: usize) -> Vec<u8> {
    let mut all = Vec::with_capacity(len);
    for at in (0..len).step_by(MIB as usize) {
        all.extend(cache.read(at as u64, u32::try_from(MIB as usize).unwrap().min((len - at) as u32)).await.unwrap());
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_fetches_only_the_extents_no_cache_on_the_node_holds() {
    let fx = fixture().await;
    let (model, container, url) = v2(&fx);
    let (old, new) = (image(&fx.container), image(&container));
    let held: HashSet<[u8; 32]> = old.index().entries().iter().map(|e| e.digest).collect();
    let stored = |e: &bootcache_format::Entry| e.stored_len();
    let missing: u64 = new.index().entries().iter().filter(|e| !held.contains(&e.digest)).map(stored).sum();
    let total: u64 = new.index().entries().iter().map(stored).sum();
    assert!(missing > 0 && missing * 20 < total, "the versions share most extents: {missing} of {total}");

    let v1 = NodeCache::open(&fx.url, options(fx.dir.path(), Background::Unlimited)).await.unwrap();
    wait_for("version 1 whole", || v1.complete()).await;
    tokio::time::sleep(Duration::from_millis(400)).await; // journal batches
    let cache = NodeCache::open(&url, options(fx.dir.path(), Background::Unlimited)).await.unwrap();
    let m = cache.metrics();
    assert_eq!(m.local_bytes, total - missing, "{m:?}");
    wait_for("version 2 whole", || cache.complete()).await;
    assert_eq!(cache.metrics().fetched_bytes(), missing);
    assert!(read_all(&cache, model.len()).await == model, "version 2 reads as its disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extent_another_cache_holds_wrongly_is_fetched_never_served() {
    let fx = fixture().await;
    let (model, _, url) = v2(&fx);
    let old = image(&fx.container);
    {
        let v1 = NodeCache::open(&fx.url, options(fx.dir.path(), Background::Unlimited)).await.unwrap();
        wait_for("version 1 whole", || v1.complete()).await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    // Version 1's cache is damaged on disk where version 2 shares an extent.
    let shared = old.index().entries().iter().find(|e| e.encoding == bootcache_format::Encoding::Raw && e.guest.start >= 40 * MIB).unwrap();
    let data = std::fs::OpenOptions::new().write(true).open(fx.dir.path().join("cache").join(old.root_digest_hex()).join("data")).unwrap();
    data.write_all_at(&[0xEE; 512], shared.guest.start).unwrap();
    let cache = NodeCache::open(&url, options(fx.dir.path(), Background::Unlimited)).await.unwrap();
    wait_for("version 2 whole", || cache.complete()).await;
    assert!(cache.metrics().fetched_bytes() >= shared.stored_len());
    assert!(read_all(&cache, model.len()).await == model, "served bytes another cache held wrongly");
}
