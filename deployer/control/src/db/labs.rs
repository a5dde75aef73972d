//! Labs as deployed, each one thing: its file's text, its segments and
//! instances with the numbers the cluster gave them, written in one
//! transaction; and what nodes say they run of them.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use bootcache_api::agent::{Observed, names};
use bootcache_api::lab::LabSource;
use bootcache_api::{InterfaceName, Lab, Name, RootDigest};
use rusqlite::{OptionalExtension, Transaction, TransactionBehavior, params};

use super::instances::{InstanceSpec, kind_str};
use super::{Db, DbError};

/// Something of a lab a node still runs.
pub use bootcache_api::control::RemainingInstance as Remaining;

/// A segment of a deployed lab and the number the cluster gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentRow {
    /// Its name in the lab.
    pub name: Name,
    /// Its number (unique in the cluster, never reused; its VNI).
    pub id: u32,
    /// Its bridge on the nodes (the lab's name for it, or derived).
    pub bridge: InterfaceName,
}

/// A VM image a lab uses, as its header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRecord {
    /// Its root digest.
    pub root: RootDigest,
    /// Where it is.
    pub url: String,
    /// The disk's size, bytes.
    pub virtual_size: u64,
    /// Its boot segment's size, bytes.
    pub boot_bytes: u64,
    /// The registry reference it was resolved from, pinned to its
    /// manifest's digest (none for a store's URL).
    pub reference: Option<String>,
    /// A registry container image's config and layers (JSON), keyed by
    /// its manifest's digest.
    pub blobs: Option<String>,
    /// A layer's parents, its own parent first, each with its boot
    /// segment's bytes (empty for an image that stands alone).
    pub parents: Vec<(RootDigest, u64)>,
}

/// What a deploy changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Deployed {
    /// Instances new to the lab.
    pub added: usize,
    /// Instances whose definition changed: made anew (a new number, pending).
    pub recreated: usize,
    /// Instances the lab no longer has.
    pub removed: usize,
    /// Instances left as they were.
    pub kept: usize,
}

/// How a lab's row is written: 1 is the JSON of the checked lab (schema
/// 5 and before), 2 the lab file's text, 3 the text with the files it
/// names.
const FORMAT_JSON: i64 = 1;
const FORMAT_TEXT: i64 = 2;
/// A lab file with the files its `from:` names ([`LabSource`], as JSON).
const FORMAT_SOURCE: i64 = 3;

/// Takes the next number of counter `name`, refusing beyond `max`.
fn next_number(tx: &Transaction<'_>, db: &Db, name: &str, max: u32) -> Result<u32, DbError> {
    let next: i64 = tx
        .prepare_cached("SELECT next FROM counters WHERE name = ?1")
        .and_then(|mut s| s.query_row(params![name], |r| r.get(0)))
        .map_err(db.sql())?;
    let n = u32::try_from(next).ok().filter(|n| (1..=max).contains(n)).ok_or_else(|| {
        DbError::Conflict(format!("the cluster has given out all {max} {name} numbers; a new control database starts them again"))
    })?;
    tx.prepare_cached("UPDATE counters SET next = next + 1 WHERE name = ?1")
        .and_then(|mut s| s.execute(params![name]))
        .map_err(db.sql())?;
    Ok(n)
}

