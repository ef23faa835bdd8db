//! The service set as the XDP maps hold it: address slots and port masks.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use ipnet::Ipv4Net;
use serde::Deserialize;
use tidegate_common::{
    service::{
        MAX_SERVICE_ADDRS, PORT_ADVERTS, PORTS, PortEntry, PortTable, ServiceAddrV6, port_index,
        v4_addr_be,
    },
    shield::{DROP_FRAGMENTS, Shield},
};

/// What the shield does with frames to a service address that it cannot
/// check (`[shield]` in the config file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShieldSettings {
    /// Drop IP fragments to a service address rather than pass them to the
    /// kernel to reassemble (WireGuard then authenticates the datagram).
    /// WireGuard's own packets fit the path MTU and are never fragmented
    /// by a client that has it right; off by default.
    #[serde(default)]
    pub drop_fragments: bool,
}

/// Who may send to the HA advert port (IPv4: the advert socket's family).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvertGate {
    pub port: u16,
    /// The location's gateways known from the start (unicast adverts: the
    /// configured peers). Gateways heard in authenticated adverts are
    /// added as they are heard.
    pub gateways: Vec<Ipv4Addr>,
    /// The segment's prefixes: strangers there are admitted within the
    /// budget (multicast adverts, where a new gateway is heard this way).
    /// Empty: no stranger is.
    pub segment: Vec<Ipv4Net>,
    /// Datagrams from strangers on the segment admitted per second, per CPU.
    pub stranger_rate: u32,
}

impl ShieldSettings {
    /// The program's `SHIELD` global for these settings, with `gate`'s
    /// budget for strangers.
    pub fn global(self, gate: Option<&AdvertGate>) -> Shield {
        Shield {
            flags: if self.drop_fragments {
                DROP_FRAGMENTS
            } else {
                0
            },
            stranger_rate: gate.map_or(0, |gate| gate.stranger_rate),
        }
    }
}

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
    /// More distinct addresses of one family than a port mask has bits.
    #[error(
        "{count} distinct {family} service addresses; the shield holds at most {MAX_SERVICE_ADDRS}"
    )]
    TooManyAddresses { family: &'static str, count: usize },
}

/// A validated set of services, laid out for `SERVICE_V4`, `SERVICE_V6` and
/// the `SERVICE_PORTS` table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceTable {
    services: Vec<SocketAddr>,
    /// Distinct IPv4 addresses; the index is the slot.
    v4: Vec<Ipv4Addr>,
    /// Distinct IPv6 addresses; the index is the slot.
    v6: Vec<Ipv6Addr>,
    /// Port -> its `SERVICE_PORTS` entry.
    ports: BTreeMap<u16, PortEntry>,
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
            match address {
                IpAddr::V4(v4) if !table.v4.contains(&v4) => table.v4.push(v4),
                IpAddr::V6(v6) if !table.v6.contains(&v6) => table.v6.push(v6),
                _ => {}
            }
            table.services.push(service);
        }
        if table.services.is_empty() {
            return Err(ServiceError::Empty);
        }
        for (family, count) in [("IPv4", table.v4.len()), ("IPv6", table.v6.len())] {
            if count > MAX_SERVICE_ADDRS as usize {
                return Err(ServiceError::TooManyAddresses { family, count });
            }
        }
        // The first address of each family on a port goes inline in its
        // entry; further ones are named by their slot bit.
        for service in &table.services {
            let entry = table.ports.entry(service.port()).or_default();
            match service.ip() {
                IpAddr::V4(v4) if entry.v4_first_be == 0 => {
                    entry.v4_first_be = v4_addr_be(v4.octets());
                }
                IpAddr::V4(v4) => entry.v4_more |= 1 << slot_of(&table.v4, &v4),
                IpAddr::V6(v6) if entry.v6_first_be == [0; 4] => {
                    entry.v6_first_be = ServiceAddrV6::from_octets(v6.octets()).addr_be;
                }
                IpAddr::V6(v6) => entry.v6_more |= 1 << slot_of(&table.v6, &v6),
            }
        }
        Ok(table)
    }

    /// The services, in the order given.
    pub fn services(&self) -> &[SocketAddr] {
        &self.services
    }

    /// `SERVICE_V4` contents: each slot in use and its address word.
    pub fn v4_slots(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        (0u32..).zip(self.v4.iter().map(|a| v4_addr_be(a.octets())))
    }

    /// `SERVICE_V6` contents: each slot in use and its address.
    pub fn v6_slots(&self) -> impl Iterator<Item = (u32, ServiceAddrV6)> + '_ {
        (0u32..).zip(
            self.v6
                .iter()
                .map(|a| ServiceAddrV6::from_octets(a.octets())),
        )
    }

    /// Slots in use: (IPv4, IPv6).
    pub fn slot_counts(&self) -> (u32, u32) {
        (self.v4.len() as u32, self.v6.len() as u32)
    }

    /// The ports some service uses.
    pub fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.ports.keys().copied()
    }

    /// The `SERVICE_PORTS` entry of `port`; all zero when no service uses it.
    pub fn port_entry(&self, port: u16) -> PortEntry {
        self.ports.get(&port).copied().unwrap_or_default()
    }

    /// The whole `SERVICE_PORTS` table: each port's entry at
    /// `port_index(port)`, the advert port, if any, flagged.
    pub fn port_table(&self, advert_port: Option<u16>) -> Box<PortTable> {
        let mut table: Box<PortTable> = vec![PortEntry::EMPTY; PORTS]
            .into_boxed_slice()
            .try_into()
            .expect("a vector of PORTS entries");
        for (&port, &entry) in &self.ports {
            table[port_index(port)] = entry;
        }
        if let Some(port) = advert_port {
            table[port_index(port)].flags |= PORT_ADVERTS;
        }
        table
    }
}

