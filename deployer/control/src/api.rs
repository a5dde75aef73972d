//! The control node's JSON HTTP API, behind the same bearer-token scheme as
//! a node's ([`bootcache_delivery::auth`]): every route needs the token.
//!
//! ```text
//! POST /nodes                  {"name": "node-1", "address": "10.0.0.2:7070"}   -> 204
//! POST /nodes/{name}/heartbeat {"cores": 2, "memory_bytes": N, "running": 0,
//!                               "caches": [["<root digest>", boot bytes held]]} -> 204 (404 if unregistered)
//! GET  /nodes                  -> every node: address, last heartbeat, up
//! POST /images                 {"url": "http://store/x.bcimg"} -> the image, read from its header
//! GET  /images/{root}          -> the image and the nodes that cache it
//! POST /labs                   the lab file (YAML) -> the lab's instances (400 naming the line)
//! GET  /labs                   -> the labs deployed: name, instances by state
//! GET  /labs/{lab}/instances   -> the lab's instances: node, state, reason, history
//! DELETE /labs/{lab}           -> 204; agents remove what they run of it
//! GET  /labs/{lab}/remaining   -> what nodes still run of a destroyed lab
//! POST /labs/{lab}/instances/{name}/stop   -> 204; its agent stops it (kept)
//! POST /labs/{lab}/instances/{name}/start  -> 204; its agent starts it again
//! ```
//!
//! A heartbeat is answered with the node's orders
//! ([`bootcache_api::agent::Orders`]): everything it should run now.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bootcache_api::{Name, RootDigest};
use bootcache_delivery::auth::Credential;
use bootcache_delivery::remote::RetryPolicy;
use serde::Deserialize;

use crate::db::{Db, DbError, Heartbeat};

/// What the API works on.
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
    /// Labs as deployed, expanded (see `deploy`).
    pub(crate) views: Mutex<std::collections::HashMap<Name, Arc<crate::deploy::LabView>>>,
    /// Where each lab's instances are, as of a placement generation.
    pub(crate) members: Mutex<std::collections::HashMap<Name, (u64, Arc<crate::deploy::Members>)>>,
    /// Bumped whenever placement changes.
    pub(crate) generation: std::sync::atomic::AtomicU64,
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
            views: Mutex::default(),
            members: Mutex::default(),
            generation: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The database (held briefly: every call is a few SQLite statements).
    pub fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the instances of nodes that stopped answering as lost, every
    /// heartbeat interval, until the task is dropped.
    pub async fn watch_nodes(self: Arc<Self>) {
        loop {
            tokio::time::sleep(self.heartbeat).await;
            match self.db().mark_lost(now_ms(), self.heartbeat) {
                Ok(lost) if !lost.is_empty() => {
                    self.changed();
                    tracing::warn!(count = lost.len(), "instances lost with their nodes");
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "cannot check the nodes"),
            }
        }
    }

    /// The API, requiring `credential` on every route.
    pub fn api(self: &Arc<Self>, credential: Arc<Credential>) -> axum::Router {
        axum::Router::new()
            .route("/nodes", get(nodes).post(register))
            .route("/nodes/{name}/heartbeat", post(heartbeat))
            .route("/images", post(register_image))
            .route("/images/{root}", get(image))
            .route("/labs", get(labs).post(deploy))
            .route("/labs/{lab}", axum::routing::delete(destroy))
            .route("/labs/{lab}/instances", get(instances))
            .route("/labs/{lab}/remaining", get(remaining))
            .route("/labs/{lab}/instances/{name}/{action}", post(instance_action))
            .layer(axum::middleware::from_fn_with_state(credential, bootcache_delivery::auth::require))
            .with_state(Arc::clone(self))
    }
}

fn plain(status: StatusCode, msg: &str) -> Response {
    (status, format!("{msg}\n")).into_response()
}

