//! The control node's JSON HTTP API, behind bearer tokens
//! ([`bootcache_http::auth`]): the administrator's token for every
//! route but two; `POST /nodes` also takes the join token, and a node's
//! heartbeat only that node's own credential (given when it joined).
//!
//! ```text
//! POST /nodes                  {"name": "node-1", "address": "10.0.0.2:7070", "cores": 2, "memory_bytes": N}
//!                              (join token) -> {"secret": "...", "peer_token": "..."}; 409 if it is up already
//! POST /nodes/{name}/heartbeat {"cores": 2, "memory_bytes": N, "running": 0,
//!                               "caches": [["<root digest>", boot bytes held]], "instances": [...]}
//!                              (the node's own credential) -> its orders (404 if unregistered)
//! GET  /nodes                  -> every node: address, last heartbeat, up
//! DELETE /nodes/{name}         -> 204; its credential revoked, its instances placed again
//! POST /images                 {"url": "http://store/x.bcimg"} -> the image, read from its header
//! GET  /images/{root}          -> the image and the nodes that cache it
//! POST /labs                   the lab file (YAML; JSON LabSource with the files it names) -> the lab's instances (400 naming the line,
//!                              409 if destroyed or deployed again meanwhile)
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

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use bootcache_api::agent::Join;
pub use bootcache_api::control::InstanceView;
use bootcache_api::control::{CachedBy, ImageHolders, ImageRequest, ImageView, LabSummary, Remaining, routes};
use bootcache_api::{Name, RootDigest};
use bootcache_http::auth::Credential;

use crate::db::{Db, DbError, Heartbeat};
pub use crate::state::{Control, now_ms};

/// The largest request body taken (a lab file is at most 1 MiB; a
/// heartbeat of 10,000 instances is about 1 MiB).
pub const MAX_BODY: usize = 4 << 20;
/// Time a client has to send a request's body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// The key derivation context of the join token (from the administrator's).
pub const JOIN_PURPOSE: &str = "bootcache 2026-12 join token";
/// The key derivation context of the peer token (from the administrator's).
pub const PEER_PURPOSE: &str = "bootcache 2026-12 peer token";

/// The join token of a control node whose administrator's token is in
/// `admin`: what agents are given (`bootcache control token --join`). It
/// lets a node join, nothing else; it changes when the administrator's
/// token is rotated.
pub fn join_token(admin: &Credential) -> String {
    admin.derive(JOIN_PURPOSE)
}

/// The peer token of a control node whose administrator's token is in
/// `admin`: what its nodes present to each other (given when they join).
pub fn peer_token(admin: &Credential) -> String {
    admin.derive(PEER_PURPOSE)
}

impl Control {
    /// The API. Heartbeats need the node's own credential (given when it
    /// joined); joining needs the join token ([`join_token`]) or the
    /// administrator's; every other route the administrator's (`admin`).
    /// Bodies are bounded in size and in the time they take to arrive.
    pub fn api(self: &Arc<Self>, admin: Arc<Credential>) -> axum::Router {
        // Bodies are read only once the caller is known (each layer added
        // last runs first).
        let body = axum::middleware::from_fn_with_state(
            bootcache_http::BodyLimits { max_bytes: MAX_BODY, timeout: self.body_timeout },
            bootcache_http::bounded_body,
        );
        let administered = axum::Router::new()
            .route(routes::NODES, get(nodes))
            .route(routes::NODE, delete(remove_node))
            .route(routes::IMAGES, post(register_image))
            .route(routes::IMAGE, get(image))
            .route(routes::LABS, get(labs).post(deploy))
            .route(routes::LAB, delete(destroy))
            .route(routes::INSTANCES, get(instances))
            .route(routes::REMAINING, get(remaining))
            .route(routes::INSTANCE_ACTION, post(instance_action).get(instance_view))
            .layer(body.clone())
            .layer(axum::middleware::from_fn_with_state(Arc::clone(&admin), bootcache_http::auth::require));
        let join = axum::Router::new()
            .route(routes::NODES, post(join))
            .layer(body.clone())
            .layer(axum::middleware::from_fn_with_state(Arc::clone(&admin), join_gate))
            .layer(axum::Extension(admin));
        // A heartbeat needs its node's own credential.
        let nodes = axum::Router::new()
            .route(routes::HEARTBEAT, post(heartbeat))
            .route(routes::TASK, post(task_done))
            .layer(body)
            .layer(axum::middleware::from_fn_with_state(Arc::clone(self), node_gate));
        administered.merge(join).merge(nodes).with_state(Arc::clone(self))
    }
}

