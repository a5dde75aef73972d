//! Interval algebra throughput: union and first-access order of boot-shaped reads.

use std::hint::black_box;

use bootcache_trace::synth::{Rng, boot_like};
use bootcache_trace::{AccessOrder, IntervalSet};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

fn records(n: usize) -> Vec<(std::ops::Range<u64>, u64)> {
    // A 64 GiB image, fully allocated: the reads are spread widely.
    let size = 64u64 << 30;
    let allocated = IntervalSet::from_ranges(std::iter::once(0..size));
    let mut rng = Rng::new(9);
    boot_like(&allocated, size, n, rng.next_u64()).into_iter().filter_map(|r| Some((r.boot_bytes()?, r.t_ns))).collect()
}

fn intervals(c: &mut Criterion) {
    let mut g = c.benchmark_group("intervals");
    for n in [10_000usize, 1_000_000] {
        let recs = records(n);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("union/{n}"), |b| b.iter(|| IntervalSet::from_ranges(recs.iter().map(|r| r.0.clone())).len()));
        g.bench_function(format!("first_access/{n}"), |b| {
            b.iter(|| AccessOrder::from_timed(black_box(&recs).iter().cloned()).pieces().len())
        });
    }
    let orders: Vec<AccessOrder> = (0..5).map(|s| AccessOrder::from_timed(records(100_000).into_iter().map(|(r, t)| (r, t + s)))).collect();
    g.throughput(Throughput::Elements(500_000));
    g.bench_function("merge_3_of_5/100000", |b| b.iter(|| AccessOrder::merge(black_box(&orders), 3).pieces().len()));
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = intervals
}
criterion_main!(benches);
