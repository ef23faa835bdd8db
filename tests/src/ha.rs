//! A highly available location: two or three gateways on one switched
//! segment, each running `tidegate-gateway` with `[ha]` and a
//! `tidegate-echo` bound to the VIP, and a client that probes the VIP with
//! `tidegate-probe` and so learns which gateway answers.
//!
//! ```text
//!  gateway i ns (i = 1..=N)                 switch ns              client ns
//!  tg<id>g<i> 198.51.100.i/24 (XDP) ---- tg<id>p<i> [tg<id>br] tg<id>cb ---- tg<id>c 198.51.100.50/24
//!  lo: VIP 198.51.100.100/32 (every gateway; the master also has it on tg<id>g<i>)
//!  tidegate-gateway [ha] gateway_id = i; tidegate-echo on VIP:7 answering "i"
//! ```
//!
//! Adverts go to the default multicast group (or, with
//! [`AdvertTransport::Unicast`], to the other gateways' addresses). The
//! switch can stop flooding multicast to chosen ports, which cuts the
//! multicast adverts between gateways while unicast traffic and ARP still
//! flow: a partition of the election only.
//!
//! Everything is torn down on drop: the daemons (SIGTERM, so a master hands
//! over), the echoes, the namespaces, then the run directory.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::Signal;
use serde::Deserialize;

use crate::bins::binary;
use crate::capture::Capture;
use crate::cmd::CmdOutput;
use crate::gateway::{
    GATEWAY_BIN, GatewayConfig, GatewayDaemon, HaSection, HookSection, TIDECTL_BIN,
    WireguardSection, XdpMode,
};
use crate::netns::{Netns, bridge, veth};
use crate::probe::ProbeSummary;
use crate::process::Process;
use crate::run::Run;
use crate::wait::{Probe, poll_until};
use crate::wireguard::DetachedWireguardGo;

/// The echo service's binary.
pub const ECHO_BIN: &str = "tidegate-echo";
/// The prober's binary.
pub const PROBE_BIN: &str = "tidegate-probe";

/// The location's floating address.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
/// The UDP port the echo services listen on, at the VIP.
pub const ECHO_PORT: u16 = 7;
/// The client's address on the segment.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 50);
/// The IPv6 VIP of locations built with [`HaOptions::ipv6`].
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
/// The client's IPv6 address on the segment.
pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x50);
/// Prefix length of the segment.
pub const PREFIX: u8 = 24;
/// The location id of every gateway.
pub const LOCATION_ID: u32 = 7;
/// The location's shared advert key.
pub const KEY: &str = "tidegate-ha-test-location-key";
/// The advert port (the daemon's default).
pub const ADVERT_PORT: u16 = 51899;
/// The advert multicast group (the daemon's default).
pub const ADVERT_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 77, 18);
/// The WireGuard service the shield is given (nothing listens there).
pub const SERVICE_PORT: u16 = 51820;
/// Most gateways a location holds here.
pub const MAX_GATEWAYS: usize = 9;
/// The gateways' tunnel address, the same on each (with
/// [`HaOptions::wireguard`]); a second echo answers there.
pub const TUNNEL_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

/// How long the first election may take once every daemon answers.
pub const ELECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// How often role polls ask the daemons.
pub const POLL: Duration = Duration::from_millis(25);
/// How long a prober may take to finish after its last probe or SIGTERM.
const PROBER_GRACE: Duration = Duration::from_secs(5);

/// The segment address of gateway `id`: `198.51.100.<id>`.
pub fn gateway_addr(id: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, u8::try_from(id).unwrap_or(u8::MAX))
}

/// How the gateways send their adverts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdvertTransport {
    /// To the multicast group on the segment.
    #[default]
    Multicast,
    /// To each other gateway's address (`peers` in `[ha]`).
    Unicast,
}

/// What a [`HaLocation`] is made of.
#[derive(Debug, Clone)]
pub struct HaOptions {
    /// One gateway per entry, with this priority; gateway ids are 1, 2, ...
    pub priorities: Vec<u8>,
    /// How adverts travel.
    pub transport: AdvertTransport,
    /// `advert_interval_ms`.
    pub advert_interval_ms: u64,
    /// A gateway that tracks an uplink (a dummy interface of its own,
    /// see [`HaGateway::set_uplink`]) with this weight.
    pub tracked_uplink: Option<(u32, u8)>,
    /// IPv6 on the segment too (2001:db8::/64), and [`VIP6`] beside the
    /// IPv4 VIP.
    pub ipv6: bool,
    /// The location's WireGuard on every gateway (`[wireguard]`, the same
    /// key on each; kernel WireGuard where the kernel has it, else wireguard-go started by the daemon), and an echo on
    /// [`TUNNEL_ADDR`] in each gateway.
    pub wireguard: Option<TunnelOptions>,
    /// `[[hooks]]` on every gateway.
    pub hooks: Vec<HookSection>,
}

/// The location's WireGuard, for [`HaOptions::wireguard`].
#[derive(Debug, Clone)]
pub struct TunnelOptions {
    /// The location's private key (base64), the same on every gateway.
    pub private_key: String,
    /// `stats_interval_ms`, if set.
    pub stats_interval_ms: Option<u64>,
    /// `kick_rate` in `[ha]`, if set (0: no kicks).
    pub kick_rate: Option<u32>,
    /// `handover_window_ms` in `[ha]`, if set.
    pub handover_window_ms: Option<u64>,
}

impl HaOptions {
    /// Gateways with these priorities, multicast adverts every
    /// [`advert_interval_ms`].
    pub fn priorities(priorities: &[u8]) -> Self {
        Self {
            priorities: priorities.to_vec(),
            transport: AdvertTransport::Multicast,
            advert_interval_ms: advert_interval_ms(),
            tracked_uplink: None,
            ipv6: false,
            wireguard: None,
            hooks: Vec::new(),
        }
    }

