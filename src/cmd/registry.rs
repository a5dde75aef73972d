//! `bootcache push` and `bootcache pull`: bootcache images in OCI registries.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use bootcache_registry::{Clients, Reference, Registry, artifact};
use clap::Args;

use super::Output;

/// How to reach registries.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Credentials in Docker's config.json format (`auths`: per registry,
    /// `auth` = base64 of user:password). Default: $DOCKER_CONFIG/config.json
    /// or ~/.docker/config.json when there is one; else anonymous.
    #[arg(long, value_name = "FILE", env = "BOOTCACHE_REGISTRY_CONFIG")]
    registry_config: Option<PathBuf>,
    /// A registry (HOST:PORT) spoken to over plain HTTP; loopback ones are
    /// anyway. May be given several times.
    #[arg(long, value_name = "HOST:PORT")]
    insecure_registry: Vec<String>,
}

impl RegistryArgs {
    fn client(&self, reference: &Reference) -> anyhow::Result<Registry> {
        let default = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
            .map(|d| d.join("config.json"))
            .filter(|p| p.is_file());
        Ok(Clients::new(self.registry_config.clone().or(default), self.insecure_registry.clone()).get(&reference.registry)?)
    }
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// The bootcache image to push.
    image: PathBuf,
    /// Where: HOST[:PORT]/REPO[:TAG] (the tag `latest` unless given).
    reference: String,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format (JSON: the reference pinned to its digest, the blob).
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Args)]
pub struct PullArgs {
    /// What: HOST[:PORT]/REPO[:TAG] or HOST[:PORT]/REPO@sha256:...
    reference: String,
    /// The file to write (only once every byte is checked).
    out: PathBuf,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

fn report(output: Output, resolved: &artifact::Resolved) -> anyhow::Result<()> {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::json!({
                "reference": resolved.pinned.to_string(),
                "blob": resolved.blob.to_string(),
                "size": resolved.size,
                "root_digest": resolved.root,
                "boot_segment_bytes": resolved.boot_bytes,
            })
        ),
        Output::Text => println!("{}", resolved.pinned),
    }
    Ok(())
}

pub fn push(args: &PushArgs) -> anyhow::Result<ExitCode> {
    let reference: Reference = args.reference.parse()?;
    let client = args.registry.client(&reference)?;
    super::deliver::runtime()?.block_on(async {
        let pinned = artifact::push(&client, &args.image, &reference).await.with_context(|| format!("pushing {}", args.image.display()))?;
        let resolved = artifact::resolve(&client, &pinned).await?;
        report(args.output, &resolved)
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn pull(args: &PullArgs) -> anyhow::Result<ExitCode> {
    let reference: Reference = args.reference.parse()?;
    let client = args.registry.client(&reference)?;
    super::deliver::runtime()?.block_on(async {
        let resolved = artifact::pull(&client, &reference, &args.out).await?;
        report(args.output, &resolved)
    })?;
    Ok(ExitCode::SUCCESS)
}
