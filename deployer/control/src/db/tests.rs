use std::time::Duration;

use super::*;
use bootcache_api::{InstanceState, Kind};

fn name(s: &str) -> Name {
    s.parse().unwrap()
}

fn root(b: u8) -> RootDigest {
    RootDigest([b; 32])
}

fn two_instance_lab() -> (String, bootcache_api::Lab) {
    lab_text("lab1", "10.8.0.0/24", None)
}

fn lab_text(lab: &str, subnet: &str, bridge: Option<&str>) -> (String, bootcache_api::Lab) {
    let bridge = bridge.map_or(String::new(), |b| format!("    bridge: {b}\n"));
    let text = format!(
        "name: {lab}\nsegments:\n  lan:\n    subnet: {subnet}\n{bridge}instances:\n  vm1:\n    kind: vm\n    image: http://s/a.bcimg\n    segments: [lan]\n  web1:\n    kind: container\n    image: http://s/b.tar\n    segments: [lan]\n"
    );
    let parsed = bootcache_api::Lab::parse(&text).unwrap();
    (text, parsed)
}

fn specs_of(lab: &bootcache_api::Lab, version: &str) -> Vec<InstanceSpec> {
    lab.instances()
        .into_iter()
        .map(|i| InstanceSpec {
            lab: lab.name.clone(),
            name: i.name.clone(),
            kind: lab.def(&i.def).unwrap().kind,
            image: root(1),
            cores: 1,
            memory_bytes: 1 << 20,
            fingerprint: format!("{}-{version}", i.name),
            failed: None,
        })
        .collect()
}

#[test]
fn state_survives_a_restart_and_nodes_go_down_after_three_missed_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.db");
    let interval = Duration::from_secs(2);
    {
        let db = Db::open(&path).unwrap();
        assert_eq!(db.version().unwrap(), MIGRATIONS.len() as i64);
        db.register_node(&name("a"), "10.0.0.2:7070", 0).unwrap();
        db.register_node(&name("b"), "10.0.0.3:7070", 0).unwrap();
        let beat = Heartbeat {
            cores: 2,
            memory_bytes: 24 << 30,
            running: 3,
            caches: vec![(root(1), 1000), (root(2), 50)],
            files: vec![],
            instances: vec![],
        };
        db.heartbeat(&name("a"), &beat, 10_000).unwrap();
        db.register_image(&root(1), "http://store/a.bcimg", 4 << 30, 1000, 0).unwrap();
    }
    // Reopened (a restarted control node): everything is still there.
    let db = Db::open(&path).unwrap();
    let nodes = db.nodes(15_000, interval).unwrap();
    assert_eq!(nodes.len(), 2);
    assert!(nodes[0].up && nodes[0].last.as_ref().unwrap().caches == vec![(root(1), 1000), (root(2), 50)]);
    assert!(!nodes[1].up && nodes[1].last.is_none(), "a node that never sent a heartbeat is not up");
    assert!(db.nodes(16_000, interval).unwrap()[0].up, "three intervals: still up");
    assert!(!db.nodes(16_001, interval).unwrap()[0].up, "past three intervals: down");
    // A control node that was itself down until 15 s does not count its own
    // downtime: the node has three intervals from then to come back.
    let mut restarted = Db::open(&path).unwrap();
    restarted.watch_from(15_000);
    assert!(restarted.nodes(21_000, interval).unwrap()[0].up, "silent 11 s, but only 6 s of it to this control node");
    assert!(!restarted.nodes(21_001, interval).unwrap()[0].up);
    assert!(!restarted.nodes(21_000, interval).unwrap()[1].up, "a node that never sent a heartbeat is still not up");
    assert_eq!(db.image_url(&root(1)).unwrap().as_deref(), Some("http://store/a.bcimg"));
    assert_eq!(db.image_url(&root(9)).unwrap(), None);

    // What a node caches is replaced by each heartbeat; holders most first.
    db.heartbeat(
        &name("b"),
        &Heartbeat { cores: 2, memory_bytes: 1, running: 0, caches: vec![(root(1), 4000)], files: vec![], instances: vec![] },
        20_000,
    )
    .unwrap();
    assert_eq!(db.holders(&root(1)).unwrap(), vec![(name("b"), 4000), (name("a"), 1000)]);
    db.heartbeat(
        &name("a"),
        &Heartbeat { cores: 2, memory_bytes: 1, running: 0, caches: vec![], files: vec![], instances: vec![] },
        21_000,
    )
    .unwrap();
    assert_eq!(db.holders(&root(1)).unwrap(), vec![(name("b"), 4000)]);
    assert!(db.holders(&root(2)).unwrap().is_empty());
}

