//! The control node's state in SQLite (WAL, foreign keys, numbered schema
//! migrations applied in one transaction each; a database from a newer
//! version is refused rather than misread).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bootcache_api::{InstanceState, Name, RootDigest};
use rusqlite::{Connection, OptionalExtension, params};

/// Errors of the control node's database.
#[remain::sorted]
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// An instance state change its state machine does not allow.
    #[error("instance {lab}/{name} cannot go from {from} to {to}")]
    BadTransition {
        /// Its lab.
        lab: Name,
        /// The instance.
        name: Name,
        /// Its state.
        from: InstanceState,
        /// The state asked for.
        to: InstanceState,
    },
    /// A node claimed more than it may (instances it was never ordered).
    #[error("{0}")]
    Claims(String),
    /// A lab cannot be recorded as it is (a bridge another lab has, no
    /// numbers left...): nothing of it was recorded.
    #[error("{0}")]
    Conflict(String),
    /// A value read back is not what was written (a damaged database).
    #[error("database {path}: {what} is not valid")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What is not valid.
        what: String,
    },
    /// The database was made by a newer version of the control node.
    #[error("database {path} has schema version {found}; this control node knows up to {known}")]
    Newer {
        /// The database file.
        path: PathBuf,
        /// Its version.
        found: i64,
        /// The newest this code knows.
        known: i64,
    },
    /// A node that has joined was asked to join again with the join token
    /// (only its removal, or the administrator, lets it join anew).
    #[error("node {0} has joined already: remove it first (`bootcache control node remove {0}`) to join it again")]
    NodeKnown(Name),
    /// A node that is up was asked to join again (from elsewhere, or by
    /// someone without its credential).
    #[error("node {0} is up and has joined already: remove it first (`bootcache control node remove {0}`) to join it again")]
    NodeUp(Name),
    /// No such instance.
    #[error("no instance {lab}/{name}")]
    NoSuchInstance {
        /// Its lab.
        lab: Name,
        /// The instance.
        name: Name,
    },
    /// A node that never registered sent a heartbeat.
    #[error("node {0} is not registered")]
    NoSuchNode(Name),
    /// SQLite failed.
    #[error("database {path}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
}

