//! The credential a node's API requires: a bearer token, made when the node
//! first starts and kept in a file only its owner can read.
//!
//! ```text
//! token file (mode 0600)      line 1: the token this node sends to peers
//!                             further lines: older tokens still accepted
//! request                     Authorization: Bearer <token>
//! ```
//!
//! Nodes of one deployment share the file, so that each accepts the others
//! as peers. Rotating writes a new first line and keeps the previous one
//! accepted until the next rotation; a running node sees the change on its
//! next request. Tokens are compared in constant time (as BLAKE3 digests).

use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Errors loading or making a credential.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The file holds no token.
    #[error("{0} holds no token")]
    Empty(PathBuf),
    /// The file could not be read or written.
    #[error("token file {path}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Others than its owner may read the file.
    #[error("{path} may be read by others (mode {mode:o}); make it private: chmod 600 {path}")]
    Readable {
        /// Which file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
}

/// Shortest token accepted from a file.
const MIN_TOKEN: usize = 32;

/// A set of accepted tokens (from a file, reread when it changes) and the
/// one this node presents to others.
#[derive(Debug)]
pub struct Credential {
    path: Option<PathBuf>,
    state: Mutex<Tokens>,
}

#[derive(Debug)]
struct Tokens {
    stamp: Option<(SystemTime, u64)>,
    digests: Vec<blake3::Hash>,
    first: String,
}

/// A new random token: 32 bytes from the kernel, as hex.
///
/// # Errors
/// When the kernel's random source fails.
pub fn new_token() -> io::Result<String> {
    let mut bytes = [0u8; 32];
    let mut filled = 0;
    while filled < bytes.len() {
        filled += rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty())?;
    }
    Ok(crate::hex(&bytes))
}

impl Credential {
    /// One fixed token (for a node embedded in another program, or tests).
    pub fn from_token(token: &str) -> Arc<Credential> {
        Arc::new(Credential {
            path: None,
            state: Mutex::new(Tokens { stamp: None, digests: vec![blake3::hash(token.as_bytes())], first: token.to_owned() }),
        })
    }

    /// The tokens in `path`, made (one fresh token, mode 0600) if the file
    /// does not exist.
    ///
    /// # Errors
    /// A file others may read, an empty one, or one that cannot be read or
    /// made.
    pub fn load_or_create(path: &Path) -> Result<Arc<Credential>, AuthError> {
        let io = |source| AuthError::Io { path: path.to_owned(), source };
        if !path.exists() {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io)?;
            }
            match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
                Ok(mut f) => writeln!(f, "{}", new_token().map_err(io)?).and_then(|()| f.sync_all()).map_err(io)?,
                // Made meanwhile by another process: use it.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io(e)),
            }
            tracing::info!(path = %path.display(), "made a new API token");
        }
        let tokens = read_tokens(path)?;
        Ok(Arc::new(Credential { path: Some(path.to_owned()), state: Mutex::new(tokens) }))
    }

    /// The tokens in `path`, which must exist (a client's: nothing is made).
    ///
    /// # Errors
    /// A missing file, one others may read, an empty one.
    pub fn load(path: &Path) -> Result<Arc<Credential>, AuthError> {
        let tokens = read_tokens(path)?;
        Ok(Arc::new(Credential { path: Some(path.to_owned()), state: Mutex::new(tokens) }))
    }

    /// Writes a new token first in `path`, keeping the current one accepted
    /// (older ones are dropped); returns the new token.
    ///
    /// # Errors
    /// As [`Credential::load_or_create`].
    pub fn rotate(path: &Path) -> Result<String, AuthError> {
        let io = |source| AuthError::Io { path: path.to_owned(), source };
        let current = Credential::load_or_create(path)?.token();
        let token = new_token().map_err(io)?;
        let tmp = path.with_extension("new");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
        writeln!(f, "{token}\n{current}").and_then(|()| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        Ok(token)
    }

    /// The token this node presents (the file's first).
    pub fn token(&self) -> String {
        self.refresh();
        self.state.lock().unwrap_or_else(|p| p.into_inner()).first.clone()
    }

    /// A token derived one way from this one (the file's first) for
    /// `purpose` (a BLAKE3 key derivation context): the control node's join
    /// and peer tokens come from its administrator's this way, so they
    /// follow a rotation and reveal nothing of it.
    pub fn derive(&self, purpose: &str) -> String {
        crate::hex(&blake3::derive_key(purpose, self.token().as_bytes()))
    }

    /// The `Authorization` header value this node sends.
    pub fn authorization(&self) -> String {
        format!("Bearer {}", self.token())
    }

    /// Whether an `Authorization` header value carries an accepted token.
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        let Some(token) = authorization.and_then(|v| v.strip_prefix(b"Bearer ")) else { return false };
        self.refresh();
        let given = blake3::hash(token.trim_ascii());
        // blake3::Hash compares in constant time.
        self.state.lock().unwrap_or_else(|p| p.into_inner()).digests.contains(&given)
    }

    /// Rereads the file if it changed (a rotation); keeps the tokens it had
    /// if the file cannot be read now.
    fn refresh(&self) {
        let Some(path) = &self.path else { return };
        let Ok(meta) = std::fs::metadata(path) else { return };
        let stamp = (meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.ino());
        if self.state.lock().unwrap_or_else(|p| p.into_inner()).stamp == Some(stamp) {
            return;
        }
        match read_tokens(path) {
            Ok(tokens) => *self.state.lock().unwrap_or_else(|p| p.into_inner()) = tokens,
            Err(e) => tracing::error!(error = %e, "cannot reread the API token file; keeping the tokens read before"),
        }
    }
}

