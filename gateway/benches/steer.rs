//! `cargo xtask bench steer`, first part: ns/packet of the director under
//! `BPF_PROG_TEST_RUN`, beside the shield of a gateway that does not steer
//! and an empty `XDP_PASS` program built the same way, as ratios. Runs
//! alternate between the programs so drift on a noisy machine hits all
//! alike.
//!
//! * pinned hit: the client is pinned (its first run made the pin); the
//!   program parses, checks, finds the pin and rewrites the frame for
//!   `XDP_TX`, or passes it locally.
//! * miss with insert: a wrapper (`tidegate_bench_miss`) adds one to the
//!   frame's IPv4 source address and tail-calls the real program, so every
//!   run is a client never seen before: lookup miss, Maglev pick, insert
//!   into the LRU map. Twice: into a map with room for every run (a fresh
//!   director per round, sized for the runs), and into a map of the default
//!   size (262,144 pins), full after its first runs, so that each insert
//!   also evicts the least recently used pin. The same wrapper without the
//!   change (`tidegate_bench_next`, a pinned hit) shows what it costs.

#[path = "../tests/support/mod.rs"]
#[expect(
    dead_code,
    reason = "the benchmark uses a few of the frame builders it shares with the packet tests"
)]
mod support;

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, ensure};
use aya::{
    Ebpf,
    maps::ProgramArray,
    programs::{TestRun as _, TestRunOptions, Xdp},
};
use support::frames::*;
use tidegate_common::{
    director::{DEFAULT_TABLE_SIZE, client_hash, table_index},
    wireguard::*,
};
use tidegate_gateway::{
    director::{BackendSpec, DirectorState, maglev},
    xdp::{self, Datapath, DatapathOptions, ServiceTable, director::client_key},
};

/// Repeats per kernel test run: each run has a fixed set-up cost of
/// 15-20 ms, which millions of repeats make negligible.
const REPEAT: u32 = 5_000_000;
/// Alternating runs per program and case; the median is reported.
const ROUNDS: usize = 5;
/// A pinned hit may cost at most this many times the empty program.
const TARGET_RATIO: f64 = 3.0;

const VIP4: &str = "198.51.100.100";
const VIP6: &str = "2001:db8::100";
const PORT: u16 = 51820;
const OWN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x02];
/// Gateways 1 and 3 take clients; this one (2) drains, so every new
/// client is steered away.
const MEMBERS: [u32; 2] = [1, 3];
/// The first client address of the miss runs, 11.0.0.1: the frames never
/// leave the kernel's test run.
const FIRST_MISS: u32 = 0x0b00_0001;

fn main() -> Result<()> {
    let mut shield = Datapath::load().context("loading the shield (are you root?)")?;
    shield.install_services(services()?)?;
    let director = load_director(DatapathOptions::default())?;

    let mut baseline = Ebpf::load(xdp::BASELINE_OBJECT)?;
    load(&mut baseline, "tidegate_baseline")?;
    let mut bench = Ebpf::load(xdp::BENCH_OBJECT)?;
    for name in ["tidegate_bench_next", "tidegate_bench_miss"] {
        load(&mut bench, name)?;
    }
    let mut next: ProgramArray<_> = bench.take_map("NEXT").context("no NEXT map")?.try_into()?;
    next.set(0, director.director_program()?.fd()?, 0)?;
    let empty = xdp::program(&baseline, "tidegate_baseline")?;
    let shield_prog = shield.program()?;
    let director_prog = director.director_program()?;
    let wrapped = xdp::program(&bench, "tidegate_bench_next")?;
    let miss = xdp::program(&bench, "tidegate_bench_miss")?;

    let client4 = |want: u32| client_for(want, "203.0.113.7");
    let v4 = |client: SocketAddr, len| frame(client, VIP4, wg(MESSAGE_TRANSPORT, len));
    let remote = client4(1);
    let remote6 = client_for(3, "2001:db8:1::7");
    let cases: Vec<(&str, &Xdp, Vec<u8>)> = vec![
        ("shield, ipv4 transport 128 B", shield_prog, v4(remote, 128)),
        (
            "shield, ipv4 transport 1440 B",
            shield_prog,
            v4(remote, 1440),
        ),
        (
            "director pinned hit, ipv4 128 B, XDP_TX",
            director_prog,
            v4(remote, 128),
        ),
        (
            "director pinned hit, ipv4 1440 B, XDP_TX",
            director_prog,
            v4(remote, 1440),
        ),
        (
            "director pinned hit, ipv6 128 B, XDP_TX",
            director_prog,
            frame(remote6, VIP6, wg(MESSAGE_TRANSPORT, 128)),
        ),
        (
            "wrapper + director pinned hit, ipv4 128 B",
            wrapped,
            v4(remote, 128),
        ),
    ];

    println!(
        "XDP director vs shield vs empty XDP_PASS program, BPF_PROG_TEST_RUN, \
         {REPEAT} repeats x {ROUNDS} rounds, median\n"
    );
    println!(
        "{:<44} {:>9} {:>9} {:>7}",
        "case", "ns", "empty ns", "ratio"
    );
    let mut worst_hit: f64 = 0.0;
    for (name, program, frame) in &cases {
        let (ns, empty_ns, ratio) = measure(empty, program, frame, |_| frame.clone())?;
        if name.starts_with("director pinned hit") {
            worst_hit = worst_hit.max(ratio);
        }
        println!("{name:<44} {ns:>9.1} {empty_ns:>9.1} {ratio:>7.3}");
    }
    // Each round starts from its own first address, 2^23 apart, so no round
    // meets a client an earlier one pinned.
    let miss_frame = |round: usize| v4_from(FIRST_MISS + (round as u32) * (1 << 23), 40_000);

    // Into a map with room: a fresh director per round, sized for the runs.
    let mut ours = Vec::new();
    let mut base = Vec::new();
    let mut ratios = Vec::new();
    for round in 0..ROUNDS {
        let roomy = load_director(DatapathOptions {
            max_sessions: REPEAT + 65_536,
            ..DatapathOptions::default()
        })?;
        next.set(0, roomy.director_program()?.fd()?, 0)?;
        let e = per_packet(empty, &miss_frame(round))?;
        let o = per_packet(miss, &miss_frame(round))?;
        // The first and the last client of the round are pinned.
        let first = FIRST_MISS + (round as u32) * (1 << 23) + 1;
        for addr in [first, first + REPEAT - 1] {
            let client = SocketAddr::from((std::net::Ipv4Addr::from(addr), 40_000));
            ensure!(
                roomy.session(client)?.is_some(),
                "round {round}: no pin for {client}: the runs were not all new clients"
            );
        }
        ours.push(o);
        base.push(e);
        ratios.push(o / e);
    }
    let (ns, empty_ns, ratio) = (median(&mut ours), median(&mut base), median(&mut ratios));
    println!(
        "{:<44} {ns:>9.1} {empty_ns:>9.1} {ratio:>7.3}",
        "wrapper + miss with insert, room in the map"
    );

    // Into the default map, full after its first runs: each insert evicts.
    next.set(0, director.director_program()?.fd()?, 0)?;
    let (ns, empty_ns, ratio) = measure(empty, miss, &miss_frame(0), miss_frame)?;
    println!(
        "{:<44} {ns:>9.1} {empty_ns:>9.1} {ratio:>7.3}",
        "wrapper + miss with insert, full map (evicts)"
    );
    let pins = director.sessions()?.len();
    ensure!(
        pins > 200_000,
        "the miss runs left only {pins} pins: they were not misses"
    );
    let verdict = if worst_hit <= TARGET_RATIO {
        "met"
    } else {
        "MISSED"
    };
    println!(
        "\nworst pinned-hit ratio {worst_hit:.3}; target <= {TARGET_RATIO}: {verdict} \
         ({pins} pins in the session map after the miss runs)"
    );
    Ok(())
}

