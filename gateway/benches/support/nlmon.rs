//! Counting generic netlink messages as the kernel sees them: an `nlmon`
//! interface taps every netlink message in the network namespace, and a
//! packet socket on it reads them. Requests (`NLM_F_REQUEST`) count as
//! sent; the kernel's answers (dump parts, acknowledgements) as received.
//! The controller's own messages (family lookups) are left out.

use std::mem::size_of;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

use anyhow::{Context as _, Result, ensure};
use nix::libc;

/// `NETLINK_GENERIC`, as the tap gives it in the frame's protocol.
const NETLINK_GENERIC: u16 = 16;
/// The generic netlink controller's message type.
const GENL_ID_CTRL: u16 = 0x10;
const NLM_F_REQUEST: u16 = 0x1;
/// An `nlmsghdr`: length, type, flags, sequence, port.
const NLMSG_HDRLEN: usize = 16;

/// Generic netlink messages seen since the last [`Tap::drain`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub sent: u64,
    pub received: u64,
}

/// A netlink tap and the packet socket reading it.
#[derive(Debug)]
pub struct Tap {
    socket: OwnedFd,
}

impl Tap {
    /// Creates the `nlmon` interface `name` in this namespace and starts
    /// reading it.
    pub fn open(name: &str) -> Result<Self> {
        for args in [
            ["link", "add", "dev", name, "type", "nlmon"].as_slice(),
            ["link", "set", "dev", name, "up"].as_slice(),
        ] {
            let status = std::process::Command::new("ip").args(args).status()?;
            ensure!(
                status.success(),
                "`ip {}` failed ({status})",
                args.join(" ")
            );
        }
        let index = nix::net::if_::if_nametoindex(name)?;
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                i32::from(protocol),
            )
        };
        ensure!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` was just returned by socket(2) and is owned here alone.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        // Room for every message of the largest step (10,000 peers read or
        // written), read only once the step is over.
        let size: libc::c_int = 256 << 20;
        // SAFETY: SO_RCVBUFFORCE takes an int of the size given.
        let set = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        ensure!(
            set == 0,
            "SO_RCVBUFFORCE: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: an all-zero sockaddr_ll is a valid value of the C struct.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a valid sockaddr_ll and the length is its size.
        let bound = unsafe {
            libc::bind(
                socket.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        ensure!(
            bound == 0,
            "binding to {name}: {}",
            std::io::Error::last_os_error()
        );
        Ok(Self { socket })
    }

    /// Reads every message tapped so far and counts the generic netlink
    /// ones; an error if the socket dropped any.
    pub fn drain(&self) -> Result<Counts> {
        let mut counts = Counts::default();
        let mut frame = vec![0u8; 1 << 20];
        loop {
            // SAFETY: an all-zero sockaddr_ll is a valid value of the C struct.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `frame` and `from` are valid for the lengths given.
            let n = unsafe {
                libc::recvfrom(
                    self.socket.as_raw_fd(),
                    frame.as_mut_ptr().cast(),
                    frame.len(),
                    libc::MSG_TRUNC,
                    (&raw mut from).cast(),
                    &raw mut len,
                )
            };
            if n < 0 {
                let error = std::io::Error::last_os_error();
                if error.raw_os_error() == Some(libc::EAGAIN) {
                    break;
                }
                return Err(error).context("reading the netlink tap");
            }
            let n = n as usize;
            ensure!(n <= frame.len(), "a tapped netlink frame of {n} bytes");
            if u16::from_be(from.sll_protocol) == NETLINK_GENERIC {
                count(&frame[..n], &mut counts);
            }
        }
        ensure!(self.dropped()? == 0, "the netlink tap dropped messages");
        Ok(counts)
    }

    /// Frames the packet socket dropped since it was last asked.
    fn dropped(&self) -> Result<u32> {
        // SAFETY: an all-zero tpacket_stats is a valid value of the C struct.
        let mut stats: libc::tpacket_stats = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::tpacket_stats>() as u32;
        // SAFETY: PACKET_STATISTICS fills a tpacket_stats of the size given.
        let got = unsafe {
            libc::getsockopt(
                self.socket.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                (&raw mut stats).cast(),
                &raw mut len,
            )
        };
        ensure!(
            got == 0,
            "PACKET_STATISTICS: {}",
            std::io::Error::last_os_error()
        );
        Ok(stats.tp_drops)
    }
}

/// Counts the netlink messages in one tapped frame.
fn count(frame: &[u8], counts: &mut Counts) {
    let mut at = 0;
    while at + NLMSG_HDRLEN <= frame.len() {
        let field = |o: usize| [frame[at + o], frame[at + o + 1]];
        let len =
            u32::from_ne_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]]) as usize;
        let kind = u16::from_ne_bytes(field(4));
        let flags = u16::from_ne_bytes(field(6));
        if kind != GENL_ID_CTRL {
            if flags & NLM_F_REQUEST != 0 {
                counts.sent += 1;
            } else {
                counts.received += 1;
            }
        }
        // Messages are aligned to 4 bytes; a bad length ends the frame.
        let step = (len + 3) & !3;
        if step < NLMSG_HDRLEN {
            break;
        }
        at += step;
    }
}
