//! Sequences of what a control node is asked, from any bytes: deploys and
//! re-deploys of labs whose names join alike (`x.y`/`z` and `x`/`y.z`),
//! destroys, nodes joining, being removed and sending heartbeats that
//! report their own instances, others' and invented ones. After every step
//! the invariants hold: every instance a lab wants has a row and every row
//! a lab that wants it; no instance is ordered twice (on one node or two);
//! no two ordered things share a number, a runtime id, a MAC, a VNI or a
//! bridge; an instance is ordered only to the node it is placed on.

#![no_main]

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;
use std::time::Duration;

use bootcache_api::agent::{Heartbeat, Join, Observed, names};
use bootcache_api::{InstanceState, Lab, Name};
use bootcache_control::api::Control;
use bootcache_control::db::Db;
use libfuzzer_sys::fuzz_target;

const LABS: [&str; 3] = ["x", "x.y", "y"];
const DEFS: [&str; 4] = ["z", "y.z", "a", "a-1"];
const NODES: [&str; 3] = ["n1", "n2", "n3"];

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

fn n(s: &str) -> Name {
    s.parse().expect("a name")
}

/// A lab file from `bytes`: its name, definitions, counts, segments, pins.
fn lab_text(bytes: &mut impl Iterator<Item = u8>) -> String {
    let mut b = || bytes.next().unwrap_or(0);
    let lab = LABS[usize::from(b()) % LABS.len()];
    let segs = 1 + b() % 2;
    let mut text = format!("name: {lab}\nsegments:\n");
    for s in 0..segs {
        text += &format!("  s{s}:\n    subnet: 10.{s}.0.0/24\n");
    }
    text += "instances:\n";
    let defs = 1 + b() % 3;
    let mut used = HashSet::new();
    for _ in 0..defs {
        let def = DEFS[usize::from(b()) % DEFS.len()];
        if !used.insert(def) {
            continue;
        }
        let count = 1 + b() % 3;
        let memory = 1 + b() % 4;
        let pin = match b() % 4 {
            0 => format!("    node: {}\n", NODES[usize::from(b()) % NODES.len()]),
            _ => String::new(),
        };
        let on = if b() % 2 == 0 { "[s0]".to_owned() } else { format!("[{}]", (0..segs).map(|s| format!("s{s}")).collect::<Vec<_>>().join(", ")) };
        text += &format!(
            "  {def}:\n    kind: container\n    image: http://s/x.tar\n    count: {count}\n    memory: {memory}MiB\n    segments: {on}\n{pin}"
        );
    }
    text
}

fn check(c: &Control) {
    let db = c.db();
    let mut wanted = HashSet::new();
    for lab in db.lab_names().expect("labs") {
        let spec = db.lab(&lab).expect("lab").expect("there");
        for i in spec.instances() {
            wanted.insert((lab.clone(), i.name));
        }
    }
    let rows = db.all_instances().expect("rows");
    let recorded: HashSet<(Name, Name)> = rows.iter().map(|r| (r.spec.lab.clone(), r.spec.name.clone())).collect();
    assert_eq!(recorded, wanted, "every wanted instance has a row, and no row is an orphan");
    let placed: HashMap<u32, Option<Name>> = rows.iter().map(|r| (r.uid, r.node.clone())).collect();
    assert_eq!(placed.len(), rows.len(), "numbers unique");
    drop(db);
    let (mut uids, mut ids, mut macs) = (HashSet::new(), HashSet::new(), HashSet::new());
    let mut vnis: HashMap<u32, (Name, Name)> = HashMap::new();
    let mut bridges: HashMap<String, (Name, Name)> = HashMap::new();
    for node in NODES {
        let o = c.orders(&n(node)).expect("orders");
        for i in &o.instances {
            assert!(uids.insert(i.uid), "instance {} ordered twice", i.uid);
            assert_eq!(placed.get(&i.uid), Some(&Some(n(node))), "ordered only to its node");
            assert!(ids.insert(names::instance(i.uid, &i.lab, &i.name)));
            for nic in &i.nics {
                assert!(macs.insert(nic.mac), "MAC {} twice", nic.mac);
            }
        }
        for s in &o.segments {
            let owner = (s.lab.clone(), s.segment.clone());
            assert_eq!(vnis.entry(s.vni).or_insert_with(|| owner.clone()), &owner, "VNI of two segments");
            assert_eq!(bridges.entry(s.bridge.to_string()).or_insert_with(|| owner.clone()), &owner, "bridge of two segments");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // In memory where there is a tmpfs: a database per input.
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() { shm.to_owned() } else { std::env::temp_dir() };
    let dir = tempfile::Builder::new().prefix("bootcache-fuzz-").tempdir_in(base).expect("temp dir");
    let c = Control::new(Db::open(&dir.path().join("control.db")).expect("db"), Duration::from_secs(600));
    let mut bytes = data.iter().copied().take(512);
    let mut steps = 0;
    while let Some(op) = bytes.next() {
        steps += 1;
        if steps > 40 {
            break;
        }
        let node = NODES[usize::from(bytes.next().unwrap_or(0)) % NODES.len()];
        match op % 6 {
            0 | 1 => {
                let text = lab_text(&mut bytes);
                if let Ok(lab) = Lab::parse(&text) {
                    let _ = rt().block_on(c.deploy(text, lab));
                }
            }
            2 => {
                let lab = LABS[usize::from(bytes.next().unwrap_or(0)) % LABS.len()];
                let _ = c.destroy(&n(lab));
            }
            3 => {
                let join = Join { name: n(node), address: "10.0.0.2:7070".into(), cores: 4, memory_bytes: 1 << 30 };
                let _ = c.join(&join, "peer".into(), op % 12 == 3);
            }
            4 => {
                let _ = c.remove_node(&n(node));
            }
            _ => {
                // Its own instances in some state, and claims about others.
                let mut seen = Vec::new();
                if let Ok(o) = c.orders(&n(node)) {
                    for i in o.instances {
                        let state = InstanceState::ALL[usize::from(bytes.next().unwrap_or(0)) % InstanceState::ALL.len()];
                        seen.push(Observed { uid: i.uid, lab: i.lab, name: i.name, state, reason: Some("fuzz".into()) });
                    }
                }
                for _ in 0..bytes.next().unwrap_or(0) % 4 {
                    let uid = u32::from(bytes.next().unwrap_or(0));
                    let lab = LABS[usize::from(bytes.next().unwrap_or(0)) % LABS.len()];
                    let def = DEFS[usize::from(bytes.next().unwrap_or(0)) % DEFS.len()];
                    seen.push(Observed { uid, lab: n(lab), name: n(def), state: InstanceState::Ready, reason: None });
                }
                let beat = Heartbeat { cores: u32::from(bytes.next().unwrap_or(1)), memory_bytes: 1 << 30, running: 0, caches: vec![], files: vec![], instances: seen };
                let _ = c.heartbeat(&n(node), &beat);
            }
        }
        check(&c);
    }
});
