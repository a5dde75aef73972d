//! The control node of a bootcache deployment: what nodes there are and
//! what they cache, which images exist, which instances are wanted and
//! where they run, kept in an SQLite database on disk that survives
//! restarts.
//!
//! ```text
//!   agents ──heartbeat──► Db (nodes, node caches) ──► placement, source planning
//!   lab    ──deploy─────► Db (images, instances, tasks) ──► orders to agents
//! ```
//!
//! ```
//! use std::time::Duration;
//! use bootcache_control::db::{Db, Heartbeat};
//!
//! let dir = tempfile::tempdir()?;
//! let db = Db::open(&dir.path().join("control.db"))?;
//! let node = "node-1".parse()?;
//! db.register_node(&node, "10.0.0.2:7070", 1_000)?;
//! db.heartbeat(&node, &Heartbeat { cores: 2, memory_bytes: 24 << 30, running: 0, caches: vec![], files: vec![], instances: vec![] }, 2_000)?;
//! let nodes = db.nodes(3_000, Duration::from_secs(1))?;
//! assert!(nodes[0].up);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub mod api;
pub mod client;
pub mod db;
pub mod deploy;
pub mod plan;
pub mod state;
pub mod tasks;
