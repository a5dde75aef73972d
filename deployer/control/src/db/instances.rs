//! Instances: what labs want, where each runs and the states it went
//! through, moved only as [`InstanceState`] allows.

use std::collections::HashMap;
use std::time::Duration;

use bootcache_api::{InstanceState, Kind, Name, RootDigest};
use rusqlite::{OptionalExtension, params};

use super::{Db, DbError};

/// Which instances a query reads.
#[derive(Clone, Copy)]
enum Which<'a> {
    All,
    Lab(&'a Name),
    Node(&'a Name),
    One(&'a Name, &'a Name),
}

/// One state change of [`Db::set_states`]: lab, instance, the new state,
/// its node (when placing), the reason (when failing).
pub type Move<'a> = (&'a Name, &'a Name, InstanceState, Option<&'a Name>, Option<&'a str>);

/// An instance wanted by a lab.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct InstanceSpec {
    /// Its lab.
    pub lab: Name,
    /// Its name.
    pub name: Name,
    /// VM or container.
    pub kind: Kind,
    /// Its image.
    pub image: RootDigest,
    /// Cores it needs.
    pub cores: u32,
    /// Memory it needs, bytes.
    pub memory_bytes: u64,
    /// A digest of everything of its definition that its node makes it
    /// from (a re-deploy that changes it makes the instance anew).
    #[serde(skip)]
    pub fingerprint: String,
    /// Why it fails as it is recorded (its image could not be had at
    /// deploy); none: it is recorded pending.
    #[serde(skip)]
    pub failed: Option<String>,
}

/// An instance as the control node records it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct InstanceRow {
    /// Its number in the cluster (unique, never reused).
    pub uid: u32,
    /// What the lab wants.
    #[serde(flatten)]
    pub spec: InstanceSpec,
    /// Where it is placed, once it is.
    pub node: Option<Name>,
    /// Where it stands.
    pub state: InstanceState,
    /// Why it failed (or was lost), if it did.
    pub reason: Option<String>,
    /// When it entered each state it went through, in order (ms).
    pub history: Vec<(InstanceState, i64)>,
    /// Whether it should run (false: stopped on request).
    pub running: bool,
}

impl Db {
    /// Moves an instance to `to` (on `node` when placing it), as its state
    /// machine allows, recording when and why.
    ///
    /// # Errors
    /// No such instance, a transition the state machine refuses, SQLite.
    pub fn set_state(
        &self,
        lab: &Name,
        name: &Name,
        to: InstanceState,
        node: Option<&Name>,
        reason: Option<&str>,
        now_ms: i64,
    ) -> Result<(), DbError> {
        self.set_states(&[(lab, name, to, node, reason)], now_ms)
    }

    /// Moves many instances at once, in one transaction (placing a lab);
    /// each as [`Db::set_state`] would.
    ///
    /// # Errors
    /// As [`Db::set_state`]; nothing is moved then.
    pub fn set_states(&self, moves: &[Move<'_>], now_ms: i64) -> Result<(), DbError> {
        let tx = self.conn.unchecked_transaction().map_err(self.sql())?;
        for (lab, name, to, node, reason) in moves {
            let from: Option<String> = tx
                .prepare_cached("SELECT state FROM instances WHERE lab = ?1 AND name = ?2")
                .and_then(|mut s| s.query_row(params![lab.as_str(), name.as_str()], |r| r.get(0)).optional())
                .map_err(self.sql())?;
            let Some(from) = from else { return Err(DbError::NoSuchInstance { lab: (*lab).clone(), name: (*name).clone() }) };
            let from = parse_state(&from).ok_or_else(|| self.corrupt(format!("instance state {from:?}")))?;
            if !from.can_become(*to) {
                return Err(DbError::BadTransition { lab: (*lab).clone(), name: (*name).clone(), from, to: *to });
            }
            tx.prepare_cached("UPDATE instances SET state = ?3, reason = ?5, node = COALESCE(?4, node) WHERE lab = ?1 AND name = ?2")
                .and_then(|mut s| s.execute(params![lab.as_str(), name.as_str(), to.as_str(), node.map(Name::as_str), reason]))
                .map_err(self.sql())?;
            tx.prepare_cached("INSERT INTO instance_states (lab, name, state, at_ms, reason) VALUES (?1, ?2, ?3, ?4, ?5)")
                .and_then(|mut s| s.execute(params![lab.as_str(), name.as_str(), to.as_str(), now_ms, reason]))
                .map_err(self.sql())?;
        }
        tx.commit().map_err(self.sql())
    }

    /// Records why pending instances wait (placement found no room); in one
    /// transaction, writing only what changed.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn note_pending(&self, waiting: &[(&Name, &Name, String)]) -> Result<(), DbError> {
        if waiting.is_empty() {
            return Ok(());
        }
        let tx = self.conn.unchecked_transaction().map_err(self.sql())?;
        for (lab, name, why) in waiting {
            tx.prepare_cached("UPDATE instances SET reason = ?3 WHERE lab = ?1 AND name = ?2 AND state = 'pending' AND reason IS NOT ?3")
                .and_then(|mut s| s.execute(params![lab.as_str(), name.as_str(), why]))
                .map_err(self.sql())?;
        }
        tx.commit().map_err(self.sql())
    }