/// Lets a heartbeat through only with the credential of the node it names.
async fn node_gate(
    State(c): State<Arc<Control>>,
    Path(params): Path<std::collections::HashMap<String, String>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(name) = params.get("name").and_then(|n| n.parse::<Name>().ok()) else { return plain(StatusCode::NOT_FOUND, "no such node") };
    let given = request.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes().to_vec());
    match blocking(&c, move |c| c.authenticate(&name, given.as_deref())).await {
        Ok(Ok(true)) => next.run(request).await,
        Ok(Ok(false)) => unauthorized("a heartbeat needs its node's own credential (given when it joined)"),
        Ok(Err(e)) => failed(&e),
        Err(r) => r,
    }
}

/// Whether a join came with the administrator's token.
#[derive(Clone, Copy)]
struct ByAdmin(bool);

/// Lets a join through with the join token or the administrator's.
async fn join_gate(State(admin): State<Arc<Credential>>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let given = request.headers().get(header::AUTHORIZATION).map(axum::http::HeaderValue::as_bytes);
    let by_admin = admin.accepts(given);
    if by_admin || Credential::from_token(&join_token(&admin)).accepts(given) {
        let mut request = request;
        request.extensions_mut().insert(ByAdmin(by_admin));
        return next.run(request).await;
    }
    unauthorized("joining requires the join token (`bootcache control token --join`): Authorization: Bearer <token>")
}

fn unauthorized(msg: &str) -> Response {
    let mut r = plain(StatusCode::UNAUTHORIZED, msg);
    r.headers_mut().insert(header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer realm=\"bootcache\""));
    r
}

/// Runs `f` on the control node off the async workers (SQLite and lab
/// checks take CPU; a worker held by them would stall other requests).
async fn blocking<T: Send + 'static>(c: &Arc<Control>, f: impl FnOnce(&Control) -> T + Send + 'static) -> Result<T, Response> {
    let c = Arc::clone(c);
    tokio::task::spawn_blocking(move || f(&c)).await.map_err(|e| plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("internal error: {e}")))
}

fn plain(status: StatusCode, msg: &str) -> Response {
    (status, format!("{msg}\n")).into_response()
}

fn failed(e: &DbError) -> Response {
    let status = match e {
        DbError::NoSuchNode(_) | DbError::NoSuchInstance { .. } => StatusCode::NOT_FOUND,
        DbError::BadTransition { .. } | DbError::Conflict(_) | DbError::NodeUp(_) | DbError::NodeKnown(_) => StatusCode::CONFLICT,
        DbError::Claims(_) => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    plain(status, &e.to_string())
}

/// The most caches a heartbeat may list.
pub const MAX_CACHES: usize = 10_000;
/// The most instances a heartbeat may report (and no more than the node
/// was ordered, [`Db::observe`]).
pub const MAX_REPORTS: usize = 20_000;

async fn join(
    State(c): State<Arc<Control>>,
    axum::Extension(admin): axum::Extension<Arc<Credential>>,
    axum::Extension(ByAdmin(by_admin)): axum::Extension<ByAdmin>,
    Json(j): Json<Join>,
) -> Response {
    if j.address.len() > 255 || j.address.parse::<std::net::SocketAddr>().is_err() {
        return plain(StatusCode::BAD_REQUEST, "address: an IP address and port, e.g. 10.0.0.2:7070");
    }
    let peer_token = peer_token(&admin);
    match blocking(&c, move |c| c.join(&j, peer_token, by_admin)).await {
        Ok(Ok(joined)) => Json(joined).into_response(),
        Ok(Err(e)) => failed(&e),
        Err(r) => r,
    }
}

async fn heartbeat(State(c): State<Arc<Control>>, Path(name): Path<String>, body: axum::body::Bytes) -> Response {
    let Ok(name) = name.parse::<Name>() else { return plain(StatusCode::NOT_FOUND, "no such node") };
    let beat: Heartbeat = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("heartbeat: {e}")),
    };
    if beat.caches.len() > MAX_CACHES {
        return plain(StatusCode::BAD_REQUEST, &format!("caches: at most {MAX_CACHES} images"));
    }
    if beat.instances.len() > MAX_REPORTS {
        return plain(StatusCode::BAD_REQUEST, &format!("instances: at most {MAX_REPORTS}"));
    }
    match blocking(&c, move |c| c.heartbeat(&name, &beat)).await {
        Ok(Ok(orders)) => Json(orders).into_response(),
        Ok(Err(e)) => failed(&e),
        Err(r) => r,
    }
}

