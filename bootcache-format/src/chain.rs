//! A layer and its parents, read as one disk.
//!
//! ```text
//!   layer 0 (role)    ···[r]·······[z]·······[r r]·····   own extents, zero extents mask
//!   layer 1 (base)    [b b b][b]···[b b]··[b]···[b b b]   what layer 0 does not cover
//!   map               [b b b][r][b][z][b]·[b][r r][b b]   topmost extent at each byte
//! ```
//!
//! [`Chain::open`] follows `parent_digest` from the image opened down to an
//! image that stands alone, asking the caller for each parent (by the locator
//! the child recorded and the root digest it names), and refuses a parent
//! that is missing, is not the image named, or does not fit (depth, size, a
//! boot order entry naming no extent). Every byte read is verified against
//! the digest of the extent it comes from, in whichever layer that is.

use std::collections::HashSet;
use std::io;
use std::ops::Range;

use crate::RootDigest;
use crate::header::MAX_CHAIN_LAYERS;
use crate::index::{Encoding, Entry};
use crate::io::ReadAt;
use crate::reader::{CheckReport, Error, Image, ParentError};

/// What a layer says about its parent, given to the function that finds it.
#[derive(Clone, Copy, Debug)]
pub struct ParentRef<'a> {
    /// Where the child says the parent is (its `parent_locator`), commonly a
    /// file name beside the child.
    pub locator: Option<&'a str>,
    /// The parent's root digest, which the file found must have.
    pub digest: RootDigest,
}

/// A guest range and the extent it is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Guest bytes.
    pub guest: Range<u64>,
    /// The layer: 0 the image opened, 1 its parent, ...
    pub layer: usize,
    /// Position of the extent in that layer's index.
    pub entry: usize,
}

/// An image and its parents, checked to fit together.
#[derive(Debug)]
pub struct Chain<R> {
    layers: Vec<Image<R>>,
    map: Vec<Piece>,
    stream: Vec<(usize, usize)>,
}

impl<R: ReadAt> Chain<R> {
    /// Opens the chain under `top` (a file opened with [`Image::open_layer`]),
    /// calling `find` for each parent in turn. An image that stands alone
    /// is a chain of one, and `find` is not called.
    ///
    /// # Errors
    /// [`Error::Parent`] naming a parent that cannot be opened, is invalid,
    /// does not match its digest or makes the chain too deep;
    /// [`Error::Chain`] for layers that do not fit together.
    pub fn open(top: Image<R>, mut find: impl FnMut(ParentRef<'_>) -> io::Result<R>) -> Result<Self, Error> {
        let mut seen = HashSet::from([top.root_digest()]);
        let mut layers = vec![top];
        while let Some(digest) = layers.last().and_then(|l| l.header().parent) {
            let child = layers.len() - 1;
            let locator = layers[child].metadata().parent_locator.clone();
            let fail = |source| Error::Parent { child, locator: locator.clone(), digest, source: Box::new(source) };
            if layers.len() >= usize::from(MAX_CHAIN_LAYERS) || !seen.insert(digest) {
                return Err(fail(ParentError::TooDeep));
            }
            let src = find(ParentRef { locator: locator.as_deref(), digest }).map_err(|e| fail(ParentError::Missing(e)))?;
            let parent = Image::open_layer(src).map_err(|e| fail(ParentError::Invalid(e)))?;
            if parent.root_digest() != digest {
                return Err(fail(ParentError::Mismatch { found: parent.root_digest() }));
            }
            let (c, p) = (layers[child].header(), parent.header());
            let layer = child + 1;
            if p.layer_depth + 1 != c.layer_depth {
                let why = format!("is {} layers above its base, its child {}", p.layer_depth, c.layer_depth);
                return Err(Error::Chain { layer, why });
            }
            if p.virtual_size > c.virtual_size {
                let why = format!("a disk of {} bytes under a child of {}", p.virtual_size, c.virtual_size);
                return Err(Error::Chain { layer, why });
            }
            layers.push(parent);
        }
        let map = layers.iter().enumerate().rev().fold(Vec::new(), |lower, (layer, image)| {
            let upper =
                image.index().entries().iter().enumerate().map(|(entry, e)| Piece { guest: e.guest.clone(), layer, entry }).collect();
            overlay(lower, upper)
        });
        let mut chain = Chain { layers, map, stream: Vec::new() };
        for layer in 0..chain.layers.len() {
            let stream = chain.resolve_order(layer)?;
            if layer == 0 {
                chain.stream = stream;
            }
        }
        Ok(chain)
    }

    /// The boot stream of `layer` as (layer, entry) pairs of this chain.
    fn resolve_order(&self, layer: usize) -> Result<Vec<(usize, usize)>, Error> {
        let image = &self.layers[layer];
        if image.header().parent.is_none() {
            let entries = image.index().entries();
            return Ok(image.index().boot_order().map(|e| (layer, entries.partition_point(|x| x.guest.start < e.guest.start))).collect());
        }
        let mut stream = Vec::with_capacity(image.boot_refs().len());
        for r in image.boot_refs() {
            let at = layer + usize::from(r.layer);
            let entries = self.layers[at].index().entries();
            let pos = entries.partition_point(|e| e.guest.start < r.guest_offset);
            match entries.get(pos) {
                Some(e) if e.guest.start == r.guest_offset => {
                    if e.encoding != Encoding::Zero {
                        stream.push((at, pos)); // a zero extent stores nothing to fetch
                    }
                }
                _ => {
                    let why = format!("its boot order names an extent at {:#x} that layer {at} does not have", r.guest_offset);
                    return Err(Error::Chain { layer, why });
                }
            }
        }
        Ok(stream)
    }

    /// The layers, the image opened first.
    pub fn layers(&self) -> &[Image<R>] {
        &self.layers
    }

    /// The image opened.
    pub fn top(&self) -> &Image<R> {
        &self.layers[0]
    }

    /// Size of the disk.
    pub fn virtual_size(&self) -> u64 {
        self.top().virtual_size()
    }

    /// Which extent every mapped guest range is read from, in guest order.
    /// Ranges no piece covers read as zero.
    pub fn map(&self) -> &[Piece] {
        &self.map
    }

    /// The extent a piece is read from.
    pub fn entry(&self, piece: &Piece) -> &Entry {
        &self.layers[piece.layer].index().entries()[piece.entry]
    }

    /// The extents the top image's boot reads, in the order it first read
    /// them, each with its layer: what a node with nothing of the chain
    /// fetches first. Zero extents have no place in it.
    pub fn boot_stream(&self) -> impl Iterator<Item = (usize, &Entry)> {
        self.stream.iter().map(|&(layer, entry)| (layer, &self.layers[layer].index().entries()[entry]))
    }

    /// Fills `buf` with the guest bytes at `offset`, each verified.
    ///
    /// # Errors
    /// [`Error::OutOfRange`] past the virtual size, or a bad extent in any layer.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), Error> {
        let len = buf.len() as u64;
        let size = self.virtual_size();
        let end = offset.checked_add(len).filter(|&e| e <= size).ok_or(Error::OutOfRange { offset, len, size })?;
        buf.fill(0);
        let first = self.map.partition_point(|p| p.guest.end <= offset);
        for piece in self.map[first..].iter().take_while(|p| p.guest.start < end) {
            let entry = self.entry(piece);
            if entry.encoding == Encoding::Zero {
                continue;
            }
            let data = self.layers[piece.layer].cached_extent(piece.entry)?;
            let (from, to) = (piece.guest.start.max(offset), piece.guest.end.min(end));
            let src = &data[to_usize(from - entry.guest.start)..to_usize(to - entry.guest.start)];
            buf[to_usize(from - offset)..to_usize(to - offset)].copy_from_slice(src);
        }
        Ok(())
    }

