//! Raw images: a plain file whose bytes are the disk. Holes are found with
//! `SEEK_DATA`/`SEEK_HOLE` and written back as holes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use bootcache_trace::IntervalSet;
use rustix::fs::{SeekFrom, seek};
use rustix::io::Errno;

use crate::image::{ImageSink, ImageSource};
use crate::mapped::MappedFile;

/// A raw image file opened for reading (and mapped: see
/// [`ImageSource::map`]).
#[derive(Debug)]
pub struct RawSource {
    file: MappedFile,
    size: u64,
}

impl RawSource {
    /// Opens `path`, a regular file or a block device, as a raw disk
    /// (whatever its bytes are: [`crate::open`] tells formats apart).
    ///
    /// # Errors
    /// When the file cannot be opened or measured, or is a FIFO, character
    /// device or directory.
    pub fn open(path: &Path) -> io::Result<RawSource> {
        let file = crate::open::open_input(path).map_err(|e| match e {
            crate::OpenError::Io { source, .. } => source,
            other => io::Error::new(io::ErrorKind::InvalidInput, other.to_string()),
        })?;
        RawSource::from_file(file)
    }

    /// The raw disk open as `file`.
    pub(crate) fn from_file(file: File) -> io::Result<RawSource> {
        let file = MappedFile::new(file)?;
        let size = file.len();
        Ok(RawSource { file, size })
    }
}

impl ImageSource for RawSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.file().read_exact_at(buf, offset)
    }

    fn map(&self, range: std::ops::Range<u64>) -> Option<&[u8]> {
        self.file.slice(range)
    }

    fn changed(&self) -> io::Result<bool> {
        self.file.changed()
    }

    fn allocated(&self) -> io::Result<IntervalSet> {
        let mut ranges = Vec::new();
        let mut at = 0;
        while at < self.size {
            let start = match seek(self.file.file(), SeekFrom::Data(at)) {
                Ok(s) => s,
                Err(Errno::NXIO) => break,
                // A file system without SEEK_DATA: everything may hold data.
                Err(Errno::INVAL | Errno::OPNOTSUPP) => return Ok(IntervalSet::from_ranges(std::iter::once(0..self.size))),
                Err(e) => return Err(e.into()),
            };
            let end = match seek(self.file.file(), SeekFrom::Hole(start)) {
                Ok(e) => e.min(self.size),
                Err(Errno::NXIO) => self.size,
                Err(e) => return Err(e.into()),
            };
            ranges.push(start..end);
            at = end;
        }
        Ok(IntervalSet::from_ranges(ranges))
    }
}

/// A raw image being written: sparse, only non-zero bytes are written.
#[derive(Debug)]
pub struct RawSink {
    file: File,
    size: u64,
}

impl RawSink {
    /// Creates (or truncates) `path` as a sparse file of `size` bytes.
    ///
    /// # Errors
    /// When the file cannot be created or sized.
    pub fn create(path: &Path, size: u64) -> io::Result<RawSink> {
        RawSink::new(OpenOptions::new().write(true).create(true).truncate(true).open(path)?, size)
    }

    /// Writes the disk into `file` (emptied first), e.g. one made by
    /// [`crate::output::stage`].
    ///
    /// # Errors
    /// When the file cannot be sized.
    pub fn new(file: File, size: u64) -> io::Result<RawSink> {
        file.set_len(0)?;
        file.set_len(size)?;
        Ok(RawSink { file, size })
    }
}

impl ImageSink for RawSink {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        // Leave all-zero blocks as holes.
        for (i, chunk) in buf.chunks(64 * 1024).enumerate() {
            if !bootcache_format::is_zero(chunk) {
                self.file.write_all_at(chunk, offset + (i * 64 * 1024) as u64)?;
            }
        }
        Ok(())
    }

    fn finish(self: Box<Self>) -> io::Result<()> {
        self.file.set_len(self.size)?;
        self.file.sync_all()
    }
}
