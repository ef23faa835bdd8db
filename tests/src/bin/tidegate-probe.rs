//! `tidegate-probe`: sends a probe to the VIP every interval, a bounded
//! number of times, records which gateway answered each and when, and on
//! the last probe or SIGTERM waits a little for late answers, then prints
//! a JSON [`ProbeSummary`] (and writes it to `--out`). With `--snapshot-ms`
//! it also rewrites `--out` while it probes, with the probes whose answer
//! is no longer due, so a watcher reads the figures as they come.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tidegate_tests::probe::{ProbeRecord, ProbeSummary, parse_reply, probe};

/// Most probes one run may send.
const MAX_COUNT: u64 = 100_000;
/// The shortest interval accepted.
const MIN_INTERVAL: Duration = Duration::from_millis(1);

const USAGE: &str = "usage: tidegate-probe --target ADDR:PORT --count N [--interval-ms 10]
                      [--reply-wait-ms 500] [--out FILE [--snapshot-ms MS]]

Sends N probes to ADDR:PORT, one every interval, and records the answers of
tidegate-echo. Stops after N probes or on SIGTERM/SIGINT, waits up to the
reply wait for answers still due, then prints a JSON summary on one line
(also written to FILE). With --snapshot-ms, FILE is also rewritten every MS
while probing, with the probes sent more than the reply wait ago.";

#[derive(Debug)]
struct Options {
    target: SocketAddr,
    count: u64,
    interval: Duration,
    reply_wait: Duration,
    out: Option<PathBuf>,
    snapshot: Option<Duration>,
}

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("tidegate-probe: {error:#}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tidegate-probe: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options> {
    let mut target = None;
    let mut count = None;
    let mut interval = Duration::from_millis(10);
    let mut reply_wait = Duration::from_millis(500);
    let mut out = None;
    let mut snapshot = None;
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--target" => target = Some(value()?.parse().context("--target")?),
            "--count" => count = Some(value()?.parse::<u64>().context("--count")?),
            "--interval-ms" => {
                interval = Duration::from_millis(value()?.parse().context("--interval-ms")?);
            }
            "--reply-wait-ms" => {
                reply_wait = Duration::from_millis(value()?.parse().context("--reply-wait-ms")?);
            }
            "--out" => out = Some(PathBuf::from(value()?)),
            "--snapshot-ms" => {
                let ms: u64 = value()?.parse().context("--snapshot-ms")?;
                if ms == 0 {
                    bail!("--snapshot-ms must be at least 1");
                }
                snapshot = Some(Duration::from_millis(ms));
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    let count = count.context("--count is required")?;
    if count == 0 || count > MAX_COUNT {
        bail!("--count {count} is outside 1..={MAX_COUNT}");
    }
    if interval < MIN_INTERVAL {
        bail!(
            "--interval-ms must be at least {}",
            MIN_INTERVAL.as_millis()
        );
    }
    if snapshot.is_some() && out.is_none() {
        bail!("--snapshot-ms needs --out");
    }
    Ok(Options {
        target: target.context("--target is required")?,
        count,
        interval,
        reply_wait,
        out,
        snapshot,
    })
}

/// The line the prober writes to stderr once it is ready to probe.
const STARTED: &str = tidegate_tests::probe::STARTED;

fn run(options: &Options) -> Result<()> {
    tidegate_tests::stop::install()?;
    let unspecified: SocketAddr = if options.target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(unspecified).context("binding the probe socket")?;
    // Read by the harness: from here on SIGTERM ends probing with a summary.
    eprintln!("{STARTED} {} every {:?}", options.target, options.interval);
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let start = Instant::now();
    let mut records: Vec<ProbeRecord> = Vec::new();
    let mut buf = [0u8; 64];
    let mut next = start;
    let mut send_errors = 0_u64;
    let mut next_snapshot = options.snapshot.map(|every| start + every);

    // Sending, answers received in between.
    while (records.len() as u64) < options.count && !tidegate_tests::stop::requested() {
        let now = Instant::now();
        if let (Some(at), Some(every), Some(out)) = (next_snapshot, options.snapshot, &options.out)
            && now >= at
        {
            // Only the probes whose answer is no longer due.
            let settled = records
                .iter()
                .take_while(|r| r.sent + options.reply_wait <= now - start)
                .count();
            let summary =
                ProbeSummary::compute(&records[..settled], options.interval, started_unix_ms);
            write_atomically(out, &serde_json::to_string(&summary)?)?;
            next_snapshot = Some(now + every);
        }
        if now >= next {
            let seq = records.len() as u64;
            if socket.send_to(&probe(seq), options.target).is_err() {
                send_errors += 1;
            }
            records.push(ProbeRecord {
                sent: now - start,
                answer: None,
                duplicates: 0,
            });
            next += options.interval;
            if next < now {
                // Fell behind (descheduled): no burst to catch up.
                next = now + options.interval;
            }
            continue;
        }
        receive(
            &socket,
            options.target,
            next - now,
            start,
            &mut records,
            &mut buf,
        )?;
    }

    // Answers still due.
    let deadline = Instant::now() + options.reply_wait;
    loop {
        let now = Instant::now();
        if now >= deadline || records.iter().all(|r| r.answer.is_some()) {
            break;
        }
        receive(
            &socket,
            options.target,
            deadline - now,
            start,
            &mut records,
            &mut buf,
        )?;
    }

    let summary = ProbeSummary::compute(&records, options.interval, started_unix_ms);
    let json = serde_json::to_string(&summary)?;
    if let Some(out) = &options.out {
        write_atomically(out, &json)?;
    }
    println!("{json}");
    if send_errors > 0 {
        eprintln!("tidegate-probe: {send_errors} probes could not be sent");
    }
    Ok(())
}

/// Replaces `path` with `text` at once (a reader never sees half of it).
fn write_atomically(path: &std::path::Path, text: &str) -> Result<()> {
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).with_context(|| format!("writing {}", partial.display()))?;
    std::fs::rename(&partial, path).with_context(|| format!("writing {}", path.display()))
}

/// Waits up to `wait` for one datagram and records it if it is an answer
/// from `target` to a probe sent.
fn receive(
    socket: &UdpSocket,
    target: SocketAddr,
    wait: Duration,
    start: Instant,
    records: &mut [ProbeRecord],
    buf: &mut [u8],
) -> Result<()> {
    socket.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
    match socket.recv_from(buf) {
        Ok((len, from)) => {
            let at = start.elapsed();
            if from != target {
                return Ok(());
            }
            let Some((seq, gateway)) = parse_reply(&buf[..len]) else {
                return Ok(());
            };
            let Some(record) = usize::try_from(seq).ok().and_then(|i| records.get_mut(i)) else {
                return Ok(());
            };
            match record.answer {
                None => record.answer = Some((gateway, at)),
                Some(_) => record.duplicates += 1,
            }
            Ok(())
        }
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::Interrupted
            ) =>
        {
            Ok(())
        }
        Err(error) => Err(error).context("receiving answers"),
    }
}
