//! Sending a frame on to another gateway on the same segment: its Ethernet
//! addresses rewritten (to that gateway, from this one), out of the
//! interface it came in on (`XDP_TX`). The director steers with it, and the
//! handover step hands frames of the other gateway's sessions on with it.

use crate::parse::Frame;

/// Rewrites the frame's Ethernet destination to `to` and its source to
/// `from`, each an address in the low six bytes of a little-endian word;
/// the caller then returns `XDP_TX`. False if the frame is shorter than the
/// two addresses, which a parsed frame never is.
#[inline(always)]
pub fn to_gateway(frame: &Frame, to: u64, from: u64) -> bool {
    let Some(eth) = frame.ptr_at::<[u8; 12]>(0) else {
        return false;
    };
    let eth = eth.cast_mut().cast::<u8>();
    // Four stores rather than two six-byte array copies, which compile to
    // memcpy calls. Bytes 0..6 are the destination, 6..12 the source.
    // SAFETY: `ptr_at` checked the twelve bytes lie inside the frame, which
    // XDP may write; the stores are unaligned.
    unsafe {
        eth.cast::<u32>().write_unaligned(to as u32);
        eth.add(4).cast::<u16>().write_unaligned((to >> 32) as u16);
        eth.add(6).cast::<u16>().write_unaligned(from as u16);
        eth.add(8)
            .cast::<u32>()
            .write_unaligned((from >> 16) as u32);
    }
    true
}
