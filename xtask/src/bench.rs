//! Benchmarks. Each prints its figures beside a baseline measured in the same
//! run, as ratios, since this machine is noisy.

use anyhow::Result;
use clap::Subcommand;

use crate::{ebpf, run, setup};

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum Which {
    /// ns/packet of the XDP shield per message type under BPF_PROG_TEST_RUN,
    /// beside an empty XDP_PASS program built the same way.
    Xdp,
    /// Time and WireGuard operations to apply 10,000 peers to a real
    /// wireguard-go device, then a change of 1% of them.
    Reconcile,
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
                .status_ok()
        }
    }
}
