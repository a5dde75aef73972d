use std::collections::HashSet;

use super::*;

const GOOD: &str = "\
name: demo
segments:
  lan:
    subnet: 10.20.0.0/24
  back:
    subnet: 10.30.0.0/24
    bridge: bc-back
instances:
  web:
    kind: vm
    image: http://10.0.0.1:8080/reference.bcimg
    count: 2
    memory: 256MiB
    segments:
      lan: 10.20.0.10
    ready: BOOTCACHE-BOOTED
    node: node-1
  user:
    kind: container
    image: http://10.0.0.1:8080/busybox.tar
    count: 3
    segments: [lan, back]
    command: [/bin/sh, -c, echo up]
";

#[test]
fn a_lab_file_expands_into_instances_with_addresses() {
    let lab = Lab::parse(GOOD).unwrap();
    assert_eq!(lab.name.as_str(), "demo");
    assert_eq!(lab.segments.len(), 2);
    assert_eq!(lab.segments[1].bridge.as_ref().unwrap().as_str(), "bc-back");
    let web = &lab.instances[0];
    assert_eq!((web.kind, web.count, web.memory_bytes, web.cpus), (Kind::Vm, 2, 256 << 20, 1));
    assert_eq!(web.node.as_ref().unwrap().as_str(), "node-1");
    let all = lab.instances();
    let names: Vec<&str> = all.iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["web-1", "web-2", "user-1", "user-2", "user-3"]);
    assert_eq!(all[1].addresses, vec![("lan".parse().unwrap(), Ipv4Addr::new(10, 20, 0, 11))]);
    // Unaddressed replicas get the lowest free block: .1 .. .3 on lan
    // (.10 and .11 are web's), .1 .. .3 on back.
    assert_eq!(all[2].addresses[0].1, Ipv4Addr::new(10, 20, 0, 1));
    assert_eq!(all[4].addresses[0].1, Ipv4Addr::new(10, 20, 0, 3));
    assert_eq!(all[4].addresses[1].1, Ipv4Addr::new(10, 30, 0, 3));
    assert_eq!(lab.instances[1].memory_bytes, 64 << 20, "container default");
}

#[test]
fn replicas_skip_taken_addresses_when_given_none() {
    let text = GOOD.replace("lan: 10.20.0.10", "lan: 10.20.0.2");
    let all = Lab::parse(&text).unwrap().instances();
    // web takes .2 and .3, so user's three need a block from .4.
    assert_eq!(all[2].addresses[0].1, Ipv4Addr::new(10, 20, 0, 4));
}

fn error_of(text: &str) -> LabError {
    Lab::parse(text).expect_err("must be refused")
}

#[test]
fn bad_lab_files_name_the_line() {
    let cases: &[(&str, &str, u32, &str)] = &[
        ("kind: vm\n    image: http://10.0.0.1:8080/reference", "kind: vmm\n    image: http://10.0.0.1:8080/reference", 10, "unknown kind"),
        ("    image: http://10.0.0.1:8080/busybox.tar\n", "", 18, "has no image"),
        ("  user:\n", "  web:\n", 18, "given twice: web"),
        ("count: 3", "count: 1000000000", 21, "count must be 1 to 10000"),
        ("  user:\n", "  us/er:\n", 18, "instance name: \"us/er\" is not a valid name"),
        ("bridge: bc-back", "bridge: bc-this-is-too-long", 7, "interface name"),
        ("  lan:\n    subnet: 10.20.0.0/24\n", "  lan:\n    bridge: bc-lan\n", 3, "has no subnet"),
        ("subnet: 10.30.0.0/24", "subnet: 10.30.0.1/24", 6, "host bits"),
        ("lan: 10.20.0.10", "lan: 10.21.0.10", 15, "do not fit in 10.20.0.0/24"),
        ("lan: 10.20.0.10", "lan: 10.20.0.250", 15, "the nodes'"),
        ("segments: [lan, back]", "segments: [lan, wan]", 22, "no segment wan"),
        ("image: http://10.0.0.1:8080/busybox.tar", "image: file:///etc/passwd", 20, "not an http:// URL"),
        ("memory: 256MiB", "memory: lots", 13, "not a size"),
        ("    ready: BOOTCACHE-BOOTED\n", "    ready: BOOTCACHE-BOOTED\n    command: [x]\n", 9, "command is for containers"),
        ("    node: node-1\n", "    node: node-1\n    colour: blue\n", 18, "colour"),
        ("name: demo", "name: Demo", 1, "lab name"),
        ("    node: node-1\n", "    node: node-1\n    delivery: eager\n", 18, "unknown delivery \"eager\" (lazy or full)"),
        ("    command: [/bin/sh, -c, echo up]\n", "    command: [/bin/sh, -c, echo up]\n    delivery: full\n", 24, "delivery is for VMs"),
    ];
    for (from, to, line, what) in cases {
        assert!(GOOD.contains(from), "{from}");
        let text = GOOD.replacen(from, to, 1);
        let e = error_of(&text);
        assert!(e.message.contains(what), "{to:?}: {e}");
        assert_eq!(e.line, Some(*line), "{to:?}: {e}");
        assert!(e.to_string().starts_with(&format!("line {line}: ")), "{e}");
    }
}

