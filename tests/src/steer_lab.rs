//! The steering benchmark's lab: a sender and a steering host on one veth
//! pair, the steering host's receive work alone on CPU 1.
//!
//! ```text
//!  sender ns                                  steering ns
//!  tg<id>s 198.51.100.1/24 ----------------- tg<id>d 198.51.100.2/24
//!    + 198.51.100.3-5/32 (backends)             + VIP 198.51.100.100/32
//!  XDP: sink (counts UDP to 51820, drops)     XDP: bounce | director | none (NGINX)
//!  tidegate-blast on CPU 0                    receive thread (threaded NAPI) on
//!                                             CPU 1, and NGINX's worker
//! ```
//!
//! The sender blasts WireGuard transport messages at the VIP from 64
//! source ports. The steering host sends every one on to a backend: the
//! director and the bare bounce rewrite the Ethernet header and send the
//! frame back out (`XDP_TX`), to the sender's own interface as a backend
//! on the segment; NGINX receives each datagram in user space and sends it
//! from its own socket to one of three backend addresses, which also live
//! on the sender's interface. Either way the sink on the sender's interface
//! counts what arrives.
//!
//! The steering side receives in NAPI (GRO on) in a kernel thread of its
//! own (threaded NAPI), pinned to CPU 1, with receive moderation as a NIC
//! would have it (once busy, it polls every 100 us rather than being woken
//! by every frame). The sender runs on CPU 0. The sink's receive is not
//! threaded: the kernel runs it right after the frames are sent to it, in
//! the context of whatever sent them (the receive thread for `XDP_TX`,
//! NGINX's worker for NGINX), so its small, equal cost per frame is part of
//! every steering figure. The steering cost is the CPU time of the receive
//! thread (and NGINX's worker) per frame that reached the sink, read from
//! `/proc/<pid>/schedstat`; CPU 1's busy time in `/proc/stat`, which also
//! counts whatever else the machine runs there, is shown beside it.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf,
    maps::PerCpuArray,
    programs::{Xdp, XdpMode, xdp::XdpLinkId},
};
use tidegate_gateway::{
    director::{BackendSpec, DirectorState, Mac},
    xdp::{self, Datapath, ServiceTable, XdpModeSetting},
};

use crate::bins::binary;
use crate::netns::{Netns, veth};
use crate::nginx_stream::{StreamNginx, StreamProxy};
use crate::process::Process;
use crate::run::Run;
use crate::wait::{Probe, poll_until};

/// The load generator's binary.
pub const BLAST_BIN: &str = "tidegate-blast";
/// The sender's address.
pub const SENDER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The steering host's own address.
pub const STEERING: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The VIP the sender sends to.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
/// The WireGuard port.
pub const PORT: u16 = 51820;
/// NGINX's upstream servers, on the sender's interface.
pub const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 51, 100, 3),
    Ipv4Addr::new(198, 51, 100, 4),
    Ipv4Addr::new(198, 51, 100, 5),
];
/// The CPU of the sender.
pub const SENDER_CPU: usize = 0;
/// The CPU of the steering host's receive work.
pub const STEERING_CPU: usize = 1;
/// Source ports the sender uses: clients of the director.
pub const SOURCES: usize = 64;
/// Receive moderation on the steering side: empty polls before the
/// receive thread waits for frames again, and how long it waits between
/// polls while busy.
pub const DEFER_POLLS: u32 = 2;
pub const MODERATION: Duration = Duration::from_micros(100);
/// WireGuard transport length the sender sends (the 16-byte header, 64
/// bytes of padded payload, the 16-byte tag).
pub const LEN: usize = 96;

/// What steers on the steering host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steering {
    /// `tidegate_bench_bounce`: swap the Ethernet addresses, `XDP_TX`.
    Bounce,
    /// The gateway's `tidegate_director` program, every client pinned to
    /// the backend that is the sender's interface.
    Director,
    /// NGINX's UDP stream proxy, `hash $remote_addr consistent`.
    Nginx,
}

