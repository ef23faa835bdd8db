//! Builds Ethernet frames for the packet tests and the benchmark.

use std::net::IpAddr;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_DEST_OPTIONS: u8 = 60;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x07];
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// A WireGuard-shaped payload: `msg_type`, three zero reserved bytes, then
/// filler up to `len` bytes (or just the first `len` bytes of that).
pub fn wg(msg_type: u8, len: usize) -> Vec<u8> {
    let mut payload = vec![msg_type, 0, 0, 0];
    payload.resize(len.max(4), 0xa5);
    payload.truncate(len);
    payload
}

/// A UDP datagram in IPv4 or IPv6 in Ethernet, with knobs for the odd cases.
#[derive(Debug, Clone)]
pub struct Udp {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    /// VLAN tags, outermost first: (TPID, VLAN id).
    pub vlans: Vec<(u16, u16)>,
    /// IPv4 options (a multiple of 4 bytes) or IPv6 hop-by-hop option bytes
    /// (a multiple of 8, less 2).
    pub ip_options: Vec<u8>,
    /// IPv4 flags and fragment offset field, host order.
    pub frag_field: u16,
    /// IPv6: a fragment header before UDP, with this offset and flags
    /// field (host order: offset in 8-byte units << 3, More-fragments 1).
    pub v6_fragment: Option<u16>,
    /// IPv6: this many destination-options headers (8 bytes, a PadN
    /// option each) after any hop-by-hop header.
    pub v6_dest_options: usize,
    /// Override of the UDP length field.
    pub udp_len: Option<u16>,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// IP protocol / next header (UDP unless changed).
    pub protocol: u8,
    /// Bytes appended after the datagram, as Ethernet padding is.
    pub trailer: usize,
    /// Fill in the IPv4 header checksum and the UDP checksum (left zero
    /// otherwise).
    pub checksums: bool,
}

impl Udp {
    pub fn new(src: &str, dst: &str, dport: u16, payload: Vec<u8>) -> Self {
        Self {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport: 40_000,
            dport,
            payload,
            vlans: Vec::new(),
            ip_options: Vec::new(),
            frag_field: 0,
            v6_fragment: None,
            v6_dest_options: 0,
            udp_len: None,
            ttl: 64,
            protocol: IPPROTO_UDP,
            trailer: 0,
            checksums: false,
        }
    }

    pub fn checksums(mut self) -> Self {
        self.checksums = true;
        self
    }

    pub fn sport(mut self, port: u16) -> Self {
        self.sport = port;
        self
    }

    pub fn vlan(mut self, tpid: u16, id: u16) -> Self {
        self.vlans.push((tpid, id));
        self
    }

    pub fn ip_options(mut self, options: Vec<u8>) -> Self {
        self.ip_options = options;
        self
    }

    pub fn frag_field(mut self, field: u16) -> Self {
        self.frag_field = field;
        self
    }

    pub fn v6_fragment(mut self, field: u16) -> Self {
        self.v6_fragment = Some(field);
        self
    }

    pub fn v6_dest_options(mut self, headers: usize) -> Self {
        self.v6_dest_options = headers;
        self
    }

    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    pub fn udp_len(mut self, len: u16) -> Self {
        self.udp_len = Some(len);
        self
    }

    pub fn protocol(mut self, protocol: u8) -> Self {
        self.protocol = protocol;
        self
    }

    pub fn trailer(mut self, bytes: usize) -> Self {
        self.trailer = bytes;
        self
    }

