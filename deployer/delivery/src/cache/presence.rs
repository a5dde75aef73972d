//! The persistent presence map: which extents of the cache's data file hold
//! verified bytes, as an append-only journal.
//!
//! ```text
//! header (48 bytes): magic "BCPRES\0\x01" | root digest (32) | extent count u32 | crc32c of the previous 44 bytes
//! record (8 bytes):  extent number u32 LE  | crc32c of those 4 bytes, seeded with the header's crc
//! ```
//!
//! A record is appended only after the extent's bytes have been verified,
//! written and made durable (`fdatasync` of the data file), so a record
//! always means "verified data on disk". A torn or corrupt record ends the
//! journal: what follows is ignored and fetched again. A journal for another
//! image, or of another shape, is discarded whole.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

const MAGIC: [u8; 8] = *b"BCPRES\0\x01";
const HEADER_LEN: usize = 48;
const RECORD_LEN: usize = 8;

/// An open journal.
#[derive(Debug)]
pub struct Journal {
    file: File,
    seed: u32,
}

impl Journal {
    /// Opens (or creates) the journal at `path` for the image with
    /// `root_digest` and `extents` extents. Returns it and the extents it
    /// records as present.
    ///
    /// # Errors
    /// I/O errors only; a journal that does not fit is replaced.
    pub fn open(path: &Path, root_digest: &[u8; 32], extents: u32) -> io::Result<(Journal, Vec<u32>)> {
        let (header, seed) = header(root_digest, extents);
        let (present, keep) = records(path, &header, seed, extents)?;
        let mut file = OpenOptions::new().create(true).read(true).write(true).truncate(false).open(path)?;
        if keep == 0 {
            file.set_len(0)?;
            file.write_all(&header)?;
            file.sync_data()?;
        } else {
            file.set_len(keep)?; // drop a torn tail before appending
        }
        use std::io::Seek;
        file.seek(io::SeekFrom::End(0))?;
        Ok((Journal { file, seed }, present))
    }

    /// The extents the journal at `path` (of another cache, open or not)
    /// records as present, read without changing it.
    ///
    /// # Errors
    /// I/O errors; a journal that does not fit records nothing.
    pub fn read(path: &Path, root_digest: &[u8; 32], extents: u32) -> io::Result<Vec<u32>> {
        let (header, seed) = header(root_digest, extents);
        Ok(records(path, &header, seed, extents)?.0)
    }

    /// Appends records for `extents` and makes them durable. The caller has
    /// already made their data durable.
    ///
    /// # Errors
    /// I/O errors.
    pub fn append(&mut self, extents: &[u32]) -> io::Result<()> {
        if extents.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(extents.len() * RECORD_LEN);
        for n in extents {
            let b = n.to_le_bytes();
            buf.extend_from_slice(&b);
            buf.extend_from_slice(&crc32c::crc32c_append(self.seed, &b).to_le_bytes());
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()
    }
}

fn header(root_digest: &[u8; 32], extents: u32) -> ([u8; HEADER_LEN], u32) {
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(&MAGIC);
    header[8..40].copy_from_slice(root_digest);
    header[40..44].copy_from_slice(&extents.to_le_bytes());
    let seed = crc32c::crc32c(&header[..44]);
    header[44..].copy_from_slice(&seed.to_le_bytes());
    (header, seed)
}

/// The extents recorded in the journal at `path`, and the length of its
/// good prefix (0: none, or not this image's).
fn records(path: &Path, header: &[u8; HEADER_LEN], seed: u32, extents: u32) -> io::Result<(Vec<u32>, u64)> {
    let mut present = Vec::new();
    let mut keep = 0u64;
    let Ok(mut f) = File::open(path) else { return Ok((present, keep)) };
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    if bytes.len() >= HEADER_LEN && bytes[..HEADER_LEN] == *header {
        keep = HEADER_LEN as u64;
        for rec in bytes[HEADER_LEN..].chunks_exact(RECORD_LEN) {
            let n = u32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]);
            let crc = u32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
            if crc != crc32c::crc32c_append(seed, &rec[..4]) || n >= extents {
                tracing::warn!(path = %path.display(), at = keep, "presence journal ends in a bad record; the rest is fetched again");
                break;
            }
            present.push(n);
            keep += RECORD_LEN as u64;
        }
    } else if !bytes.is_empty() {
        tracing::warn!(path = %path.display(), "presence journal belongs to another image; starting empty");
    }
    Ok((present, keep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("present");
        let digest = [7u8; 32];
        let (mut j, present) = Journal::open(&path, &digest, 100).unwrap();
        assert!(present.is_empty());
        j.append(&[3, 9, 42]).unwrap();
        drop(j);
        let (mut j, present) = Journal::open(&path, &digest, 100).unwrap();
        assert_eq!(present, vec![3, 9, 42]);
        j.append(&[5]).unwrap();
        drop(j);
        // A crash in the middle of an append: half a record.
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 3).unwrap();
        drop(f);
        let (mut j, present) = Journal::open(&path, &digest, 100).unwrap();
        assert_eq!(present, vec![3, 9, 42]);
        j.append(&[6]).unwrap();
        drop(j);
        assert_eq!(Journal::open(&path, &digest, 100).unwrap().1, vec![3, 9, 42, 6]);
    }

    #[test]
    fn a_flipped_record_ends_the_journal_and_another_image_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("present");
        let digest = [1u8; 32];
        let (mut j, _) = Journal::open(&path, &digest, 10).unwrap();
        j.append(&[1, 2, 3]).unwrap();
        drop(j);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER_LEN + RECORD_LEN] ^= 0x04; // record for extent 2 now says 6, with the wrong crc
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(Journal::open(&path, &digest, 10).unwrap().1, vec![1]);
        assert!(Journal::open(&path, &[2u8; 32], 10).unwrap().1.is_empty());
        // Out-of-range extent numbers are not trusted either.
        let (mut j, _) = Journal::open(&path, &digest, 10).unwrap();
        j.append(&[1]).unwrap();
        drop(j);
        assert!(Journal::open(&path, &digest, 1).unwrap().1.is_empty(), "shape changed: discarded");
    }
}