    /// The gateway that should win the election: the highest priority,
    /// ties to the higher id.
    pub fn expected_master(&self) -> u32 {
        (1_u32..)
            .zip(&self.priorities)
            .max_by_key(|(id, priority)| (**priority, *id))
            .map_or(0, |(id, _)| id)
    }
}

/// A gateway's role, as `tidectl status --json` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Init,
    Backup,
    Master,
    Fault,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Init => "INIT",
            Self::Backup => "BACKUP",
            Self::Master => "MASTER",
            Self::Fault => "FAULT",
        })
    }
}

/// Another gateway, as `tidectl status --json` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HaPeer {
    pub gateway_id: u32,
    pub role: Role,
    pub priority: u8,
    pub healthy: bool,
    pub maintenance: bool,
    /// It takes no new clients (director mode).
    #[serde(default)]
    pub draining: bool,
    pub last_seen_ms: u64,
    /// The newest advert format it writes.
    pub advert_version: u8,
}

/// One role change (or a note, when `from == to`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HaTransition {
    /// Unix time in ms.
    pub at_ms: u64,
    pub from: Role,
    pub to: Role,
    pub reason: String,
}

/// The answer of `tidectl status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HaStatus {
    pub location_id: u32,
    pub gateway_id: u32,
    pub role: Role,
    pub priority: u8,
    pub advert_interval_ms: u64,
    /// The oldest advert format a gateway of the location reads.
    pub advert_version: u8,
    pub master: Option<u32>,
    pub maintenance: bool,
    /// This gateway takes no new clients (director mode).
    #[serde(default)]
    pub draining: bool,
    pub vips: Vec<IpAddr>,
    pub vips_held: Vec<IpAddr>,
    pub peers: Vec<HaPeer>,
    pub transitions: Vec<HaTransition>,
    pub dropped: BTreeMap<String, u64>,
    /// How the clients came back after the last failovers to this gateway.
    #[serde(default)]
    pub failovers: Vec<tidegate_gateway::wireguard::kick::FailoverReport>,
    /// The location's endpoint table.
    #[serde(default)]
    pub endpoints: Option<tidegate_gateway::ha::sharing::SharingStatus>,
}

impl HaStatus {
    /// Parses `tidectl status --json` output.
    pub fn parse(json: &str) -> Result<Self> {
        serde_json::from_str(json).with_context(|| format!("parsing status JSON {json:?}"))
    }

    /// Adverts dropped for `reason` (0 when never counted).
    pub fn dropped(&self, reason: &str) -> u64 {
        self.dropped.get(reason).copied().unwrap_or(0)
    }

    /// The last change into `role` (not a note), if any.
    pub fn last_change_to(&self, role: Role) -> Option<&HaTransition> {
        self.transitions
            .iter()
            .rev()
            .find(|t| t.to == role && t.from != role)
    }

    /// How many times this gateway became MASTER from `unix_ms` on.
    pub fn became_master_since(&self, unix_ms: u64) -> usize {
        self.transitions
            .iter()
            .filter(|t| t.to == Role::Master && t.from != Role::Master && t.at_ms >= unix_ms)
            .count()
    }

    /// The role changes (notes left out), as "FROM->TO (reason)".
    pub fn changes(&self) -> Vec<String> {
        self.transitions
            .iter()
            .filter(|t| t.from != t.to)
            .map(|t| format!("{}->{} ({})", t.from, t.to, t.reason))
            .collect()
    }

    /// One line for test output: "gw 3 MASTER (master 3) held [..]".
    pub fn brief(&self) -> String {
        format!(
            "gw {} {}{} (master {:?}) holds {:?}",
            self.gateway_id,
            self.role,
            if self.maintenance { " maint" } else { "" },
            self.master,
            self.vips_held
        )
    }
}

/// The status of gateway `id` among `statuses`.
/// An ARP message the client received that placed the VIP at `mac`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipClaim {
    pub at: Instant,
    /// Lowercase, as the gateways' [`HaGateway::mac`].
    pub mac: String,
}

/// ARP's EtherType.
const ETH_P_ARP: u16 = 0x0806;

/// The sender MAC, lowercase, of an Ethernet/IPv4 ARP message whose
/// sender address is `vip`.
fn arp_claim(packet: &[u8], vip: Ipv4Addr) -> Option<String> {
    // Hardware Ethernet, protocol IPv4, address lengths 6 and 4; then the
    // operation, the sender's MAC (8..14) and address (14..18).
    let header = packet.get(..18)?;
    if header[..6] != [0, 1, 8, 0, 6, 4] || header[14..18] != vip.octets() {
        return None;
    }
    let mac: Vec<String> = header[8..14].iter().map(|b| format!("{b:02x}")).collect();
    Some(mac.join(":"))
}

pub fn status_of(statuses: &[HaStatus], id: u32) -> Result<&HaStatus> {
    statuses
        .iter()
        .find(|s| s.gateway_id == id)
        .with_context(|| format!("no status from gateway {id}"))
}

/// One gateway: its namespace and link, its daemon and its echo service.
///
/// Fields drop in order: the daemon (SIGTERM), the wireguard-go it started,
/// the echoes, then the namespace handle.
#[derive(Debug)]
pub struct HaGateway {
    daemon: GatewayDaemon,
    wireguard_go: Option<DetachedWireguardGo>,
    echo: Process,
    tunnel_echo: Option<Process>,
    id: u32,
    priority: u8,
    ifname: String,
    switch_port: String,
    mac: String,
    dir: PathBuf,
    netns: Netns,
}

impl HaGateway {
    /// The gateway id (also the last byte of its address).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The configured priority.
    pub fn priority(&self) -> u8 {
        self.priority
    }

