//! Output files that appear only when complete: written under a temporary
//! name beside the destination and renamed over it on success, so a failed
//! or interrupted run leaves an older file intact and no half file behind.
//! An output that is one of the run's inputs is refused before anything is
//! written.

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Errors preparing or completing an output file.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OutputError {
    /// Creating, writing or renaming failed.
    #[error("cannot write {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The destination exists and is not a regular file.
    #[error("{path} exists and is {what}; give the name of a file to write")]
    NotAFile {
        /// The destination.
        path: PathBuf,
        /// What it is.
        what: &'static str,
    },
    /// The destination is one of the inputs.
    #[error("{output} is the input {input}: writing it would replace what is being read")]
    SameAsInput {
        /// The destination.
        output: PathBuf,
        /// The input it is.
        input: PathBuf,
    },
}

/// An output being written under a temporary name; [`Staged::commit`] puts
/// it in place, dropping it removes it.
#[derive(Debug)]
pub struct Staged {
    tmp: tempfile::TempPath,
    dst: PathBuf,
}

/// Prepares `dst` to be written: refuses it when it is one of `inputs` (the
/// same file by device and inode, through links) or exists as anything but
/// a regular file; returns the file to write and what puts it in place.
///
/// # Errors
/// See [`OutputError`].
pub fn stage(dst: &Path, inputs: &[&Path]) -> Result<(File, Staged), OutputError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| OutputError::Io { path, source }
    };
    match std::fs::metadata(dst) {
        Ok(meta) => {
            for input in inputs {
                if let Ok(m) = std::fs::metadata(input)
                    && (m.dev(), m.ino()) == (meta.dev(), meta.ino())
                {
                    return Err(OutputError::SameAsInput { output: dst.to_owned(), input: input.to_path_buf() });
                }
            }
            let kind = meta.file_type();
            if !kind.is_file() {
                let what = if kind.is_dir() { "a directory" } else { "not a regular file" };
                return Err(OutputError::NotAFile { path: dst.to_owned(), what });
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(dst)(e)),
    }
    let dir = dst.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = dst.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".part")
        .permissions(std::fs::Permissions::from_mode(0o666)) // less the umask, like a created file
        .tempfile_in(dir)
        .map_err(io(dst))?;
    let (file, tmp) = tmp.into_parts();
    Ok((file, Staged { tmp, dst: dst.to_owned() }))
}

impl Staged {
    /// The destination.
    pub fn destination(&self) -> &Path {
        &self.dst
    }

    /// Makes `file` (what [`stage`] returned, written and flushed) durable
    /// and renames it over the destination.
    ///
    /// # Errors
    /// When syncing or renaming fails; the temporary file is then removed.
    pub fn commit(self, file: &File) -> Result<(), OutputError> {
        let io = |source| OutputError::Io { path: self.dst.clone(), source };
        file.sync_all().map_err(io)?;
        self.tmp.persist(&self.dst).map_err(|e| OutputError::Io { path: self.dst.clone(), source: e.error })?;
        // The rename itself is durable once the directory is.
        if let Some(dir) = self.dst.parent().filter(|p| !p.as_os_str().is_empty())
            && let Ok(d) = File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_appears_only_when_committed_and_never_replaces_an_input() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("out.img");
        std::fs::write(&dst, b"old").unwrap();
        let (mut file, staged) = stage(&dst, &[]).unwrap();
        io::Write::write_all(&mut file, b"new").unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"old", "not in place before commit");
        drop(staged);
        assert_eq!(std::fs::read(&dst).unwrap(), b"old", "a dropped output changes nothing");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "and leaves no temporary file");

        let (mut file, staged) = stage(&dst, &[]).unwrap();
        io::Write::write_all(&mut file, b"new").unwrap();
        staged.commit(&file).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"new");

        let link = dir.path().join("link.img");
        std::os::unix::fs::symlink(&dst, &link).unwrap();
        let err = stage(&link, &[&dst]).unwrap_err().to_string();
        assert!(err.contains("is the input"), "{err}");
        let err = stage(dir.path(), &[]).unwrap_err().to_string();
        assert!(err.contains("directory"), "{err}");
    }
}
