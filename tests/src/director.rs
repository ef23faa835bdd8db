//! A location in director mode: gateways with `[ha] mode = "director"`,
//! each running the location's WireGuard interface with every client as a
//! peer, and many real WireGuard clients, each in a namespace of its own,
//! all on one switched segment.
//!
//! ```text
//!  gateway i ns (i = 1..)                     switch ns                   client j ns (j = 0..)
//!  tg<id>g<i> 198.51.100.i/24 (XDP) -- tg<id>p<i> [tg<id>br] tg<id>q<j> -- tg<id>c<j> 198.51.100.(10+j)/24
//!  tg<id>w<i> 10.77.0.1/24, UDP 51820      (XDP_PASS on p<i>)               tg<id>k<j> 10.77.0.(10+j)/24,
//!  (wireguard-go, started by the daemon)                                    UDP 51000+j, peer: VIP:51820
//!  VIP 198.51.100.100 on lo; the master's also on g<i>
//! ```
//!
//! Every gateway has the same WireGuard private key, listen port, address
//! and peers: any of them can serve any client. The master holds the VIP
//! and steers each client to one gateway; a gateway answers the clients
//! steered to it itself, from the VIP. The switch's ports toward the
//! gateways carry an `XDP_PASS` program: a veth drops frames sent with
//! `XDP_TX` unless its peer runs XDP too. Each client listens on a port of
//! its own, so its (address, port), and with it the gateway the Maglev
//! table gives it, is known before it sends. Clients compute their UDP
//! checksums in software (TX checksum offload off), as frames from a real
//! network arrive: `XDP_TX` passes on a veth's unfinished offload checksum
//! as it is.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use aya::{
    Ebpf,
    programs::{Xdp, XdpMode as AyaXdpMode},
};
use tidegate_common::director::{DEFAULT_TABLE_SIZE, client_hash, table_index};
use tidegate_gateway::{
    director::maglev,
    xdp::{self, DirectorStatus, SessionEntry, director::client_key},
};

use crate::bins::binary;
use crate::gateway::{
    GATEWAY_BIN, GatewayConfig, GatewayDaemon, HaSection, PeerEntry, PeersReply, TIDECTL_BIN,
    WireguardSection, XdpMode,
};
use crate::ha::{HaStatus, KEY, LOCATION_ID, Role};
use crate::netns::{Netns, PingReport, bridge, veth};
use crate::run::Run;
use crate::wait::{Probe, poll_until};
use crate::wireguard::{DetachedWireguardGo, KeyPair, PeerStats, WgInterface, WgPeer};

/// The location's floating address.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
/// The location's WireGuard port.
pub const WG_PORT: u16 = 51820;
/// Every gateway's tunnel address.
pub const GATEWAY_TUNNEL: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Most clients a location holds here.
pub const MAX_CLIENTS: usize = 64;
/// Most gateways a location holds here.
pub const MAX_GATEWAYS: usize = 9;
/// How long the first election, and the director's first table, may take.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(15);
/// How often state polls ask the daemons.
const POLL: Duration = Duration::from_millis(50);

/// The segment address of gateway `id`: `198.51.100.<id>`.
pub fn gateway_addr(id: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, u8::try_from(id).unwrap_or(u8::MAX))
}

/// The segment address of client `j`: `198.51.100.(10+j)`.
pub fn client_addr(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, 10 + u8::try_from(j).unwrap_or(u8::MAX))
}

/// The tunnel address of client `j`: `10.77.0.(10+j)`.
pub fn client_tunnel(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 10 + u8::try_from(j).unwrap_or(u8::MAX))
}

/// The UDP port client `j`'s WireGuard listens and sends on.
pub fn client_port(j: usize) -> u16 {
    51_000 + u16::try_from(j).unwrap_or(u16::MAX)
}

/// The gateway the Maglev table of `members` gives to the client at
/// `client`, as every director computes it.
pub fn predicted(members: &[u32], client: SocketAddr) -> Result<u32> {
    let table = maglev::build(members, DEFAULT_TABLE_SIZE)?;
    let index = table_index(client_hash(&client_key(client)), DEFAULT_TABLE_SIZE) as usize;
    Ok(u32::from(table[index]))
}