#[test]
fn duplicate_names_across_replicas_are_refused() {
    let text = GOOD.replace("  user:\n", "  web-2:\n").replace("count: 3", "count: 1");
    let e = error_of(&text);
    assert!(e.message.contains("web-2 is used twice"), "{e}");
    let two = GOOD.replace("lan: 10.20.0.10", "lan: 10.20.0.1").replace("segments: [lan, back]", "segments: {lan: 10.20.0.2}");
    let e = error_of(&two);
    assert!(e.message.contains("10.20.0.2 on segment lan is also given on line 15"), "{e}");
}

#[test]
fn totals_and_sizes_are_bounded() {
    let many = GOOD.replace("count: 3", "count: 9999");
    assert!(error_of(&many).message.contains("more than 10000 instances"));
    let huge = "x".repeat(MAX_FILE_BYTES + 1);
    assert!(error_of(&huge).message.contains("larger than"));
    // Alias expansion does not blow up (a billion laughs).
    let mut laughs = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        laughs += &format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n", p = i - 1);
    }
    laughs += "name: x\ninstances: *a11\n";
    assert!(Lab::parse(&laughs).is_err());
    for junk in ["", "- a\n- b\n", "name: [", "\u{0}", "name: x\ninstances: {}\n"] {
        assert!(Lab::parse(junk).is_err(), "{junk:?}");
    }
}

#[test]
fn subnets_and_node_addresses() {
    let s: Subnet = "10.1.0.0/24".parse().unwrap();
    assert!(s.holds(Ipv4Addr::new(10, 1, 0, 1)) && !s.holds(Ipv4Addr::new(10, 1, 0, 255)) && !s.holds(Ipv4Addr::new(10, 1, 0, 0)));
    assert_eq!(s.node_address(0), Some(Ipv4Addr::new(10, 1, 0, 254)));
    assert_eq!(s.node_address(15), Some(Ipv4Addr::new(10, 1, 0, 239)));
    assert_eq!(s.node_address(16), None);
    assert_eq!(s.instance_hosts(), 254 - 16);
    for bad in ["10.1.0.0", "10.1.0.0/31", "10.1.0.0/7", "x/24", "10.1.0.0/24/1"] {
        assert!(bad.parse::<Subnet>().is_err(), "{bad}");
    }
    assert_eq!(serde_json::to_string(&s).unwrap(), "\"10.1.0.0/24\"");
}

#[test]
fn a_checked_lab_goes_through_json_unchanged() {
    let lab = Lab::parse(GOOD).unwrap();
    let back: Lab = serde_json::from_str(&serde_json::to_string(&lab).unwrap()).unwrap();
    assert_eq!(back, lab);
}

#[test]
fn the_example_lab_is_valid() {
    let text = include_str!("../../../../examples/lab.yaml");
    let names = Lab::attachments(text).unwrap();
    assert_eq!(names.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["files/motd"]);
    let motd = include_str!("../../../../examples/files/motd");
    let lab = Lab::parse_with(text, &[("files/motd".to_owned(), motd.to_owned())].into()).unwrap();
    assert_eq!(lab.instances().len(), 8);
    assert_eq!(lab.instances[1].files.get("/etc/motd").map(String::as_str), Some(motd));
    assert!(lab.instances[0].cloud_init.is_some());
}

