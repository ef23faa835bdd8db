//! Benchmarks. Each prints its figures beside a baseline measured in the same
//! run, as ratios, since this machine is noisy.

use anyhow::Result;
use clap::Subcommand;

use crate::{ebpf, kernels, run, setup, vm};

#[derive(Debug, Clone, Subcommand)]
pub enum Which {
    /// ns/packet of the XDP shield per message type under BPF_PROG_TEST_RUN,
    /// beside an empty XDP_PASS program built the same way.
    Xdp,
    /// Time and WireGuard operations to apply 10,000 peers to a real
    /// wireguard-go device, then a change of 1% of them, then nothing; then
    /// the same on kernel WireGuard in VMs on Debian's kernels, as counts of
    /// operations and netlink messages.
    Reconcile,
    /// Failover of the HA agent beside keepalived (VRRPv3) on the same
    /// two-gateway namespace lab: detection time, probe gap and probes lost
    /// for a crashed master and for a planned failover.
    Failover {
        /// Runs of each scenario.
        #[arg(long, default_value_t = 10)]
        runs: u32,
        /// Measure WireGuard tunnels instead of the VIP: clients probing
        /// through their tunnels, crash and planned failover at 100 ms and
        /// 20 ms adverts, beside keepalived + WireGuard.
        #[arg(long)]
        tunnel: bool,
        /// Run only this scenario (see the benchmark's usage).
        #[arg(long)]
        only: Option<String>,
    },
    /// Whether a loaded master keeps its advert pace: tunnel traffic through
    /// it, reloads of 10,000 peers and status requests for a minute, at
    /// 100 ms and 20 ms adverts; false failovers and the longest gap.
    Adverts,
    /// A flood on the HA advert port from a host on the segment, at 100 ms
    /// and 20 ms adverts: the flood's rate, what the shield dropped, the
    /// master's longest advert gap and false failovers.
    Flood,
    /// Core to gateways: latency from an admin call adding a peer to the
    /// peer being live on all three gateways (1,000 adds), and a full sync
    /// of 10,000 peers to three gateways, beside wireguard-go's own speed.
    Control,
    /// Two Cores on PostgreSQL: from the leader SIGKILLed or SIGSTOPped
    /// to a device create live on every gateway and to an MFA login served
    /// through nginx (min / median / max, targets median < 1 s, max < 2 s);
    /// then admin writes/s and MFA login latency on SQLite beside
    /// PostgreSQL.
    CoreFailover {
        /// Runs of each signal.
        #[arg(long, default_value_t = 10)]
        runs: u32,
    },
    /// The director: ns/packet of a pinned hit and of a miss with insert
    /// under BPF_PROG_TEST_RUN beside the shield and an empty program; then
    /// packets/s and CPU/packet steered through the director, a bare
    /// XDP_TX bounce and NGINX's UDP stream proxy on one namespace lab.
    Steer {
        /// Rounds of the namespace lab.
        #[arg(long, default_value_t = 5)]
        rounds: u32,
    },
}

