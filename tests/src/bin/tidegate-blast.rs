//! `tidegate-blast`: sends WireGuard-shaped UDP datagrams (transport
//! messages of a valid length) to one address as fast as it can, from many
//! source ports, for a bounded time and count; then prints how many it sent
//! as JSON. The load of the steering benchmark: every source port is a
//! client to the director.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::libc;

/// Datagrams handed to the kernel per `sendmmsg` call.
const BATCH: usize = 64;
/// WireGuard transport type.
const MESSAGE_TRANSPORT: u8 = 4;
/// Send buffer of each socket. A datagram counts against its socket until
/// the receiving side frees it, so with the default buffer the receiver's
/// pace would throttle the sender; a client on a real network is not held
/// back by its gateway.
const SEND_BUFFER: usize = 16 << 20;

const USAGE: &str = "usage: tidegate-blast --target ADDR:PORT --seconds S [--sources N] [--len BYTES] [--max-packets N]

Sends WireGuard transport messages of BYTES bytes (a multiple of 16, at
least 32; default 96) to ADDR:PORT from N sockets (default 64), one batch
of 64 per socket in turn, for S seconds or N packets (default 100 million),
whichever comes first. Prints {\"sent\":..,\"seconds\":..} on stdout.";

#[derive(Debug)]
struct Options {
    target: SocketAddr,
    seconds: f64,
    sources: usize,
    len: usize,
    max_packets: u64,
}

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("tidegate-blast: {error:#}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match blast(&options) {
        Ok((sent, elapsed)) => {
            println!(
                "{{\"sent\":{sent},\"seconds\":{:.6}}}",
                elapsed.as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tidegate-blast: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options> {
    let mut target = None;
    let mut seconds = None;
    let mut options = Options {
        target: SocketAddr::from(([0, 0, 0, 0], 0)),
        seconds: 0.0,
        sources: 64,
        len: 96,
        max_packets: 100_000_000,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--target" => target = Some(value()?.parse().context("--target")?),
            "--seconds" => seconds = Some(value()?.parse::<f64>().context("--seconds")?),
            "--sources" => options.sources = value()?.parse().context("--sources")?,
            "--len" => options.len = value()?.parse().context("--len")?,
            "--max-packets" => options.max_packets = value()?.parse().context("--max-packets")?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    options.target = target.context("--target is required")?;
    options.seconds = seconds.context("--seconds is required")?;
    ensure!(
        options.seconds > 0.0 && options.seconds <= 600.0,
        "--seconds must be in (0, 600]"
    );
    ensure!(
        (1..=1024).contains(&options.sources),
        "--sources must be 1 to 1024"
    );
    ensure!(
        options.len >= 32 && options.len.is_multiple_of(16) && options.len <= 1424,
        "--len must be 32 + 16n, at most 1424"
    );
    Ok(options)
}

/// Sends until the time or the count runs out; returns what the kernel
/// took and how long it took.
fn blast(options: &Options) -> Result<(u64, Duration)> {
    let local: SocketAddr = match options.target {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    };
    let sockets = (0..options.sources)
        .map(|_| {
            let socket = UdpSocket::bind(local).context("binding a source socket")?;
            // Beyond the sysctl limit: needs root, as the benchmark runs.
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::SndBufForce,
                &SEND_BUFFER,
            )
            .context("setting the send buffer (SO_SNDBUFFORCE needs root)")?;
            socket
                .connect(options.target)
                .with_context(|| format!("connecting to {}", options.target))?;
            Ok(socket)
        })
        .collect::<Result<Vec<_>>>()?;
    let mut payload = vec![0u8; options.len];
    payload[0] = MESSAGE_TRANSPORT;
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: `mmsghdr` is plain data; all-zero is a valid empty header.
    let mut headers: Vec<libc::mmsghdr> =
        (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
    for header in &mut headers {
        header.msg_hdr.msg_iov = &raw mut iov;
        header.msg_hdr.msg_iovlen = 1;
    }
    let deadline = Duration::from_secs_f64(options.seconds);
    let started = Instant::now();
    let mut sent = 0u64;
    'send: loop {
        for socket in &sockets {
            if started.elapsed() >= deadline || sent >= options.max_packets {
                break 'send;
            }
            // SAFETY: a connected UDP socket; `headers` holds BATCH headers,
            // each pointing at the one iovec over `payload`, all of which
            // outlive the call; the kernel only reads them (and writes
            // `msg_len`).
            let n = unsafe {
                libc::sendmmsg(socket.as_raw_fd(), headers.as_mut_ptr(), BATCH as u32, 0)
            };
            if n < 0 {
                let error = std::io::Error::last_os_error();
                match error.raw_os_error() {
                    // The device queue is full, or the neighbour not yet
                    // resolved: count nothing and go on.
                    Some(libc::ENOBUFS | libc::EAGAIN | libc::ECONNREFUSED) => continue,
                    _ => return Err(error).context("sendmmsg"),
                }
            }
            sent += n as u64;
        }
    }
    Ok((sent, started.elapsed()))
}
