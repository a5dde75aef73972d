//! The deployment framework end to end on the namespace testbed, with real
//! daemons: a store, a control node and two compute nodes as network
//! namespaces on shaped links (100 Mbit/s, 2 ms), each compute node with
//! its own libvirtd and dockerd and a `bootcache agent`. A hybrid lab (two
//! VMs of the reference guest, lazily delivered, and six containers on one
//! segment spanning both nodes) is deployed with one command while the
//! control node restarts; packets cross between VMs and containers on
//! different nodes; the store sends the VM image's boot bytes about once;
//! a killed agent's instances are lost within three heartbeats; destroy
//! leaves nothing on either node. Bad lab files and calls without the
//! credential change nothing. Needs root.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use bootcache_testbed::Link;
use support::cluster::{Cluster, Spec, container_image};
use support::recorded_container;

const BIN: &str = env!("CARGO_BIN_EXE_bootcache");

fn lab(store: &str, name: &str) -> String {
    format!(
        "name: {name}
segments:
  lan:
    subnet: 10.99.0.0/24
instances:
  vm-a:
    kind: vm
    image: http://{store}:8080/guest.bcimg
    memory: 512MiB
    segments: {{lan: 10.99.0.10}}
    node: node-a
    ready: BOOTCACHE-BOOTED
  vm-b:
    kind: vm
    image: http://{store}:8080/guest.bcimg
    memory: 512MiB
    segments: {{lan: 10.99.0.11}}
    node: node-b
    ready: BOOTCACHE-BOOTED
  user:
    kind: container
    image: http://{store}:8080/busybox.tar
    count: 6
    segments: [lan]
    command: [/bin/sh, -c, \"echo user-up; exec sleep 1000000\"]
    ready: user-up
"
    )
}

/// How many nodes run the containers of a deploy's report (each imports the tarball once).
fn tarball_importers(report: &serde_json::Value) -> u64 {
    let nodes: std::collections::HashSet<&str> =
        report["instances"].as_array().unwrap().iter().filter(|i| i["kind"] == "container").filter_map(|i| i["node"].as_str()).collect();
    nodes.len() as u64
}

/// Everything the lab runs on, up: the store (the reference guest recorded
/// and converted, the container tarball), the control node, two compute
/// nodes with their daemons and agents, on `link`.
fn cluster(dir: &Path, link: Link) -> (Cluster, u64, u64) {
    let store_dir = dir.join("store");
    std::fs::create_dir(&store_dir).unwrap();
    let (_image, boot_bytes) = recorded_container(&store_dir, dir);
    let tarball = container_image();
    std::fs::copy(&tarball, store_dir.join("busybox.tar")).unwrap();
    let tarball_bytes = std::fs::metadata(&tarball).unwrap().len();
    let spec = Spec {
        nodes: vec!["node-a".into(), "node-b".into()],
        daemons: true,
        // What the boot needs only: the rest of the image would follow
        // once the recorded boot is over and blur the store's count.
        agent_args: ["--background", "off", "--ready-timeout", "300"].map(String::from).to_vec(),
        control_args: Vec::new(),
        log: "lab_deploy",
        heartbeat: 1.0,
    };
    (Cluster::start(dir, &store_dir, link, spec), boot_bytes, tarball_bytes)
}

#[test]
fn a_hybrid_lab_across_two_nodes_deploys_talks_and_goes() {
    let dir = tempfile::tempdir().unwrap();
    let (mut c, boot_bytes, tarball_bytes) = cluster(dir.path(), Link::new(100, 2.0));
    let (store_addr, control_url, token) = (c.store_addr.clone(), c.control_url.clone(), c.token.clone());

    // Without the credential: 401, and nothing is done.
    let text = lab(&store_addr, "hybrid");
    std::fs::write(dir.path().join("lab.yaml"), &text).unwrap();
    let anon =
        c.tb.command("control", "curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary"])
            .arg(format!("@{}", dir.path().join("lab.yaml").display()))
            .arg(format!("{control_url}/labs"))
            .output()
            .unwrap();
    assert_eq!(String::from_utf8_lossy(&anon.stdout), "401");
    for path in ["/nodes", "/labs", "/labs/hybrid/instances"] {
        let out =
            c.tb.command("control", "curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("{control_url}{path}"))
                .output()
                .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "401", "{path}");
    }
    // A node's API wants it too (peers send it), tarballs included.
    for path in ["/images".to_owned(), format!("/tarballs/{}", "0".repeat(64))] {
        let out =
            c.tb.command("control", "curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("http://{}:7070{path}", c.node("node-a").addr))
                .output()
                .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "401", "{path}");
    }
    // Nor does the administrator's token open it: nodes take the peer token.
    let out = c.curl(&["-o", "/dev/null", "-w", "%{http_code}", &format!("http://{}:7070/images", c.node("node-a").addr)]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
    // With it, a tarball key that is not one is refused, and one not held is 404.
    for (path, code) in [("/tarballs/..%2f..%2fetc%2fpasswd".to_owned(), "400"), (format!("/tarballs/{}", "0".repeat(64)), "404")] {
        let out = c.curl_peer(&["-o", "/dev/null", "-w", "%{http_code}", &format!("http://{}:7070{path}", c.node("node-a").addr)]);
        assert_eq!(String::from_utf8_lossy(&out.stdout), code, "{path}");
    }

    // Bad lab files: an error naming the line, nothing created.
    let bad: &[(&str, &str, &str)] = &[
        ("kind: container", "kind: lxc", "line 21"),
        ("    image: http://{s}:8080/busybox.tar\n", "", "line 20"),
        ("  vm-b:\n", "  vm-a:\n", "line 13"),
        ("count: 6", "count: 1000000000", "line 23"),
        ("  user:\n", "  us/er:\n", "line 20"),
        ("    subnet: 10.99.0.0/24\n", "    bridge: bc-this-name-is-too-long\n    subnet: 10.99.0.0/24\n", "line 4"),
        ("    subnet: 10.99.0.0/24\n", "", "line 3"),
    ];
    for (from, to, line) in bad {
        let from = from.replace("{s}", &store_addr);
        assert!(text.contains(&from), "{from}");
        let file = dir.path().join("bad.yaml");
        std::fs::write(&file, text.replacen(&from, to, 1)).unwrap();
        let out = c.cli(&["deploy", "-f", file.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(line), "{to:?}: {err}");
    }
    let labs = c.cli(&["inspect", "--output", "json"]);
    assert_eq!(String::from_utf8_lossy(&labs.stdout).trim(), "[]", "bad lab files created nothing");
    c.assert_clean("after the bad lab files");

    // Deploy, with the control node restarted in the middle.
    let sent_before = c.tb.tx_bytes("store").unwrap();
    let deploy =
        c.tb.command("control", BIN)
            .args([
                "deploy",
                "-f",
                dir.path().join("lab.yaml").to_str().unwrap(),
                "--timeout",
                "600",
                "--output",
                "json",
                "--control",
                &control_url,
                "--token-file",
            ])
            .arg(&token)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    let start = Instant::now();
    loop {
        let v = c.curl(&[&format!("{control_url}/labs/hybrid/instances")]);
        let s = String::from_utf8_lossy(&v.stdout);
        if s.contains("\"fetching\"") || s.contains("\"starting\"") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "nothing started: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    c.control = None;
    std::thread::sleep(Duration::from_secs(2));
    c.start_control();
    let out = deploy.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "deploy failed:\n{err}");
    let sent = c.tb.tx_bytes("store").unwrap() - sent_before;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {err}"));
    let instances = report["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 8, "{report}");
    for i in instances {
        assert_eq!(i["state"], "ready", "{i}");
        assert!(i["node"].is_string() && i["ready_after_ms"].as_i64().is_some_and(|ms| ms > 0), "{i}");
    }
    eprintln!("{err}");

    // The store sent the VM image's boot bytes about once (node-b got them
    // from node-a, as the control node chose), and the tarball to each node
    // that runs containers.
    let vm_bytes = sent.saturating_sub(tarball_importers(&report) * tarball_bytes);
    eprintln!("store sent {sent} bytes: {vm_bytes} for the VM image against {boot_bytes} of boot segment, header and index");
    let metrics_of = |node: &str| {
        let out = c.curl(&[&format!("http://{}:7070/metrics", c.node(node).addr)]);
        String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("_bytes") && !l.starts_with('#')).collect::<Vec<_>>().join("\n")
    };
    let metrics = metrics_of("node-b");
    eprintln!("node-a:\n{}\nnode-b:\n{metrics}", metrics_of("node-a"));
    assert!(
        vm_bytes as f64 <= 1.10 * boot_bytes as f64,
        "the store sent {vm_bytes} bytes of the VM image, over 1.10 x {boot_bytes} (the nodes' metrics above)"
    );
    let peer: f64 = metrics
        .lines()
        .find(|l| l.starts_with("bootcache_peer_bytes"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0.0);
    assert!(peer > 0.5 * boot_bytes as f64, "node-b took {peer} bytes from its peer:\n{metrics}");

    // Packets cross: the VM on node-b pings a container on node-a, and a
    // container on node-a pings the VM on node-b (and the one on its own node).
    let on = |node: &str| -> Vec<String> {
        instances
            .iter()
            .filter(|i| i["node"] == node && i["kind"] == "container")
            .map(|i| i["addresses"][0][1].as_str().unwrap().to_owned())
            .collect()
    };
    let (far, near_node) = match on("node-a").first() {
        Some(a) => (a.clone(), "node-a"),
        None => (on("node-b")[0].clone(), "node-b"),
    };
    let (vm_node, vm, vm_addr) = if near_node == "node-a" { ("node-b", "vm-b", "10.99.0.11") } else { ("node-a", "vm-a", "10.99.0.10") };
    // What each node calls an instance (its number, lab and name), from inspect.
    let id = |name: &str| -> String { instances.iter().find(|i| i["name"] == name).unwrap()["id"].as_str().unwrap().to_owned() };
    // A failed ping says what both nodes' tunnels and bridges held.
    let story = || format!("{}{}", c.node("node-a").network_story(), c.node("node-b").network_story());
    let (code, text) = c.node(vm_node).vm_exec(&id(vm), &["/bin/ping", "-c", "2", "-W", "5", &far]);
    assert_eq!(code, 0, "{vm} on {vm_node} -> container {far} on {near_node}:\n{text}\n{}", story());
    // The same through the control node: `bootcache exec` (the guest agent) and `logs` (its console).
    let out = c.cli(&["exec", "hybrid", vm, "--", "/bin/ping", "-c", "2", "-W", "5", &far]);
    assert!(
        out.status.success(),
        "bootcache exec {vm}: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        story()
    );
    let out = c.cli(&["logs", "hybrid", vm]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("BOOTCACHE-BOOTED"),
        "bootcache logs {vm}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let container =
        instances.iter().find(|i| i["node"] == near_node && i["kind"] == "container").unwrap()["name"].as_str().unwrap().to_owned();
    let ping = c.node(near_node).docker_exec(&id(&container), &["ping", "-c", "2", "-W", "5", vm_addr]);
    assert!(
        ping.status.success(),
        "container {container} on {near_node} -> {vm} on {vm_node}: {}\n{}",
        String::from_utf8_lossy(&ping.stdout),
        story()
    );

    // Stopped on request and started again: kept on its node, stopped
    // there, and back on the network once started.
    // The container and the VM of near_node; the VM on the other node runs on.
    let near_vm = if near_node == "node-a" { "vm-a" } else { "vm-b" };
    let out = c.cli(&["stop", "hybrid", &container, near_vm]);
    assert!(out.status.success(), "stop: {}", String::from_utf8_lossy(&out.stderr));
    let states: Vec<(String, String)> =
        c.instances("hybrid").iter().map(|i| (i["name"].as_str().unwrap().to_owned(), i["state"].as_str().unwrap().to_owned())).collect();
    assert!(
        states.contains(&(container.clone(), "stopped".into())) && states.contains(&(near_vm.to_owned(), "stopped".into())),
        "{states:?}"
    );
    assert!(states.iter().filter(|(_, s)| s == "ready").count() == 6, "the others run on: {states:?}");
    assert_eq!(c.node(near_node).libvirt().virsh(&["domstate", &id(near_vm)]).unwrap().trim(), "shut off");
    let running = c.node(near_node).docker().docker().args(["inspect", "-f", "{{.State.Running}}", &id(&container)]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&running.stdout).trim(), "false");
    let out = c.cli(&["start", "hybrid", &container, near_vm]);
    assert!(out.status.success(), "start: {}", String::from_utf8_lossy(&out.stderr));
    let ping = c.node(near_node).docker_exec(&id(&container), &["ping", "-c", "2", "-W", "5", vm_addr]);
    assert!(
        ping.status.success(),
        "a started container reaches the VM on the other node again: {}\n{}",
        String::from_utf8_lossy(&ping.stdout),
        story()
    );
    let out = c.cli(&["stop", "hybrid", "nobody"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no instance hybrid/nobody"));

    // A failed instance is reported with its reason; the rest of its lab
    // goes on. An image the control node cannot read refuses the deploy.
    let broken = format!(
        "name: broken\nsegments:\n  lan:\n    subnet: 10.98.0.0/24\ninstances:\n  good:\n    kind: container\n    image: http://{store_addr}:8080/busybox.tar\n    segments: [lan]\n    command: [sleep, '1000000']\n  bad:\n    kind: container\n    image: http://{store_addr}:8080/missing.tar\n    segments: [lan]\n"
    );
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, &broken).unwrap();
    let out = c.cli(&["deploy", "-f", file.to_str().unwrap(), "--output", "json", "--timeout", "120"]);
    assert!(!out.status.success(), "a lab with a failed instance is not a success");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let state = |n: &str| report["instances"].as_array().unwrap().iter().find(|i| i["name"] == n).unwrap().clone();
    assert_eq!(state("good")["state"], "ready", "{report}");
    assert_eq!(state("bad")["state"], "failed", "{report}");
    assert!(state("bad")["reason"].as_str().unwrap().contains("404"), "{report}");
    assert!(c.cli(&["destroy", "broken"]).status.success());
    std::fs::write(&file, format!("{broken}  vm:\n    kind: vm\n    image: http://{store_addr}:8080/nothing.bcimg\n")).unwrap();
    let out = c.cli(&["deploy", "-f", file.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("nothing.bcimg"), "{err}");
    let labs = c.cli(&["inspect", "--output", "json"]);
    assert!(!String::from_utf8_lossy(&labs.stdout).contains("broken"), "a refused deploy records nothing");

    // A killed agent: its node is down and its instances lost within three
    // heartbeats (1 s each; the control node checks once a heartbeat).
    c.nodes[1].agent = None;
    let killed = Instant::now();
    loop {
        let lost = c.instances("hybrid").iter().filter(|i| i["node"] == "node-b").all(|i| i["state"] == "lost");
        if lost {
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(6), "node-b's instances not lost: {:?}", c.instances("hybrid"));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(c.nodes_up().contains(&("node-b".into(), false)));
    // It comes back and removes what no order lists (its lost instances).
    let join = c.join_token();
    c.nodes[1].start_agent(&control_url, &join);

    // Destroy: nothing of the lab on either node; a second destroy succeeds.
    let out = c.cli(&["destroy", "hybrid"]);
    assert!(out.status.success(), "destroy: {}", String::from_utf8_lossy(&out.stderr));
    let start = Instant::now();
    while c.node("node-b").libvirt().domains().map(|d| !d.is_empty()).unwrap_or(true)
        || c.node("node-b").docker().containers().map(|d| !d.is_empty()).unwrap_or(true)
    {
        assert!(start.elapsed() < Duration::from_secs(30), "node-b's leftovers stay");
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(2));
    c.assert_clean("after destroy");
    let again = c.cli(&["destroy", "hybrid"]);
    assert!(again.status.success(), "a second destroy: {}", String::from_utf8_lossy(&again.stderr));
}

/// The benchmark (not a timed test; `scripts/bench-lab` runs it): the same
/// lab deployed and destroyed three times at each link setting; time from
/// `deploy` to the last instance ready, per kind, and the store's bytes.
#[test]
#[ignore = "a benchmark: scripts/bench-lab runs it"]
fn bench_hybrid_lab() {
    let out_dir = PathBuf::from(std::env::var("BOOTCACHE_BENCH_OUT").unwrap_or_else(|_| "target/bench-lab".into()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let runs: usize = std::env::var("BOOTCACHE_BENCH_RUNS").ok().and_then(|r| r.parse().ok()).unwrap_or(3);
    let mut results = Vec::new();
    for link in [Link::new(100, 2.0), Link::new(1000, 2.0)] {
        let dir = tempfile::tempdir().unwrap();
        let (c, boot_bytes, tarball_bytes) = cluster(dir.path(), link);
        let file = dir.path().join("lab.yaml");
        std::fs::write(&file, lab(&c.store_addr, "bench")).unwrap();
        for run in 1..=runs {
            // A cold start each time: no node holds either image (nor the
            // tarball it keeps for peers), and the control node has seen it.
            for n in &c.nodes {
                n.cold();
            }
            std::thread::sleep(Duration::from_millis(2500));
            let sent_before = c.tb.tx_bytes("store").unwrap();
            let started = Instant::now();
            let out = c.cli(&["deploy", "-f", file.to_str().unwrap(), "--output", "json", "--timeout", "600"]);
            let wall = started.elapsed().as_secs_f64();
            assert!(out.status.success(), "deploy: {}", String::from_utf8_lossy(&out.stderr));
            let sent = c.tb.tx_bytes("store").unwrap() - sent_before;
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let ready = |kind: &str| -> Vec<f64> {
                report["instances"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|i| i["kind"] == kind)
                    .map(|i| i["ready_after_ms"].as_f64().unwrap() / 1000.0)
                    .collect()
            };
            let (vms, containers) = (ready("vm"), ready("container"));
            let importers = tarball_importers(&report);
            let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
            let r = serde_json::json!({
                "link": link.to_string(), "run": run, "deploy_to_last_ready_s": wall,
                "vm_last_ready_s": max(&vms), "container_last_ready_s": max(&containers),
                "vm_ready_s": vms, "container_ready_s": containers,
                "store_bytes": sent, "boot_bytes": boot_bytes, "tarball_bytes": tarball_bytes,
                "store_vm_bytes_over_boot": sent.saturating_sub(importers * tarball_bytes) as f64 / boot_bytes as f64,
            });
            eprintln!("{r}");
            results.push(r);
            let out = c.cli(&["destroy", "bench"]);
            assert!(out.status.success(), "destroy: {}", String::from_utf8_lossy(&out.stderr));
            std::thread::sleep(Duration::from_secs(3));
        }
    }
    std::fs::write(out_dir.join("results.json"), serde_json::to_string_pretty(&results).unwrap()).unwrap();
    let mut table = String::from(
        "| link | runs | deploy to last ready (s) | last VM ready (s) | last container ready (s) | store VM bytes / (boot segment + index) |\n|---|---|---|---|---|---|\n",
    );
    for link in [Link::new(100, 2.0), Link::new(1000, 2.0)] {
        let rows: Vec<&serde_json::Value> = results.iter().filter(|r| r["link"] == link.to_string()).collect();
        let med = |key: &str| {
            let mut v: Vec<f64> = rows.iter().map(|r| r[key].as_f64().unwrap()).collect();
            v.sort_by(f64::total_cmp);
            let (lo, hi) = (v[0], v[v.len() - 1]);
            if key.ends_with("_over_boot") {
                format!("{:.2} ({lo:.2}-{hi:.2})", v[v.len() / 2])
            } else {
                format!("{:.1} ({lo:.1}-{hi:.1})", v[v.len() / 2])
            }
        };
        table += &format!(
            "| {link} | {} | {} | {} | {} | {} |\n",
            rows.len(),
            med("deploy_to_last_ready_s"),
            med("vm_last_ready_s"),
            med("container_last_ready_s"),
            med("store_vm_bytes_over_boot")
        );
    }
    std::fs::write(out_dir.join("table.md"), &table).unwrap();
    println!("{table}");
}
