//! Boot I/O traces: the records a recorder writes, the trace file, the
//! interval algebra that turns reads into a boot set, and the boot I/O study.
//!
//! ```text
//!  reads (t, offset, length) ──► Trace file ──► AccessOrder ──► IntervalSet D
//!                                   │              (first-access      (union,
//!                                   ▼               pieces)           k-of-n, align)
//!                                analyze ──► JSON, PNG/SVG plots
//! ```
//!
//! ```
//! use bootcache_trace::{AccessOrder, IntervalSet, Record};
//!
//! let reads = [Record::read(0, 4096, 4096), Record::read(1, 0, 8192), Record::read(2, 100, 10)];
//! let d = IntervalSet::from_ranges(reads.iter().filter_map(Record::boot_bytes));
//! assert_eq!((d.bytes(), d.len()), (8192, 1));
//! let order = AccessOrder::from_timed(reads.iter().map(|r| (r.boot_bytes().unwrap(), r.t_ns)));
//! let firsts: Vec<_> = order.pieces().iter().map(|p| p.range.clone()).collect();
//! assert_eq!(firsts, vec![4096..8192, 0..4096]);
//! ```

#![deny(missing_docs)]

pub mod analysis;
pub mod csv;
pub mod file;
pub mod intervals;
#[cfg(feature = "plot")]
pub mod plot;
mod record;
#[cfg(feature = "record")]
pub mod recorder;
pub mod synth;

pub use analysis::{Analysis, Coverage, analyze, coverage};
pub use file::{ImageIdentity, OffsetSpace, Trace, TraceError, TraceInfo, TraceWriter};
pub use intervals::{AccessOrder, IntervalSet, Piece};
pub use record::{Class, Op, Record};

#[cfg(test)]
mod tests;
