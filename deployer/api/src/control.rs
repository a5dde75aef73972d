//! The control node's HTTP API as data: its routes (what the server
//! mounts and what clients and agents call, in one place) and what each
//! takes and gives. The agent protocol's bodies are in [`crate::agent`].
//!
//! ```text
//! POST   /nodes                    agent::Join -> agent::Joined      (join token)
//! POST   /nodes/{name}/heartbeat   agent::Heartbeat -> agent::Orders (the node's own credential)
//! GET    /nodes                    -> [NodeView]
//! DELETE /nodes/{name}             -> 204
//! POST   /images                   ImageRequest -> ImageView
//! GET    /images/{root}            -> ImageHolders
//! POST   /labs                     the lab file (YAML), or a LabSource (JSON: it and the files it names) -> [InstanceView]
//! GET    /labs                     -> [LabSummary]
//! GET    /labs/{lab}/instances     -> [InstanceView]
//! DELETE /labs/{lab}               -> 204
//! GET    /labs/{lab}/remaining     -> Remaining
//! POST   /labs/{lab}/instances/{name}/{start|stop} -> 204
//! ```

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::agent::Heartbeat;
use crate::{InstanceState, Kind, Name, RootDigest};

/// The routes, as the server mounts them, and the paths clients call.
pub mod routes {
    use crate::Name;

    /// Joining; every node.
    pub const NODES: &str = "/nodes";
    /// One node.
    pub const NODE: &str = "/nodes/{name}";
    /// A node's heartbeat.
    pub const HEARTBEAT: &str = "/nodes/{name}/heartbeat";
    /// Registering an image.
    pub const IMAGES: &str = "/images";
    /// One image and the nodes that cache it.
    pub const IMAGE: &str = "/images/{root}";
    /// Deploying a lab; every lab.
    pub const LABS: &str = "/labs";
    /// One lab.
    pub const LAB: &str = "/labs/{lab}";
    /// A lab's instances.
    pub const INSTANCES: &str = "/labs/{lab}/instances";
    /// What nodes still run of a destroyed lab.
    pub const REMAINING: &str = "/labs/{lab}/remaining";
    /// Stopping or starting an instance; running a command in it
    /// (`exec`, POST [`super::ExecRequest`]); its logs (`logs`, GET).
    pub const INSTANCE_ACTION: &str = "/labs/{lab}/instances/{name}/{action}";
    /// A node answering a task.
    pub const TASK: &str = "/nodes/{name}/tasks/{id}";

    /// The path a node answers task `id` at.
    pub fn task(node: &Name, id: u64) -> String {
        format!("/nodes/{node}/tasks/{id}")
    }

    /// The path that runs a command in an instance.
    pub fn exec(lab: &Name, name: &Name) -> String {
        format!("/labs/{lab}/instances/{name}/exec")
    }

    /// The path of an instance's logs.
    pub fn logs(lab: &Name, name: &Name) -> String {
        format!("/labs/{lab}/instances/{name}/logs")
    }

    /// The heartbeat path of `node`.
    pub fn heartbeat(node: &Name) -> String {
        format!("/nodes/{node}/heartbeat")
    }

    /// The path of `node`.
    pub fn node(node: &Name) -> String {
        format!("/nodes/{node}")
    }

    /// The path of `lab`.
    pub fn lab(lab: &Name) -> String {
        format!("/labs/{lab}")
    }

    /// The instances path of `lab`.
    pub fn instances(lab: &Name) -> String {
        format!("/labs/{lab}/instances")
    }

    /// The remaining path of `lab`.
    pub fn remaining(lab: &Name) -> String {
        format!("/labs/{lab}/remaining")
    }

    /// The path that starts (`running`) or stops an instance.
    pub fn instance_action(lab: &Name, name: &Name, running: bool) -> String {
        format!("/labs/{lab}/instances/{name}/{}", if running { "start" } else { "stop" })
    }

