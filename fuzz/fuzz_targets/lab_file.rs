//! Any bytes as a lab file: refused with a message, or a lab whose every
//! promise holds (bounded instance count, unique names, every address a
//! host of its segment's subnet below the nodes' own, the same lab back
//! from JSON); the files its `from:` names, each a path below the lab
//! file's folder, and with them sent (empty), a lab too. Never a panic,
//! never an unbounded allocation.

#![no_main]

use std::collections::HashSet;

use bootcache_api::Lab;
use bootcache_api::lab::{Attached, MAX_INSTANCES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let attached: Attached = match Lab::attachments(text) {
        Ok(names) => names
            .into_iter()
            .map(|(n, _)| {
                assert!(!n.starts_with('/') && !n.split('/').any(|c| c.is_empty() || c == ".."), "{n}");
                (n, String::new())
            })
            .collect(),
        Err(e) => {
            assert!(!e.message.is_empty());
            Attached::new()
        }
    };
    match Lab::parse_with(text, &attached) {
        Err(e) => assert!(!e.message.is_empty()),
        Ok(lab) => {
            let all = lab.instances();
            assert!(all.len() as u64 <= MAX_INSTANCES);
            let names: HashSet<_> = all.iter().map(|i| i.name.clone()).collect();
            assert_eq!(names.len(), all.len(), "instance names are unique");
            let mut taken = HashSet::new();
            for i in &all {
                for (seg, addr) in &i.addresses {
                    let s = lab.segment(seg).expect("a known segment");
                    assert!(s.subnet.holds(*addr), "{addr} in {}", s.subnet);
                    assert!(taken.insert((seg.clone(), *addr)), "{addr} given twice on {seg}");
                }
            }
            let json = serde_json::to_string(&lab).expect("JSON");
            assert_eq!(serde_json::from_str::<Lab>(&json).expect("back"), lab);
        }
    }
});
