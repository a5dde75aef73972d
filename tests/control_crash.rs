//! A lab is one atomic thing: a real control node on loopback is killed
//! (SIGKILL) at chosen instants while it records re-deploys of a lab of
//! 10,000 instances, 20 times; after each restart its database holds the
//! lab as it was or as it was being deployed, whole: its file and exactly
//! its instances, never a mix, never more than a lab may have.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bootcache_api::Name;
use bootcache_control::db::Db;

const BIN: &str = env!("CARGO_BIN_EXE_bootcache");
const TOKEN: &str = "crash-test-token-0123456789abcdef012345";

struct Control(Child);

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn start(dir: &Path, port: u16) -> Control {
    let child = Command::new(BIN)
        .args(["control", "serve", "--listen", &format!("127.0.0.1:{port}"), "--heartbeat", "60", "--db"])
        .arg(dir.join("control.db"))
        .arg("--token-file")
        .arg(dir.join("token"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(dir.join("control.log")).unwrap())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(20), "the control node did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    Control(child)
}

fn variant(k: usize) -> String {
    let defs: &[(&str, u32, &str)] = match k % 3 {
        0 => &[("a", 6000, "1MiB"), ("b", 4000, "1MiB")],
        1 => &[("a", 6000, "2MiB"), ("c", 4000, "1MiB")],
        _ => &[("d", 10_000, "1MiB")],
    };
    let mut text = String::from("name: big\nsegments:\n  lan:\n    subnet: 10.0.0.0/8\ninstances:\n");
    for (name, count, memory) in defs {
        text += &format!(
            "  {name}:\n    kind: container\n    image: http://10.1.0.1:8080/x.tar\n    count: {count}\n    memory: {memory}\n    segments: [lan]\n"
        );
    }
    text
}

/// The lab as the database holds it: which variant, checked whole.
fn recorded(db_path: &Path, texts: &[String]) -> Option<usize> {
    let db = Db::open(db_path).unwrap();
    let big: Name = "big".parse().unwrap();
    let text = db.lab_text(&big).unwrap()?;
    let k = texts.iter().position(|t| *t == text).unwrap_or_else(|| panic!("a lab file that was never sent:\n{text}"));
    let lab = db.lab(&big).unwrap().unwrap();
    let want: BTreeSet<Name> = lab.instances().into_iter().map(|i| i.name).collect();
    let rows = db.instances_brief(&big).unwrap();
    assert!(rows.len() <= 10_000, "{} instances: over the limit", rows.len());
    let have: BTreeSet<Name> = rows.iter().map(|r| r.spec.name.clone()).collect();
    assert_eq!(have.len(), rows.len());
    assert!(have == want, "variant {k} recorded with other instances: {} rows, {} wanted", have.len(), want.len());
    let uids: BTreeSet<u32> = rows.iter().map(|r| r.uid).collect();
    assert_eq!(uids.len(), rows.len(), "numbers unique");
    Some(k)
}

#[test]
fn a_control_node_killed_while_it_records_a_lab_restarts_with_one_whole_lab() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), TOKEN).unwrap();
    std::fs::set_permissions(dir.path().join("token"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let texts: Vec<String> = (0..3).map(variant).collect();
    for (k, t) in texts.iter().enumerate() {
        std::fs::write(dir.path().join(format!("v{k}.yaml")), t).unwrap();
    }
    // The request written whole, then the control node killed `at` later.
    let send = |k: usize| {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let body = &texts[k];
        write!(s, "POST /labs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n{body}", body.len())
            .unwrap();
        s
    };
    let mut control = start(dir.path(), port);
    let first = Command::new(BIN)
        .args(["deploy", "--no-wait", "-f"])
        .arg(dir.path().join("v0.yaml"))
        .args(["--control", &url, "--token-file"])
        .arg(dir.path().join("token"))
        .output()
        .unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let db_path = dir.path().join("control.db");
    let mut now = recorded(&db_path, &texts).expect("the first lab");
    assert_eq!(now, 0);
    let (mut old, mut new) = (0, 0);
    for round in 0..20 {
        let next = (now + 1) % 3;
        let request = send(next);
        // Kill it 50 to 400 ms into the deploy (about 220 ms long in a debug
        // build here), spread over the rounds: before, during and after the
        // transaction.
        let at = Duration::from_millis(50 + (round as u64 * 71) % 351);
        std::thread::sleep(at);
        drop(control);
        drop(request);
        control = start(dir.path(), port);
        let k = recorded(&db_path, &texts).expect("a lab");
        assert!(k == now || k == next, "round {round}: variant {k}, neither the old {now} nor the new {next}");
        if k == now {
            old += 1;
        } else {
            new += 1;
        }
        eprintln!("round {round}: killed {} ms in: the {} lab", at.as_millis(), if k == now { "old" } else { "new" });
        now = k;
    }
    eprintln!("{old} restarts with the old lab, {new} with the new");
    drop(control);
}