    /// Whether any instance waits to be placed (one indexed lookup).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn any_pending(&self) -> Result<bool, DbError> {
        self.conn
            .prepare_cached("SELECT 1 FROM instances WHERE state = 'pending' LIMIT 1")
            .and_then(|mut s| s.exists([]))
            .map_err(self.sql())
    }

    /// The instances of `lab`, by name, with their histories.
    ///
    /// # Errors
    /// SQLite errors, or a damaged row.
    pub fn instances(&self, lab: &Name) -> Result<Vec<InstanceRow>, DbError> {
        self.select(Which::Lab(lab), true)
    }

    /// The instances of `lab`, by name, without their histories (what
    /// placement and orders need; one query).
    ///
    /// # Errors
    /// SQLite errors, or a damaged row.
    pub fn instances_brief(&self, lab: &Name) -> Result<Vec<InstanceRow>, DbError> {
        self.select(Which::Lab(lab), false)
    }

    /// Every instance of every lab, without histories.
    ///
    /// # Errors
    /// SQLite errors, or a damaged row.
    pub fn all_instances(&self) -> Result<Vec<InstanceRow>, DbError> {
        self.select(Which::All, false)
    }

    /// The instances placed on `node`, without histories.
    ///
    /// # Errors
    /// SQLite errors, or a damaged row.
    pub fn instances_on(&self, node: &Name) -> Result<Vec<InstanceRow>, DbError> {
        self.select(Which::Node(node), false)
    }

    /// One instance, without its history.
    ///
    /// # Errors
    /// SQLite errors, or a damaged row.
    pub fn instance(&self, lab: &Name, name: &Name) -> Result<Option<InstanceRow>, DbError> {
        Ok(self.select(Which::One(lab, name), false)?.into_iter().next())
    }

    fn select(&self, which: Which<'_>, with_history: bool) -> Result<Vec<InstanceRow>, DbError> {
        const COLUMNS: &str =
            "SELECT lab, name, kind, image, cores, memory_bytes, node, state, reason, desired, uid, fingerprint FROM instances";
        let (sql, args): (String, Vec<&str>) = match which {
            Which::All => (format!("{COLUMNS} ORDER BY lab, name"), vec![]),
            Which::Lab(l) => (format!("{COLUMNS} WHERE lab = ?1 ORDER BY name"), vec![l.as_str()]),
            Which::Node(n) => (format!("{COLUMNS} WHERE node = ?1 ORDER BY lab, name"), vec![n.as_str()]),
            Which::One(l, n) => (format!("{COLUMNS} WHERE lab = ?1 AND name = ?2"), vec![l.as_str(), n.as_str()]),
        };
        let mut stmt = self.conn.prepare_cached(&sql).map_err(self.sql())?;
        type Raw = (String, String, String, String, u32, i64, Option<String>, String, Option<String>, String, Option<u32>, String);
        let rows: Vec<Raw> = stmt
            .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                    r.get(10)?,
                    r.get(11)?,
                ))
            })
            .map_err(self.sql())?
            .collect::<Result<_, _>>()
            .map_err(self.sql())?;
        let mut histories = match (with_history, which) {
            (true, Which::Lab(l)) => self.histories(l)?,
            _ => HashMap::new(),
        };
        let mut out = Vec::with_capacity(rows.len());
        for (lab, name, kind, image, cores, memory, node, state, reason, desired, uid, fingerprint) in rows {
            let bad = |what: &str, v: &str| self.corrupt(format!("instance {what} {v:?}"));
            let lab: Name = lab.parse().map_err(|_| bad("lab", &lab))?;
            let name: Name = name.parse().map_err(|_| bad("name", &name))?;
            let kind = match kind.as_str() {
                "vm" => Kind::Vm,
                "container" => Kind::Container,
                k => return Err(bad("kind", k)),
            };
            let image = image.parse().map_err(|_| bad("image", &image))?;
            let node = node.map(|n| n.parse().map_err(|_| bad("node", &n))).transpose()?;
            let state = parse_state(&state).ok_or_else(|| bad("state", &state))?;
            let uid = uid.ok_or_else(|| bad("number of", name.as_str()))?;
            let history = histories.remove(&name).unwrap_or_default();
            let spec =
                InstanceSpec { lab, name, kind, image, cores, memory_bytes: u64::try_from(memory).unwrap_or(0), fingerprint, failed: None };
            out.push(InstanceRow { uid, spec, node, state, reason, history, running: desired != "stopped" });
        }
        Ok(out)
    }

    /// Every state each instance of `lab` went through, in one query.
    fn histories(&self, lab: &Name) -> Result<HashMap<Name, Vec<(InstanceState, i64)>>, DbError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, state, at_ms FROM instance_states WHERE lab = ?1 ORDER BY name, at_ms, rowid")
            .map_err(self.sql())?;
        let rows = stmt
            .query_map(params![lab.as_str()], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, i64>(2)?)))
            .map_err(self.sql())?;
        let mut out: HashMap<Name, Vec<(InstanceState, i64)>> = HashMap::new();
        for row in rows {
            let (name, state, at) = row.map_err(self.sql())?;
            let name: Name = name.parse().map_err(|_| self.corrupt(format!("instance name {name:?}")))?;
            let state = parse_state(&state).ok_or_else(|| self.corrupt(format!("instance state {state:?}")))?;
            out.entry(name).or_default().push((state, at));
        }
        Ok(out)
    }

    /// Says whether an instance should run (stop and start on request);
    /// whether there is such an instance.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn set_running(&self, lab: &Name, name: &Name, running: bool) -> Result<bool, DbError> {
        let n = self
            .conn
            .execute(
                "UPDATE instances SET desired = ?3 WHERE lab = ?1 AND name = ?2",
                params![lab.as_str(), name.as_str(), if running { "running" } else { "stopped" }],
            )
            .map_err(self.sql())?;
        Ok(n == 1)
    }

    /// Marks every instance on a node that is down as lost; returns them.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn mark_lost(&self, now_ms: i64, interval: Duration) -> Result<Vec<(Name, Name)>, DbError> {
        let down: Vec<Name> = self.nodes(now_ms, interval)?.into_iter().filter(|n| !n.up).map(|n| n.name).collect();
        let mut lost = Vec::new();
        for node in down {
            let mut stmt = self.conn.prepare("SELECT lab, name, state FROM instances WHERE node = ?1").map_err(self.sql())?;
            let rows: Vec<(String, String, String)> = stmt
                .query_map(params![node.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(self.sql())?
                .collect::<Result<_, _>>()
                .map_err(self.sql())?;
            for (lab, name, state) in rows {
                let (Ok(lab), Ok(name), Some(state)) = (lab.parse::<Name>(), name.parse::<Name>(), parse_state(&state)) else {
                    return Err(self.corrupt(format!("instance {lab}/{name}")));
                };
                if state.can_become(InstanceState::Lost) {
                    self.set_state(&lab, &name, InstanceState::Lost, None, Some(&format!("node {node} stopped answering")), now_ms)?;
                    lost.push((lab, name));
                }
            }
        }
        Ok(lost)
    }
}

pub(super) fn kind_str(kind: Kind) -> &'static str {
    match kind {
        Kind::Vm => "vm",
        Kind::Container => "container",
    }
}

pub(super) fn parse_state(s: &str) -> Option<InstanceState> {
    InstanceState::ALL.into_iter().find(|st| st.as_str() == s)
}
