//! Reading a qcow2 image's guest bytes: the `ImageSource` for qcow2,
//! including compressed clusters (zlib or zstd), zero clusters and backing
//! chains (qcow2 or raw backing files, opened by `crate::open`; loops
//! refused).

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bootcache_trace::IntervalSet;

use super::header::Compression;
use super::{Cluster, Qcow2, Qcow2Error};
use crate::image::ImageSource;
use crate::mapped::MappedFile;
use crate::open::{ChainError, Format, OpenError};

/// L2 tables kept in memory at once.
const L2_CACHE: usize = 64;

/// A qcow2 image read as a guest disk.
#[derive(Debug)]
pub struct Qcow2Source {
    image: Qcow2,
    mapped: MappedFile,
    l2_offsets: Vec<u64>,
    l2_cache: Mutex<HashMap<usize, Arc<Vec<u64>>>>,
    backing: Option<Box<dyn ImageSource>>,
}

impl Qcow2Source {
    /// Opens a qcow2 image and its backing chain.
    ///
    /// # Errors
    /// A file that is not a qcow2 image, one this reader cannot read
    /// exactly, or a bad backing chain.
    pub fn open(path: &Path) -> Result<Qcow2Source, OpenError> {
        let file = crate::open::open_input(path)?;
        Qcow2Source::from_file(file, path, &mut vec![path.canonicalize().map_err(|source| OpenError::Io { path: path.into(), source })?])
            .map_err(|e| match e {
                ChainError::Own(source) => OpenError::Qcow2 { path: path.to_owned(), source },
                ChainError::Backing(e) => e,
            })
    }

    /// The qcow2 image open as `file` (found at `path`), its backing chain
    /// opened after `files` (the chain so far, this image last).
    pub(crate) fn from_file(file: File, path: &Path, files: &mut Vec<PathBuf>) -> Result<Qcow2Source, ChainError> {
        let image = Qcow2::from_file(file)?;
        let l2_offsets = image.l2_tables()?;
        let backing = match &image.header().backing_file {
            None => None,
            Some(name) => {
                let p = Path::new(name);
                let p = if p.is_absolute() { p.to_path_buf() } else { path.parent().unwrap_or(Path::new(".")).join(p) };
                let format = match image.header().backing_format.as_deref() {
                    None => None,
                    Some("raw") => Some(Format::Raw),
                    Some("qcow2") => Some(Format::Qcow2),
                    Some(other) => {
                        return Err(ChainError::Own(Qcow2Error::BadHeader(format!(
                            "backing file {name} is declared {other:?}; only raw and qcow2 backing files are read"
                        ))));
                    }
                };
                let (source, _) = crate::open::open_in_chain(&p, format, files).map_err(|e| {
                    ChainError::Backing(OpenError::Backing { image: path.to_owned(), backing: p.clone(), source: Box::new(e) })
                })?;
                Some(source)
            }
        };
        let io = |source| Qcow2Error::Io { offset: 0, source };
        let mapped = MappedFile::new(image.file().try_clone().map_err(io)?).map_err(io)?;
        Ok(Qcow2Source { image, mapped, l2_offsets, l2_cache: Mutex::new(HashMap::new()), backing })
    }

    fn l2(&self, index: usize) -> Result<Option<Arc<Vec<u64>>>, Qcow2Error> {
        let Some(&off) = self.l2_offsets.get(index) else { return Ok(None) };
        if off == 0 {
            return Ok(None);
        }
        let mut cache = self.l2_cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = cache.get(&index) {
            return Ok(Some(Arc::clone(t)));
        }
        let table = Arc::new(self.image.read_l2(off)?);
        if cache.len() >= L2_CACHE {
            cache.clear();
        }
        cache.insert(index, Arc::clone(&table));
        Ok(Some(table))
    }

    /// Where guest cluster `n` is.
    fn cluster(&self, n: u64) -> Result<Option<Cluster>, Qcow2Error> {
        let per_l2 = self.image.header().cluster_size() / 8;
        let Some(table) = self.l2(usize::try_from(n / per_l2).unwrap_or(usize::MAX))? else { return Ok(None) };
        let entry = table[usize::try_from(n % per_l2).unwrap_or(0)];
        self.image.entry(entry, n)
    }