impl Steering {
    /// Every kind, in the order each round runs them.
    pub const ALL: [Self; 3] = [Self::Bounce, Self::Director, Self::Nginx];

    /// Its name in the results.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bounce => "bare XDP_TX bounce",
            Self::Director => "Tidegate director (XDP)",
            Self::Nginx => "NGINX UDP stream proxy",
        }
    }
}

/// One measured blast.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Datagrams the sender handed to its kernel, per second.
    pub sent_pps: f64,
    /// Datagrams that reached the sink, per second.
    pub steered_pps: f64,
    /// CPU time of the steering host's receive thread (and NGINX's worker)
    /// per steered datagram, ns.
    pub thread_ns: f64,
    /// CPU 1's busy time (ticks) per steered datagram, ns.
    pub core_ns: f64,
}

/// What runs on the steering host while a kind is measured.
#[derive(Debug)]
enum Running {
    Bounce(XdpLinkId),
    Director(Box<Datapath>),
    Nginx(StreamNginx),
}

/// The lab. Fields drop in order: what steers, the programs, the
/// namespaces (their interfaces and threads with them), the run.
#[derive(Debug)]
pub struct SteerLab {
    running: Option<Running>,
    bench: Ebpf,
    sender: Netns,
    steering: Netns,
    steering_if: String,
    sender_mac: Mac,
    steering_mac: Mac,
    /// The steering side's receive threads (one per queue).
    steering_threads: Vec<u32>,
    run: Run,
}

impl SteerLab {
    /// Builds the namespaces, the link, the threads and the sink.
    pub fn build() -> Result<Self> {
        binary(BLAST_BIN)?;
        let run = Run::new()?;
        let sender = Netns::create(&run.netns_name("sender"))?;
        let steering = Netns::create(&run.netns_name("steer"))?;
        let sender_if = run.ifname("s");
        let steering_if = run.ifname("d");
        veth(&steering, &steering_if, &sender, &sender_if)?;
        sender.add_addr(&sender_if, &format!("{SENDER}/24"))?;
        for backend in BACKENDS {
            sender.add_addr(&sender_if, &format!("{backend}/32"))?;
        }
        steering.add_addr(&steering_if, &format!("{STEERING}/24"))?;
        steering.add_addr(&steering_if, &format!("{VIP}/32"))?;
        sender.set_up(&sender_if)?;
        steering.set_up(&steering_if)?;
        let sender_mac = parse_mac(&sender.link_mac(&sender_if)?)?;
        let steering_mac = parse_mac(&steering.link_mac(&steering_if)?)?;
        // Fixed neighbours: no ARP during a blast.
        sender.ip(&[
            "neigh",
            "replace",
            &VIP.to_string(),
            "lladdr",
            &format_mac(&steering_mac),
            "dev",
            &sender_if,
            "nud",
            "permanent",
        ])?;
        for backend in BACKENDS.iter().chain([&SENDER]) {
            steering.ip(&[
                "neigh",
                "replace",
                &backend.to_string(),
                "lladdr",
                &format_mac(&sender_mac),
                "dev",
                &steering_if,
                "nud",
                "permanent",
            ])?;
        }
        let steering_threads = threaded_napi(&steering, &steering_if, STEERING_CPU)?;
        // Receive moderation, as a NIC's interrupt moderation: once busy,
        // the receive thread polls again after at most this long rather
        // than being woken by every frame.
        steering.exec_ok(
            "sh",
            &[
                "-c",
                &format!(
                    "echo {DEFER_POLLS} > /sys/class/net/{steering_if}/napi_defer_hard_irqs && \
                     echo {} > /sys/class/net/{steering_if}/gro_flush_timeout",
                    MODERATION.as_nanos()
                ),
            ],
        )?;

        let mut bench = Ebpf::load(xdp::BENCH_OBJECT).context("loading the bench programs")?;
        for name in ["tidegate_bench_sink", "tidegate_bench_bounce"] {
            let program: &mut Xdp = bench
                .program_mut(name)
                .with_context(|| format!("no program {name}"))?
                .try_into()?;
            program.load()?;
        }
        let sink: &mut Xdp = bench
            .program_mut("tidegate_bench_sink")
            .context("no sink")?
            .try_into()?;
        let ifname = sender_if.clone();
        sender
            .run(|| sink.attach(&ifname, XdpMode::Driver))?
            .with_context(|| format!("attaching the sink to {sender_if}"))?;
        Ok(Self {
            running: None,
            bench,
            sender,
            steering,
            steering_if,
            sender_mac,
            steering_mac,
            steering_threads,
            run,
        })
    }

