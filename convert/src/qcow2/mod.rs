//! qcow2 images (versions 2 and 3), the project's own reader of the
//! metadata: header, L1 and L2 tables, refcount tables. It maps guest
//! clusters to host clusters and tells metadata from data, which is what
//! turning a recorded qcow2 trace into guest space needs. Images with
//! extended L2 entries, external data files or encryption are refused by name.

mod header;
mod map;
mod sink;
mod source;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub use header::{Compression, Header, incompat};
pub use map::{MapStats, map_trace};
pub use sink::Qcow2Sink;
pub use source::Qcow2Source;

use bootcache_trace::IntervalSet;

/// Errors reading a qcow2 image.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// The header is invalid.
    #[error("invalid qcow2 header: {0}")]
    BadHeader(String),
    /// A table entry points outside the file or is misaligned.
    #[error("bad {table} entry {index}: {why}")]
    BadTable {
        /// Which table.
        table: &'static str,
        /// Entry number.
        index: u64,
        /// Why.
        why: String,
    },
    /// I/O failed.
    #[error("cannot read the qcow2 image at {offset:#x}")]
    Io {
        /// Where.
        offset: u64,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Not a qcow2 file.
    #[error("not a qcow2 image (bad magic)")]
    NotQcow2,
    /// Features this reader does not support.
    #[error("unsupported qcow2 features {0:#x} (extended L2 entries, external data files and unknown features are not supported)")]
    Unsupported(u64),
}

/// Where a guest cluster's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cluster {
    /// Stored uncompressed at this host offset.
    Data {
        /// Host file offset.
        host: u64,
    },
    /// Stored compressed: `len` bytes at `host`.
    Compressed {
        /// Host file offset.
        host: u64,
        /// Compressed length (rounded to sectors as qcow2 stores it).
        len: u64,
    },
    /// Reads as zero (the zero flag).
    Zero,
}

const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    file: File,
    file_len: u64,
    header: Header,
}

fn read(file: &File, offset: u64, len: u64) -> Result<Vec<u8>, Qcow2Error> {
    let mut buf = vec![0u8; usize::try_from(len).map_err(|_| Qcow2Error::Io { offset, source: io::ErrorKind::OutOfMemory.into() })?];
    file.read_exact_at(&mut buf, offset).map_err(|source| Qcow2Error::Io { offset, source })?;
    Ok(buf)
}

fn be64(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks_exact(8).map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
}

impl Qcow2 {
    /// The image file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Opens and checks `path`.
    ///
    /// # Errors
    /// An unreadable file (or a FIFO, device or directory), or any header
    /// problem.
    pub fn open(path: &Path) -> Result<Qcow2, Qcow2Error> {
        let file = crate::open::open_input(path)
            .map_err(|e| Qcow2Error::Io { offset: 0, source: io::Error::new(io::ErrorKind::InvalidInput, e.to_string()) })?;
        Qcow2::from_file(file)
    }

    /// Checks the qcow2 image open as `file`.
    pub(crate) fn from_file(file: File) -> Result<Qcow2, Qcow2Error> {
        let file_len = crate::open::input_len(&file).map_err(|source| Qcow2Error::Io { offset: 0, source })?;
        let head = read(&file, 0, file_len.min(64 << 10))?;
        let header = Header::parse(&head, file_len)?;
        Ok(Qcow2 { file, file_len, header })
    }

