//! Converting disk images to and from the bootcache container.
//!
//! ```text
//!  ImageSource (raw, ...) ─┐                        ┌─► .bcimg (bootcache-format)
//!                          ├─► plan ─► read batch ─► encode in parallel ─┘
//!  Traces (boot order) ────┘   (boot first,   (bounded    (zstd, BLAKE3,
//!                               rest after)    memory)     zero detection)
//!  .bcimg ─► export ─► ImageSink (raw, ...)
//! ```
//!
//! The policy (which bytes are boot bytes, how they are aligned and cut)
//! lives in [`plan`]; the format crate only lays out what it is given.
//!
//! ```no_run
//! use std::fs::File;
//! use bootcache_convert::{ConvertOptions, RawSource, convert};
//! use bootcache_trace::Trace;
//!
//! let src = RawSource::open("disk.raw".as_ref())?;
//! let traces = vec![Trace::open("boot.bctrace".as_ref())?];
//! let out = File::create("disk.bcimg")?;
//! let opts = ConvertOptions { zstd_level: Some(3), ..Default::default() };
//! let (_file, report) = convert(&src, &traces, out, &opts, &|_done| {})?;
//! println!("boot segment: {} bytes, root digest {}", report.boot_segment_bytes, report.root_digest);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

mod image;
mod pipeline;
pub mod plan;
pub mod qcow2;
mod raw;

pub use image::{ImageSink, ImageSource};
pub use pipeline::{ConvertError, ConvertOptions, ConvertReport, convert, export, planned_bytes};
pub use raw::{RawSink, RawSource};
