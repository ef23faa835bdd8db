//! `cargo xtask bench xdp`: ns/packet of the XDP shield under
//! `BPF_PROG_TEST_RUN`, per message type and for non-service traffic, beside
//! an empty `XDP_PASS` program built the same way, as ratios. Runs alternate
//! between the two programs so drift on a noisy machine hits both alike.

#[path = "../tests/support/mod.rs"]
#[expect(
    dead_code,
    reason = "the benchmark uses a few of the frame builders it shares with the packet tests"
)]
mod support;

use std::time::Duration;

use anyhow::{Context as _, Result};
use aya::programs::{TestRun as _, TestRunOptions, Xdp};
use support::frames::*;
use tidegate_common::wireguard::*;
use tidegate_gateway::xdp::{self, Datapath, ServiceTable};

/// Repeats per kernel test run: each run has a fixed set-up cost of
/// 15-20 ms, which millions of repeats make negligible.
const REPEAT: u32 = 5_000_000;
/// Alternating runs per program and case; the median is reported.
const ROUNDS: usize = 5;
/// The shield may cost at most this many times the empty program.
const TARGET_RATIO: f64 = 1.25;

fn main() -> Result<()> {
    let mut shield = Datapath::load().context("loading the shield (are you root?)")?;
    shield.install_services(ServiceTable::new([
        "198.51.100.1:51820".parse()?,
        "[2001:db8::1]:51820".parse()?,
    ])?)?;
    let mut baseline = aya::Ebpf::load(xdp::BASELINE_OBJECT)?;
    let baseline_prog: &mut Xdp = baseline
        .program_mut("tidegate_baseline")
        .context("no baseline program")?
        .try_into()?;
    baseline_prog.load()?;
    let baseline_prog = xdp::program(&baseline, "tidegate_baseline")?;
    let shield_prog = shield.program()?;

    let v4 = |payload| Udp::new("203.0.113.7", "198.51.100.1", 51820, payload).build();
    let v6 = |payload| Udp::new("2001:db8:1::7", "2001:db8::1", 51820, payload).build();
    // The fragment rows take the full walk: the target is for the rest.
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "ipv4 initiation",
            v4(wg(MESSAGE_INITIATION, INITIATION_LEN)),
        ),
        ("ipv4 response", v4(wg(MESSAGE_RESPONSE, RESPONSE_LEN))),
        (
            "ipv4 cookie reply",
            v4(wg(MESSAGE_COOKIE_REPLY, COOKIE_REPLY_LEN)),
        ),
        (
            "ipv4 keepalive",
            v4(wg(MESSAGE_TRANSPORT, TRANSPORT_MIN_LEN)),
        ),
        ("ipv4 transport 1440", v4(wg(MESSAGE_TRANSPORT, 1440))),
        (
            "ipv6 initiation",
            v6(wg(MESSAGE_INITIATION, INITIATION_LEN)),
        ),
        ("ipv6 transport 1440", v6(wg(MESSAGE_TRANSPORT, 1440))),
        ("ipv4 bad type (drop)", v4(wg(9, INITIATION_LEN))),
        (
            "ipv6 atomic fragment",
            Udp::new(
                "2001:db8:1::7",
                "2001:db8::1",
                51820,
                wg(MESSAGE_TRANSPORT, 1440),
            )
            .v6_fragment(0)
            .build(),
        ),
        (
            "ipv4 first fragment",
            Udp::new(
                "203.0.113.7",
                "198.51.100.1",
                51820,
                wg(MESSAGE_TRANSPORT, 1440),
            )
            .frag_field(0x2000)
            .build(),
        ),
        (
            "non-service UDP",
            Udp::new("203.0.113.7", "198.51.100.1", 53, vec![0; 64]).build(),
        ),
        (
            "non-service TCP",
            Udp::new("203.0.113.7", "198.51.100.1", 443, vec![0; 64])
                .protocol(IPPROTO_TCP)
                .build(),
        ),
        ("ARP", arp_request([198, 51, 100, 1])),
    ];

    println!(
        "XDP shield vs empty XDP_PASS program, BPF_PROG_TEST_RUN, {REPEAT} repeats x {ROUNDS} rounds, median\n"
    );
    println!(
        "{:<22} {:>10} {:>10} {:>7}",
        "case", "shield ns", "empty ns", "ratio"
    );
    let mut worst: f64 = 0.0;
    for (name, frame) in &cases {
        let mut shield_ns = Vec::with_capacity(ROUNDS);
        let mut empty_ns = Vec::with_capacity(ROUNDS);
        let mut ratios = Vec::with_capacity(ROUNDS);
        for _ in 0..ROUNDS {
            let empty = per_packet(baseline_prog, frame)?;
            let ours = per_packet(shield_prog, frame)?;
            ratios.push(ours / empty);
            shield_ns.push(ours);
            empty_ns.push(empty);
        }
        let ratio = median(&mut ratios);
        if !name.contains("fragment") {
            worst = worst.max(ratio);
        }
        println!(
            "{name:<22} {:>10.1} {:>10.1} {:>7.3}",
            median(&mut shield_ns),
            median(&mut empty_ns),
            ratio
        );
    }
    let verdict = if worst <= TARGET_RATIO {
        "met"
    } else {
        "MISSED"
    };
    println!("\nworst ratio but fragments {worst:.3}; target <= {TARGET_RATIO}: {verdict}");
    Ok(())
}

/// Kernel-measured ns per run of `program` over `frame`.
fn per_packet(program: &Xdp, frame: &[u8]) -> Result<f64> {
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat: REPEAT,
        ..Default::default()
    })?;
    Ok(duration_ns(result.duration))
}

fn duration_ns(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e9
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