/// Middleware (for `axum::middleware::from_fn_with_state`) that lets a
/// request through only with a token `credential` accepts; anything else
/// gets 401 and reaches nothing.
pub async fn require(
    axum::extract::State(credential): axum::extract::State<Arc<Credential>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::{HeaderValue, StatusCode, header};
    use axum::response::IntoResponse;
    if credential.accepts(request.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes)) {
        return next.run(request).await;
    }
    let mut r = (StatusCode::UNAUTHORIZED, "this service requires its credential: Authorization: Bearer <token>\n").into_response();
    r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"bootcache\""));
    r
}

fn read_tokens(path: &Path) -> Result<Tokens, AuthError> {
    let io = |source| AuthError::Io { path: path.to_owned(), source };
    let meta = std::fs::metadata(path).map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuthError::Readable { path: path.to_owned(), mode });
    }
    let text = std::fs::read_to_string(path).map_err(io)?;
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| l.len() >= MIN_TOKEN && !l.starts_with('#')).collect();
    let first = lines.first().ok_or_else(|| AuthError::Empty(path.to_owned()))?.to_string();
    Ok(Tokens {
        stamp: Some((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.ino())),
        digests: lines.iter().map(|l| blake3::hash(l.as_bytes())).collect(),
        first,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_is_made_private_checked_and_rotated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("token");
        let cred = Credential::load_or_create(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let first = cred.token();
        assert_eq!(first.len(), 64);
        assert!(cred.accepts(Some(format!("Bearer {first}").as_bytes())));
        for bad in [None, Some(&b""[..]), Some(first.as_bytes()), Some(b"Bearer nope"), Some(b"Basic abc")] {
            assert!(!cred.accepts(bad), "{bad:?}");
        }
        let again = Credential::load_or_create(&path).unwrap();
        assert_eq!(again.token(), first, "an existing file is kept");

        let second = Credential::rotate(&path).unwrap();
        assert_ne!(second, first);
        assert_eq!(cred.token(), second, "a running node sees the rotation");
        assert!(cred.accepts(Some(format!("Bearer {first}").as_bytes())), "the previous token is still accepted");
        let third = Credential::rotate(&path).unwrap();
        assert!(!cred.accepts(Some(format!("Bearer {first}").as_bytes())), "two rotations retire it");
        assert!(cred.accepts(Some(format!("Bearer {third}").as_bytes())));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Credential::load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("read by others"), "{err}");
        std::fs::write(dir.path().join("empty"), "short\n").unwrap();
        std::fs::set_permissions(dir.path().join("empty"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Credential::load_or_create(&dir.path().join("empty")).unwrap_err().to_string().contains("no token"));
    }
}
