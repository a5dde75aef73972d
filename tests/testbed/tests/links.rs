//! The testbed's links do what they say: round-trip time and rate, measured
//! with real TCP between two namespaces. Needs root.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bootcache_testbed::{Link, Testbed};

/// Starts a one-file HTTP server (python's) in `host`, serving `bytes` bytes.
fn serve(tb: &Testbed, host: &str, dir: &std::path::Path, bytes: usize) -> std::process::Child {
    std::fs::write(dir.join("blob"), vec![7u8; bytes]).unwrap();
    let child = tb
        .command(host, "python3")
        .args(["-m", "http.server", "8000", "--bind", &tb.host(host).addr.to_string(), "--directory"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !curl(tb, "node", &format!("http://{}:8000/", tb.host(host).addr), "%{http_code}").starts_with("200") {
        assert!(start.elapsed() < Duration::from_secs(10), "the HTTP server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn curl(tb: &Testbed, from: &str, url: &str, format: &str) -> String {
    let out = tb.command(from, "curl").args(["-s", "-o", "/dev/null", "-w", format, url]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn rtt_and_rate_are_what_the_link_says_and_the_root_namespace_cannot_reach_the_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let mut tb = Testbed::new(&["store", "node"]).unwrap();
    let mut server = serve(&tb, "store", dir.path(), 25 << 20);
    let url = format!("http://{}:8000/blob", tb.host("store").addr);

    // Outside the namespaces the testbed's addresses go nowhere.
    let outside = Command::new("curl").args(["-s", "-m", "2", "-o", "/dev/null", &url]).status().unwrap();
    assert!(!outside.success(), "the root namespace reached a testbed host");

    for link in [Link::new(100, 2.0), Link::new(100, 20.0), Link::new(1000, 2.0)] {
        tb.shape(link).unwrap();
        // TCP connect takes one round trip.
        let mut rtts: Vec<f64> = (0..5).map(|_| curl(&tb, "node", &url, "%{time_connect}").parse::<f64>().unwrap() * 1000.0).collect();
        rtts.sort_by(f64::total_cmp);
        let rtt = rtts[2];
        let secs: f64 = curl(&tb, "node", &url, "%{time_total}").parse().unwrap();
        let mbit = (25 << 20) as f64 * 8.0 / secs / 1e6;
        eprintln!("{link}: connect {rtt:.2} ms (median of 5), 25 MiB in {secs:.2} s = {mbit:.0} Mbit/s");
        assert!(rtt >= link.rtt_ms * 0.9 && rtt <= link.rtt_ms + 3.0, "{link}: measured RTT {rtt:.2} ms");
        // Rate: within the link's limit, and not far below it (slow start
        // costs more round trips at 20 ms).
        assert!(mbit <= f64::from(link.rate_mbit) * 1.05, "{link}: {mbit:.0} Mbit/s is over the limit");
        assert!(mbit >= f64::from(link.rate_mbit) * 0.5, "{link}: only {mbit:.0} Mbit/s");
    }
    let _ = server.kill();
    let _ = server.wait();
}
