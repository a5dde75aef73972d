//! The boot order table of a layer: the extents its boot reads, across the
//! whole chain, in the order the boot first read them.
//!
//! A layer stores only what differs from its parent, so the bytes its boot
//! reads are spread over several files. The table lists them as one ordered
//! stream a node can fetch from a store that holds nothing of the chain yet:
//! each entry names a layer (0 is the layer itself, 1 its parent, ...) and the
//! guest offset at which one of that layer's extents starts. [`parse`] checks
//! what one file can show (layer numbers within the depth, this layer's own
//! entries exactly its boot segment in stream order, no entry twice); the
//! chain checks that every parent entry names an extent that is there.

use std::collections::HashSet;

use zerocopy::little_endian::{U16, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::header::{Header, ORDER_ENTRY_SIZE};
use crate::index::Index;

/// On-disk boot order entry. See FORMAT.md.
#[derive(Clone, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
pub struct RawOrderEntry {
    /// First guest byte of the extent named.
    pub guest_offset: U64,
    /// The layer holding it: 0 this image, 1 its parent, ...
    pub layer: U16,
    /// Zero.
    pub reserved: [u8; 6],
}

const _: () = assert!(size_of::<RawOrderEntry>() == ORDER_ENTRY_SIZE as usize);

/// One extent of a layer's boot stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BootRef {
    /// The layer holding it: 0 the image itself, 1 its parent, ...
    pub layer: u16,
    /// The guest offset at which the extent starts in that layer.
    pub guest_offset: u64,
}

/// Parses and checks the boot order table of an image.
///
/// # Errors
/// A description of the first bad entry.
pub(crate) fn parse(bytes: &[u8], header: &Header, index: &Index) -> Result<Vec<BootRef>, String> {
    let raws =
        <[RawOrderEntry]>::ref_from_bytes(bytes).map_err(|_| "the table's length is not a multiple of the entry size".to_string())?;
    let mut own = index.boot_order();
    let mut seen = HashSet::with_capacity(raws.len());
    let mut out = Vec::with_capacity(raws.len());
    for (i, raw) in raws.iter().enumerate() {
        let r = BootRef { layer: raw.layer.get(), guest_offset: raw.guest_offset.get() };
        let bad = |why: String| Err(format!("entry {i} (layer {}, guest offset {:#x}): {why}", r.layer, r.guest_offset));
        if raw.reserved != [0; 6] {
            return bad("reserved bytes are not zero".into());
        }
        if r.layer > header.layer_depth {
            return bad(format!("the image has {} layers below it", header.layer_depth));
        }
        if r.guest_offset >= header.virtual_size {
            return bad(format!("past the virtual size {:#x}", header.virtual_size));
        }
        if !seen.insert(r) {
            return bad("named twice".into());
        }
        if r.layer == 0 {
            match index.find(r.guest_offset) {
                Some(e) if e.guest.start == r.guest_offset && e.segment == crate::Segment::Boot => {}
                _ => return bad("names no boot extent of this image".into()),
            }
            if index.find(r.guest_offset).is_some_and(|e| e.encoding == crate::Encoding::Zero) {
                out.push(r);
                continue; // stores nothing: listed, skipped by readers
            }
            match own.next() {
                Some(e) if e.guest.start == r.guest_offset => {}
                Some(e) => return bad(format!("the boot segment's next extent starts at {:#x}", e.guest.start)),
                None => return bad("the boot segment has no more extents".into()),
            }
        }
        out.push(r);
    }
    if header.parent.is_some()
        && let Some(e) = own.next()
    {
        return Err(format!("the boot segment's extent at {:#x} is not in the table", e.guest.start));
    }
    Ok(out)
}

/// Serialises a table.
pub(crate) fn to_bytes(refs: &[BootRef]) -> Vec<u8> {
    let mut out = Vec::with_capacity(refs.len() * ORDER_ENTRY_SIZE as usize);
    for r in refs {
        out.extend_from_slice(
            RawOrderEntry { guest_offset: U64::new(r.guest_offset), layer: U16::new(r.layer), reserved: [0; 6] }.as_bytes(),
        );
    }
    out
}
