//! Command-line definitions and dispatch.

mod agent;
mod control;
mod deliver;
mod image;
mod lab;
mod progress;
mod record;
mod registry;
mod trace;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Make VMs boot fast from remote images: record what a boot reads, lay the
/// image out so those bytes come first, and check and convert such images.
#[derive(Debug, Parser)]
#[command(name = "bootcache", version, propagate_version = true, max_term_width = 100)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// Output format for machine-readable results.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable text.
    Text,
    /// One JSON object on stdout.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Record the reads a VM makes on its image while it boots (eBPF; needs root).
    Record(record::RecordArgs),
    /// Write a cloud-init seed disk (NoCloud: FAT, labelled cidata), such as
    /// every lab VM gets: attach it read-only while recording a cloud
    /// image, so that the recorded boot is cloud-init's first boot.
    Seed(record::SeedArgs),
    /// Create, import and export trace files.
    #[command(subcommand)]
    Trace(trace::TraceCmd),
    /// Study a trace's reads: sizes, unique bytes, intervals; optional plots.
    /// Given several traces (or --compare), compares them: one table row
    /// and one row of plots per trace.
    Analyze {
        /// The trace file(s); `NAME=PATH` names a trace in the comparison
        /// (default: the file's stem).
        #[arg(required = true, num_args = 1..)]
        traces: Vec<String>,
        /// Compare even one trace (the comparison's table and plot layout).
        #[arg(long)]
        compare: bool,
        /// Print JSON instead of text (an array when comparing).
        #[arg(long)]
        json: bool,
        /// Write request-size, offset-over-time and cumulative plots (PNG and
        /// SVG) here; comparing, compare.png and compare.svg.
        #[arg(long, value_name = "DIR")]
        plot: Option<PathBuf>,
    },
    /// Convert a raw or qcow2 disk image into a bootcache image, boot bytes first.
    Convert(image::ConvertArgs),
    /// Write a bootcache image back out as a sparse raw or qcow2 disk image
    /// (a layer with its parents, flattened).
    Export {
        /// The bootcache image (a layer's parents are found as it names them).
        src: PathBuf,
        /// The disk image to write.
        dst: PathBuf,
        /// Format of the output.
        #[arg(long, value_enum, default_value_t = image::DstFormat::Raw)]
        format: image::DstFormat,
        /// No progress bar.
        #[arg(short, long)]
        quiet: bool,
    },
    /// Push a bootcache image to an OCI registry, as an artifact (one blob,
    /// read lazily with ranges as from a store); prints the reference
    /// pinned to its digest.
    Push(registry::PushArgs),
    /// Pull a bootcache image from an OCI registry into a file, every byte
    /// checked against its digest and the image's root digest.
    Pull(registry::PullArgs),
    /// Describe a bootcache image: sizes, segments, features, root digest,
    /// and for a layer its chain of parents.
    Info {
        /// The bootcache image.
        image: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Serve bootcache images to nodes over HTTP.
    #[command(subcommand)]
    Store(deliver::StoreCmd),
    /// Run a compute node's shared image caches and NBD exports.
    #[command(subcommand)]
    Node(deliver::NodeCmd),
    /// Boot a VM from an image on a store: boot segment first, the rest on demand and in the background.
    Boot(deliver::BootArgs),
    /// Run the control node of a deployment (nodes, images, instances).
    #[command(subcommand)]
    Control(control::ControlCmd),
    /// Run a compute node's agent: its delivery node, and the VMs and containers its control node orders.
    Agent(agent::AgentArgs),
    /// Deploy a lab file: its segments and instances, VMs and containers, across the nodes.
    Deploy(lab::DeployArgs),
    /// Show labs, or one lab's instances: node, kind, state, address, time to ready.
    Inspect(lab::InspectArgs),
    /// Stop instances of a lab (kept on their nodes, with their disks).
    Stop(lab::InstanceArgs),
    /// Start stopped instances of a lab again.
    Start(lab::InstanceArgs),
    /// Destroy a lab: every instance, overlay, bridge and VXLAN link it made, on every node.
    Destroy(lab::DestroyArgs),
    /// Run a command in an instance (a container through Docker, a VM through
    /// its QEMU guest agent), through the control node and the instance's
    /// node; prints its output and exits with its exit code.
    Exec(lab::ExecArgs),
    /// Print what an instance printed: a VM's serial console, a container's
    /// log (the last MiB), through the control node and its node.
    Logs(lab::LogsArgs),
    /// How many bytes two bootcache images share: extents of the second
    /// whose content (digest) the first holds, which a node holding the first
    /// need not fetch for the second.
    Diff {
        /// The image a node holds (a layer with its parents).
        old: PathBuf,
        /// The image to compare with it.
        new: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Verify every digest in a bootcache image, and in a layer's parents;
    /// fails naming the first bad extent or parent.
    Check {
        /// The bootcache image.
        image: PathBuf,
        /// No progress bar.
        #[arg(short, long)]
        quiet: bool,
    },
}

impl Cli {
    /// Whether the command only reads files and writes reports or files (no
    /// sockets, no child processes): a broken pipe on stdout may end it.
    pub fn writes_reports_only(&self) -> bool {
        !matches!(
            self.command,
            Command::Record(_)
                | Command::Store(_)
                | Command::Node(_)
                | Command::Boot(_)
                | Command::Control(_)
                | Command::Agent(_)
                | Command::Deploy(_)
                | Command::Inspect(_)
                | Command::Destroy(_)
                | Command::Exec(_)
                | Command::Logs(_)
                | Command::Push(_)
                | Command::Pull(_)
        )
    }
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Record(args) => record::record(&args),
        Command::Seed(args) => record::seed(&args),
        Command::Push(args) => registry::push(&args),
        Command::Pull(args) => registry::pull(&args),
        Command::Trace(t) => trace::run(t),
        Command::Analyze { traces, compare, json, plot } => {
            if traces.len() == 1 && !compare {
                trace::analyze(Path::new(&traces[0]), json, plot.as_deref())
            } else {
                trace::compare(&traces, json, plot.as_deref())
            }
        }
        Command::Convert(args) => image::convert(&args),
        Command::Export { src, dst, format, quiet } => image::export(&src, &dst, format, quiet),
        Command::Info { image, output } => image::info(&image, output),
        Command::Check { image, quiet } => image::check(&image, quiet),
        Command::Diff { old, new, output } => image::diff(&old, &new, output),
        Command::Store(cmd) => deliver::store(cmd),
        Command::Node(cmd) => deliver::node(cmd),
        Command::Boot(args) => deliver::boot(&args),
        Command::Control(cmd) => control::control(cmd),
        Command::Agent(args) => agent::agent(args),
        Command::Deploy(args) => lab::deploy(args),
        Command::Inspect(args) => lab::inspect(args),
        Command::Destroy(args) => lab::destroy(args),
        Command::Stop(args) => lab::set_running(args, false),
        Command::Start(args) => lab::set_running(args, true),
        Command::Exec(args) => lab::exec(args),
        Command::Logs(args) => lab::logs(args),
    }
}
