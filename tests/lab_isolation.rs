//! A lab is a guest on its hosts, on the namespace testbed with real
//! daemons (a store, a control node, two compute nodes each with its own
//! libvirtd, dockerd and agent): a lab that names one of the node's own
//! interfaces as its bridge (`eth0`, `lo`, Docker's `docker0`) is refused
//! with the reason and the interface is left as it was; a lab on the node's
//! own subnet deploys, talks across nodes, and the node keeps its
//! heartbeats and its routes; two labs whose names join alike run side by
//! side and go one at a time; two labs get two VNIs; destroy leaves the
//! node's addresses, routes and links as they were. Needs root.

mod support;

use std::time::{Duration, Instant};

use bootcache_testbed::Link;
use support::cluster::{Cluster, Spec, container_image};

fn cluster(dir: &std::path::Path) -> Cluster {
    let store_dir = dir.join("store");
    std::fs::create_dir(&store_dir).unwrap();
    std::fs::copy(container_image(), store_dir.join("busybox.tar")).unwrap();
    let spec = Spec {
        nodes: vec!["node-a".into(), "node-b".into()],
        daemons: true,
        agent_args: ["--ready-timeout", "120"].map(String::from).to_vec(),
        control_args: Vec::new(),
        log: "lab_isolation",
        heartbeat: 1.0,
    };
    Cluster::start(dir, &store_dir, Link::new(1000, 0.5), spec)
}