async fn nodes(State(c): State<Arc<Control>>) -> Response {
    match blocking(&c, |c| c.db().nodes(now_ms(), c.heartbeat)).await {
        Ok(Ok(n)) => Json(n).into_response(),
        Ok(Err(e)) => failed(&e),
        Err(r) => r,
    }
}

async fn remove_node(State(c): State<Arc<Control>>, Path(name): Path<String>) -> Response {
    let Ok(name) = name.parse::<Name>() else { return plain(StatusCode::NOT_FOUND, "no such node") };
    let shown = name.clone();
    match blocking(&c, move |c| c.remove_node(&name)).await {
        Ok(Ok(true)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Ok(false)) => plain(StatusCode::NOT_FOUND, &format!("no node {shown}")),
        Ok(Err(e)) => failed(&e),
        Err(r) => r,
    }
}

async fn register_image(State(c): State<Arc<Control>>, Json(req): Json<ImageRequest>) -> Response {
    if let Err(e) = bootcache_delivery::remote::check_url(&req.url) {
        return plain(StatusCode::BAD_REQUEST, &e.to_string());
    }
    // Read without holding the database: a slow store delays this call only.
    let header = match bootcache_delivery::cache::read_header(&req.url, c.retry).await {
        Ok(h) => h,
        Err(e) => return plain(StatusCode::BAD_GATEWAY, &bootcache_http::chain(&e)),
    };
    let (root, boot) = (header.root(), header.boot.end - header.boot.start);
    match c.db().register_image(&root, &req.url, header.virtual_size, boot, now_ms()) {
        Ok(()) => Json(ImageView {
            root_digest: root,
            url: bootcache_http::redact(&req.url),
            virtual_size: header.virtual_size,
            boot_bytes: boot,
        })
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
        Ok(holders) => Json(ImageHolders {
            root_digest: root,
            url: bootcache_http::redact(&url),
            cached_by: holders.into_iter().map(|(node, boot_bytes)| CachedBy { node, boot_bytes }).collect(),
        })
        .into_response(),
        Err(e) => failed(&e),
    }
}

/// The instances of `lab` with their addresses and times to ready.
pub fn views(db: &Db, lab: &Name) -> Result<Option<Vec<InstanceView>>, DbError> {
    let Some(spec) = db.lab(lab)? else { return Ok(None) };
    let expanded: std::collections::HashMap<Name, bootcache_api::lab::Instance> =
        spec.instances().into_iter().map(|i| (i.name.clone(), i)).collect();
    let rows = db.instances(lab)?;
    let mut pins = std::collections::HashMap::new();
    for r in &rows {
        if let std::collections::hash_map::Entry::Vacant(e) = pins.entry(r.spec.image) {
            e.insert(db.image_reference(&r.spec.image)?);
        }
    }
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
                    pinned: pins.get(&r.spec.image).cloned().flatten(),
                    image: r.spec.image,
                    uid: r.uid,
                    id: bootcache_api::agent::names::instance(r.uid, lab, &r.spec.name),
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
    let shown = lab.clone();
    match blocking(&c, move |c| views(&c.db(), &lab)).await {
        Ok(Ok(Some(v))) => Json(v).into_response(),
        Ok(Ok(None)) => plain(StatusCode::NOT_FOUND, &format!("no lab {shown}")),
        Ok(Err(e)) => failed(&e),
        Err(r) => r,
    }
}

