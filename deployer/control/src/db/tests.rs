use std::time::Duration;

use super::*;
use bootcache_api::{InstanceState, Kind};

fn name(s: &str) -> Name {
    s.parse().unwrap()
}

fn root(b: u8) -> RootDigest {
    RootDigest([b; 32])
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
        let beat =
            Heartbeat { cores: 2, memory_bytes: 24 << 30, running: 3, caches: vec![(root(1), 1000), (root(2), 50)], instances: vec![] };
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
        &Heartbeat { cores: 2, memory_bytes: 1, running: 0, caches: vec![(root(1), 4000)], instances: vec![] },
        20_000,
    )
    .unwrap();
    assert_eq!(db.holders(&root(1)).unwrap(), vec![(name("b"), 4000), (name("a"), 1000)]);
    db.heartbeat(&name("a"), &Heartbeat { cores: 2, memory_bytes: 1, running: 0, caches: vec![], instances: vec![] }, 21_000).unwrap();
    assert_eq!(db.holders(&root(1)).unwrap(), vec![(name("b"), 4000)]);
    assert!(db.holders(&root(2)).unwrap().is_empty());
}

#[test]
fn unknown_nodes_newer_schemas_and_damaged_rows_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.db");
    let db = Db::open(&path).unwrap();
    let beat = Heartbeat { cores: 1, memory_bytes: 1, running: 0, caches: vec![], instances: vec![] };
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
        db.heartbeat(&name("a"), &Heartbeat { cores: 2, memory_bytes: 1, running: 0, caches: vec![], instances: vec![] }, 1_000).unwrap();
        let spec = |name: &Name, kind, image, memory_bytes| InstanceSpec {
            lab: lab.clone(),
            name: name.clone(),
            kind,
            image,
            cores: 1,
            memory_bytes,
        };
        assert!(db.want_instance(&spec(&vm, Kind::Vm, root(1), 512 << 20), 1_000).unwrap());
        assert!(db.want_instance(&spec(&web, Kind::Container, root(2), 64 << 20), 1_000).unwrap());
        assert!(!db.want_instance(&spec(&vm, Kind::Vm, root(1), 512 << 20), 1_500).unwrap(), "a second deploy converges");
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