#[test]
fn unknown_nodes_newer_schemas_and_damaged_rows_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.db");
    let db = Db::open(&path).unwrap();
    let beat = Heartbeat { cores: 1, memory_bytes: 1, running: 0, caches: vec![], files: vec![], instances: vec![] };
    let err = db.heartbeat(&name("ghost"), &beat, 0).unwrap_err();
    assert!(matches!(err, DbError::NoSuchNode(_)) && err.to_string().contains("ghost"), "{err}");
    // A name that is not a Name, written behind the control node's back.
    db.conn.execute("INSERT INTO nodes (name, address, registered_ms) VALUES ('../x', 'a', 0)", []).unwrap();
    let err = db.nodes(0, Duration::from_secs(1)).unwrap_err().to_string();
    assert!(err.contains("node name") && err.contains("not valid"), "{err}");
    drop(db);
    // A database from a newer control node.
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = Db::open(&path).unwrap_err().to_string();
    assert!(err.contains("schema version 99"), "{err}");
}

#[test]
fn instances_follow_their_state_machine_survive_restarts_and_are_lost_with_their_node() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.db");
    let (lab, vm, web) = (name("lab1"), name("vm1"), name("web1"));
    {
        let db = Db::open(&path).unwrap();
        db.register_node(&name("a"), "10.0.0.2:7070", 0).unwrap();
        db.heartbeat(
            &name("a"),
            &Heartbeat { cores: 2, memory_bytes: 1, running: 0, caches: vec![], files: vec![], instances: vec![] },
            1_000,
        )
        .unwrap();
        let spec = |name: &Name, kind, image, memory_bytes| InstanceSpec {
            lab: lab.clone(),
            name: name.clone(),
            kind,
            image,
            cores: 1,
            memory_bytes,
            fingerprint: format!("{name}-v1"),
            failed: None,
        };
        let (text, parsed) = two_instance_lab();
        let specs = [spec(&vm, Kind::Vm, root(1), 512 << 20), spec(&web, Kind::Container, root(2), 64 << 20)];
        assert_eq!(db.put_lab(&parsed, &text.clone().into(), &[], &specs, 1_000).unwrap().added, 2);
        let again = db.put_lab(&parsed, &text.clone().into(), &[], &specs, 1_500).unwrap();
        assert_eq!((again.added, again.kept), (0, 2), "a second deploy converges");
        db.set_state(&lab, &vm, InstanceState::Placed, Some(&name("a")), None, 2_000).unwrap();
        db.set_state(&lab, &vm, InstanceState::Fetching, None, None, 3_000).unwrap();
        let err = db.set_state(&lab, &vm, InstanceState::Pending, None, None, 3_500).unwrap_err().to_string();
        assert!(err.contains("cannot go from fetching to pending"), "{err}");
        db.set_state(&lab, &web, InstanceState::Failed, None, Some("image not found"), 4_000).unwrap();
        assert!(matches!(db.set_state(&lab, &name("nope"), InstanceState::Placed, None, None, 0), Err(DbError::NoSuchInstance { .. })));
    }
    let db = Db::open(&path).unwrap();
    let all = db.instances(&lab).unwrap();
    assert_eq!(all.len(), 2);
    let (v, w) = (&all[0], &all[1]);
    assert_eq!((v.state, v.node.as_ref()), (InstanceState::Fetching, Some(&name("a"))));
    assert_eq!(v.history, vec![(InstanceState::Pending, 1_000), (InstanceState::Placed, 2_000), (InstanceState::Fetching, 3_000)]);
    assert_eq!((w.state, w.reason.as_deref()), (InstanceState::Failed, Some("image not found")));
    // Node a misses three heartbeats: its instance is lost, the failed one is left alone.
    assert!(db.mark_lost(5_000, Duration::from_secs(2)).unwrap().is_empty(), "still up");
    let lost = db.mark_lost(8_000, Duration::from_secs(2)).unwrap();
    assert_eq!(lost, vec![(lab.clone(), vm.clone())]);
    let v = &db.instances(&lab).unwrap()[0];
    assert_eq!(v.state, InstanceState::Lost);
    assert!(v.reason.as_deref().unwrap().contains("node a stopped answering"));
    assert!(db.mark_lost(9_000, Duration::from_secs(2)).unwrap().is_empty(), "lost once");
}

