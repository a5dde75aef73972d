//! Any bytes given to the qcow2 reader (as a file): an error or a readable
//! disk, never a panic or a hang; bytes the reader offers straight from its
//! mapping of the file equal what it reads; the trace mapping copes too.
#![no_main]

use std::sync::OnceLock;

use bootcache_convert::open;
use bootcache_convert::qcow2::{Qcow2, map_trace};
use bootcache_trace::{OffsetSpace, Record, Trace};
use libfuzzer_sys::fuzz_target;

fn path() -> &'static std::path::Path {
    static P: OnceLock<std::path::PathBuf> = OnceLock::new();
    P.get_or_init(|| std::env::temp_dir().join(format!("bootcache-fuzz-{}.qcow2", std::process::id())))
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(path(), data).expect("write the input");
    if let Ok(image) = open(path(), None).map(|o| o.source) {
        let size = image.size();
        let mut buf = vec![0u8; 8192];
        for off in [0, size / 2, size.saturating_sub(8192)] {
            let len = (size - off.min(size)).min(8192) as usize;
            let read = image.read_at(&mut buf[..len], off);
            if let Some(mapped) = image.map(off..off + len as u64) {
                assert!(read.is_ok() && mapped == &buf[..len], "mapped bytes differ from read bytes at {off:#x}");
            }
        }
        let _ = image.allocated();
    }
    if let Ok(q) = Qcow2::open(path()) {
        let trace =
            Trace { space: OffsetSpace::ImageFile, records: (0..8).map(|i| Record::read(i, i * 4096, 4096)).collect(), ..Trace::default() };
        let _ = map_trace(&trace, &q);
    }
});
