//! Converting disk images to and from the bootcache container.
//!
//! ```text
//!  ImageSource (raw, qcow2) ─┐                          ┌─► .bcimg (bootcache-format)
//!                            ├─► plan ─► reader thread ─► encode in parallel ─► writer thread
//!  Traces (boot order) ──────┘   (boot first,  (recycled    (zstd, BLAKE3,
//!                                 rest after)   buffers)     zero detection)
//!  .bcimg ─► export ─► ImageSink (raw, qcow2)
//! ```
//!
//! The policy (which bytes are boot bytes, how they are aligned and cut)
//! lives in [`plan`]; the format crate only lays out what it is given.
//!
//! ```no_run
//! use std::fs::File;
//! use bootcache_convert::{ConvertOptions, convert, open};
//! use bootcache_trace::Trace;
//!
//! // Raw or qcow2 (with its backing chain), by the file's magic; any other
//! // format it names is refused, never read as raw.
//! let src = open("golden.qcow2".as_ref(), None)?.source;
//! let traces = vec![Trace::open("boot.bctrace".as_ref())?];
//! let out = File::create("golden.bcimg")?;
//! let opts = ConvertOptions { zstd_level: Some(3), ..Default::default() };
//! let (_file, report) = convert(src.as_ref(), &traces, out, &opts, &|_done| {})?;
//! println!("boot segment: {} bytes, root digest {}", report.boot_segment_bytes, report.root_digest);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

mod image;
mod mapped;
mod open;
pub mod output;
mod pipeline;
pub mod plan;
pub mod qcow2;
mod raw;

pub use image::{ImageSink, ImageSource};
pub use open::{Format, OpenError, Opened, by_magic, detect, open, open_file};
pub use pipeline::{
    ConvertError, ConvertOptions, ConvertReport, LAYER_GRAIN, LayerReport, convert, convert_layer, export, export_chain, layer_changes,
    planned_bytes,
};
pub use raw::{RawSink, RawSource};
