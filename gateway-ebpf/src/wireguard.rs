//! WireGuard framing checks on a datagram addressed to a service.

use tidegate_common::{stats::Counter, wireguard::*};

use crate::parse::{Frame, UdpHdr};

const UDP_HDR_LEN: usize = size_of::<UdpHdr>();

/// Checks the datagram whose UDP header is at `udp_off` and whose UDP length
/// field says `udp_len`: type, exact length for the type, reserved bytes, in
/// that order. Returns the passed-message counter or the drop reason.
#[inline(always)]
pub fn check(frame: &Frame, udp_off: usize, udp_len: usize) -> Counter {
    if udp_len < UDP_HDR_LEN {
        return Counter::Truncated;
    }
    let len = udp_len - UDP_HDR_LEN;
    let truncated = frame.start + udp_off + udp_len > frame.end;
    // Bound the header read before using `truncated`: LLVM drops a later check that it implies, which the verifier needs.
    let Some(header) = frame.ptr_at::<[u8; 4]>(udp_off + UDP_HDR_LEN) else {
        return if truncated {
            Counter::Truncated
        } else {
            Counter::BadLength
        };
    };
    if truncated {
        return Counter::Truncated;
    }
    if len < 4 {
        return Counter::BadLength;
    }
    // Type and three reserved bytes: one little-endian word, type in the low byte.
    // SAFETY: checked by `ptr_at`; a byte array has no alignment.
    let word = u32::from_le_bytes(unsafe { *header });
    let (counter, len_ok) = match (word & 0xff) as u8 {
        MESSAGE_INITIATION => (Counter::Initiation, len == INITIATION_LEN),
        MESSAGE_RESPONSE => (Counter::Response, len == RESPONSE_LEN),
        MESSAGE_COOKIE_REPLY => (Counter::CookieReply, len == COOKIE_REPLY_LEN),
        MESSAGE_TRANSPORT => (
            Counter::Transport,
            len >= TRANSPORT_MIN_LEN && (len - TRANSPORT_MIN_LEN).is_multiple_of(TRANSPORT_STEP),
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