async fn deploy(State(c): State<Arc<Control>>, headers: axum::http::HeaderMap, body: String) -> Response {
    // The lab file as YAML, or as JSON with the files it names.
    let json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    let source = if json {
        match serde_json::from_str::<bootcache_api::lab::LabSource>(&body) {
            Ok(s) => s,
            Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("not a lab and its files: {e}")),
        }
    } else {
        body.into()
    };
    // Checking a lab of 10,000 instances takes CPU: not on an async worker.
    let parsed = tokio::task::spawn_blocking(move || source.parse().map(|lab| (source, lab))).await;
    let (text, lab) = match parsed {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => return plain(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e) => return plain(StatusCode::INTERNAL_SERVER_ERROR, &format!("internal error: {e}")),
    };
    for def in &lab.instances {
        if bootcache_api::reference::Reference::looks_like(&def.image) {
            continue; // Checked by the lab's parse; resolved at deploy.
        }
        if let Err(e) = bootcache_delivery::remote::check_url(&def.image) {
            return plain(StatusCode::BAD_REQUEST, &format!("instance {}: {e}", def.name));
        }
    }
    let name = lab.name.clone();
    match c.deploy(text, lab).await {
        Ok(_) => match blocking(&c, move |c| views(&c.db(), &name)).await {
            Ok(Ok(v)) => Json(v.unwrap_or_default()).into_response(),
            Ok(Err(e)) => failed(&e),
            Err(r) => r,
        },
        Err(crate::deploy::DeployError::Db(e)) => failed(&e),
        Err(e @ crate::deploy::DeployError::Superseded(_)) => plain(StatusCode::CONFLICT, &e.to_string()),
        Err(e) => plain(StatusCode::BAD_GATEWAY, &e.to_string()),
    }
}

async fn labs(State(c): State<Arc<Control>>) -> Response {
    let listed = blocking(&c, |c| -> Result<Vec<LabSummary>, DbError> {
        let db = c.db();
        let mut out = Vec::new();
        for name in db.lab_names()? {
            let rows = db.instances_brief(&name)?;
            let mut states = std::collections::BTreeMap::new();
            for r in &rows {
                *states.entry(r.state.as_str().to_owned()).or_insert(0u64) += 1;
            }
            out.push(LabSummary { name, instances: rows.len() as u64, states });
        }
        Ok(out)
    })
    .await;
    match listed {
        Ok(Ok(out)) => Json(out).into_response(),
        Ok(Err(e)) => failed(&e),
        Err(r) => r,
    }
}

async fn destroy(State(c): State<Arc<Control>>, Path(lab): Path<String>) -> Response {
    let Ok(lab) = lab.parse::<Name>() else { return plain(StatusCode::NOT_FOUND, "no such lab") };
    match blocking(&c, move |c| c.destroy(&lab)).await {
        Ok(Ok(_)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Err(e)) => failed(&e),
        Err(r) => r,
    }
}

async fn remaining(State(c): State<Arc<Control>>, Path(lab): Path<String>) -> Response {
    let Ok(lab) = lab.parse::<Name>() else { return plain(StatusCode::NOT_FOUND, "no such lab") };
    let found = blocking(&c, move |c| -> Result<Remaining, DbError> {
        let db = c.db();
        let up: Vec<Name> = db.nodes(now_ms(), c.heartbeat)?.into_iter().filter(|n| n.up).map(|n| n.name).collect();
        // What down nodes said is kept but shown apart: they cannot remove it now.
        let (on_up, on_down): (Vec<_>, Vec<_>) = db.remaining(&lab)?.into_iter().partition(|r| up.contains(&r.node));
        Ok(Remaining { remaining: on_up, on_down_nodes: on_down })
    })
    .await;
    match found {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => failed(&e),
        Err(r) => r,
    }
}

