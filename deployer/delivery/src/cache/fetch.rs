//! How bytes arrive: guest misses on demand, the boot segment as one
//! stream, the rest in the background; and how they are made durable.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bootcache_format::{Index, Segment, decode_extent};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::{Semaphore, mpsc};

use super::presence::Journal;
use super::{Background, FetchFailure, Inner, Prefetch, Source, State};
use crate::metrics::Metrics;

/// Largest request of a demand fetch or a stream step. Streams re-plan
/// between steps, so extents that arrived on demand are not fetched twice.
const MAX_RUN: u64 = 16 << 20;
/// Bytes of extents another fetch has claimed that a stream would rather
/// ask around (a new request) than receive and drop.
const SKIP_AT_LEAST: u64 = 64 << 10;
/// How long verified extents wait to be journaled together.
const PERSIST_BATCH: Duration = Duration::from_millis(100);

/// Groups extent positions into runs contiguous in the file, each at most
/// `max` stored bytes (a single larger extent is a run of its own).
pub(super) fn runs(index: &Index, mut positions: Vec<usize>, max: u64) -> Vec<Vec<usize>> {
    let e = index.entries();
    positions.sort_by_key(|&i| e[i].stored.start);
    positions.dedup();
    runs_in_order(index, positions, max)
}

/// Like [`runs`], keeping the given order: only neighbours that follow
/// each other both in the list and in the file join.
fn runs_in_order(index: &Index, positions: Vec<usize>, max: u64) -> Vec<Vec<usize>> {
    let e = index.entries();
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut bytes = 0;
    for i in positions {
        match out.last_mut() {
            Some(run) if e[run[run.len() - 1]].stored.end == e[i].stored.start && bytes + e[i].stored_len() <= max => {
                run.push(i);
                bytes += e[i].stored_len();
            }
            _ => {
                out.push(vec![i]);
                bytes = e[i].stored_len();
            }
        }
    }
    out
}

/// Where the boot stream goes on (container offsets). The boot segment is
/// in first-access order, so a guest that misses a boot extent beyond the
/// run the stream is fetching has got ahead of it: what lies between is
/// what this boot skipped, and the stream is re-aimed past the miss (the
/// miss itself is fetched on demand). The aim only moves forward; what it
/// skipped is fetched when the stream reaches the segment's end.
#[derive(Debug, Default)]
pub(super) struct Aim {
    /// The stream continues at the first absent extent from here.
    from: AtomicU64,
    /// The run the prefetch is fetching (container offsets).
    run_start: AtomicU64,
    run_end: AtomicU64,
}

impl Aim {
    /// A guest missed the boot extent stored at `stored`; true if that
    /// moved the aim.
    fn miss(&self, stored: &std::ops::Range<u64>) -> bool {
        let run_end = self.run_end.load(Ordering::SeqCst);
        run_end > 0 && stored.start >= run_end && self.from.fetch_max(stored.end, Ordering::SeqCst) < stored.end
    }

    /// Whether the stream should leave the run ending at `end`.
    fn passed(&self, end: u64) -> bool {
        self.from.load(Ordering::SeqCst) >= end
    }

    /// Whether the extent stored at `stored` is in the run the prefetch
    /// has asked for (its bytes are on their way).
    pub(super) fn streaming(&self, stored: &std::ops::Range<u64>) -> bool {
        (self.run_start.load(Ordering::SeqCst)..self.run_end.load(Ordering::SeqCst)).contains(&stored.start)
    }
}

