//! Types the control node and the compute agents share: the names of
//! things, the kinds of instances and the states an instance goes through.
//! Data only (serde), no I/O: both sides, and anything that talks to them,
//! build on these.
//!
//! ```text
//!  lab file ──► control node ──(Name, Kind, InstanceState, RootDigest)──► agent
//!                    ▲                                                      │
//!                    └──────────────── observed states ◄───────────────────┘
//! ```
//!
//! ```
//! use bootcache_api::{InstanceState, InterfaceName, Name};
//!
//! let vm: Name = "web-1".parse()?;
//! let bridge: InterfaceName = "bc-lan0".parse()?;
//! assert!("a/b".parse::<Name>().is_err());
//! assert!(InstanceState::Pending.can_become(InstanceState::Placed));
//! assert!(!InstanceState::Ready.can_become(InstanceState::Pending));
//! # let _ = (vm, bridge);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub mod agent;
pub mod control;
pub mod image;
pub mod lab;
mod name;
pub mod reference;
mod state;

pub use bootcache_format::RootDigest;
pub use image::Image;
pub use lab::{Lab, LabError};
pub use name::{BadName, InterfaceName, Name};
pub use state::{InstanceState, Kind};