/// What of a node's own network a lab must not change: its addresses, its
/// routes (every table), and its own interfaces as they are described.
fn host_state(c: &Cluster, node: &str) -> String {
    let ns = &c.node(node).netns;
    let run = |args: &[&str]| {
        let out = std::process::Command::new("ip").args(["-n", ns]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut s = run(&["-o", "addr"]);
    s += &run(&["route", "show", "table", "all"]);
    for link in ["eth0", "lo", "docker0"] {
        // Timers tick; what the link is does not.
        let shown = run(&["-d", "link", "show", link]);
        let mut words = shown.split_whitespace();
        while let Some(w) = words.next() {
            if w.ends_with("_timer") {
                words.next();
                continue;
            }
            s.push_str(w);
            s.push(' ');
        }
    }
    s
}

fn container(name: &str, extra: &str, store: &str) -> String {
    format!(
        "  {name}:\n    kind: container\n    image: http://{store}:8080/busybox.tar\n    command: [/bin/sh, -c, \"echo up; exec sleep 1000000\"]\n    ready: up\n{extra}"
    )
}

fn deploy(c: &Cluster, dir: &std::path::Path, text: &str) -> (bool, serde_json::Value, String) {
    let file = dir.join("lab.yaml");
    std::fs::write(&file, text).unwrap();
    let out = c.cli(&["deploy", "-f", file.to_str().unwrap(), "--output", "json", "--timeout", "180"]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.success(), report, err)
}

fn destroy(c: &Cluster, lab: &str) {
    let out = c.cli(&["destroy", lab]);
    assert!(out.status.success(), "destroy {lab}: {}", String::from_utf8_lossy(&out.stderr));
}

fn id_of(report: &serde_json::Value, name: &str) -> String {
    report["instances"].as_array().unwrap().iter().find(|i| i["name"] == name).unwrap()["id"].as_str().unwrap().to_owned()
}

#[test]
fn labs_are_guests_on_their_hosts_and_on_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let c = cluster(dir.path());
    let store = c.store_addr.clone();
    let before = host_state(&c, "node-a");

    // The node's own interfaces as a lab's bridge: refused, left alone.
    for bridge in ["eth0", "lo", "docker0"] {
        let text = format!(
            "name: takeover\nsegments:\n  lan:\n    subnet: 10.97.0.0/24\n    bridge: {bridge}\ninstances:\n{}",
            container("c", "    segments: [lan]\n    node: node-a\n", &store)
        );
        let (ok, report, err) = deploy(&c, dir.path(), &text);
        assert!(!ok, "{bridge}: {err}");
        let c0 = &report["instances"][0];
        assert_eq!(c0["state"], "failed", "{bridge}: {report}");
        let why = c0["reason"].as_str().unwrap_or("");
        assert!(why.contains(bridge) && why.contains("was not made by its agent"), "{bridge}: {why}");
        destroy(&c, "takeover");
        assert_eq!(host_state(&c, "node-a"), before, "{bridge}: the node's network changed");
    }

    // A lab on the node's own subnet, across both nodes: it deploys, its
    // containers reach each other, and nothing of it reaches the node's
    // routing (the node keeps its heartbeats).
    let own = c.node("node-a").addr.rsplit_once('.').map(|(net, _)| format!("{net}.0/24")).unwrap();
    let text = format!(
        "name: mirror\nsegments:\n  lan:\n    subnet: {own}\ninstances:\n{}{}  vm:\n    kind: vm\n    image: http://{store}:8080/no-such-disk.qcow2\n    delivery: full\n    segments: [lan]\n    node: node-a\n",
        container("a", "    segments: {lan: ADDR_A}\n    node: node-a\n", &store).replace("ADDR_A", &own.replace(".0/24", ".200")),
        container("b", "    segments: [lan]\n    node: node-b\n", &store),
    );
    let (_, report, err) = deploy(&c, dir.path(), &text);
    let state = |n: &str| report["instances"].as_array().unwrap().iter().find(|i| i["name"] == n).map(|i| i["state"].clone());
    assert_eq!(state("a"), Some("ready".into()), "{err}\n{report}");
    assert_eq!(state("b"), Some("ready".into()), "{err}\n{report}");
    // The VM's disk is missing: it fails, but its segment's DHCP server was made, in its own namespace.
    assert_eq!(state("vm"), Some("failed".into()));
    let ping = c.node("node-b").docker_exec(&id_of(&report, "b"), &["ping", "-c", "2", "-W", "5", &own.replace(".0/24", ".200")]);
    assert!(ping.status.success(), "across nodes on the node's own subnet: {}", String::from_utf8_lossy(&ping.stdout));
    assert_eq!(host_state(&c, "node-a"), before, "the lab reached the node's routing");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        assert!(c.nodes_up().iter().all(|(_, up)| *up), "a node went down: {:?}", c.nodes_up());
        std::thread::sleep(Duration::from_millis(500));
    }
    let dhcp_of = |node: &str| {
        let pattern = format!("dnsmasq.*{}", c.node(node).dir.join("agent/dhcp").display());
        let out = std::process::Command::new("pgrep").args(["-f", &pattern]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect::<Vec<_>>()
    };
    let servers = dhcp_of("node-a");
    assert_eq!(servers.len(), 1, "the segment's DHCP server runs");
    // ... in a network namespace that is not the node's.
    let ns_of = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let node_ns =
        std::fs::metadata(format!("/run/netns/{}", c.node("node-a").netns)).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
    assert!(!ns_of(&servers[0]).to_string_lossy().contains(&node_ns.to_string()), "the DHCP server runs in the node's namespace");
    destroy(&c, "mirror");

    // Lab x.y with instance z and lab x with instance y.z: two things.
    let xy = format!(
        "name: x.y\nsegments:\n  lan:\n    subnet: 10.96.0.0/24\ninstances:\n{}",
        container("z", "    segments: [lan]\n    node: node-a\n", &store)
    );
    let x = format!(
        "name: x\nsegments:\n  lan:\n    subnet: 10.96.0.0/24\ninstances:\n{}{}",
        container("y.z", "    segments: [lan]\n    node: node-a\n", &store),
        container("far", "    segments: [lan]\n    node: node-b\n", &store)
    );
    let (ok, first, err) = deploy(&c, dir.path(), &xy);
    assert!(ok, "{err}");
    let (ok, second, err) = deploy(&c, dir.path(), &x);
    assert!(ok, "{err}");
    let (zid, yzid) = (id_of(&first, "z"), id_of(&second, "y.z"));
    assert_ne!(zid, yzid);
    let running = c.node("node-a").docker().containers().unwrap();
    assert!(running.contains(&zid) && running.contains(&yzid), "{running:?}");
    // Another lab spanning both nodes: its own VNI.
    let xy2 = xy.clone() + &container("far", "    segments: [lan]\n    node: node-b\n", &store);
    let (ok, _, err) = deploy(&c, dir.path(), &xy2);
    assert!(ok, "{err}");
    // node-a joins x.y's segment to node-b once its next orders say so
    // (the deploy waited for the instances, not for node-a's links).
    let started = Instant::now();
    loop {
        let out =
            std::process::Command::new("ip").args(["-n", &c.node("node-a").netns, "-d", "link", "show", "type", "vxlan"]).output().unwrap();
        let vxlans = String::from_utf8_lossy(&out.stdout).into_owned();
        let vnis: std::collections::HashSet<&str> = vxlans.split("vxlan id ").skip(1).filter_map(|s| s.split_whitespace().next()).collect();
        if vnis.len() == 2 {
            break;
        }
        assert!(vnis.len() < 2, "two labs, more than two VNIs:\n{vxlans}");
        assert!(started.elapsed() < Duration::from_secs(20), "two labs, two VNIs:\n{vxlans}\nnodes: {:?}", c.nodes_up());
        std::thread::sleep(Duration::from_millis(300));
    }
    destroy(&c, "x");
    let start = Instant::now();
    while c.node("node-a").docker().containers().unwrap().contains(&yzid) {
        assert!(start.elapsed() < Duration::from_secs(30), "x's container stays");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(c.node("node-a").docker().containers().unwrap().contains(&zid), "x.y's container went with x");
    let alive = c.node("node-a").docker_exec(&zid, &["true"]);
    assert!(alive.status.success(), "x.y's container runs on");
    destroy(&c, "x.y");

    std::thread::sleep(Duration::from_secs(2));
    c.assert_clean("after every lab");
    assert_eq!(host_state(&c, "node-a"), before, "the node's network is as it was");
    for node in ["node-a", "node-b"] {
        assert!(dhcp_of(node).is_empty(), "{node}: a DHCP server left");
    }
}