    /// Verifies every extent of every layer.
    ///
    /// # Errors
    /// The first bad extent, as [`Error::Chain`] naming its layer.
    pub fn check(&self, mut progress: impl FnMut(u64)) -> Result<CheckReport, Error> {
        let mut total = CheckReport::default();
        for (layer, image) in self.layers.iter().enumerate() {
            let report = image.check(&mut progress).map_err(|e| match e {
                e @ Error::BadExtent { .. } if layer > 0 => Error::Chain { layer, why: e.to_string() },
                e => e,
            })?;
            total.extents += report.extents;
            total.stored_bytes += report.stored_bytes;
            total.guest_bytes += report.guest_bytes;
        }
        Ok(total)
    }
}

/// `upper` laid over `lower`: each sorted by guest offset without overlap;
/// the result too.
fn overlay(lower: Vec<Piece>, upper: Vec<Piece>) -> Vec<Piece> {
    let mut out = Vec::with_capacity(lower.len() + upper.len());
    for p in lower {
        let mut at = p.guest.start;
        let first = upper.partition_point(|u| u.guest.end <= p.guest.start);
        for u in upper[first..].iter().take_while(|u| u.guest.start < p.guest.end) {
            if u.guest.start > at {
                out.push(Piece { guest: at..u.guest.start, ..p.clone() });
            }
            at = at.max(u.guest.end);
        }
        if at < p.guest.end {
            out.push(Piece { guest: at..p.guest.end, ..p });
        }
    }
    out.extend(upper);
    out.sort_unstable_by_key(|p| p.guest.start);
    out
}

fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(r: Range<u64>, layer: usize) -> Piece {
        Piece { guest: r, layer, entry: 0 }
    }

    #[test]
    fn an_upper_layer_hides_what_it_covers_and_nothing_else() {
        let lower = vec![p(0..100, 1), p(100..200, 1), p(300..400, 1)];
        let upper = vec![p(50..150, 0), p(250..260, 0), p(390..500, 0)];
        let map = overlay(lower, upper);
        let got: Vec<(Range<u64>, usize)> = map.iter().map(|p| (p.guest.clone(), p.layer)).collect();
        assert_eq!(got, vec![(0..50, 1), (50..150, 0), (150..200, 1), (250..260, 0), (300..390, 1), (390..500, 0)]);
    }
}