    fn decompress(&self, host: u64, len: u64, out: &mut [u8]) -> Result<(), Qcow2Error> {
        let mut packed = vec![0u8; usize::try_from(len).unwrap_or(0)];
        // The last compressed cluster may end before its sector-rounded length.
        let got = self.image.read_some(&mut packed, host)?;
        packed.truncate(got);
        let bad = |source: io::Error| Qcow2Error::Io { offset: host, source };
        match self.image.header().compression {
            Compression::Zlib => {
                let mut d = flate2::Decompress::new(false);
                d.decompress(&packed, out, flate2::FlushDecompress::Finish).map_err(|e| bad(io::Error::other(e)))?;
                if d.total_out() != out.len() as u64 {
                    return Err(bad(io::Error::other(format!("compressed cluster decodes to {} bytes", d.total_out()))));
                }
            }
            Compression::Zstd => {
                let mut d = zstd::stream::read::Decoder::with_buffer(&packed[..]).map_err(bad)?.single_frame();
                d.read_exact(out).map_err(bad)?;
            }
        }
        Ok(())
    }
}

impl ImageSource for Qcow2Source {
    fn size(&self) -> u64 {
        self.image.header().size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset.checked_add(buf.len() as u64).filter(|&e| e <= self.size()).ok_or(io::ErrorKind::UnexpectedEof)?;
        let c = self.image.header().cluster_size();
        let mut at = offset;
        while at < end {
            let n = at / c;
            let within = at % c;
            let take = (c - within).min(end - at);
            let dst = &mut buf[usize::try_from(at - offset).unwrap_or(0)..usize::try_from(at - offset + take).unwrap_or(0)];
            match self.cluster(n).map_err(io::Error::other)? {
                Some(Cluster::Data { host }) => self.image.read_exact(dst, host + within).map_err(io::Error::other)?,
                Some(Cluster::Compressed { host, len }) => {
                    let mut whole = vec![0u8; usize::try_from(c).unwrap_or(0)];
                    self.decompress(host, len, &mut whole).map_err(io::Error::other)?;
                    dst.copy_from_slice(&whole[usize::try_from(within).unwrap_or(0)..usize::try_from(within + take).unwrap_or(0)]);
                }
                Some(Cluster::Zero) => dst.fill(0),
                None => match &self.backing {
                    Some(b) if at < b.size() => {
                        let have = (b.size() - at).min(take);
                        let (head, tail) = dst.split_at_mut(usize::try_from(have).unwrap_or(0));
                        b.read_at(head, at)?;
                        tail.fill(0);
                    }
                    _ => dst.fill(0),
                },
            }
            at += take;
        }
        Ok(())
    }

    fn map(&self, range: std::ops::Range<u64>) -> Option<&[u8]> {
        if range.start >= range.end || range.end > self.size() {
            return None;
        }
        let c = self.image.header().cluster_size();
        let first = range.start / c;
        let Ok(Some(Cluster::Data { host })) = self.cluster(first) else { return None };
        for n in first + 1..=(range.end - 1) / c {
            match self.cluster(n) {
                Ok(Some(Cluster::Data { host: h })) if h == host + (n - first) * c => {}
                _ => return None,
            }
        }
        let start = host + range.start % c;
        self.mapped.slice(start..start + (range.end - range.start))
    }

    fn changed(&self) -> io::Result<bool> {
        Ok(self.mapped.changed()? || self.backing.as_ref().map(|b| b.changed()).transpose()?.unwrap_or(false))
    }

    fn allocated(&self) -> io::Result<IntervalSet> {
        let c = self.image.header().cluster_size();
        let size = self.size();
        let own = IntervalSet::from_ranges(self.image.clusters().map_err(io::Error::other)?.into_iter().filter_map(|(g, cl)| match cl {
            Cluster::Zero => None,
            _ => Some(g..(g + c).min(size)),
        }));
        match &self.backing {
            Some(b) => Ok(own.union(&b.allocated()?.intersection(&IntervalSet::from_ranges(std::iter::once(0..size))))),
            None => Ok(own),
        }
    }
}
