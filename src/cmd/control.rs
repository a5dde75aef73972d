//! `bootcache control`: the control node of a deployment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use bootcache_control::api::Control;
use bootcache_control::db::Db;
use bootcache_control::plan::Policy;
use bootcache_http::auth::Credential;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum ControlCmd {
    /// Run the control node: nodes, images and instances in an SQLite database.
    ///
    /// A JSON HTTP API (POST/GET /nodes, POST /nodes/NAME/heartbeat, POST
    /// /images, GET /images/ROOT, GET /labs/LAB/instances), every call with
    /// `Authorization: Bearer TOKEN` (the token in --token-file, made on first
    /// start; `bootcache control token` prints it and agents are given it).
    Serve {
        /// The database file (made if missing; kept across restarts).
        #[arg(long, value_name = "PATH", default_value = "/var/lib/bootcache/control.db")]
        db: PathBuf,
        /// Address of the API.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7080")]
        listen: SocketAddr,
        /// How often agents send heartbeats; a node that misses three is down
        /// and its instances lost.
        #[arg(long, value_name = "SECS", default_value_t = 2.0)]
        heartbeat: f64,
        /// The file holding the API's token (mode 0600; made on first use).
        #[arg(long, value_name = "PATH", default_value = "/var/lib/bootcache/control.token")]
        token_file: PathBuf,
        /// Virtual CPUs placed per core of a node.
        #[arg(long, value_name = "N", default_value_t = 16)]
        cpu_overcommit: u32,
        /// How many nodes one node passes an image on to (1: a chain, more:
        /// a tree; `auto`: a chain up to 48 nodes fetching it at once, a tree
        /// of 2 above, which measured and simulated quickest); the store
        /// serves only the first node of each image.
        #[arg(long, value_name = "N", default_value = "auto", value_parser = parse_fan_out)]
        fan_out: usize,
        /// How instances are placed among nodes with room: `cache-aware`
        /// (nodes that hold or are fetching the image first) or `spread`
        /// (the most free cores, whatever they cache).
        #[arg(long, value_name = "POLICY", default_value = "cache-aware", value_parser = parse_placement)]
        placement: Policy,
        /// Where nodes fetch VM images from: `peers` (other nodes that hold
        /// or are fetching it, as planned with --fan-out; the store serves
        /// each image once) or `store` (every node from the store).
        #[arg(long, value_name = "FROM", default_value = "peers", value_parser = ["peers", "store"])]
        sources: String,
        /// Credentials for the registries a lab's images are in (Docker's
        /// config.json format); anonymous without it. Read for each
        /// registry when a deploy first names it; the client and its tokens
        /// are kept for later deploys (a changed file takes a restart).
        #[arg(long, value_name = "FILE", env = "BOOTCACHE_REGISTRY_CONFIG")]
        registry_config: Option<std::path::PathBuf>,
        /// A registry (HOST:PORT) spoken to over plain HTTP; loopback ones are
        /// anyway. May be given several times.
        #[arg(long, value_name = "HOST:PORT")]
        insecure_registry: Vec<String>,
        /// Also run a compute agent of this name in the same process (this
        /// machine as the deployment's one node).
        #[arg(long, value_name = "NODE")]
        agent: Option<String>,
        #[command(flatten)]
        agent_options: Box<super::agent::AgentOptions>,
    },
    /// Print the administrator's token (made if there is none), or rotate
    /// it; with --join, the join token derived from it, which agents are
    /// given (`bootcache agent --token-file`): it lets a node join and
    /// nothing else.
    #[command(alias = "init")]
    Token {
        /// The file holding the administrator's token.
        #[arg(long, value_name = "PATH", default_value = "/var/lib/bootcache/control.token")]
        token_file: PathBuf,
        /// Make a new token; the current one stays accepted until the next
        /// rotation (the join token changes with it: nodes that joined keep
        /// their own credentials).
        #[arg(long)]
        rotate: bool,
        /// Print the join token instead.
        #[arg(long, conflicts_with = "rotate")]
        join: bool,
    },
    /// The compute nodes.
    #[command(subcommand)]
    Node(NodeCmd),
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Remove a node: its credential stops working, its instances are
    /// placed again (pinned ones wait for a node of their name), and it may
    /// join again (a node that is up cannot join again until removed).
    Remove {
        /// The node.
        name: String,
        /// The control node (http://HOST:PORT).
        #[arg(long, value_name = "URL", env = "BOOTCACHE_CONTROL", default_value = "http://127.0.0.1:7080")]
        control: String,
        /// The administrator's token file.
        #[arg(long, value_name = "PATH", env = "BOOTCACHE_TOKEN_FILE", default_value = "/var/lib/bootcache/control.token")]
        token_file: PathBuf,
    },
}

