//! A lab whose every image is a registry reference, on the testbed: the
//! reference registry with Basic auth on the store's host (a shaped link
//! like every host's), two compute nodes with libvirtd and dockerd, the
//! control node and agents given the credentials. One VM (the small guest,
//! pushed as a bootcache image) and five containers (a layered image
//! pushed as an OCI image: the small guest's root file system, a layer of
//! incompressible data and a small layer on top) per node: all ready; the
//! registry's host sends about once the VM image's boot bytes and the
//! container image's blobs (the other node takes them from the first);
//! the tags moved to other images change nothing running, and deploying
//! again takes the new container image (only its new layer from the
//! registry); images whose blobs the registry serves wrong (a layer's bytes
//! changed in its storage, one gone) fail their instances naming the
//! reference, nothing of them kept or loaded, the rest of that lab ready.
//! Needs root.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bootcache_registry::{Clients, Reference, Target, image};
use bootcache_testbed::Link;
use bootcache_testbed::programs::{DockerRegistry, RegistryAuth};
use support::bootcache;
use support::cluster::{Cluster, Spec, fill_store};

const BIN: &str = env!("CARGO_BIN_EXE_bootcache");

fn lab(vm: &str, web: &str) -> String {
    let mut t = String::from("name: reg\ninstances:\n");
    for (i, node) in ["n1", "n2"].iter().enumerate() {
        t += &format!("  vm{i}:\n    kind: vm\n    image: {vm}\n    memory: 128MiB\n    node: {node}\n    ready: BOOTCACHE-BOOTED\n");
        for j in 0..5 {
            t += &format!(
                "  web{i}{j}:\n    kind: container\n    image: {web}\n    node: {node}\n    memory: 32MiB\n    \
                 command: [/bin/sh, -c, \"cat /etc/layer; exec sleep 1000000\"]\n    ready: layer-top\n"
            );
        }
    }
    t
}

/// The container image: the small guest's root file system, 24 MiB that
/// do not compress, and `/etc/layer` saying `top`.
fn web_image(dir: &Path, top: &str) -> bootcache_testbed::oci::Image {
    std::fs::create_dir_all(dir).unwrap();
    let (_, rootfs) = support::cluster::small_guest();
    let data = dir.join("data.tar");
    bootcache_testbed::oci::tar_of(&data, &[("srv/data.bin", &bootcache_testbed::oci::filler(7, 24 << 20))]).unwrap();
    let top_tar = dir.join(format!("top-{top}.tar"));
    bootcache_testbed::oci::tar_of(&top_tar, &[("etc/layer", format!("layer-{top}\n").as_bytes())]).unwrap();
    bootcache_testbed::oci::image(&dir.join("layers"), &[&rootfs, &data, &top_tar], &["/bin/sh"]).unwrap()
}

