//! Boot-shaped synthetic traces, for demos and tests until a real boot is
//! recorded. The shape follows measured Debian boots: a first phase of a few
//! long, nearly sequential reads (firmware and boot loader loading kernel and
//! initrd), then many small, clustered reads (kernel and init), some re-reads.

use crate::intervals::IntervalSet;
use crate::record::Record;

/// SplitMix64: small, deterministic, good enough for test data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

const SECTOR: u64 = 512;

/// A byte offset chosen uniformly over the bytes of `allocated`, sector aligned.
fn pick(allocated: &IntervalSet, total: u64, rng: &mut Rng) -> u64 {
    let mut k = rng.below(total);
    for r in allocated.ranges() {
        let len = r.end - r.start;
        if k < len {
            return (r.start + k) / SECTOR * SECTOR;
        }
        k -= len;
    }
    0
}

/// `reads` boot-shaped read records over the `allocated` ranges of an image
/// of `size` bytes, spread over about 15 seconds.
pub fn boot_like(allocated: &IntervalSet, size: u64, reads: usize, seed: u64) -> Vec<Record> {
    let total = allocated.bytes();
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(reads);
    if total == 0 || reads == 0 {
        return out;
    }
    // Phase 1: about 1% of the reads, 128 KiB .. 1 MiB each, in a few sequential runs, first 3 s.
    let phase1 = (reads / 100).max(1);
    let mut at = pick(allocated, total, &mut rng);
    for i in 0..phase1 {
        if i % 5 == 0 {
            at = pick(allocated, total, &mut rng);
        }
        let len = (128 << 10) << rng.below(4);
        let len = len.min(size.saturating_sub(at));
        out.push(Record::read(i as u64 * 3_000_000_000 / phase1 as u64, at, len));
        at += len;
    }
    // Phase 2: clustered small reads, mostly 4 KiB, 3 .. 15 s; 3% re-reads.
    let mut centre = pick(allocated, total, &mut rng);
    for i in phase1..reads {
        let t = 3_000_000_000 + (i - phase1) as u64 * 12_000_000_000 / (reads - phase1) as u64;
        if rng.below(100) < 3 && !out.is_empty() {
            let old = out[usize::try_from(rng.below(out.len() as u64)).unwrap_or(0)];
            out.push(Record { t_ns: t, ..old });
            continue;
        }
        if rng.below(4) == 0 {
            centre = pick(allocated, total, &mut rng);
        }
        let len = match rng.below(10) {
            0..=5 => 4096,
            6 | 7 => 4096 << rng.below(4),
            8 => 512 << rng.below(3),
            _ => (64 << 10) << rng.below(3),
        };
        let off = (centre + rng.below(256 << 10)) / SECTOR * SECTOR;
        let off = off.min(size.saturating_sub(len)) / SECTOR * SECTOR;
        out.push(Record::read(t, off, len.min(size - off)));
    }
    out
}
