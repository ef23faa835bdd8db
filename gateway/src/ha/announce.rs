//! Telling the segment where the VIPs are now: gratuitous ARP for IPv4 and
//! unsolicited neighbour advertisements for IPv6, sent as raw frames through
//! a packet socket. The frame builders are pure and tested byte for byte.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

/// A MAC address.
pub type Mac = [u8; 6];

const ETH_P_ARP: u16 = 0x0806;
const ETH_P_IPV6: u16 = 0x86dd;
/// Ethernet frames shorter than this are padded.
const MIN_FRAME: usize = 60;
const BROADCAST: Mac = [0xff; 6];
/// The all-nodes multicast group ff02::1 and its Ethernet address.
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_NODES_MAC: Mac = [0x33, 0x33, 0, 0, 0, 1];
const ICMPV6: u8 = 58;
const NEIGHBOR_ADVERT: u8 = 136;
/// NA flags: override.
const NA_OVERRIDE: u32 = 0x2000_0000;
/// NDP option: target link-layer address.
const OPT_TARGET_LL: u8 = 2;

/// The frame that announces `vip` at `mac`.
pub fn frame(vip: IpAddr, mac: Mac) -> Vec<u8> {
    match vip {
        IpAddr::V4(v4) => gratuitous_arp(v4, mac),
        IpAddr::V6(v6) => unsolicited_na(v6, mac),
    }
}

/// An ARP request for `vip` from `vip` itself, broadcast: every host
/// that knows `vip` updates its entry to `mac`.
pub fn gratuitous_arp(vip: Ipv4Addr, mac: Mac) -> Vec<u8> {
    let mut f = ethernet(BROADCAST, mac, ETH_P_ARP);
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&1u16.to_be_bytes()); // request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&vip.octets());
    f.resize(MIN_FRAME, 0);
    f
}

/// A neighbour advertisement for `vip` at `mac` to all nodes, with the
/// override flag, so neighbours replace what they had cached.
pub fn unsolicited_na(vip: Ipv6Addr, mac: Mac) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(32);
    icmp.extend_from_slice(&[NEIGHBOR_ADVERT, 0, 0, 0]);
    icmp.extend_from_slice(&NA_OVERRIDE.to_be_bytes());
    icmp.extend_from_slice(&vip.octets());
    icmp.extend_from_slice(&[OPT_TARGET_LL, 1]);
    icmp.extend_from_slice(&mac);
    let sum = icmpv6_checksum(vip, ALL_NODES, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut f = ethernet(ALL_NODES_MAC, mac, ETH_P_IPV6);
    f.extend_from_slice(&0x6000_0000u32.to_be_bytes());
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[ICMPV6, 255]); // neighbour discovery needs hop limit 255
    f.extend_from_slice(&vip.octets());
    f.extend_from_slice(&ALL_NODES.octets());
    f.extend_from_slice(&icmp);
    f
}

fn ethernet(dst: Mac, src: Mac, ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(86);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// The ICMPv6 checksum over the pseudo-header and `icmp` (checksum field
/// zero or already filled: a filled one sums to zero).
fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum += u32::from(word);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(icmp.len() as u32).to_be_bytes());
    add(&[0, 0, 0, ICMPV6]);
    add(icmp);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A packet socket bound to one interface, for sending whole frames.
#[derive(Debug)]
pub struct FrameSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl FrameSocket {
    /// Opens a packet socket that sends on interface `ifindex`.
    pub fn open(ifindex: u32) -> io::Result<Self> {
        let ifindex = i32::try_from(ifindex).map_err(|_| io::Error::other("ifindex too large"))?;
        // SAFETY: socket() takes plain integers and returns a new descriptor
        // or -1; no memory of ours is involved.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                0, // send only: receive nothing
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket() and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, ifindex })
    }

    /// Another handle on the same socket.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
            ifindex: self.ifindex,
        })
    }

    /// Sends one frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = self.ifindex;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `addr` are valid for the lengths given, and
        // sendto only reads them.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: Mac = [0x02, 0, 0x5e, 0, 1, 2];

    #[test]
    fn gratuitous_arp_is_a_broadcast_request_for_itself() {
        let f = gratuitous_arp("198.51.100.100".parse().unwrap(), MAC);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..6], &BROADCAST);
        assert_eq!(&f[6..12], &MAC);
        assert_eq!(&f[12..14], &[0x08, 0x06]);
        #[rustfmt::skip]
        let arp = [
            0, 1, 8, 0, 6, 4, 0, 1,
            0x02, 0, 0x5e, 0, 1, 2, 198, 51, 100, 100,
            0, 0, 0, 0, 0, 0, 198, 51, 100, 100,
        ];
        assert_eq!(&f[14..42], &arp);
        assert!(f[42..].iter().all(|&b| b == 0));
    }

    #[test]
    fn unsolicited_na_overrides_with_the_new_mac() {
        let vip: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let f = unsolicited_na(vip, MAC);
        assert_eq!(f.len(), 14 + 40 + 32);
        assert_eq!(&f[..6], &ALL_NODES_MAC);
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        let ip = &f[14..54];
        assert_eq!(ip[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 32);
        assert_eq!((ip[6], ip[7]), (ICMPV6, 255));
        assert_eq!(&ip[8..24], &vip.octets());
        assert_eq!(&ip[24..40], &ALL_NODES.octets());
        let icmp = &f[54..];
        assert_eq!((icmp[0], icmp[1]), (NEIGHBOR_ADVERT, 0));
        assert_eq!(
            &icmp[4..8],
            &[0x20, 0, 0, 0],
            "override, not solicited, not router"
        );
        assert_eq!(&icmp[8..24], &vip.octets());
        assert_eq!(&icmp[24..32], &[2, 1, 0x02, 0, 0x5e, 0, 1, 2]);
        // A correct checksum makes the sum over everything zero.
        assert_eq!(icmpv6_checksum(vip, ALL_NODES, icmp), 0);
    }

    #[test]
    fn frame_picks_the_family() {
        assert_eq!(
            frame("192.0.2.1".parse().unwrap(), MAC)[12..14],
            [0x08, 0x06]
        );
        assert_eq!(
            frame("2001:db8::1".parse().unwrap(), MAC)[12..14],
            [0x86, 0xdd]
        );
    }
}
