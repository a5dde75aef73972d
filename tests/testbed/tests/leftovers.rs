//! Nothing outlives the testbed: what is left running in its namespaces
//! goes with it. Its own binary: a test process holds one testbed at a time
//! (the namespaces are named by the process). Needs root.

use std::time::{Duration, Instant};

use bootcache_testbed::Testbed;

#[test]
fn a_process_left_in_a_namespace_goes_with_the_testbed() {
    let tb = Testbed::new(&["store", "node"]).unwrap();
    // Detached, as a daemon's or an agent's child is once its parent is
    // killed: not ours to wait for.
    let out = tb.command("node", "sh").args(["-c", "setsid sleep 600 >/dev/null 2>&1 & echo $!"]).output().unwrap();
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "the sleeper runs: {pid:?}");
    drop(tb);
    let gone = Instant::now();
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z ")) {
        assert!(gone.elapsed() < Duration::from_secs(5), "pid {pid} is still running after the testbed went");
        std::thread::sleep(Duration::from_millis(50));
    }
}
