//! Bridges, VXLAN links and container veths made through netlink in a
//! network namespace of the test's own (needs root), checked by what the
//! kernel then holds and by packets that cross.

use std::net::Ipv4Addr;
use std::process::{Child, Command};

use bootcache_api::agent::{Dhcp, Mac};
use bootcache_network::dhcp::DhcpServers;
use bootcache_network::{Network, Veth};

/// Runs `f` on a thread in a new network namespace with a runtime of its own.
fn in_new_netns<F: std::future::Future<Output = ()>>(f: impl FnOnce() -> F + Send + 'static) {
    std::thread::spawn(move || {
        // SAFETY: only this thread's network namespace changes; no file
        // descriptor table or file system state that other threads rely on.
        unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) }.expect("unshare (run as root)");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(f());
    })
    .join()
    .expect("test thread");
}

/// A process in a network namespace of its own (a stand-in for a
/// container's init), killed on drop.
struct Sandbox(Child);

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox(Command::new("unshare").args(["--net", "sleep", "60"]).spawn().expect("unshare"))
    }
    fn pid(&self) -> u32 {
        self.0.id()
    }
    fn run(&self, args: &[&str]) -> std::process::Output {
        let pid = self.pid().to_string();
        Command::new("nsenter").args(["-t", &pid, "-n"]).args(args).output().unwrap()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn bridges_vxlan_links_and_container_veths() {
    in_new_netns(|| async {
        let net = Network::new().unwrap();
        let br = "bc-test0".parse().unwrap();
        const MARK: &str = "bootcache node-t segment 1 lab/lan";
        let i = net.ensure_bridge(&br, MARK).await.unwrap();
        assert_eq!(net.ensure_bridge(&br, MARK).await.unwrap(), i, "made once");
        assert!(net.is_up("bc-test0").await.unwrap());
        // VXLAN needs its local address on some link here.
        net.ensure_address("lo", Ipv4Addr::new(10, 9, 0, 1), 32).await.unwrap();
        let vx = "bx-test0".parse().unwrap();
        let remotes = [Ipv4Addr::new(10, 9, 0, 2), Ipv4Addr::new(10, 9, 0, 3)];
        net.ensure_vxlan(&vx, MARK, 4242, Ipv4Addr::new(10, 9, 0, 1), i, &remotes).await.unwrap();
        net.ensure_vxlan(&vx, MARK, 4242, Ipv4Addr::new(10, 9, 0, 1), i, &remotes).await.unwrap();
        let fdb = String::from_utf8(Command::new("bridge").args(["fdb", "show", "dev", "bx-test0"]).output().unwrap().stdout).unwrap();
        for r in remotes {
            assert_eq!(fdb.matches(&format!("00:00:00:00:00:00 dst {r}")).count(), 1, "{fdb}");
        }
        // Another set of remotes: the entries follow, on the same link (made
        // anew, it would drop the packets in flight and what it learned).
        let index = || {
            let out = Command::new("ip").args(["-o", "link", "show", "bx-test0"]).output().unwrap().stdout;
            String::from_utf8(out).unwrap().split(':').next().unwrap().to_owned()
        };
        let before = index();
        net.ensure_vxlan(&vx, MARK, 4242, Ipv4Addr::new(10, 9, 0, 1), i, &remotes[..1]).await.unwrap();
        let fdb = String::from_utf8(Command::new("bridge").args(["fdb", "show", "dev", "bx-test0"]).output().unwrap().stdout).unwrap();
        assert!(fdb.contains("dst 10.9.0.2") && !fdb.contains("dst 10.9.0.3"), "{fdb}");
        let third = [remotes[0], Ipv4Addr::new(10, 9, 0, 4)];
        net.ensure_vxlan(&vx, MARK, 4242, Ipv4Addr::new(10, 9, 0, 1), i, &third).await.unwrap();
        let fdb = String::from_utf8(Command::new("bridge").args(["fdb", "show", "dev", "bx-test0"]).output().unwrap().stdout).unwrap();
        assert!(fdb.contains("dst 10.9.0.2") && fdb.contains("dst 10.9.0.4") && !fdb.contains("dst 10.9.0.3"), "{fdb}");
        assert_eq!(index(), before, "the VXLAN link was made anew");
        let link = String::from_utf8(Command::new("ip").args(["-d", "link", "show", "bx-test0"]).output().unwrap().stdout).unwrap();
        assert!(link.contains("vxlan id 4242") && link.contains("master bc-test0"), "{link}");

        // Two stand-in containers on the bridge reach each other.
        let (a, b) = (Sandbox::new(), Sandbox::new());
        std::thread::sleep(std::time::Duration::from_millis(200));
        for (n, (s, addr)) in [(&a, Ipv4Addr::new(10, 20, 0, 1)), (&b, Ipv4Addr::new(10, 20, 0, 2))].into_iter().enumerate() {
            let veth = Veth {
                host: format!("bv-test{n}").parse().unwrap(),
                bridge: br.clone(),
                inside: "eth0".into(),
                mac: Mac([0x52, 0x54, 0, 0, 0, n as u8 + 1]),
                address: (addr, 24),
                // a's segment has b as its router.
                gateway: (n == 0).then_some(Ipv4Addr::new(10, 20, 0, 2)),
            };
            let routes = if n == 0 { vec![(Ipv4Addr::new(10, 70, 0, 0), 16, Ipv4Addr::new(10, 20, 0, 2))] } else { vec![] };
            net.attach_container(s.pid(), &format!("bootcache node-t instance {n} lab/c{n}"), &[(veth, MARK.to_owned())], &routes)
                .await
                .unwrap();
        }
        let shown = String::from_utf8(a.run(&["ip", "addr", "show", "eth0"]).stdout).unwrap();
        assert!(shown.contains("10.20.0.1/24") && shown.contains("52:54:00:00:00:01") && shown.contains("UP"), "{shown}");
        let routes = String::from_utf8(a.run(&["ip", "route"]).stdout).unwrap();
        assert!(routes.contains("default via 10.20.0.2 dev eth0"), "{routes}");
        assert!(routes.contains("10.70.0.0/16 via 10.20.0.2 dev eth0"), "{routes}");
        let ping = a.run(&["ping", "-c", "1", "-W", "5", "10.20.0.2"]);
        assert!(ping.status.success(), "{}", String::from_utf8_lossy(&ping.stdout));

        // Everything made carries its mark, and goes only by it.
        let made: Vec<_> =
            net.links().await.unwrap().into_iter().filter(|l| l.alias.as_deref().is_some_and(|a| a.starts_with("bootcache "))).collect();
        let mut names: Vec<&str> = made.iter().map(|m| m.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["bc-test0", "bv-test0", "bv-test1", "bx-test0"]);
        assert!(made.iter().any(|m| m.name == "bv-test1" && m.alias.as_deref() == Some("bootcache node-t instance 1 lab/c1")));
        assert!(net.remove("bv-test1", MARK).await.unwrap_err().is_not_ours(), "another mark: not removed");
        for m in &made {
            assert!(net.remove(&m.name, m.alias.as_deref().unwrap()).await.unwrap());
        }
        assert!(!net.remove("bc-test0", MARK).await.unwrap(), "gone already");
        assert!(net.links().await.unwrap().iter().all(|l| l.alias.is_none()));
    });
}

/// A link of the name asked for that someone else made is never adopted,
/// enslaved, addressed or deleted.
#[test]
fn a_foreign_link_of_the_same_name_is_left_alone() {
    in_new_netns(|| async {
        let net = Network::new().unwrap();
        let ok = Command::new("ip").args(["link", "add", "eth9", "type", "bridge"]).status().unwrap();
        assert!(ok.success());
        let before = String::from_utf8(Command::new("ip").args(["-d", "link", "show", "eth9"]).output().unwrap().stdout).unwrap();
        let name = "eth9".parse().unwrap();
        let e = net.ensure_bridge(&name, "bootcache node-t segment 2 lab/lan").await.unwrap_err();
        assert!(e.is_not_ours(), "{e}");
        assert!(e.to_string().contains("making bridge eth9"), "{e}");
        assert!(net.remove("eth9", "bootcache node-t segment 2 lab/lan").await.unwrap_err().is_not_ours());
        assert!(net.ensure_vxlan(&name, "x", 1, Ipv4Addr::LOCALHOST, 1, &[]).await.unwrap_err().is_not_ours());
        let after = String::from_utf8(Command::new("ip").args(["-d", "link", "show", "eth9"]).output().unwrap().stdout).unwrap();
        assert_eq!(before, after, "untouched");
    });
}

/// A segment's DHCP server answers from a namespace of its own: a stand-in
/// VM on the bridge gets its address, and the node's namespace gains no
/// address and no route of the lab's subnet (here the node's own network).
#[test]
fn a_dhcp_server_lives_in_its_own_namespace() {
    in_new_netns(|| async {
        let net = Network::new().unwrap();
        // The node's own network is 10.77.0.0/24; the lab uses it too.
        net.ensure_address("lo", Ipv4Addr::new(10, 77, 0, 1), 24).await.unwrap();
        let routes_before = String::from_utf8(Command::new("ip").args(["route", "show", "table", "all"]).output().unwrap().stdout).unwrap();
        const MARK: &str = "bootcache node-t segment 5 lab/lan";
        let br = "bc00000005".parse().unwrap();
        net.ensure_bridge(&br, MARK).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let servers = DhcpServers::new(dir.path()).unwrap();
        let mac = Mac([0x0a, 0, 0, 0, 7, 0]);
        let dhcp = Dhcp {
            server: Ipv4Addr::new(10, 77, 0, 254),
            prefix: 24,
            hosts: vec![(mac, Ipv4Addr::new(10, 77, 0, 9))],
            gateway: Some(Ipv4Addr::new(10, 77, 0, 1)),
        };
        servers.ensure(&net, 5, &br, MARK, MARK, &dhcp).await.unwrap();
        servers.ensure(&net, 5, &br, MARK, MARK, &dhcp).await.unwrap();
        assert_eq!(servers.running(), vec![5]);
        let link = net.link("bd00000005").await.unwrap().expect("its veth on the bridge");
        assert_eq!(link.alias.as_deref(), Some(MARK));
        let vm = Sandbox::new();
        std::thread::sleep(std::time::Duration::from_millis(200));
        let veth = Veth {
            host: "bv-test7".parse().unwrap(),
            bridge: br.clone(),
            inside: "eth0".into(),
            mac,
            address: (Ipv4Addr::new(192, 0, 2, 1), 32),
            gateway: None,
        };
        net.attach_container(vm.pid(), "bootcache node-t instance 7 lab/vm", &[(veth, MARK.to_owned())], &[]).await.unwrap();
        // The lease, and the segment's router in it (udhcpc hands it to its script as $router).
        let scripts = tempfile::tempdir().unwrap();
        let script = scripts.path().join("lease.sh");
        std::fs::write(&script, "#!/bin/sh\n[ \"$1\" = bound ] && echo \"router=$router ip=$ip\"\nexit 0\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let got = vm.run(&["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "5", "-s", script.to_str().unwrap()]);
        let said = String::from_utf8_lossy(&got.stderr).into_owned() + &String::from_utf8_lossy(&got.stdout);
        assert!(said.contains("router=10.77.0.1 ip=10.77.0.9"), "no lease with its router: {said}");
        let addrs = String::from_utf8(Command::new("ip").args(["-4", "addr"]).output().unwrap().stdout).unwrap();
        assert!(!addrs.contains("10.77.0.254"), "the server's address is not the node's: {addrs}");
        let routes = String::from_utf8(Command::new("ip").args(["route", "show", "table", "all"]).output().unwrap().stdout).unwrap();
        assert_eq!(routes, routes_before, "no route added to the node");
        servers.stop(&net, 5, MARK).await;
        assert!(servers.running().is_empty());
        for _ in 0..50 {
            if net.link("bd00000005").await.unwrap().is_none() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(net.link("bd00000005").await.unwrap().is_none(), "its veth went with its namespace");
        assert!(std::fs::read_dir(dir.path()).unwrap().next().is_none(), "its files went too");
    });
}
