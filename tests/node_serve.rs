//! `bootcache node serve` as a process: its memory under a flood of NBD
//! reads nobody reads back, its NBD socket and its API token.

mod support;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::deliver::{Killed, NodeProc, bootcache_bin, free_port, store};

/// A 64 MiB container (zeros) on a store; its URL.
fn image(dir: &Path) -> (Killed, String) {
    let store_dir = dir.join("store");
    std::fs::create_dir_all(&store_dir).unwrap();
    let raw = dir.join("disk.raw");
    std::fs::File::create(&raw).unwrap().set_len(64 << 20).unwrap();
    let out = Command::new(bootcache_bin()).args(["convert", "-q"]).arg(&raw).arg(store_dir.join("disk.bcimg")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let port = free_port().unwrap();
    (store(&store_dir, port), format!("http://127.0.0.1:{port}/disk.bcimg"))
}

/// NBD handshake (fixed newstyle, NBD_OPT_GO) on a blocking socket.
fn go(sock: &Path, name: &str) -> UnixStream {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&0u16.to_be_bytes());
    let mut opt = b"IHAVEOPT".to_vec();
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
    opt.extend_from_slice(&data);
    s.write_all(&opt).unwrap();
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).unwrap();
        let mut body = vec![0u8; u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut body).unwrap();
        match u32::from_be_bytes(head[12..16].try_into().unwrap()) {
            1 => return s,
            3 => {}
            k => panic!("NBD_OPT_GO answered {k:#x}: {}", String::from_utf8_lossy(&body)),
        }
    }
}

fn read_request(cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// Six clients each sending seventy reads of 32 MiB that they never read
/// back (2.2 GiB of replies each), and three hundred more connections: the
/// node's memory stays under its bound (256 MiB of read data in flight or
/// queued, 32 MiB of kept buffers, the process itself), it still answers,
/// and it still serves.
#[test]
fn a_flood_of_unread_nbd_reads_keeps_the_node_under_its_memory_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, url) = image(dir.path());
    let node = NodeProc::start_in(
        bootcache_bin(),
        None,
        None,
        &dir.path().join("cache"),
        &dir.path().join("node"),
        &dir.path().join("token"),
        &["--background", "off"],
    )
    .unwrap();
    node.open("disk", &url, &[]).unwrap();
    let base = node.peak_rss().unwrap();
    let mut floods: Vec<UnixStream> = (0..6).map(|_| go(&node.socket, "disk")).collect();
    for s in &mut floods {
        s.set_nonblocking(true).unwrap();
        for i in 0..70u64 {
            // The node stops reading requests once the budget is spent.
            let _ = s.write_all(&read_request(i, (i % 2) * (32 << 20), 32 << 20));
        }
    }
    let mut idle: Vec<UnixStream> = (0..300).filter_map(|_| UnixStream::connect(&node.socket).ok()).collect();
    std::thread::sleep(Duration::from_secs(3));
    node.get("/metrics").expect("the node answers during the flood");
    let peak = node.peak_rss().unwrap();
    eprintln!("node peak RSS {} MiB (before the flood {} MiB)", peak >> 20, base >> 20);
    assert!(peak < 400 << 20, "the node grew to {} MiB under unread reads", peak >> 20);
    drop(floods);
    idle.clear();
    std::thread::sleep(Duration::from_millis(500));
    let mut s = go(&node.socket, "disk");
    s.write_all(&read_request(1, 0, 4096)).unwrap();
    let mut reply = vec![0u8; 16 + 4096];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[4..8], &[0, 0, 0, 0], "the node still serves reads");
}

fn node_serve(dir: &Path, socket: &Path, extra: &[&str]) -> std::process::Output {
    let port = free_port().unwrap();
    let mut child = Command::new(bootcache_bin())
        .args(["node", "serve", "--api", &format!("127.0.0.1:{port}"), "--cache-dir"])
        .arg(dir.join("cache-x"))
        .arg("--nbd-socket")
        .arg(socket)
        .arg("--token-file")
        .arg(dir.join("token"))
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    panic!("node serve {extra:?} did not refuse: {:?}", child.wait_with_output().unwrap());
}

#[test]
fn the_nbd_socket_is_never_a_file_nor_a_live_socket_and_tcp_needs_consent() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("precious");
    std::fs::write(&file, "not a socket").unwrap();
    let out = node_serve(dir.path(), &file, &[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not a socket"), "{out:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a socket", "the file was replaced");

    let a =
        NodeProc::start_in(bootcache_bin(), None, None, &dir.path().join("cache"), &dir.path().join("a"), &dir.path().join("token"), &[])
            .unwrap();
    let out = node_serve(dir.path(), &a.socket, &[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("in use"), "{out:?}");
    a.get("/metrics").expect("the first node is unharmed");
    let mut greeting = [0u8; 8];
    UnixStream::connect(&a.socket).unwrap().read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"NBDMAGIC", "its socket still serves");

    let out = node_serve(dir.path(), &dir.path().join("t.sock"), &["--nbd-listen", "0.0.0.0:10809"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--nbd-insecure"), "{out:?}");

    // A socket left by a node that died is replaced.
    let socket = a.socket.clone();
    drop(a);
    assert!(socket.exists());
    let b =
        NodeProc::start_in(bootcache_bin(), None, None, &dir.path().join("cache"), &dir.path().join("a"), &dir.path().join("token"), &[])
            .unwrap();
    b.get("/metrics").unwrap();
}

/// A URL's password and query (a signed URL's signature) reach neither the
/// node's log nor its listing.
#[test]
fn credentials_in_urls_are_not_logged() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, url) = image(dir.path());
    let work = dir.path().join("node");
    let node =
        NodeProc::start_in(bootcache_bin(), None, None, &dir.path().join("cache"), &work, &dir.path().join("token"), &["-vv"]).unwrap();
    let secret = url.replace("http://", "http://user:s3cr3t@") + "?sig=s3cr3t";
    node.open("disk", &secret, &[]).unwrap();
    let listed = node.get("/images").unwrap();
    let log = std::fs::read_to_string(work.join("node.log")).unwrap();
    assert!(log.contains("user:***") && log.contains("cache open"), "{log}");
    assert!(!log.contains("s3cr3t") && !listed.contains("s3cr3t"), "{listed}\n{log}");
}

#[test]
fn the_token_is_private_printed_and_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token"); // what node_serve gives --token-file
    let token = |extra: &[&str]| {
        let out = Command::new(bootcache_bin()).args(["node", "token", "--token-file"]).arg(&file).args(extra).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let first = token(&[]);
    assert!(first.len() == 64 && first.bytes().all(|b| b.is_ascii_hexdigit()), "{first}");
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(token(&[]), first, "printed again, not remade");
    let second = token(&["--rotate"]);
    assert_ne!(second, first);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{second}\n{first}\n"), "the previous token stays accepted");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = node_serve(dir.path(), &dir.path().join("n.sock"), &[]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("chmod 600"), "{out:?}");
}