/// A lab sent with files its `from:` names reads back with them, after
/// a restart too; its text is still the text as written.
#[test]
fn a_lab_with_files_reads_back_with_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.db");
    let (text, _) = two_instance_lab();
    let text = text.replace("    image: http://s/b.tar\n", "    image: http://s/b.tar\n    files: {/etc/app.conf: {from: app.conf}}\n");
    let source = bootcache_api::lab::LabSource { text: text.clone(), files: [("app.conf".to_owned(), "a=1\n".to_owned())].into() };
    let lab = source.parse().unwrap();
    Db::open(&path).unwrap().put_lab(&lab, &source, &[], &specs_of(&lab, "v1"), 0).unwrap();
    let db = Db::open(&path).unwrap();
    let back = db.lab(&lab.name).unwrap().unwrap();
    assert_eq!(back, lab);
    assert_eq!(back.instances[1].files.get("/etc/app.conf").map(String::as_str), Some("a=1\n"));
    assert_eq!(db.lab_text(&lab.name).unwrap().unwrap(), text);
}

#[test]
fn a_lab_is_recorded_whole_changed_instances_anew_and_numbers_never_twice() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("control.db")).unwrap();
    let (text, lab) = two_instance_lab();
    db.put_lab(&lab, &text.clone().into(), &[], &specs_of(&lab, "v1"), 0).unwrap();
    let first = db.instances(&lab.name).unwrap();
    let seg = db.segments(&lab.name).unwrap();
    assert_eq!(seg.len(), 1);
    assert_eq!(seg[0].bridge, bootcache_api::agent::names::bridge(seg[0].id));
    // The lab reads back from its text, as written.
    assert_eq!(db.lab(&lab.name).unwrap().unwrap(), lab);
    assert_eq!(db.lab_text(&lab.name).unwrap().unwrap(), text);
    // web1 changed: made anew with a new number; vm1 kept as it was.
    let mut specs = specs_of(&lab, "v1");
    specs[1].fingerprint = "web1-v2".into();
    specs[1].memory_bytes = 1 << 30;
    let done = db.put_lab(&lab, &text.clone().into(), &[], &specs, 10).unwrap();
    assert_eq!((done.kept, done.recreated, done.added, done.removed), (1, 1, 0, 0));
    let second = db.instances(&lab.name).unwrap();
    assert_eq!(second[0].uid, first[0].uid);
    assert_ne!(second[1].uid, first[1].uid);
    assert_eq!((second[1].state, second[1].spec.memory_bytes), (InstanceState::Pending, 1 << 30), "placed again, capacity counted again");
    assert_eq!(second[1].history, vec![(InstanceState::Pending, 10)], "a new instance's history");
    // Another lab: other numbers, even with the same names; its bridge may not be this lab's.
    let derived = format!("name: lab2\nsegments:\n  lan:\n    subnet: 10.8.0.0/24\n    bridge: {}\ninstances: {{}}\n", seg[0].bridge);
    assert!(
        bootcache_api::Lab::parse(&derived).unwrap_err().message.contains("shape"),
        "a bridge of the derived shape is refused when the lab is read"
    );
    let (text2, lab2) = lab_text("lab2", "10.8.0.0/24", Some("br-mine"));
    db.put_lab(&lab2, &text2.clone().into(), &[], &specs_of(&lab2, "v1"), 20).unwrap();
    let (text3, lab3) = lab_text("lab3", "10.9.0.0/24", Some("br-mine"));
    let e = db.put_lab(&lab3, &text3.clone().into(), &[], &specs_of(&lab3, "v1"), 30).unwrap_err().to_string();
    assert!(e.contains("bridge br-mine is lab lab2's"), "{e}");
    assert!(db.lab(&lab3.name).unwrap().is_none() && db.instances(&lab3.name).unwrap().is_empty(), "nothing of a refused lab is recorded");
    let uids: std::collections::HashSet<u32> =
        db.all_instances().unwrap().iter().map(|r| r.uid).chain(first.iter().map(|r| r.uid)).collect();
    assert_eq!(uids.len(), 5, "every instance ever made has a number of its own");
    let ids: std::collections::HashSet<u32> = [&lab.name, &lab2.name].iter().flat_map(|l| db.segments(l).unwrap()).map(|s| s.id).collect();
    assert_eq!(ids.len(), 2);
    // Destroyed: gone whole; a new deploy of the same lab gets new numbers.
    assert!(db.delete_lab(&lab.name).unwrap());
    assert!(db.segments(&lab.name).unwrap().is_empty() && db.instances(&lab.name).unwrap().is_empty());
    db.put_lab(&lab, &text.clone().into(), &[], &specs_of(&lab, "v1"), 40).unwrap();
    let third = db.instances(&lab.name).unwrap();
    assert!(third.iter().all(|r| !uids.contains(&r.uid)));
    assert!(db.segments(&lab.name).unwrap()[0].id > seg[0].id);
}

