//! `bootcache`: record, analyse and convert VM boot I/O.

mod cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cmd::Cli::parse();
    if cli.writes_reports_only() {
        // `bootcache analyze t | head`: end quietly when the reader goes,
        // as other Unix tools do, instead of failing on every write. Not
        // for the serving commands, whose sockets report EPIPE instead.
        // SAFETY: called before any other thread exists; SIG_DFL is a
        // valid disposition for SIGPIPE.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // netlink-packet-route warns of every attribute newer than itself.
        tracing_subscriber::EnvFilter::new(match cli.verbose {
            0 => "warn,netlink_packet_route=error",
            1 => "info,netlink_packet_route=error",
            _ => "debug",
        })
    });
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
    match cmd::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