    /// The checked header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    fn cluster_at(&self, table: &'static str, index: u64, offset: u64) -> Result<u64, Qcow2Error> {
        let c = self.header.cluster_size();
        if !offset.is_multiple_of(c) || offset.checked_add(c).is_none_or(|e| e > self.file_len) {
            return Err(Qcow2Error::BadTable { table, index, why: format!("cluster {offset:#x} misaligned or past the end of the file") });
        }
        Ok(offset)
    }

    /// File offsets of the L2 tables, by L1 index (0: none).
    pub(crate) fn l2_tables(&self) -> Result<Vec<u64>, Qcow2Error> {
        let h = &self.header;
        let l1 = read(&self.file, h.l1_table_offset, h.l1_size * 8)?;
        be64(&l1)
            .enumerate()
            .map(|(i, e)| match e & L2_OFFSET_MASK {
                0 => Ok(0),
                off => self.cluster_at("L1", i as u64, off),
            })
            .collect()
    }

    /// Reads one L2 table at `offset` (already checked by [`Qcow2::l2_tables`]).
    pub(crate) fn read_l2(&self, offset: u64) -> Result<Vec<u64>, Qcow2Error> {
        Ok(be64(&read(&self.file, offset, self.header.cluster_size())?).collect())
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub(crate) fn read_exact(&self, buf: &mut [u8], offset: u64) -> Result<(), Qcow2Error> {
        self.file.read_exact_at(buf, offset).map_err(|source| Qcow2Error::Io { offset, source })
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns how many.
    pub(crate) fn read_some(&self, buf: &mut [u8], offset: u64) -> Result<usize, Qcow2Error> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(Qcow2Error::Io { offset, source }),
            }
        }
        Ok(done)
    }

    /// Every allocated or zero guest cluster, as (guest offset, where).
    ///
    /// # Errors
    /// An L1 or L2 entry that points outside the file.
    pub fn clusters(&self) -> Result<Vec<(u64, Cluster)>, Qcow2Error> {
        let h = &self.header;
        let c = h.cluster_size();
        let per_l2 = c / 8;
        let mut out = Vec::new();
        for (i, l2_off) in self.l2_tables()?.into_iter().enumerate() {
            if l2_off == 0 {
                continue;
            }
            let l2 = read(&self.file, l2_off, c)?;
            for (j, e) in be64(&l2).enumerate() {
                let index = i as u64 * per_l2 + j as u64;
                match index.checked_mul(c) {
                    Some(guest) if guest < h.size => {}
                    _ => break,
                }
                let guest = index * c;
                if let Some(cluster) = self.entry(e, i as u64 * per_l2 + j as u64)? {
                    out.push((guest, cluster));
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn entry(&self, e: u64, index: u64) -> Result<Option<Cluster>, Qcow2Error> {
        let bits = self.header.cluster_bits;
        if e & COMPRESSED != 0 {
            let x = 62 - (bits - 8);
            let host = e & ((1u64 << x) - 1);
            let sectors = (e >> x) & ((1u64 << (bits - 8)) - 1);
            let len = (sectors + 1) * 512 - (host & 511);
            if host.checked_add(len).is_none_or(|end| end > self.file_len.next_multiple_of(512)) {
                return Err(Qcow2Error::BadTable {
                    table: "L2",
                    index,
                    why: format!("compressed cluster {host:#x}+{len:#x} past the end"),
                });
            }
            return Ok(Some(Cluster::Compressed { host, len }));
        }
        match (e & L2_OFFSET_MASK, e & 1) {
            (0, 0) => Ok(None),
            (_, 1) => Ok(Some(Cluster::Zero)),
            (host, _) => Ok(Some(Cluster::Data { host: self.cluster_at("L2", index, host)? })),
        }
    }

    /// File ranges holding metadata: header, L1, L2 and refcount tables,
    /// refcount blocks, the snapshot table.
    ///
    /// # Errors
    /// A table entry that points outside the file.
    pub fn metadata(&self) -> Result<IntervalSet, Qcow2Error> {
        let h = &self.header;
        let c = h.cluster_size();
        let mut ranges = vec![0..c, h.l1_table_offset..h.l1_table_offset + h.l1_size * 8];
        ranges.extend(self.l2_tables()?.into_iter().filter(|&o| o != 0).map(|o| o..o + c));
        let rt_len = h.refcount_table_clusters * c;
        ranges.push(h.refcount_table_offset..h.refcount_table_offset + rt_len);
        let rt = read(&self.file, h.refcount_table_offset, rt_len)?;
        for (i, e) in be64(&rt).enumerate() {
            let off = e & !(c - 1);
            if off != 0 {
                ranges.push(self.cluster_at("refcount table", i as u64, off)?..off + c);
            }
        }
        if h.nb_snapshots > 0 {
            ranges.push(h.snapshots_offset..h.snapshots_offset.saturating_add(c).min(self.file_len));
        }
        Ok(IntervalSet::from_ranges(ranges))
    }
}
