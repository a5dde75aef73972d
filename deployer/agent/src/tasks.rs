//! Tasks the control node hands over with a heartbeat's orders (a command
//! run in an instance, its logs): done at once, beside everything else,
//! and answered to the control node with the node's own credential.

use std::sync::Arc;

use bootcache_api::agent::{Task, TaskKind, TaskResult, names};

use crate::Shared;

/// The end of `s`, at most [`TaskResult::MAX_OUTPUT`] bytes.
fn tail(s: String) -> String {
    if s.len() <= TaskResult::MAX_OUTPUT {
        return s;
    }
    let mut from = s.len() - TaskResult::MAX_OUTPUT;
    while !s.is_char_boundary(from) {
        from += 1;
    }
    s[from..].to_owned()
}

/// Does `task` and answers it.
pub(crate) async fn run(shared: Arc<Shared>, base: String, task: Task) {
    let found = {
        let all = shared.instances.lock().unwrap_or_else(|p| p.into_inner());
        all.get(&task.uid).map(|l| (l.order.kind(), names::instance(l.order.uid, &l.order.lab, &l.order.name)))
    };
    let result = match found {
        None => TaskResult { error: Some(format!("this node runs no instance {}", task.uid)), ..Default::default() },
        Some((kind, id)) => match shared.runtime(kind) {
            Err(e) => TaskResult { error: Some(e.to_string()), ..Default::default() },
            Ok(rt) => match &task.what {
                TaskKind::Exec { argv, timeout_s } => {
                    tracing::info!(instance = %id, command = argv.first().map_or("", String::as_str), "exec");
                    match rt.exec(&id, argv, std::time::Duration::from_secs(*timeout_s)).await {
                        Ok(done) => TaskResult { code: Some(done.code), output: tail(done.output), error: None },
                        Err(e) => TaskResult { error: Some(e.to_string()), ..Default::default() },
                    }
                }
                TaskKind::Logs => match rt.logs(&id).await {
                    Ok(out) => TaskResult { code: None, output: tail(out), error: None },
                    Err(e) => TaskResult { error: Some(e.to_string()), ..Default::default() },
                },
            },
        },
    };
    let name = &shared.config.name;
    let auth = format!("Bearer {}", shared.secret.lock().unwrap_or_else(|p| p.into_inner()));
    let url = format!("{base}{}", bootcache_api::control::routes::task(name, task.id));
    match shared.http.post(url).header(reqwest::header::AUTHORIZATION, auth).json(&result).send().await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => tracing::warn!(task = task.id, status = %r.status(), "the control node did not take the task's answer"),
        Err(e) => tracing::warn!(task = task.id, error = %bootcache_http::chain(&e), "the task's answer was not delivered"),
    }
}
