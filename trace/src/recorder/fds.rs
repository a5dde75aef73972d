//! Which descriptors of a process refer to the image (by device and inode).

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Identity of a file: device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
}

impl FileId {
    /// The identity of the file at `path` (following links).
    ///
    /// # Errors
    /// When the file cannot be stat'ed.
    pub fn of(path: &Path) -> io::Result<FileId> {
        let m = std::fs::metadata(path)?;
        Ok(FileId { dev: m.dev(), ino: m.ino() })
    }
}

/// The descriptors of process `pid` that refer to `image`.
///
/// # Errors
/// When `/proc/PID/fd` cannot be read (no such process, or no permission).
/// Descriptors that vanish while being looked at are skipped.
pub fn image_fds(pid: u32, image: FileId) -> io::Result<BTreeSet<u32>> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(entry) = entry else { continue };
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if FileId::of(&entry.path()).is_ok_and(|id| id == image) {
            out.insert(fd);
        }
    }
    Ok(out)
}