#[test]
fn the_hybrid_benchmark_labs_are_valid_at_100_instances() {
    for (text, vms, full) in [
        (include_str!("../../../../examples/hybrid/traditional.yaml"), 100, true),
        (include_str!("../../../../examples/hybrid/bootcache.yaml"), 100, false),
        (include_str!("../../../../examples/hybrid/containers.yaml"), 0, false),
        (include_str!("../../../../examples/hybrid/hybrid.yaml"), 20, false),
    ] {
        let lab = Lab::parse(text).unwrap();
        assert_eq!(lab.instances().len(), 100, "{}", lab.name);
        let vm_defs: Vec<&InstanceDef> = lab.instances.iter().filter(|d| d.kind == Kind::Vm).collect();
        assert_eq!(vm_defs.iter().map(|d| d.count).sum::<u32>(), vms, "{}", lab.name);
        assert!(vm_defs.iter().all(|d| (d.delivery == Delivery::Full) == full), "{}", lab.name);
    }
    // Lazy unless written otherwise, also in labs stored before the field.
    let old = serde_json::to_value(Lab::parse(GOOD).unwrap()).unwrap();
    let mut without = old.clone();
    without["instances"][0].as_object_mut().unwrap().remove("delivery");
    let back: Lab = serde_json::from_value(without).unwrap();
    assert_eq!(back.instances[0].delivery, Delivery::Lazy);
}

#[test]
fn special_purpose_subnets_are_refused() {
    for bad in [
        "127.0.0.0/8",
        "127.1.0.0/16",
        "169.254.0.0/16",
        "169.254.3.0/24",
        "0.0.0.0/8",
        "0.1.0.0/16",
        "224.0.0.0/8",
        "239.1.1.0/24",
        "240.0.0.0/8",
        "255.255.255.0/24",
    ] {
        let e = bad.parse::<Subnet>().expect_err(bad);
        assert!(e.contains("overlaps") && e.contains("ordinary unicast"), "{bad}: {e}");
    }
    for good in ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "126.0.0.0/8", "169.253.0.0/16", "223.255.255.0/24"] {
        assert!(good.parse::<Subnet>().is_ok(), "{good}");
    }
    let e = error_of(&GOOD.replace("subnet: 10.30.0.0/24", "subnet: 127.0.0.0/24"));
    assert_eq!(e.line, Some(6), "{e}");
    assert!(e.message.contains("loopback"), "{e}");
}

#[test]
fn memory_is_refused_only_beyond_the_limits_it_states() {
    let at = |m: &str| Lab::parse(&GOOD.replace("memory: 256MiB", &format!("memory: {m}")));
    assert_eq!(at("1TiB").unwrap().instances[0].memory_bytes, 1 << 40);
    assert_eq!(at("1T").unwrap().instances[0].memory_bytes, 1 << 40);
    assert_eq!(at("1MiB").unwrap().instances[0].memory_bytes, 1 << 20);
    for over in ["2TiB", "1025GiB", "1023KiB", "0"] {
        let e = at(over).expect_err(over);
        assert!(e.message.contains("from 1MiB to 1TiB"), "{over}: {e}");
    }
}

#[test]
fn image_urls_carry_no_credentials() {
    for (url, what) in [
        ("http://u:p@10.0.0.1/x.tar", "credentials"),
        ("http://10.0.0.1/x.tar?token=s3cret", "query string"),
        ("http://10.0.0.1/x.tar#frag", "query string or fragment"),
    ] {
        let e = error_of(&GOOD.replace("http://10.0.0.1:8080/busybox.tar", url));
        assert!(e.message.contains(what), "{url}: {e}");
        assert!(!e.message.contains("s3cret"), "{e}");
    }
}

#[test]
fn a_lab_bridge_may_not_look_like_a_derived_name() {
    for name in ["bc00000001", "bx0a", "bdffffffff", "bv0000000100"] {
        let e = error_of(&GOOD.replace("bridge: bc-back", &format!("bridge: {name}")));
        assert!(e.message.contains("shape of the names bootcache gives"), "{name}: {e}");
        assert_eq!(e.line, Some(7));
    }
    for ok in ["bc-back", "br0", "bcx", "lab0"] {
        assert!(Lab::parse(&GOOD.replace("bridge: bc-back", &format!("bridge: {ok}"))).is_ok(), "{ok}");
    }
}

