//! Writing a qcow2 (v3) image: data clusters are allocated as guest bytes
//! arrive (all-zero data stays unallocated, so the output is sparse), and the
//! metadata (L2 tables, L1 table, refcount table and blocks, header) is
//! written once, at the end.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::image::ImageSink;

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
const COPIED: u64 = 1 << 63;
/// 16-bit refcounts (refcount_order 4).
const REFS_PER_BLOCK: u64 = CLUSTER / 2;

/// A qcow2 image being written.
#[derive(Debug)]
pub struct Qcow2Sink {
    file: File,
    size: u64,
    /// Guest cluster index -> host cluster offset.
    clusters: BTreeMap<u64, u64>,
    /// Next free host cluster (cluster 0 is the header).
    next: u64,
}

impl Qcow2Sink {
    /// Creates `path` for a disk of `size` bytes (64 KiB clusters).
    ///
    /// # Errors
    /// When the file cannot be created.
    pub fn create(path: &Path, size: u64) -> io::Result<Qcow2Sink> {
        Qcow2Sink::new(OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path)?, size)
    }

    /// Writes the image into `file` (emptied first), e.g. one made by
    /// [`crate::output::stage`].
    ///
    /// # Errors
    /// When the file cannot be emptied.
    pub fn new(file: File, size: u64) -> io::Result<Qcow2Sink> {
        file.set_len(0)?;
        Ok(Qcow2Sink { file, size, clusters: BTreeMap::new(), next: CLUSTER })
    }

    fn host_cluster(&mut self, guest_cluster: u64) -> u64 {
        *self.clusters.entry(guest_cluster).or_insert_with(|| {
            let at = self.next;
            self.next += CLUSTER;
            at
        })
    }

    fn write_u64s(&self, offset: u64, values: &[u64]) -> io::Result<()> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
        self.file.write_all_at(&bytes, offset)
    }
}

impl ImageSink for Qcow2Sink {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if offset.checked_add(buf.len() as u64).is_none_or(|e| e > self.size) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let mut at = 0usize;
        while at < buf.len() {
            let guest = offset + at as u64;
            let within = guest % CLUSTER;
            let take = usize::try_from((CLUSTER - within).min((buf.len() - at) as u64)).unwrap_or(0);
            let part = &buf[at..at + take];
            if !bootcache_format::is_zero(part) {
                let host = self.host_cluster(guest / CLUSTER);
                self.file.write_all_at(part, host + within)?;
            }
            at += take;
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> io::Result<()> {
        let per_l2 = CLUSTER / 8;
        let l1_size = self.size.div_ceil(CLUSTER * per_l2).max(1);
        let data_end = self.next;
        // L2 tables, one per L1 entry that maps anything.
        let mut l2_tables: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for (&g, &host) in &self.clusters {
            l2_tables.entry(g / per_l2).or_insert_with(|| vec![0; per_l2 as usize])[(g % per_l2) as usize] = host | COPIED;
        }
        let mut l1 = vec![0u64; l1_size as usize];
        let mut at = data_end;
        for (&i, table) in &l2_tables {
            self.write_u64s(at, table)?;
            l1[i as usize] = at | COPIED;
            at += CLUSTER;
        }
        let l1_offset = at;
        self.write_u64s(l1_offset, &l1)?;
        at += (l1_size * 8).div_ceil(CLUSTER) * CLUSTER;
        // Refcount table and blocks cover every cluster, themselves included.
        let before = at / CLUSTER;
        let (mut blocks, mut table_clusters) = (0u64, 0u64);
        loop {
            let total = before + blocks + table_clusters;
            let (b, t) = (total.div_ceil(REFS_PER_BLOCK), (total.div_ceil(REFS_PER_BLOCK) * 8).div_ceil(CLUSTER));
            if (b, t) == (blocks, table_clusters) {
                break;
            }
            (blocks, table_clusters) = (b, t);
        }
        let table_offset = at;
        let first_block = table_offset + table_clusters * CLUSTER;
        let total = before + table_clusters + blocks;
        let table: Vec<u64> = (0..blocks).map(|b| first_block + b * CLUSTER).collect();
        self.write_u64s(table_offset, &table)?;
        for b in 0..blocks {
            let n = (total - b * REFS_PER_BLOCK).min(REFS_PER_BLOCK);
            let refs: Vec<u8> = (0..n).flat_map(|_| 1u16.to_be_bytes()).collect();
            self.file.write_all_at(&refs, first_block + b * CLUSTER)?;
        }
        let end = first_block + blocks * CLUSTER;
        self.file.set_len(end)?;
        self.file.write_all_at(&header(self.size, l1_size, l1_offset, table_offset, table_clusters), 0)?;
        self.file.sync_all()
    }
}

fn header(size: u64, l1_size: u64, l1_offset: u64, refcount_table: u64, refcount_clusters: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(112);
    h.extend(0x5146_49fbu32.to_be_bytes()); // magic
    h.extend(3u32.to_be_bytes()); // version
    h.extend(0u64.to_be_bytes()); // backing_file_offset
    h.extend(0u32.to_be_bytes()); // backing_file_size
    h.extend(CLUSTER_BITS.to_be_bytes());
    h.extend(size.to_be_bytes());
    h.extend(0u32.to_be_bytes()); // crypt_method
    h.extend(u32::try_from(l1_size).unwrap_or(u32::MAX).to_be_bytes());
    h.extend(l1_offset.to_be_bytes());
    h.extend(refcount_table.to_be_bytes());
    h.extend(u32::try_from(refcount_clusters).unwrap_or(u32::MAX).to_be_bytes());
    h.extend(0u32.to_be_bytes()); // nb_snapshots
    h.extend(0u64.to_be_bytes()); // snapshots_offset
    h.extend([0u8; 24]); // incompatible, compatible, autoclear features
    h.extend(4u32.to_be_bytes()); // refcount_order: 16-bit refcounts
    h.extend(104u32.to_be_bytes()); // header_length
    h.extend([0u8; 8]); // end of header extensions
    h
}
