//! Labs as deployed, and what nodes say they run.

use bootcache_api::agent::Observed;
use bootcache_api::{InstanceState, Lab, Name};
use rusqlite::{OptionalExtension, params};

use super::{Db, DbError};

/// Something of a lab a node still runs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Remaining {
    /// The node.
    pub node: Name,
    /// The instance.
    pub name: Name,
    /// What the node said of it.
    pub state: InstanceState,
}

impl Db {
    /// Records `lab` as deployed (replacing an earlier version of it).
    ///
    /// # Errors
    /// SQLite errors.
    pub fn put_lab(&self, lab: &Lab, now_ms: i64) -> Result<(), DbError> {
        let spec = serde_json::to_string(lab).map_err(|e| self.corrupt(format!("lab {}: {e}", lab.name)))?;
        self.conn
            .execute(
                "INSERT INTO labs (name, spec, deployed_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET spec = excluded.spec, deployed_ms = excluded.deployed_ms",
                params![lab.name.as_str(), spec, now_ms],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    /// The lab called `name`, as last deployed.
    ///
    /// # Errors
    /// SQLite errors, or a damaged row.
    pub fn lab(&self, name: &Name) -> Result<Option<Lab>, DbError> {
        let spec: Option<String> = self
            .conn
            .query_row("SELECT spec FROM labs WHERE name = ?1", params![name.as_str()], |r| r.get(0))
            .optional()
            .map_err(self.sql())?;
        spec.map(|s| serde_json::from_str(&s).map_err(|e| self.corrupt(format!("lab {name}: {e}")))).transpose()
    }

    /// Every lab deployed, by name.
    ///
    /// # Errors
    /// SQLite errors, or a damaged row.
    pub fn labs(&self) -> Result<Vec<Lab>, DbError> {
        let mut stmt = self.conn.prepare("SELECT name, spec FROM labs ORDER BY name").map_err(self.sql())?;
        let rows: Vec<(String, String)> =
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(self.sql())?.collect::<Result<_, _>>().map_err(self.sql())?;
        rows.into_iter().map(|(n, s)| serde_json::from_str(&s).map_err(|e| self.corrupt(format!("lab {n}: {e}")))).collect()
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

    /// Forgets a lab and its instances; whether it was there. What nodes
    /// still run of it is [`Db::remaining`] until their agents remove it.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn delete_lab(&self, name: &Name) -> Result<bool, DbError> {
        let tx = self.conn.unchecked_transaction().map_err(self.sql())?;
        tx.execute("DELETE FROM instances WHERE lab = ?1", params![name.as_str()]).map_err(self.sql())?;
        let n = tx.execute("DELETE FROM labs WHERE name = ?1", params![name.as_str()]).map_err(self.sql())?;
        tx.commit().map_err(self.sql())?;
        Ok(n == 1)
    }

    /// Forgets the instances of `lab` whose names are not in `keep` (a lab
    /// deployed again without them); returns how many.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn forget_instances_except(&self, lab: &Name, keep: &[Name]) -> Result<usize, DbError> {
        let keep: std::collections::HashSet<&Name> = keep.iter().collect();
        let mut gone = 0;
        for row in self.instances_brief(lab)? {
            if !keep.contains(&row.spec.name) {
                gone += self
                    .conn
                    .execute("DELETE FROM instances WHERE lab = ?1 AND name = ?2", params![lab.as_str(), row.spec.name.as_str()])
                    .map_err(self.sql())?;
            }
        }
        Ok(gone)
    }

    /// Records what `node` says it runs, replacing what it said before.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn observe(&self, node: &Name, seen: &[Observed]) -> Result<(), DbError> {
        let tx = self.conn.unchecked_transaction().map_err(self.sql())?;
        tx.execute("DELETE FROM observed WHERE node = ?1", params![node.as_str()]).map_err(self.sql())?;
        {
            let mut insert = tx
                .prepare_cached("INSERT OR REPLACE INTO observed (node, lab, name, state, reason) VALUES (?1, ?2, ?3, ?4, ?5)")
                .map_err(self.sql())?;
            for o in seen {
                insert.execute(params![node.as_str(), o.lab.as_str(), o.name.as_str(), o.state.as_str(), o.reason]).map_err(self.sql())?;
            }
        }
        tx.commit().map_err(self.sql())
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