fn slot_of<T: PartialEq>(slots: &[T], address: &T) -> usize {
    slots
        .iter()
        .position(|a| a == address)
        .expect("every service address has a slot")
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
        assert_eq!(table.slot_counts(), (1, 1));
        let v4 = v4_addr_be([198, 51, 100, 1]);
        let v6 = ServiceAddrV6::from_octets("2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        let both = table.port_entry(51820);
        assert_eq!((both.v4_first_be, both.v6_first_be), (v4, v6.addr_be));
        assert_eq!((both.v4_more, both.v6_more), (0, 0));
        assert_eq!(table.port_entry(51821).v4_first_be, v4);
        assert_eq!(table.port_entry(51821).v6_first_be, [0; 4]);
        assert_eq!(table.port_entry(53), PortEntry::default());
        assert_eq!(table.ports().collect::<Vec<_>>(), [51820, 51821]);
        let v4: Vec<_> = table.v4_slots().collect();
        assert_eq!(v4, [(0, v4_addr_be([198, 51, 100, 1]))]);
        let whole = table.port_table(None);
        assert_eq!(whole[port_index(51820)], both);
        assert_eq!(whole[port_index(51821)], table.port_entry(51821));
        let used = whole.iter().filter(|e| **e != PortEntry::EMPTY).count();
        assert_eq!(used, 2);
        let gated = table.port_table(Some(51899));
        assert_eq!(gated[port_index(51899)].flags, PORT_ADVERTS);
        assert_eq!(gated[port_index(51820)], both);
    }

    #[test]
    fn further_addresses_on_a_port_go_by_slot() {
        let table = ServiceTable::new([
            sa("198.51.100.1:51820"),
            sa("198.51.100.2:51821"),
            sa("198.51.100.2:51820"),
            sa("198.51.100.3:51820"),
        ])
        .unwrap();
        let entry = table.port_entry(51820);
        assert_eq!(entry.v4_first_be, v4_addr_be([198, 51, 100, 1]));
        assert_eq!(entry.v4_more, 0b110, "slots of .2 and .3");
        let slots: Vec<_> = table.v4_slots().map(|(slot, _)| slot).collect();
        assert_eq!(slots, [0, 1, 2]);
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
            Err(ServiceError::TooManyAddresses {
                family: "IPv4",
                count: 33
            })
        );
    }
}
