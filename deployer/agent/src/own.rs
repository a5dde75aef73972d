//! What this agent made on its node, recorded on disk before it is made and
//! dropped once it is gone: the other half of the mark each thing carries
//! (an interface alias, a rule's comment, a libvirt `<metadata>` element, a
//! Docker label). The agent changes or removes a thing only when both say
//! it is its own; a name it did not make is someone else's, even when it
//! is the name it wanted.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use bootcache_api::Kind;
use serde::{Deserialize, Serialize};

/// What the agent made, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Owned {
    /// Links (bridges, VXLAN links, veths, DHCP links) and their marks.
    #[serde(default)]
    pub links: BTreeMap<String, String>,
    /// FORWARD rules, by bridge, and their marks.
    #[serde(default)]
    pub rules: BTreeMap<String, String>,
    /// Runtime instances (domains, containers), by runtime id.
    #[serde(default)]
    pub instances: BTreeMap<String, Kind>,
}

/// The record, kept in a file of the agent's state directory (written
/// whole beside it and renamed over it: never half written).
#[derive(Debug)]
pub(crate) struct Record {
    path: PathBuf,
    owned: Mutex<Owned>,
}

impl Record {
    /// The record at `path` (empty if there is none yet).
    ///
    /// # Errors
    /// A file that cannot be read or is not a record: the agent does not
    /// start rather than forget what it made.
    pub fn open(path: &Path) -> Result<Record, String> {
        let owned = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "{}: not a record of what this agent made ({e}); move it away to start afresh (what it lists is then left on the node)",
                    path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Owned::default(),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        Ok(Record { path: path.to_owned(), owned: Mutex::new(owned) })
    }

    /// What it holds now.
    pub fn get(&self) -> Owned {
        self.owned.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Changes it and writes it down before returning.
    ///
    /// # Errors
    /// The file cannot be written; the change is kept in memory.
    pub fn update(&self, change: impl FnOnce(&mut Owned)) -> std::io::Result<()> {
        let mut owned = self.owned.lock().unwrap_or_else(|p| p.into_inner());
        let before = owned.clone();
        change(&mut owned);
        if *owned == before {
            return Ok(());
        }
        let bytes = serde_json::to_vec_pretty(&*owned).map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("new");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_survives_a_restart_and_refuses_what_it_cannot_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("owned.json");
        let r = Record::open(&path).unwrap();
        assert_eq!(r.get(), Owned::default());
        r.update(|o| {
            o.links.insert("bc00000001".into(), "bootcache n segment 1 lab/lan".into());
            o.instances.insert("bootcache.1.lab.vm".into(), Kind::Vm);
        })
        .unwrap();
        let again = Record::open(&path).unwrap();
        assert_eq!(again.get(), r.get());
        std::fs::write(&path, b"{\"links\": 3}").unwrap();
        let e = Record::open(&path).unwrap_err();
        assert!(e.contains("not a record"), "{e}");
    }
}
