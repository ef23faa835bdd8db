//! A UDP header and the first twelve bytes of the WireGuard message after
//! it, read through one bounds check: every WireGuard message is at least
//! that long, and one pointer for all the fields keeps the verifier's view
//! of the bounds (a later, narrower check at a variable offset is dropped
//! by the compiler as implied, and the verifier then rejects the load).

use crate::parse::Frame;

/// UDP header, then the WireGuard type word and two index words.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpWireguard {
    /// Source port, as on the wire.
    pub sport: [u8; 2],
    /// Destination port, as on the wire.
    pub dport: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
    /// The message type and three reserved bytes.
    pub kind: u8,
    pub reserved: [u8; 3],
    /// Bytes 4..8 of the message: the sender index of types 1 and 2, the
    /// receiver index of types 3 and 4.
    pub index_4: [u8; 4],
    /// Bytes 8..12: the receiver index of type 2.
    pub index_8: [u8; 4],
}

impl UdpWireguard {
    /// The header at `udp_off`, if the frame holds all of it.
    #[inline(always)]
    pub fn at(frame: &Frame, udp_off: usize) -> Option<Self> {
        let ptr = frame.ptr_at::<Self>(udp_off)?;
        // SAFETY: checked by `ptr_at`; byte arrays only, read unaligned.
        Some(unsafe { ptr.read_unaligned() })
    }

    /// A port field as a native integer of its wire bytes (what
    /// `ClientKey::port_be` and `Egress::listen_port_be` hold).
    #[inline(always)]
    pub fn port(bytes: [u8; 2]) -> u16 {
        u16::from_ne_bytes(bytes)
    }

    /// An index field as a native integer of its wire bytes (the key of
    /// `OWN_INDICES`).
    #[inline(always)]
    pub fn index(bytes: [u8; 4]) -> u32 {
        u32::from_ne_bytes(bytes)
    }
}
