//! A source file mapped read-only, so conversion hashes and writes its
//! bytes without copying them into buffers first, and the file's stamp, so
//! a change during conversion is noticed.
//!
//! The file must not change while it is converted (as with any image tool):
//! a write is detected by its timestamps ([`MappedFile::changed`]) and fails
//! the conversion; a truncation would end the process with `SIGBUS`.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;

use memmap2::{Advice, Mmap};

/// What tells whether a file changed: size and modification times.
#[derive(Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(file: &File) -> io::Result<Stamp> {
        let m = file.metadata()?;
        Ok(Stamp { len: m.len(), mtime: (m.mtime(), m.mtime_nsec()), ctime: (m.ctime(), m.ctime_nsec()) })
    }
}

/// A file, its read-only mapping (when it could be mapped) and its stamp.
#[derive(Debug)]
pub(crate) struct MappedFile {
    file: File,
    map: Option<Mmap>,
    len: u64,
    stamp: Stamp,
}

impl MappedFile {
    /// Maps `file`; a file that cannot be mapped is still usable by `file`.
    pub(crate) fn new(file: File) -> io::Result<MappedFile> {
        let stamp = Stamp::of(&file)?;
        // A block device's length is not in its metadata.
        let len = crate::open::input_len(&file)?;
        let map = match usize::try_from(len) {
            Ok(0) | Err(_) => None,
            // SAFETY: the mapping is read-only and private to this value; its
            // bytes change only if another process writes the file, which
            // `changed` detects (see the module documentation).
            Ok(n) => unsafe { memmap2::MmapOptions::new().len(n).map(&file) }.ok(),
        };
        Ok(MappedFile { file, map, len, stamp })
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The bytes at `range` of the file, their pages filled in one go; `None`
    /// when unmapped or out of range.
    pub(crate) fn slice(&self, range: Range<u64>) -> Option<&[u8]> {
        let map = self.map.as_ref()?;
        let (start, end) = (usize::try_from(range.start).ok()?, usize::try_from(range.end).ok()?);
        let bytes = map.get(start..end)?;
        if !bytes.is_empty() {
            // Only a hint: a kernel without MADV_POPULATE_READ faults instead.
            let _ = map.advise_range(Advice::PopulateRead, start, end - start);
        }
        Some(bytes)
    }

    /// Whether the file was written or resized since it was opened.
    pub(crate) fn changed(&self) -> io::Result<bool> {
        Ok(Stamp::of(&self.file)? != self.stamp)
    }
}
