//! The control node's state: its database and what it keeps in memory
//! beside it (labs as deployed, expanded; where each lab's instances are),
//! changed only under the database's lock, so the two never disagree.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bootcache_api::Name;
use bootcache_delivery::remote::RetryPolicy;

use crate::db::Db;
use crate::deploy::{LabView, Members};

/// A control node: its database, its settings and what it keeps in memory.
pub struct Control {
    db: Mutex<Db>,
    /// How often agents send heartbeats (a node is down after three missed).
    pub heartbeat: Duration,
    /// How the control node reaches stores to read image headers.
    pub retry: RetryPolicy,
    /// Virtual CPUs placed per core of a node (lab instances rarely keep a
    /// core busy; OpenStack's default, 16, is this one's).
    pub cpu_overcommit: u32,
    /// How placement chooses among nodes.
    pub policy: crate::plan::Policy,
    /// How many nodes one node serves an image to (1: a chain; 0: chosen
    /// by how many fetch it, [`crate::plan::auto_fan_out`]).
    pub fan_out: usize,
    /// Whether nodes fetch VM images from each other (false: every node
    /// from the store, kept to compare with).
    pub peers: bool,
    /// Time a client has to send a request's body ([`crate::api::BODY_TIMEOUT`]).
    pub body_timeout: Duration,
    /// Credentials for registries, in Docker's `config.json` format (none:
    /// anonymous).
    pub registry_config: Option<std::path::PathBuf>,
    /// Registries (`HOST:PORT`) spoken to over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Labs as deployed, expanded (changed under the database's lock).
    pub(crate) views: Mutex<HashMap<Name, Arc<LabView>>>,
    /// Where each lab's instances are, as of a placement generation.
    pub(crate) members: Mutex<HashMap<Name, (u64, Arc<Members>)>>,
    /// Bumped whenever placement changes.
    pub(crate) generation: AtomicU64,
    /// Each lab's deploys and destroys, counted: a deploy records its lab
    /// only if none other of that lab was recorded since it began, so a
    /// destroyed lab does not come back and a slow deploy does not undo a
    /// later one (changed under the database's lock).
    pub(crate) epochs: Mutex<HashMap<Name, u64>>,
    /// Tasks for nodes (`bootcache exec`, `logs`).
    pub(crate) tasks: Mutex<crate::tasks::Tasks>,
    /// One registry client per registry, made on first use from the two
    /// fields above and kept (with the tokens it took) for later deploys.
    pub(crate) registries: std::sync::OnceLock<bootcache_registry::Clients>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("heartbeat", &self.heartbeat).finish_non_exhaustive()
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

pub(crate) fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Control {
    /// A control node on `db`.
    pub fn new(mut db: Db, heartbeat: Duration) -> Arc<Control> {
        db.watch_from(now_ms());
        Arc::new(Control {
            db: Mutex::new(db),
            heartbeat,
            retry: RetryPolicy::default(),
            cpu_overcommit: 16,
            policy: crate::plan::Policy::CacheAware,
            fan_out: 0,
            peers: true,
            body_timeout: crate::api::BODY_TIMEOUT,
            registry_config: None,
            insecure_registries: Vec::new(),
            views: Mutex::default(),
            members: Mutex::default(),
            generation: AtomicU64::new(0),
            epochs: Mutex::default(),
            tasks: Mutex::default(),
            registries: std::sync::OnceLock::new(),
        })
    }

    /// The client of `reference`'s registry, with its credentials (the
    /// file is read when a registry is first spoken to; the client and its
    /// tokens are kept for later deploys).
    ///
    /// # Errors
    /// A credentials file that cannot be read.
    pub(crate) fn registry_client(
        &self,
        reference: &bootcache_api::reference::Reference,
    ) -> Result<bootcache_registry::Registry, bootcache_registry::RegistryError> {
        self.registries
            .get_or_init(|| bootcache_registry::Clients::new(self.registry_config.clone(), self.insecure_registries.clone()))
            .get(&reference.registry)
    }

    /// The database (held briefly: every call is a few SQLite statements).
    pub fn db(&self) -> MutexGuard<'_, Db> {
        locked(&self.db)
    }

    /// How many deploys and destroys of `lab` were recorded.
    pub(crate) fn epoch(&self, lab: &Name) -> u64 {
        locked(&self.epochs).get(lab).copied().unwrap_or(0)
    }

    /// One more deploy or destroy of `lab` recorded (call holding the database).
    pub(crate) fn bump_epoch(&self, lab: &Name) {
        *locked(&self.epochs).entry(lab.clone()).or_insert(0) += 1;
    }

    /// Placement changed (instances placed, lost, forgotten): what
    /// [`Control::members`](crate::deploy) keeps is recomputed on next use.
    pub(crate) fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Marks the instances of nodes that stopped answering as lost, every
    /// heartbeat interval, until the task is dropped.
    pub async fn watch_nodes(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.heartbeat).await;
            let me = Arc::clone(&self);
            let marked = tokio::task::spawn_blocking(move || {
                let db = me.db();
                let lost = db.mark_lost(now_ms(), me.heartbeat);
                // Under the database's lock, like every change of placement.
                if lost.as_ref().is_ok_and(|l| !l.is_empty()) {
                    me.changed();
                }
                lost
            })
            .await;
            match marked {
                Ok(Ok(lost)) if !lost.is_empty() => {
                    tracing::warn!(count = lost.len(), "instances lost with their nodes");
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "cannot check the nodes"),
                Err(e) => tracing::error!(error = %e, "checking the nodes failed"),
            }
        }
    }
}
