//! An XDP program that returns `XDP_PASS` and does nothing else, built exactly
//! as the real one is: the baseline that `cargo xtask bench xdp` divides by.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// Passes every frame.
#[xdp]
pub fn tidegate_baseline(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // Nothing here can panic; the verifier would reject a path that did.
    loop {}
}

/// Matches the real program's licence, so both load the same way.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
