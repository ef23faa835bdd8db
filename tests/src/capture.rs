//! What an interface sends and receives: a packet socket in a namespace,
//! read on a thread of its own, offers every frame to a classifier and
//! keeps what it returns. Bounded in time and count like every loop here.

use std::mem::size_of;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::libc;

use crate::netns::Netns;

/// Bounds on a capture: it stops at whichever comes first.
const MAX_CAPTURE: Duration = Duration::from_secs(600);
const MAX_KEPT: usize = 100_000;

/// One frame as the classifier sees it.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    /// When the socket delivered it.
    pub at: Instant,
    /// Its EtherType, host order (0x0800 IPv4, 0x0806 ARP, 0x86dd IPv6).
    pub protocol: u16,
    /// Sent by the interface (else received).
    pub sent: bool,
    /// The network-layer packet: the IP packet or the ARP message.
    pub packet: &'a [u8],
}

/// A running capture; [`Self::finish`] stops it and returns what it kept.
#[derive(Debug)]
pub struct Capture<T> {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Vec<T>>>>,
}

impl<T: Send + 'static> Capture<T> {
    /// Captures on `ifname` in `netns`, keeping what `keep` returns for
    /// each frame, in order.
    pub fn start<F>(netns: &Netns, ifname: &str, keep: F) -> Result<Self>
    where
        F: FnMut(&Frame<'_>) -> Option<T> + Send + 'static,
    {
        let name = ifname.to_owned();
        let socket = netns.run(move || open(&name))??;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("capture on {ifname}"))
            .spawn(move || read(&socket, &flag, keep))
            .context("starting the capture")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the capture; everything it kept, in order.
    pub fn finish(mut self) -> Result<Vec<T>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(kept)) => kept,
            Some(Err(panic)) => std::panic::resume_unwind(panic),
            None => bail!("the capture was already finished"),
        }
    }
}

impl<T> Drop for Capture<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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

fn read<T, F>(socket: &OwnedFd, stop: &AtomicBool, mut keep: F) -> Result<Vec<T>>
where
    F: FnMut(&Frame<'_>) -> Option<T>,
{
    let started = Instant::now();
    let mut kept = Vec::new();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_CAPTURE && kept.len() < MAX_KEPT
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
        let frame = Frame {
            at,
            protocol: u16::from_be(from.sll_protocol),
            sent: from.sll_pkttype == libc::PACKET_OUTGOING,
            packet: &buf[..n as usize],
        };
        kept.extend(keep(&frame));
    }
    Ok(kept)
}