/// What a [`DirectorLocation`] is made of.
#[derive(Debug, Clone)]
pub struct DirectorOptions {
    /// One gateway per entry, with this priority; ids are 1, 2, ...
    pub priorities: Vec<u8>,
    /// Client namespaces, each with its WireGuard interface configured
    /// (none has sent anything yet).
    pub clients: usize,
}

impl DirectorOptions {
    /// The gateway that wins the first election.
    pub fn expected_master(&self) -> u32 {
        (1_u32..)
            .zip(&self.priorities)
            .max_by_key(|(id, priority)| (**priority, *id))
            .map_or(0, |(id, _)| id)
    }
}

/// One gateway. Fields drop in order: the daemon (SIGTERM), the
/// wireguard-go it started, the namespace handle.
#[derive(Debug)]
pub struct DirectorGateway {
    daemon: GatewayDaemon,
    wg: DetachedWireguardGo,
    id: u32,
    ifname: String,
    dir: PathBuf,
    netns: Netns,
}

impl DirectorGateway {
    /// The gateway id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The gateway's directory (config, logs, control socket).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `tidectl <args>`; it must succeed.
    pub fn tidectl_ok(&mut self, args: &[&str]) -> Result<String> {
        self.daemon
            .tidectl_ok(args)
            .with_context(|| format!("`tidectl {}` on gateway {}", args.join(" "), self.id))
    }

    /// `tidectl status --json`.
    pub fn status(&mut self) -> Result<HaStatus> {
        HaStatus::parse(&self.tidectl_ok(&["status", "--json"])?)
    }

    /// `tidectl director --json`.
    pub fn director(&mut self) -> Result<DirectorStatus> {
        let json = self.tidectl_ok(&["director", "--json"])?;
        serde_json::from_str(&json).with_context(|| format!("parsing director JSON {json:?}"))
    }

    /// `tidectl sessions --json`.
    pub fn sessions(&mut self) -> Result<Vec<SessionEntry>> {
        let json = self.tidectl_ok(&["sessions", "--json"])?;
        serde_json::from_str(&json).with_context(|| format!("parsing sessions JSON {json:?}"))
    }

    /// `tidectl peers --json`.
    pub fn peers(&mut self) -> Result<PeersReply> {
        self.daemon.peers()
    }

    /// A host crash: the daemon dies with SIGKILL and the public link goes
    /// down, so nothing on the host answers any more (its wireguard-go
    /// lives on, cut off, until teardown).
    pub fn crash(&mut self) -> Result<()> {
        self.daemon.kill()?;
        self.netns
            .ip(&["link", "set", "dev", &self.ifname, "down"])?;
        Ok(())
    }

    /// Whether the daemon still runs.
    pub fn running(&mut self) -> bool {
        self.daemon.ensure_running().is_ok()
    }

    /// The daemon's log tail, for failure messages.
    pub fn log_tail(&self) -> String {
        self.daemon.log_tail()
    }

    /// The wireguard-go that serves this gateway's interface.
    pub fn wireguard(&self) -> &DetachedWireguardGo {
        &self.wg
    }
}

/// One client. Fields drop in order: its WireGuard (wireguard-go
/// stopped), then the namespace handle.
#[derive(Debug)]
pub struct DirectorClient {
    wg: WgInterface,
    index: usize,
    netns: Netns,
}

impl DirectorClient {
    /// The client's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The (address, port) its WireGuard sends from: its session key.
    pub fn endpoint(&self) -> SocketAddr {
        SocketAddr::from((client_addr(self.index), client_port(self.index)))
    }

    /// Its public key.
    pub fn public_key(&self) -> &str {
        self.wg.public_key()
    }

    /// Pings the gateways' tunnel address through the tunnel `count`
    /// times; every echo must be answered.
    pub fn ping(&self, count: u32) -> Result<PingReport> {
        self.netns
            .ping(IpAddr::V4(GATEWAY_TUNNEL), count)
            .with_context(|| format!("client {} pinging through its tunnel", self.index))
    }