fn failed(e: &DbError) -> Response {
    let status = match e {
        DbError::NoSuchNode(_) | DbError::NoSuchInstance { .. } => StatusCode::NOT_FOUND,
        DbError::BadTransition { .. } => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    plain(status, &e.to_string())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Register {
    name: Name,
    address: String,
}

async fn register(State(c): State<Arc<Control>>, Json(r): Json<Register>) -> Response {
    if r.address.len() > 255 || r.address.parse::<std::net::SocketAddr>().is_err() {
        return plain(StatusCode::BAD_REQUEST, "address: an IP address and port, e.g. 10.0.0.2:7070");
    }
    match c.db().register_node(&r.name, &r.address, now_ms()) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => failed(&e),
    }
}

async fn heartbeat(State(c): State<Arc<Control>>, Path(name): Path<String>, Json(beat): Json<Heartbeat>) -> Response {
    let Ok(name) = name.parse::<Name>() else { return plain(StatusCode::NOT_FOUND, "no such node") };
    if beat.caches.len() > 10_000 {
        return plain(StatusCode::BAD_REQUEST, "caches: at most 10000 images");
    }
    if beat.instances.len() > 100_000 {
        return plain(StatusCode::BAD_REQUEST, "instances: at most 100000");
    }
    match c.heartbeat(&name, &beat) {
        Ok(orders) => Json(orders).into_response(),
        Err(e) => failed(&e),
    }
}

async fn nodes(State(c): State<Arc<Control>>) -> Response {
    match c.db().nodes(now_ms(), c.heartbeat) {
        Ok(n) => Json(n).into_response(),
        Err(e) => failed(&e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewImage {
    url: String,
}

async fn register_image(State(c): State<Arc<Control>>, Json(req): Json<NewImage>) -> Response {
    // Read without holding the database: a slow store delays this call only.
    let header = match bootcache_delivery::cache::read_header(&req.url, c.retry).await {
        Ok(h) => h,
        Err(e) => return plain(StatusCode::BAD_GATEWAY, &bootcache_delivery::node::chain(&e)),
    };
    let (root, boot) = (header.root(), header.boot.end - header.boot.start);
    match c.db().register_image(&root, &req.url, header.virtual_size, boot, now_ms()) {
        Ok(()) => Json(serde_json::json!({
            "root_digest": root,
            "url": bootcache_delivery::remote::redact(&req.url),
            "virtual_size": header.virtual_size,
            "boot_bytes": boot,
        }))
        .into_response(),
        Err(e) => failed(&e),
    }
}

async fn image(State(c): State<Arc<Control>>, Path(root): Path<String>) -> Response {
    let Ok(root) = root.parse::<RootDigest>() else { return plain(StatusCode::NOT_FOUND, "no such image") };
    let db = c.db();
    let url = match db.image_url(&root) {
        Ok(Some(url)) => url,
        Ok(None) => return plain(StatusCode::NOT_FOUND, "no such image"),
        Err(e) => return failed(&e),
    };
    match db.holders(&root) {
        Ok(holders) => Json(serde_json::json!({
            "root_digest": root,
            "url": bootcache_delivery::remote::redact(&url),
            "cached_by": holders.into_iter().map(|(node, bytes)| serde_json::json!({"node": node, "boot_bytes": bytes})).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => failed(&e),
    }
}

/// An instance as `GET /labs/{lab}/instances` shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct InstanceView {
    /// Its name.
    pub name: Name,
    /// VM or container.
    pub kind: bootcache_api::Kind,
    /// Its node, once placed.
    pub node: Option<Name>,
    /// Where it stands.
    pub state: bootcache_api::InstanceState,
    /// Why it failed or was lost.
    pub reason: Option<String>,
    /// Its addresses, by segment.
    pub addresses: Vec<(Name, std::net::Ipv4Addr)>,
    /// From its last `pending` to `ready`, ms.
    pub ready_after_ms: Option<i64>,
    /// Every state it went through and when (ms since the epoch).
    pub history: Vec<(bootcache_api::InstanceState, i64)>,
}

/// The instances of `lab` with their addresses and times to ready.
pub fn views(db: &Db, lab: &Name) -> Result<Option<Vec<InstanceView>>, DbError> {
    let Some(spec) = db.lab(lab)? else { return Ok(None) };
    let expanded: std::collections::HashMap<Name, bootcache_api::lab::Instance> =
        spec.instances().into_iter().map(|i| (i.name.clone(), i)).collect();
    let rows = db.instances(lab)?;
    Ok(Some(
        rows.into_iter()
            .map(|r| {
                use bootcache_api::InstanceState::{Pending, Ready};
                let pending = r.history.iter().rev().find(|(s, _)| *s == Pending).map(|(_, t)| *t);
                let ready = r.history.iter().rev().find(|(s, _)| *s == Ready).map(|(_, t)| *t);
                let ready_after_ms = match (pending, ready) {
                    (Some(p), Some(rd)) if r.state == Ready && rd >= p => Some(rd - p),
                    _ => None,
                };
                InstanceView {
                    addresses: expanded.get(&r.spec.name).map(|i| i.addresses.clone()).unwrap_or_default(),
                    name: r.spec.name,
                    kind: r.spec.kind,
                    node: r.node,
                    state: r.state,
                    reason: r.reason,
                    ready_after_ms,
                    history: r.history,
                }
            })
            .collect(),
    ))
}

async fn instances(State(c): State<Arc<Control>>, Path(lab): Path<String>) -> Response {
    let Ok(lab) = lab.parse::<Name>() else { return plain(StatusCode::NOT_FOUND, "no such lab") };
    match views(&c.db(), &lab) {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => plain(StatusCode::NOT_FOUND, &format!("no lab {lab}")),
        Err(e) => failed(&e),
    }
}

async fn deploy(State(c): State<Arc<Control>>, body: String) -> Response {
    let lab = match bootcache_api::Lab::parse(&body) {
        Ok(lab) => lab,
        Err(e) => return plain(StatusCode::BAD_REQUEST, &e.to_string()),
    };
    for def in &lab.instances {
        if let Err(e) = bootcache_delivery::remote::check_url(&def.image) {
            return plain(StatusCode::BAD_REQUEST, &format!("instance {}: {e}", def.name));
        }
    }
    match c.deploy(&lab).await {
        Ok(rows) => Json(rows).into_response(),
        Err(crate::deploy::DeployError::Db(e)) => failed(&e),
        Err(e) => plain(StatusCode::BAD_GATEWAY, &e.to_string()),
    }
}

async fn labs(State(c): State<Arc<Control>>) -> Response {
    let db = c.db();
    let names = match db.lab_names() {
        Ok(l) => l,
        Err(e) => return failed(&e),
    };
    let mut out = Vec::new();
    for name in names {
        let rows = match db.instances_brief(&name) {
            Ok(r) => r,
            Err(e) => return failed(&e),
        };
        let mut states = std::collections::BTreeMap::new();
        for r in &rows {
            *states.entry(r.state.as_str()).or_insert(0u64) += 1;
        }
        out.push(serde_json::json!({"name": name, "instances": rows.len(), "states": states}));
    }
    Json(out).into_response()
}

async fn destroy(State(c): State<Arc<Control>>, Path(lab): Path<String>) -> Response {
    let Ok(lab) = lab.parse::<Name>() else { return plain(StatusCode::NOT_FOUND, "no such lab") };
    match c.destroy(&lab) {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => failed(&e),
    }
}

async fn remaining(State(c): State<Arc<Control>>, Path(lab): Path<String>) -> Response {
    let Ok(lab) = lab.parse::<Name>() else { return plain(StatusCode::NOT_FOUND, "no such lab") };
    let db = c.db();
    let up: Vec<Name> = match db.nodes(now_ms(), c.heartbeat) {
        Ok(n) => n.into_iter().filter(|n| n.up).map(|n| n.name).collect(),
        Err(e) => return failed(&e),
    };
    match db.remaining(&lab) {
        // What down nodes said is kept but shown apart: they cannot remove it now.
        Ok(rows) => {
            let (on_up, on_down): (Vec<_>, Vec<_>) = rows.into_iter().partition(|r| up.contains(&r.node));
            Json(serde_json::json!({"remaining": on_up, "on_down_nodes": on_down})).into_response()
        }
        Err(e) => failed(&e),
    }
}

async fn instance_action(State(c): State<Arc<Control>>, Path((lab, name, action)): Path<(String, String, String)>) -> Response {
    let (Ok(lab), Ok(name)) = (lab.parse::<Name>(), name.parse::<Name>()) else { return plain(StatusCode::NOT_FOUND, "no such instance") };
    let running = match action.as_str() {
        "start" => true,
        "stop" => false,
        _ => return plain(StatusCode::NOT_FOUND, "actions: start, stop"),
    };
    match c.db().set_running(&lab, &name, running) {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => plain(StatusCode::NOT_FOUND, &format!("no instance {lab}/{name}")),
        Err(e) => failed(&e),
    }
}
