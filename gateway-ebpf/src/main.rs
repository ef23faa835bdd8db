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
    // A per-CPU array lookup with an in-range key cannot fail.
    let Some(counters) = stats::this_cpu() else {
        return xdp_action::XDP_ABORTED;
    };
    let frame = parse::Frame::new(&ctx);
    let counter = shield::classify(&frame);
    stats::record(counters, counter, frame.len());
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