    /// Pings through the tunnel once a second until an echo comes back,
    /// at most `timeout`.
    pub fn ping_until_answered(&self, timeout: Duration) -> Result<()> {
        poll_until(
            &format!("client {} to get an answer through its tunnel", self.index),
            timeout,
            Duration::from_millis(10),
            || {
                Ok(if self.netns.ping_once(IpAddr::V4(GATEWAY_TUNNEL))? {
                    Probe::Ready(())
                } else {
                    Probe::NotYet("no echo".into())
                })
            },
        )
    }

    /// Unix time of the client's last completed handshake (0: none).
    pub fn latest_handshake(&self) -> Result<u64> {
        Ok(self.peer()?.latest_handshake)
    }

    /// Where the client sends to its one peer, the location, as its
    /// WireGuard has it now (it follows the address answers come from).
    pub fn peer_endpoint(&self) -> Result<Option<String>> {
        Ok(self.peer()?.endpoint)
    }

    fn peer(&self) -> Result<PeerStats> {
        let peers: Vec<PeerStats> = self.wg.peers()?;
        match <[PeerStats; 1]>::try_from(peers) {
            Ok([peer]) => Ok(peer),
            Err(peers) => bail!("client {} has {} peers, not one", self.index, peers.len()),
        }
    }
}

/// The whole location. Fields drop in order: gateways, clients, the
/// `XDP_PASS` programs on the switch, the switch, the run directory.
#[derive(Debug)]
pub struct DirectorLocation {
    gateways: Vec<DirectorGateway>,
    clients: Vec<DirectorClient>,
    passes: Ebpf,
    switch: Netns,
    options: DirectorOptions,
    run: Run,
}