    /// The gateway's address on the segment.
    pub fn addr(&self) -> Ipv4Addr {
        gateway_addr(self.id)
    }

    /// The namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The public interface (in the gateway's namespace).
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The switch's port for this gateway (in the switch namespace).
    pub fn switch_port(&self) -> &str {
        &self.switch_port
    }

    /// The public interface's MAC address, lowercase.
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// The gateway's directory (config, logs, control socket).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The daemon.
    pub fn daemon(&self) -> &GatewayDaemon {
        &self.daemon
    }

    /// The daemon, mutably (stop, kill, signal, restart).
    pub fn daemon_mut(&mut self) -> &mut GatewayDaemon {
        &mut self.daemon
    }

    /// Whether the daemon runs (not killed, stopped or exited).
    pub fn daemon_running(&mut self) -> bool {
        self.daemon.ensure_running().is_ok()
    }

    /// `tidectl <args>` against this gateway, whatever its exit status.
    pub fn tidectl(&self, args: &[&str]) -> Result<CmdOutput> {
        self.daemon.tidectl(args)
    }

    /// `tidectl status --json`.
    pub fn status(&mut self) -> Result<HaStatus> {
        let json = self
            .daemon
            .tidectl_ok(&["status", "--json"])
            .with_context(|| format!("status of gateway {}", self.id))?;
        HaStatus::parse(&json)
    }

    /// Whether the public interface holds the VIP, asked of the kernel.
    pub fn vip_on_public(&self) -> Result<bool> {
        has_addr(&self.netns, &self.ifname, VIP)
    }

    /// Whether the public interface holds [`VIP6`], asked of the kernel.
    pub fn vip6_on_public(&self) -> Result<bool> {
        let out = self
            .netns
            .ip(&["-o", "-6", "addr", "show", "dev", &self.ifname])?;
        let needle = format!(" {VIP6}/128 ");
        Ok(out.lines().any(|line| line.contains(&needle)))
    }

    /// Whether `lo` holds the VIP, asked of the kernel.
    pub fn vip_on_lo(&self) -> Result<bool> {
        has_addr(&self.netns, "lo", VIP)
    }

    /// Sets the public interface up or down (inside the gateway).
    pub fn set_link(&self, up: bool) -> Result<()> {
        self.netns.ip(&[
            "link",
            "set",
            "dev",
            &self.ifname,
            if up { "up" } else { "down" },
        ])?;
        Ok(())
    }

    /// Sets the gateway's tracked uplink (see [`HaOptions::tracked_uplink`])
    /// up or down.
    pub fn set_uplink(&self, up: bool) -> Result<()> {
        self.netns
            .ip(&["link", "set", "dev", UPLINK, if up { "up" } else { "down" }])?;
        Ok(())
    }

    /// A host crash: the daemon and the echo die with SIGKILL and the
    /// public link goes down, so nothing on the host answers any more.
    pub fn crash(&mut self) -> Result<()> {
        self.daemon.kill()?;
        self.echo.kill()?;
        self.set_link(false)
    }

    /// Sends `signal` to the daemon (SIGSTOP freezes it, SIGCONT thaws it;
    /// a frozen daemon is thawed on teardown).
    pub fn signal_daemon(&mut self, signal: Signal) -> Result<()> {
        self.daemon.signal(signal)
    }

    /// The daemon's log tail, for failure messages.
    pub fn log_tail(&self) -> String {
        self.daemon.log_tail()
    }

    /// The location's WireGuard interface on this gateway, if it runs one.
    pub fn wireguard_interface(&self) -> Option<&str> {
        self.wireguard_go
            .as_ref()
            .map(DetachedWireguardGo::interface)
    }

    /// The wireguard-go serving this gateway's WireGuard, if any.
    pub fn wireguard_go(&self) -> Option<&DetachedWireguardGo> {
        self.wireguard_go.as_ref()
    }

    /// A host crash of a gateway with WireGuard: as [`Self::crash`], and
    /// its WireGuard (a killed wireguard-go, a deleted kernel interface, its
    /// sessions with it) and tunnel echo die too.
    pub fn crash_all(&mut self) -> Result<()> {
        self.crash()?;
        if let Some(echo) = self.tunnel_echo.as_mut() {
            echo.kill()?;
        }
        if let Some(wireguard_go) = &self.wireguard_go {
            match wireguard_go.pid()? {
                Some(pid) => crate::wireguard::signal_wireguard_go(pid, Signal::SIGKILL)?,
                None => {
                    self.netns
                        .ip(&["link", "del", "dev", wireguard_go.interface()])?;
                }
            }
        }
        Ok(())
    }
}

/// Whether `ifname` in `netns` holds `addr` (as a /32).
fn has_addr(netns: &Netns, ifname: &str, addr: Ipv4Addr) -> Result<bool> {
    let out = netns.ip(&["-o", "-4", "addr", "show", "dev", ifname])?;
    let needle = format!(" {addr}/32 ");
    Ok(out.lines().any(|line| line.contains(&needle)))
}

/// A running prober and where its summary goes.
#[derive(Debug)]
pub struct Prober {
    process: Process,
    out: PathBuf,
}

impl Prober {
    /// Stops the prober (SIGTERM: it waits for answers still due) and
    /// returns its summary.
    pub fn finish(mut self) -> Result<ProbeSummary> {
        let status = self.process.stop()?;
        ensure!(
            status.success(),
            "{PROBE_BIN} exited {status}:\n{}",
            self.process.log()
        );
        self.summary()
    }

    /// Waits until the prober is ready to probe (and to be stopped with a
    /// summary): under `ip netns exec` on a slow machine that is a while.
    fn wait_started(&mut self) -> Result<()> {
        poll_until(
            &format!("{PROBE_BIN} to start"),
            PROBER_GRACE,
            Duration::from_millis(10),
            || {
                self.process.ensure_running()?;
                Ok(if self.process.log().contains(crate::probe::STARTED) {
                    Probe::Ready(())
                } else {
                    Probe::NotYet("not probing yet".into())
                })
            },
        )
    }