/// The schema, one migration a version; applied in order, never edited
/// once released (add a new one instead).
const MIGRATIONS: &[&str] = &[
    // 1: nodes, what they cache, images.
    "CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        cores INTEGER NOT NULL DEFAULT 0,
        memory_bytes INTEGER NOT NULL DEFAULT 0,
        running INTEGER NOT NULL DEFAULT 0,
        registered_ms INTEGER NOT NULL,
        heartbeat_ms INTEGER
    );
    CREATE TABLE images (
        root TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        virtual_size INTEGER NOT NULL,
        boot_bytes INTEGER NOT NULL,
        registered_ms INTEGER NOT NULL
    );
    CREATE TABLE node_caches (
        node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        root TEXT NOT NULL,
        boot_cached_bytes INTEGER NOT NULL,
        PRIMARY KEY (node, root)
    );",
    // 2: instances and the states they went through.
    "CREATE TABLE instances (
        lab TEXT NOT NULL,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        image TEXT NOT NULL,
        cores INTEGER NOT NULL,
        memory_bytes INTEGER NOT NULL,
        node TEXT REFERENCES nodes(name),
        state TEXT NOT NULL,
        reason TEXT,
        PRIMARY KEY (lab, name)
    );
    CREATE TABLE instance_states (
        lab TEXT NOT NULL,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        at_ms INTEGER NOT NULL,
        reason TEXT,
        FOREIGN KEY (lab, name) REFERENCES instances(lab, name) ON DELETE CASCADE
    );
    CREATE INDEX instance_states_by_instance ON instance_states (lab, name, at_ms);",
    // 3: labs as deployed (their checked lab file), and what each node
    // last said it runs (what a destroyed lab leaves until agents remove it).
    "CREATE TABLE labs (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        deployed_ms INTEGER NOT NULL
    );
    CREATE TABLE observed (
        node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        lab TEXT NOT NULL,
        name TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        PRIMARY KEY (node, lab, name)
    );",
    // 4: whether an instance should run (stopped and started on request).
    "ALTER TABLE instances ADD COLUMN desired TEXT NOT NULL DEFAULT 'running';",
    // 5: what every heartbeat asks, indexed (labs of 10,000 instances).
    "CREATE INDEX instances_by_node ON instances (node);
     CREATE INDEX instances_by_state ON instances (state);",
    // 6: identity and ownership. Every instance and segment gets a number
    // of the cluster's own (never reused; what nodes call them is derived
    // from it), an instance the fingerprint of its definition (a changed
    // one is recreated), a lab its file's text (format 2; 1 is the JSON
    // of earlier versions), each node a credential of its own and the
    // resources it joined with; what nodes report carries the number.
    "CREATE TABLE counters (name TEXT PRIMARY KEY, next INTEGER NOT NULL);
     ALTER TABLE instances ADD COLUMN uid INTEGER;
     ALTER TABLE instances ADD COLUMN fingerprint TEXT NOT NULL DEFAULT '';
     UPDATE instances SET uid = rowid;
     CREATE UNIQUE INDEX instances_by_uid ON instances (uid);
     INSERT INTO counters (name, next) VALUES ('instance', (SELECT COALESCE(MAX(uid), 0) + 1 FROM instances)), ('segment', 1);
     ALTER TABLE labs ADD COLUMN format INTEGER NOT NULL DEFAULT 1;
     CREATE TABLE segments (
        lab TEXT NOT NULL REFERENCES labs(name) ON DELETE CASCADE,
        name TEXT NOT NULL,
        id INTEGER NOT NULL UNIQUE,
        bridge TEXT NOT NULL UNIQUE,
        subnet TEXT NOT NULL,
        PRIMARY KEY (lab, name)
     );
     CREATE TABLE observed_by_number (
        node TEXT NOT NULL REFERENCES nodes(name) ON DELETE CASCADE,
        lab TEXT NOT NULL,
        name TEXT NOT NULL,
        uid INTEGER NOT NULL,
        state TEXT NOT NULL,
        reason TEXT,
        PRIMARY KEY (node, lab, name, uid)
     );
     INSERT INTO observed_by_number (node, lab, name, uid, state, reason) SELECT node, lab, name, 0, state, reason FROM observed;
     DROP TABLE observed;
     ALTER TABLE observed_by_number RENAME TO observed;
     CREATE TABLE node_credentials (
        node TEXT PRIMARY KEY REFERENCES nodes(name) ON DELETE CASCADE,
        secret TEXT NOT NULL,
        cores INTEGER NOT NULL,
        memory_bytes INTEGER NOT NULL
     );",
    // 7: whole files (tarballs, disks) checked by digest: the first digest
    // a node reports for a file's key is the cluster's, and only nodes whose
    // copy has it are sources for others.
    "CREATE TABLE file_digests (
        key TEXT PRIMARY KEY,
        digest TEXT NOT NULL,
        node TEXT NOT NULL,
        at_ms INTEGER NOT NULL
     );
     ALTER TABLE node_caches ADD COLUMN digest TEXT;",
    // 8: a VM image read from a registry: the reference it was resolved
    // to (pinned to its manifest's digest), for inspect.
    "ALTER TABLE images ADD COLUMN reference TEXT;",
    // 9: a container image read from a registry: its config and layers
    // (JSON, as orders carry them), keyed by its manifest's digest.
    "ALTER TABLE images ADD COLUMN blobs TEXT;",
    // 10: a layered VM image's parents (JSON: [root digest, boot bytes]
    // each, its parent first), what placement and source planning know a
    // family by.
    "ALTER TABLE images ADD COLUMN parents TEXT;",
];

