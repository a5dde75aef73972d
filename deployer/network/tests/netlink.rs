//! Bridges, VXLAN links and container veths made through netlink in a
//! network namespace of the test's own (needs root), checked by what the
//! kernel then holds and by packets that cross.

use std::net::Ipv4Addr;
use std::process::{Child, Command};

use bootcache_api::agent::Mac;
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
        let i = net.ensure_bridge(&br, "lab/lan").await.unwrap();
        assert_eq!(net.ensure_bridge(&br, "lab/lan").await.unwrap(), i, "made once");
        assert!(net.is_up("bc-test0").await.unwrap());
        // VXLAN needs its local address on some link here.
        net.ensure_address("lo", Ipv4Addr::new(10, 9, 0, 1), 32).await.unwrap();
        let vx = "bx-test0".parse().unwrap();
        let remotes = [Ipv4Addr::new(10, 9, 0, 2), Ipv4Addr::new(10, 9, 0, 3)];
        net.ensure_vxlan(&vx, "lab/lan", 4242, Ipv4Addr::new(10, 9, 0, 1), i, &remotes).await.unwrap();
        net.ensure_vxlan(&vx, "lab/lan", 4242, Ipv4Addr::new(10, 9, 0, 1), i, &remotes).await.unwrap();
        let fdb = String::from_utf8(Command::new("bridge").args(["fdb", "show", "dev", "bx-test0"]).output().unwrap().stdout).unwrap();
        for r in remotes {
            assert_eq!(fdb.matches(&format!("00:00:00:00:00:00 dst {r}")).count(), 1, "{fdb}");
        }
        // Another set of remotes: the link is made anew with just those.
        net.ensure_vxlan(&vx, "lab/lan", 4242, Ipv4Addr::new(10, 9, 0, 1), i, &remotes[..1]).await.unwrap();
        let fdb = String::from_utf8(Command::new("bridge").args(["fdb", "show", "dev", "bx-test0"]).output().unwrap().stdout).unwrap();
        assert!(fdb.contains("dst 10.9.0.2") && !fdb.contains("dst 10.9.0.3"), "{fdb}");
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
            };
            net.attach_container(s.pid(), &format!("lab/c{n}"), &[veth]).await.unwrap();
        }
        let shown = String::from_utf8(a.run(&["ip", "addr", "show", "eth0"]).stdout).unwrap();
        assert!(shown.contains("10.20.0.1/24") && shown.contains("52:54:00:00:00:01") && shown.contains("UP"), "{shown}");
        let ping = a.run(&["ping", "-c", "1", "-W", "5", "10.20.0.2"]);
        assert!(ping.status.success(), "{}", String::from_utf8_lossy(&ping.stdout));

        // Everything made is found by its alias, and deleted.
        let made = net.made().await.unwrap();
        let mut names: Vec<&str> = made.iter().map(|m| m.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["bc-test0", "bv-test0", "bv-test1", "bx-test0"]);
        assert!(made.iter().any(|m| m.name == "bv-test1" && m.owner == "lab/c1"));
        for m in &made {
            net.delete(&m.name).await.unwrap();
        }
        net.delete("bc-test0").await.unwrap();
        assert!(net.made().await.unwrap().is_empty());
    });
}
