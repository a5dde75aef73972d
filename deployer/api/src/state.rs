//! What an instance is and where it stands.

use serde::{Deserialize, Serialize};

/// How an instance runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A full VM (libvirt), its disk delivered boot set first.
    Vm,
    /// A container (Docker).
    Container,
}

/// The states an instance goes through, as the control node records them.
///
/// ```text
/// pending ─► placed ─► fetching ─► starting ─► ready
///    │          │          │           │          │
///    └──────────┴──────────┴───────────┴──────────┴─► failed (with a reason)
///               └──────────┴───────────┴──────────┴─► lost (its node went down)
///                                       ▲          │
///                                       └─ stopped ◄┘ (stopped and started on request)
/// ```
/// A failed or lost instance may be placed again (reconciliation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Wanted, not yet given a node.
    Pending,
    /// Given a node.
    Placed,
    /// Its node is fetching its image.
    Fetching,
    /// Its node is starting it.
    Starting,
    /// Up: its readiness marker was seen.
    Ready,
    /// It could not be started (the reason is recorded beside it).
    Failed,
    /// Its node stopped answering.
    Lost,
    /// Stopped on request (kept on its node, started again on request).
    Stopped,
}

impl InstanceState {
    /// Every state, in the order an instance goes through them.
    pub const ALL: [InstanceState; 8] = [
        InstanceState::Pending,
        InstanceState::Placed,
        InstanceState::Fetching,
        InstanceState::Starting,
        InstanceState::Ready,
        InstanceState::Failed,
        InstanceState::Lost,
        InstanceState::Stopped,
    ];

    /// Whether an instance in this state may go to `next`.
    pub fn can_become(self, next: InstanceState) -> bool {
        use InstanceState::*;
        match (self, next) {
            (Pending, Placed) | (Placed, Fetching) | (Fetching, Starting) | (Starting, Ready) => true,
            // Skipping ahead: an image already cached needs no fetching.
            (Placed, Starting) => true,
            (s, Failed) => s != Failed,
            (Placed | Fetching | Starting | Ready | Stopped, Lost) => true,
            (Ready, Stopped) | (Stopped, Starting) => true,
            (Failed | Lost, Pending | Placed) => true,
            _ => false,
        }
    }

    /// The state's name as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Placed => "placed",
            InstanceState::Fetching => "fetching",
            InstanceState::Starting => "starting",
            InstanceState::Ready => "ready",
            InstanceState::Failed => "failed",
            InstanceState::Lost => "lost",
            InstanceState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::InstanceState::*;
    use super::*;

    #[test]
    fn states_move_forward_fail_from_anywhere_and_come_back_only_through_placement() {
        let path = [Pending, Placed, Fetching, Starting, Ready];
        for w in path.windows(2) {
            assert!(w[0].can_become(w[1]), "{} -> {}", w[0], w[1]);
            assert!(!w[1].can_become(w[0]), "{} -> {} goes back", w[1], w[0]);
        }
        for s in InstanceState::ALL {
            assert_eq!(s.can_become(Failed), s != Failed, "{s} -> failed");
            assert!(!s.can_become(s), "{s} -> itself");
        }
        assert!(Ready.can_become(Lost) && !Pending.can_become(Lost), "only an instance on a node can be lost");
        assert!(Lost.can_become(Placed) && Failed.can_become(Pending));
        assert!(!Ready.can_become(Placed), "a running instance is not placed again");
        assert!(Ready.can_become(Stopped) && Stopped.can_become(Starting) && !Stopped.can_become(Ready) && !Pending.can_become(Stopped));
        for s in InstanceState::ALL {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
        assert_eq!(serde_json::to_string(&Kind::Vm).unwrap(), "\"vm\"");
        assert!(serde_json::from_str::<Kind>("\"lxc\"").is_err());
    }
}
