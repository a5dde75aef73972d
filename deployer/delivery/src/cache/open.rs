//! Opening a cache: the image's structure from the store, the local files,
//! and what an earlier run left.

use std::fs::OpenOptions;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bootcache_format::{Encoding, HEADER_SIZE, Header, Image, ReadAt, Segment};
use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

use super::presence::Journal;
use super::{CacheError, CacheOptions, Inner, NodeCache, Prefetch, State, fetch, peer, sources};
use crate::metrics::Metrics;
use crate::remote::Remote;

/// The parts of a remote container fetched so far, readable as a file of
/// the container's length (reads elsewhere fail).
#[derive(Clone)]
pub(crate) struct Regions {
    len: u64,
    parts: Vec<(u64, Bytes)>,
}

impl ReadAt for Regions {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        for (at, bytes) in &self.parts {
            if offset >= *at && offset + buf.len() as u64 <= at + bytes.len() as u64 {
                let from = usize::try_from(offset - at).map_err(io::Error::other)?;
                buf.copy_from_slice(&bytes[from..from + buf.len()]);
                return Ok(());
            }
        }
        Err(io::Error::new(io::ErrorKind::UnexpectedEof, "range not fetched"))
    }
}

async fn fetch(remote: &Remote, regions: &mut Regions, range: Range<u64>) -> Result<(), CacheError> {
    if range.start < range.end {
        let bytes = remote.get(range.clone()).await?;
        regions.parts.push((range.start, bytes));
    }
    Ok(())
}

/// The store's copy of the image's header, parsed and checked against its
/// length (what names the cache: the root digest).
pub(crate) async fn head(remote: &Remote) -> Result<(Bytes, Header), CacheError> {
    let bad = |e| match e {
        // Whatever the URL points at, its bytes are not repeated.
        bootcache_format::HeaderError::BadMagic(_) => CacheError::NotAContainer { url: remote.shown().into() },
        e => CacheError::Image { url: remote.shown().into(), source: bootcache_format::Error::Header(e) },
    };
    if remote.len() < u64::from(HEADER_SIZE) {
        return Err(bad(bootcache_format::HeaderError::TooShort(remote.len())));
    }
    let bytes = remote.get(0..u64::from(HEADER_SIZE)).await?;
    let header = Header::parse(&bytes, remote.len()).map_err(bad)?;
    Ok((bytes, header))
}

pub(super) async fn open(url: &str, opts: CacheOptions) -> Result<NodeCache, CacheError> {
    let remote = Remote::open(url, opts.retry).await?;
    let (bytes, header) = head(&remote).await?;
    open_from(remote, bytes, &header, opts).await
}

/// Opens the cache of the image behind `remote`, whose header (`head`,
/// parsed as `header`) has been fetched already. A layer is refused: its
/// cache is opened with its parents' ([`crate::cache::LayeredDisk`]).
pub(crate) async fn open_from(remote: Remote, head: Bytes, header: &Header, opts: CacheOptions) -> Result<NodeCache, CacheError> {
    let image = structure(&remote, head, header, opts.max_index_bytes, false).await?;
    open_image(remote, image, opts).await
}

/// The checked structure of the container behind `remote` (header, index,
/// boot order table, metadata), its header fetched already; a layer only
/// when `layer`.
pub(crate) async fn structure(
    remote: &Remote,
    head: Bytes,
    header: &Header,
    max_index_bytes: u64,
    layer: bool,
) -> Result<Image<Regions>, CacheError> {
    let url = remote.shown();
    let index_bytes = header.head_range().end.saturating_sub(header.index_range().start);
    if index_bytes > max_index_bytes {
        return Err(CacheError::TooLarge { url: url.into(), what: "index", bytes: index_bytes, limit: max_index_bytes });
    }
    let mut regions = Regions { len: remote.len(), parts: vec![(0, head)] };
    fetch(remote, &mut regions, header.index_range()).await?;
    fetch(remote, &mut regions, header.order.clone()).await?;
    fetch(remote, &mut regions, header.meta.clone()).await?;
    // The format crate checks everything: header, index tiling, boot order, root digest, metadata.
    let image = if layer { Image::open_layer(regions) } else { Image::open(regions) };
    image.map_err(|source| CacheError::Image { url: url.into(), source })
}

