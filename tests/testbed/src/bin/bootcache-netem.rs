//! Delay and loss for one NFQUEUE: each packet is held for `--delay-ms`
//! and then accepted, in arrival order, and `--loss` percent of them are
//! dropped. Used on the testbed's links, where the kernel has no `netem`
//! qdisc: an iptables rule hands a host's incoming packets to the queue.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use nfq::{Queue, Verdict};

#[derive(Debug, Parser)]
#[command(about = "Hold each packet of an NFQUEUE for a fixed delay; drop a share of them")]
struct Args {
    /// The NFQUEUE number.
    #[arg(long)]
    queue: u16,
    /// One-way delay added to every packet, in milliseconds.
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Percent of packets dropped (0-100).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Seed of the loss pattern.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Longest sleep while packets are held: a packet that arrives meanwhile is
/// stamped at most this late.
const TICK: Duration = Duration::from_micros(100);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let delay = Duration::from_secs_f64(args.delay_ms.max(0.0) / 1000.0);
    let drop_below = (args.loss.clamp(0.0, 100.0) / 100.0 * u64::MAX as f64) as u64;
    let mut rng = args.seed.max(1);
    let mut q = Queue::open().context("opening the netfilter queue socket (root needed)")?;
    q.bind(args.queue).with_context(|| format!("binding NFQUEUE {}", args.queue))?;
    q.set_queue_max_len(args.queue, 1 << 16)?;
    // Only verdicts are needed, never the payload: copy nothing.
    q.set_copy_range(args.queue, 0)?;
    // Without loss, whole GSO packets may pass as one message (far fewer
    // messages at 1 Gbit/s); with loss, packets are dropped one wire
    // packet at a time, so the kernel segments them first.
    q.set_recv_gso(args.queue, args.loss <= 0.0)?;
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    loop {
        // Idle: block until a packet comes. Holding packets: take what has
        // arrived without blocking, then release what is due.
        q.set_nonblocking(!held.is_empty());
        loop {
            match q.recv() {
                Ok(mut msg) => {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    if rng < drop_below {
                        msg.set_verdict(Verdict::Drop);
                        q.verdict(msg)?;
                    } else {
                        msg.set_verdict(Verdict::Accept);
                        held.push_back((Instant::now() + delay, msg));
                    }
                    q.set_nonblocking(true);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("receiving from the queue"),
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            let (_, msg) = held.pop_front().expect("checked");
            q.verdict(msg)?;
        }
        if let Some((due, _)) = held.front() {
            std::thread::sleep(due.saturating_duration_since(Instant::now()).min(TICK));
        }
    }
}