impl DirectorLocation {
    /// Builds everything, starts the daemons at about the same time, and
    /// waits until the expected master steers across every gateway.
    pub fn build(options: &DirectorOptions) -> Result<Self> {
        for name in [GATEWAY_BIN, TIDECTL_BIN] {
            binary(name)?;
        }
        ensure!(
            (1..=MAX_GATEWAYS).contains(&options.priorities.len()),
            "1 to {MAX_GATEWAYS} gateways, not {}",
            options.priorities.len()
        );
        ensure!(
            options.clients <= MAX_CLIENTS,
            "at most {MAX_CLIENTS} clients, not {}",
            options.clients
        );
        let run = Run::new()?;
        let switch = Netns::create(&run.netns_name("switch"))?;
        let keys = KeyPair::generate()?;
        let mut ports = Vec::new();

        let mut clients = Vec::with_capacity(options.clients);
        for index in 0..options.clients {
            let netns = Netns::create(&run.netns_name(&format!("c{index}")))?;
            let link = run.ifname(&format!("c{index}"));
            let port = run.ifname(&format!("q{index}"));
            veth(&netns, &link, &switch, &port)?;
            netns.add_addr(&link, &format!("{}/24", client_addr(index)))?;
            netns.set_up(&link)?;
            // A veth sends with the UDP checksum left to offload; a frame
            // the director passes on with XDP_TX keeps it unfinished and
            // the gateway drops it (UdpInCsumErrors). A real client's
            // frames arrive with it complete: compute it in software.
            netns.exec_ok("ethtool", &["-K", &link, "tx", "off"])?;
            ports.push(port);
            let wg = WgInterface::create(&netns, &run.ifname(&format!("k{index}")), run.dir())
                .with_context(|| format!("creating the WireGuard interface of client {index}"))?;
            wg.set_listen_port(client_port(index))?;
            wg.add_peer(&WgPeer {
                public_key: &keys.public,
                endpoint: Some(SocketAddr::from((VIP, WG_PORT))),
                allowed_ips: &[&format!("{GATEWAY_TUNNEL}/32")],
                persistent_keepalive: None,
            })?;
            wg.add_addr(&format!("{}/24", client_tunnel(index)))?;
            wg.up()?;
            clients.push(DirectorClient { wg, index, netns });
        }
        let peers: Vec<PeerEntry> = clients
            .iter()
            .map(|c| PeerEntry {
                name: Some(format!("client{}", c.index)),
                public_key: c.public_key().to_owned(),
                allowed_ips: vec![format!("{}/32", client_tunnel(c.index))],
                ..PeerEntry::default()
            })
            .collect();

        let ids: Vec<u32> = (1..=options.priorities.len() as u32).collect();
        let mut links = Vec::new();
        let mut gateway_ports = Vec::new();
        for &id in &ids {
            let netns = Netns::create(&run.netns_name(&format!("gw{id}")))?;
            let ifname = run.ifname(&format!("g{id}"));
            let port = run.ifname(&format!("p{id}"));
            veth(&netns, &ifname, &switch, &port)?;
            netns.add_addr(&ifname, &format!("{}/24", gateway_addr(id)))?;
            netns.set_up(&ifname)?;
            ports.push(port.clone());
            gateway_ports.push(port);
            links.push((id, netns, ifname));
        }
        let port_refs: Vec<&str> = ports.iter().map(String::as_str).collect();
        bridge(&switch, &run.ifname("br"), &port_refs)?;
        let passes = attach_passes(&switch, &gateway_ports)?;

        let mut spawned = Vec::new();
        for ((id, netns, ifname), priority) in links.into_iter().zip(&options.priorities) {
            let dir = run.dir().join(format!("gw{id}"));
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let wg_name = run.ifname(&format!("w{id}"));
            // Before the daemon: if the start fails half-way, the daemon
            // goes first and then its wireguard-go.
            let wg = DetachedWireguardGo::new(&netns, &wg_name);
            let mut config = GatewayConfig::shield(
                &ifname,
                XdpMode::Auto,
                dir.join("gateway.sock"),
                vec![SocketAddr::from((VIP, WG_PORT))],
            );
            config.state_dir = Some(dir.join("state"));
            config.bpf_pin_dir = Some(run.bpffs()?);
            config.wireguard = Some(WireguardSection {
                interface: wg_name,
                backend: "auto".into(),
                private_key: Some(keys.private.clone()),
                listen_port: Some(WG_PORT),
                addresses: vec![format!("{GATEWAY_TUNNEL}/24")],
                mtu: None,
                stats_interval_ms: Some(200),
                mfa: false,
                peer_disconnect_threshold_secs: None,
            });
            config.peers = peers.clone();
            config.ha = Some(HaSection {
                location_id: LOCATION_ID,
                gateway_id: id,
                priority: Some(*priority),
                advert_interval_ms: Some(crate::ha::advert_interval_ms()),
                preempt: None,
                preempt_delay_ms: None,
                key: KEY.to_owned(),
                vips: vec![IpAddr::V4(VIP)],
                port: None,
                multicast_group: None,
                peers: Vec::new(),
                track: Vec::new(),
                kick_rate: None,
                handover_window_ms: None,
                mode: Some("director".into()),
            });
            let daemon = GatewayDaemon::spawn(&netns, config, &dir)?;
            spawned.push(DirectorGateway {
                daemon,
                wg,
                id,
                ifname,
                dir,
                netns,
            });
        }
        let mut location = Self {
            gateways: spawned,
            clients,
            passes,
            switch,
            options: options.clone(),
            run,
        };
        for gateway in &mut location.gateways {
            gateway.daemon.wait_ready()?;
        }
        let master = options.expected_master();
        location.wait_steering(master, &ids, &[], SETTLE_TIMEOUT)?;
        Ok(location)
    }

    /// The run (id, directory).
    pub fn run(&self) -> &Run {
        &self.run
    }

    /// The options it was built with.
    pub fn options(&self) -> &DirectorOptions {
        &self.options
    }

    /// The switch namespace.
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// The `XDP_PASS` programs on the switch's gateway ports.
    pub fn passes(&self) -> &Ebpf {
        &self.passes
    }