impl Db {
    /// Records `lab` (its file's `text`), the VM images it uses and its
    /// instances, replacing what was recorded of it, in one transaction: a
    /// control node killed at any instant restarts with the lab as it was
    /// or as it is now, never a mix. Segments and instances whose
    /// definition is unchanged keep their numbers and states; a changed
    /// one is made anew (new number, pending: placed again, capacity
    /// checked again); those the lab no longer has are forgotten.
    ///
    /// # Errors
    /// [`DbError::Conflict`] (a bridge another lab has, numbers used up);
    /// SQLite errors. Nothing is recorded then.
    pub fn put_lab(
        &self,
        lab: &Lab,
        source: &LabSource,
        images: &[ImageRecord],
        specs: &[InstanceSpec],
        now_ms: i64,
    ) -> Result<Deployed, DbError> {
        // The file as written; with the files it names, both as sent.
        let (spec, format) = if source.files.is_empty() {
            (source.text.clone(), FORMAT_TEXT)
        } else {
            (serde_json::to_string(source).map_err(|e| DbError::Conflict(format!("recording the lab: {e}")))?, FORMAT_SOURCE)
        };
        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate).map_err(self.sql())?;
        let big = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for i in images {
            tx.prepare_cached(
                "INSERT INTO images (root, url, virtual_size, boot_bytes, registered_ms, reference, blobs, parents)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT(root) DO UPDATE SET url = excluded.url, reference = excluded.reference, blobs = excluded.blobs,
                 parents = excluded.parents",
            )
            .and_then(|mut s| {
                let parents = (!i.parents.is_empty()).then(|| serde_json::to_string(&i.parents).unwrap_or_default());
                s.execute(params![i.root.to_string(), i.url, big(i.virtual_size), big(i.boot_bytes), now_ms, i.reference, i.blobs, parents])
            })
            .map_err(self.sql())?;
        }
        tx.execute(
            "INSERT INTO labs (name, spec, deployed_ms, format) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, deployed_ms = excluded.deployed_ms, format = excluded.format",
            params![lab.name.as_str(), spec, now_ms, format],
        )
        .map_err(self.sql())?;
        self.put_segments(&tx, lab)?;
        let done = self.put_instances(&tx, lab, specs, now_ms)?;
        tx.commit().map_err(self.sql())?;
        Ok(done)
    }

    /// The lab's segments, numbered: those unchanged keep their numbers.
    fn put_segments(&self, tx: &Transaction<'_>, lab: &Lab) -> Result<(), DbError> {
        let had: Vec<(String, u32, String, String)> = tx
            .prepare_cached("SELECT name, id, bridge, subnet FROM segments WHERE lab = ?1")
            .and_then(|mut s| s.query_map(params![lab.name.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?.collect())
            .map_err(self.sql())?;
        let mut keep = HashSet::new();
        for (name, id, bridge, subnet) in &had {
            let same = lab.segments.iter().any(|s| {
                s.name.as_str() == name
                    && s.subnet.to_string() == *subnet
                    && s.bridge.as_ref().map_or_else(|| names::bridge(*id).to_string(), ToString::to_string) == *bridge
            });
            if same {
                keep.insert(name.clone());
            } else {
                tx.execute("DELETE FROM segments WHERE lab = ?1 AND name = ?2", params![lab.name.as_str(), name]).map_err(self.sql())?;
            }
        }
        for seg in lab.segments.iter().filter(|s| !keep.contains(s.name.as_str())) {
            let id = next_number(tx, self, "segment", names::MAX_SEGMENT)?;
            let bridge = seg.bridge.clone().unwrap_or_else(|| names::bridge(id));
            let other: Option<(String, String)> = tx
                .query_row("SELECT lab, name FROM segments WHERE bridge = ?1", params![bridge.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(self.sql())?;
            if let Some((other_lab, other_seg)) = other {
                return Err(DbError::Conflict(format!(
                    "segment {}: bridge {bridge} is lab {other_lab}'s (segment {other_seg}); a lab's bridges are its own",
                    seg.name
                )));
            }
            tx.execute(
                "INSERT INTO segments (lab, name, id, bridge, subnet) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![lab.name.as_str(), seg.name.as_str(), id, bridge.as_str(), seg.subnet.to_string()],
            )
            .map_err(self.sql())?;
        }
        Ok(())
    }

    fn put_instances(&self, tx: &Transaction<'_>, lab: &Lab, specs: &[InstanceSpec], now_ms: i64) -> Result<Deployed, DbError> {
        let had: HashMap<String, String> = tx
            .prepare_cached("SELECT name, fingerprint FROM instances WHERE lab = ?1")
            .and_then(|mut s| s.query_map(params![lab.name.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            .map_err(self.sql())?;
        let mut done = Deployed::default();
        let mut wanted = HashSet::with_capacity(specs.len());
        for spec in specs {
            wanted.insert(spec.name.as_str());
            match had.get(spec.name.as_str()) {
                Some(f) if *f == spec.fingerprint => {
                    done.kept += 1;
                    continue;
                }
                Some(_) => {
                    // Its history goes with it (ON DELETE CASCADE).
                    tx.prepare_cached("DELETE FROM instances WHERE lab = ?1 AND name = ?2")
                        .and_then(|mut s| s.execute(params![lab.name.as_str(), spec.name.as_str()]))
                        .map_err(self.sql())?;
                    done.recreated += 1;
                }
                None => done.added += 1,
            }
            let uid = next_number(tx, self, "instance", u32::MAX)?;
            tx.prepare_cached(
                "INSERT INTO instances (lab, name, kind, image, cores, memory_bytes, state, uid, fingerprint)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?8)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    spec.lab.as_str(),
                    spec.name.as_str(),
                    kind_str(spec.kind),
                    spec.image.to_string(),
                    spec.cores,
                    i64::try_from(spec.memory_bytes).unwrap_or(i64::MAX),
                    uid,
                    spec.fingerprint
                ])
            })
            .map_err(self.sql())?;
            tx.prepare_cached("INSERT INTO instance_states (lab, name, state, at_ms) VALUES (?1, ?2, 'pending', ?3)")
                .and_then(|mut s| s.execute(params![spec.lab.as_str(), spec.name.as_str(), now_ms]))
                .map_err(self.sql())?;
            // Failed from the start (its image could not be had): never placed.
            if let Some(why) = &spec.failed {
                tx.prepare_cached("UPDATE instances SET state = 'failed', reason = ?3 WHERE lab = ?1 AND name = ?2")
                    .and_then(|mut s| s.execute(params![spec.lab.as_str(), spec.name.as_str(), why]))
                    .map_err(self.sql())?;
                tx.prepare_cached("INSERT INTO instance_states (lab, name, state, at_ms, reason) VALUES (?1, ?2, 'failed', ?3, ?4)")
                    .and_then(|mut s| s.execute(params![spec.lab.as_str(), spec.name.as_str(), now_ms, why]))
                    .map_err(self.sql())?;
            }
        }
        for name in had.keys().filter(|n| !wanted.contains(n.as_str())) {
            tx.prepare_cached("DELETE FROM instances WHERE lab = ?1 AND name = ?2")
                .and_then(|mut s| s.execute(params![lab.name.as_str(), name]))
                .map_err(self.sql())?;
            done.removed += 1;
        }
        Ok(done)
    }

    /// The lab called `name`, as last deployed (its file read again).
    ///
    /// # Errors
    /// SQLite errors, or a row that does not read back.
    pub fn lab(&self, name: &Name) -> Result<Option<Lab>, DbError> {
        let row: Option<(String, i64)> = self
            .conn
            .query_row("SELECT spec, format FROM labs WHERE name = ?1", params![name.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(self.sql())?;
        row.map(|(spec, format)| read_lab(&spec, format).map_err(|e| self.corrupt(format!("lab {name}: {e}")))).transpose()
    }

    /// The lab file `name` was last deployed from (labs deployed by
    /// versions before schema 6: its checked form, as JSON).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn lab_text(&self, name: &Name) -> Result<Option<String>, DbError> {
        let row: Option<(String, i64)> = self
            .conn
            .query_row("SELECT spec, format FROM labs WHERE name = ?1", params![name.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(self.sql())?;
        row.map(|(spec, format)| match format {
            FORMAT_SOURCE => serde_json::from_str::<LabSource>(&spec).map(|s| s.text).map_err(|e| self.corrupt(format!("lab {name}: {e}"))),
            _ => Ok(spec),
        })
        .transpose()
    }

    /// The segments of `lab`, numbered, in name order.
    ///
    /// # Errors
    /// SQLite errors, or a damaged row.
    pub fn segments(&self, lab: &Name) -> Result<Vec<SegmentRow>, DbError> {
        let rows: Vec<(String, u32, String)> = self
            .conn
            .prepare_cached("SELECT name, id, bridge FROM segments WHERE lab = ?1 ORDER BY name")
            .and_then(|mut s| s.query_map(params![lab.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect())
            .map_err(self.sql())?;
        rows.into_iter()
            .map(|(name, id, bridge)| {
                let bad = || self.corrupt(format!("segment {lab}/{name}"));
                Ok(SegmentRow { name: name.parse().map_err(|_| bad())?, id, bridge: bridge.parse().map_err(|_| bad())? })
            })
            .collect()
    }

    /// The names of the labs deployed, sorted.
    ///
    /// # Errors
    /// SQLite errors, or a damaged row.
    pub fn lab_names(&self) -> Result<Vec<Name>, DbError> {
        let mut stmt = self.conn.prepare_cached("SELECT name FROM labs ORDER BY name").map_err(self.sql())?;
        let rows: Vec<String> = stmt.query_map([], |r| r.get(0)).map_err(self.sql())?.collect::<Result<_, _>>().map_err(self.sql())?;
        rows.into_iter().map(|n| n.parse().map_err(|_| self.corrupt(format!("lab name {n:?}")))).collect()
    }

    /// Forgets a lab, its segments and instances, in one transaction;
    /// whether it was there. What nodes still run of it is
    /// [`Db::remaining`] until their agents remove it.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn delete_lab(&self, name: &Name) -> Result<bool, DbError> {
        let tx = Transaction::new_unchecked(&self.conn, TransactionBehavior::Immediate).map_err(self.sql())?;
        tx.execute("DELETE FROM instances WHERE lab = ?1", params![name.as_str()]).map_err(self.sql())?;
        tx.execute("DELETE FROM segments WHERE lab = ?1", params![name.as_str()]).map_err(self.sql())?;
        let n = tx.execute("DELETE FROM labs WHERE name = ?1", params![name.as_str()]).map_err(self.sql())?;
        tx.commit().map_err(self.sql())?;
        Ok(n == 1)
    }

    /// Records what `node` says it runs, replacing what it said before, and
    /// returns what of it is taken: reports of instances ordered to it (by
    /// number) or that it reported before (being removed); whatever else it
    /// claims is ignored. A report of more instances than it could have is
    /// refused whole.
    ///
    /// # Errors
    /// [`DbError::Claims`]; SQLite errors.
    pub fn observe(&self, node: &Name, seen: &[Observed]) -> Result<Vec<Observed>, DbError> {
        let tx = self.conn.unchecked_transaction().map_err(self.sql())?;
        let could: i64 = tx
            .prepare_cached("SELECT (SELECT COUNT(*) FROM instances WHERE node = ?1) + (SELECT COUNT(*) FROM observed WHERE node = ?1)")
            .and_then(|mut s| s.query_row(params![node.as_str()], |r| r.get(0)))
            .map_err(self.sql())?;
        if i64::try_from(seen.len()).unwrap_or(i64::MAX) > could + 64 {
            return Err(DbError::Claims(format!("node {node} reports {} instances; it was ordered or still removes {could}", seen.len())));
        }
        let mut taken = Vec::new();
        for o in seen {
            let ordered = tx
                .prepare_cached("SELECT 1 FROM instances WHERE lab = ?1 AND name = ?2 AND node = ?3 AND uid = ?4")
                .and_then(|mut s| s.exists(params![o.lab.as_str(), o.name.as_str(), node.as_str(), o.uid]))
                .map_err(self.sql())?;
            let known = ordered
                || tx
                    .prepare_cached("SELECT 1 FROM observed WHERE node = ?1 AND lab = ?2 AND name = ?3 AND uid = ?4")
                    .and_then(|mut s| s.exists(params![node.as_str(), o.lab.as_str(), o.name.as_str(), o.uid]))
                    .map_err(self.sql())?;
            if known {
                taken.push(o.clone());
            }
        }
        tx.execute("DELETE FROM observed WHERE node = ?1", params![node.as_str()]).map_err(self.sql())?;
        {
            let mut insert = tx
                .prepare_cached("INSERT OR REPLACE INTO observed (node, lab, name, state, reason, uid) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")
                .map_err(self.sql())?;
            for o in &taken {
                insert
                    .execute(params![node.as_str(), o.lab.as_str(), o.name.as_str(), o.state.as_str(), o.reason, o.uid])
                    .map_err(self.sql())?;
            }
        }
        tx.commit().map_err(self.sql())?;
        Ok(taken)
    }

    /// What nodes last said they run of `lab`.
    ///
    /// # Errors
    /// SQLite errors, or a damaged row.
    pub fn remaining(&self, lab: &Name) -> Result<Vec<Remaining>, DbError> {
        let mut stmt =
            self.conn.prepare("SELECT node, name, state FROM observed WHERE lab = ?1 ORDER BY node, name").map_err(self.sql())?;
        let rows: Vec<(String, String, String)> = stmt
            .query_map(params![lab.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(self.sql())?
            .collect::<Result<_, _>>()
            .map_err(self.sql())?;
        rows.into_iter()
            .map(|(node, name, state)| {
                let bad = || self.corrupt(format!("observed {node}/{name}"));
                Ok(Remaining {
                    node: node.parse().map_err(|_| bad())?,
                    name: name.parse().map_err(|_| bad())?,
                    state: super::instances::parse_state(&state).ok_or_else(bad)?,
                })
            })
            .collect()
    }
}

/// A lab row read back: the file parsed again, or an earlier version's JSON.
fn read_lab(spec: &str, format: i64) -> Result<Lab, String> {
    match format {
        FORMAT_TEXT => Lab::parse(spec).map_err(|e| e.to_string()),
        FORMAT_SOURCE => serde_json::from_str::<LabSource>(spec).map_err(|e| e.to_string())?.parse().map_err(|e| e.to_string()),
        FORMAT_JSON => serde_json::from_str(spec).map_err(|e| e.to_string()),
        other => Err(format!("unknown format {other}")),
    }
}

/// Migration 6 for labs deployed before it: their segments numbered.
pub(super) fn number_segments_of_v5_labs(tx: &Transaction<'_>, path: &Path) -> Result<(), DbError> {
    let sql = |source| DbError::Sqlite { path: path.to_owned(), source };
    let labs: Vec<(String, String)> = tx
        .prepare("SELECT name, spec FROM labs")
        .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
        .map_err(sql)?;
    for (name, spec) in labs {
        let lab = read_lab(&spec, FORMAT_JSON).map_err(|e| DbError::Corrupt { path: path.to_owned(), what: format!("lab {name}: {e}") })?;
        for seg in &lab.segments {
            let next: u32 = tx.query_row("SELECT next FROM counters WHERE name = 'segment'", [], |r| r.get(0)).map_err(sql)?;
            tx.execute("UPDATE counters SET next = next + 1 WHERE name = 'segment'", []).map_err(sql)?;
            let bridge = seg.bridge.clone().unwrap_or_else(|| names::bridge(next));
            tx.execute(
                "INSERT OR IGNORE INTO segments (lab, name, id, bridge, subnet) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, seg.name.as_str(), next, bridge.as_str(), seg.subnet.to_string()],
            )
            .map_err(sql)?;
        }
    }
    Ok(())
}
