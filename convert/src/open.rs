//! Opening a disk image: its format told by its magic, then read by that
//! format's reader or refused with the reason.
//!
//! A file with a magic this crate knows is never read as anything else: a
//! qcow2 image the qcow2 reader refuses (an unsupported feature, a broken
//! table) is an error, not a raw disk. A VMDK, VHD, VDI, LUKS volume,
//! compressed file or bootcache container is named and refused. Raw is what
//! a file with no known magic is, or any file the caller asks to read as
//! raw.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::image::ImageSource;
use crate::qcow2::{Qcow2Error, Qcow2Source};
use crate::raw::RawSource;

/// Disk image formats told apart by their magic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Format {
    /// A plain disk: the file's bytes are the disk's.
    Raw,
    /// qcow2, versions 2 and 3.
    Qcow2,
    /// QEMU's QED.
    Qed,
    /// VMware's VMDK (sparse extent, ESX sparse or text descriptor).
    Vmdk,
    /// Microsoft's VHD (dynamic, or fixed with its footer at the end).
    Vhd,
    /// Microsoft's VHDX.
    Vhdx,
    /// VirtualBox's VDI.
    Vdi,
    /// Parallels' disk format.
    Parallels,
    /// A LUKS encrypted volume.
    Luks,
    /// A bootcache container.
    Bootcache,
    /// A bootcache trace file.
    BootcacheTrace,
    /// A gzip-compressed file.
    Gzip,
    /// An xz-compressed file.
    Xz,
    /// A zstd-compressed file.
    Zstd,
    /// A bzip2-compressed file.
    Bzip2,
}

impl Format {
    /// The format's usual name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Qed => "QED",
            Format::Vmdk => "VMDK",
            Format::Vhd => "VHD",
            Format::Vhdx => "VHDX",
            Format::Vdi => "VDI",
            Format::Parallels => "Parallels",
            Format::Luks => "LUKS",
            Format::Bootcache => "bootcache container",
            Format::BootcacheTrace => "bootcache trace",
            Format::Gzip => "gzip",
            Format::Xz => "xz",
            Format::Zstd => "zstd",
            Format::Bzip2 => "bzip2",
        }
    }

    /// What to do with a file of a format this crate does not read.
    fn advice(self) -> &'static str {
        match self {
            Format::Raw | Format::Qcow2 => "",
            Format::Luks => "decrypt it first (cryptsetup open), then convert the opened device",
            Format::Bootcache => "it is converted already (bootcache export turns it back into raw or qcow2)",
            Format::BootcacheTrace => "it is a boot trace; give it with --trace",
            Format::Gzip | Format::Xz | Format::Zstd | Format::Bzip2 => "decompress it first",
            _ => "convert it to qcow2 or raw first (qemu-img convert -O qcow2 IN OUT)",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors opening a disk image.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// A backing file named by an image could not be opened.
    #[error("{image}: its backing file {backing} cannot be used")]
    Backing {
        /// The image naming it.
        image: PathBuf,
        /// The backing file as resolved.
        backing: PathBuf,
        /// Why.
        #[source]
        source: Box<OpenError>,
    },
    /// The file could not be opened or read.
    #[error("cannot read {path}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is not something a disk image can be read from.
    #[error("{path} is {what}, not a disk image file")]
    NotAFile {
        /// Which file.
        path: PathBuf,
        /// What it is.
        what: &'static str,
    },
    /// A qcow2 image this reader cannot read exactly.
    #[error("{path} is a qcow2 image that cannot be read exactly")]
    Qcow2 {
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Qcow2Error,
    },
    /// A file of a format this crate does not read.
    #[error("{path} is a {format} image, which is not supported: {}", format.advice())]
    Unsupported {
        /// Which file.
        path: PathBuf,
        /// Its format.
        format: Format,
    },
    /// The caller asked for one format, the file is of another.
    #[error("{path} is not a {wanted} image (its magic says {found})")]
    WrongFormat {
        /// Which file.
        path: PathBuf,
        /// What was asked for.
        wanted: Format,
        /// What the file is.
        found: Format,
    },
}

/// An opened disk image.
#[derive(Debug)]
pub struct Opened {
    /// Its guest bytes.
    pub source: Box<dyn ImageSource>,
    /// Its format.
    pub format: Format,
    /// Every file it reads: the image, then its backing chain.
    pub files: Vec<PathBuf>,
}