    /// Gateway `id`.
    ///
    /// # Panics
    /// If there is no gateway `id`.
    pub fn gateway(&mut self, id: u32) -> &mut DirectorGateway {
        self.gateways
            .iter_mut()
            .find(|g| g.id == id)
            .unwrap_or_else(|| panic!("no gateway {id}"))
    }

    /// The clients.
    pub fn clients(&self) -> &[DirectorClient] {
        &self.clients
    }

    /// Waits until gateway `master` is MASTER, the only gateway whose
    /// director is on, and steers across `backends` (by id) with
    /// `draining` among them taking no new clients; returns its director
    /// status then. On timeout the error shows the last state and every
    /// daemon's log tail.
    pub fn wait_steering(
        &mut self,
        master: u32,
        backends: &[u32],
        draining: &[u32],
        timeout: Duration,
    ) -> Result<DirectorStatus> {
        let what = format!(
            "gateway {master} to steer across {backends:?} (draining {draining:?}) as the only director"
        );
        let result = poll_until(&what, timeout, POLL, || {
            let mut seen = Vec::new();
            let mut ready = None;
            let mut others_off = true;
            for gateway in &mut self.gateways {
                if !gateway.running() {
                    continue;
                }
                let status = gateway.status()?;
                let director = gateway.director()?;
                seen.push(format!(
                    "gw {} {} director {} backends {:?}",
                    gateway.id,
                    status.role,
                    if director.on { "on" } else { "off" },
                    director
                        .backends
                        .iter()
                        .filter(|b| b.present)
                        .map(|b| (b.gateway_id, b.draining, b.table_entries))
                        .collect::<Vec<_>>()
                ));
                if gateway.id == master {
                    let present: Vec<u32> = director
                        .backends
                        .iter()
                        .filter(|b| b.present)
                        .map(|b| b.gateway_id)
                        .collect();
                    let settled = director.backends.iter().filter(|b| b.present).all(|b| {
                        let drains = draining.contains(&b.gateway_id);
                        b.draining == drains && (b.table_entries == 0) == drains
                    });
                    if status.role == Role::Master && director.on && present == backends && settled
                    {
                        ready = Some(director);
                    }
                } else if director.on || status.role == Role::Master {
                    others_off = false;
                }
            }
            Ok(match ready {
                Some(director) if others_off => Probe::Ready(director),
                _ => Probe::NotYet(seen.join("; ")),
            })
        });
        result.map_err(|error| error.context(self.log_tails()))
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

/// Attaches the empty `XDP_PASS` program to each of `ports` in `switch`.
/// Loads the `XDP_PASS` program and attaches it to the switch's `ports`.
pub fn attach_passes(switch: &Netns, ports: &[String]) -> Result<Ebpf> {
    let mut ebpf = Ebpf::load(xdp::BASELINE_OBJECT).context("loading the XDP_PASS program")?;
    let program: &mut Xdp = ebpf
        .program_mut("tidegate_baseline")
        .context("no tidegate_baseline program")?
        .try_into()?;
    program.load()?;
    for port in ports {
        switch
            .run(|| program.attach(port, AyaXdpMode::Driver))?
            .with_context(|| format!("attaching XDP_PASS to {port}"))?;
    }
    Ok(ebpf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_ports_are_distinct_and_in_test_net() {
        let endpoints: std::collections::BTreeSet<SocketAddr> = (0..MAX_CLIENTS)
            .map(|j| SocketAddr::from((client_addr(j), client_port(j))))
            .collect();
        assert_eq!(endpoints.len(), MAX_CLIENTS);
        assert_eq!(client_addr(0), Ipv4Addr::new(198, 51, 100, 10));
        assert_eq!(
            client_addr(MAX_CLIENTS - 1),
            Ipv4Addr::new(198, 51, 100, 73)
        );
        assert!(client_addr(MAX_CLIENTS - 1) != VIP);
        assert_eq!(client_tunnel(3), Ipv4Addr::new(10, 77, 0, 13));
    }

    #[test]
    fn the_expected_master_has_the_highest_priority() {
        let options = DirectorOptions {
            priorities: vec![100, 110, 120],
            clients: 0,
        };
        assert_eq!(options.expected_master(), 3);
    }
}
