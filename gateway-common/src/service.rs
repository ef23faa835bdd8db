//! The set of (address, port) pairs the shield protects.
//!
//! The port table ([`PortTable`], the program's `SERVICE_PORTS` global)
//! answers in one indexed load, with no helper call: entry
//! [`port_index`]`(port)` holds the first IPv4 and the first IPv6 service
//! address on that port (zero for almost every port, so non-service traffic
//! leaves at once), and masks of further address slots in `SERVICE_V4` /
//! `SERVICE_V6` for the rare port that several addresses of one family share.

/// Service addresses the shield holds per family: the bits of a mask.
pub const MAX_SERVICE_ADDRS: u32 = u32::BITS;

/// Entries in a [`PortTable`]: one per UDP port.
pub const PORTS: usize = 1 << 16;

/// Every port's [`PortEntry`], indexed by [`port_index`]: 2 MiB.
pub type PortTable = [PortEntry; PORTS];

/// Where `port` sits in a [`PortTable`]: its two bytes in wire order, read as
/// a native integer. That is what a 16-bit load from the UDP header gives, so
/// the program indexes the table without swapping bytes.
pub const fn port_index(port: u16) -> usize {
    u16::from_ne_bytes(port.to_be_bytes()) as usize
}

/// A [`PortTable`] entry. The unspecified address (all zero) is never a
/// service, so a zero field means "none". Aligned to 8 so that the program
/// reads `v6_first_be` as two aligned 64-bit words.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortEntry {
    /// The first IPv6 service address on this port, words in network order.
    pub v6_first_be: [u32; 4],
    /// The first IPv4 service address on this port, as in the IPv4 header.
    pub v4_first_be: u32,
    /// Bit `i` set: `SERVICE_V4[i]` also serves this port.
    pub v4_more: u32,
    /// Bit `i` set: `SERVICE_V6[i]` also serves this port.
    pub v6_more: u32,
    /// [`PORT_ADVERTS`] or 0.
    pub flags: u32,
}

/// [`PortEntry::flags`]: HA adverts and endpoint-sharing messages come to
/// this port; the shield checks where they come from (see
/// [`crate::shield`]).
pub const PORT_ADVERTS: u32 = 1;

const _: () = assert!(size_of::<PortEntry>() == 32);
const _: () = assert!(core::mem::offset_of!(PortEntry, v6_first_be) == 0);

impl PortEntry {
    /// No service on this port.
    pub const EMPTY: Self = Self {
        v6_first_be: [0; 4],
        v4_first_be: 0,
        v4_more: 0,
        v6_more: 0,
        flags: 0,
    };
}

/// An IPv6 service address in `SERVICE_V6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceAddrV6 {
    /// The 16 address bytes in network byte order, read as four words.
    pub addr_be: [u32; 4],
}

const _: () = assert!(size_of::<ServiceAddrV6>() == 16);

impl ServiceAddrV6 {
    /// The address whose 16 bytes, in network byte order, are `o`.
    pub const fn from_octets(o: [u8; 16]) -> Self {
        Self {
            addr_be: [
                u32::from_ne_bytes([o[0], o[1], o[2], o[3]]),
                u32::from_ne_bytes([o[4], o[5], o[6], o[7]]),
                u32::from_ne_bytes([o[8], o[9], o[10], o[11]]),
                u32::from_ne_bytes([o[12], o[13], o[14], o[15]]),
            ],
        }
    }
}

/// An IPv4 address as `SERVICE_V4` holds it: the four bytes in network order,
/// read as one word (what a load from the IPv4 header gives).
pub const fn v4_addr_be(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

// SAFETY: `repr(C)`, `Copy`, no padding (size asserted above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for PortEntry {}

// SAFETY: `repr(C)`, `Copy`, no padding (size asserted above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for ServiceAddrV6 {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_hold_the_bytes_in_wire_order() {
        let v6 = ServiceAddrV6::from_octets([
            0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
        ]);
        assert_eq!(v6.addr_be[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(v6.addr_be[3].to_ne_bytes(), [0, 0, 0, 1]);
        assert_eq!(
            v4_addr_be([198, 51, 100, 7]).to_ne_bytes(),
            [198, 51, 100, 7]
        );
    }

    #[test]
    fn the_port_index_is_the_wire_bytes_read_natively() {
        let wire = 51820u16.to_be_bytes();
        assert_eq!(port_index(51820), usize::from(u16::from_ne_bytes(wire)));
        assert_eq!(port_index(0), 0);
        assert_eq!(port_index(u16::MAX), PORTS - 1);
    }
}
