//! Any bytes given to the container reader: an error or a consistent image, never a panic.
#![no_main]

use bootcache_format::Image;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(image) = Image::open(data.to_vec()) else { return };
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
});
