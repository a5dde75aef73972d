//! The one firewall rule a segment needs: where `br_netfilter` is loaded
//! and the netns's `bridge-nf-call-iptables` is on (a bridge cannot turn it
//! off for itself), bridged frames cross the iptables FORWARD chain, whose
//! policy a Docker daemon sets to DROP. Each segment's bridge gets an
//! ACCEPT for frames that stay on it, first in FORWARD, with a comment
//! naming its owner, so the rules a node made are found and removed after
//! a crash. Run through `iptables` (no shell; the bridge name is checked).

use tokio::process::Command;

use bootcache_api::InterfaceName;
use bootcache_api::agent::names::ALIAS_PREFIX;

/// Runs iptables without holding a runtime thread (`-w` may wait for the
/// machine-wide xtables lock while another daemon holds it).
async fn iptables(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("iptables").arg("-w").args(args).output().await
}

fn rule<'a>(bridge: &'a str, comment: &'a str) -> [&'a str; 10] {
    ["-i", bridge, "-o", bridge, "-m", "comment", "--comment", comment, "-j", "ACCEPT"]
}

/// Lets frames between the ports of `bridge` through FORWARD.
///
/// # Errors
/// iptables is missing or refuses the rule.
pub async fn allow_bridge(bridge: &InterfaceName, owner: &str) -> std::io::Result<()> {
    let comment = format!("{ALIAS_PREFIX}{owner}");
    let r = rule(bridge.as_str(), &comment);
    if iptables(&[&["-C", "FORWARD"][..], &r[..]].concat()).await?.status.success() {
        return Ok(());
    }
    let out = iptables(&[&["-I", "FORWARD", "1"][..], &r[..]].concat()).await?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!("iptables: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}

/// The bridges that have a rule of ours, with the rule's owner.
pub async fn rules() -> Vec<(String, String)> {
    let Ok(out) = iptables(&["-S", "FORWARD"]).await else { return Vec::new() };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut found = Vec::new();
    for line in text.lines() {
        let Some(start) = line.find(&format!("--comment \"{ALIAS_PREFIX}")) else { continue };
        let owner = line[start + 11 + ALIAS_PREFIX.len()..].split('"').next().unwrap_or("").to_owned();
        let bridge = line.split_whitespace().skip_while(|w| *w != "-i").nth(1).unwrap_or("").to_owned();
        if !bridge.is_empty() {
            found.push((bridge, owner));
        }
    }
    found
}

/// Removes our rule for `bridge` (every copy); nothing if there is none.
pub async fn remove_bridge(bridge: &str) {
    for (b, owner) in rules().await {
        if b == bridge {
            let comment = format!("{ALIAS_PREFIX}{owner}");
            let _ = iptables(&[&["-D", "FORWARD"][..], &rule(&b, &comment)[..]].concat()).await;
        }
    }
}