    /// The run (id, directory).
    pub fn run(&self) -> &Run {
        &self.run
    }

    /// Starts `kind` on the steering host (after stopping what ran).
    pub fn start(&mut self, kind: Steering) -> Result<()> {
        self.stop()?;
        let ifname = self.steering_if.clone();
        let running = match kind {
            Steering::Bounce => {
                let bounce: &mut Xdp = self
                    .bench
                    .program_mut("tidegate_bench_bounce")
                    .context("no bounce")?
                    .try_into()?;
                let link = self
                    .steering
                    .run(|| bounce.attach(&ifname, XdpMode::Driver))?
                    .with_context(|| format!("attaching the bounce to {ifname}"))?;
                Running::Bounce(link)
            }
            Steering::Director => Running::Director(Box::new(self.director()?)),
            Steering::Nginx => {
                let proxy = StreamProxy {
                    listen: SocketAddr::from((VIP, PORT)),
                    backends: BACKENDS
                        .iter()
                        .map(|b| SocketAddr::from((*b, PORT)))
                        .collect(),
                    worker_cpu: STEERING_CPU,
                };
                let dir = self.run.dir().join("nginx");
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                Running::Nginx(proxy.start(&self.steering, &dir)?)
            }
        };
        self.running = Some(running);
        Ok(())
    }

    /// The gateway's program attached to the steering interface through
    /// the daemon's own code path, in director mode and the master: the VIP
    /// a service and fenced with a live lease, gateway 1 (the sender's
    /// interface) the one backend that takes clients, this host (2)
    /// draining.
    fn director(&self) -> Result<Datapath> {
        let mut datapath = Datapath::load().context("loading the gateway's XDP program")?;
        datapath.install_services(ServiceTable::new([SocketAddr::from((VIP, PORT))])?)?;
        datapath.set_vips(&[IpAddr::V4(VIP)])?;
        datapath.renew_lease(Duration::from_secs(3600), true)?;
        let pins = self.run.bpffs()?;
        let ifname = self.steering_if.clone();
        self.steering
            .run(|| datapath.attach(&ifname, XdpModeSetting::Driver, &pins))??;
        datapath.set_director(&DirectorState {
            on: true,
            mac: self.steering_mac,
            backends: vec![
                BackendSpec {
                    gateway_id: 1,
                    mac: self.sender_mac,
                    local: false,
                    draining: false,
                },
                BackendSpec {
                    gateway_id: 2,
                    mac: self.steering_mac,
                    local: true,
                    draining: true,
                },
            ],
        })?;
        Ok(datapath)
    }

    /// Stops what runs on the steering host.
    pub fn stop(&mut self) -> Result<()> {
        match self.running.take() {
            None => Ok(()),
            Some(Running::Bounce(link)) => {
                let bounce: &mut Xdp = self
                    .bench
                    .program_mut("tidegate_bench_bounce")
                    .context("no bounce")?
                    .try_into()?;
                bounce.detach(link)?;
                Ok(())
            }
            Some(Running::Director(mut datapath)) => Ok(datapath.detach()?),
            Some(Running::Nginx(nginx)) => nginx.stop(),
        }
    }