pub fn run(ws: &run::Workspace, which: Which) -> Result<()> {
    match which {
        Which::Xdp => {
            setup::require_root("`cargo xtask bench xdp` (it loads XDP programs)")?;
            let ebpf = ebpf::build(ws)?;
            run::step("benchmarking the XDP shield (BPF_PROG_TEST_RUN)");
            run::cargo(ws, &ebpf)
                .args(["bench", "--package", "tidegate-gateway", "--bench", "xdp"])
                .status_ok()
        }
        Which::Reconcile => {
            setup::require_root(
                "`cargo xtask bench reconcile` (it starts wireguard-go in a network namespace)",
            )?;
            let ebpf = ebpf::build(ws)?;
            run::step("benchmarking the reconcile path against wireguard-go");
            run::cargo(ws, &ebpf)
                .args([
                    "bench",
                    "--package",
                    "tidegate-gateway",
                    "--bench",
                    "reconcile",
                ])
                .status_ok()?;
            run::step(
                "the same on kernel WireGuard in VMs on Debian's kernels (counts only: emulated CPUs make times meaningless)",
            );
            let binary = bench_binary(ws, &ebpf, "tidegate-gateway", "reconcile")?;
            run::build_user_space(ws, &ebpf, false)?;
            let kernels = kernels::prepare(kernels::SERIES)?;
            let runs = [vm::GuestRun {
                label: "tidegate-gateway/reconcile on kernel WireGuard".into(),
                binary,
                args: vec!["--backend".into(), "kernel".into(), "--counts-only".into()],
                tests: Some(0),
                timeout: vm::BINARY_TIMEOUT,
            }];
            vm::run_in_vms(ws, &kernels, &runs).map(drop)
        }
        Which::Failover { runs, tunnel, only } => {
            setup::require_root(
                "`cargo xtask bench failover` (it builds network namespaces and attaches XDP programs)",
            )?;
            setup::packages()?;
            setup::install_missing(setup::BENCH_PACKAGES)?;
            let ebpf = ebpf::build(ws)?;
            run::build_user_space(ws, &ebpf, true)?;
            run::step(if tunnel {
                "benchmarking failover of WireGuard tunnels: Tidegate beside keepalived + WireGuard"
            } else {
                "benchmarking failover: Tidegate's HA agent beside keepalived"
            });
            let mut args = vec![
                "bench".to_owned(),
                "--package".into(),
                "tidegate-tests".into(),
                "--bench".into(),
                "failover".into(),
                "--".into(),
                "--runs".into(),
                runs.to_string(),
            ];
            if tunnel {
                args.push("--tunnel".into());
            }
            if let Some(only) = only {
                args.extend(["--only".into(), only]);
            }
            run::cargo(ws, &ebpf)
                .args(args)
                .env("TIDEGATE_BIN_DIR", ws.profile_dir(true))
                .status_ok()
        }
        Which::Adverts => {
            setup::require_root(
                "`cargo xtask bench adverts` (it builds network namespaces and attaches XDP programs)",
            )?;
            setup::packages()?;
            let ebpf = ebpf::build(ws)?;
            run::build_user_space(ws, &ebpf, true)?;
            run::step("benchmarking the advert pace of a loaded master");
            run::cargo(ws, &ebpf)
                .args(["bench", "--package", "tidegate-tests", "--bench", "adverts"])
                .env("TIDEGATE_BIN_DIR", ws.profile_dir(true))
                .status_ok()
        }
        Which::Flood => {
            setup::require_root(
                "`cargo xtask bench flood` (it builds network namespaces and attaches XDP programs)",
            )?;
            setup::packages()?;
            let ebpf = ebpf::build(ws)?;
            run::build_user_space(ws, &ebpf, true)?;
            run::step("benchmarking a flood on the advert port");
            run::cargo(ws, &ebpf)
                .args(["bench", "--package", "tidegate-tests", "--bench", "flood"])
                .env("TIDEGATE_BIN_DIR", ws.profile_dir(true))
                .status_ok()
        }
        Which::Control => {
            setup::require_root(
                "`cargo xtask bench control` (it builds network namespaces and attaches XDP programs)",
            )?;
            setup::packages()?;
            let ebpf = ebpf::build(ws)?;
            run::build_user_space(ws, &ebpf, true)?;
            run::step("benchmarking Core's changes to the gateways");
            run::cargo(ws, &ebpf)
                .args(["bench", "--package", "tidegate-tests", "--bench", "control"])
                .env("TIDEGATE_BIN_DIR", ws.profile_dir(true))
                .status_ok()
        }
        Which::CoreFailover { runs } => {
            setup::require_root(
                "`cargo xtask bench core-failover` (it builds network namespaces and attaches XDP programs)",
            )?;
            setup::packages()?;
            let ebpf = ebpf::build(ws)?;
            run::build_user_space(ws, &ebpf, true)?;
            run::step("benchmarking a takeover between two Cores, and SQLite beside PostgreSQL");
            run::cargo(ws, &ebpf)
                .args([
                    "bench",
                    "--package",
                    "tidegate-tests",
                    "--bench",
                    "core_failover",
                    "--",
                    "--runs",
                    &runs.to_string(),
                ])
                .env("TIDEGATE_BIN_DIR", ws.profile_dir(true))
                .status_ok()
        }
        Which::Steer { rounds } => {
            setup::require_root(
                "`cargo xtask bench steer` (it loads XDP programs and builds network namespaces)",
            )?;
            setup::packages()?;
            setup::install_missing(setup::STEER_BENCH_PACKAGES)?;
            let ebpf = ebpf::build(ws)?;
            run::build_user_space(ws, &ebpf, true)?;
            run::step("benchmarking the director under BPF_PROG_TEST_RUN");
            run::cargo(ws, &ebpf)
                .args(["bench", "--package", "tidegate-gateway", "--bench", "steer"])
                .status_ok()?;
            run::step(
                "benchmarking steering on a namespace lab: the director, a bare XDP_TX bounce, NGINX",
            );
            run::cargo(ws, &ebpf)
                .args([
                    "bench",
                    "--package",
                    "tidegate-tests",
                    "--bench",
                    "steer",
                    "--",
                    "--rounds",
                    &rounds.to_string(),
                ])
                .env("TIDEGATE_BIN_DIR", ws.profile_dir(true))
                .status_ok()
        }
    }
}

/// Builds benchmark `bench` of `package` and returns its executable.
fn bench_binary(
    ws: &run::Workspace,
    ebpf: &ebpf::EbpfObjects,
    package: &str,
    bench: &str,
) -> Result<std::path::PathBuf> {
    let out = run::cargo(ws, ebpf)
        .args([
            "bench",
            "--no-run",
            "--message-format=json",
            "--package",
            package,
        ])
        .args(["--bench", bench])
        .output_ok()?;
    out.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|m| m["target"]["name"] == bench && m["executable"].is_string())
        .and_then(|m| m["executable"].as_str().map(std::path::PathBuf::from))
        .ok_or_else(|| anyhow::anyhow!("cargo built no benchmark {bench} in {package}"))
}
