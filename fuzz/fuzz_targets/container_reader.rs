//! Any bytes given to the container reader: an error or a consistent image,
//! never a panic. Input holding several images (split where the magic
//! appears again) is read as a layer followed by its parents.
#![no_main]

use bootcache_format::{Chain, Image, MAGIC};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(image) = Image::open(data.to_vec()) {
        let size = image.virtual_size();
        // Every extent either verifies or is named as bad; reads agree with that.
        let checked = image.check(|_| {});
        let mut buf = vec![0u8; 4096];
        for e in image.index().entries().iter().take(64) {
            let len = (e.guest_len() as usize).min(buf.len());
            let read = image.read_at(&mut buf[..len], e.guest.start);
            if checked.is_ok() {
                read.expect("a checked image reads");
            }
        }
        let _ = image.read_at(&mut buf[..16], size.saturating_sub(8));
    }
    let mut files = split(data).into_iter();
    let Some(top) = files.next() else { return };
    let Ok(layer) = Image::open_layer(top.to_vec()) else { return };
    let Ok(chain) = Chain::open(layer, |_| files.next().map(<[u8]>::to_vec).ok_or_else(|| std::io::ErrorKind::NotFound.into())) else {
        return;
    };
    let checked = chain.check(|_| {});
    let mut buf = vec![0u8; 4096];
    for p in chain.map().iter().take(64) {
        let len = ((p.guest.end - p.guest.start) as usize).min(buf.len());
        let read = chain.read_at(&mut buf[..len], p.guest.start);
        if checked.is_ok() {
            read.expect("a checked chain reads");
        }
    }
    for (layer, entry) in chain.boot_stream().take(64) {
        let _ = chain.layers()[layer].read_extent(entry);
    }
});

/// `data` cut before every later occurrence of the magic.
fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut cuts: Vec<usize> = data.windows(MAGIC.len()).enumerate().skip(1).filter(|(_, w)| *w == MAGIC).map(|(i, _)| i).collect();
    cuts.push(data.len());
    let mut out = Vec::new();
    let mut at = 0;
    for c in cuts {
        out.push(&data[at..c]);
        at = c;
    }
    out
}