/// Deepest backing chain followed.
const MAX_CHAIN: usize = 16;

/// Opens `path` as a disk image. `format`: `None` to tell it by its magic,
/// `Some(Format::Raw)` to read any file as raw, `Some(Format::Qcow2)` to
/// insist on qcow2. A backing file named by a qcow2 image is opened the
/// same way (by the format the image declares for it, else by its magic).
///
/// # Errors
/// See [`OpenError`]: a FIFO, character device or directory; a format this
/// crate does not read; a qcow2 image it cannot read exactly.
pub fn open(path: &Path, format: Option<Format>) -> Result<Opened, OpenError> {
    let mut files = Vec::new();
    let (source, format) = open_in_chain(path, format, &mut files)?;
    Ok(Opened { source, format, files })
}

/// The format of the image at `path`, by its magic (raw when none matches).
///
/// # Errors
/// A file that cannot be opened, or is not a regular file or block device.
pub fn detect(path: &Path) -> Result<Format, OpenError> {
    let file = open_input(path)?;
    sniff(&file, path)
}

/// Opens one image of a chain; `files` holds the chain so far.
pub(crate) fn open_in_chain(
    path: &Path,
    format: Option<Format>,
    files: &mut Vec<PathBuf>,
) -> Result<(Box<dyn ImageSource>, Format), OpenError> {
    let io = |source| OpenError::Io { path: path.to_owned(), source };
    let canonical = path.canonicalize().map_err(io)?;
    if files.contains(&canonical) {
        return Err(OpenError::Qcow2 {
            path: path.to_owned(),
            source: Qcow2Error::BadHeader(format!("backing chain loops back to {}", canonical.display())),
        });
    }
    if files.len() >= MAX_CHAIN {
        return Err(OpenError::Qcow2 {
            path: path.to_owned(),
            source: Qcow2Error::BadHeader(format!("backing chain deeper than {MAX_CHAIN}")),
        });
    }
    let file = open_input(path)?;
    let found = sniff(&file, path)?;
    files.push(canonical);
    let format = match (format, found) {
        (Some(Format::Raw), _) => Format::Raw,
        (None, f) => f,
        (Some(wanted), f) if wanted == f => f,
        (Some(wanted), found) => return Err(OpenError::WrongFormat { path: path.to_owned(), wanted, found }),
    };
    match format {
        Format::Raw => Ok((Box::new(RawSource::from_file(file).map_err(io)?), Format::Raw)),
        Format::Qcow2 => {
            let q = Qcow2Source::from_file(file, path, files).map_err(|e| match e {
                ChainError::Own(source) => OpenError::Qcow2 { path: path.to_owned(), source },
                ChainError::Backing(e) => e,
            })?;
            Ok((Box::new(q), Format::Qcow2))
        }
        other => Err(OpenError::Unsupported { path: path.to_owned(), format: other }),
    }
}

/// Why a qcow2 image of a chain could not be opened: its own problem, or its
/// backing file's (already named).
#[derive(Debug)]
pub(crate) enum ChainError {
    Own(Qcow2Error),
    Backing(OpenError),
}

impl From<Qcow2Error> for ChainError {
    fn from(e: Qcow2Error) -> Self {
        ChainError::Own(e)
    }
}

/// Opens `path` for reading without blocking on a FIFO or taking a
/// terminal, and refuses anything but a regular file or a block device:
/// what every input file of an image tool should be opened with.
///
/// # Errors
/// [`OpenError::Io`] or [`OpenError::NotAFile`].
pub fn open_file(path: &Path) -> Result<File, OpenError> {
    open_input(path)
}

pub(crate) fn open_input(path: &Path) -> Result<File, OpenError> {
    let io = |source| OpenError::Io { path: path.to_owned(), source };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NONBLOCK | rustix::fs::OFlags::NOCTTY).bits() as i32)
        .open(path)
        .map_err(io)?;
    let kind = file.metadata().map_err(io)?.file_type();
    let what = if kind.is_file() || kind.is_block_device() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    };
    if let Some(what) = what {
        return Err(OpenError::NotAFile { path: path.to_owned(), what });
    }
    rustix::fs::fcntl_setfl(&file, rustix::fs::OFlags::empty()).map_err(|e| io(e.into()))?;
    Ok(file)
}