/// Misses (a guest's, or a peer's that this cache relays): fetched at
/// once, several runs in flight, misses that queued meanwhile coalesced
/// into the same requests. A guest's miss ahead of the boot stream re-aims
/// it; a peer's does not (the peer's boot is not this one's).
pub(super) async fn demand_loop(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<(Vec<usize>, Source)>) {
    let permits = Arc::new(Semaphore::new(inner.opts.demand_parallel.max(1)));
    while let Some(first) = rx.recv().await {
        let (mut guest, mut peer) = (Vec::new(), Vec::new());
        for (wanted, source) in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            if source == Source::ForPeer { &mut peer } else { &mut guest }.extend(wanted);
        }
        if inner.opts.prefetch == Prefetch::BootSegment {
            let entries = inner.index.entries();
            let ahead = guest.iter().filter(|&&p| entries[p].segment == Segment::Boot).map(|&p| &entries[p].stored).max_by_key(|s| s.start);
            if ahead.is_some_and(|s| inner.aim.miss(s)) {
                Metrics::add(&inner.metrics.boot_reaims, 1);
            }
        }
        let all = runs(&inner.index, guest, MAX_RUN)
            .into_iter()
            .map(|r| (r, Source::Demand))
            .chain(runs(&inner.index, peer, MAX_RUN).into_iter().map(|r| (r, Source::ForPeer)));
        for (run, source) in all {
            let Ok(permit) = Arc::clone(&permits).acquire_owned().await else { return };
            let inner = Arc::clone(&inner);
            inner.demand_in_flight.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                fetch_run(&inner, &run, source).await;
                inner.demand_in_flight.fetch_sub(1, Ordering::SeqCst);
                drop(permit);
            });
        }
    }
}

/// The prefetch (normally the boot segment in first-access order), then
/// (unless off) the rest.
pub(super) async fn stream_loop(inner: Arc<Inner>) {
    let started = Instant::now();
    match &inner.opts.prefetch {
        Prefetch::BootSegment => {
            stream_segment(&inner, Segment::Boot, None, Source::Boot).await;
            tracing::info!(seconds = started.elapsed().as_secs_f64(), "boot segment cached");
        }
        Prefetch::Off => {}
        Prefetch::Ranges(ranges) => {
            stream_ranges(&inner, ranges).await;
            tracing::info!(seconds = started.elapsed().as_secs_f64(), "prefetch ranges cached");
        }
    }
    let rate = match inner.opts.background {
        Background::Off => return,
        Background::Unlimited => None,
        Background::Rate(r) => Some(r.max(1)),
    };
    tokio::time::sleep_until((inner.opened + inner.background_delay).into()).await;
    if inner.background_waits_for_quiet {
        wait_for_quiet(&inner).await;
    }
    // Without its own boot stream (prefetch off or by ranges, or a layer
    // whose chain streams what its boots read) the boot segment is part of
    // what is left.
    if inner.opts.prefetch != Prefetch::BootSegment {
        stream_segment(&inner, Segment::Boot, rate, Source::Background).await;
    }
    stream_segment(&inner, Segment::Rest, rate, Source::Background).await;
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "image fully cached");
}

