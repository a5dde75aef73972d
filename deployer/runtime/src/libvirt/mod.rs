//! VMs through libvirt (the `virt` crate against a real libvirtd): one
//! domain per VM, type `qemu` (TCG) or `kvm`, its disk a qcow2 overlay this
//! backend makes over the node's NBD export of the image (or over a whole
//! disk file), its NICs on the lab's bridges, its serial console in a file
//! read for the readiness marker ([`Runtime::logs`]), and a guest-agent
//! channel for [`Runtime::exec`]. Its files (overlays, consoles) live under
//! the agent's state directory.
//!
//! libvirt's calls block: each runs on Tokio's blocking pool with a
//! connection of its own.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use virt::connect::Connect;
use virt::domain::DomainState;

pub mod seed;

pub use crate::Accel;
use crate::{Exec, Options, PREFIX, Runtime, RuntimeError, Source, Spec, Status, tail, xml_escape};

/// VMs on one libvirtd.
#[derive(Clone, Debug)]
pub struct Libvirt {
    uri: String,
    consoles: PathBuf,
    overlays: PathBuf,
    seeds: PathBuf,
    /// QEMU's group under libvirt (`libvirt-qemu`), which reads the seeds.
    qemu_group: Option<u32>,
    accel: Accel,
    emulator: PathBuf,
    owner: String,
}

/// The XML namespace of the mark a domain made by bootcache carries in
/// its `<metadata>`, naming the agent that made it.
pub const METADATA_NS: &str = "https://bootcache.dev/xmlns/instance/1";

/// Where OVMF (UEFI for VMs) may be, the first found used.
const OVMF: [&str; 2] = ["/usr/share/qemu/OVMF.fd", "/usr/share/ovmf/OVMF.fd"];

/// libvirt's `VIR_DOMAIN_METADATA_ELEMENT`.
const METADATA_ELEMENT: i32 = 2;

fn virt_err(what: String) -> impl FnOnce(virt::error::Error) -> RuntimeError {
    move |e| RuntimeError::new(what, e.message())
}

/// libvirt's "no domain with matching name".
fn is_missing(e: &virt::error::Error) -> bool {
    matches!(e.code().known(), Some(virt::error::ErrorNumber::NoDomain))
}

