//! The Tidegate XDP program, attached to each gateway's public interface.
//!
//! Today it is the WireGuard shield: UDP to a service (address, port) must be
//! well-framed WireGuard or it is dropped; everything else passes untouched.
//! Every frame bumps exactly one per-CPU counter naming its outcome.
#![no_std]
#![no_main]

mod maps;
mod parse;
mod shield;
mod stats;
mod wireguard;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use tidegate_common::stats::Verdict;

/// Entry point: classify the frame, count it, return its verdict.
#[xdp]
pub fn tidegate(ctx: XdpContext) -> u32 {
    let counter = shield::classify(&ctx);
    if !stats::record(counter, ctx.data_end() - ctx.data()) {
        return xdp_action::XDP_ABORTED;
    }
    match counter.verdict() {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Aborted => xdp_action::XDP_ABORTED,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any path that could reach a panic, so this never runs.
    loop {}
}

/// Kernel helpers the program calls are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
