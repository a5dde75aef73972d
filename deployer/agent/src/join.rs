//! Joining the control node: once, with the join token, for a credential of
//! the node's own (its heartbeats are taken with nothing else) and the
//! cluster's peer token. Both are kept in the agent's state directory (mode
//! 0600), so a restarted agent carries on without joining again; it joins
//! again only when the control node no longer knows it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bootcache_api::Name;
use bootcache_api::agent::{Join, Joined};
use serde::{Deserialize, Serialize};

use crate::AgentError;

/// What a node keeps of its joining.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    control: String,
    name: Name,
    joined: Joined,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("node-credential.json")
}

/// The credential this node got when it joined `control` as `name`, if it
/// kept one.
pub(crate) fn stored(state_dir: &Path, control: &str, name: &Name) -> Option<Joined> {
    let bytes = std::fs::read(path(state_dir)).ok()?;
    let s: Stored = serde_json::from_slice(&bytes).ok()?;
    (s.control == control && s.name == *name).then_some(s.joined)
}

fn keep(state_dir: &Path, control: &str, name: &Name, joined: &Joined) -> Result<(), AgentError> {
    let file = path(state_dir);
    let tmp = file.with_extension("new");
    let bytes = serde_json::to_vec(&Stored { control: control.to_owned(), name: name.clone(), joined: joined.clone() })
        .map_err(|e| AgentError::State { path: file.clone(), why: e.to_string() })?;
    let write = || -> std::io::Result<()> {
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &file)
    };
    write().map_err(|e| AgentError::State { path: file.clone(), why: e.to_string() })
}

/// Why a join did not go through.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The control node said no (its status and message): not worth trying
    /// again at once.
    Refused(u16, String),
    /// It could not be reached.
    Unreachable(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Refused(s, m) => write!(f, "the control node refused the join ({s}): {m}"),
            Refusal::Unreachable(why) => write!(f, "the control node does not answer: {why}"),
        }
    }
}

/// Joins `control` (`base`, `http://host:port`) with `authorization` (the
/// join token's header value) and keeps what it gives.
pub(crate) async fn join(
    http: &reqwest::Client,
    base: &str,
    authorization: &str,
    join: &Join,
    state_dir: &Path,
) -> Result<Result<Joined, Refusal>, AgentError> {
    let sent = http
        .post(format!("{base}{}", bootcache_api::control::routes::NODES))
        .header(reqwest::header::AUTHORIZATION, authorization)
        .json(join)
        .send()
        .await;
    let r = match sent {
        Ok(r) => r,
        Err(e) => return Ok(Err(Refusal::Unreachable(bootcache_http::chain(&e)))),
    };
    let status = r.status();
    if !status.is_success() {
        let msg: String = r.text().await.unwrap_or_default().trim().chars().take(500).collect();
        return Ok(Err(Refusal::Refused(status.as_u16(), msg)));
    }
    let joined: Joined = match r.json().await {
        Ok(j) => j,
        Err(e) => return Ok(Err(Refusal::Unreachable(format!("an answer that is not a credential: {e}")))),
    };
    keep(state_dir, base, &join.name, &joined)?;
    tracing::info!(node = %join.name, control = %base, "joined");
    Ok(Ok(joined))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_credential_is_kept_privately_for_its_control_node_and_name() {
        let dir = tempfile::tempdir().unwrap();
        let name: Name = "node-a".parse().unwrap();
        let joined = Joined { secret: "s".repeat(64), peer_token: "p".repeat(64) };
        assert_eq!(stored(dir.path(), "http://c:7080", &name), None);
        keep(dir.path(), "http://c:7080", &name, &joined).unwrap();
        assert_eq!(stored(dir.path(), "http://c:7080", &name), Some(joined));
        assert_eq!(stored(dir.path(), "http://other:7080", &name), None, "another control node's is not used");
        assert_eq!(stored(dir.path(), "http://c:7080", &"node-b".parse().unwrap()), None);
        assert_eq!(std::fs::metadata(path(dir.path())).unwrap().permissions().mode() & 0o777, 0o600);
    }
}
