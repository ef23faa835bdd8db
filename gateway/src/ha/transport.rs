//! Where adverts go: a UDP socket bound to the public interface, sending to
//! a multicast group on the segment or to a unicast list of the other
//! gateways (for networks that drop multicast).

use std::{
    ffi::OsString,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd as _,
};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::net::UdpSocket;

/// Where adverts are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// An IPv4 multicast group on the public segment.
    Multicast(Ipv4Addr),
    /// The other gateways' addresses.
    Unicast(Vec<IpAddr>),
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