async fn instance_action(
    State(c): State<Arc<Control>>,
    Path((lab, name, action)): Path<(String, String, String)>,
    body: axum::body::Bytes,
) -> Response {
    let (Ok(lab), Ok(name)) = (lab.parse::<Name>(), name.parse::<Name>()) else { return plain(StatusCode::NOT_FOUND, "no such instance") };
    let running = match action.as_str() {
        "start" => true,
        "stop" => false,
        "exec" => return exec(c, lab, name, &body).await,
        _ => return plain(StatusCode::NOT_FOUND, "actions: start, stop, exec (POST), logs (GET)"),
    };
    let shown = format!("{lab}/{name}");
    match blocking(&c, move |c| c.db().set_running(&lab, &name, running)).await {
        Ok(Ok(true)) => StatusCode::NO_CONTENT.into_response(),
        Ok(Ok(false)) => plain(StatusCode::NOT_FOUND, &format!("no instance {shown}")),
        Ok(Err(e)) => failed(&e),
        Err(r) => r,
    }
}

/// The most a command run by `exec` may run.
const MAX_EXEC: Duration = Duration::from_secs(600);

async fn exec(c: Arc<Control>, lab: Name, name: Name, body: &[u8]) -> Response {
    let req: bootcache_api::control::ExecRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("exec: {e}")),
    };
    if req.argv.is_empty() || req.argv.len() > 64 || req.argv.iter().any(|a| a.len() > 4096 || a.contains('\0')) {
        return plain(StatusCode::BAD_REQUEST, "exec: argv is 1 to 64 arguments of at most 4096 bytes");
    }
    let timeout = Duration::from_secs(req.timeout_s.unwrap_or(60)).min(MAX_EXEC);
    // The command's own time, and two heartbeats for its node to take it up and answer.
    let wait = timeout + c.heartbeat * 2 + Duration::from_secs(10);
    let what = bootcache_api::agent::TaskKind::Exec { argv: req.argv, timeout_s: timeout.as_secs() };
    task_answer(c.run_task(&lab, &name, what, wait).await)
}

async fn instance_view(State(c): State<Arc<Control>>, Path((lab, name, what)): Path<(String, String, String)>) -> Response {
    let (Ok(lab), Ok(name)) = (lab.parse::<Name>(), name.parse::<Name>()) else { return plain(StatusCode::NOT_FOUND, "no such instance") };
    if what != "logs" {
        return plain(StatusCode::NOT_FOUND, "GET: logs");
    }
    let wait = c.heartbeat * 2 + Duration::from_secs(30);
    task_answer(c.run_task(&lab, &name, bootcache_api::agent::TaskKind::Logs, wait).await)
}

fn task_answer(r: Result<bootcache_api::agent::TaskResult, crate::tasks::TaskError>) -> Response {
    use crate::tasks::TaskError;
    match r {
        Ok(result) => Json(result).into_response(),
        Err(TaskError::Db(e)) => failed(&e),
        Err(e @ TaskError::NoSuchInstance(_)) => plain(StatusCode::NOT_FOUND, &e.to_string()),
        Err(e @ TaskError::NotOnNode { .. }) => plain(StatusCode::CONFLICT, &e.to_string()),
        Err(e) => plain(StatusCode::GATEWAY_TIMEOUT, &e.to_string()),
    }
}

async fn task_done(State(c): State<Arc<Control>>, Path((node, id)): Path<(String, u64)>, body: axum::body::Bytes) -> Response {
    let Ok(node) = node.parse::<Name>() else { return plain(StatusCode::NOT_FOUND, "no such node") };
    let result: bootcache_api::agent::TaskResult = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("task result: {e}")),
    };
    if c.task_done(&node, id, result) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        plain(StatusCode::NOT_FOUND, "no such task of this node")
    }
}