    /// The threads whose CPU time is the steering host's: its receive
    /// threads, and NGINX's worker while NGINX runs.
    fn steering_pids(&self) -> Result<Vec<u32>> {
        let mut pids = self.steering_threads.clone();
        if let Some(Running::Nginx(nginx)) = &self.running {
            pids.extend(nginx.workers()?);
        }
        Ok(pids)
    }

    /// Blasts for `warm_up` (pins and sessions are made), then measures a
    /// blast of `duration`.
    pub fn measure(&mut self, warm_up: Duration, duration: Duration) -> Result<Sample> {
        self.blast(warm_up)?;
        let pids = self.steering_pids()?;
        let (sink0, threads0, core0) = (self.sink()?, cpu_ns(&pids)?, core_busy_ns(STEERING_CPU)?);
        let (sent, seconds) = self.blast(duration)?;
        // What is still in flight arrives.
        std::thread::sleep(Duration::from_millis(200));
        let (sink1, threads1, core1) = (self.sink()?, cpu_ns(&pids)?, core_busy_ns(STEERING_CPU)?);
        let steered = sink1 - sink0;
        ensure!(
            steered > 0,
            "nothing reached the sink in {seconds:.1} s ({sent} sent)"
        );
        Ok(Sample {
            sent_pps: sent as f64 / seconds,
            steered_pps: steered as f64 / seconds,
            thread_ns: (threads1 - threads0) as f64 / steered as f64,
            core_ns: (core1 - core0) as f64 / steered as f64,
        })
    }

    /// One run of the sender on CPU 0; returns (sent, seconds).
    fn blast(&self, duration: Duration) -> Result<(u64, f64)> {
        let log = self.run.dir().join("blast.log");
        let _ = std::fs::remove_file(&log);
        let mut command = self.sender.command("taskset");
        command
            .args(["-c", &SENDER_CPU.to_string()])
            .arg(binary(BLAST_BIN)?)
            .args(["--target", &SocketAddr::from((VIP, PORT)).to_string()])
            .args(["--seconds", &format!("{:.3}", duration.as_secs_f64())])
            .args(["--sources", &SOURCES.to_string(), "--len", &LEN.to_string()]);
        let mut process = Process::spawn(BLAST_BIN, &self.sender, command, &log)?;
        let status = poll_until(
            &format!("{BLAST_BIN} to finish"),
            duration + Duration::from_secs(10),
            Duration::from_millis(20),
            || {
                Ok(match process.try_status()? {
                    Some(status) => Probe::Ready(status),
                    None => Probe::NotYet("still sending".into()),
                })
            },
        )?;
        let out = process.log();
        ensure!(status.success(), "{BLAST_BIN} exited {status}: {out}");
        let line = out
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .with_context(|| format!("no summary from {BLAST_BIN}: {out}"))?;
        let summary: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("parsing {line:?}"))?;
        let sent = summary["sent"].as_u64().context("no \"sent\"")?;
        let seconds = summary["seconds"].as_f64().context("no \"seconds\"")?;
        Ok((sent, seconds))
    }

    /// Datagrams the sink counted so far, over every CPU.
    fn sink(&self) -> Result<u64> {
        let map = self.bench.map("SINK").context("no SINK map")?;
        let counts: PerCpuArray<_, u64> = PerCpuArray::try_from(map)?;
        Ok(counts.get(&0, 0)?.iter().sum())
    }

    /// The run directory's logs, for failure messages.
    pub fn dir(&self) -> PathBuf {
        self.run.dir().to_owned()
    }
}

impl Drop for SteerLab {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!("warning: stopping the steering host: {error:#}");
        }
    }
}

