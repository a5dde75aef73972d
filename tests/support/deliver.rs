//! Stores, nodes and guests for the delivery tests: the testbed's programs,
//! and the comparison of an export with its source.

use std::path::Path;
use std::process::Command;

#[allow(unused_imports, reason = "each test file uses its own part")]
pub use bootcache_testbed::programs::{Killed, Nginx, NodeProc, free_port, overlay, start_vm, wait_markers, wait_port};

/// The `bootcache` binary under test.
pub fn bootcache_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_bootcache"))
}

/// `bootcache store serve DIR` on loopback at `port`, once it answers.
pub fn store(dir: &Path, port: u16) -> Killed {
    let mut child = Command::new(bootcache_bin())
        .args(["store", "serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg(dir)
        .spawn()
        .expect("bootcache store serve");
    wait_port(port, &mut child, "bootcache store serve").unwrap();
    Killed(child)
}

/// The source image and an NBD export of it compare equal, byte for byte
/// (`qemu-img compare` through QEMU's NBD client).
pub fn assert_export_equals(image: &Path, nbd_url: &str) {
    let cmp = Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(image).arg(nbd_url).output().unwrap();
    assert!(
        cmp.status.success(),
        "the export differs from the source: {}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
}