/// Giving addresses is linear in what the lab holds: a /8 segment with
/// 2,000 explicit addresses spread over it and 2,000 definitions without
/// any (each of a different size) was quadratic before (each block searched
/// from the start of the subnet, address by address): minutes, against
/// well under a second now. The bound is generous (the point is the
/// growth, not a timing).
#[test]
fn addresses_are_given_in_linear_time() {
    let mut text = String::from("name: big\nsegments:\n  lan:\n    subnet: 10.0.0.0/8\ninstances:\n");
    for i in 0..2000u32 {
        // Explicit ones every 4,096 addresses: the gaps between fit small blocks only.
        let a = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 0, 0, 1)) + i * 4096);
        text += &format!("  e{i}:\n    kind: container\n    image: http://s/x.tar\n    segments: {{lan: {a}}}\n");
    }
    for i in 0..2000u32 {
        let count = 1 + i % 4;
        text += &format!("  u{i}:\n    kind: container\n    image: http://s/x.tar\n    count: {count}\n    segments: [lan]\n");
    }
    let started = std::time::Instant::now();
    let lab = Lab::parse(&text).unwrap();
    let took = started.elapsed();
    let all = lab.instances();
    let mut seen = HashSet::new();
    for i in &all {
        assert!(seen.insert(i.addresses[0].1), "{} given twice", i.addresses[0].1);
    }
    assert!(took < std::time::Duration::from_secs(20), "took {took:?}");
}

#[test]
fn cloud_init_and_gateways_are_checked_where_they_are_written() {
    let with = GOOD.replace(
        "    ready: BOOTCACHE-BOOTED\n",
        "    ready: BOOTCACHE-BOOTED\n    cloud-init:\n      users:\n        - name: alice\n          ssh_authorized_keys: [ssh-ed25519 AAAA alice]\n      write_files:\n        - {path: /etc/motd, content: hello}\n",
    );
    let lab = Lab::parse(&with).unwrap();
    let ci = lab.instances[0].cloud_init.as_ref().unwrap();
    assert_eq!(ci["users"][0]["name"], "alice");
    assert_eq!(ci["write_files"][0]["path"], "/etc/motd");
    let gw = GOOD.replace("    subnet: 10.20.0.0/24\n", "    subnet: 10.20.0.0/24\n    gateway: 10.20.0.1\n");
    assert_eq!(Lab::parse(&gw).unwrap().segments[0].gateway, Some(Ipv4Addr::new(10, 20, 0, 1)));
    let cases: &[(&str, &str, u32, &str)] = &[
        ("    ready: BOOTCACHE-BOOTED\n", "    ready: BOOTCACHE-BOOTED\n    cloud-init: [a, b]\n", 17, "user-data as a map"),
        ("    ready: BOOTCACHE-BOOTED\n", "    ready: BOOTCACHE-BOOTED\n    cloud-init: just text\n", 17, "user-data as a map"),
        (
            "    command: [/bin/sh, -c, echo up]\n",
            "    command: [/bin/sh, -c, echo up]\n    cloud-init: {users: []}\n",
            24,
            "cloud-init is for VMs",
        ),
        ("    subnet: 10.20.0.0/24\n", "    subnet: 10.20.0.0/24\n    gateway: 10.21.0.1\n", 5, "not a host of 10.20.0.0/24"),
        ("    subnet: 10.20.0.0/24\n", "    subnet: 10.20.0.0/24\n    gateway: 10.20.0.254\n", 5, "below the nodes'"),
        ("    subnet: 10.20.0.0/24\n", "    subnet: 10.20.0.0/24\n    gateway: router\n", 5, "not an IPv4 address"),
    ];
    for (from, to, line, what) in cases {
        let e = error_of(&GOOD.replacen(from, to, 1));
        assert!(e.message.contains(what), "{to:?}: {e}");
        assert_eq!(e.line, Some(*line), "{to:?}: {e}");
    }
    let huge = GOOD.replace(
        "    ready: BOOTCACHE-BOOTED\n",
        &format!("    ready: BOOTCACHE-BOOTED\n    cloud-init:\n      runcmd: [\"{}\"]\n", "x".repeat(70_000)),
    );
    assert!(error_of(&huge).message.contains("more than 65536"));
}

