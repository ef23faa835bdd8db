//! `tidegate-echo`: answers each VIP probe with this gateway's id, from the
//! address it is bound to (the VIP), so the prober learns which gateway
//! holds the VIP. It binds with `IP_FREEBIND`, so it may start before the
//! address exists, and it exits by itself after its lifetime.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::socket::{
    AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
};
use tidegate_tests::probe::{parse_probe, reply};

/// How long the echo runs unless told otherwise: a guard against a leaked
/// process, not a test timing.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
/// How often the lifetime is checked while nothing arrives.
const POLL: Duration = Duration::from_millis(200);

const USAGE: &str = "usage: tidegate-echo --bind ADDR:PORT --id GATEWAY_ID [--lifetime-secs N]

Answers every probe (\"TGPR\" + u64 sequence) with \"TGEC\", the sequence
number and GATEWAY_ID, from ADDR:PORT. Exits after N seconds (600).";

#[derive(Debug)]
struct Options {
    bind: SocketAddr,
    id: u32,
    lifetime: Duration,
}

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(error) => {
            eprintln!("tidegate-echo: {error:#}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match serve(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tidegate-echo: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options> {
    let (mut bind, mut id, mut lifetime) = (None, None, DEFAULT_LIFETIME);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--bind" => bind = Some(value()?.parse().context("--bind")?),
            "--id" => id = Some(value()?.parse().context("--id")?),
            "--lifetime-secs" => {
                lifetime = Duration::from_secs(value()?.parse().context("--lifetime-secs")?);
            }
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(Options {
        bind: bind.context("--bind is required")?,
        id: id.context("--id is required")?,
        lifetime,
    })
}

/// A UDP socket bound to `addr`, which need not exist yet.
fn bind_freely(addr: SocketAddr) -> Result<UdpSocket> {
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)
        .context("creating a UDP socket")?;
    setsockopt(&fd, sockopt::IpFreebind, &true).context("setting IP_FREEBIND")?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))
        .with_context(|| format!("binding {addr}"))?;
    Ok(UdpSocket::from(fd))
}

fn serve(options: &Options) -> Result<()> {
    let socket = bind_freely(options.bind)?;
    socket.set_read_timeout(Some(POLL))?;
    eprintln!(
        "tidegate-echo: gateway {} listening on {}",
        options.id, options.bind
    );
    let start = Instant::now();
    let mut buf = [0u8; 64];
    let mut answered = 0_u64;
    while start.elapsed() < options.lifetime {
        match socket.recv_from(&mut buf) {
            Ok((len, from)) => {
                if let Some(seq) = parse_probe(&buf[..len]) {
                    // A reply that cannot go out is a lost probe for the
                    // prober to count, not a reason to stop.
                    if socket.send_to(&reply(seq, options.id), from).is_ok() {
                        answered += 1;
                    }
                }
            }
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) => {}
            Err(error) => return Err(error).context("receiving probes"),
        }
    }
    eprintln!("tidegate-echo: lifetime over after {answered} answers");
    Ok(())
}
