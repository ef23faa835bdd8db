//! A WireGuard client as the data path sees it: its source (address, port).
//! The director's session map and the egress ownership map are keyed by it.

/// A client's address and UDP port. IPv4 addresses are stored IPv4-mapped
/// (`::ffff:a.b.c.d`), so one key type serves both families: no client puts
/// such an address on the wire itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The address, 16 bytes in network order.
    pub addr_be: [u8; 16],
    /// The UDP port, in network order (as read from the UDP header).
    pub port_be: u16,
    pub _pad: u16,
}

const _: () = assert!(size_of::<ClientKey>() == 20);

impl ClientKey {
    /// The prefix of an IPv4-mapped IPv6 address.
    pub const V4_MAPPED: [u8; 12] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff];

    /// The key of an IPv4 client; `addr_be` as in the IPv4 header.
    pub const fn v4(addr_be: [u8; 4], port_be: u16) -> Self {
        let m = Self::V4_MAPPED;
        Self {
            addr_be: [
                m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7], m[8], m[9], m[10], m[11],
                addr_be[0], addr_be[1], addr_be[2], addr_be[3],
            ],
            port_be,
            _pad: 0,
        }
    }

    /// The key of an IPv6 client; `addr_be` as in the IPv6 header.
    pub const fn v6(addr_be: [u8; 16], port_be: u16) -> Self {
        Self {
            addr_be,
            port_be,
            _pad: 0,
        }
    }

    /// The IPv4 address, if the key is IPv4-mapped.
    pub fn v4_addr_be(&self) -> Option<[u8; 4]> {
        let a = &self.addr_be;
        if a[..12] == Self::V4_MAPPED {
            Some([a[12], a[13], a[14], a[15]])
        } else {
            None
        }
    }
}

// SAFETY: `repr(C)`, `Copy`, no padding (size asserted above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for ClientKey {}

#[cfg(test)]
mod tests {
    use super::ClientKey;

    #[test]
    fn v4_round_trips_through_the_mapped_form() {
        let key = ClientKey::v4([198, 51, 100, 7], 51820u16.to_be());
        assert_eq!(key.v4_addr_be(), Some([198, 51, 100, 7]));
        assert_eq!(&key.addr_be[..12], &ClientKey::V4_MAPPED);
        let v6 = ClientKey::v6(
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            1,
        );
        assert_eq!(v6.v4_addr_be(), None);
    }
}
