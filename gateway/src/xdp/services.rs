//! The service set as the XDP maps hold it: address slots and port masks.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use tidegate_common::service::{MAX_SERVICE_ADDRS, ServiceAddr};

/// Why a list of services cannot be installed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServiceError {
    /// The shield would protect nothing.
    #[error("no services: the shield needs at least one (address, port)")]
    Empty,
    /// Port 0 is not a port a client can send to.
    #[error("service {address}:0: port 0 is not a valid service port")]
    ZeroPort { address: IpAddr },
    /// Unspecified, multicast or broadcast addresses cannot be a service.
    #[error("service {address}: not a unicast address")]
    NotUnicast { address: IpAddr },
    /// The same (address, port) twice.
    #[error("service {service} is listed twice")]
    Duplicate { service: SocketAddr },
    /// More distinct addresses than a port mask has bits.
    #[error("{count} distinct service addresses; the shield holds at most {MAX_SERVICE_ADDRS}")]
    TooManyAddresses { count: usize },
}

/// A validated set of services, laid out for `SERVICE_ADDRS` and `SERVICE_PORTS`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceTable {
    services: Vec<SocketAddr>,
    /// Distinct addresses; the index is the slot.
    addrs: Vec<IpAddr>,
    /// Port -> mask of the slots serving it.
    ports: BTreeMap<u16, u32>,
}

impl ServiceTable {
    /// Validates `services` and assigns address slots in order of first use.
    pub fn new(services: impl IntoIterator<Item = SocketAddr>) -> Result<Self, ServiceError> {
        let mut table = Self::default();
        for service in services {
            let address = canonical(service.ip());
            if service.port() == 0 {
                return Err(ServiceError::ZeroPort { address });
            }
            if !is_unicast(address) {
                return Err(ServiceError::NotUnicast { address });
            }
            let service = SocketAddr::new(address, service.port());
            if table.services.contains(&service) {
                return Err(ServiceError::Duplicate { service });
            }
            let slot = match table.addrs.iter().position(|a| *a == address) {
                Some(slot) => slot,
                None => {
                    table.addrs.push(address);
                    table.addrs.len() - 1
                }
            };
            *table.ports.entry(service.port()).or_default() |= 1 << slot;
            table.services.push(service);
        }
        if table.services.is_empty() {
            return Err(ServiceError::Empty);
        }
        if table.addrs.len() > MAX_SERVICE_ADDRS as usize {
            return Err(ServiceError::TooManyAddresses {
                count: table.addrs.len(),
            });
        }
        Ok(table)
    }

    /// The services, in the order given.
    pub fn services(&self) -> &[SocketAddr] {
        &self.services
    }

    /// `SERVICE_ADDRS` contents: the address of each slot in use.
    pub fn slots(&self) -> impl Iterator<Item = (u32, ServiceAddr)> + '_ {
        (0u32..).zip(self.addrs.iter().map(|addr| service_addr(*addr)))
    }

    /// Number of address slots in use.
    pub fn slot_count(&self) -> u32 {
        self.addrs.len() as u32
    }

    /// `SERVICE_PORTS` contents: every port with a non-zero mask.
    pub fn port_masks(&self) -> impl Iterator<Item = (u16, u32)> + '_ {
        self.ports.iter().map(|(port, mask)| (*port, *mask))
    }

    /// The mask of `port`; zero when no service uses it.
    pub fn port_mask(&self, port: u16) -> u32 {
        self.ports.get(&port).copied().unwrap_or(0)
    }
}

/// IPv4-mapped IPv6 addresses are the IPv4 address they carry: the kernel
/// delivers such packets as IPv4, so that is how the shield must see them.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

fn is_unicast(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast()),
    }
}

/// The map form of an address: IPv6, with IPv4 mapped into it.
pub fn service_addr(address: IpAddr) -> ServiceAddr {
    match address {
        IpAddr::V4(v4) => ServiceAddr::from_v4_octets(v4.octets()),
        IpAddr::V6(v6) => ServiceAddr::from_octets(v6.octets()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_share_slots_and_ports_share_masks() {
        let table = ServiceTable::new([
            sa("198.51.100.1:51820"),
            sa("[2001:db8::1]:51820"),
            sa("198.51.100.1:51821"),
        ])
        .unwrap();
        assert_eq!(table.slot_count(), 2);
        assert_eq!(table.port_mask(51820), 0b11);
        assert_eq!(table.port_mask(51821), 0b01);
        assert_eq!(table.port_mask(53), 0);
        let slots: Vec<_> = table.slots().collect();
        assert_eq!(
            slots[0],
            (0, ServiceAddr::from_v4_octets([198, 51, 100, 1]))
        );
    }

    #[test]
    fn mapped_ipv4_is_the_ipv4_address() {
        let table =
            ServiceTable::new([sa("198.51.100.1:51820"), sa("[::ffff:198.51.100.1]:51820")]);
        assert_eq!(
            table,
            Err(ServiceError::Duplicate {
                service: sa("198.51.100.1:51820")
            })
        );
    }

    #[test]
    fn bad_services_are_refused_by_name() {
        assert_eq!(ServiceTable::new([]), Err(ServiceError::Empty));
        assert_eq!(
            ServiceTable::new([sa("198.51.100.1:0")]),
            Err(ServiceError::ZeroPort {
                address: "198.51.100.1".parse().unwrap()
            })
        );
        for bad in [
            "0.0.0.0:51820",
            "224.0.0.18:51820",
            "[::]:51820",
            "[ff02::1]:51820",
        ] {
            assert!(
                matches!(
                    ServiceTable::new([sa(bad)]),
                    Err(ServiceError::NotUnicast { .. })
                ),
                "{bad}"
            );
        }
        let many = (1..=33).map(|i| SocketAddr::new(IpAddr::from([198, 51, 100, i]), 51820));
        assert_eq!(
            ServiceTable::new(many),
            Err(ServiceError::TooManyAddresses { count: 33 })
        );
    }
}
