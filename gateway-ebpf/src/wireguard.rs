//! WireGuard framing checks on a datagram addressed to a service.

use core::hint::cold_path;

use tidegate_common::{stats::Counter, wireguard::*};

use crate::parse::{Frame, UdpHdr};

const UDP_HDR_LEN: usize = size_of::<UdpHdr>();

/// UDP length fields of the well-formed messages of fixed length.
const INITIATION_UDP_LEN: usize = UDP_HDR_LEN + INITIATION_LEN;
const RESPONSE_UDP_LEN: usize = UDP_HDR_LEN + RESPONSE_LEN;
const COOKIE_REPLY_UDP_LEN: usize = UDP_HDR_LEN + COOKIE_REPLY_LEN;
const TRANSPORT_MIN_UDP_LEN: usize = UDP_HDR_LEN + TRANSPORT_MIN_LEN;

/// Checks the datagram whose UDP header is at `udp_off` and whose UDP length
/// field says `udp_len`, for a frame that may end before the WireGuard header.
#[inline(always)]
pub fn check(frame: &Frame, udp_off: usize, udp_len: usize) -> Counter {
    let room = frame.len() - udp_off;
    // Bound the header read before using `room`: LLVM drops a later check that it implies, which the verifier needs.
    let Some(header) = frame.ptr_at::<[u8; 4]>(udp_off + UDP_HDR_LEN) else {
        return if udp_len < UDP_HDR_LEN || udp_len > room {
            Counter::Truncated
        } else {
            Counter::BadLength
        };
    };
    // SAFETY: checked by `ptr_at`; a byte array has no alignment.
    classify(udp_len, u32::from_le_bytes(unsafe { *header }), room)
}

/// The verdict on a datagram with UDP length field `udp_len` whose first
/// payload word (type and three reserved bytes, little-endian: type in the
/// low byte) is `word`; `room` is what the frame holds from the UDP header on.
/// Checks, in order: length field against the frame, type, exact length for
/// the type, reserved bytes.
#[inline(always)]
pub fn classify(udp_len: usize, word: u32, room: usize) -> Counter {
    // Well-formed messages first: a word equal to the type has zero reserved bytes.
    match word {
        4 if udp_len >= TRANSPORT_MIN_UDP_LEN
            && (udp_len - TRANSPORT_MIN_UDP_LEN).is_multiple_of(TRANSPORT_STEP)
            && udp_len <= room =>
        {
            return Counter::Transport;
        }
        1 if udp_len == INITIATION_UDP_LEN && room >= INITIATION_UDP_LEN => {
            return Counter::Initiation;
        }
        2 if udp_len == RESPONSE_UDP_LEN && room >= RESPONSE_UDP_LEN => return Counter::Response,
        3 if udp_len == COOKIE_REPLY_UDP_LEN && room >= COOKIE_REPLY_UDP_LEN => {
            return Counter::CookieReply;
        }
        _ => {}
    }
    cold_path();
    if udp_len < UDP_HDR_LEN || udp_len > room {
        return Counter::Truncated;
    }
    let len = udp_len - UDP_HDR_LEN;
    if len < 4 {
        return Counter::BadLength;
    }
    let len_ok = match (word & 0xff) as u8 {
        MESSAGE_INITIATION => len == INITIATION_LEN,
        MESSAGE_RESPONSE => len == RESPONSE_LEN,
        MESSAGE_COOKIE_REPLY => len == COOKIE_REPLY_LEN,
        MESSAGE_TRANSPORT => {
            len >= TRANSPORT_MIN_LEN && (len - TRANSPORT_MIN_LEN).is_multiple_of(TRANSPORT_STEP)
        }
        _ => return Counter::BadType,
    };
    if !len_ok {
        return Counter::BadLength;
    }
    // Room, type and length are right, so the word differs from the type in
    // a reserved byte.
    Counter::BadReserved
}
