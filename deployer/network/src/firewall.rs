//! The one firewall rule a segment needs: where `br_netfilter` is loaded
//! and the netns's `bridge-nf-call-iptables` is on (a bridge cannot turn it
//! off for itself), bridged frames cross the iptables FORWARD chain, whose
//! policy a Docker daemon sets to DROP. Each segment's bridge gets an
//! ACCEPT for frames that stay on it, first in FORWARD, with the agent's
//! mark as its comment; only a rule with the mark asked for is removed, so
//! a node's rules are found and removed after a crash and nobody else's
//! are touched. Run through `iptables` (no shell; the bridge name is
//! checked, the mark is the agent's own text).

use tokio::process::Command;

use bootcache_api::InterfaceName;

/// Runs iptables without holding a runtime thread (`-w` may wait for the
/// machine-wide xtables lock while another daemon holds it).
async fn iptables(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("iptables").arg("-w").args(args).output().await
}

fn rule<'a>(bridge: &'a str, comment: &'a str) -> [&'a str; 10] {
    ["-i", bridge, "-o", bridge, "-m", "comment", "--comment", comment, "-j", "ACCEPT"]
}

/// Lets frames between the ports of `bridge` through FORWARD, by a rule
/// whose comment is `mark`.
///
/// # Errors
/// iptables is missing or refuses the rule.
pub async fn allow_bridge(bridge: &InterfaceName, mark: &str) -> std::io::Result<()> {
    let r = rule(bridge.as_str(), mark);
    if iptables(&[&["-C", "FORWARD"][..], &r[..]].concat()).await?.status.success() {
        return Ok(());
    }
    let out = iptables(&[&["-I", "FORWARD", "1"][..], &r[..]].concat()).await?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!("iptables: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}

/// The bridges that have an ACCEPT rule with a comment starting with
/// `prefix`, each with its comment.
pub async fn rules(prefix: &str) -> Vec<(String, String)> {
    let Ok(out) = iptables(&["-S", "FORWARD"]).await else { return Vec::new() };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut found = Vec::new();
    let key = format!("--comment \"{prefix}");
    for line in text.lines() {
        let Some(start) = line.find(&key) else { continue };
        let comment = line[start + "--comment \"".len()..].split('"').next().unwrap_or("").to_owned();
        let bridge = line.split_whitespace().skip_while(|w| *w != "-i").nth(1).unwrap_or("").to_owned();
        if !bridge.is_empty() {
            found.push((bridge, comment));
        }
    }
    found
}

/// Removes the rule for `bridge` whose comment is `mark` (every copy);
/// nothing if there is none. Rules of anyone else are left.
pub async fn remove_bridge(bridge: &str, mark: &str) {
    for (b, comment) in rules(mark).await {
        if b == bridge && comment == mark {
            let _ = iptables(&[&["-D", "FORWARD"][..], &rule(&b, &comment)[..]].concat()).await;
        }
    }
}
