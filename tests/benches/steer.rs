//! `cargo xtask bench steer`, second part: packets per second steered by
//! the Tidegate director, by a bare `XDP_TX` bounce and by NGINX's UDP
//! stream proxy (`hash $remote_addr consistent`), on the same lab
//! ([`tidegate_tests::steer_lab`]) in one run, and the CPU time each spends
//! per packet on the steering core.
//!
//! Each round runs the three in turn: a 1 s warm-up blast (the director
//! pins its clients, NGINX opens its sessions), then a measured blast. The
//! table shows the median of the rounds; the targets are judged on the
//! median of each round's ratios, since the three of a round run within
//! seconds of each other and the machine's other load drifts more slowly.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use tidegate_tests::require_root;
use tidegate_tests::steer_lab::{LEN, SOURCES, Sample, SteerLab, Steering};

/// Rounds unless `--rounds` says otherwise.
const DEFAULT_ROUNDS: usize = 5;
/// The measured blast.
const BLAST: Duration = Duration::from_secs(5);
/// The blast before it.
const WARM_UP: Duration = Duration::from_secs(1);

/// Targets: the director within 10% of the bounce's rate, at least 3x
/// NGINX's, and at least 6x less CPU per packet than NGINX.
const MAX_BELOW_BOUNCE: f64 = 0.10;
const MIN_OVER_NGINX_RATE: f64 = 3.0;
const MIN_LESS_CPU_THAN_NGINX: f64 = 6.0;

const USAGE: &str = "usage: steer [--rounds N]

Measures packets per second and CPU time per packet of the director, a bare
XDP_TX bounce and NGINX's UDP stream proxy on one namespace lab, N rounds
(default 5), and prints the medians. Needs root, nginx with the stream
module, ethtool and taskset, and the Tidegate binaries in $TIDEGATE_BIN_DIR
(`cargo xtask bench steer` sees to all of them).";

fn main() -> ExitCode {
    let mut rounds = DEFAULT_ROUNDS;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // cargo bench passes this to every bench binary.
            "--bench" => {}
            "--rounds" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) if n > 0 => rounds = n,
                _ => {
                    eprintln!("steer: --rounds needs a positive number\n\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!("steer: unknown argument {other:?}\n\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    match bench(rounds) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("steer: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the rounds and prints the table; false if a target was missed.
fn bench(rounds: usize) -> Result<bool> {
    require_root();
    let mut lab = SteerLab::build().context("building the lab")?;
    println!(
        "steering lab {}: {SOURCES} clients sending {LEN}-byte WireGuard transport messages \
         to the VIP from CPU 0; steering on CPU 1; {rounds} rounds of a {:?} blast after a \
         {:?} warm-up\n",
        lab.run().id(),
        BLAST,
        WARM_UP
    );
    let mut samples: Vec<(Steering, Vec<Sample>)> =
        Steering::ALL.iter().map(|&k| (k, Vec::new())).collect();
    for round in 1..=rounds {
        for (kind, runs) in &mut samples {
            lab.start(*kind)
                .with_context(|| format!("starting the {}", kind.name()))?;
            let sample = lab
                .measure(WARM_UP, BLAST)
                .with_context(|| format!("round {round}, {}", kind.name()))?;
            println!(
                "  round {round}: {:<26} sent {:>9.0}/s steered {:>9.0}/s, steering {:>6.0} ns/packet, CPU 1 busy {:>6.0} ns/packet",
                kind.name(),
                sample.sent_pps,
                sample.steered_pps,
                sample.thread_ns,
                sample.core_ns
            );
            runs.push(sample);
        }
        lab.stop()?;
    }
    let medians: Vec<(Steering, Sample)> = samples
        .iter()
        .map(|(kind, runs)| (*kind, median_sample(runs)))
        .collect();
    let bounce = medians
        .iter()
        .find(|(k, _)| *k == Steering::Bounce)
        .map(|(_, s)| *s)
        .context("the bounce was not measured")?;
    println!(
        "\n{:<26} {:>12} {:>12} {:>10} {:>16} {:>16}",
        "median", "sent pps", "steered pps", "vs bounce", "steering ns/pkt", "CPU 1 busy ns/pkt"
    );
    for (kind, sample) in &medians {
        println!(
            "{:<26} {:>12.0} {:>12.0} {:>10.3} {:>16.0} {:>16.0}",
            kind.name(),
            sample.sent_pps,
            sample.steered_pps,
            sample.steered_pps / bounce.steered_pps,
            sample.thread_ns,
            sample.core_ns
        );
    }
    let paired = |f: fn(&Sample, &Sample, &Sample) -> f64| {
        let mut values: Vec<f64> = (0..rounds)
            .map(|i| f(&samples[0].1[i], &samples[1].1[i], &samples[2].1[i]))
            .collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    // `samples` is in `Steering::ALL` order: bounce, director, NGINX.
    let below_bounce = 1.0 - paired(|b, d, _| d.steered_pps / b.steered_pps);
    let over_nginx = paired(|_, d, n| d.steered_pps / n.steered_pps);
    let less_cpu = paired(|_, d, n| n.thread_ns / d.thread_ns);
    println!(
        "\n{:<26} {:>12} {:>12}",
        "medians of each round's", "rate", "CPU/packet"
    );
    println!(
        "{:<26} {:>12.3} {:>12.3}",
        "director / bounce",
        1.0 - below_bounce,
        paired(|b, d, _| d.thread_ns / b.thread_ns)
    );
    println!(
        "{:<26} {:>12.3} {:>12.3}",
        "director / NGINX",
        over_nginx,
        1.0 / less_cpu
    );
    let check = |ok: bool| if ok { "met" } else { "MISSED" };
    let targets = [
        (
            format!(
                "director {:.1}% {} the bounce (target: within {:.0}%)",
                below_bounce.abs() * 100.0,
                if below_bounce < 0.0 { "above" } else { "below" },
                MAX_BELOW_BOUNCE * 100.0
            ),
            below_bounce <= MAX_BELOW_BOUNCE,
        ),
        (
            format!(
                "director {over_nginx:.2}x NGINX's packet rate (target: at least {MIN_OVER_NGINX_RATE}x)"
            ),
            over_nginx >= MIN_OVER_NGINX_RATE,
        ),
        (
            format!(
                "director {less_cpu:.1}x less CPU per packet than NGINX on the steering core (target: at least {MIN_LESS_CPU_THAN_NGINX}x)"
            ),
            less_cpu >= MIN_LESS_CPU_THAN_NGINX,
        ),
    ];
    println!();
    for (line, ok) in &targets {
        println!("{line}: {}", check(*ok));
    }
    Ok(targets.iter().all(|(_, ok)| *ok))
}

/// The median of each figure over the rounds.
fn median_sample(runs: &[Sample]) -> Sample {
    let median = |f: fn(&Sample) -> f64| {
        let mut values: Vec<f64> = runs.iter().map(f).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    Sample {
        sent_pps: median(|s| s.sent_pps),
        steered_pps: median(|s| s.steered_pps),
        thread_ns: median(|s| s.thread_ns),
        core_ns: median(|s| s.core_ns),
    }
}
