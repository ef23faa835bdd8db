//! Bounds-checked header access and the walk from Ethernet to UDP.
//!
//! Header fields are byte arrays, so every header is byte-aligned and reading
//! it from any offset in the frame is sound. The object is built with
//! unaligned loads allowed, so multi-byte fields still load as one word.

use aya_ebpf::programs::XdpContext;
use tidegate_common::stats::Counter;

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_DEST_OPTIONS: u8 = 60;

/// VLAN tags looked through: one for 802.1Q, two for QinQ.
const MAX_VLAN_TAGS: usize = 2;
/// IPv6 extension headers looked through before UDP; a deeper chain is
/// `DeepHeaders`.
const MAX_IPV6_EXT_HEADERS: usize = 4;

/// Ethernet II header.
#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ether_type: [u8; 2],
}

/// 802.1Q / 802.1ad tag, after the outer EtherType.
#[repr(C)]
pub struct VlanHdr {
    pub tci: [u8; 2],
    pub ether_type: [u8; 2],
}

/// IPv4 header without options.
#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
}

/// IPv6 fixed header.
#[repr(C)]
pub struct Ipv6Hdr {
    pub version_class_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// The first two bytes shared by hop-by-hop, routing and destination options
/// headers; the header is `(len + 1) * 8` bytes long.
#[repr(C)]
pub struct Ipv6ExtHdr {
    pub next_header: u8,
    pub len: u8,
}

/// IPv6 fragment header.
#[repr(C)]
pub struct Ipv6FragHdr {
    pub next_header: u8,
    pub reserved: u8,
    /// Fragment offset (13 bits), two reserved bits, More-fragments flag.
    pub offset_flags: [u8; 2],
    pub id: [u8; 4],
}

/// [`Ipv6FragHdr::offset_flags`]: the offset and the More-fragments flag.
const IPV6_FRAGMENT_OFFSET_MORE: u16 = 0xfff9;

/// UDP header.
#[repr(C)]
pub struct UdpHdr {
    pub source: [u8; 2],
    pub dest: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

/// The frame's bounds, read from the context once.
#[derive(Clone, Copy)]
pub struct Frame {
    pub start: usize,
    pub end: usize,
}

impl Frame {
    #[inline(always)]
    pub fn new(ctx: &XdpContext) -> Self {
        Self {
            start: ctx.data(),
            end: ctx.data_end(),
        }
    }