impl Libvirt {
    /// VMs on the libvirtd at `options.endpoint` (e.g. `qemu:///system`),
    /// their consoles and overlays under the state directory (`consoles/`,
    /// `overlays/`, made if missing), each domain marked as made by
    /// `options.owner` (the agent's node), and only those listed.
    ///
    /// # Errors
    /// libvirtd does not answer, or the directories cannot be made.
    pub async fn connect(options: &Options) -> Result<Libvirt, RuntimeError> {
        let (uri, accel, owner) = (options.endpoint.as_str(), options.accel, options.owner.as_str());
        let consoles = options.state_dir.join("consoles");
        let overlays = options.state_dir.join("overlays");
        let seeds = options.state_dir.join("seeds");
        for d in [&consoles, &overlays, &seeds] {
            std::fs::create_dir_all(d).map_err(|e| RuntimeError::new(format!("making {}", d.display()), e))?;
        }
        // QEMU (another user under libvirt) reaches the files it is given.
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&seeds, std::fs::Permissions::from_mode(0o711));
        }
        let qemu_group = std::fs::read_to_string("/etc/group").ok().and_then(|g| {
            g.lines().find_map(|l| {
                let mut f = l.split(':');
                (f.next() == Some("libvirt-qemu")).then(|| f.nth(1).and_then(|gid| gid.parse::<u32>().ok())).flatten()
            })
        });
        let emulator = ["/usr/bin/qemu-system-x86_64", "/usr/libexec/qemu-kvm"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or_else(|| RuntimeError::new("finding QEMU", "no qemu-system-x86_64 (package qemu-system-x86)"))?;
        let me = Libvirt { uri: uri.to_owned(), consoles, overlays, seeds, qemu_group, accel, emulator, owner: owner.to_owned() };
        let v = me.blocking("connecting", |c| c.lib_version().map_err(virt_err(String::new()))).await?;
        tracing::info!(uri, libvirt = v, ?accel, "libvirt connected");
        Ok(me)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&Connect) -> Result<T, RuntimeError> + Send + 'static,
    ) -> Result<T, RuntimeError> {
        let uri = self.uri.clone();
        let what = format!("libvirt {uri}: {what}");
        let w = what.clone();
        tokio::task::spawn_blocking(move || {
            let conn = Connect::open(Some(&uri)).map_err(virt_err(w.clone()))?;

            f(&conn).map_err(|e| match e {
                RuntimeError::Failed { what, why } => RuntimeError::new(format!("{w}: {what}"), why),
                other => other,
            })
        })
        .await
        .map_err(|e| RuntimeError::new(what, e))?
    }

    /// Where a VM's serial console is written.
    pub fn console_path(&self, id: &str) -> PathBuf {
        self.consoles.join(format!("{id}.console"))
    }

    /// Where a VM's cloud-init seed is kept.
    pub fn seed_path(&self, id: &str) -> PathBuf {
        self.seeds.join(format!("{id}.img"))
    }

    /// Where a VM's overlay is kept.
    pub fn overlay_path(&self, id: &str) -> PathBuf {
        self.overlays.join(format!("{id}.qcow2"))
    }

    /// Makes VM `id`'s overlay over its source: a qcow2 file whose backing
    /// file is the node's export (its size given: opening it here would
    /// count as a guest's reads) or a whole disk on the node.
    async fn make_overlay(&self, id: &str, source: &Source) -> Result<PathBuf, RuntimeError> {
        let overlay = self.overlay_path(id);
        let _ = std::fs::remove_file(&overlay);
        let (backing, format, size) = match source {
            Source::Export { url, virtual_size } => (url.clone(), "raw", Some(*virtual_size)),
            Source::Disk { path, format } => (path.to_string_lossy().into_owned(), format.as_str(), None),
            Source::Tarball { .. } | Source::Image { .. } => {
                return Err(RuntimeError::new(id, "a VM is made from a disk, not a container image"));
            }
        };
        let mut make = tokio::process::Command::new("qemu-img");
        make.args(["create", "-q", "-f", "qcow2", "-F", format, "-b", &backing]).arg(&overlay);
        if let Some(size) = size {
            make.arg("-u").arg(size.to_string());
        }
        let out = make.output().await.map_err(|e| RuntimeError::new(format!("{id}: qemu-img (package qemu-utils)"), e))?;
        if !out.status.success() {
            return Err(RuntimeError::new(format!("{id}: making the overlay"), String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(overlay)
    }

    /// The domain XML for `spec`, its disk the overlay at `disk`, its
    /// cloud-init seed (read-only) at `seed`.
    pub fn domain_xml(&self, spec: &Spec, disk: &Path, seed: Option<&Path>) -> Result<String, RuntimeError> {
        let loader = if spec.uefi {
            let ovmf = OVMF
                .iter()
                .map(Path::new)
                .find(|p| p.exists())
                .ok_or_else(|| RuntimeError::new(format!("{}: UEFI firmware", spec.id), "no OVMF.fd (package ovmf)"))?;
            format!("<loader readonly='yes' type='rom'>{}</loader>", xml_escape(&ovmf.to_string_lossy()))
        } else {
            String::new()
        };
        let seed = seed.map_or_else(String::new, |p| {
            format!(
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      <source file='{}'/>\n      <target dev='vdb' bus='virtio'/>\n      <readonly/>\n    </disk>\n",
                xml_escape(&p.to_string_lossy())
            )
        });
        let kind = match self.accel {
            Accel::Tcg => "qemu",
            Accel::Kvm => "kvm",
        };
        let mut nics = String::new();
        for n in &spec.nics {
            nics += &format!(
                "    <interface type='bridge'><source bridge='{}'/><mac address='{}'/><model type='virtio'/></interface>\n",
                xml_escape(n.bridge.as_str()),
                n.mac
            );
        }
        let cpu = if self.accel == Accel::Kvm { "  <cpu mode='host-passthrough'/>\n" } else { "" };
        Ok(format!(
            "<domain type='{kind}'>
  <name>{name}</name>
  <description>bootcache lab instance {host}</description>
  <metadata><bootcache:instance xmlns:bootcache='{ns}' owner='{owner}'/></metadata>
  <memory unit='b'>{mem}</memory>
  <vcpu>{cpus}</vcpu>
{cpu}  <os><type arch='x86_64' machine='pc'>hvm</type>{loader}<boot dev='hd'/></os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emu}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' discard='unmap'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
{seed}{nics}    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <memballoon model='none'/>
  </devices>
</domain>
",
            name = xml_escape(&spec.id),
            host = xml_escape(&spec.hostname),
            ns = METADATA_NS,
            owner = xml_escape(&self.owner),
            mem = spec.memory_bytes,
            cpus = spec.cpus,
            emu = xml_escape(&self.emulator.to_string_lossy()),
            disk = xml_escape(&disk.to_string_lossy()),
            console = xml_escape(&self.console_path(&spec.id).to_string_lossy()),
        ))
    }

    /// Runs a guest-agent command (JSON) in VM `id`.
    async fn agent(&self, id: &str, cmd: String, timeout_s: i32) -> Result<serde_json::Value, RuntimeError> {
        let name = id.to_owned();
        let text = self
            .blocking(&format!("{id}: guest agent"), move |c| {
                let d = c.lookup_domain_by_name(&name).map_err(virt_err(String::new()))?;
                d.qemu_agent_command(&cmd, timeout_s, 0).map_err(virt_err("the guest agent".into()))
            })
            .await?;
        serde_json::from_str(&text).map_err(|e| RuntimeError::new(format!("{id}: guest agent"), e))
    }
}

#[async_trait::async_trait]
impl Runtime for Libvirt {
    fn name(&self) -> &'static str {
        "libvirt"
    }

    async fn create(&self, spec: &Spec) -> Result<(), RuntimeError> {
        let overlay = self.make_overlay(&spec.id, &spec.source).await?;
        let seed = match &spec.cloud_init {
            None => None,
            Some(cloud) => {
                let path = self.seed_path(&spec.id);
                seed::write(&path, cloud, self.qemu_group)?;
                Some(path)
            }
        };
        let xml = self.domain_xml(spec, &overlay, seed.as_deref())?;
        let _ = std::fs::remove_file(self.console_path(&spec.id));
        self.blocking(&format!("{}: defining", spec.id), move |c| c.define_domain_xml(&xml).map(drop).map_err(virt_err(String::new())))
            .await
    }

    async fn start(&self, id: &str) -> Result<(), RuntimeError> {
        let name = id.to_owned();
        self.blocking(&format!("{id}: starting"), move |c| {
            let d = c.lookup_domain_by_name(&name).map_err(virt_err(String::new()))?;
            if d.is_active().unwrap_or(false) {
                return Ok(());
            }
            d.create().map(drop).map_err(virt_err(String::new()))
        })
        .await
    }

    async fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        let name = id.to_owned();
        self.blocking(&format!("{id}: stopping"), move |c| match c.lookup_domain_by_name(&name) {
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(virt_err(String::new())(e)),
            Ok(d) if d.is_active().unwrap_or(false) => d.destroy().map_err(virt_err(String::new())),
            Ok(_) => Ok(()),
        })
        .await
    }

    async fn destroy(&self, id: &str) -> Result<(), RuntimeError> {
        let name = id.to_owned();
        self.blocking(&format!("{id}: destroying"), move |c| match c.lookup_domain_by_name(&name) {
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(virt_err(String::new())(e)),
            Ok(d) => {
                if d.is_active().unwrap_or(false) {
                    d.destroy().map_err(virt_err("stopping".into()))?;
                }
                d.undefine().map_err(virt_err("undefining".into()))
            }
        })
        .await?;
        let _ = std::fs::remove_file(self.console_path(id));
        let _ = std::fs::remove_file(self.overlay_path(id));
        let _ = std::fs::remove_file(self.seed_path(id));
        Ok(())
    }

    async fn status(&self, id: &str) -> Result<Status, RuntimeError> {
        let name = id.to_owned();
        self.blocking(&format!("{id}: status"), move |c| match c.lookup_domain_by_name(&name) {
            Err(e) if is_missing(&e) => Ok(Status::Missing),
            Err(e) => Err(virt_err(String::new())(e)),
            Ok(d) => {
                let (state, _) = d.state().map_err(virt_err(String::new()))?;
                Ok(match state.known() {
                    Some(DomainState::Running | DomainState::Blocked) => Status::Running,
                    _ => Status::Stopped,
                })
            }
        })
        .await
    }

    async fn logs(&self, id: &str) -> Result<String, RuntimeError> {
        match tokio::fs::read(self.console_path(id)).await {
            Ok(bytes) => Ok(tail(String::from_utf8_lossy(&bytes).into_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            Err(e) => Err(RuntimeError::new(format!("{id}: reading the console"), e)),
        }
    }

    async fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<Exec, RuntimeError> {
        let Some((path, args)) = argv.split_first() else { return Err(RuntimeError::new(id, "nothing to run")) };
        let cmd = serde_json::json!({"execute": "guest-exec", "arguments": {"path": path, "arg": args, "capture-output": true}});
        let started = self.agent(id, cmd.to_string(), 10).await?;
        let pid = started["return"]["pid"].as_i64().ok_or_else(|| RuntimeError::new(format!("{id}: guest-exec"), started.to_string()))?;
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.agent(id, serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}).to_string(), 10).await?;
            let r = &st["return"];
            if r["exited"].as_bool() == Some(true) {
                let b64 = base64::engine::general_purpose::STANDARD;
                let mut output = String::new();
                for key in ["out-data", "err-data"] {
                    if let Some(d) = r[key].as_str() {
                        output += &String::from_utf8_lossy(&b64.decode(d).unwrap_or_default());
                    }
                }
                return Ok(Exec { code: r["exitcode"].as_i64().unwrap_or(-1), output });
            }
            if Instant::now() > deadline {
                return Err(RuntimeError::new(format!("{id}: {path}"), format!("still running after {} s", timeout.as_secs())));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn list(&self) -> Result<Vec<String>, RuntimeError> {
        let owner = self.owner.clone();
        self.blocking("listing domains", move |c| {
            let all = c.list_all_domains(0).map_err(virt_err(String::new()))?;
            let marks = [format!("owner=\"{}\"", xml_escape(&owner)), format!("owner='{}'", xml_escape(&owner))];
            Ok(all
                .iter()
                .filter_map(|d| d.name().ok().map(|n| (d, n)))
                .filter(|(_, n)| n.starts_with(PREFIX))
                .filter(|(d, _)| {
                    d.metadata(METADATA_ELEMENT, Some(METADATA_NS), 0).is_ok_and(|m| marks.iter().any(|k| m.contains(k.as_str())))
                })
                .map(|(_, n)| n)
                .collect())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_domain_xml_carries_the_spec() {
        let lv = Libvirt {
            uri: "test:///default".into(),
            consoles: "/run/c".into(),
            overlays: "/var/lib/x".into(),
            seeds: "/var/lib/s".into(),
            qemu_group: None,
            accel: Accel::Tcg,
            emulator: "/usr/bin/qemu-system-x86_64".into(),
            owner: "node-a".into(),
        };
        let spec = Spec {
            id: "bootcache.lab.vm-1".into(),
            hostname: "vm-1".into(),
            cpus: 2,
            memory_bytes: 512 << 20,
            nics: vec![bootcache_api::agent::Nic {
                bridge: "bc0123456789".parse().unwrap(),
                mac: bootcache_api::agent::Mac([0x52, 0x54, 0, 1, 2, 3]),
                address: "10.0.0.5".parse().unwrap(),
                prefix: 24,
                gateway: None,
            }],
            source: crate::Source::Export { url: "nbd+unix:///x?socket=/s".into(), virtual_size: 1 << 30 },
            command: None,
            cloud_init: None,
            env: Default::default(),
            files: Default::default(),
            sysctls: Default::default(),
            uefi: false,
        };
        let xml = lv.domain_xml(&spec, &lv.overlay_path(&spec.id), Some(&lv.seed_path(&spec.id))).unwrap();
        for part in [
            "<domain type='qemu'>",
            "<name>bootcache.lab.vm-1</name>",
            "<memory unit='b'>536870912</memory>",
            "<vcpu>2</vcpu>",
            "<source bridge='bc0123456789'/><mac address='52:54:00:01:02:03'/>",
            "<source file='/var/lib/x/bootcache.lab.vm-1.qcow2'/>",
            "<source path='/run/c/bootcache.lab.vm-1.console'/>",
            "org.qemu.guest_agent.0",
            "<bootcache:instance xmlns:bootcache='https://bootcache.dev/xmlns/instance/1' owner='node-a'/>",
            "<source file='/var/lib/s/bootcache.lab.vm-1.img'/>\n      <target dev='vdb' bus='virtio'/>\n      <readonly/>",
        ] {
            assert!(xml.contains(part), "{part} in\n{xml}");
        }
        assert!(!xml.contains("graphics"), "no graphics element (libvirt 9 refuses type none)");
        assert_eq!(xml_escape("a'<b>&\""), "a&apos;&lt;b&gt;&amp;&quot;");
    }
}
