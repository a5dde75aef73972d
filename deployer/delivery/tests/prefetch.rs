//! What a cache fetches before the guest asks: the boot segment (see
//! delivery.rs), nothing, or a trace's ranges in their order.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bootcache_delivery::cache::{Background, NodeCache, Prefetch};
use common::{fixture, image, options, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_prefetch_off_only_guest_misses_are_fetched() {
    let fx = fixture().await;
    let img = image(&fx.container);
    let mut opts = options(fx.dir.path(), Background::Off);
    opts.prefetch = Prefetch::Off;
    let cache = NodeCache::open(&fx.url, opts).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let h = img.header();
    let structure = 256 + (h.index_range().end - h.index_range().start) + (h.meta.end - h.meta.start);
    assert_eq!(fx.stats.body_bytes.load(Ordering::Relaxed), structure, "nothing fetched before a read");
    for &(offset, len) in &fx.reads {
        let got = cache.read(offset, len as u32).await.unwrap();
        assert!(got == fx.model[offset as usize..(offset + len) as usize], "read at {offset:#x} differs");
    }
    let m = cache.metrics();
    assert_eq!(m.boot_prefetch_bytes, 0, "{m:?}");
    assert!(m.demand_bytes > 0 && m.misses > 0, "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_ranges_prefetch_exactly_the_extents_holding_them() {
    let fx = fixture().await;
    let img = image(&fx.container);
    // Two reads outside the boot set, latest first.
    let ranges = vec![45 * common::MIB..45 * common::MIB + 100, 12 * common::MIB + 5..12 * common::MIB + 70_000];
    let want: u64 = ranges.iter().flat_map(|r| img.index().overlapping(r.clone())).map(|e| e.stored_len()).sum();
    let mut opts = options(fx.dir.path(), Background::Off);
    opts.prefetch = Prefetch::Ranges(ranges.clone());
    let cache = NodeCache::open(&fx.url, opts).await.unwrap();
    wait_for("the prefetch", || cache.metrics().boot_prefetch_bytes == want).await;
    for r in &ranges {
        let got = cache.read(r.start, u32::try_from(r.end - r.start).unwrap()).await.unwrap();
        assert!(got == fx.model[r.start as usize..r.end as usize], "read at {:#x} differs", r.start);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = cache.metrics();
    assert_eq!((m.boot_prefetch_bytes, m.demand_bytes, m.misses), (want, 0, 0), "the prefetched reads hit: {m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_background_stream_waits_until_the_boot_would_be_over() {
    let fx = fixture().await;
    let img = image(&fx.container);
    let boot: u64 = img.index().entries().iter().filter(|e| e.segment == bootcache_format::Segment::Boot).map(|e| e.stored_len()).sum();
    let mut opts = options(fx.dir.path(), Background::Unlimited);
    opts.background_after = Some(Duration::from_millis(1500));
    let started = std::time::Instant::now();
    let cache = NodeCache::open(&fx.url, opts).await.unwrap();
    wait_for("the boot segment", || cache.metrics().boot_prefetch_bytes == boot).await;
    tokio::time::sleep(Duration::from_millis(1000).saturating_sub(started.elapsed())).await;
    assert_eq!(cache.metrics().background_bytes, 0, "the rest streamed during the boot");
    wait_for("the rest", || cache.complete()).await;
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert!(cache.metrics().background_bytes > 0);
}