#[test]
fn containers_take_env_files_exec_sysctls_and_a_ready_command() {
    let with = GOOD.replace(
        "    command: [/bin/sh, -c, echo up]\n",
        "    command: [/bin/sh, -c, echo up]\n    env: {ROLE: user, PORT: 8080, DEBUG: true}\n    files:\n      /etc/motd: hello\n      /srv/app/conf.ini: \"a=1\\n\"\n    exec: [[touch, /ok], [sh, -c, echo done]]\n    hostname: user-box\n    sysctls: {net.ipv4.ip_forward: 1}\n",
    );
    let lab = Lab::parse(&with).unwrap();
    let user = &lab.instances[1];
    assert_eq!(user.env.get("PORT").map(String::as_str), Some("8080"));
    assert_eq!(user.env.get("DEBUG").map(String::as_str), Some("true"));
    assert_eq!(user.files.get("/srv/app/conf.ini").map(String::as_str), Some("a=1\n"));
    assert_eq!(user.exec.len(), 2);
    assert_eq!(user.hostname.as_ref().map(Name::as_str), Some("user-box"));
    assert_eq!(user.sysctls.get("net.ipv4.ip_forward").map(String::as_str), Some("1"));
    let ready =
        GOOD.replace("    command: [/bin/sh, -c, echo up]\n", "    command: [/bin/sh, -c, echo up]\n    ready-command: [test, -f, /ok]\n");
    assert_eq!(Lab::parse(&ready).unwrap().instances[1].ready_command.as_deref().map(<[String]>::len), Some(3));
    let c = "    command: [/bin/sh, -c, echo up]\n";
    let cases: &[(&str, &str, u32, &str)] = &[
        (c, "    command: [/bin/sh, -c, echo up]\n    env: {9X: a}\n", 24, "not an environment variable's name"),
        (c, "    command: [/bin/sh, -c, echo up]\n    env: {A-B: a}\n", 24, "not an environment variable's name"),
        (c, "    command: [/bin/sh, -c, echo up]\n    files: {etc/motd: a}\n", 24, "an absolute path"),
        (c, "    command: [/bin/sh, -c, echo up]\n    files: {/etc/../shadow: a}\n", 24, "without empty, . or .. components"),
        (c, "    command: [/bin/sh, -c, echo up]\n    exec: [[]]\n", 24, "exec is at most 16 commands"),
        (c, "    command: [/bin/sh, -c, echo up]\n    sysctls: {\"kernel; rm\": 1}\n", 24, "is not a sysctl"),
        (c, "    command: [/bin/sh, -c, echo up]\n    hostname: Bad_Host\n", 24, "hostname"),
        ("    ready: BOOTCACHE-BOOTED\n", "    ready: BOOTCACHE-BOOTED\n    env: {A: b}\n", 17, "env is for containers"),
    ];
    for (from, to, line, what) in cases {
        let e = error_of(&GOOD.replacen(from, to, 1));
        assert!(e.message.contains(what), "{to:?}: {e}");
        assert_eq!(e.line, Some(*line), "{to:?}: {e}");
    }
    let big =
        GOOD.replace(c, &format!("    command: [/bin/sh, -c, echo up]\n    files: {{/big: \"{}\"}}\n", "x".repeat(MAX_FILE_CONTENT + 1)));
    assert!(error_of(&big).message.contains("more than 262144 bytes"));
}

/// A file's content from a file beside the lab file: listed for the
/// command line to send, taken from what was sent, refused naming its line
/// when not sent, outside the lab's folder, too big; a file sent that
/// nothing names is refused too.
#[test]
fn files_may_come_from_beside_the_lab_file() {
    let c = "    command: [/bin/sh, -c, echo up]\n";
    let with = GOOD.replace(
        c,
        "    command: [/bin/sh, -c, echo up]\n    files:\n      /etc/app.conf: {from: conf/app.conf}\n      /etc/motd: {from: motd}\n      /etc/again: {from: motd}\n",
    );
    assert_eq!(
        Lab::attachments(&with).unwrap(),
        vec![("conf/app.conf".to_owned(), Some(25)), ("motd".to_owned(), Some(26))],
        "each once, with its line"
    );
    assert!(Lab::attachments(GOOD).unwrap().is_empty());
    let sent: Attached = [("conf/app.conf".to_owned(), "a=1\n".to_owned()), ("motd".to_owned(), "hi\n".to_owned())].into();
    let lab = Lab::parse_with(&with, &sent).unwrap();
    assert_eq!(lab.instances[1].files.get("/etc/app.conf").map(String::as_str), Some("a=1\n"));
    assert_eq!(lab.instances[1].files.get("/etc/again").map(String::as_str), Some("hi\n"));
    // What was sent is what counts: a lab read again with its files is the same lab.
    let source = LabSource { text: with.clone(), files: sent.clone() };
    assert_eq!(source.parse().unwrap(), lab);
    // Not sent.
    let e = Lab::parse(&with).unwrap_err();
    assert_eq!(e.line, Some(25), "{e}");
    assert!(e.message.contains("\"conf/app.conf\", which was not sent with the lab"), "{e}");
    // Sent and named by nothing.
    let mut extra = sent.clone();
    extra.insert("stray".into(), String::new());
    assert!(Lab::parse_with(&with, &extra).unwrap_err().message.contains("\"stray\" was sent with the lab, but no from: names it"));
    // Too big.
    let mut big = sent.clone();
    big.insert("motd".into(), "x".repeat(MAX_FILE_CONTENT + 1));
    assert!(Lab::parse_with(&with, &big).unwrap_err().message.contains("more than 262144 bytes"));
    // Outside the lab file's folder, or not a name.
    for (from, what) in [
        ("/etc/shadow", "a relative path below the lab file's folder"),
        ("../secret", "without empty, . or .. components"),
        ("a//b", "without empty, . or .. components"),
    ] {
        let text = GOOD.replace(c, &format!("    command: [/bin/sh, -c, echo up]\n    files: {{/x: {{from: \"{from}\"}}}}\n"));
        for e in [Lab::attachments(&text).unwrap_err(), Lab::parse(&text).unwrap_err()] {
            assert!(e.message.contains(what), "{from}: {e}");
            assert_eq!(e.line, Some(24), "{from}: {e}");
        }
    }
    let odd = GOOD.replace(c, "    command: [/bin/sh, -c, echo up]\n    files: {/x: {path: motd}}\n");
    assert!(error_of(&odd).message.contains("a file is its content, or {from: NAME}"), "{}", error_of(&odd));
}