async fn stream_segment(inner: &Arc<Inner>, segment: Segment, rate: Option<u64>, source: Source) {
    // Steps small enough to pace at a quarter of a second of the rate.
    let step = rate.map_or(MAX_RUN, |r| (r / 4).clamp(64 << 10, MAX_RUN));
    let started = Instant::now();
    let mut sent = 0u64;
    loop {
        let turn = inner.stream_turn.lock().await;
        let absent: Vec<usize> = {
            let state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            (0..state.len()).filter(|&i| state[i] == State::Absent && inner.index.entries()[i].segment == segment).collect()
        };
        // The boot stream goes on from its aim, then comes back for what it skipped.
        let from = if source == Source::Boot { inner.aim.from.load(Ordering::SeqCst) } else { 0 };
        let ahead: Vec<usize> = if from == 0 {
            Vec::new()
        } else {
            absent.iter().copied().filter(|&i| inner.index.entries()[i].stored.start >= from).collect()
        };
        let pick = if ahead.is_empty() { absent } else { ahead };
        let Some(run) = runs(&inner.index, pick, step).into_iter().next() else { return };
        let bytes: u64 = run.iter().map(|&i| inner.index.entries()[i].stored_len()).sum();
        let fetched = fetch_run(inner, &run, source).await;
        drop(turn);
        if !fetched {
            tokio::time::sleep(Duration::from_millis(500)).await; // the store is away; the next pass retries
        }
        sent += bytes;
        if let Some(r) = rate {
            let due = Duration::from_secs_f64(sent as f64 / r as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Guests that have not read for this long are past their boot.
const QUIET: Duration = Duration::from_secs(2);
/// The longest the background stream waits for quiet guests.
const QUIET_AT_MOST: Duration = Duration::from_secs(60);

/// Waits until no guest has read for [`QUIET`] (at most [`QUIET_AT_MOST`]).
async fn wait_for_quiet(inner: &Inner) {
    let started = Instant::now();
    loop {
        let last = Duration::from_nanos(inner.last_read_ns.load(Ordering::Relaxed));
        let idle = inner.opened.elapsed().saturating_sub(last);
        if idle >= QUIET || started.elapsed() >= QUIET_AT_MOST {
            return;
        }
        tokio::time::sleep(QUIET - idle).await;
    }
}

/// The extents with stored bytes that hold the guest `ranges` (on a disk of
/// `size` bytes), each once, in the order of the ranges.
pub(super) fn extents_of(index: &Index, size: u64, ranges: &[std::ops::Range<u64>]) -> Vec<usize> {
    let entries = index.entries();
    let mut seen = vec![false; entries.len()];
    let mut order = Vec::new();
    for r in ranges {
        let end = r.end.min(size);
        if r.start >= end {
            continue;
        }
        let first = index.position(r.start);
        for pos in first..first + index.overlapping(r.start..end).len() {
            if !seen[pos] && entries[pos].stored_len() > 0 {
                seen[pos] = true;
                order.push(pos);
            }
        }
    }
    order
}

/// The extents holding `ranges`, in the order of the ranges; neighbours in
/// both that order and the file go in one request.
async fn stream_ranges(inner: &Arc<Inner>, ranges: &[std::ops::Range<u64>]) {
    stream_positions(inner, extents_of(&inner.index, inner.header.virtual_size, ranges)).await;
}

/// Fetches the extents at `order` (positions in the index, with stored
/// bytes) in that order as boot-stream requests: neighbours in both that
/// order and the file go in one request; what is present or being fetched
/// is not fetched again.
pub(super) async fn stream_positions(inner: &Arc<Inner>, order: Vec<usize>) {
    for run in runs_in_order(&inner.index, order, MAX_RUN) {
        if inner.stopped.load(Ordering::SeqCst) {
            return;
        }
        let _turn = inner.stream_turn.lock().await;
        // What arrived meanwhile (on demand, or by another stream) is not
        // fetched again; what is left of the run is still contiguous
        // pieces in the same order.
        let still: Vec<usize> = {
            let state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
            run.into_iter().filter(|&i| state[i] == State::Absent).collect()
        };
        for piece in runs(&inner.index, still, MAX_RUN) {
            fetch_run(inner, &piece, Source::Boot).await;
        }
    }
}

/// Fetches `run` (extents contiguous in the file) as one streamed request,
/// resuming after a broken connection at the extent it was receiving. A
/// miss's run has its extents claimed already; a stream claims each extent
/// as its bytes start to arrive. Extents another fetch has claimed are not
/// received twice: a stream that reaches at least [`SKIP_AT_LEAST`] bytes
/// of them ends its request and asks again after them (fewer are received
/// and dropped). The boot stream leaves a run its aim has passed. Returns
/// false if it gave up (the store stayed away).
async fn fetch_run(inner: &Arc<Inner>, run: &[usize], source: Source) -> bool {
    let entries = inner.index.entries();
    let run_end = entries[run[run.len() - 1]].stored.end;
    let re_aimed = || source == Source::Boot && inner.opts.prefetch == Prefetch::BootSegment && inner.aim.passed(run_end);
    if source == Source::Boot {
        inner.aim.run_start.store(entries[run[0]].stored.start, Ordering::SeqCst);
        inner.aim.run_end.store(run_end, Ordering::SeqCst);
    }
    let mut next = 0;
    let mut failing_since: Option<Instant> = None;
    while next < run.len() {
        if !source.is_miss() {
            next += taken(inner, &run[next..]);
            if next == run.len() {
                return true;
            }
        }
        let range = entries[run[next]].stored.start..run_end;
        let (mut stream, from) = match inner.sources.open(range).await {
            Ok(s) => s,
            Err(e) => {
                inner.set_error(FetchFailure::Store(e.to_string()));
                if source.is_miss() {
                    release(inner, &run[next..]);
                }
                return false;
            }
        };
        let mut buf = BytesMut::new();
        let mut broken = None;
        while next < run.len() {
            // Closed on this node: not one more extent (demand runs are
            // tasks of their own, which stopping the cache does not abort).
            if re_aimed() || inner.stopped.load(Ordering::SeqCst) {
                return true;
            }
            let pos = run[next];
            let mine = source.is_miss() || claim(inner, pos);
            if !mine {
                let skip = taken(inner, &run[next..]);
                let ahead: u64 = run[next..next + skip].iter().map(|&i| entries[i].stored_len()).sum();
                if ahead.saturating_sub(buf.len() as u64) >= SKIP_AT_LEAST {
                    // Ask again after them (this request's connection closes).
                    Metrics::add(&inner.metrics.discarded_bytes, buf.len() as u64);
                    next += skip;
                    break;
                }
            }
            let need = usize::try_from(entries[pos].stored_len()).unwrap_or(usize::MAX);
            while buf.len() < need {
                if !source.is_miss() {
                    yield_to_demand(inner).await;
                    if re_aimed() {
                        if mine {
                            release(inner, &[pos]);
                        }
                        return true;
                    }
                }
                match stream.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        broken = Some(e.to_string());
                        break;
                    }
                    None => {
                        broken = Some("the response ended early".into());
                        break;
                    }
                }
            }
            if let Some(why) = &broken {
                if mine && !source.is_miss() {
                    release(inner, &[pos]);
                }
                inner.set_error(FetchFailure::Interrupted(why.clone()));
                break;
            }
            let stored = buf.split_to(need).freeze();
            deliver(inner, pos, stored, source, mine, from).await;
            failing_since = None;
            next += 1;
        }
        if let Some(why) = broken {
            let from = inner.sources.get(from);
            if from.is_peer() {
                // A peer that breaks off is left alone; the next source goes on.
                tracing::warn!(peer = from.shown(), error = why, "peer fetch interrupted; asking the next source");
                from.failed();
                continue;
            }
            let since = *failing_since.get_or_insert_with(Instant::now);
            if since.elapsed() > inner.opts.retry.budget {
                if source.is_miss() {
                    release(inner, &run[next..]);
                }
                return false;
            }
            tracing::warn!(url = inner.remote.shown(), error = why, "fetch interrupted; resuming");
            tokio::time::sleep(inner.opts.retry.first_backoff).await;
        }
    }
    true
}

/// How many of `run`'s first extents are not absent (present, or claimed
/// by another fetch).
fn taken(inner: &Inner, run: &[usize]) -> usize {
    let state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
    run.iter().take_while(|&&i| state[i] != State::Absent).count()
}

/// Streams give the link to guest misses: they stop reading (and TCP slows
/// the sender) while demand fetches are in flight.
async fn yield_to_demand(inner: &Inner) {
    while inner.demand_in_flight.load(Ordering::SeqCst) > 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn claim(inner: &Inner, pos: usize) -> bool {
    let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
    if state[pos] == State::Absent {
        state[pos] = State::Fetching;
        true
    } else {
        false
    }
}

/// Gives claimed extents back (the fetch failed); waiting reads re-ask.
fn release(inner: &Inner, positions: &[usize]) {
    {
        let mut state = inner.state.lock().unwrap_or_else(|p| p.into_inner());
        for &p in positions {
            if state[p] == State::Fetching {
                state[p] = State::Absent;
            }
        }
    }
    inner.changed.notify_waiters();
}

/// Verifies, decodes and writes one extent's stored bytes (from peer `from`
/// or the store), then marks it present. Bytes that fail their digest are
/// never written; a peer that sent them is not asked again.
async fn deliver(inner: &Arc<Inner>, pos: usize, stored: Bytes, source: Source, mine: bool, from: usize) {
    let len = stored.len() as u64;
    if !mine {
        Metrics::add(&inner.metrics.discarded_bytes, len);
        return;
    }
    let me = Arc::clone(inner);
    let outcome = tokio::task::spawn_blocking(move || {
        let entry = &me.index.entries()[pos];
        match decode_extent(entry, stored.to_vec()) {
            Ok(data) => Ok(super::write_extent(&me.data, &me.stored, entry, &stored, &data).map_err(|e| e.to_string())),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .unwrap_or_else(|e| Ok(Err(format!("worker failed: {e}"))));
    let guest = inner.index.entries()[pos].guest.start;
    let new_state = match outcome {
        Ok(Ok(())) => {
            let counter = match source {
                Source::Boot => &inner.metrics.boot_bytes,
                Source::Demand => &inner.metrics.demand_bytes,
                Source::ForPeer => &inner.metrics.for_peers_bytes,
                Source::Background => &inner.metrics.background_bytes,
            };
            Metrics::add(counter, len);
            if inner.sources.get(from).is_peer() {
                Metrics::add(&inner.metrics.peer_bytes, len);
            }
            let _ = inner.durable.send(u32::try_from(pos).unwrap_or(u32::MAX));
            State::Present
        }
        Ok(Err(why)) => {
            tracing::error!(guest_offset = guest, error = why, "cannot write to the cache file");
            inner.set_error(FetchFailure::CacheFile(why));
            State::Absent
        }
        Err(why) if inner.sources.get(from).is_peer() => {
            Metrics::add(&inner.metrics.bad_extents, 1);
            let peer = inner.sources.get(from).shown();
            tracing::error!(
                guest_offset = format_args!("{guest:#x}"),
                peer,
                error = why,
                "extent from a peer failed verification; asking the store"
            );
            inner.sources.get(from).lied();
            State::Absent
        }
        Err(why) => {
            Metrics::add(&inner.metrics.bad_extents, 1);
            tracing::error!(
                guest_offset = format_args!("{guest:#x}"),
                url = inner.remote.shown(),
                error = why,
                "extent from the store failed verification; not served"
            );
            inner.set_error(FetchFailure::Verification { guest });
            State::Bad
        }
    };
    inner.state.lock().unwrap_or_else(|p| p.into_inner())[pos] = new_state;
    inner.changed.notify_waiters();
}

/// Makes verified extents durable: `fdatasync` of the data file, then their
/// journal records, in batches.
pub(super) async fn persist_loop(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<u32>, mut journal: Journal) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::sleep(PERSIST_BATCH);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => break,
                more = rx.recv() => match more {
                    Some(n) => batch.push(n),
                    None => break,
                },
            }
        }
        let me = Arc::clone(&inner);
        let done = tokio::task::spawn_blocking(move || {
            let r = me.data.sync_data().and_then(|()| me.stored.sync_data()).and_then(|()| journal.append(&batch));
            (journal, r)
        })
        .await;
        match done {
            Ok((j, Ok(()))) => journal = j,
            Ok((_, Err(e))) => {
                tracing::error!(error = %e, "cannot persist the presence map; cached data will be fetched again after a restart");
                return;
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_miss_beyond_the_streamed_run_moves_the_aim_and_only_forward() {
        let aim = Aim::default();
        assert!(!aim.miss(&(4096..8192)), "before the stream starts, misses do not aim it");
        aim.run_end.store(1 << 20, Ordering::SeqCst);
        assert!(!aim.miss(&(4096..8192)), "a miss inside the run leaves the stream alone");
        assert!(!aim.passed(1 << 20));
        assert!(aim.miss(&(3 << 20..(3 << 20) + 4096)), "a miss beyond the run re-aims it");
        assert!(aim.passed(1 << 20) && aim.from.load(Ordering::SeqCst) == (3 << 20) + 4096);
        assert!(!aim.miss(&(2 << 20..(2 << 20) + 4096)), "the aim never moves back");
        assert_eq!(aim.from.load(Ordering::SeqCst), (3 << 20) + 4096);
    }
}
