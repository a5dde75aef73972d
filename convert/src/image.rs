//! Capability traits for disk images read or written by the pipeline.

use std::fmt::Debug;
use std::io;

use bootcache_trace::IntervalSet;

/// A disk image to read from: positional reads through `&self`, so batches
/// can be read while others are being encoded.
pub trait ImageSource: Send + Sync + Debug {
    /// Guest-visible size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with guest bytes at `offset`.
    ///
    /// # Errors
    /// Any I/O error, or a read past the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// The guest bytes in `range` as memory, when the source holds them
    /// contiguously in a file it has mapped (a raw file; a run of plain
    /// qcow2 data clusters): conversion then hashes and writes them without
    /// copying them into a buffer. `None` means: use
    /// [`ImageSource::read_at`].
    fn map(&self, range: std::ops::Range<u64>) -> Option<&[u8]> {
        let _ = range;
        None
    }

    /// Whether the image changed since it was opened, so that bytes read
    /// at different times may not belong together.
    ///
    /// # Errors
    /// Any I/O error while asking the file system.
    fn changed(&self) -> io::Result<bool> {
        Ok(false)
    }

    /// The guest ranges that may hold data (a superset: holes are certain to
    /// read as zero, allocated ranges may still be zero).
    ///
    /// # Errors
    /// Any I/O error while asking the file system.
    fn allocated(&self) -> io::Result<IntervalSet>;
}

/// A disk image to write to.
pub trait ImageSink: Send {
    /// Writes guest bytes at `offset`. Ranges never written read as zero.
    ///
    /// # Errors
    /// Any I/O error.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Completes the image (sizes, metadata, flush).
    ///
    /// # Errors
    /// Any I/O error.
    fn finish(self: Box<Self>) -> io::Result<()>;
}
