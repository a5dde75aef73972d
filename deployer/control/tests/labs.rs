//! A lab is one thing, and what is derived from it is its own: on a real
//! control node and SQLite file (on loopback where HTTP matters), each
//! finding of a hostile try has its test here. Labs of containers and of
//! whole-disk VMs only, so no image store is read.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bootcache_api::agent::{Heartbeat, Join, Observed, Orders, names};
use bootcache_api::{InstanceState, Lab, Name};
use bootcache_control::api::Control;
use bootcache_control::db::Db;
use bootcache_http::auth::Credential;

const TOKEN: &str = "control-test-token-0123456789abcdef0123";

fn n(s: &str) -> Name {
    s.parse().unwrap()
}

fn control(dir: &std::path::Path) -> Arc<Control> {
    Control::new(Db::open(&dir.join("control.db")).unwrap(), Duration::from_secs(60))
}

/// `nodes` joined and heard from, each with `cores` cores.
fn nodes(c: &Control, nodes: &[&str], cores: u32) {
    for (i, node) in nodes.iter().enumerate() {
        let join = Join { name: n(node), address: format!("10.0.0.{}:7070", i + 2), cores, memory_bytes: 64 << 30 };
        c.join(&join, "peer".into(), true).unwrap();
        c.heartbeat(&n(node), &beat(cores, vec![])).unwrap();
    }
}

fn beat(cores: u32, instances: Vec<Observed>) -> Heartbeat {
    Heartbeat { cores, memory_bytes: 64 << 30, running: 0, caches: vec![], files: vec![], instances }
}

async fn deploy(c: &Arc<Control>, text: &str) -> Result<(), String> {
    let lab = Lab::parse(text).map_err(|e| e.to_string())?;
    c.deploy(text.to_owned(), lab).await.map(drop).map_err(|e| e.to_string())
}

fn lab(name: &str, body: &str) -> String {
    format!("name: {name}\nsegments:\n  lan:\n    subnet: 10.30.0.0/16\ninstances:\n{body}")
}

fn containers(def: &str, count: u32, extra: &str) -> String {
    format!("  {def}:\n    kind: container\n    image: http://10.0.0.1:8080/busybox.tar\n    count: {count}\n    segments: [lan]\n{extra}")
}

/// Everything placed on `node`, as its orders say.
fn orders(c: &Control, node: &str) -> Orders {
    c.orders(&n(node)).unwrap()
}