    /// Asks the prober to stop (SIGTERM) without waiting: stop many at
    /// once, then [`Self::wait`] for each.
    pub fn request_stop(&mut self) -> Result<()> {
        self.process.signal(Signal::SIGTERM)
    }

    /// Waits for the prober to send its last probe and exit, then returns
    /// its summary.
    pub fn wait(mut self, timeout: Duration) -> Result<ProbeSummary> {
        let what = format!("{PROBE_BIN} to finish");
        let status = poll_until(&what, timeout, Duration::from_millis(20), || {
            Ok(match self.process.try_status()? {
                Some(status) => Probe::Ready(status),
                None => Probe::NotYet("still probing".into()),
            })
        })?;
        ensure!(
            status.success(),
            "{PROBE_BIN} exited {status}:\n{}",
            self.process.log()
        );
        self.summary()
    }

    /// The latest summary written while probing (`--snapshot-ms`), if any
    /// yet: the probes whose answer is no longer due.
    pub fn snapshot(&self) -> Result<Option<ProbeSummary>> {
        match std::fs::read_to_string(&self.out) {
            Ok(json) => ProbeSummary::parse(&json).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.out.display())),
        }
    }

    fn summary(&self) -> Result<ProbeSummary> {
        let json = std::fs::read_to_string(&self.out)
            .with_context(|| format!("reading {}: {}", self.out.display(), self.process.log()))?;
        ProbeSummary::parse(&json)
    }
}

/// The whole location.
///
/// Fields drop in order: the gateways (daemons, then echoes), then the
/// client and switch namespaces, then the run directory.
#[derive(Debug)]
pub struct HaLocation {
    gateways: Vec<HaGateway>,
    /// Empty XDP programs on the switch's gateway ports (with WireGuard:
    /// the handover sends frames between gateways with `XDP_TX`).
    _xdp_pass: Vec<crate::xdp_pass::XdpPass>,
    client: Netns,
    switch: Netns,
    client_if: String,
    options: HaOptions,
    probers: u32,
    // Last: the run directory goes after everything that writes into it.
    run: Run,
}

impl HaLocation {
    /// Builds the segment, starts every daemon at about the same time, the
    /// echo services, and waits until the election settles on the
    /// expected master.
    pub fn build(options: &HaOptions) -> Result<Self> {
        for name in [GATEWAY_BIN, TIDECTL_BIN, ECHO_BIN, PROBE_BIN] {
            binary(name)?;
        }
        ensure!(
            (1..=MAX_GATEWAYS).contains(&options.priorities.len()),
            "1 to {MAX_GATEWAYS} gateways, not {}",
            options.priorities.len()
        );
        let run = Run::new()?;
        let switch = Netns::create(&run.netns_name("switch"))?;
        let client = Netns::create(&run.netns_name("client"))?;
        let client_if = run.ifname("c");
        let client_port = run.ifname("cb");
        veth(&client, &client_if, &switch, &client_port)?;
        client.add_addr(&client_if, &format!("{CLIENT_ADDR}/{PREFIX}"))?;
        if options.ipv6 {
            client.add_addr(&client_if, &format!("{CLIENT_ADDR6}/64"))?;
        }
        client.set_up(&client_if)?;
        // For tests that speak the advert protocol from the client.
        client.ip(&["route", "add", "224.0.0.0/4", "dev", &client_if])?;

        let ids: Vec<u32> = (1..=options.priorities.len() as u32).collect();
        let mut ports = vec![client_port];
        let mut links = Vec::new();
        for &id in &ids {
            let netns = Netns::create(&run.netns_name(&format!("gw{id}")))?;
            let ifname = run.ifname(&format!("g{id}"));
            let port = run.ifname(&format!("p{id}"));
            veth(&netns, &ifname, &switch, &port)?;
            netns.add_addr(&ifname, &format!("{}/{PREFIX}", gateway_addr(id)))?;
            if options.ipv6 {
                let addr6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, id as u16);
                netns.add_addr(&ifname, &format!("{addr6}/64"))?;
            }
            netns.set_up(&ifname)?;
            let mac = netns.link_mac(&ifname)?;
            ports.push(port.clone());
            links.push((id, netns, ifname, port, mac));
        }
        let port_refs: Vec<&str> = ports.iter().map(String::as_str).collect();
        bridge(&switch, &run.ifname("br"), &port_refs)?;
        let xdp_pass = match options.wireguard {
            Some(_) => links
                .iter()
                .map(|(_, _, _, port, _)| crate::xdp_pass::attach(&switch, port))
                .collect::<Result<Vec<_>>>()?,
            None => Vec::new(),
        };

