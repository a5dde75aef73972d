use std::time::Duration;

use super::*;

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
        let beat = Heartbeat { cores: 2, memory_bytes: 24 << 30, running: 3, caches: vec![(root(1), 1000), (root(2), 50)] };
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
    assert_eq!(db.image_url(&root(1)).unwrap().as_deref(), Some("http://store/a.bcimg"));
    assert_eq!(db.image_url(&root(9)).unwrap(), None);

    // What a node caches is replaced by each heartbeat; holders most first.
    db.heartbeat(&name("b"), &Heartbeat { cores: 2, memory_bytes: 1, running: 0, caches: vec![(root(1), 4000)] }, 20_000).unwrap();
    assert_eq!(db.holders(&root(1)).unwrap(), vec![(name("b"), 4000), (name("a"), 1000)]);
    db.heartbeat(&name("a"), &Heartbeat { cores: 2, memory_bytes: 1, running: 0, caches: vec![] }, 21_000).unwrap();
    assert_eq!(db.holders(&root(1)).unwrap(), vec![(name("b"), 4000)]);
    assert!(db.holders(&root(2)).unwrap().is_empty());
}

#[test]
fn unknown_nodes_newer_schemas_and_damaged_rows_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("control.db");
    let db = Db::open(&path).unwrap();
    let beat = Heartbeat { cores: 1, memory_bytes: 1, running: 0, caches: vec![] };
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
