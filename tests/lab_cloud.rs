//! VMs configured by cloud-init from the lab, on the namespace testbed
//! with real daemons: the reference guest's cloud-image sibling
//! (`scripts/reference-guest --cloud`) on two segments joined by a router
//! container, each VM given its name, its static address and gateway, a
//! user with a key, a written file, by its NoCloud seed; checked through
//! `bootcache exec` (the guest agent). A VM reaches a container on the
//! other segment through the router, and not while it is stopped; a changed
//! `cloud-init:` remakes that VM only; the user-data's secrets show nowhere.
//! The image's boot set is its first boot recorded with a seed of its own
//! (`bootcache seed`): the lab VMs fetch little beyond it. Needs root.

mod support;

use std::time::{Duration, Instant};

use bootcache_testbed::Link;
use support::bootcache;
use support::cluster::{Cluster, Spec, container_image, record_boot};

const SECRET: &str = "hunter2-not-to-be-shown";
const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBootcacheLabTestKeyOnly alice@lab";

fn lab(store: &str, db_role: &str) -> String {
    let tar = format!("http://{store}:8080/busybox.tar");
    let vm = format!("http://{store}:8080/cloud.bcimg");
    format!(
        "name: range
segments:
  left: {{subnet: 10.81.0.0/24, gateway: 10.81.0.1}}
  right: {{subnet: 10.82.0.0/24, gateway: 10.82.0.1}}
defaults:
  ready: BOOTCACHE-BOOTED
instances:
  router:
    kind: container
    image: {tar}
    segments: {{left: 10.81.0.1, right: 10.82.0.1}}
    node: node-a
    sysctls: {{net.ipv4.ip_forward: 1}}
    command: [/bin/sh, -c, \"echo BOOTCACHE-BOOTED; exec sleep 1000000\"]
  web:
    kind: vm
    image: {vm}
    memory: 512MiB
    segments: {{left: 10.81.0.10}}
    node: node-a
    cloud-init:
      users:
        - name: alice
          lock_passwd: false
          plain_text_passwd: {SECRET}
          ssh_authorized_keys: [\"{KEY}\"]
      write_files:
        - {{path: /etc/lab-role, content: \"web\\n\"}}
  db:
    kind: vm
    image: {vm}
    memory: 512MiB
    segments: {{right: 10.82.0.10}}
    node: node-b
    cloud-init:
      write_files:
        - {{path: /etc/lab-role, content: \"{db_role}\\n\"}}
  user:
    kind: container
    image: {tar}
    segments: {{right: 10.82.0.20}}
    node: node-b
    command: [/bin/sh, -c, \"echo BOOTCACHE-BOOTED; exec sleep 1000000\"]
"
    )
}

/// The reference guest's cloud-image sibling.
fn cloud_guest() -> std::path::PathBuf {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/reference-guest");
    let out = std::process::Command::new(script).arg("--cloud").output().unwrap();
    assert!(out.status.success(), "reference-guest --cloud: {}", String::from_utf8_lossy(&out.stderr));
    std::path::PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

#[test]
fn vms_are_configured_by_cloud_init_from_the_lab() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    std::fs::create_dir(&store_dir).unwrap();
    std::fs::copy(container_image(), store_dir.join("busybox.tar")).unwrap();
    // Its first boot recorded as a lab's VMs make it: cloud-init reading a
    // seed (another name, other user-data than the lab's), then converted
    // boot set first.
    let image = cloud_guest();
    let (seed, user_data, trace) = (dir.path().join("seed.img"), dir.path().join("user-data"), dir.path().join("first.bctrace"));
    let p = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    std::fs::write(&user_data, "#cloud-config\nwrite_files:\n  - {path: /etc/lab-role, content: recorded}\n").unwrap();
    bootcache(&["seed", &p(&seed), "--hostname", "recorded", "--user-data", &p(&user_data)]);
    record_boot(&image, &trace, "512", 400, &[format!("file={},format=raw,if=virtio,readonly=on", seed.display())]);
    bootcache(&["convert", "--quiet", "--trace", &p(&trace), &p(&image), &p(&store_dir.join("cloud.bcimg"))]);
    let spec = Spec {
        nodes: vec!["node-a".into(), "node-b".into()],
        daemons: true,
        agent_args: ["--ready-timeout", "400"].map(String::from).to_vec(),
        control_args: Vec::new(),
        log: "lab_cloud",
        heartbeat: 1.0,
    };
    let c = Cluster::start(dir.path(), &store_dir, Link::new(1000, 0.5), spec);
    let file = dir.path().join("lab.yaml");
    std::fs::write(&file, lab(&c.store_addr, "db")).unwrap();
    let out = c.cli(&["deploy", "-f", file.to_str().unwrap(), "--output", "json", "--timeout", "600"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(out.status.success(), "deploy: {}\n{report}", String::from_utf8_lossy(&out.stderr));
    let id = |r: &serde_json::Value, name: &str| {
        r["instances"].as_array().unwrap().iter().find(|i| i["name"] == name).unwrap()["id"].as_str().unwrap().to_owned()
    };
    let exec = |vm: &str, argv: &[&str]| -> (bool, String) {
        let mut args = vec!["exec", "range", vm, "--"];
        args.extend_from_slice(argv);
        let out = c.cli(&args);
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };

    // The recorded first boot holds the lab VMs' first boots: what they
    // read beyond it, fetched on demand, is little of what they read.
    let sum = |metric: &str| ["node-a", "node-b"].iter().map(|n| c.node_metric(n, metric)).sum::<f64>();
    let (read, missed) = (sum("bootcache_guest_read_bytes_total"), sum("bootcache_demand_bytes_total"));
    eprintln!("the VMs read {read} bytes to their markers; {missed} were fetched on demand");
    assert!(read > 0.0 && missed <= 0.10 * read, "the VMs read {read} bytes; {missed} fetched on demand (over 10 %)");

    // Each VM is who the lab says, where it says, with what it says.
    assert_eq!(exec("web", &["/bin/hostname"]).1.trim(), "web");
    assert_eq!(exec("db", &["/bin/hostname"]).1.trim(), "db");
    assert_eq!(exec("web", &["/bin/cat", "/etc/lab-role"]).1, "web\n");
    assert_eq!(exec("db", &["/bin/cat", "/etc/lab-role"]).1, "db\n");
    assert!(exec("web", &["/bin/cat", "/home/alice/.ssh/authorized_keys"]).1.contains(KEY));
    let addr = exec("web", &["/sbin/ip", "-4", "addr"]).1;
    assert!(addr.contains("10.81.0.10/24"), "{addr}");
    let routes = exec("web", &["/sbin/ip", "route"]).1;
    assert!(routes.contains("default via 10.81.0.1"), "{routes}");

    // Through the router to the other segment (and node), not while it is stopped.
    let (ok, said) = exec("web", &["/bin/ping", "-c", "2", "-W", "5", "10.82.0.20"]);
    assert!(ok, "web -> user through the router: {said}");
    let (ok, said) = exec("db", &["/bin/ping", "-c", "2", "-W", "5", "10.81.0.10"]);
    assert!(ok, "db -> web through the router: {said}");
    assert!(c.cli(&["stop", "range", "router"]).status.success());
    assert!(!exec("web", &["/bin/ping", "-c", "2", "-W", "2", "10.82.0.20"]).0, "reached with the router stopped");
    assert!(c.cli(&["start", "range", "router"]).status.success());
    let started = Instant::now();
    while !exec("web", &["/bin/ping", "-c", "1", "-W", "2", "10.82.0.20"]).0 {
        assert!(started.elapsed() < Duration::from_secs(30), "the router started again does not route");
    }

    // The user-data's secret shows nowhere: not in inspect, not in the labs' list, not in any log.
    let shown = [c.cli(&["inspect", "range", "--output", "json"]), c.cli(&["inspect", "--output", "json"])];
    for out in &shown {
        assert!(!String::from_utf8_lossy(&out.stdout).contains(SECRET));
    }
    let logs = [dir.path().join("control.log")]
        .into_iter()
        .chain(["node-a", "node-b"].map(|n| std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("lab_cloud-{n}.log"))));
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(!text.contains(SECRET), "{} shows the user-data", log.display());
    }

    // db's cloud-init changed: db is made anew, web runs on (its uptime goes on).
    let up = |vm: &str| exec(vm, &["/bin/cat", "/proc/uptime"]).1.split('.').next().unwrap_or("0").parse::<u64>().unwrap_or(0);
    let web_up = up("web");
    std::fs::write(&file, lab(&c.store_addr, "db-v2")).unwrap();
    let out = c.cli(&["deploy", "-f", file.to_str().unwrap(), "--output", "json", "--timeout", "600"]);
    assert!(out.status.success(), "redeploy: {}", String::from_utf8_lossy(&out.stderr));
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(id(&again, "db"), id(&report, "db"), "db is made anew");
    assert_eq!(id(&again, "web"), id(&report, "web"), "web is left running");
    assert!(up("web") > web_up, "web did not restart");
    assert_eq!(exec("db", &["/bin/cat", "/etc/lab-role"]).1, "db-v2\n");

    assert!(c.cli(&["destroy", "range"]).status.success());
    std::thread::sleep(Duration::from_secs(2));
    c.assert_clean("after destroy");
}
