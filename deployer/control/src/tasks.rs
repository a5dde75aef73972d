//! Things done once in an instance for someone waiting (`bootcache exec`,
//! `bootcache logs`): queued for the instance's node, handed to it with its
//! next heartbeat's orders, answered by the node (with its own credential)
//! and passed to the one waiting. Agents still only call out. Kept in
//! memory: a task under way when the control node restarts is lost, and its
//! caller told so by a timeout.

use std::collections::HashMap;
use std::time::Duration;

use bootcache_api::agent::{Task, TaskKind, TaskResult};
use bootcache_api::{InstanceState, Name};
use tokio::sync::oneshot;

use crate::db::DbError;
use crate::state::{Control, locked};

/// Tasks queued for nodes and those waited for.
#[derive(Default)]
pub(crate) struct Tasks {
    next: u64,
    queued: HashMap<Name, Vec<Task>>,
    waiting: HashMap<u64, (Name, oneshot::Sender<TaskResult>)>,
}

/// Why a task was not done.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// The database.
    #[error(transparent)]
    Db(#[from] DbError),
    /// No such instance.
    #[error("no instance {0}")]
    NoSuchInstance(String),
    /// The instance is on no node now (pending, lost...).
    #[error("instance {name} is {state}: on no node to ask")]
    NotOnNode {
        /// `lab/instance`.
        name: String,
        /// Where it stands.
        state: InstanceState,
    },
    /// Its node did not answer in time.
    #[error("node {node} did not answer within {} s", waited.as_secs())]
    Timeout {
        /// The node.
        node: Name,
        /// How long it was waited for.
        waited: Duration,
    },
}

impl Control {
    /// Has `what` done in instance `name` of `lab` by its node, waiting at
    /// most `wait` for the answer.
    ///
    /// # Errors
    /// No such instance, one on no node, no answer in time, the database.
    pub async fn run_task(&self, lab: &Name, name: &Name, what: TaskKind, wait: Duration) -> Result<TaskResult, TaskError> {
        let row = self.db().instance(lab, name)?.ok_or_else(|| TaskError::NoSuchInstance(format!("{lab}/{name}")))?;
        let node = match (&row.node, row.state) {
            (
                Some(n),
                InstanceState::Placed
                | InstanceState::Fetching
                | InstanceState::Starting
                | InstanceState::Ready
                | InstanceState::Stopped
                | InstanceState::Failed,
            ) => n.clone(),
            (_, state) => return Err(TaskError::NotOnNode { name: format!("{lab}/{name}"), state }),
        };
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut t = locked(&self.tasks);
            t.next += 1;
            let id = t.next;
            t.queued.entry(node.clone()).or_default().push(Task { id, uid: row.uid, what });
            t.waiting.insert(id, (node.clone(), tx));
            id
        };
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(result)) => Ok(result),
            _ => {
                let mut t = locked(&self.tasks);
                t.waiting.remove(&id);
                if let Some(q) = t.queued.get_mut(&node) {
                    q.retain(|task| task.id != id);
                }
                Err(TaskError::Timeout { node, waited: wait })
            }
        }
    }

    /// The tasks queued for `node` (handed over once, with its orders).
    pub(crate) fn take_tasks(&self, node: &Name) -> Vec<Task> {
        locked(&self.tasks).queued.remove(node).unwrap_or_default()
    }

    /// `node`'s answer to task `id`; whether it was one waited for from it.
    pub fn task_done(&self, node: &Name, id: u64, mut result: TaskResult) -> bool {
        let mut t = locked(&self.tasks);
        match t.waiting.get(&id) {
            Some((n, _)) if n == node => {}
            _ => return false,
        }
        let Some((_, tx)) = t.waiting.remove(&id) else { return false };
        drop(t);
        if result.output.len() > TaskResult::MAX_OUTPUT {
            let mut from = result.output.len() - TaskResult::MAX_OUTPUT;
            while !result.output.is_char_boundary(from) {
                from += 1;
            }
            result.output = result.output[from..].to_owned();
        }
        let _ = tx.send(result);
        true
    }
}