/// Opens the cache of one image (or one layer of a chain) whose structure
/// is checked already.
pub(crate) async fn open_image(remote: Remote, image: Image<Regions>, opts: CacheOptions) -> Result<NodeCache, CacheError> {
    let url = remote.shown().to_owned();
    let url = url.as_str();
    let recorded_boot = image.metadata().boot_seconds;
    let background_delay =
        opts.background_after.unwrap_or_else(|| std::time::Duration::from_secs_f64(recorded_boot.unwrap_or(0.0).min(3600.0)));
    let header = image.header().clone();
    let index = image.index().clone();
    if let Some(etag) = remote.etag()
        && etag.len() == 64
        && etag != image.root_digest_hex()
    {
        tracing::warn!(url, etag, root = %image.root_digest_hex(), "the store's ETag is not this image's root digest");
    }

    let dir = opts.dir.join(image.root_digest_hex());
    let local = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| CacheError::Local { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(local(&dir))?;
    let extents = u32::try_from(index.entries().len()).map_err(|_| local(&dir)(io::Error::other("too many extents")))?;
    let journal_path = dir.join("present");
    let (journal, present) = Journal::open(&journal_path, &header.root_digest, extents).map_err(local(&journal_path))?;
    let data_path = dir.join("data");
    let data = OpenOptions::new().create(true).read(true).write(true).truncate(false).open(&data_path).map_err(local(&data_path))?;
    if present.is_empty() {
        data.set_len(0).map_err(local(&data_path))?; // nothing verified: start from holes
    }
    data.set_len(header.virtual_size).map_err(local(&data_path))?;
    let stored_path = dir.join("stored");
    let stored = OpenOptions::new().create(true).read(true).write(true).truncate(false).open(&stored_path).map_err(local(&stored_path))?;
    if present.is_empty() {
        stored.set_len(0).map_err(local(&stored_path))?;
    }
    stored.set_len(remote.len()).map_err(local(&stored_path))?;
    let mut by_stored: Vec<usize> = (0..index.entries().len()).filter(|&i| index.entries()[i].stored_len() > 0).collect();
    by_stored.sort_by_key(|&i| index.entries()[i].stored.start);
    let root = image.root_digest();
    let prefetched: Vec<bool> = match &opts.prefetch {
        Prefetch::BootSegment => index.entries().iter().map(|e| e.segment == Segment::Boot).collect(),
        Prefetch::Off => vec![false; index.entries().len()],
        Prefetch::Ranges(ranges) => {
            let mut marked = vec![false; index.entries().len()];
            for pos in fetch::extents_of(&index, header.virtual_size, ranges) {
                marked[pos] = true;
            }
            marked
        }
    };
    let prefetched = prefetched.into_iter().map(std::sync::atomic::AtomicBool::new).collect();
    let peers =
        opts.peers.iter().map(|base| peer::Peer::new(base, root, remote.len(), opts.retry, opts.peer_authorization.clone())).collect();
    let sources = sources::Sources::new(peers, remote.clone());

    let mut state: Vec<State> =
        index.entries().iter().map(|e| if e.encoding == Encoding::Zero { State::Present } else { State::Absent }).collect();
    for n in &present {
        state[*n as usize] = State::Present;
    }
    // What other images' caches on this node hold need not be fetched.
    let metrics = Metrics::default();
    let (state, seeded, journal) = {
        let (root_dir, index, data, stored) = (opts.dir.clone(), index.clone(), data.try_clone(), stored.try_clone());
        let (data, stored) = (data.map_err(local(&data_path))?, stored.map_err(local(&stored_path))?);
        let max = opts.max_index_bytes;
        let joined = tokio::task::spawn_blocking(move || {
            let (mut state, mut journal) = (state, journal);
            let seeded = super::local::seed(&root_dir, root, &index, &mut state, &data, &stored, max);
            let durable = if seeded.positions.is_empty() {
                Ok(())
            } else {
                data.sync_data().and_then(|()| stored.sync_data()).and_then(|()| journal.append(&seeded.positions))
            };
            (state, seeded, durable, journal)
        })
        .await;
        let (state, seeded, durable, journal) = joined.map_err(|e| local(&dir)(io::Error::other(e.to_string())))?;
        durable.map_err(local(&journal_path))?;
        (state, seeded, journal)
    };
    Metrics::add(&metrics.local_bytes, seeded.stored_bytes);
    if let Err(e) = super::local::publish(&dir, &index) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot publish the image's extents to other caches on this node");
    }
    tracing::info!(
        url,
        root = %image.root_digest_hex(),
        extents,
        resumed = present.len(),
        from_other_images = seeded.positions.len(),
        "cache open"
    );

    let (demand_tx, demand_rx) = mpsc::unbounded_channel();
    let (durable_tx, durable_rx) = mpsc::unbounded_channel();
    let inner = Arc::new(Inner {
        remote,
        opened: std::time::Instant::now(),
        background_delay,
        background_waits_for_quiet: opts.background_after.is_none() && recorded_boot.is_some(),
        last_read_ns: std::sync::atomic::AtomicU64::new(0),
        header,
        index,
        data,
        stored,
        by_stored,
        prefetched,
        sources,
        state: Mutex::new(state),
        changed: Notify::new(),
        demand: demand_tx,
        durable: durable_tx,
        metrics,
        demand_in_flight: std::sync::atomic::AtomicUsize::new(0),
        aim: fetch::Aim::default(),
        stream_turn: tokio::sync::Mutex::new(()),
        last_error: Mutex::new(None),
        stopped: std::sync::atomic::AtomicBool::new(false),
        opts,
    });
    let tasks = vec![
        tokio::spawn(fetch::demand_loop(Arc::clone(&inner), demand_rx)),
        tokio::spawn(fetch::stream_loop(Arc::clone(&inner))),
        tokio::spawn(fetch::persist_loop(Arc::clone(&inner), durable_rx, journal)),
    ];
    Ok(NodeCache { inner, tasks })
}