fn parse_fan_out(s: &str) -> Result<usize, String> {
    match s {
        "auto" => Ok(0),
        _ => match s.parse::<usize>() {
            Ok(n) if (1..=64).contains(&n) => Ok(n),
            _ => Err(format!("{s:?}: auto or 1 to 64")),
        },
    }
}

fn parse_placement(s: &str) -> Result<Policy, String> {
    match s {
        "cache-aware" => Ok(Policy::CacheAware),
        "spread" => Ok(Policy::Spread),
        _ => Err(format!("{s:?}: cache-aware or spread")),
    }
}

pub fn control(cmd: ControlCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ControlCmd::Token { token_file, rotate, join } => {
            let t = if rotate {
                Credential::rotate(&token_file)?
            } else if join {
                bootcache_control::api::join_token(&*Credential::load_or_create(&token_file)?)
            } else {
                Credential::load_or_create(&token_file)?.token()
            };
            println!("{t}");
            Ok(ExitCode::SUCCESS)
        }
        ControlCmd::Node(NodeCmd::Remove { name, control, token_file }) => {
            let node: bootcache_api::Name = name.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
            let credential =
                Credential::load(&token_file).with_context(|| format!("the administrator's token ({})", token_file.display()))?;
            let client = bootcache_control::client::Client::new(&control, &credential)?;
            super::deliver::runtime()?.block_on(client.remove_node(&node))?;
            eprintln!("node {node} removed: its instances are placed again");
            Ok(ExitCode::SUCCESS)
        }
        ControlCmd::Serve {
            db,
            listen,
            heartbeat,
            token_file,
            cpu_overcommit,
            fan_out,
            placement,
            sources,
            registry_config,
            insecure_registry,
            agent,
            agent_options,
        } => {
            let credential = Credential::load_or_create(&token_file)?;
            if let Some(dir) = db.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            let database = Db::open(&db)?;
            let interval = Duration::from_secs_f64(heartbeat.clamp(0.1, 3600.0));
            super::deliver::runtime()?.block_on(async {
                let mut control = Control::new(database, interval);
                if let Some(c) = std::sync::Arc::get_mut(&mut control) {
                    c.cpu_overcommit = cpu_overcommit.clamp(1, 1024);
                    c.fan_out = fan_out.min(64);
                    c.policy = placement;
                    c.peers = sources == "peers";
                    c.registry_config = registry_config.clone();
                    c.insecure_registries = insecure_registry.clone();
                }
                tokio::spawn(std::sync::Arc::clone(&control).watch_nodes());
                let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
                let agent_task = match &agent {
                    None => None,
                    Some(name) => {
                        let url = format!("http://{}", listener.local_addr()?);
                        let registries = (registry_config.clone(), insecure_registry.clone());
                        let config =
                            super::agent::config(name, url, std::sync::Arc::clone(&credential), interval, &agent_options, registries)?;
                        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                        let task = tokio::spawn(bootcache_agent::run(config, async move {
                            let _ = rx.await;
                        }));
                        Some((tx, task))
                    }
                };
                eprintln!(
                    "control node API on http://{}/ (database {}, token in {})",
                    listener.local_addr()?,
                    db.display(),
                    token_file.display()
                );
                let api = control.api(credential);
                match agent_task {
                    None => bootcache_http::serve(listener, api, Default::default(), super::deliver::until_signal()).await?,
                    Some((stop_agent, mut task)) => {
                        let served = tokio::spawn(bootcache_http::serve(listener, api, Default::default(), std::future::pending()));
                        tokio::select! {
                            () = super::deliver::until_signal() => {}
                            // The agent could not start (no libvirtd, no dockerd...).
                            r = &mut task => {
                                served.abort();
                                r.context("the agent")??;
                                anyhow::bail!("the agent stopped");
                            }
                        }
                        let _ = stop_agent.send(());
                        let _ = task.await;
                        served.abort();
                    }
                }
                Ok(ExitCode::SUCCESS)
            })
        }
    }
}
