//! Where adverts go: a UDP socket bound to the public interface, sending to
//! a multicast group on the segment or to a unicast list of the other
//! gateways (for networks that drop multicast).

use std::{
    ffi::OsString,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd as _,
};

use ipnet::Ipv4Net;
use nix::{
    ifaddrs::getifaddrs,
    sys::socket::{setsockopt, sockopt},
};
use tokio::net::UdpSocket;
use tracing::warn;

use crate::xdp::AdvertGate;

/// Datagrams from strangers on the segment the shield admits to the advert
/// port per second, per CPU, with multicast adverts: a new gateway's first
/// adverts get through, a flood does not.
pub const STRANGER_RATE: u32 = 1000;

/// The advert socket's receive buffer: room for bursts of endpoint-sharing
/// messages, and for adverts while the agent is briefly busy.
const RECEIVE_BUFFER: usize = 4 << 20;

/// `SO_MEMINFO` and its count of entries (`include/uapi/asm-generic/socket.h`,
/// `linux/sock_diag.h`), which libc does not export for every target.
const SO_MEMINFO: libc::c_int = 55;
const SK_MEMINFO_VARS: usize = 9;

/// Where adverts are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// An IPv4 multicast group on the public segment.
    Multicast(Ipv4Addr),
    /// The other gateways' addresses.
    Unicast(Vec<IpAddr>),
}

impl Destination {
    /// Who may send to the advert `port` on `interface`: with unicast
    /// adverts, the configured gateways; with multicast, the gateways as
    /// they are heard, and strangers on the interface's IPv4 segments within
    /// [`STRANGER_RATE`].
    pub fn gate(&self, port: u16, interface: &str) -> io::Result<AdvertGate> {
        Ok(match self {
            Self::Unicast(peers) => AdvertGate {
                port,
                gateways: peers
                    .iter()
                    .filter_map(|peer| match peer {
                        IpAddr::V4(v4) => Some(*v4),
                        IpAddr::V6(_) => None,
                    })
                    .collect(),
                segment: Vec::new(),
                stranger_rate: 0,
            },
            Self::Multicast(_) => {
                let segment = segments(interface)?;
                if segment.is_empty() {
                    return Err(io::Error::other(format!(
                        "{interface} has no IPv4 address: multicast adverts come from its segment"
                    )));
                }
                AdvertGate {
                    port,
                    gateways: Vec::new(),
                    segment,
                    stranger_rate: STRANGER_RATE,
                }
            }
        })
    }
}

/// The IPv4 networks of `interface`'s addresses.
fn segments(interface: &str) -> io::Result<Vec<Ipv4Net>> {
    let mut networks = Vec::new();
    for ifaddr in getifaddrs()? {
        if ifaddr.interface_name != interface {
            continue;
        }
        let address = ifaddr.address.as_ref().and_then(|a| a.as_sockaddr_in());
        let netmask = ifaddr.netmask.as_ref().and_then(|a| a.as_sockaddr_in());
        if let (Some(address), Some(netmask)) = (address, netmask) {
            let prefix_len = u32::from(netmask.ip()).leading_ones() as u8;
            let network = Ipv4Net::new(address.ip(), prefix_len)
                .map_err(io::Error::other)?
                .trunc();
            if !networks.contains(&network) {
                networks.push(network);
            }
        }
    }
    Ok(networks)
}

/// The advert socket.
#[derive(Debug)]
pub struct Transport {
    socket: UdpSocket,
    to: Vec<SocketAddr>,
    /// Unicast: only these senders are heard.
    from: Option<Vec<IpAddr>>,
}

impl Transport {
    /// Binds UDP `port` on the public interface (`interface`, index
    /// `ifindex`) and, for multicast, joins the group there. Adverts go out
    /// with TTL 255 and are not looped back. Must run inside a tokio runtime.
    pub fn open(
        interface: &str,
        ifindex: u32,
        port: u16,
        destination: &Destination,
    ) -> io::Result<Self> {
        let socket = std::net::UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        setsockopt(&socket, sockopt::BindToDevice, &OsString::from(interface))?;
        setsockopt(&socket, sockopt::Ipv4Ttl, &255)?;
        // Root may go past `net.core.rmem_max`; anyone else gets what it allows.
        if setsockopt(&socket, sockopt::RcvBufForce, &RECEIVE_BUFFER).is_err()
            && let Err(error) = setsockopt(&socket, sockopt::RcvBuf, &RECEIVE_BUFFER)
        {
            warn!(%error, "the advert socket keeps its default receive buffer");
        }
        let (to, from) = match destination {
            Destination::Multicast(group) => {
                join(&socket, *group, ifindex)?;
                setsockopt(&socket, sockopt::IpMulticastTtl, &255)?;
                setsockopt(&socket, sockopt::IpMulticastLoop, &false)?;
                (vec![SocketAddr::new((*group).into(), port)], None)
            }
            Destination::Unicast(peers) => (
                peers.iter().map(|ip| SocketAddr::new(*ip, port)).collect(),
                Some(peers.clone()),
            ),
        };
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket: UdpSocket::from_std(socket)?,
            to,
            from,
        })
    }

    /// Sends one advert to every destination; returns the first error after
    /// trying them all.
    pub async fn send(&self, advert: &[u8]) -> io::Result<()> {
        let mut first_error = None;
        for to in &self.to {
            if let Err(error) = self.socket.send_to(advert, to).await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Datagrams the kernel dropped because the socket's queue was full,
    /// since it was opened: adverts lost before the agent could read them.
    pub fn dropped(&self) -> io::Result<u32> {
        let mut info = [0u32; SK_MEMINFO_VARS];
        let mut len = size_of_val(&info) as libc::socklen_t;
        // SAFETY: `info` is writable for `len` bytes, which the kernel
        // updates to what it wrote.
        let result = unsafe {
            libc::getsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_MEMINFO,
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(info[libc::SK_MEMINFO_DROPS as usize])
    }

    /// Receives one datagram: its length, its sender, and whether the
    /// sender is one the transport listens to (with a unicast list, only
    /// the gateways on it).
    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, bool)> {
        let (len, from) = self.socket.recv_from(buf).await?;
        let known = self
            .from
            .as_ref()
            .is_none_or(|peers| peers.contains(&from.ip()));
        Ok((len, from, known))
    }
}

/// Joins `group` on interface `ifindex` (by index, not by address: the
/// interface may have several addresses, or the VIPs).
fn join(socket: &std::net::UdpSocket, group: Ipv4Addr, ifindex: u32) -> io::Result<()> {
    let request = libc::ip_mreqn {
        imr_multiaddr: libc::in_addr {
            s_addr: u32::from(group).to_be(),
        },
        imr_address: libc::in_addr { s_addr: 0 },
        imr_ifindex: i32::try_from(ifindex).map_err(|_| io::Error::other("ifindex too large"))?,
    };
    for option in [libc::IP_ADD_MEMBERSHIP, libc::IP_MULTICAST_IF] {
        // SAFETY: `request` is a valid ip_mreqn for the length given, and
        // setsockopt only reads it.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                option,
                std::ptr::from_ref(&request).cast(),
                size_of::<libc::ip_mreqn>() as libc::socklen_t,
            )
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
