//! A UDP flood from a namespace at the highest rate this machine reaches:
//! several threads, each sending batches with `sendmmsg` from a socket made
//! in the namespace, round the targets and payloads. Bounded in time and in
//! batches.

use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    os::fd::AsRawFd as _,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use nix::sys::socket::{setsockopt, sockopt};

use tidegate_gateway::ha::{
    advert::{Advert, AdvertKey, HEALTH_OK, VERSION},
    machine::Role,
};

use crate::{
    ha::{ADVERT_GROUP, ADVERT_PORT, LOCATION_ID, VIP, gateway_addr},
    netns::Netns,
};

/// Datagrams per `sendmmsg` call.
const BATCH: usize = 64;
/// Batches one thread sends at most: far more than any flood here lasts.
const MAX_BATCHES: u64 = 50_000_000 / BATCH as u64;

/// What to flood with.
#[derive(Debug, Clone)]
pub struct FloodSpec {
    /// Where the datagrams go, in turn.
    pub targets: Vec<SocketAddrV4>,
    /// What they carry, in turn.
    pub payloads: Vec<Vec<u8>>,
    /// The TTL each thread's socket sends with, in turn over the threads.
    pub ttls: Vec<u8>,
    pub threads: usize,
    pub duration: Duration,
}

/// A flood on the HA lab's advert port: to both gateways, the VIP and the
/// advert group; junk, endpoint-shaped junk and a MASTER advert of priority
/// 255 signed with the wrong key; half of the threads with TTL 255, half
/// with 64.
pub fn advert_port_flood(threads: usize, duration: Duration) -> FloodSpec {
    let wrong_key = AdvertKey::new(b"not the location's key at all".to_vec());
    let forged = Advert {
        version: VERSION,
        role: Role::Master,
        priority: 255,
        maintenance: false,
        location_id: LOCATION_ID,
        gateway_id: 9,
        interval: Duration::from_millis(100),
        epoch: 1,
        sequence: 1,
        health: HEALTH_OK,
        handover_to: None,
        draining: false,
        preempt: false,
        mac: [0x02, 0, 0, 0, 0, 9],
        vips: vec![VIP.into()],
    };
    let mut endpoints = b"TGEP".to_vec();
    endpoints.extend([0xa5; 200]);
    FloodSpec {
        targets: [gateway_addr(1), gateway_addr(2), VIP, ADVERT_GROUP]
            .into_iter()
            .map(|ip| SocketAddrV4::new(ip, ADVERT_PORT))
            .collect(),
        payloads: vec![vec![0x5a; 64], endpoints, forged.encode(&wrong_key)],
        ttls: vec![255, 64],
        threads,
        duration,
    }
}

/// A flood under way.
#[derive(Debug)]
pub struct Flood {
    threads: Vec<JoinHandle<Result<u64>>>,
    started: Instant,
}

/// What a flood sent.
#[derive(Debug, Clone, Copy)]
pub struct FloodReport {
    pub sent: u64,
    pub elapsed: Duration,
}

impl FloodReport {
    /// Datagrams per second.
    pub fn rate(&self) -> f64 {
        self.sent as f64 / self.elapsed.as_secs_f64()
    }
}

impl Flood {
    /// Starts flooding from `netns`, sourced from `source`.
    pub fn start(netns: &Netns, source: Ipv4Addr, spec: &FloodSpec) -> Result<Self> {
        anyhow::ensure!(
            !spec.targets.is_empty() && !spec.payloads.is_empty() && !spec.ttls.is_empty(),
            "a flood needs targets, payloads and TTLs"
        );
        let started = Instant::now();
        let mut threads = Vec::with_capacity(spec.threads);
        for n in 0..spec.threads {
            let ttl = spec.ttls[n % spec.ttls.len()];
            let socket = netns.run(|| -> Result<UdpSocket> {
                let socket = UdpSocket::bind((source, 0))?;
                setsockopt(&socket, sockopt::Ipv4Ttl, &i32::from(ttl))?;
                setsockopt(&socket, sockopt::IpMulticastTtl, &ttl)?;
                // The flood must not reach the namespace's own sockets.
                setsockopt(&socket, sockopt::IpMulticastLoop, &false)?;
                socket.set_nonblocking(true)?;
                Ok(socket)
            })??;
            let spec = spec.clone();
            let thread = std::thread::Builder::new()
                .name(format!("flood {n}"))
                .spawn(move || send(&socket, &spec, n))
                .context("spawning a flood thread")?;
            threads.push(thread);
        }
        Ok(Self { threads, started })
    }

    /// Waits for every thread to end; what they sent.
    pub fn finish(self) -> Result<FloodReport> {
        let mut sent = 0;
        for thread in self.threads {
            sent += thread
                .join()
                .map_err(|_| anyhow!("a flood thread panicked"))??;
        }
        Ok(FloodReport {
            sent,
            elapsed: self.started.elapsed(),
        })
    }
}

/// One thread's flood: batches round the targets and payloads, offset by
/// `n`, until the duration is over; how many datagrams the kernel took.
fn send(socket: &UdpSocket, spec: &FloodSpec, n: usize) -> Result<u64> {
    let names: Vec<libc::sockaddr_in> = spec.targets.iter().map(|t| sockaddr(*t)).collect();
    let mut iovecs: Vec<libc::iovec> = (0..BATCH)
        .map(|i| {
            let payload = &spec.payloads[(n + i) % spec.payloads.len()];
            libc::iovec {
                iov_base: payload.as_ptr() as *mut libc::c_void,
                iov_len: payload.len(),
            }
        })
        .collect();
    let mut messages: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|i| {
            let name = &names[(n + i) % names.len()];
            // SAFETY: an all-zero msghdr is valid; the fields set below
            // point into `names` and `iovecs`, which outlive the sends.
            let mut header: libc::msghdr = unsafe { std::mem::zeroed() };
            header.msg_name = std::ptr::from_ref(name).cast_mut().cast();
            header.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
            header.msg_iov = &raw mut iovecs[i];
            header.msg_iovlen = 1;
            libc::mmsghdr {
                msg_hdr: header,
                msg_len: 0,
            }
        })
        .collect();
    let deadline = Instant::now() + spec.duration;
    let mut sent = 0u64;
    for _ in 0..MAX_BATCHES {
        if Instant::now() >= deadline {
            break;
        }
        // SAFETY: `messages` holds BATCH valid headers whose buffers live
        // as long as this loop.
        let result = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                messages.as_mut_ptr(),
                BATCH as libc::c_uint,
                0,
            )
        };
        if result > 0 {
            sent += result as u64;
            continue;
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            // The queue is full or the neighbour not yet resolved: go on.
            Some(libc::EAGAIN | libc::ENOBUFS | libc::EHOSTUNREACH) => {
                std::thread::yield_now();
            }
            _ => return Err(error).context("sendmmsg"),
        }
    }
    Ok(sent)
}

fn sockaddr(target: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: target.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*target.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}
