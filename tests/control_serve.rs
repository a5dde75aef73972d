//! `bootcache control serve` as a process: it makes its token, answers only
//! with it (and nodes' joins with the join token derived from it), keeps
//! its database private and across a restart.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

use support::deliver::{Killed, bootcache_bin, free_port, wait_port};

fn control(dir: &std::path::Path, port: u16) -> Killed {
    let mut child = Command::new(bootcache_bin())
        .args(["control", "serve", "--listen", &format!("127.0.0.1:{port}"), "--db"])
        .arg(dir.join("state").join("control.db"))
        .arg("--token-file")
        .arg(dir.join("control.token"))
        .spawn()
        .expect("bootcache control serve");
    wait_port(port, &mut child, "bootcache control serve").unwrap();
    Killed(child)
}

/// One HTTP/1.1 request; the status code and the body.
fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
}

#[test]
fn the_control_node_serves_with_its_token_and_remembers_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let node = r#"{"name": "node-1", "address": "10.0.0.2:7070"}"#;
    {
        let _control = control(dir.path(), port);
        let token = std::fs::read_to_string(dir.path().join("control.token")).unwrap();
        let token = token.lines().next().unwrap();
        let printed = Command::new(bootcache_bin())
            .args(["control", "token", "--token-file"])
            .arg(dir.path().join("control.token"))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&printed.stdout).trim(), token);
        assert_eq!(http(port, "POST", "/nodes", None, node).0, 401);
        assert_eq!(http(port, "GET", "/nodes", Some("not-the-token-not-the-token-xxxxxxxx"), "").0, 401);
        let join = Command::new(bootcache_bin())
            .args(["control", "token", "--join", "--token-file"])
            .arg(dir.path().join("control.token"))
            .output()
            .unwrap();
        let join = String::from_utf8_lossy(&join.stdout).trim().to_owned();
        assert!(join.len() == 64 && join != token);
        // The join token joins a node, and does nothing else.
        let (status, joined) = http(port, "POST", "/nodes", Some(&join), node);
        assert_eq!(status, 200, "{joined}");
        assert!(joined.contains("\"secret\"") && joined.contains("\"peer_token\""), "{joined}");
        assert_eq!(http(port, "GET", "/nodes", Some(&join), "").0, 401);
        assert_eq!(http(port, "GET", "/labs", Some(&join), "").0, 401);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("state").join("control.db")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the database is the owner's only");
    }
    let _control = control(dir.path(), port);
    let token = std::fs::read_to_string(dir.path().join("control.token")).unwrap();
    let (status, body) = http(port, "GET", "/nodes", token.lines().next(), "");
    assert_eq!(status, 200);
    assert!(body.contains("node-1"), "the restarted control node forgot its nodes: {body}");
}