    pub fn build(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        let len = self.udp_len.unwrap_or((8 + self.payload.len()) as u16);
        l4.extend_from_slice(&len.to_be_bytes());
        l4.extend_from_slice(&[0, 0]);
        l4.extend_from_slice(&self.payload);
        if self.checksums {
            let mut pseudo = Vec::new();
            match (self.src, self.dst) {
                (IpAddr::V4(src), IpAddr::V4(dst)) => {
                    pseudo.extend_from_slice(&src.octets());
                    pseudo.extend_from_slice(&dst.octets());
                    pseudo.extend_from_slice(&[0, self.protocol]);
                    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
                }
                (IpAddr::V6(src), IpAddr::V6(dst)) => {
                    pseudo.extend_from_slice(&src.octets());
                    pseudo.extend_from_slice(&dst.octets());
                    pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
                    pseudo.extend_from_slice(&[0, 0, 0, self.protocol]);
                }
                _ => panic!("source and destination must be the same family"),
            }
            pseudo.extend_from_slice(&l4);
            let sum = match internet_checksum(&pseudo) {
                0 => 0xffff,
                sum => sum,
            };
            l4[6..8].copy_from_slice(&sum.to_be_bytes());
        }

        let (ether_type, l3) = match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                assert_eq!(self.ip_options.len() % 4, 0, "IPv4 options come in words");
                let ihl = 5 + self.ip_options.len() / 4;
                let mut ip = vec![(4 << 4) | ihl as u8, 0];
                ip.extend_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
                ip.extend_from_slice(&[0x12, 0x34]);
                ip.extend_from_slice(&self.frag_field.to_be_bytes());
                ip.extend_from_slice(&[self.ttl, self.protocol, 0, 0]);
                ip.extend_from_slice(&src.octets());
                ip.extend_from_slice(&dst.octets());
                ip.extend_from_slice(&self.ip_options);
                if self.checksums {
                    let sum = internet_checksum(&ip);
                    ip[10..12].copy_from_slice(&sum.to_be_bytes());
                }
                ip.extend_from_slice(&l4);
                (ETH_P_IP, ip)
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let mut ext = Vec::new();
                let mut next = self.protocol;
                if let Some(field) = self.v6_fragment {
                    let [hi, lo] = field.to_be_bytes();
                    ext.extend_from_slice(&[next, 0, hi, lo, 0, 0, 0, 1]);
                    next = IPV6_FRAGMENT;
                }
                for _ in 0..self.v6_dest_options {
                    let mut header = vec![next, 0, 1, 4, 0, 0, 0, 0];
                    header.extend_from_slice(&ext);
                    ext = header;
                    next = IPV6_DEST_OPTIONS;
                }
                if !self.ip_options.is_empty() {
                    assert_eq!(
                        (self.ip_options.len() + 2) % 8,
                        0,
                        "IPv6 options fill 8-byte units"
                    );
                    let mut hop = vec![next, ((self.ip_options.len() + 2) / 8 - 1) as u8];
                    hop.extend_from_slice(&self.ip_options);
                    hop.extend_from_slice(&ext);
                    ext = hop;
                    next = IPV6_HOP_BY_HOP;
                }
                let mut ip = vec![0x60, 0, 0, 0];
                ip.extend_from_slice(&((ext.len() + l4.len()) as u16).to_be_bytes());
                ip.extend_from_slice(&[next, self.ttl]);
                ip.extend_from_slice(&src.octets());
                ip.extend_from_slice(&dst.octets());
                ip.extend_from_slice(&ext);
                ip.extend_from_slice(&l4);
                (ETH_P_IPV6, ip)
            }
            _ => panic!("source and destination must be the same family"),
        };
        let mut frame = ethernet(&self.vlans, ether_type, &l3);
        frame.resize(frame.len() + self.trailer, 0);
        frame
    }
}

/// The Internet checksum (RFC 1071) of `bytes`.
pub fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet header (with `vlans` tags) followed by `payload`.
pub fn ethernet(vlans: &[(u16, u16)], ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(22 + payload.len());
    frame.extend_from_slice(&GATEWAY_MAC);
    frame.extend_from_slice(&CLIENT_MAC);
    for (tpid, id) in vlans {
        frame.extend_from_slice(&tpid.to_be_bytes());
        frame.extend_from_slice(&id.to_be_bytes());
    }
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// An ARP request for `target` (IPv4).
pub fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[203, 0, 113, 7]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&target);
    let mut frame = ethernet(&[], ETH_P_ARP, &arp);
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame
}

/// An ICMPv6 neighbour solicitation for `target` from `src`, to the
/// target's solicited-node group (the checksum is left zero: the program
/// does not check it).
pub fn neighbor_solicitation(src: &str, target: &str) -> Vec<u8> {
    let src: std::net::Ipv6Addr = src.parse().expect("an IPv6 address");
    let target: std::net::Ipv6Addr = target.parse().expect("an IPv6 address");
    let t = target.octets();
    let group = [
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
    ];
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&t);
    icmp.extend_from_slice(&[1, 1]);
    icmp.extend_from_slice(&CLIENT_MAC);
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[58, 255]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&group);
    ip.extend_from_slice(&icmp);
    let mut frame = ethernet(&[], ETH_P_IPV6, &ip);
    frame[..6].copy_from_slice(&[0x33, 0x33, 0xff, t[13], t[14], t[15]]);
    frame
}
