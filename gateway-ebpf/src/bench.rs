//! Programs for `cargo xtask bench steer`, built as the real one is and
//! never attached to a gateway:
//!
//! * `tidegate_bench_next` and `tidegate_bench_miss` run the real program
//!   (the one user space puts in `NEXT`) through a tail call; `miss` first
//!   adds one to the IPv4 source address of the frame. `BPF_PROG_TEST_RUN`
//!   runs a program many times over the same frame, which keeps the changes,
//!   so every run brings the director a client it has never seen: a miss,
//!   a Maglev pick and an insert. `next` is the same tail call without the
//!   change, to measure what the wrapper costs.
//! * `tidegate_bench_bounce` swaps the Ethernet addresses and returns
//!   `XDP_TX`: the bare bounce the director is compared with.
//! * `tidegate_bench_sink` counts UDP datagrams to port 51820 and drops
//!   them; everything else passes. It receives what the lab's steering
//!   sends.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{PerCpuArray, ProgramArray},
    programs::XdpContext,
};

/// The program the wrappers run: the real one, put here by user space.
#[map]
static NEXT: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Frames the sink counted, per CPU.
#[map]
static SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Offset of the IPv4 source address in an untagged frame.
const V4_SADDR: usize = 14 + 12;
/// The UDP port the sink counts, in wire order read natively.
const WG_PORT_WIRE: u16 = u16::from_ne_bytes(51820u16.to_be_bytes());

/// Runs the real program on the frame as it is.
#[xdp]
pub fn tidegate_bench_next(ctx: XdpContext) -> u32 {
    // SAFETY: a tail call to a program of the same type; it returns only
    // when `NEXT` is empty.
    unsafe { NEXT.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// Makes the frame come from a client never seen before, then runs the
/// real program.
#[xdp]
pub fn tidegate_bench_miss(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + V4_SADDR + 4 > end {
        return xdp_action::XDP_ABORTED;
    }
    let saddr = (start + V4_SADDR) as *mut u32;
    // SAFETY: inside the frame (checked above), which XDP may write;
    // unaligned.
    unsafe {
        let next = u32::from_be(saddr.read_unaligned()).wrapping_add(1);
        saddr.write_unaligned(next.to_be());
    }
    // SAFETY: as in `tidegate_bench_next`.
    unsafe { NEXT.tail_call(&ctx, 0) };
    xdp_action::XDP_ABORTED
}

/// Sends the frame back where it came from.
#[xdp]
pub fn tidegate_bench_bounce(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 12 > end {
        return xdp_action::XDP_ABORTED;
    }
    let eth = start as *mut u8;
    // Word loads and stores, as the director's rewrite: byte arrays would
    // become memcpy calls.
    // SAFETY: the twelve address bytes are inside the frame (checked
    // above), which XDP may write; unaligned.
    unsafe {
        let dst_hi = eth.cast::<u32>().read_unaligned();
        let dst_lo = eth.add(4).cast::<u16>().read_unaligned();
        let src_hi = eth.add(6).cast::<u16>().read_unaligned();
        let src_lo = eth.add(8).cast::<u32>().read_unaligned();
        eth.cast::<u16>().write_unaligned(src_hi);
        eth.add(2).cast::<u32>().write_unaligned(src_lo);
        eth.add(6).cast::<u32>().write_unaligned(dst_hi);
        eth.add(10).cast::<u16>().write_unaligned(dst_lo);
    }
    xdp_action::XDP_TX
}

/// Counts and drops UDP to port 51820 (IPv4, no options); passes the rest.
#[xdp]
pub fn tidegate_bench_sink(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 14 + 20 + 8 > end {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: inside the frame (checked above); unaligned.
    let (ether_type, version_ihl, proto, dport) = unsafe {
        (
            ((start + 12) as *const u16).read_unaligned(),
            *((start + 14) as *const u8),
            *((start + 14 + 9) as *const u8),
            ((start + 14 + 20 + 2) as *const u16).read_unaligned(),
        )
    };
    if ether_type != u16::from_ne_bytes([0x08, 0x00])
        || version_ihl != 0x45
        || proto != 17
        || dport != WG_PORT_WIRE
    {
        return xdp_action::XDP_PASS;
    }
    if let Some(count) = SINK.get_ptr_mut(0) {
        // SAFETY: this CPU's entry; XDP runs with preemption disabled.
        unsafe { *count += 1 };
    }
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // The verifier rejects any path that could reach a panic, so this never runs.
    loop {}
}

/// Matches the real program's licence (tail calls need a GPL caller).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