/// The invariants a hostile sequence must not break: every instance row
/// belongs to a lab that has it, every instance the labs want has a row,
/// no instance is ordered twice (on one node or two), and no two ordered
/// things share a derived name.
fn check_invariants(c: &Control, node_names: &[&str]) {
    let db = c.db();
    let mut wanted = HashSet::new();
    for lab in db.lab_names().unwrap() {
        let spec = db.lab(&lab).unwrap().unwrap();
        for i in spec.instances() {
            wanted.insert((lab.clone(), i.name));
        }
    }
    let rows = db.all_instances().unwrap();
    let recorded: HashSet<(Name, Name)> = rows.iter().map(|r| (r.spec.lab.clone(), r.spec.name.clone())).collect();
    assert_eq!(recorded, wanted, "rows and labs disagree");
    assert_eq!(rows.iter().map(|r| r.uid).collect::<HashSet<_>>().len(), rows.len(), "numbers are unique");
    drop(db);
    let mut seen_uids = HashSet::new();
    let mut macs = HashSet::new();
    let mut ids = HashSet::new();
    let mut vnis: HashMap<u32, (Name, Name)> = HashMap::new();
    let mut bridges: HashMap<String, (Name, Name)> = HashMap::new();
    for node in node_names {
        let o = orders(c, node);
        for i in &o.instances {
            assert!(seen_uids.insert(i.uid), "instance {} ordered twice", i.uid);
            assert!(ids.insert(names::instance(i.uid, &i.lab, &i.name)));
            assert!(recorded.contains(&(i.lab.clone(), i.name.clone())), "an order for an instance without a row");
            for nic in &i.nics {
                assert!(macs.insert(nic.mac), "MAC {} twice", nic.mac);
            }
        }
        for s in &o.segments {
            let owner = (s.lab.clone(), s.segment.clone());
            assert_eq!(vnis.entry(s.vni).or_insert_with(|| owner.clone()), &owner, "VNI {} of two segments", s.vni);
            assert_eq!(bridges.entry(s.bridge.to_string()).or_insert_with(|| owner.clone()), &owner, "bridge {} of two segments", s.bridge);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labs_whose_names_join_alike_are_two_things() {
    // Lab x.y with instance z and lab x with instance y.z were both
    // bootcache.x.y.z; 10,000 replicas on one segment had MAC pairs.
    let dir = tempfile::tempdir().unwrap();
    let c = control(dir.path());
    nodes(&c, &["node-a"], 4096);
    deploy(&c, &lab("x.y", &containers("z", 1, ""))).await.unwrap();
    deploy(&c, &lab("x", &containers("y.z", 1, ""))).await.unwrap();
    deploy(&c, &lab("many", &containers("r", 10_000, "    memory: 1MiB\n"))).await.unwrap();
    let o = orders(&c, "node-a");
    assert_eq!(o.instances.len(), 10_002);
    let ids: HashSet<String> = o.instances.iter().map(|i| names::instance(i.uid, &i.lab, &i.name)).collect();
    assert_eq!(ids.len(), 10_002);
    let macs: HashSet<_> = o.instances.iter().flat_map(|i| i.nics.iter().map(|n| n.mac)).collect();
    assert_eq!(macs.len(), 10_002, "every interface its own MAC");
    let vnis: HashSet<u32> = o.segments.iter().map(|s| s.vni).collect();
    assert_eq!(vnis.len(), 3, "three labs, three VNIs");
    check_invariants(&c, &["node-a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redeploy_applies_changed_definitions_and_checks_capacity_again() {
    let dir = tempfile::tempdir().unwrap();
    let c = control(dir.path());
    nodes(&c, &["node-a"], 2);
    let before = lab("l", &(containers("web", 2, "") + &containers("db", 1, "")));
    deploy(&c, &before).await.unwrap();
    let first = c.db().instances(&n("l")).unwrap();
    assert!(first.iter().all(|r| r.state == InstanceState::Placed));
    // db becomes a VM of 64 CPUs and 1000 GB: made anew, and it fits nowhere.
    let after = lab(
        "l",
        &(containers("web", 2, "")
            + "  db:\n    kind: vm\n    image: http://10.0.0.1:8080/disk.qcow2\n    delivery: full\n    cpus: 64\n    memory: 1000GiB\n    segments: [lan]\n"),
    );
    deploy(&c, &after).await.unwrap();
    let rows = c.db().instances(&n("l")).unwrap();
    let db = rows.iter().find(|r| r.spec.name.as_str() == "db").unwrap();
    let old = first.iter().find(|r| r.spec.name.as_str() == "db").unwrap();
    assert_ne!(db.uid, old.uid, "made anew");
    assert_eq!((db.spec.kind, db.spec.cores, db.spec.memory_bytes), (bootcache_api::Kind::Vm, 64, 1000 << 30));
    assert_eq!(db.state, InstanceState::Pending);
    assert!(db.reason.as_deref().unwrap().contains("waiting for room"), "{:?}", db.reason);
    for r in rows.iter().filter(|r| r.spec.name.as_str() != "db") {
        assert_eq!(first.iter().find(|f| f.spec.name == r.spec.name).unwrap().uid, r.uid, "unchanged instances are left as they are");
    }
    let o = orders(&c, "node-a");
    assert!(o.instances.iter().all(|i| i.uid != old.uid), "the old definition is not ordered any more");
    check_invariants(&c, &["node-a"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deploys_of_one_lab_leave_one_whole_lab() {
    let dir = tempfile::tempdir().unwrap();
    let c = control(dir.path());
    nodes(&c, &["node-a", "node-b"], 64);
    let a = lab("race", &(containers("a", 40, "") + &containers("shared", 10, "")));
    let b = lab("race", &(containers("b", 30, "") + &containers("shared", 10, "    memory: 2MiB\n")));
    for round in 0..150 {
        let (ca, cb) = (Arc::clone(&c), Arc::clone(&c));
        let (ta, tb) = (a.clone(), b.clone());
        let (x, y) = tokio::join!(tokio::spawn(async move { deploy(&ca, &ta).await }), tokio::spawn(async move { deploy(&cb, &tb).await }));
        // One may find the other recorded since it began: it then records nothing, and says so.
        let (x, y) = (x.unwrap(), y.unwrap());
        assert!(x.is_ok() || y.is_ok(), "round {round}: {x:?} {y:?}");
        for e in [&x, &y].into_iter().filter_map(|r| r.as_ref().err()) {
            assert!(e.contains("deployed again"), "{e}");
        }
        check_invariants(&c, &["node-a", "node-b"]);
        let placed: usize = ["node-a", "node-b"].iter().map(|node| orders(&c, node).instances.len()).sum();
        let rows = c.db().instances(&n("race")).unwrap().len();
        assert_eq!(placed, rows, "round {round}: every instance ordered, none without a row");
    }
}

/// A store that accepts and says nothing for a while: a deploy reading an
/// image header from it waits.
async fn silent_store() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/slow.bcimg", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destroy_during_a_slow_deploy_stands() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = control(dir.path());
    if let Some(c) = Arc::get_mut(&mut c) {
        c.retry.request_timeout = Duration::from_secs(2);
        c.retry.budget = Duration::from_secs(3);
    }
    nodes(&c, &["node-a"], 8);
    deploy(&c, &lab("slow", &containers("c", 2, ""))).await.unwrap();
    let url = silent_store().await;
    let text = lab("slow", &(containers("c", 2, "") + &format!("  vm:\n    kind: vm\n    image: {url}\n    segments: [lan]\n")));
    let (c2, t2) = (Arc::clone(&c), text.clone());
    let slow = tokio::spawn(async move { deploy(&c2, &t2).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(c.destroy(&n("slow")).unwrap(), "destroyed while the deploy reads its image");
    let done = slow.await.unwrap();
    // Either the header read failed (the store said nothing) or the deploy
    // found the lab destroyed: in no case is the lab back.
    assert!(done.is_err(), "{done:?}");
    assert!(
        c.db().lab(&n("slow")).unwrap().is_none() && c.db().instances(&n("slow")).unwrap().is_empty(),
        "the destroyed lab did not come back"
    );
    assert!(orders(&c, "node-a").instances.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_that_began_before_a_destroy_records_nothing() {
    // The same race, with a store that answers slowly but does answer: the
    // deploy reads its header whole, then finds its lab destroyed meanwhile.
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    let store_dir = dir.path().join("store");
    std::fs::create_dir(&store_dir).unwrap();
    let src = bootcache_convert::open(&raw, None).unwrap().source;
    let (out, _) = bootcache_convert::convert(src.as_ref(), &[], std::io::Cursor::new(Vec::new()), &Default::default(), &|_| {}).unwrap();
    std::fs::write(store_dir.join("disk.bcimg"), out.into_inner()).unwrap();
    let store = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let store_addr = store.local_addr().unwrap();
    tokio::spawn(bootcache_delivery::store::serve(store, store_dir, Default::default()));
    // A proxy that waits 1 s before passing each connection on.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/disk.bcimg", proxy.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = proxy.accept().await {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Ok(mut up) = tokio::net::TcpStream::connect(store_addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut up).await;
                }
            });
        }
    });
    let c = control(dir.path());
    nodes(&c, &["node-a"], 8);
    let text = lab("late", &format!("  vm:\n    kind: vm\n    image: {url}\n    segments: [lan]\n"));
    let (c2, t2) = (Arc::clone(&c), text.clone());
    let slow = tokio::spawn(async move { deploy(&c2, &t2).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    c.destroy(&n("late")).unwrap();
    let e = slow.await.unwrap().unwrap_err();
    assert!(e.contains("destroyed or deployed again"), "{e}");
    assert!(c.db().lab(&n("late")).unwrap().is_none());
    // Deployed again afterwards: it is there.
    deploy(&c, &text).await.unwrap();
    assert_eq!(c.db().instances(&n("late")).unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_instances_get_their_node_before_others_compete_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = control(dir.path());
    // One node with room for 16 vCPUs (1 core x 16).
    nodes(&c, &["node-a"], 1);
    // Lab "a" (first in name order) wants all of it unpinned, lab "b" some of it pinned.
    let a = lab("a", &containers("free", 1, "    cpus: 12\n"));
    let b = lab("b", &containers("pinned", 1, "    cpus: 8\n    node: node-a\n"));
    // Both wait for the node's heartbeat, then are placed together.
    c.db().remove_node(&n("node-a"), 0).unwrap();
    deploy(&c, &a).await.unwrap();
    deploy(&c, &b).await.unwrap();
    nodes(&c, &["node-a"], 1);
    let pinned = &c.db().instances(&n("b")).unwrap()[0];
    let free = &c.db().instances(&n("a")).unwrap()[0];
    assert_eq!(pinned.state, InstanceState::Placed, "the pinned instance took its node");
    assert_eq!(free.state, InstanceState::Pending);
}

/// A node that stops answering loses its instances, and the other nodes'
/// tunnels of their segments follow; once it answers again with them
/// running, the tunnels are ordered again (found on a loaded testbed: the
/// segment stayed cut after a node's late heartbeats).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_is_joined_again_when_a_node_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let c = Control::new(Db::open(&dir.path().join("control.db")).unwrap(), Duration::from_millis(200));
    let watch = tokio::spawn(Arc::clone(&c).watch_nodes());
    nodes(&c, &["node-a", "node-b"], 8);
    let text = lab("l", &(containers("a", 1, "    node: node-a\n") + &containers("b", 1, "    node: node-b\n")));
    deploy(&c, &text).await.unwrap();
    let remotes = |c: &Control| orders(c, "node-a").segments.iter().flat_map(|s| s.remotes.clone()).collect::<Vec<_>>();
    assert_eq!(remotes(&c), ["10.0.0.3".parse::<std::net::Ipv4Addr>().unwrap()]);
    let b = c.db().instances(&n("l")).unwrap().into_iter().find(|r| r.spec.name == n("b")).unwrap();
    // node-b is silent: its instance is lost and node-a's tunnel goes.
    let started = Instant::now();
    while c.db().instance(&n("l"), &n("b")).unwrap().unwrap().state != InstanceState::Lost {
        assert!(started.elapsed() < Duration::from_secs(10), "node-b's instance never lost");
        c.heartbeat(&n("node-a"), &beat(8, vec![])).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(remotes(&c).is_empty(), "{:?}", remotes(&c));
    // It answers again, its instance running.
    let seen = vec![Observed { uid: b.uid, lab: n("l"), name: n("b"), state: InstanceState::Ready, reason: None }];
    c.heartbeat(&n("node-b"), &beat(8, seen)).unwrap();
    assert_eq!(c.db().instance(&n("l"), &n("b")).unwrap().unwrap().state, InstanceState::Ready);
    assert_eq!(remotes(&c), ["10.0.0.3".parse::<std::net::Ipv4Addr>().unwrap()], "node-a's tunnel is ordered again");
    watch.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_speak_for_instances_it_was_not_given() {
    let dir = tempfile::tempdir().unwrap();
    let c = control(dir.path());
    nodes(&c, &["node-a", "node-b"], 8);
    deploy(&c, &lab("l", &containers("c", 1, "    node: node-a\n"))).await.unwrap();
    let row = c.db().instances(&n("l")).unwrap().remove(0);
    let report = |state| vec![Observed { uid: row.uid, lab: n("l"), name: n("c"), state, reason: Some("made up".into()) }];
    // node-b says node-a's instance failed: nothing changes.
    c.heartbeat(&n("node-b"), &beat(8, report(InstanceState::Failed))).unwrap();
    assert_eq!(c.db().instances(&n("l")).unwrap()[0].state, InstanceState::Placed);
    // 48,000 invented instances: refused whole, cheaply.
    let flood: Vec<Observed> =
        (0..48_000).map(|i| Observed { uid: i, lab: n("l"), name: n("c"), state: InstanceState::Ready, reason: None }).collect();
    let started = Instant::now();
    assert!(c.heartbeat(&n("node-b"), &beat(8, flood)).is_err());
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    // Destroyed: destroy waits for node-a only, whatever node-b claims.
    c.heartbeat(&n("node-a"), &beat(8, report(InstanceState::Ready))).unwrap();
    c.destroy(&n("l")).unwrap();
    c.heartbeat(&n("node-b"), &beat(8, report(InstanceState::Ready))).unwrap();
    let remaining = c.db().remaining(&n("l")).unwrap();
    assert_eq!(remaining.iter().map(|r| r.node.as_str()).collect::<Vec<_>>(), ["node-a"]);
}

async fn serve(c: &Arc<Control>) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = c.api(Credential::from_token(TOKEN));
    tokio::spawn(async move {
        let _ = bootcache_http::serve(listener, router, Default::default(), std::future::pending()).await;
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_huge_bodies_are_cut_and_long_urls_refused_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let mut c = control(dir.path());
    if let Some(c) = Arc::get_mut(&mut c) {
        c.body_timeout = Duration::from_secs(1);
    }
    let addr = serve(&c).await;
    // A body trickled a byte at a time: the connection is answered 408 and closed.
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("POST /labs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 1000\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let trickle = tokio::spawn(async move {
        for _ in 0..20 {
            if s.write_all(b"n").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
        answer
    });
    let answer = String::from_utf8_lossy(&trickle.await.unwrap()).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5), "cut after the body timeout: {:?}", started.elapsed());
    let http = reqwest::Client::new();
    let auth = format!("Bearer {TOKEN}");
    // Too large: 413, not read.
    // (Or the connection closed under the rest of it.)
    match http.post(format!("http://{addr}/labs")).header("authorization", &auth).body(vec![b'#'; 5 << 20]).send().await {
        Ok(big) => assert_eq!(big.status(), 413),
        Err(e) => assert!(e.is_request(), "{e}"),
    }
    // Without the credential, a body is not read at all: 401 (or the
    // connection closed under the rest of the body).
    match http.post(format!("http://{addr}/labs")).body(vec![b'#'; 5 << 20]).send().await {
        Ok(anon) => assert_eq!(anon.status(), 401),
        Err(e) => assert!(e.is_request(), "{e}"),
    }
    // A 1.5 MB URL: refused at once, not echoed.
    let url = format!("http://10.0.0.1/{}", "a".repeat(1_500_000));
    let started = Instant::now();
    let r = http
        .post(format!("http://{addr}/images"))
        .header("authorization", &auth)
        .json(&serde_json::json!({"url": url}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(text.len() < 200 && text.contains("longer than 2048 bytes"), "{}", &text[..text.len().min(300)]);
    assert!(started.elapsed() < Duration::from_secs(2));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]
    /// Labs of generated names (dots and dashes where they join alike),
    /// segments and counts, deployed together: every derived identifier
    /// is unique across them.
    #[test]
    fn identifiers_are_unique_across_generated_labs(
        labs in proptest::collection::vec(("[a-z][a-z.]{0,4}", proptest::collection::vec(("[a-z][a-z.-]{0,4}", 1u32..5), 1..4), 1usize..3), 1..5)
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let c = control(dir.path());
            nodes(&c, &["node-a", "node-b"], 4096);
            let mut seen_labs = HashSet::new();
            for (name, defs, segs) in &labs {
                if !seen_labs.insert(name.clone()) || name.ends_with('.') {
                    continue;
                }
                let mut text = format!("name: {name}\nsegments:\n");
                for s in 0..*segs {
                    text += &format!("  s{s}:\n    subnet: 10.{s}.0.0/16\n");
                }
                text += "instances:\n";
                let mut used = HashSet::new();
                for (def, count) in defs {
                    if !used.insert(def.clone()) || def.ends_with(['.', '-']) {
                        continue;
                    }
                    let on: Vec<String> = (0..*segs).map(|s| format!("s{s}")).collect();
                    text += &format!("  {def}:\n    kind: container\n    image: http://s/x.tar\n    count: {count}\n    segments: [{}]\n", on.join(", "));
                }
                // Replica names may meet another definition's: such a lab is refused, as it should be.
                let _ = deploy(&c, &text).await;
            }
            check_invariants(&c, &["node-a", "node-b"]);
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_logs_go_through_the_instances_node_and_only_it_answers() {
    use bootcache_api::agent::{TaskKind, TaskResult};
    let dir = tempfile::tempdir().unwrap();
    let c = control(dir.path());
    nodes(&c, &["node-a", "node-b"], 8);
    deploy(&c, &lab("l", &containers("c", 1, "    node: node-a\n"))).await.unwrap();
    let argv = vec!["cat".to_owned(), "/etc/motd".to_owned()];
    let (c2, a2) = (Arc::clone(&c), argv.clone());
    let asked =
        tokio::spawn(
            async move { c2.run_task(&n("l"), &n("c"), TaskKind::Exec { argv: a2, timeout_s: 5 }, Duration::from_secs(10)).await },
        );
    // node-a is handed the task with its next heartbeat, once; node-b nothing.
    let mut task = None;
    for _ in 0..50 {
        let o = c.heartbeat(&n("node-a"), &beat(8, vec![])).unwrap();
        assert!(c.heartbeat(&n("node-b"), &beat(8, vec![])).unwrap().tasks.is_empty());
        if let Some(t) = o.tasks.into_iter().next() {
            task = Some(t);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let task = task.expect("the task was handed over");
    assert_eq!(task.what, TaskKind::Exec { argv, timeout_s: 5 });
    assert!(c.heartbeat(&n("node-a"), &beat(8, vec![])).unwrap().tasks.is_empty(), "once");
    let answer = TaskResult { code: Some(0), output: "hello\n".into(), error: None };
    assert!(!c.task_done(&n("node-b"), task.id, answer.clone()), "another node cannot answer it");
    assert!(c.task_done(&n("node-a"), task.id, answer.clone()));
    assert_eq!(asked.await.unwrap().unwrap(), answer);
    assert!(!c.task_done(&n("node-a"), task.id, answer), "answered once");
    // Nobody answers: the caller is told, and nothing is left queued.
    let e = c.run_task(&n("l"), &n("c"), TaskKind::Logs, Duration::from_millis(200)).await.unwrap_err();
    assert!(e.to_string().contains("node-a did not answer"), "{e}");
    assert!(c.heartbeat(&n("node-a"), &beat(8, vec![])).unwrap().tasks.is_empty());
    let e = c.run_task(&n("l"), &n("nobody"), TaskKind::Logs, Duration::from_millis(200)).await.unwrap_err();
    assert!(e.to_string().contains("no instance l/nobody"), "{e}");
}
