//! The set of (address, port) pairs the shield protects.
//!
//! Lookup is two array reads, which the kernel inlines: `SERVICE_PORTS[port]`
//! gives a bitmask of address slots serving that port (zero for almost every
//! port, so non-service traffic leaves after one read), and each set bit names
//! a slot in `SERVICE_ADDRS` to compare with the destination address.

/// Distinct service addresses the shield can hold: the bits of a port mask.
pub const MAX_SERVICE_ADDRS: u32 = u32::BITS;

/// The third 32-bit word of an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`),
/// as it sits in memory in network byte order.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// A service address in `SERVICE_ADDRS`: IPv6, or IPv4 mapped into IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceAddr {
    /// The 16 address bytes in network byte order, read as four words.
    pub addr_be: [u32; 4],
}

const _: () = assert!(size_of::<ServiceAddr>() == 16);

impl ServiceAddr {
    /// The address whose 16 bytes, in network byte order, are `octets`.
    pub const fn from_octets(octets: [u8; 16]) -> Self {
        let o = octets;
        Self {
            addr_be: [
                u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
                u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
                u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
                u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
            ],
        }
    }

    /// The IPv4 address `octets`, mapped into IPv6.
    pub const fn from_v4_octets(octets: [u8; 4]) -> Self {
        Self {
            addr_be: [0, 0, V4_MAPPED_WORD, u32::from_ne_bytes(octets)],
        }
    }

    /// The 16 address bytes in network byte order.
    pub fn octets(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        for (chunk, word) in out.chunks_exact_mut(4).zip(self.addr_be) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        out
    }
}

// SAFETY: `ServiceAddr` is `repr(C)`, `Copy`, and has no padding (size asserted above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for ServiceAddr {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_mapping_matches_the_ipv6_byte_layout() {
        let mapped = ServiceAddr::from_v4_octets([198, 51, 100, 7]);
        let mut octets = [0u8; 16];
        octets[10] = 0xff;
        octets[11] = 0xff;
        octets[12..].copy_from_slice(&[198, 51, 100, 7]);
        assert_eq!(mapped, ServiceAddr::from_octets(octets));
        assert_eq!(mapped.octets(), octets);
    }
}