/// The most cores a node may claim (whatever it says, placement counts no
/// more).
pub const MAX_NODE_CORES: u32 = 4096;
/// The most memory a node may claim, bytes.
pub const MAX_NODE_MEMORY: u64 = 64 << 40;

pub use bootcache_api::agent::Heartbeat;

/// A node as the control node sees it (what `GET /nodes` shows).
pub use bootcache_api::control::NodeView as NodeRow;

/// Heartbeats a node may miss before it is down.
pub const MISSED_HEARTBEATS: u32 = 3;

/// The control node's database.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
    path: PathBuf,
    /// Silence counts from here (ms): a control node that was down does not
    /// hold its own downtime against the nodes ([`Db::watch_from`]).
    watch_from_ms: i64,
}

impl Db {
    /// Opens (or makes) the database at `path` and brings its schema up to
    /// date.
    ///
    /// # Errors
    /// SQLite errors, or a database from a newer version.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let sql = |source| DbError::Sqlite { path: path.to_owned(), source };
        private(path).map_err(|e| sql(rusqlite::Error::ToSqlConversionFailure(Box::new(e))))?;
        let conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(sql)?;
        conn.pragma_update(None, "foreign_keys", "ON").map_err(sql)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(sql)?;
        let mut db = Db { conn, path: path.to_owned(), watch_from_ms: 0 };
        db.migrate()?;
        Ok(db)
    }

    pub(super) fn sql(&self) -> impl Fn(rusqlite::Error) -> DbError + '_ {
        |source| DbError::Sqlite { path: self.path.clone(), source }
    }

    /// Counts nodes' silence from `ms` on: a control node that restarts calls
    /// this with its start time, so nodes get their three heartbeats to
    /// reach it again before they are down (and their instances lost).
    pub fn watch_from(&mut self, ms: i64) {
        self.watch_from_ms = ms;
    }

    /// The schema version of the open database.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn version(&self) -> Result<i64, DbError> {
        self.conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(self.sql())
    }

    fn migrate(&mut self) -> Result<(), DbError> {
        // Databases made before the files were private.
        for f in [self.path.clone(), wal(&self.path, "-wal"), wal(&self.path, "-shm")] {
            let _ = std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        }
        let known = MIGRATIONS.len() as i64;
        let found = self.version()?;
        if found > known {
            return Err(DbError::Newer { path: self.path.clone(), found, known });
        }
        for (i, m) in MIGRATIONS.iter().enumerate().skip(usize::try_from(found).unwrap_or(0)) {
            let path = self.path.clone();
            let sql = |source| DbError::Sqlite { path: path.clone(), source };
            let tx = self.conn.transaction().map_err(sql)?;
            tx.execute_batch(m).map_err(sql)?;
            if i + 1 == 6 {
                labs::number_segments_of_v5_labs(&tx, &self.path)?;
            }
            tx.pragma_update(None, "user_version", i as i64 + 1).map_err(sql)?;
            tx.commit().map_err(sql)?;
            tracing::info!(version = i + 1, "database schema migrated");
        }
        Ok(())
    }

    /// Registers `node` (its agent at `address`), or updates its address.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn register_node(&self, node: &Name, address: &str, now_ms: i64) -> Result<(), DbError> {
        self.conn
            .execute(
                "INSERT INTO nodes (name, address, registered_ms) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET address = excluded.address",
                params![node.as_str(), address, now_ms],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    /// Records a heartbeat of `node`: its resources and what it caches.
    ///
    /// # Errors
    /// A node that never registered; SQLite errors.
    pub fn heartbeat(&self, node: &Name, beat: &Heartbeat, now_ms: i64) -> Result<(), DbError> {
        let tx = self.conn.unchecked_transaction().map_err(self.sql())?;
        // What it claims is bounded by what it joined with.
        let joined: Option<(u32, i64)> = tx
            .prepare_cached("SELECT cores, memory_bytes FROM node_credentials WHERE node = ?1")
            .and_then(|mut s| s.query_row(params![node.as_str()], |r| Ok((r.get(0)?, r.get(1)?))).optional())
            .map_err(self.sql())?;
        let (max_cores, max_memory) = joined.map_or((MAX_NODE_CORES, MAX_NODE_MEMORY), |(c, m)| (c, u64::try_from(m).unwrap_or(0)));
        let cores = beat.cores.min(max_cores).min(MAX_NODE_CORES);
        let memory = beat.memory_bytes.min(max_memory).min(MAX_NODE_MEMORY);
        let updated = tx
            .execute(
                "UPDATE nodes SET cores = ?2, memory_bytes = ?3, running = ?4, heartbeat_ms = ?5 WHERE name = ?1",
                params![node.as_str(), cores, i64::try_from(memory).unwrap_or(i64::MAX), beat.running, now_ms],
            )
            .map_err(self.sql())?;
        if updated == 0 {
            return Err(DbError::NoSuchNode(node.clone()));
        }
        tx.execute("DELETE FROM node_caches WHERE node = ?1", params![node.as_str()]).map_err(self.sql())?;
        for (root, bytes) in &beat.caches {
            tx.prepare_cached("INSERT OR IGNORE INTO node_caches (node, root, boot_cached_bytes) VALUES (?1, ?2, ?3)")
                .and_then(|mut s| s.execute(params![node.as_str(), root.to_string(), i64::try_from(*bytes).unwrap_or(i64::MAX)]))
                .map_err(self.sql())?;
        }
        for (key, digest) in &beat.files {
            let (key, digest) = (key.to_string(), digest.to_string());
            tx.prepare_cached("UPDATE node_caches SET digest = ?3 WHERE node = ?1 AND root = ?2")
                .and_then(|mut s| s.execute(params![node.as_str(), key, digest]))
                .map_err(self.sql())?;
            // The first digest heard is the cluster's.
            tx.prepare_cached("INSERT OR IGNORE INTO file_digests (key, digest, node, at_ms) VALUES (?1, ?2, ?3, ?4)")
                .and_then(|mut s| s.execute(params![key, digest, node.as_str(), now_ms]))
                .map_err(self.sql())?;
        }
        tx.commit().map_err(self.sql())
    }

    /// Every node, up or down as of `now_ms` given the agents' heartbeat
    /// `interval` (down after [`MISSED_HEARTBEATS`] missed ones), by name.
    ///
    /// # Errors
    /// SQLite errors, or a damaged row.
    pub fn nodes(&self, now_ms: i64, interval: Duration) -> Result<Vec<NodeRow>, DbError> {
        let mut stmt = self
            .conn
            .prepare("SELECT name, address, cores, memory_bytes, running, heartbeat_ms FROM nodes ORDER BY name")
            .map_err(self.sql())?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, u32>(4)?,
                    r.get::<_, Option<i64>>(5)?,
                ))
            })
            .map_err(self.sql())?;
        let mut out = Vec::new();
        for row in rows {
            let (name, address, cores, memory, running, heartbeat_ms) = row.map_err(self.sql())?;
            let name: Name = name.parse().map_err(|_| self.corrupt(format!("node name {name:?}")))?;
            let last = match heartbeat_ms {
                None => None,
                Some(_) => Some(Heartbeat {
                    cores,
                    memory_bytes: u64::try_from(memory).unwrap_or(0),
                    running,
                    caches: self.caches_of(&name)?,
                    files: Vec::new(),
                    instances: Vec::new(),
                }),
            };
            let up = self.is_up(heartbeat_ms, now_ms, interval);
            out.push(NodeRow { name, address, last, heartbeat_ms, up });
        }
        Ok(out)
    }

    /// Every node's address and whether it is up, without what it caches
    /// (one query; what each heartbeat's orders need).
    ///
    /// # Errors
    /// SQLite errors, or a damaged row.
    pub fn liveness(&self, now_ms: i64, interval: Duration) -> Result<Vec<(Name, String, bool)>, DbError> {
        let mut stmt = self.conn.prepare_cached("SELECT name, address, heartbeat_ms FROM nodes ORDER BY name").map_err(self.sql())?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, Option<i64>>(2)?)))
            .map_err(self.sql())?;
        let mut out = Vec::new();
        for row in rows {
            let (name, address, hb) = row.map_err(self.sql())?;
            let name: Name = name.parse().map_err(|_| self.corrupt(format!("node name {name:?}")))?;
            let up = self.is_up(hb, now_ms, interval);
            out.push((name, address, up));
        }
        Ok(out)
    }

    /// Whether a node whose last heartbeat came at `heartbeat_ms` is up:
    /// heard from within [`MISSED_HEARTBEATS`] intervals, silence counted
    /// from [`Db::watch_from`] at the earliest.
    fn is_up(&self, heartbeat_ms: Option<i64>, now_ms: i64, interval: Duration) -> bool {
        let limit = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX).saturating_mul(i64::from(MISSED_HEARTBEATS));
        heartbeat_ms.is_some_and(|t| now_ms.saturating_sub(t.max(self.watch_from_ms)) <= limit)
    }

    fn caches_of(&self, node: &Name) -> Result<Vec<(RootDigest, u64)>, DbError> {
        let mut stmt =
            self.conn.prepare("SELECT root, boot_cached_bytes FROM node_caches WHERE node = ?1 ORDER BY root").map_err(self.sql())?;
        let rows = stmt.query_map(params![node.as_str()], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).map_err(self.sql())?;
        let mut out = Vec::new();
        for row in rows {
            let (root, bytes) = row.map_err(self.sql())?;
            let root = root.parse().map_err(|_| self.corrupt(format!("root digest {root:?}")))?;
            out.push((root, u64::try_from(bytes).unwrap_or(0)));
        }
        Ok(out)
    }

    /// The nodes that cache `root`, with the boot-segment bytes each holds,
    /// most first (what cache-aware placement and source planning ask).
    ///
    /// # Errors
    /// SQLite errors, or a damaged row.
    pub fn holders(&self, root: &RootDigest) -> Result<Vec<(Name, u64)>, DbError> {
        // A whole file's holder counts only if its copy has the cluster's digest.
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT nc.node, nc.boot_cached_bytes FROM node_caches nc LEFT JOIN file_digests fd ON fd.key = nc.root
                 WHERE nc.root = ?1 AND (fd.digest IS NULL OR nc.digest = fd.digest) ORDER BY nc.boot_cached_bytes DESC, nc.node",
            )
            .map_err(self.sql())?;
        let rows = stmt.query_map(params![root.to_string()], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).map_err(self.sql())?;
        let mut out = Vec::new();
        for row in rows {
            let (node, bytes) = row.map_err(self.sql())?;
            let node = node.parse().map_err(|_| self.corrupt(format!("node name {node:?}")))?;
            out.push((node, u64::try_from(bytes).unwrap_or(0)));
        }
        Ok(out)
    }

    /// Registers an image (its container at `url`), or updates its URL.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn register_image(&self, root: &RootDigest, url: &str, virtual_size: u64, boot_bytes: u64, now_ms: i64) -> Result<(), DbError> {
        let big = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.conn
            .execute(
                "INSERT INTO images (root, url, virtual_size, boot_bytes, registered_ms) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(root) DO UPDATE SET url = excluded.url",
                params![root.to_string(), url, big(virtual_size), big(boot_bytes), now_ms],
            )
            .map_err(self.sql())?;
        Ok(())
    }

    /// The digest the cluster knows for the whole file of `key` (the first
    /// a node reported), if any.
    ///
    /// # Errors
    /// SQLite errors, or a damaged row.
    pub fn file_digest(&self, key: &RootDigest) -> Result<Option<RootDigest>, DbError> {
        let d: Option<String> = self
            .conn
            .prepare_cached("SELECT digest FROM file_digests WHERE key = ?1")
            .and_then(|mut s| s.query_row(params![key.to_string()], |r| r.get(0)).optional())
            .map_err(self.sql())?;
        d.map(|d| d.parse().map_err(|_| self.corrupt(format!("digest of file {key}")))).transpose()
    }

    /// The registry reference (pinned to a manifest digest) image `root`
    /// was last resolved from, if it came from a registry.
    ///
    /// # Errors
    /// SQLite.
    pub fn image_reference(&self, root: &RootDigest) -> Result<Option<String>, DbError> {
        self.conn
            .query_row("SELECT reference FROM images WHERE root = ?1", params![root.to_string()], |r| r.get::<_, Option<String>>(0))
            .optional()
            .map(Option::flatten)
            .map_err(self.sql())
    }

    /// The config and layers (JSON) of the registry container image of
    /// key `root` (its manifest's digest), as resolved at deploy.
    ///
    /// # Errors
    /// SQLite.
    pub fn image_blobs(&self, root: &RootDigest) -> Result<Option<String>, DbError> {
        self.conn
            .query_row("SELECT blobs FROM images WHERE root = ?1", params![root.to_string()], |r| r.get::<_, Option<String>>(0))
            .optional()
            .map(Option::flatten)
            .map_err(self.sql())
    }

    /// An image's layers: itself, then its parents (the base last), each
    /// with its boot segment's bytes; an image not registered, none.
    ///
    /// # Errors
    /// SQLite errors, or a damaged row.
    pub fn image_layers(&self, root: &RootDigest) -> Result<Vec<(RootDigest, u64)>, DbError> {
        let row: Option<(i64, Option<String>)> = self
            .conn
            .prepare_cached("SELECT boot_bytes, parents FROM images WHERE root = ?1")
            .and_then(|mut s| s.query_row(params![root.to_string()], |r| Ok((r.get(0)?, r.get(1)?))).optional())
            .map_err(self.sql())?;
        let Some((boot_bytes, parents)) = row else { return Ok(Vec::new()) };
        let mut out = vec![(*root, u64::try_from(boot_bytes).unwrap_or(0))];
        if let Some(parents) = parents {
            let parents: Vec<(RootDigest, u64)> =
                serde_json::from_str(&parents).map_err(|e| self.corrupt(format!("parents of image {root}: {e}")))?;
            out.extend(parents);
        }
        Ok(out)
    }

    /// The URL an image was registered with.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn image_url(&self, root: &RootDigest) -> Result<Option<String>, DbError> {
        self.conn
            .query_row("SELECT url FROM images WHERE root = ?1", params![root.to_string()], |r| r.get(0))
            .optional()
            .map_err(self.sql())
    }

    /// Registers `join` as a node with the credential whose BLAKE3 digest is
    /// `secret` (hex). A node that has a credential already is not taken
    /// over: never while it is up, and when it is down only by the
    /// administrator (`replace`); otherwise it joins again after
    /// `remove_node`.
    ///
    /// # Errors
    /// [`DbError::NodeUp`], [`DbError::NodeKnown`], SQLite errors.
    pub fn join(
        &self,
        join: &bootcache_api::agent::Join,
        secret: &str,
        replace: bool,
        now_ms: i64,
        interval: Duration,
    ) -> Result<(), DbError> {
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate).map_err(self.sql())?;
        let known: Option<(Option<i64>, bool)> = tx
            .query_row(
                "SELECT heartbeat_ms, EXISTS (SELECT 1 FROM node_credentials WHERE node = ?1) FROM nodes WHERE name = ?1",
                params![join.name.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(self.sql())?;
        if let Some((heartbeat_ms, true)) = known {
            if self.is_up(heartbeat_ms, now_ms, interval) {
                return Err(DbError::NodeUp(join.name.clone()));
            }
            if !replace {
                return Err(DbError::NodeKnown(join.name.clone()));
            }
        }
        tx.execute(
            "INSERT INTO nodes (name, address, registered_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT(name) DO UPDATE SET address = excluded.address, registered_ms = excluded.registered_ms",
            params![join.name.as_str(), join.address, now_ms],
        )
        .map_err(self.sql())?;
        tx.execute(
            "INSERT OR REPLACE INTO node_credentials (node, secret, cores, memory_bytes) VALUES (?1, ?2, ?3, ?4)",
            params![
                join.name.as_str(),
                secret,
                join.cores.min(MAX_NODE_CORES),
                i64::try_from(join.memory_bytes.min(MAX_NODE_MEMORY)).unwrap_or(i64::MAX)
            ],
        )
        .map_err(self.sql())?;
        tx.commit().map_err(self.sql())
    }

    /// The BLAKE3 digest (hex) of `node`'s credential, if it joined with one.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn node_secret(&self, node: &Name) -> Result<Option<String>, DbError> {
        self.conn
            .prepare_cached("SELECT secret FROM node_credentials WHERE node = ?1")
            .and_then(|mut s| s.query_row(params![node.as_str()], |r| r.get(0)).optional())
            .map_err(self.sql())
    }

    /// Removes `node`: its instances go back to pending (placed again
    /// elsewhere, or on it once it joins again if pinned), what it cached
    /// and reported is forgotten, and its credential no longer works.
    /// Whether it was there.
    ///
    /// # Errors
    /// SQLite errors.
    pub fn remove_node(&self, node: &Name, now_ms: i64) -> Result<bool, DbError> {
        let tx = rusqlite::Transaction::new_unchecked(&self.conn, rusqlite::TransactionBehavior::Immediate).map_err(self.sql())?;
        let rows: Vec<(String, String, String)> = tx
            .prepare("SELECT lab, name, state FROM instances WHERE node = ?1")
            .and_then(|mut s| s.query_map(params![node.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect())
            .map_err(self.sql())?;
        let why = format!("node {node} was removed");
        for (lab, name, state) in rows {
            let state = instances::parse_state(&state).ok_or_else(|| self.corrupt(format!("instance state {state:?}")))?;
            let mut steps = Vec::new();
            if state.can_become(InstanceState::Lost) {
                steps.push(InstanceState::Lost);
            }
            if state != InstanceState::Pending {
                steps.push(InstanceState::Pending);
            }
            for to in steps {
                tx.execute(
                    "INSERT INTO instance_states (lab, name, state, at_ms, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![lab, name, to.as_str(), now_ms, why],
                )
                .map_err(self.sql())?;
            }
            tx.execute(
                "UPDATE instances SET node = NULL, state = 'pending', reason = ?3 WHERE lab = ?1 AND name = ?2",
                params![lab, name, why],
            )
            .map_err(self.sql())?;
        }
        let n = tx.execute("DELETE FROM nodes WHERE name = ?1", params![node.as_str()]).map_err(self.sql())?;
        tx.commit().map_err(self.sql())?;
        Ok(n == 1)
    }

    pub(super) fn corrupt(&self, what: String) -> DbError {
        DbError::Corrupt { path: self.path.clone(), what }
    }
}

/// Makes `path` (and its WAL and shared-memory files, which SQLite makes
/// with the database's mode) mode 0600 before SQLite opens it: it holds
/// node credentials' digests and what labs are.
fn private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn wal(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

mod instances;
mod labs;
#[cfg(test)]
mod tests;

pub use instances::{InstanceRow, InstanceSpec, Move};
pub use labs::{Deployed, ImageRecord, Remaining, SegmentRow};