#[test]
fn a_node_is_taken_only_for_what_it_was_ordered() {
    use bootcache_api::agent::Observed;
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("control.db")).unwrap();
    let (text, lab) = two_instance_lab();
    db.put_lab(&lab, &text.clone().into(), &[], &specs_of(&lab, "v1"), 0).unwrap();
    for n in ["a", "b"] {
        db.register_node(&name(n), "10.0.0.2:7070", 0).unwrap();
    }
    let rows = db.instances(&lab.name).unwrap();
    db.set_state(&lab.name, &name("vm1"), InstanceState::Placed, Some(&name("a")), None, 1).unwrap();
    let seen = |uid, n: &str, state| Observed { uid, lab: lab.name.clone(), name: name(n), state, reason: None };
    // a reports its own instance, b claims it too, and an invented one.
    let taken = db.observe(&name("a"), &[seen(rows[0].uid, "vm1", InstanceState::Ready), seen(99, "ghost", InstanceState::Ready)]).unwrap();
    assert_eq!(taken, vec![seen(rows[0].uid, "vm1", InstanceState::Ready)]);
    assert!(db.observe(&name("b"), &[seen(rows[0].uid, "vm1", InstanceState::Failed)]).unwrap().is_empty(), "not b's");
    assert!(db.observe(&name("a"), &[seen(rows[1].uid, "web1", InstanceState::Ready)]).unwrap().is_empty(), "not ordered to a");
    assert!(db.observe(&name("a"), &[seen(rows[0].uid + 1000, "vm1", InstanceState::Ready)]).unwrap().is_empty(), "another number");
    // Once destroyed, what a reported before is still taken until it is gone (destroy waits for it).
    db.observe(&name("a"), &[seen(rows[0].uid, "vm1", InstanceState::Ready)]).unwrap();
    db.delete_lab(&lab.name).unwrap();
    assert_eq!(db.observe(&name("a"), &[seen(rows[0].uid, "vm1", InstanceState::Ready)]).unwrap().len(), 1);
    assert_eq!(db.remaining(&lab.name).unwrap().len(), 1);
    // b's invented claims never reach what destroy waits for.
    db.observe(&name("b"), &[seen(rows[1].uid, "web1", InstanceState::Ready)]).unwrap();
    assert_eq!(db.remaining(&lab.name).unwrap().len(), 1);
    // Thousands of reports from a node ordered nothing: refused whole.
    let flood: Vec<Observed> = (0..5_000).map(|i| seen(i, "vm1", InstanceState::Ready)).collect();
    let e = db.observe(&name("b"), &flood).unwrap_err();
    assert!(matches!(e, DbError::Claims(_)), "{e}");
    assert!(db.observe(&name("a"), &[]).unwrap().is_empty());
    assert!(db.remaining(&lab.name).unwrap().is_empty());
}

