//! Who starts each WireGuard handshake: a packet socket on a client's
//! interface records every handshake message to or from the location's
//! port, with its direction and the time it was seen. A tunnel resumed by
//! the gateway's kick starts with an initiation the client receives; one
//! resumed by the client's own timer starts with an initiation it sends.

use std::mem::size_of;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::libc;

use crate::netns::Netns;

/// WireGuard's handshake initiation and response.
pub const INITIATION: u8 = 1;
pub const RESPONSE: u8 = 2;

/// Bounds on a watch: it stops at whichever comes first.
const MAX_WATCH: Duration = Duration::from_secs(600);
const MAX_MESSAGES: usize = 100_000;

/// One handshake message seen on the interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeMessage {
    pub at: Instant,
    /// [`INITIATION`] or [`RESPONSE`].
    pub kind: u8,
    /// Sent by the watched side (else received).
    pub sent: bool,
}

/// A running watch; [`Self::finish`] stops it and returns what it saw.
#[derive(Debug)]
pub struct HandshakeWatch {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Vec<HandshakeMessage>>>>,
}

impl HandshakeWatch {
    /// Watches `ifname` in `netns` for handshake messages from or to UDP
    /// port `port` (the location's).
    pub fn start(netns: &Netns, ifname: &str, port: u16) -> Result<Self> {
        let name = ifname.to_owned();
        let socket = netns.run(move || open(&name))??;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("handshakes on {ifname}"))
            .spawn(move || watch(&socket, port, &flag))
            .context("starting the handshake watch")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the watch; every message it saw, in order.
    pub fn finish(mut self) -> Result<Vec<HandshakeMessage>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(messages)) => messages,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => bail!("the watch was already finished"),
        }
    }
}

impl Drop for HandshakeWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Who started the first handshake after `since`: `Some(true)` when the
/// watched side sent that initiation, `Some(false)` when it received it,
/// `None` when no initiation came.
pub fn first_initiation_sent(messages: &[HandshakeMessage], since: Instant) -> Option<bool> {
    messages
        .iter()
        .find(|m| m.at >= since && m.kind == INITIATION)
        .map(|m| m.sent)
}

/// A packet socket bound to `ifname`, receiving every frame it sends and
/// receives as its network-layer packet, waking every 50 ms.
fn open(ifname: &str) -> Result<OwnedFd> {
    let index =
        nix::net::if_::if_nametoindex(ifname).with_context(|| format!("no interface {ifname}"))?;
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(protocol),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a packet socket");
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned here alone.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is a valid value of the plain C struct.
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
    if bound < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("binding a packet socket to {ifname}"));
    }
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval of the size given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as u32,
        )
    };
    if set < 0 {
        return Err(std::io::Error::last_os_error()).context("setting a receive timeout");
    }
    Ok(socket)
}

fn watch(socket: &OwnedFd, port: u16, stop: &AtomicBool) -> Result<Vec<HandshakeMessage>> {
    let started = Instant::now();
    let mut messages = Vec::new();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed)
        && started.elapsed() < MAX_WATCH
        && messages.len() < MAX_MESSAGES
    {
        // SAFETY: an all-zero sockaddr_ll is a valid value of the C struct.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_ll>() as u32;
        // SAFETY: `buf` and `from` are valid for the lengths given.
        let n = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut from).cast(),
                &raw mut len,
            )
        };
        let at = Instant::now();
        if n < 0 {
            let error = std::io::Error::last_os_error();
            match error.raw_os_error() {
                Some(libc::EAGAIN | libc::EINTR) => continue,
                _ => return Err(error).context("reading the packet socket"),
            }
        }
        if let Some(kind) = handshake_kind(&buf[..n as usize], port) {
            messages.push(HandshakeMessage {
                at,
                kind,
                sent: from.sll_pkttype == libc::PACKET_OUTGOING,
            });
        }
    }
    Ok(messages)
}

/// The WireGuard handshake message type of an IPv4 or IPv6 packet from or
/// to UDP `port`, if it is one.
fn handshake_kind(packet: &[u8], port: u16) -> Option<u8> {
    let version = packet.first()? >> 4;
    let (proto, udp) = match version {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let fragment = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x1fff;
            (*packet.get(9)?, (fragment == 0).then_some(ihl)?)
        }
        6 => (*packet.get(6)?, 40),
        _ => return None,
    };
    if proto != 17 {
        return None;
    }
    let sport = u16::from_be_bytes([*packet.get(udp)?, *packet.get(udp + 1)?]);
    let dport = u16::from_be_bytes([*packet.get(udp + 2)?, *packet.get(udp + 3)?]);
    let kind = *packet.get(udp + 8)?;
    (sport == port || dport == port)
        .then_some(kind)
        .filter(|k| *k == INITIATION || *k == RESPONSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_udp(sport: u16, dport: u16, kind: u8) -> Vec<u8> {
        let mut p = vec![0u8; 20 + 8 + 4];
        p[0] = 0x45;
        p[9] = 17;
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[28] = kind;
        p
    }

    #[test]
    fn handshake_messages_are_told_from_the_rest() {
        let cases = [
            ("initiation to the port", v4_udp(40000, 51820, 1), Some(1)),
            ("response from the port", v4_udp(51820, 40000, 2), Some(2)),
            ("transport data", v4_udp(51820, 40000, 4), None),
            ("another port", v4_udp(40000, 51821, 1), None),
            ("truncated", v4_udp(40000, 51820, 1)[..25].to_vec(), None),
        ];
        for (name, packet, expected) in cases {
            assert_eq!(handshake_kind(&packet, 51820), expected, "{name}");
        }
        let mut tcp = v4_udp(40000, 51820, 1);
        tcp[9] = 6;
        assert_eq!(handshake_kind(&tcp, 51820), None);
    }

    #[test]
    fn the_first_initiation_after_a_moment_tells_who_started() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let messages = [
            HandshakeMessage {
                at: at(0),
                kind: INITIATION,
                sent: true,
            },
            HandshakeMessage {
                at: at(10),
                kind: RESPONSE,
                sent: false,
            },
            HandshakeMessage {
                at: at(500),
                kind: INITIATION,
                sent: false,
            },
        ];
        assert_eq!(first_initiation_sent(&messages, at(0)), Some(true));
        assert_eq!(first_initiation_sent(&messages, at(1)), Some(false));
        assert_eq!(first_initiation_sent(&messages, at(501)), None);
    }
}
