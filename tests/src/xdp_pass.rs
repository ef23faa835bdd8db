//! An empty XDP program (`XDP_PASS`) on the switch's port of a gateway. A
//! veth drops what the other end sends with `XDP_TX` unless this end runs
//! an XDP program too; physical NICs have no such rule. With it, a
//! gateway's XDP program can send frames on to another gateway through the
//! switch (the handover's second chance).

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode},
};

use crate::netns::Netns;

/// The program attached; dropping it detaches it.
pub struct XdpPass {
    _ebpf: Ebpf,
}

impl std::fmt::Debug for XdpPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XdpPass")
    }
}

/// Attaches the empty program to `ifname` in `netns` (driver mode).
pub fn attach(netns: &Netns, ifname: &str) -> Result<XdpPass> {
    netns.run(|| -> Result<XdpPass> {
        let mut ebpf = Ebpf::load(tidegate_gateway::xdp::BASELINE_OBJECT)
            .context("loading the empty XDP program")?;
        let program: &mut Xdp = ebpf
            .program_mut("tidegate_baseline")
            .context("the empty XDP program is missing from its object")?
            .try_into()?;
        program.load()?;
        program
            .attach(ifname, XdpMode::Driver)
            .with_context(|| format!("attaching the empty XDP program to {ifname}"))?;
        Ok(XdpPass { _ebpf: ebpf })
    })?
}
