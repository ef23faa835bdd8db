//! A deterministic simulation of a location: two to four gateways run the
//! real election ([`Machine`](tidegate_gateway::ha::machine::Machine)) and
//! the real continuity controller
//! ([`Controller`](tidegate_gateway::continuity::Controller)) on a virtual
//! clock, over a segment that loses, delays and partitions their adverts,
//! while their daemons crash and restart, pause and resume, stop, have
//! their wall clocks stepped and receive forged adverts, and (the
//! `rolling_upgrade` mode) are upgraded one at a time from the previous
//! release's advert format. Adverts go
//! through the real wire format, HMAC and replay guard. After every step
//! the invariants of [`invariants`] are checked.
//!
//! | module | what |
//! |---|---|
//! | [`scenario`] | what a seed makes: the location and its script of faults |
//! | [`host`] | one gateway: its HA agent's loop, as `gateway/src/ha/agent.rs`, and its kernel |
//! | [`network`] | the segment |
//! | [`forge`] | forged adverts |
//! | [`world`] | the virtual clock and the loop |
//! | [`invariants`] | what must hold |
//!
//! Everything follows from the seed, so a failing seed replays exactly;
//! its report prints the command. The default, 1000 seeds per mode, takes
//! about 50 s of CPU in a debug build (the adverts' HMACs most of it),
//! under 30 s on two idle CPUs.
//!
//! | variable | what |
//! |---|---|
//! | `TIDEGATE_SIM_SEED=n` | run seed `n` alone, and print its trace (`-- --nocapture`) |
//! | `TIDEGATE_SIM_SEEDS=n` | seeds per mode (default [`DEFAULT_SEEDS`]) |

mod forge;
mod host;
mod invariants;
mod network;
mod scenario;
mod world;

use std::{env, fmt::Write as _, time::Instant};

use scenario::{Mode, Scenario};
use world::{World, millis};

use crate::invariants::Failure;

/// Seeds per mode unless `TIDEGATE_SIM_SEEDS` says otherwise.
const DEFAULT_SEEDS: u64 = 1000;
/// The run stops after this many failing seeds.
const MAX_FAILURES: usize = 3;
/// Lines of trace a failure report ends with.
const TRACE_TAIL: usize = 150;

/// The seeds in active/standby mode.
#[test]
fn active_standby() {
    simulate(Mode::ActiveStandby);
}

/// The seeds in director mode.
#[test]
fn director() {
    simulate(Mode::Director);
}

/// The seeds of a location upgraded from the previous release, one gateway
/// at a time.
#[test]
fn rolling_upgrade() {
    simulate(Mode::RollingUpgrade);
}

/// What the environment asks for.
#[derive(Debug)]
struct Run {
    seeds: Vec<u64>,
    /// One seed, replayed with its trace.
    replay: bool,
}

impl Run {
    fn from_env() -> Self {
        let number = |name: &str| {
            env::var(name).ok().map(|value| {
                value
                    .parse::<u64>()
                    .unwrap_or_else(|_| panic!("{name}: not a number"))
            })
        };
        let seed = number("TIDEGATE_SIM_SEED");
        Self {
            seeds: match seed {
                Some(seed) => vec![seed],
                None => (0..number("TIDEGATE_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS)).collect(),
            },
            replay: seed.is_some(),
        }
    }

    /// The command that runs `seed` of `mode` alone.
    fn replay_command(&self, seed: u64, mode: Mode) -> String {
        format!(
            "TIDEGATE_SIM_SEED={seed} cargo test -p tidegate-gateway --test simulation -- {} --nocapture",
            mode.test_name()
        )
    }
}

/// Runs the seeds of `mode`; fails with a report of each failing seed.
fn simulate(mode: Mode) {
    let run = Run::from_env();
    let started = Instant::now();
    let mut reports = Vec::new();
    let mut ran = 0;
    for &seed in &run.seeds {
        ran += 1;
        let scenario = Scenario::generate(seed, mode);
        let (result, trace) = World::new(&scenario, run.replay).run();
        if run.replay {
            println!("{}", location_and_script(&scenario));
            println!("trace:\n{}", trace.lines().join("\n"));
        }
        if let Err(failure) = result {
            reports.push(report(&scenario, &failure, &run));
            if reports.len() == MAX_FAILURES {
                break;
            }
        }
    }
    eprintln!(
        "simulation ({}): {ran} seeds in {:.1} s",
        mode.test_name(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        reports.is_empty(),
        "{} failing seeds (the run stops at {MAX_FAILURES}):\n\n{}",
        reports.len(),
        reports.join("\n\n")
    );
}

/// What a failing seed did: the failure, the replay command, the location,
/// the script and the end of the trace. The seed runs again with its trace
/// on, which must fail the same way.
fn report(scenario: &Scenario, failure: &Failure, run: &Run) -> String {
    let (again, trace) = World::new(scenario, true).run();
    let mut text = format!(
        "seed {} ({}, {} gateways): invariant {} broken at {:.3} ms:\n  {}\nreplay: {}\n",
        scenario.seed,
        scenario.mode.test_name(),
        scenario.gateways.len(),
        failure.invariant,
        millis(failure.at),
        failure.what,
        run.replay_command(scenario.seed, scenario.mode),
    );
    if again.as_ref().err() != Some(failure) {
        let _ = writeln!(text, "NOT DETERMINISTIC: with the trace on, {again:?}");
    }
    text.push_str(&location_and_script(scenario));
    let lines = trace.lines();
    let tail = lines.len().saturating_sub(TRACE_TAIL);
    let _ = writeln!(
        text,
        "trace (the last {} of {} lines):",
        lines.len() - tail,
        lines.len()
    );
    text.push_str(&lines[tail..].join("\n"));
    text
}

/// The location and its script, a line each.
fn location_and_script(scenario: &Scenario) -> String {
    let mut text = format!(
        "location: interval {} ms, handover window {} ms, {} clients, addresses {}, settles in {:.0} ms\n",
        scenario.interval.as_millis(),
        scenario.handover_window.as_millis(),
        scenario.clients,
        if scenario.macs_known {
            "known"
        } else {
            "unknown"
        },
        millis(scenario.settle_time()),
    );
    for g in &scenario.gateways {
        let _ = writeln!(
            text,
            "  gateway {:<2} priority {:<3} preempt {:<5} (delay {} ms)",
            g.id,
            g.priority,
            g.preempt,
            g.preempt_delay.as_millis()
        );
    }
    text.push_str("script:\n");
    for (at, fault) in &scenario.script {
        let _ = writeln!(
            text,
            "  {:>10.3} ms  {}",
            millis(*at),
            scenario.describe(*fault)
        );
    }
    text
}