fn deploy(c: &Cluster, text: &str) -> serde_json::Value {
    let file = c.dir.join("reg.yaml");
    std::fs::write(&file, text).unwrap();
    let out = c.cli(&["deploy", "-f", file.to_str().unwrap(), "--output", "json", "--timeout", "300"]);
    assert!(out.status.success(), "deploy: {}\n{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&out.stdout));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Each instance's (name, uid, state, pinned reference), by name.
fn seen(c: &Cluster) -> Vec<(String, u64, String, String)> {
    let mut v: Vec<_> = c
        .instances("reg")
        .iter()
        .map(|i| {
            let s = |k: &str| i[k].as_str().unwrap_or_default().to_owned();
            (s("name"), i["uid"].as_u64().unwrap_or(0), s("state"), s("pinned"))
        })
        .collect();
    v.sort();
    v
}

/// The reference registry on the store's host with Basic auth (alice),
/// and Docker's config file (`DIR/docker/config.json`, its `auth` form,
/// which Docker's client and bootcache both read) holding her password:
/// the registry, its address, the config file.
fn registry_on_store(c: &Cluster, dir: &Path) -> (DockerRegistry, String, std::path::PathBuf) {
    let htpasswd = dir.join("htpasswd");
    let made = Command::new("htpasswd").args(["-Bbc"]).arg(&htpasswd).args(["alice", "s3cret-pass"]).output().unwrap();
    assert!(made.status.success(), "htpasswd: {}", String::from_utf8_lossy(&made.stderr));
    let netns = c.tb.host("store").netns.clone();
    let served = DockerRegistry::start_in(dir, Some(&netns), &c.store_addr, 5000, RegistryAuth::Htpasswd(&htpasswd)).unwrap();
    let registry = format!("{}:5000", c.store_addr);
    std::fs::create_dir_all(dir.join("docker")).unwrap();
    let config = dir.join("docker/config.json");
    let b64 = Command::new("sh").args(["-c", "printf %s alice:s3cret-pass | base64 -w0"]).output().unwrap();
    let auth = String::from_utf8(b64.stdout).unwrap();
    std::fs::write(&config, serde_json::json!({"auths": {registry.clone(): {"auth": auth}}}).to_string()).unwrap();
    (served, registry, config)
}

#[test]
fn a_lab_of_registry_images_sends_each_about_once_and_stays_pinned() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let images = fill_store(&store, dir.path());
    let spec = Spec {
        nodes: vec!["n1".into(), "n2".into()],
        daemons: true,
        agent_args: ["--ready-timeout", "300"].map(String::from).to_vec(),
        control_args: Vec::new(),
        log: "lab_registry",
        heartbeat: 0.3,
    };
    let mut c = Cluster::start(dir.path(), &store, Link::new(100, 1.0), spec);

    // The registry on the store's host, with Basic auth; the credentials
    // for the control node and the agents.
    let (_registry, registry, config) = registry_on_store(&c, dir.path());
    let access = ["--registry-config", config.to_str().unwrap(), "--insecure-registry", registry.as_str()];

    // The images pushed: the VM's with `bootcache push`, the container's
    // as an image builder pushes one.
    let vm_ref = format!("{registry}/guests/small:stable");
    let web_ref: Reference = format!("{registry}/lab/web:stable").parse().unwrap();
    let push_vm = |c: &Cluster, image: &Path| {
        let out = c.tb.command("store", BIN).args(["push", image.to_str().unwrap(), &vm_ref]).args(access).output().unwrap();
        assert!(out.status.success(), "push: {}", String::from_utf8_lossy(&out.stderr));
    };
    push_vm(&c, &store.join("small.bcimg"));
    let clients = Clients::new(Some(config.clone()), vec![registry.clone()]);
    let push_web = |c: &Cluster, built: &bootcache_testbed::oci::Image| -> Reference {
        c.tb.within("store", || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let client = clients.get(&web_ref.registry).unwrap();
                let layers: Vec<&Path> = built.layers.iter().map(|p| p.as_path()).collect();
                image::push(&client, &web_ref, &built.config, &layers).await.unwrap()
            })
        })
    };
    let v1 = web_image(dir.path(), "top");
    let web_pinned = push_web(&c, &v1);
    let web_bytes = v1.bytes().unwrap();

    c.restart_control(&access);
    let (control_url, join) = (c.control_url.clone(), c.join_token());
    for node in &mut c.nodes {
        node.restart_agent(&control_url, &join, &access);
    }
    c.wait_nodes_up();

    // Deployed: everything ready, the registry's host sending each image
    // about once, the nodes the rest to each other.
    let before = c.tb.tx_bytes("store").unwrap();
    let nodes_before: Vec<u64> = ["n1", "n2"].iter().map(|n| c.tb.tx_bytes(n).unwrap()).collect();
    let text = lab(&vm_ref, &web_ref.to_string());
    let report = deploy(&c, &text);
    let sent = c.tb.tx_bytes("store").unwrap() - before;
    let nodes_sent: Vec<u64> = ["n1", "n2"].iter().zip(&nodes_before).map(|(n, b)| c.tb.tx_bytes(n).unwrap() - b).collect();
    for i in report["instances"].as_array().unwrap() {
        assert_eq!(i["state"], "ready", "{i}");
    }
    let once = images.boot_bytes + web_bytes;
    eprintln!(
        "registry's host sent {sent} for {once} (boot bytes {} + container blobs {web_bytes}); nodes sent {nodes_sent:?}",
        images.boot_bytes
    );
    assert!(sent as f64 <= 1.10 * once as f64, "the registry's host sent {sent}, over 1.10 x {once}");
    // One node took the container image's blobs from the other, and the
    // VM image's boot bytes.
    let peer: f64 = ["n1", "n2"].iter().map(|n| c.node_metric(n, "bootcache_peer_bytes_total")).sum();
    assert!(peer >= 0.9 * images.boot_bytes as f64, "peers gave {peer} of the VM image's {} boot bytes", images.boot_bytes);
    assert!(
        nodes_sent.iter().any(|s| *s as f64 >= 0.9 * web_bytes as f64),
        "no node sent the other the container image's {web_bytes} bytes: {nodes_sent:?}"
    );
    let out = c.cli(&["exec", "reg", "web13", "--", "wc", "-c", "/srv/data.bin"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&(24u64 << 20).to_string()), "the middle layer: {said} {}", String::from_utf8_lossy(&out.stderr));
    let first = seen(&c);
    assert_eq!(first.len(), 12);
    for (name, _, _, pinned) in &first {
        if name.starts_with("web") {
            assert_eq!(pinned, &web_pinned.to_string(), "{name}");
        } else {
            assert!(pinned.starts_with(&format!("{registry}/guests/small@sha256:")), "{name}: {pinned}");
        }
    }

    // Both tags moved to other images: nothing running changes.
    let other = dir.path().join("small-64k.bcimg");
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let (raw, _) = support::cluster::small_guest();
    let trace = dir.path().join("small.bctrace");
    bootcache(&["convert", &s(&raw), &s(&other), "--trace", &s(&trace), "--zstd", "-q", "--boot-extent", "64K"]);
    let info: serde_json::Value = serde_json::from_str(&bootcache(&["info", &s(&other), "--output", "json"])).unwrap();
    let other_boot = info["boot_segment_bytes"].as_u64().unwrap() + 256 + info["index_bytes"].as_u64().unwrap();
    push_vm(&c, &other);
    let v2 = web_image(&dir.path().join("v2"), "two");
    let web_pinned2 = push_web(&c, &v2);
    assert_ne!(web_pinned2, web_pinned);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(seen(&c), first, "a moved tag changed what runs");
    let out = c.cli(&["exec", "reg", "web02", "--", "cat", "/etc/layer"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "layer-top");

    // Deployed again: the new images, as new instances; the registry sends
    // the container image's new top layer (and config), not the others.
    let before = c.tb.tx_bytes("store").unwrap();
    let report = deploy(&c, &text.replace("ready: layer-top", "ready: layer-two"));
    for i in report["instances"].as_array().unwrap() {
        assert_eq!(i["state"], "ready", "{i}");
    }
    let sent = c.tb.tx_bytes("store").unwrap() - before;
    let second = seen(&c);
    for ((name, uid, _, pinned), (_, uid1, _, pinned1)) in second.iter().zip(&first) {
        assert!(uid != uid1 && pinned != pinned1, "{name} not remade with the moved tag's image");
    }
    let top = std::fs::metadata(v2.layers.last().unwrap()).unwrap().len() + v2.config.len() as u64;
    eprintln!(
        "deployed again: the registry's host sent {sent} (the container image's new top layer and config {top}, the VM image's boot bytes {other_boot})"
    );
    assert!((sent as f64) <= 1.10 * (other_boot + top) as f64, "the registry's host sent {sent}: more than 1.10 x the new parts");

    // Blobs the registry serves wrong: one layer's bytes changed in its
    // storage, another's gone. Those instances fail naming the reference;
    // nothing of them is kept on the node or reaches Docker; the good one
    // beside them is ready.
    let blob_data = |d: &str| {
        let hex = d.trim_start_matches("sha256:");
        dir.path().join("registry-storage/docker/registry/v2/blobs/sha256").join(&hex[..2]).join(hex).join("data")
    };
    let layer_digest = |built: &bootcache_testbed::oci::Image| {
        bootcache_registry::Digest::of(&std::fs::read(built.layers.last().unwrap()).unwrap()).to_string()
    };
    let mut pushed_bad = Vec::new();
    for (name, top) in [("tampered", "t"), ("gone", "g")] {
        let built = web_image(&dir.path().join(name), top);
        let reference: Reference = format!("{registry}/lab/{name}:v1").parse().unwrap();
        let pinned = c.tb.within("store", || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let client = clients.get(&reference.registry).unwrap();
                let layers: Vec<&Path> = built.layers.iter().map(|p| p.as_path()).collect();
                image::push(&client, &reference, &built.config, &layers).await.unwrap()
            })
        });
        let data = blob_data(&layer_digest(&built));
        if name == "tampered" {
            let mut bytes = std::fs::read(&data).unwrap();
            let last = bytes.len() - 1;
            bytes[last] ^= 0xff;
            std::fs::write(&data, bytes).unwrap();
        } else {
            std::fs::remove_file(&data).unwrap();
        }
        pushed_bad.push((name, pinned, layer_digest(&built)));
    }
    let bad = format!(
        "name: bad\ninstances:\n  fine:\n    kind: container\n    image: {web_ref}\n    node: n1\n    \
         command: [/bin/sh, -c, \"cat /etc/layer; exec sleep 1000000\"]\n    ready: layer-two\n  \
         tampered:\n    kind: container\n    image: {registry}/lab/tampered:v1\n    node: n1\n  \
         gone:\n    kind: container\n    image: {registry}/lab/gone:v1\n    node: n2\n"
    );
    let file = c.dir.join("bad.yaml");
    std::fs::write(&file, bad).unwrap();
    let out = c.cli(&["deploy", "-f", file.to_str().unwrap(), "--output", "json", "--timeout", "120"]);
    assert!(!out.status.success(), "a lab with unusable images deployed as if whole");
    let views = c.instances("bad");
    let state = |n: &str| views.iter().find(|v| v["name"] == n).unwrap().clone();
    assert_eq!(state("fine")["state"], "ready", "{}", state("fine"));
    for (name, pinned, digest) in &pushed_bad {
        let v = state(name);
        let reason = v["reason"].as_str().unwrap_or_default();
        eprintln!("{name}: {reason}");
        assert_eq!(v["state"], "failed", "{v}");
        assert!(reason.contains(&pinned.to_string()), "{name}: {reason}");
        assert!(!reason.contains("s3cret"), "{name}: {reason}");
        if *name == "tampered" {
            assert!(reason.contains("does not match its digest"), "{reason}");
        }
        let hex = digest.trim_start_matches("sha256:");
        for node in &c.nodes {
            let kept = node.dir.join("agent/blobs").join(hex);
            assert!(!kept.exists(), "{name}: {} kept", kept.display());
            let Target::Digest(manifest) = &pinned.target else { panic!() };
            let tag = format!("bootcache/image:{}", manifest.to_string().trim_start_matches("sha256:"));
            let out = node.docker().docker().args(["images", "-q", &tag]).output().unwrap();
            assert!(out.stdout.is_empty(), "{name}: {tag} reached Docker on {}", node.name);
        }
    }
    for lab in ["bad", "reg"] {
        let out = c.cli(&["destroy", lab]);
        assert!(out.status.success(), "destroy: {}", String::from_utf8_lossy(&out.stderr));
    }
}