#[test]
fn nodes_join_once_claim_within_bounds_and_can_be_removed() {
    use bootcache_api::agent::Join;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.db");
    let db = Db::open(&path).unwrap();
    let interval = Duration::from_secs(1);
    let join = Join { name: name("a"), address: "10.0.0.2:7070".into(), cores: 8, memory_bytes: 16 << 30 };
    db.join(&join, "digest-1", false, 0, interval).unwrap();
    assert_eq!(db.node_secret(&name("a")).unwrap().as_deref(), Some("digest-1"));
    // Up (a heartbeat): nobody joins as it again, from anywhere.
    let beat = Heartbeat { cores: u32::MAX, memory_bytes: u64::MAX, running: 0, caches: vec![], files: vec![], instances: vec![] };
    db.heartbeat(&name("a"), &beat, 1_000).unwrap();
    let elsewhere = Join { address: "10.6.6.6:7070".into(), ..join.clone() };
    let e = db.join(&elsewhere, "digest-2", true, 1_500, interval).unwrap_err();
    assert!(matches!(e, DbError::NodeUp(_)) && e.to_string().contains("node remove a"), "{e}");
    assert_eq!(db.node_secret(&name("a")).unwrap().as_deref(), Some("digest-1"));
    // What it claims is bounded by what it joined with.
    let n = &db.nodes(1_500, interval).unwrap()[0];
    let last = n.last.as_ref().unwrap();
    assert_eq!((last.cores, last.memory_bytes, n.address.as_str()), (8, 16 << 30, "10.0.0.2:7070"));
    // Down: the join token does not take it over; the administrator may (a new credential).
    let e = db.join(&elsewhere, "digest-3", false, 10_000, interval).unwrap_err();
    assert!(matches!(e, DbError::NodeKnown(_)), "{e}");
    assert_eq!(db.node_secret(&name("a")).unwrap().as_deref(), Some("digest-1"));
    db.join(&elsewhere, "digest-3", true, 10_000, interval).unwrap();
    assert_eq!(db.node_secret(&name("a")).unwrap().as_deref(), Some("digest-3"));
    // Removed: its instances go back to pending, its credential with it.
    let (text, lab) = two_instance_lab();
    db.put_lab(&lab, &text.clone().into(), &[], &specs_of(&lab, "v1"), 0).unwrap();
    db.set_state(&lab.name, &name("vm1"), InstanceState::Placed, Some(&name("a")), None, 1).unwrap();
    db.set_state(&lab.name, &name("vm1"), InstanceState::Starting, None, None, 2).unwrap();
    assert!(db.remove_node(&name("a"), 3).unwrap());
    assert!(!db.remove_node(&name("a"), 4).unwrap());
    assert!(db.node_secret(&name("a")).unwrap().is_none() && db.nodes(5, interval).unwrap().is_empty());
    let vm = &db.instances(&lab.name).unwrap()[0];
    assert_eq!((vm.state, vm.node.as_ref()), (InstanceState::Pending, None));
    assert!(vm.reason.as_deref().unwrap().contains("node a was removed"));
    // The database is the owner's only.
    use std::os::unix::fs::PermissionsExt;
    for f in [path.clone(), path.with_extension("db-wal")] {
        if f.exists() {
            assert_eq!(std::fs::metadata(&f).unwrap().permissions().mode() & 0o777, 0o600, "{}", f.display());
        }
    }
}

#[test]
fn a_whole_file_is_known_by_the_first_digest_and_only_matching_copies_are_sources() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("control.db")).unwrap();
    for n in ["a", "b", "c"] {
        db.register_node(&name(n), "10.0.0.2:7070", 0).unwrap();
    }
    let key = root(7);
    let beat = |digest: u8| Heartbeat {
        cores: 1,
        memory_bytes: 1,
        running: 0,
        caches: vec![(key, 1)],
        files: vec![(key, root(digest))],
        instances: vec![],
    };
    assert_eq!(db.file_digest(&key).unwrap(), None);
    db.heartbeat(&name("a"), &beat(1), 1).unwrap();
    db.heartbeat(&name("b"), &beat(1), 2).unwrap();
    // c's copy differs: the cluster keeps the first digest, and c is no source.
    db.heartbeat(&name("c"), &beat(2), 3).unwrap();
    assert_eq!(db.file_digest(&key).unwrap(), Some(root(1)));
    let holders: Vec<Name> = db.holders(&key).unwrap().into_iter().map(|(n, _)| n).collect();
    assert_eq!(holders, vec![name("a"), name("b")]);
    // A VM image (no file digest) has every holder.
    let vm = Heartbeat { cores: 1, memory_bytes: 1, running: 0, caches: vec![(root(8), 100)], files: vec![], instances: vec![] };
    db.heartbeat(&name("c"), &vm, 4).unwrap();
    assert_eq!(db.holders(&root(8)).unwrap(), vec![(name("c"), 100)]);
}