/// A director with services on the VIPs, the lease held, and gateways 1
/// and 3 taking the clients (this one, 2, draining).
fn load_director(options: DatapathOptions) -> Result<Datapath> {
    let mut director = Datapath::load_with(options)?;
    director.install_services(services()?)?;
    director.set_vips(&[VIP4.parse()?, VIP6.parse()?])?;
    director.renew_lease(Duration::from_secs(3600), true)?;
    let backend = |gateway_id: u32, local: bool, draining: bool| BackendSpec {
        gateway_id,
        mac: [0x02, 0, 0, 0, 0x0a, gateway_id as u8],
        local,
        draining,
    };
    director.set_director(&DirectorState {
        on: true,
        mac: OWN_MAC,
        backends: vec![
            backend(1, false, false),
            backend(2, true, true),
            backend(3, false, false),
        ],
    })?;
    Ok(director)
}

fn services() -> Result<ServiceTable> {
    Ok(ServiceTable::new([
        format!("{VIP4}:{PORT}").parse()?,
        format!("[{VIP6}]:{PORT}").parse()?,
    ])?)
}

fn load(ebpf: &mut Ebpf, name: &str) -> Result<()> {
    let program: &mut Xdp = ebpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?;
    program.load()?;
    Ok(())
}

/// A 128-byte transport frame from the IPv4 address `addr` (a number).
fn v4_from(addr: u32, port: u16) -> Vec<u8> {
    let client = SocketAddr::from((std::net::Ipv4Addr::from(addr), port));
    frame(client, VIP4, wg(MESSAGE_TRANSPORT, 128))
}

fn frame(client: SocketAddr, vip: &str, payload: Vec<u8>) -> Vec<u8> {
    let mut udp = Udp::new(&client.ip().to_string(), vip, PORT, payload);
    udp.sport = client.port();
    udp.build()
}

/// The first client from `addr` (ports from 40000 on) that the Maglev
/// table of [`MEMBERS`] gives to gateway `want`.
fn client_for(want: u32, addr: &str) -> SocketAddr {
    let table = maglev::build(&MEMBERS, DEFAULT_TABLE_SIZE).expect("a valid table");
    (40_000u16..)
        .map(|port| SocketAddr::new(addr.parse().expect("an address"), port))
        .find(|client| {
            let index = table_index(client_hash(&client_key(*client)), DEFAULT_TABLE_SIZE) as usize;
            u32::from(table[index]) == want
        })
        .expect("some port picks every backend")
}

/// Medians over [`ROUNDS`] of `program` on `frame_of(round)` and of the
/// empty program on `frame`, and of their ratio in each round.
fn measure(
    empty: &Xdp,
    program: &Xdp,
    frame: &[u8],
    frame_of: impl Fn(usize) -> Vec<u8>,
) -> Result<(f64, f64, f64)> {
    let mut ours = Vec::with_capacity(ROUNDS);
    let mut base = Vec::with_capacity(ROUNDS);
    let mut ratios = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let e = per_packet(empty, frame)?;
        let o = per_packet(program, &frame_of(round))?;
        ours.push(o);
        base.push(e);
        ratios.push(o / e);
    }
    Ok((median(&mut ours), median(&mut base), median(&mut ratios)))
}

/// Kernel-measured ns per run of `program` over `frame`.
fn per_packet(program: &Xdp, frame: &[u8]) -> Result<f64> {
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat: REPEAT,
        ..Default::default()
    })?;
    Ok(result.duration.as_secs_f64() * 1e9)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