#[test]
fn a_registry_over_https_is_trusted_through_the_system_roots_only() {
    // A registry on a host that is neither loopback nor named insecure,
    // with a certificate from a CA of the test's own.
    let dir = tempfile::tempdir().unwrap();
    let tb = bootcache_testbed::Testbed::new(&["reg", "client"]).unwrap();
    let ip = tb.host("reg").addr.to_string();
    let d = dir.path();
    let (ca, cert, key) = bootcache_testbed::programs::tls_certificate(d, &ip).unwrap();
    let netns = tb.host("reg").netns.clone();
    let _registry = DockerRegistry::start_tls_in(d, Some(&netns), &ip, 5000, &cert, &key).unwrap();
    let raw = d.join("disk.raw");
    std::fs::write(&raw, bootcache_testbed::oci::filler(3, 2 << 20)).unwrap();
    let image = d.join("disk.bcimg");
    bootcache(&["convert", raw.to_str().unwrap(), image.to_str().unwrap(), "-q"]);
    let reference = format!("{ip}:5000/guests/tls:v1");
    let cli = |trust: bool, args: &[&str]| {
        let mut c = tb.command("client", BIN);
        // No credentials file of the machine's: anonymous.
        c.env("DOCKER_CONFIG", d).env_remove("SSL_CERT_DIR");
        if trust {
            // The system's roots, as OpenSSL takes them: here, the test's CA.
            c.env("SSL_CERT_FILE", &ca);
        }
        c.args(args).output().unwrap()
    };
    // Trusted through SSL_CERT_FILE: pushed and pulled back byte for byte.
    let out = cli(true, &["push", image.to_str().unwrap(), &reference]);
    assert!(out.status.success(), "push over https: {}", String::from_utf8_lossy(&out.stderr));
    let back = d.join("back.bcimg");
    let out = cli(true, &["pull", &reference, back.to_str().unwrap()]);
    assert!(out.status.success(), "pull over https: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&image).unwrap(), "bytes identical");
    // Not trusted (the system's own roots do not hold the test's CA):
    // refused, saying why; nothing written.
    let refused = d.join("refused.bcimg");
    let out = cli(false, &["pull", &reference, refused.to_str().unwrap()]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("certificate"), "{said}");
    assert!(!refused.exists());
}

/// The benchmark's lab: `per_node` containers of `image` pinned to each
/// of the first `n` nodes, ready once running their command.
fn bench_lab(image: &str, n: usize, per_node: usize) -> String {
    let mut t = String::from("name: bench\ninstances:\n");
    for node in 1..=n {
        for j in 0..per_node {
            t += &format!(
                "  c{node}x{j}:\n    kind: container\n    image: {image}\n    node: n{node}\n    memory: 32MiB\n    \
                 command: [/bin/sh, -c, \"echo up; exec sleep 1000000\"]\n    ready: up\n"
            );
        }
    }
    t
}

/// The benchmark (`scripts/bench-registry` runs it): the same lab of
/// containers from the registry (by reference), from the plain store (a
/// root file system tarball) and, the usual way, `docker pull` on every
/// node at once, at 2 and 4 nodes; the time to the last instance ready (to
/// the last pull done for `docker pull`) and the bytes the source's host
/// sent.
#[test]
#[ignore = "a benchmark: scripts/bench-registry runs it"]
fn bench_registry() {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let out_dir = std::path::PathBuf::from(env("BOOTCACHE_BENCH_OUT", "target/bench-registry"));
    std::fs::create_dir_all(&out_dir).unwrap();
    let runs: usize = env("BOOTCACHE_BENCH_RUNS", "2").parse().unwrap();
    let rate: u32 = env("BOOTCACHE_BENCH_RATE", "100").parse().unwrap();
    let layer_mib: usize = env("BOOTCACHE_BENCH_LAYER_MIB", "64").parse().unwrap();
    let per_node = 5;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let spec = Spec {
        nodes: (1..=4).map(|i| format!("n{i}")).collect(),
        daemons: true,
        agent_args: ["--ready-timeout", "600"].map(String::from).to_vec(),
        control_args: Vec::new(),
        log: "bench_registry",
        heartbeat: 0.3,
    };
    // The image: the small guest's root file system and three layers of
    // data that does not compress (an application's binaries, a runtime,
    // its data), made the same every time; the store serves it flattened.
    let (_, rootfs) = support::cluster::small_guest();
    let mut tars = vec![rootfs.clone()];
    for (i, what) in ["usr/lib/runtime.bin", "opt/app/app.bin", "srv/data.bin"].iter().enumerate() {
        let t = dir.path().join(format!("layer{i}.tar"));
        bootcache_testbed::oci::tar_of(&t, &[(what, &bootcache_testbed::oci::filler(i as u64 + 1, layer_mib << 20))]).unwrap();
        tars.push(t);
    }
    let tar_refs: Vec<&Path> = tars.iter().map(|p| p.as_path()).collect();
    let built = bootcache_testbed::oci::image(&dir.path().join("layers"), &tar_refs, &["/bin/sh"]).unwrap();
    bootcache_testbed::oci::flatten(&tar_refs, &store.join("app.tar")).unwrap();
    let image_bytes = built.bytes().unwrap();
    let tar_bytes = std::fs::metadata(store.join("app.tar")).unwrap().len();
    let mut c = Cluster::start(dir.path(), &store, Link::new(rate, 1.0), spec);

    let (_registry, registry, config) = registry_on_store(&c, dir.path());
    let docker_config = config.parent().unwrap().to_owned();
    let access = ["--registry-config", config.to_str().unwrap(), "--insecure-registry", registry.as_str()];
    let reference: Reference = format!("{registry}/bench/app:v1").parse().unwrap();
    let clients = Clients::new(Some(config.clone()), vec![registry.clone()]);
    c.tb.within("store", || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let client = clients.get(&reference.registry).unwrap();
            let layers: Vec<&Path> = built.layers.iter().map(|p| p.as_path()).collect();
            image::push(&client, &reference, &built.config, &layers).await.unwrap()
        })
    });
    c.restart_control(&access);
    let (control_url, join) = (c.control_url.clone(), c.join_token());
    for node in &mut c.nodes {
        node.restart_agent(&control_url, &join, &access);
    }
    c.wait_nodes_up();

    let on_store = format!("http://{}:8080/app.tar", c.store_addr);
    let mut results = Vec::new();
    for run in 1..=runs {
        for n in [2usize, 4] {
            for mode in ["registry", "store", "docker pull"] {
                for node in &c.nodes {
                    node.cold();
                    let _ = node.docker().docker().args(["rmi", "-f", &reference.to_string()]).output();
                }
                let before = c.tb.tx_bytes("store").unwrap();
                let last = if mode == "docker pull" {
                    let start = std::time::Instant::now();
                    let pulls: Vec<_> = c
                        .nodes
                        .iter()
                        .take(n)
                        .map(|node| {
                            node.docker()
                                .docker()
                                .env("DOCKER_CONFIG", &docker_config)
                                .args(["pull", "-q", &reference.to_string()])
                                .stdout(std::process::Stdio::null())
                                .stderr(std::process::Stdio::piped())
                                .spawn()
                                .unwrap()
                        })
                        .collect();
                    for p in pulls {
                        let out = p.wait_with_output().unwrap();
                        assert!(out.status.success(), "docker pull: {}", String::from_utf8_lossy(&out.stderr));
                    }
                    start.elapsed().as_secs_f64()
                } else {
                    let image = if mode == "registry" { reference.to_string() } else { on_store.clone() };
                    let file = c.dir.join("bench.yaml");
                    std::fs::write(&file, bench_lab(&image, n, per_node)).unwrap();
                    let out = c.cli(&["deploy", "-f", file.to_str().unwrap(), "--output", "json", "--timeout", "900"]);
                    assert!(out.status.success(), "deploy {mode}: {}", String::from_utf8_lossy(&out.stderr));
                    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                    let last = report["instances"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|i| i["ready_after_ms"].as_f64().unwrap_or(f64::NAN) / 1000.0)
                        .fold(0.0, f64::max);
                    let out = c.cli(&["destroy", "bench"]);
                    assert!(out.status.success(), "destroy: {}", String::from_utf8_lossy(&out.stderr));
                    last
                };
                let sent = c.tb.tx_bytes("store").unwrap() - before;
                let once = if mode == "store" { tar_bytes } else { image_bytes };
                let r = serde_json::json!({
                    "run": run, "mode": mode, "nodes": n, "rate_mbit": rate, "containers": n * per_node,
                    "last_ready_s": last, "source_bytes": sent, "image_bytes": once, "source_over_once": sent as f64 / once as f64,
                });
                eprintln!("{r}");
                results.push(r);
                std::fs::write(out_dir.join("results.json"), serde_json::to_string_pretty(&results).unwrap()).unwrap();
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
    // The table: medians per mode and node count, and ratios to `docker pull`.
    let median = |mode: &str, n: usize, key: &str| {
        let mut v: Vec<f64> = results.iter().filter(|r| r["mode"] == mode && r["nodes"] == n).filter_map(|r| r[key].as_f64()).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mut table = format!(
        "Containers ({per_node} per node) of one image of {:.0} MB in {} layers ({:.0} MB as a flattened tarball), {rate} Mbit/s links, median of {runs} runs.\n\n\
         | nodes | source | last ready (s) | vs docker pull | source host sent (MB) | x image |\n|---|---|---|---|---|---|\n",
        image_bytes as f64 / 1e6,
        built.layers.len(),
        tar_bytes as f64 / 1e6
    );
    for n in [2usize, 4] {
        let pull = median("docker pull", n, "last_ready_s");
        for mode in ["registry", "store", "docker pull"] {
            let last = median(mode, n, "last_ready_s");
            table += &format!(
                "| {n} | {mode} | {last:.1} | {:.2} | {:.1} | {:.2} |\n",
                last / pull,
                median(mode, n, "source_bytes") / 1e6,
                median(mode, n, "source_over_once")
            );
        }
    }
    table += "\n`docker pull`: the time until every node's pull is done (no container started); registry and store: from the deploy to the last container ready.\n";
    std::fs::write(out_dir.join("table.md"), &table).unwrap();
    println!("{table}");
}
