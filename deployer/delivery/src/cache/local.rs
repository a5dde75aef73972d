//! Extents this node holds already, in the caches of other images.
//!
//! Every cache publishes its image's index beside its data (`extents`: the
//! 64-byte index entries, as in the container). A cache that opens looks
//! through the other caches of the node's directory for extents it lacks
//! whose digests (of their stored bytes) equal its own, present in their
//! journals, and copies them instead of fetching them: a new version of an
//! image, or another image built from the same base, fetches only what the
//! node does not hold. A copied extent is verified against its digest like
//! a fetched one; one that fails is fetched as if it had not been found.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use bootcache_format::{Encoding, Index, RawEntry, RootDigest, decode_extent};
use zerocopy::FromBytes;

use super::State;
use super::presence::Journal;

/// The file in a cache's directory holding its image's index entries.
pub(super) const EXTENTS: &str = "extents";

/// Publishes `index` in `dir` (written aside and renamed: a reader sees
/// all of it or none).
pub(super) fn publish(dir: &Path, index: &Index) -> io::Result<()> {
    let path = dir.join(EXTENTS);
    let bytes = index.to_bytes();
    if std::fs::read(&path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    let staging = dir.join(format!("{EXTENTS}.part"));
    std::fs::write(&staging, &bytes)?;
    std::fs::rename(&staging, &path)
}

/// What [`seed`] copied.
#[derive(Debug, Default)]
pub(super) struct Seeded {
    /// Extents now present.
    pub positions: Vec<u32>,
    /// Their stored bytes.
    pub stored_bytes: u64,
}

/// Copies the absent extents of `index` that other caches under `root`
/// hold (same digest, same encoding and lengths, present in their journal)
/// into `data` and `stored`, verified, and marks them present in `state`.
/// Reads at most `max_index_bytes` of any other cache's index. The caller
/// makes them durable and journals them.
pub(super) fn seed(
    root: &Path,
    own: RootDigest,
    index: &Index,
    state: &mut [State],
    data: &File,
    stored: &File,
    max_index_bytes: u64,
) -> Seeded {
    let entries = index.entries();
    let mut wanted: HashMap<[u8; 32], Vec<usize>> = HashMap::new();
    for (pos, e) in entries.iter().enumerate() {
        if state[pos] == State::Absent && e.encoding != Encoding::Zero {
            wanted.entry(e.digest).or_default().push(pos);
        }
    }
    let mut seeded = Seeded::default();
    let Ok(dirs) = std::fs::read_dir(root) else { return seeded };
    for dir in dirs.flatten() {
        if wanted.is_empty() {
            break;
        }
        let Some(digest) = dir.file_name().to_str().and_then(|n| n.parse::<RootDigest>().ok()) else { continue };
        if digest == own {
            continue;
        }
        match donor(&dir.path(), digest, max_index_bytes) {
            Ok(Some(donor)) => donor.give(entries, &mut wanted, state, data, stored, &mut seeded),
            Ok(None) => {}
            Err(e) => tracing::debug!(cache = %dir.path().display(), error = %e, "another cache's extents cannot be read"),
        }
    }
    seeded
}

/// Another image's cache: its present extents and files.
struct Donor {
    entries: Vec<RawEntry>,
    data: File,
    stored: File,
}

fn donor(dir: &Path, digest: RootDigest, max_index_bytes: u64) -> io::Result<Option<Donor>> {
    let Ok(file) = File::open(dir.join(EXTENTS)) else { return Ok(None) };
    let mut bytes = Vec::new();
    file.take(max_index_bytes.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_index_bytes {
        return Ok(None);
    }
    let Ok(all) = <[RawEntry]>::ref_from_bytes(&bytes) else { return Ok(None) };
    let count = u32::try_from(all.len()).map_err(|_| io::Error::other("too many extents"))?;
    let present = Journal::read(&dir.join("present"), &digest.0, count)?;
    let entries = present.iter().map(|&n| all[n as usize].clone()).collect();
    Ok(Some(Donor { entries, data: File::open(dir.join("data"))?, stored: File::open(dir.join("stored"))? }))
}

impl Donor {
    /// Copies what `wanted` lists and this cache holds.
    fn give(
        &self,
        entries: &[bootcache_format::Entry],
        wanted: &mut HashMap<[u8; 32], Vec<usize>>,
        state: &mut [State],
        data: &File,
        stored: &File,
        seeded: &mut Seeded,
    ) {
        for d in &self.entries {
            let Some(positions) = wanted.get(&d.digest) else { continue };
            let own = &entries[positions[0]];
            let same = own.encoding.code() == d.encoding
                && own.guest_len() == u64::from(d.guest_len.get())
                && own.stored_len() == u64::from(d.stored_len.get());
            if !same {
                continue;
            }
            // Raw extents' stored bytes are their guest bytes, kept in
            // `data`; compressed ones are kept at their container offsets.
            let mut bytes = vec![0u8; usize::try_from(own.stored_len()).unwrap_or(0)];
            let read = if own.encoding == Encoding::Raw {
                self.data.read_exact_at(&mut bytes, d.guest_offset.get())
            } else {
                self.stored.read_exact_at(&mut bytes, d.file_offset.get())
            };
            if read.is_err() {
                continue;
            }
            let Ok(decoded) = decode_extent(own, bytes.clone()) else {
                tracing::warn!(guest_offset = d.guest_offset.get(), "another cache's extent does not match its digest; fetching it");
                continue;
            };
            let positions = wanted.remove(&d.digest).unwrap_or_default();
            for pos in positions {
                let e = &entries[pos];
                if let Err(err) = super::write_extent(data, stored, e, &bytes, &decoded) {
                    tracing::warn!(error = %err, "cannot write a copied extent; fetching it");
                    continue;
                }
                state[pos] = State::Present;
                seeded.positions.push(u32::try_from(pos).unwrap_or(u32::MAX));
                seeded.stored_bytes += e.stored_len();
            }
        }
    }
}