/// Turns on GRO (so the veth receives in NAPI) and threaded NAPI on
/// `ifname`, and pins its new receive threads to `cpu`; returns their pids.
/// The threads are told apart from others by being new and by their name.
fn threaded_napi(netns: &Netns, ifname: &str, cpu: usize) -> Result<Vec<u32>> {
    let before = napi_threads()?;
    netns.exec_ok("ethtool", &["-K", ifname, "gro", "on"])?;
    netns.exec_ok(
        "sh",
        &["-c", &format!("echo 1 > /sys/class/net/{ifname}/threaded")],
    )?;
    // The kernel names each thread `napi/<ifname>-<id>`, cut to 15 bytes.
    let prefix: String = format!("napi/{ifname}").chars().take(15).collect();
    let threads = poll_until(
        &format!("the NAPI threads of {ifname}"),
        Duration::from_secs(5),
        Duration::from_millis(20),
        || {
            let new: Vec<u32> = napi_threads()?
                .into_iter()
                .filter(|(pid, comm)| {
                    !before.contains(&(*pid, comm.clone())) && comm.starts_with(&prefix)
                })
                .map(|(pid, _)| pid)
                .collect();
            Ok(if new.is_empty() {
                Probe::NotYet("none yet".into())
            } else {
                Probe::Ready(new)
            })
        },
    )?;
    for pid in &threads {
        crate::cmd::run_ok(
            std::process::Command::new("taskset").args([
                "-p",
                "-c",
                &cpu.to_string(),
                &pid.to_string(),
            ]),
            crate::cmd::DEFAULT_TIMEOUT,
        )
        .with_context(|| format!("pinning NAPI thread {pid} to CPU {cpu}"))?;
    }
    Ok(threads)
}

/// Every kernel thread named `napi/...`: (pid, name).
fn napi_threads() -> Result<BTreeSet<(u32, String)>> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir("/proc")
        .context("listing /proc")?
        .flatten()
    {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go during the scan.
        if let Ok(comm) = std::fs::read_to_string(entry.path().join("comm"))
            && comm.starts_with("napi/")
        {
            out.insert((pid, comm.trim().to_owned()));
        }
    }
    Ok(out)
}

/// The CPU time of `pids` so far, ns (`/proc/<pid>/schedstat`).
fn cpu_ns(pids: &[u32]) -> Result<u64> {
    let mut total = 0;
    for pid in pids {
        let text = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
            .with_context(|| format!("reading the CPU time of {pid}"))?;
        total += text
            .split_whitespace()
            .next()
            .and_then(|ns| ns.parse::<u64>().ok())
            .with_context(|| format!("parsing /proc/{pid}/schedstat {text:?}"))?;
    }
    Ok(total)
}

/// CPU `cpu`'s busy time so far, ns: every `/proc/stat` field but idle and
/// iowait, in clock ticks.
fn core_busy_ns(cpu: usize) -> Result<u64> {
    let ticks_per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .context("sysconf(CLK_TCK)")?
        .context("no CLK_TCK")?;
    let tick_ns = 1_000_000_000 / u64::try_from(ticks_per_second).context("CLK_TCK")?;
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let label = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(label.as_str()))
        .with_context(|| format!("no {label} in /proc/stat"))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing {line:?}"))?;
    ensure!(fields.len() >= 8, "short {label} line {line:?}");
    // user nice system idle iowait irq softirq steal
    let busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7];
    Ok(busy * tick_ns)
}

fn parse_mac(text: &str) -> Result<Mac> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing MAC {text:?}"))?;
    match bytes.try_into() {
        Ok(mac) => Ok(mac),
        Err(_) => bail!("{text:?} is not an Ethernet address"),
    }
}

fn format_mac(mac: &Mac) -> String {
    xdp::director::format_mac(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_round_trip() {
        let mac = parse_mac("02:00:ab:00:00:01").unwrap();
        assert_eq!(mac, [2, 0, 0xab, 0, 0, 1]);
        assert_eq!(format_mac(&mac), "02:00:ab:00:00:01");
        assert!(parse_mac("02:00").is_err());
    }
}
