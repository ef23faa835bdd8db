//! WireGuard framing checks on a datagram addressed to a service.

use aya_ebpf::programs::XdpContext;
use tidegate_common::{stats::Counter, wireguard::*};

use crate::parse::{UdpHdr, ptr_at};

const UDP_HDR_LEN: usize = size_of::<UdpHdr>();

/// Checks the datagram whose UDP header is at `udp_off` and whose UDP length
/// field says `udp_len`: type, exact length for the type, reserved bytes, in
/// that order. Returns the passed-message counter or the drop reason.
#[inline(always)]
pub fn check(ctx: &XdpContext, udp_off: usize, udp_len: usize) -> Counter {
    let frame_len = ctx.data_end() - ctx.data();
    if udp_len < UDP_HDR_LEN || udp_off + udp_len > frame_len {
        return Counter::Truncated;
    }
    let len = udp_len - UDP_HDR_LEN;
    if len < 4 {
        return Counter::BadLength;
    }
    // Type and three reserved bytes: one little-endian word, type in the low byte.
    let Some(header) = ptr_at::<[u8; 4]>(ctx, udp_off + UDP_HDR_LEN) else {
        // Unreachable: the datagram fits the frame. The verifier needs the check.
        return Counter::Truncated;
    };
    // SAFETY: checked by `ptr_at`; a byte array has no alignment.
    let word = u32::from_le_bytes(unsafe { *header });
    let (counter, len_ok) = match (word & 0xff) as u8 {
        MESSAGE_INITIATION => (Counter::Initiation, len == INITIATION_LEN),
        MESSAGE_RESPONSE => (Counter::Response, len == RESPONSE_LEN),
        MESSAGE_COOKIE_REPLY => (Counter::CookieReply, len == COOKIE_REPLY_LEN),
        MESSAGE_TRANSPORT => (
            Counter::Transport,
            len >= TRANSPORT_MIN_LEN && (len - TRANSPORT_MIN_LEN) % TRANSPORT_STEP == 0,
        ),
        _ => return Counter::BadType,
    };
    if !len_ok {
        return Counter::BadLength;
    }
    if word >> 8 != 0 {
        return Counter::BadReserved;
    }
    counter
}