#[test]
fn a_vm_boots_with_bios_or_uefi_and_uefi_has_room() {
    let uefi = GOOD.replace("    memory: 256MiB\n", "    memory: 256MiB\n    firmware: uefi\n");
    assert_eq!(Lab::parse(&uefi).unwrap().instances[0].firmware, Firmware::Uefi);
    assert_eq!(Lab::parse(GOOD).unwrap().instances[0].firmware, Firmware::Bios);
    for (to, what) in [
        ("    memory: 256MiB\n    firmware: coreboot\n", "unknown firmware \"coreboot\" (bios or uefi)"),
        ("    memory: 128MiB\n    firmware: uefi\n", "needs at least 256MiB"),
    ] {
        let e = error_of(&GOOD.replace("    memory: 256MiB\n", to));
        assert!(e.message.contains(what), "{to:?}: {e}");
    }
    let e = error_of(&GOOD.replace("    command: [/bin/sh, -c, echo up]\n", "    command: [/bin/sh, -c, echo up]\n    firmware: uefi\n"));
    assert!(e.message.contains("firmware is for VMs"), "{e}");
}

#[test]
fn defaults_fill_what_an_instance_leaves_and_routes_go_through_its_segments() {
    let with = GOOD.replace("instances:\n", "defaults:\n  cpus: 2\n  node: node-9\ninstances:\n");
    let lab = Lab::parse(&with).unwrap();
    assert_eq!((lab.instances[0].cpus, lab.instances[0].node.as_ref().map(Name::as_str)), (2, Some("node-1")), "its own node wins");
    assert_eq!((lab.instances[1].cpus, lab.instances[1].node.as_ref().map(Name::as_str)), (2, Some("node-9")));
    // A default that does not fit an instance is refused at the default's line.
    let bad = GOOD.replace("instances:\n", "defaults:\n  firmware: uefi\ninstances:\n");
    let e = error_of(&bad);
    assert!(e.message.contains("firmware is for VMs") && e.line == Some(9), "{e}");
    let routed = GOOD.replace(
        "    command: [/bin/sh, -c, echo up]\n",
        "    command: [/bin/sh, -c, echo up]\n    routes: [{to: 10.70.0.0/16, via: 10.20.0.1}, {to: 0.0.0.0/0, via: 10.30.0.1}]\n",
    );
    let r = &Lab::parse(&routed).unwrap().instances[1].routes;
    assert_eq!(r.len(), 2);
    assert_eq!((r[0].0.to_string(), r[0].1), ("10.70.0.0/16".to_owned(), Ipv4Addr::new(10, 20, 0, 1)));
    for (route, what) in [
        ("{to: 10.70.0.0/16, via: 10.99.0.1}", "on none of its segments"),
        ("{to: 10.70.0.1/16, via: 10.20.0.1}", "host bits"),
        ("{to: 127.0.0.0/8, via: 10.20.0.1}", "loopback"),
        ("{to: 10.70.0.0/33, via: 10.20.0.1}", "len from 0 to 32"),
        ("{to: 10.70.0.0/16}", "via"),
    ] {
        let e = error_of(
            &GOOD
                .replace("    command: [/bin/sh, -c, echo up]\n", &format!("    command: [/bin/sh, -c, echo up]\n    routes: [{route}]\n")),
        );
        assert!(e.message.contains(what), "{route}: {e}");
    }
}