    /// Bytes from the Ethernet header to the end of the frame.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Pointer to a `T` at `offset`, if the whole `T` lies inside the frame.
    #[inline(always)]
    pub fn ptr_at<T>(&self, offset: usize) -> Option<*const T> {
        // Compare pointers (not lengths): the form the verifier learns packet bounds from.
        if self.start + offset + size_of::<T>() > self.end {
            return None;
        }
        Some((self.start + offset) as *const T)
    }
}

/// A UDP header found in the frame, and the destination it names.
pub struct Udp<A> {
    /// Destination address as read from the IP header.
    pub dst: A,
    /// Destination port, host byte order.
    pub port: u16,
    /// The UDP length field: header plus payload, as the sender claims.
    pub udp_len: usize,
    /// Offset of the UDP header from the start of the frame.
    pub udp_off: usize,
}

/// Walks Ethernet and up to two VLAN tags: the EtherType of the payload and
/// its offset.
#[inline(always)]
pub fn ethernet(frame: &Frame) -> Result<(u16, usize), Counter> {
    let eth: *const EthHdr = frame.ptr_at(0).ok_or(Counter::Unparsed)?;
    // SAFETY: `ptr_at` checked the header lies inside the frame; it is byte-aligned.
    let mut ether_type = u16::from_be_bytes(unsafe { (*eth).ether_type });
    let mut off = size_of::<EthHdr>();
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan: *const VlanHdr = frame.ptr_at(off).ok_or(Counter::Unparsed)?;
        // SAFETY: checked by `ptr_at`.
        ether_type = u16::from_be_bytes(unsafe { (*vlan).ether_type });
        off += size_of::<VlanHdr>();
    }
    Ok((ether_type, off))
}

/// The UDP header of an unfragmented IPv4 datagram at `off`; the destination
/// is the address word as it sits in the header (network byte order).
#[inline(always)]
pub fn ipv4_udp(frame: &Frame, off: usize) -> Result<Udp<u32>, Counter> {
    let ip: *const Ipv4Hdr = frame.ptr_at(off).ok_or(Counter::Unparsed)?;
    // SAFETY: checked by `ptr_at`.
    let (version_ihl, protocol, frag_off, daddr) = unsafe {
        (
            (*ip).version_ihl,
            (*ip).protocol,
            (*ip).frag_off,
            (*ip).daddr,
        )
    };
    let ihl = usize::from(version_ihl & 0x0f);
    if version_ihl >> 4 != 4 || ihl < 5 {
        return Err(Counter::Unparsed);
    }
    if protocol != IPPROTO_UDP {
        return Err(Counter::NotService);
    }
    // More-fragments flag or a fragment offset: no whole UDP datagram here.
    if u16::from_be_bytes(frag_off) & 0x3fff != 0 {
        return Err(Counter::Fragment);
    }
    udp(frame, off + ihl * 4, u32::from_ne_bytes(daddr))
}

/// The UDP header of an unfragmented IPv6 datagram at `off`, through up to
/// four hop-by-hop, routing, destination-options or atomic-fragment
/// headers; the destination is a pointer to the address in the frame. A
/// chain that goes on past them is `DeepHeaders`.
#[inline(always)]
pub fn ipv6_udp(frame: &Frame, off: usize) -> Result<Udp<*const [u32; 4]>, Counter> {
    let ip: *const Ipv6Hdr = frame.ptr_at(off).ok_or(Counter::Unparsed)?;
    // SAFETY: checked by `ptr_at`.
    let (version, mut next) = unsafe { ((*ip).version_class_flow[0] >> 4, (*ip).next_header) };
    if version != 6 {
        return Err(Counter::Unparsed);
    }
    // SAFETY: a field of the checked header; only the pointer is computed here.
    let dst = unsafe { &raw const (*ip).daddr }.cast::<[u32; 4]>();
    let mut off = off + size_of::<Ipv6Hdr>();
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_UDP => return udp(frame, off, dst),
            IPV6_FRAGMENT => {
                let frag: *const Ipv6FragHdr = frame.ptr_at(off).ok_or(Counter::Unparsed)?;
                // SAFETY: checked by `ptr_at`.
                let (frag_next, offset_flags) =
                    unsafe { ((*frag).next_header, (*frag).offset_flags) };
                // An atomic fragment (offset 0, no more to come: RFC 6946) is
                // the whole datagram, which the kernel delivers as it is.
                if u16::from_be_bytes(offset_flags) & IPV6_FRAGMENT_OFFSET_MORE != 0 {
                    return Err(Counter::Fragment);
                }
                next = frag_next;
                off += size_of::<Ipv6FragHdr>();
            }
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS => {
                let ext: *const Ipv6ExtHdr = frame.ptr_at(off).ok_or(Counter::Unparsed)?;
                // SAFETY: checked by `ptr_at`.
                let (ext_next, ext_len) = unsafe { ((*ext).next_header, (*ext).len) };
                next = ext_next;
                off += (usize::from(ext_len) + 1) * 8;
            }
            _ => return Err(Counter::NotService),
        }
    }
    match next {
        IPPROTO_UDP => udp(frame, off, dst),
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTIONS | IPV6_FRAGMENT => {
            Err(Counter::DeepHeaders)
        }
        _ => Err(Counter::NotService),
    }
}

/// The destination address of the IPv4 header at `off`, as it sits in the
/// header.
#[inline(always)]
pub fn ipv4_dst(frame: &Frame, off: usize) -> Option<u32> {
    let ip: *const Ipv4Hdr = frame.ptr_at(off)?;
    // SAFETY: checked by `ptr_at`.
    Some(u32::from_ne_bytes(unsafe { (*ip).daddr }))
}

/// The destination address of the IPv6 header at `off`, words in network
/// order.
#[inline(always)]
pub fn ipv6_dst(frame: &Frame, off: usize) -> Option<[u32; 4]> {
    let ip: *const Ipv6Hdr = frame.ptr_at(off)?;
    // SAFETY: checked by `ptr_at`; the address is read unaligned.
    Some(unsafe { (&raw const (*ip).daddr).cast::<[u32; 4]>().read_unaligned() })
}

#[inline(always)]
fn udp<A>(frame: &Frame, off: usize, dst: A) -> Result<Udp<A>, Counter> {
    let udp: *const UdpHdr = frame.ptr_at(off).ok_or(Counter::Unparsed)?;
    // SAFETY: checked by `ptr_at`.
    let (dest, len) = unsafe { ((*udp).dest, (*udp).len) };
    Ok(Udp {
        dst,
        port: u16::from_be_bytes(dest),
        udp_len: usize::from(u16::from_be_bytes(len)),
        udp_off: off,
    })
}