/// The length of a regular file or block device.
pub(crate) fn input_len(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        rustix::fs::seek(file, rustix::fs::SeekFrom::End(0)).map_err(io::Error::from)
    } else {
        Ok(meta.len())
    }
}

/// The format a file's first bytes (and, for a fixed VHD, its last 512)
/// announce; raw when none matches.
fn sniff(file: &File, path: &Path) -> Result<Format, OpenError> {
    let io = |source| OpenError::Io { path: path.to_owned(), source };
    let len = input_len(file).map_err(io)?;
    let mut head = [0u8; 512];
    let n = read_full(file, &mut head, 0).map_err(io)?;
    let mut tail = [0u8; 512];
    let t = if len >= 1024 { read_full(file, &mut tail, len - 512).map_err(io)? } else { 0 };
    Ok(by_magic(&head[..n], &tail[..t]))
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Magics at offset 0, longest first where one is a prefix of another.
const MAGICS: &[(&[u8], Format)] = &[
    (b"QFI\xfb", Format::Qcow2),
    (b"QED\0", Format::Qed),
    (b"KDMV", Format::Vmdk),
    (b"COWD", Format::Vmdk),
    (b"# Disk DescriptorFile", Format::Vmdk),
    (b"conectix", Format::Vhd),
    (b"vhdxfile", Format::Vhdx),
    (b"<<< Oracle VM VirtualBox Disk Image >>>", Format::Vdi),
    (b"WithoutFreeSpace", Format::Parallels),
    (b"WithouFreSpacExt", Format::Parallels),
    (b"LUKS\xba\xbe", Format::Luks),
    (&bootcache_format::MAGIC, Format::Bootcache),
    (&bootcache_trace::file::MAGIC, Format::BootcacheTrace),
    (b"\x1f\x8b\x08", Format::Gzip),
    (b"\xfd7zXZ\0", Format::Xz),
    (b"\x28\xb5\x2f\xfd", Format::Zstd),
];

/// The format announced by `head` (a file's first bytes) and `tail` (its
/// last 512 bytes, or nothing for a short file).
pub fn by_magic(head: &[u8], tail: &[u8]) -> Format {
    if let Some((_, f)) = MAGICS.iter().find(|(m, _)| head.starts_with(m)) {
        return *f;
    }
    // bzip2: "BZh", the block size digit, then the block magic pi.
    if head.len() >= 10 && head.starts_with(b"BZh") && (b'1'..=b'9').contains(&head[3]) && head[4..10] == *b"1AY&SY" {
        return Format::Bzip2;
    }
    // VDI: its signature at 0x40 (whatever text precedes it).
    if head.get(0x40..0x44) == Some(&0xbeda_107fu32.to_le_bytes()[..]) {
        return Format::Vdi;
    }
    // A fixed VHD is the disk's bytes followed by a 512-byte footer.
    if tail.len() == 512 && tail.starts_with(b"conectix") {
        return Format::Vhd;
    }
    Format::Raw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_name_their_formats() {
        let cases: &[(&[u8], Format)] = &[
            (b"QFI\xfb\0\0\0\x03", Format::Qcow2),
            (b"KDMV\x01\0\0\0", Format::Vmdk),
            (b"# Disk DescriptorFile\nversion=1", Format::Vmdk),
            (b"vhdxfile", Format::Vhdx),
            (b"conectix\0\0", Format::Vhd),
            (b"LUKS\xba\xbe\0\x02", Format::Luks),
            (b"\x89BCI\r\n\x1a\n", Format::Bootcache),
            (b"BCTRACE\n", Format::BootcacheTrace),
            (b"\x1f\x8b\x08\0", Format::Gzip),
            (b"BZh91AY&SY", Format::Bzip2),
            (b"\xeb\x63\x90\x10", Format::Raw),
            (b"", Format::Raw),
        ];
        for (head, want) in cases {
            assert_eq!(by_magic(head, &[]), *want, "{head:?}");
        }
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
        assert_eq!(by_magic(&vdi, &[]), Format::Vdi);
        let mut footer = vec![0u8; 512];
        footer[..8].copy_from_slice(b"conectix");
        assert_eq!(by_magic(&[0u8; 512], &footer), Format::Vhd, "fixed VHD by its footer");
        assert_eq!(by_magic(b"BZh91AY&SX", &[]), Format::Raw, "a near miss is raw");
    }
}
