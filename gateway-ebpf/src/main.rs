//! The Tidegate XDP program, attached to each gateway's public interface.
//!
//! It is the WireGuard shield: UDP to a service (address, port) must be
//! well-framed WireGuard or it is dropped; everything else passes untouched.
//! With VIPs configured it is also the VIP fence: once the HA agent's lease
//! lapses, ARP and neighbour solicitations for the VIPs and WireGuard to
//! them are dropped. On the VIP holder in director mode, the program
//! `tidegate_director` takes its place: the same checks, and WireGuard to
//! the VIPs steered, each client to the gateway it is pinned to. Every
//! frame bumps exactly one per-CPU counter naming its outcome. For failover
//! continuity it hands frames of the other gateway's sessions on during a
//! planned handover (`handover`), and a TC program on the interface's
//! egress keeps what the gateway sends to its own clients and from a VIP
//! (`egress`).
#![no_std]
#![no_main]

mod advert;
mod client;
mod continuity_maps;
mod director;
mod egress;
mod fast;
mod fence;
mod forward;
mod handover;
mod maps;
mod parse;
mod shield;
mod stats;
mod udp_wg;
mod wireguard;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use tidegate_common::stats::{Counter, Verdict};

/// Entry point: classify the frame, count it, return its verdict.
#[xdp]
pub fn tidegate(ctx: XdpContext) -> u32 {
    run::<false>(&ctx)
}

/// The entry point in director mode, attached in place of `tidegate` while
/// this gateway is the master: the same, and WireGuard to a VIP steered.
#[xdp]
pub fn tidegate_director(ctx: XdpContext) -> u32 {
    run::<true>(&ctx)
}

/// Classifies the frame, counts it, returns its verdict; with `STEER`, the
/// director steers WireGuard to the VIPs.
#[inline(always)]
fn run<const STEER: bool>(ctx: &XdpContext) -> u32 {
    let frame = parse::Frame::new(ctx);
    let counter = match fast::classify::<STEER>(&frame) {
        Some(counter) => counter,
        None => return walk::<STEER>(frame.start, frame.end),
    };
    count(handover::hook(&frame, counter), frame.len())
}

/// The egress guard on the public interface: WireGuard leaves from a VIP,
/// and only to clients this gateway owns.
#[classifier]
pub fn tidegate_egress(ctx: TcContext) -> i32 {
    egress::guard(&ctx)
}

/// Renews the VIP fence's lease. User space runs it through
/// `BPF_PROG_TEST_RUN` with a `Renewal` as the packet; it is never attached.
#[xdp]
pub fn tidegate_renew(ctx: XdpContext) -> u32 {
    if fence::renew(&parse::Frame::new(&ctx)) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_ABORTED
    }
}

/// The frames the fast path leaves, walked in full. A function of its own:
/// the JIT saves only the registers a function uses, and the walk's would
/// otherwise be saved and restored on every frame.
#[inline(never)]
fn walk<const STEER: bool>(start: usize, end: usize) -> u32 {
    let frame = parse::Frame { start, end };
    count(
        handover::hook(&frame, shield::classify::<STEER>(&frame)),
        frame.len(),
    )
}

/// Counts a frame of `len` bytes under `counter` and returns its verdict.
/// The counters are looked up last, once the frame is classified: the
/// lookup (a helper call to the compiler, inlined by the kernel) then has
/// only the counter and the length to keep across it.
#[inline(always)]
fn count(counter: Counter, len: usize) -> u32 {
    // A per-CPU array lookup with an in-range key cannot fail.
    let Some(counters) = stats::this_cpu() else {
        return xdp_action::XDP_ABORTED;
    };
    stats::record(counters, counter, len);
    match counter.verdict() {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
        Verdict::Aborted => xdp_action::XDP_ABORTED,
        Verdict::Tx => xdp_action::XDP_TX,
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
