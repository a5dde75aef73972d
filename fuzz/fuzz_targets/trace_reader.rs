//! Any bytes given to the trace reader: an error or a trace the algebra accepts.
#![no_main]

use bootcache_trace::{AccessOrder, Trace, analyze};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(trace) = Trace::parse(data) else { return };
    let a = analyze(&trace);
    let order = AccessOrder::from_timed(trace.records.iter().filter_map(|r| Some((r.boot_bytes()?, r.t_ns))));
    assert_eq!(order.set().bytes(), a.unique_bytes);
    let again = trace.write_to(std::io::Cursor::new(Vec::new())).expect("in-memory write").into_inner();
    assert_eq!(Trace::parse(&again).expect("round trip"), trace);
});