    /// Where a node serves the tarballs it holds to other nodes (agent to
    /// agent, behind the peer token).
    pub const TARBALL: &str = "/tarballs/{key}";

    /// The tarball path of `key`.
    pub fn tarball(key: &crate::RootDigest) -> String {
        format!("/tarballs/{key}")
    }

    /// Where a node serves the registry blobs it holds (container images'
    /// configs and layers) to other nodes, by digest (agent to agent,
    /// behind the peer token).
    pub const BLOB: &str = "/blobs/{digest}";

    /// The blob path of `digest`.
    pub fn blob(digest: &crate::reference::Digest) -> String {
        format!("/blobs/{digest}")
    }
}

/// `POST /labs/{lab}/instances/{name}/exec`: a command to run in the
/// instance (no shell), answered with an `agent::TaskResult`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The command: 1 to 64 arguments of at most 4096 bytes.
    pub argv: Vec<String>,
    /// The most it may run, seconds (at most 600; default 60).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// A node as `GET /nodes` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Its name.
    pub name: Name,
    /// Its agent's address.
    pub address: String,
    /// What its last heartbeat said, if any came.
    pub last: Option<Heartbeat>,
    /// When it last sent one (ms since the epoch).
    pub heartbeat_ms: Option<i64>,
    /// Whether it is up: a heartbeat within three intervals.
    pub up: bool,
}

/// `POST /images`: an image to register, read from its header.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRequest {
    /// Where it is.
    pub url: String,
}

/// An image as its header says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageView {
    /// Its root digest.
    pub root_digest: RootDigest,
    /// Where it is (without credentials).
    pub url: String,
    /// The disk's size, bytes.
    pub virtual_size: u64,
    /// Its boot segment's size, bytes.
    pub boot_bytes: u64,
}

/// An image and the nodes that cache it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageHolders {
    /// Its root digest.
    pub root_digest: RootDigest,
    /// Where it is (without credentials).
    pub url: String,
    /// The nodes that cache it, with the boot-segment bytes each holds.
    pub cached_by: Vec<CachedBy>,
}

/// A node that caches an image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedBy {
    /// The node.
    pub node: Name,
    /// Boot-segment bytes it holds.
    pub boot_bytes: u64,
}

/// An instance as `GET /labs/{lab}/instances` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    /// Its name.
    pub name: Name,
    /// Its number in the cluster.
    pub uid: u32,
    /// What its node calls it (the libvirt domain, the Docker container).
    pub id: String,
    /// VM or container.
    pub kind: Kind,
    /// Its image's key (a VM image's root digest, a tarball's or disk's key).
    pub image: RootDigest,
    /// For an image from a registry (a VM's or a container's): the reference the control node
    /// resolved its tag to at deploy, pinned to the manifest's digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// Its node, once placed.
    pub node: Option<Name>,
    /// Where it stands.
    pub state: InstanceState,
    /// Why it failed or was lost.
    pub reason: Option<String>,
    /// Its addresses, by segment.
    pub addresses: Vec<(Name, Ipv4Addr)>,
    /// From its last `pending` to `ready`, ms.
    pub ready_after_ms: Option<i64>,
    /// Every state it went through and when (ms since the epoch).
    pub history: Vec<(InstanceState, i64)>,
}

/// A lab as `GET /labs` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabSummary {
    /// Its name.
    pub name: Name,
    /// How many instances.
    pub instances: u64,
    /// How many in each state.
    pub states: BTreeMap<String, u64>,
}

/// Something of a destroyed lab a node still runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemainingInstance {
    /// The node.
    pub node: Name,
    /// The instance.
    pub name: Name,
    /// What the node said of it.
    pub state: InstanceState,
}

/// What nodes still run of a destroyed lab.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remaining {
    /// On nodes that are up (they will remove it).
    pub remaining: Vec<RemainingInstance>,
    /// On nodes that are down (removed when they come back).
    pub on_down_nodes: Vec<RemainingInstance>,
}