        // Every daemon first, then wait for each: one election, not a
        // gateway that wins alone before the others start.
        let mut daemons = Vec::new();
        for ((id, netns, ifname, _, _), priority) in links.iter().zip(&options.priorities) {
            let dir = run.dir().join(format!("gw{id}"));
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let mut config = gateway_config(options, *id, *priority, ifname, &dir, &ids);
            config.bpf_pin_dir = Some(run.bpffs()?);
            if let Some(tunnel) = &options.wireguard {
                config.wireguard = Some(WireguardSection {
                    interface: run.ifname(&format!("w{id}")),
                    backend: "auto".into(),
                    private_key: Some(tunnel.private_key.clone()),
                    listen_port: Some(SERVICE_PORT),
                    addresses: vec![format!("{TUNNEL_ADDR}/24")],
                    mtu: None,
                    stats_interval_ms: tunnel.stats_interval_ms,
                    mfa: false,
                    peer_disconnect_threshold_secs: None,
                });
                if let Some(ha) = config.ha.as_mut() {
                    ha.kick_rate = tunnel.kick_rate;
                    ha.handover_window_ms = tunnel.handover_window_ms;
                }
            }
            if let Some((tracking, weight)) = options.tracked_uplink
                && tracking == *id
            {
                // A veth pair inside the gateway (this kernel has no dummy
                // links): the tracked end loses its carrier when set down.
                netns.ip(&[
                    "link",
                    "add",
                    UPLINK,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    UPLINK_PEER,
                ])?;
                netns.set_up(UPLINK)?;
                netns.set_up(UPLINK_PEER)?;
                if let Some(ha) = config.ha.as_mut() {
                    ha.track.push((UPLINK.to_owned(), weight));
                }
            }
            // Before the daemon is pushed: dropped after it, whatever fails.
            let wireguard_go = config
                .wireguard
                .as_ref()
                .map(|wg| DetachedWireguardGo::new(netns, &wg.interface));
            daemons.push((
                GatewayDaemon::spawn(netns, config, &dir)?,
                wireguard_go,
                dir,
            ));
        }
        let mut gateways = Vec::new();
        for ((mut daemon, wireguard_go, dir), ((id, netns, ifname, switch_port, mac), priority)) in
            daemons
                .into_iter()
                .zip(links.into_iter().zip(&options.priorities))
        {
            daemon.wait_ready()?;
            let echo = start_echo(&netns, id, &dir)?;
            let tunnel_echo = match options.wireguard {
                Some(_) => Some(start_echo_at(
                    &netns,
                    id,
                    SocketAddr::from((TUNNEL_ADDR, ECHO_PORT)),
                    &dir.join("tunnel-echo.log"),
                )?),
                None => None,
            };
            gateways.push(HaGateway {
                daemon,
                wireguard_go,
                echo,
                tunnel_echo,
                id,
                priority: *priority,
                ifname,
                switch_port,
                mac,
                dir,
                netns,
            });
        }
        let mut location = Self {
            gateways,
            _xdp_pass: xdp_pass,
            client,
            switch,
            client_if,
            options: options.clone(),
            probers: 0,
            run,
        };
        for gateway in &location.gateways {
            wait_echo(&gateway.echo)?;
            if let Some(echo) = &gateway.tunnel_echo {
                wait_echo(echo)?;
            }
        }
        location.wait_master(options.expected_master(), ELECTION_TIMEOUT)?;
        Ok(location)
    }

    /// The run (id, directory).
    pub fn run(&self) -> &Run {
        &self.run
    }

    /// The options the location was built with.
    pub fn options(&self) -> &HaOptions {
        &self.options
    }

    /// The client namespace.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The client's interface.
    pub fn client_if(&self) -> &str {
        &self.client_if
    }

    /// The switch namespace.
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// The gateway ids, 1 to N.
    pub fn ids(&self) -> Vec<u32> {
        self.gateways.iter().map(HaGateway::id).collect()
    }

    /// Gateway `id`.
    ///
    /// # Panics
    /// If there is no gateway `id`.
    pub fn gateway(&self, id: u32) -> &HaGateway {
        self.gateways
            .iter()
            .find(|g| g.id == id)
            .unwrap_or_else(|| panic!("no gateway {id}"))
    }

    /// Gateway `id`, mutably.
    ///
    /// # Panics
    /// If there is no gateway `id`.
    pub fn gateway_mut(&mut self, id: u32) -> &mut HaGateway {
        self.gateways
            .iter_mut()
            .find(|g| g.id == id)
            .unwrap_or_else(|| panic!("no gateway {id}"))
    }

    /// `tidectl status --json` of gateway `id`.
    pub fn status(&mut self, id: u32) -> Result<HaStatus> {
        self.gateway_mut(id).status()
    }

    /// The status of every gateway whose daemon runs.
    pub fn statuses(&mut self) -> Result<Vec<HaStatus>> {
        let mut out = Vec::new();
        for gateway in &mut self.gateways {
            if gateway.daemon_running() {
                out.push(gateway.status()?);
            }
        }
        Ok(out)
    }

    /// The gateways whose public interface holds the VIP (the kernel's
    /// view), among those whose daemon runs.
    pub fn vip_holders(&mut self) -> Result<Vec<u32>> {
        let mut out = Vec::new();
        for gateway in &mut self.gateways {
            if gateway.daemon_running() && gateway.vip_on_public()? {
                out.push(gateway.id);
            }
        }
        Ok(out)
    }

    /// Polls the running gateways' statuses and the VIP's holders (see
    /// [`Self::vip_holders`]) until `ready` accepts them; returns the
    /// statuses seen then. On timeout the error shows the last state and
    /// every daemon's log tail.
    pub fn wait_state(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&[HaStatus], &[u32]) -> bool,
    ) -> Result<Vec<HaStatus>> {
        let result = poll_until(what, timeout, POLL, || {
            let statuses = self.statuses()?;
            let holders = self.vip_holders()?;
            Ok(if ready(&statuses, &holders) {
                Probe::Ready(statuses)
            } else {
                Probe::NotYet(format!(
                    "{}; VIP on {holders:?}",
                    statuses
                        .iter()
                        .map(HaStatus::brief)
                        .collect::<Vec<_>>()
                        .join("; ")
                ))
            })
        });
        result.map_err(|error| error.context(self.log_tails()))
    }

    /// Waits until gateway `id` is MASTER and the only one holding the
    /// VIP, and every other running gateway is BACKUP following it.
    /// Returns the statuses seen then.
    pub fn wait_master(&mut self, id: u32, timeout: Duration) -> Result<Vec<HaStatus>> {
        let what = format!("gateway {id} to be the only MASTER, followed by the others");
        self.wait_state(&what, timeout, |statuses, holders| {
            holders == [id]
                && statuses.iter().all(|s| {
                    if s.gateway_id == id {
                        s.role == Role::Master
                    } else {
                        s.role == Role::Backup && s.master == Some(id)
                    }
                })
        })
    }

    /// Polls every running gateway for `duration` and fails as soon as
    /// more than one is MASTER or holds the VIP. Returns the polls made.
    pub fn ensure_single_master_for(&mut self, duration: Duration) -> Result<u32> {
        let start = Instant::now();
        let mut polls = 0;
        while start.elapsed() < duration {
            let statuses = self.statuses()?;
            let masters: Vec<u32> = statuses
                .iter()
                .filter(|s| s.role == Role::Master)
                .map(|s| s.gateway_id)
                .collect();
            let holders = self.vip_holders()?;
            ensure!(
                masters.len() <= 1 && holders.len() <= 1,
                "more than one master: MASTER {masters:?}, VIP on {holders:?}"
            );
            polls += 1;
            std::thread::sleep(POLL);
        }
        Ok(polls)
    }

    /// The MAC address the client's neighbour table has for the VIP, if
    /// it has a usable entry.
    pub fn client_neighbour(&self) -> Result<Option<String>> {
        self.client.neighbour_mac(&self.client_if, IpAddr::V4(VIP))
    }

    /// Waits until the client's neighbour entry for the VIP is gateway
    /// `id`'s MAC.
    pub fn wait_client_neighbour(&self, id: u32, timeout: Duration) -> Result<()> {
        self.wait_neighbour(IpAddr::V4(VIP), id, timeout)
    }

    /// Resolves the VIP afresh from the client: drops the neighbour entry,
    /// pings the VIP once (which makes the client ARP for it), and returns
    /// the MAC that answered, if any.
    pub fn resolve_vip_afresh(&self) -> Result<Option<String>> {
        self.resolve_afresh(IpAddr::V4(VIP))
    }

    /// The MAC the client's IPv6 neighbour table has for [`VIP6`].
    pub fn client_neighbour6(&self) -> Result<Option<String>> {
        self.client.neighbour_mac(&self.client_if, IpAddr::V6(VIP6))
    }

    /// As [`Self::resolve_vip_afresh`], for [`VIP6`] (a neighbour
    /// solicitation instead of ARP).
    pub fn resolve_vip6_afresh(&self) -> Result<Option<String>> {
        self.resolve_afresh(IpAddr::V6(VIP6))
    }

    /// Waits until the client's IPv6 neighbour entry for [`VIP6`] is
    /// gateway `id`'s MAC.
    pub fn wait_client_neighbour6(&self, id: u32, timeout: Duration) -> Result<()> {
        self.wait_neighbour(IpAddr::V6(VIP6), id, timeout)
    }

    /// Drops the client's neighbour entry for `vip`, pings it once (which
    /// makes the client resolve it), and returns the MAC that answered.
    fn resolve_afresh(&self, vip: IpAddr) -> Result<Option<String>> {
        self.client.flush_neighbour(&self.client_if, vip)?;
        self.client.ping_once(vip)?;
        self.client.neighbour_mac(&self.client_if, vip)
    }

    /// Waits until the client's neighbour entry for `vip` is gateway
    /// `id`'s MAC.
    fn wait_neighbour(&self, vip: IpAddr, id: u32, timeout: Duration) -> Result<()> {
        let mac = self.gateway(id).mac().to_owned();
        let what = format!("the client's neighbour entry for {vip} to be gateway {id} ({mac})");
        poll_until(&what, timeout, POLL, || {
            let now = self.client.neighbour_mac(&self.client_if, vip)?;
            Ok(if now.as_deref() == Some(mac.as_str()) {
                Probe::Ready(())
            } else {
                Probe::NotYet(format!("{now:?} ({})", self.mac_owner(now.as_deref())))
            })
        })
    }

    /// Watches the client's interface for ARP messages that place the VIP
    /// at some MAC: gratuitous ARP and answers to the client's requests.
    pub fn watch_vip_claims(&self) -> Result<Capture<VipClaim>> {
        Capture::start(&self.client, &self.client_if, |frame| {
            if frame.protocol != ETH_P_ARP || frame.sent {
                return None;
            }
            arp_claim(frame.packet, VIP).map(|mac| VipClaim { at: frame.at, mac })
        })
    }

    /// Which gateway has MAC `mac`, for messages.
    pub fn mac_owner(&self, mac: Option<&str>) -> String {
        self.gateways
            .iter()
            .find(|g| Some(g.mac()) == mac)
            .map_or_else(|| "no gateway".to_owned(), |g| format!("gateway {}", g.id))
    }

    /// Starts a prober in the client namespace: `count` probes to the VIP,
    /// one every [`probe_interval`].
    pub fn start_prober(&mut self, count: u64) -> Result<Prober> {
        self.probers += 1;
        let out = self.run.dir().join(format!("probe{}.json", self.probers));
        let log = self.run.dir().join(format!("probe{}.log", self.probers));
        let mut command = self.client.command(binary(PROBE_BIN)?);
        command
            .args(["--target", &SocketAddr::from((VIP, ECHO_PORT)).to_string()])
            .args(["--count", &count.to_string()])
            .args(probe_pace())
            .arg("--out")
            .arg(&out);
        let mut process = Process::spawn(PROBE_BIN, &self.client, command, &log)?;
        process.set_grace(PROBER_GRACE);
        let mut prober = Prober { process, out };
        prober.wait_started()?;
        Ok(prober)
    }

    /// Lets the switch flood multicast (the adverts) to gateway `id`'s
    /// port, or not: with flooding off, the gateway neither hears the
    /// others' adverts nor is heard, while unicast and ARP still flow.
    pub fn set_advert_flood(&self, id: u32, on: bool) -> Result<()> {
        let port = self.gateway(id).switch_port().to_owned();
        let mut command = std::process::Command::new("bridge");
        command.args(["-n", self.switch.name(), "link", "set", "dev", &port]);
        command.args(["mcast_flood", if on { "on" } else { "off" }]);
        crate::cmd::run_ok(&mut command, crate::cmd::DEFAULT_TIMEOUT)
            .with_context(|| format!("mcast_flood {on} on {port}"))?;
        Ok(())
    }

    /// The last lines of every daemon's log, for failure messages.
    pub fn log_tails(&self) -> String {
        self.gateways
            .iter()
            .map(|g| format!("--- gateway {} log:\n{}", g.id, g.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// The tracked uplink's name, inside the gateway's own namespace.
pub const UPLINK: &str = "uplink0";
/// The other end of the uplink's veth pair.
const UPLINK_PEER: &str = "uplink1";

/// The config of gateway `id`.
fn gateway_config(
    options: &HaOptions,
    id: u32,
    priority: u8,
    ifname: &str,
    dir: &Path,
    ids: &[u32],
) -> GatewayConfig {
    let mut config = GatewayConfig::shield(
        ifname,
        XdpMode::Auto,
        dir.join("gateway.sock"),
        vec![SocketAddr::from((VIP, SERVICE_PORT))],
    );
    config.state_dir = Some(dir.join("state"));
    let peers = match options.transport {
        AdvertTransport::Multicast => Vec::new(),
        AdvertTransport::Unicast => ids
            .iter()
            .filter(|&&other| other != id)
            .map(|&other| IpAddr::V4(gateway_addr(other)))
            .collect(),
    };
    config.ha = Some(HaSection {
        track: Vec::new(),
        location_id: LOCATION_ID,
        gateway_id: id,
        priority: Some(priority),
        advert_interval_ms: Some(options.advert_interval_ms),
        preempt: None,
        preempt_delay_ms: None,
        key: KEY.to_owned(),
        vips: if options.ipv6 {
            vec![IpAddr::V4(VIP), IpAddr::V6(VIP6)]
        } else {
            vec![IpAddr::V4(VIP)]
        },
        port: None,
        multicast_group: None,
        peers,
        kick_rate: None,
        handover_window_ms: None,
        mode: None,
    });
    config.hooks.clone_from(&options.hooks);
    config
}

/// Starts gateway `id`'s echo service on the VIP.
fn start_echo(netns: &Netns, id: u32, dir: &Path) -> Result<Process> {
    start_echo_at(
        netns,
        id,
        SocketAddr::from((VIP, ECHO_PORT)),
        &dir.join("echo.log"),
    )
}

/// Starts gateway `id`'s echo service on `bind`, logging to `log`.
pub fn start_echo_at(netns: &Netns, id: u32, bind: SocketAddr, log: &Path) -> Result<Process> {
    let mut command = netns.command(binary(ECHO_BIN)?);
    command.args(["--bind", &bind.to_string()]).args([
        "--id",
        &id.to_string(),
        "--lifetime-secs",
        "600",
    ]);
    Process::spawn(ECHO_BIN, netns, command, log)
}

/// Waits until an echo service says it listens.
fn wait_echo(echo: &Process) -> Result<()> {
    poll_until(
        &format!("{ECHO_BIN} (pid {}) to listen", echo.pid()),
        Duration::from_secs(5),
        Duration::from_millis(10),
        || {
            let mut log = echo.log();
            // Only whole lines: the echo may be writing the one it is on.
            log.truncate(log.rfind('\n').map_or(0, |i| i + 1));
            if log.contains("listening on") {
                Ok(Probe::Ready(()))
            } else if log.contains("tidegate-echo:") {
                bail!("{ECHO_BIN} failed: {log}")
            } else {
                Ok(Probe::NotYet(log))
            }
        },
    )
}

/// Starts gateway `id`'s echo service on `bind` (log in `log`) and waits
/// until it listens.
pub fn start_echo_listening(
    netns: &Netns,
    id: u32,
    bind: SocketAddr,
    log: &Path,
) -> Result<Process> {
    let echo = start_echo_at(netns, id, bind, log)?;
    wait_echo(&echo)?;
    Ok(echo)
}

/// Starts `tidegate-echo` for gateway `id` on the VIP in `netns` (log in
/// `dir`) and waits until it listens: for labs that put another election
/// on this segment (the keepalived comparison of the failover benchmark).
pub fn start_echo_service(netns: &Netns, id: u32, dir: &Path) -> Result<Process> {
    let echo = start_echo(netns, id, dir)?;
    wait_echo(&echo)?;
    Ok(echo)
}

/// Starts a prober in `client` as [`HaLocation::start_prober`] does:
/// `count` probes to the VIP, one every 10 ms, its summary and log in
/// `dir` as `<name>.json` and `<name>.log`.
pub fn start_prober_in(client: &Netns, dir: &Path, name: &str, count: u64) -> Result<Prober> {
    start_prober_to(client, SocketAddr::from((VIP, ECHO_PORT)), dir, name, count)
}

/// Starts a prober in `client` sending `count` probes to `target`, one
/// every [`probe_interval`], its summary and log in `dir` as `<name>.json`
/// and `<name>.log`.
pub fn start_prober_to(
    client: &Netns,
    target: SocketAddr,
    dir: &Path,
    name: &str,
    count: u64,
) -> Result<Prober> {
    start_prober_paced(client, target, dir, name, count, probe_interval(), None)
}

/// Starts a prober as [`start_prober_to`] does, one probe every `interval`;
/// with `snapshot`, it rewrites its summary that often while it probes
/// (read with [`Prober::snapshot`]).
pub fn start_prober_paced(
    client: &Netns,
    target: SocketAddr,
    dir: &Path,
    name: &str,
    count: u64,
    interval: Duration,
    snapshot: Option<Duration>,
) -> Result<Prober> {
    let out = dir.join(format!("{name}.json"));
    let log = dir.join(format!("{name}.log"));
    let mut command = client.command(binary(PROBE_BIN)?);
    command
        .args(["--target", &target.to_string()])
        .args(["--count", &count.to_string()])
        .args(["--interval-ms", &interval.as_millis().to_string()])
        .args([
            "--reply-wait-ms",
            &probe_reply_wait().as_millis().to_string(),
        ])
        .arg("--out")
        .arg(&out);
    if let Some(every) = snapshot {
        command.args(["--snapshot-ms", &every.as_millis().max(1).to_string()]);
    }
    let mut process = Process::spawn(PROBE_BIN, client, command, &log)?;
    process.set_grace(PROBER_GRACE);
    let mut prober = Prober { process, out };
    prober.wait_started()?;
    Ok(prober)
}

/// The locations' advert interval: 100 ms on the host; 400 ms where the
/// CPUs are emulated, where a daemon's turn on the one emulated core comes
/// late often enough, by up to about 900 ms while the kernel applies a
/// WireGuard change, to make three adverts' silence at 200 ms.
pub fn advert_interval_ms() -> u64 {
    crate::pace::load(100, 400)
}

/// How often a prober probes: every 10 ms on the host; every 25 ms where
/// the CPUs are emulated, whose few emulated cores also run every client's
/// WireGuard.
pub fn probe_interval() -> Duration {
    Duration::from_millis(crate::pace::load(10, 25))
}

/// How long a probe waits for its answer before it counts as lost: 500 ms,
/// stretched to the machine's speed.
pub fn probe_reply_wait() -> Duration {
    crate::pace::stretch(Duration::from_millis(500))
}

fn probe_pace() -> [String; 4] {
    [
        "--interval-ms".into(),
        probe_interval().as_millis().to_string(),
        "--reply-wait-ms".into(),
        probe_reply_wait().as_millis().to_string(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_claims_of_the_vip_are_told_from_the_rest() {
        let mac = [0x02, 0xaa, 0, 0, 0, 0x0b];
        // What a packet socket of type SOCK_DGRAM gives: no Ethernet header.
        let garp =
            |ip: Ipv4Addr| tidegate_gateway::ha::announce::gratuitous_arp(ip, mac)[14..].to_vec();
        assert_eq!(
            arp_claim(&garp(VIP), VIP).as_deref(),
            Some("02:aa:00:00:00:0b")
        );
        assert_eq!(arp_claim(&garp(CLIENT_ADDR), VIP), None);
        assert_eq!(arp_claim(&garp(VIP)[..17], VIP), None);
        let mut not_ethernet = garp(VIP);
        not_ethernet[1] = 6;
        assert_eq!(arp_claim(&not_ethernet, VIP), None);
    }

    #[test]
    fn the_expected_master_is_the_highest_priority_then_the_highest_id() {
        assert_eq!(HaOptions::priorities(&[100, 110, 120]).expected_master(), 3);
        assert_eq!(HaOptions::priorities(&[120, 110]).expected_master(), 1);
        assert_eq!(HaOptions::priorities(&[100, 100]).expected_master(), 2);
    }

    #[test]
    fn parses_a_status() {
        let json = r#"{"location_id":7,"gateway_id":2,"role":"backup","priority":110,
            "advert_interval_ms":100,"advert_version":2,"master":3,"maintenance":false,
            "vips":["198.51.100.100"],"vips_held":[],
            "peers":[{"gateway_id":3,"role":"master","priority":120,"healthy":true,
                      "maintenance":false,"last_seen_ms":12,"advert_version":2}],
            "transitions":[{"at_ms":1000,"from":"init","to":"backup","reason":"started"},
                           {"at_ms":1400,"from":"backup","to":"master","reason":"no master heard"},
                           {"at_ms":1500,"from":"master","to":"backup","reason":"gateway 3 outranks this one"},
                           {"at_ms":1600,"from":"backup","to":"backup","reason":"maintenance on"}],
            "dropped":{"bad-mac":4}}"#;
        let status = HaStatus::parse(json).unwrap();
        assert_eq!(status.role, Role::Backup);
        assert_eq!(status.master, Some(3));
        assert_eq!(status.peers[0].role, Role::Master);
        assert_eq!(status.dropped("bad-mac"), 4);
        assert_eq!(status.dropped("replay"), 0);
        assert_eq!(status.last_change_to(Role::Backup).unwrap().at_ms, 1500);
        assert_eq!(status.last_change_to(Role::Master).unwrap().at_ms, 1400);
        assert_eq!(status.changes().len(), 3);
        assert!(status.brief().contains("gw 2 BACKUP"), "{}", status.brief());
    }

    #[test]
    fn ha_section_in_toml() {
        let options = HaOptions {
            transport: AdvertTransport::Unicast,
            ..HaOptions::priorities(&[100, 120, 110])
        };
        let toml =
            gateway_config(&options, 2, 120, "tg0g2", Path::new("/r/gw2"), &[1, 2, 3]).to_toml();
        assert!(
            toml.ends_with(
                "\n[ha]\nlocation_id = 7\ngateway_id = 2\npriority = 120\n\
                 advert_interval_ms = 100\nkey = \"tidegate-ha-test-location-key\"\n\
                 vips = [\"198.51.100.100\"]\npeers = [\"198.51.100.1\", \"198.51.100.3\"]\n"
            ),
            "{toml}"
        );
        assert!(toml.contains("address = \"198.51.100.100\"\nport = 51820\n"));
        let multicast = gateway_config(
            &HaOptions::priorities(&[1]),
            1,
            1,
            "x",
            Path::new("/r"),
            &[1],
        )
        .to_toml();
        assert!(!multicast.contains("peers"), "{multicast}");
    }
}
