//! A Tidegate location whose gateway daemon runs the WireGuard interface
//! itself: a gateway namespace, N client namespaces on one switched segment,
//! and a real WireGuard client (wireguard-go) in each client namespace,
//! peered with the gateway.
//!
//! ```text
//!  client i ns                         switch ns          gateway ns
//!  tg<id>c<i> 198.51.100.(i+2)/24 -- tg<id>c<i>b [tg<id>br] tg<id>gb -- tg<id>g 198.51.100.1 (XDP)
//!  tg<id>w<i> 10.77.0.(i+2)/32  ===== WireGuard, UDP 51820 =====     tg<id>gw 10.77.0.1/24
//!                                                                     (wireguard-go started by
//!                                                                      tidegate-gateway)
//! ```
//!
//! Every client has the gateway as its only peer (endpoint
//! `198.51.100.1:51820`, allowed IPs `10.77.0.0/24`); the gateway's config
//! file lists every client as a `[[peer]]` (`client<i>`, allowed IPs
//! `10.77.0.(i+2)/32`) plus any extra peers the test asks for.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::bins::binary;
use crate::gateway::{
    CoreSection, GATEWAY_BIN, GatewayConfig, GatewayDaemon, PeerEntry, PeersReply, TIDECTL_BIN,
    WireguardSection, XdpMode,
};
use crate::netns::{BackgroundPing, Netns, PingReport, bridge, veth};
use crate::run::Run;
use crate::shield::WG_PORT;
use crate::tmpfs::TmpfsMount;
use crate::wireguard::{DetachedWireguardGo, KeyPair, PeerStats, WgInterface, WgPeer};

/// The gateway's address on the segment.
pub const GATEWAY_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// Prefix length of the segment.
pub const UNDERLAY_PREFIX: u8 = 24;
/// The gateway's tunnel address.
pub const GATEWAY_TUNNEL: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The tunnel network.
pub const TUNNEL_NET: &str = "10.77.0.0/24";
/// Prefix length of the gateway's tunnel address.
pub const TUNNEL_PREFIX: u8 = 24;
/// Most clients a location holds (their addresses are `.2` to `.(N+1)`).
pub const MAX_CLIENTS: usize = 8;

/// The segment address of client `i`: `198.51.100.(i+2)`.
///
/// # Panics
/// If `i` is not below [`MAX_CLIENTS`].
pub fn client_underlay(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, host_octet(i))
}

/// The tunnel address of client `i`: `10.77.0.(i+2)`.
///
/// # Panics
/// If `i` is not below [`MAX_CLIENTS`].
pub fn client_tunnel(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, host_octet(i))
}

fn host_octet(i: usize) -> u8 {
    assert!(i < MAX_CLIENTS, "client index {i} >= {MAX_CLIENTS}");
    u8::try_from(i + 2).unwrap_or(u8::MAX)
}

/// What a [`Location`] is made of.
#[derive(Debug, Clone)]
pub struct LocationOptions {
    /// How many client namespaces, each a `[[peer]]` of the gateway.
    pub clients: usize,
    /// More `[[peer]]` entries of the gateway, without a client behind them.
    pub extra_peers: Vec<PeerEntry>,
    /// `backend` in `[wireguard]`: `auto` (what a host picks: the kernel
    /// module where there is one, else wireguard-go), or `userspace` for a
    /// test of wireguard-go itself.
    pub backend: &'static str,
    /// `mfa` in `[wireguard]`.
    pub mfa: bool,
    /// `peer_disconnect_threshold_secs`, if set.
    pub threshold_secs: Option<u64>,
    /// `stats_interval_ms`, if set.
    pub stats_interval_ms: Option<u64>,
    /// Enable IPv4 forwarding in the gateway namespace, so clients reach
    /// each other through the gateway.
    pub ip_forward: bool,
    /// Core manages the gateway: its config gets this `[core]` section and
    /// neither the private key, the listen port nor the clients' peers,
    /// which Core's location config brings (see
    /// [`Location::gateway_private_key`] and [`Client::peer_entry`]).
    pub core: Option<CoreSection>,
    /// The gateway's state directory is a tmpfs of this many bytes, for
    /// the run alone (see [`Location::state_mount`]).
    pub state_tmpfs_bytes: Option<u64>,
}

impl Default for LocationOptions {
    fn default() -> Self {
        Self {
            clients: 1,
            extra_peers: Vec::new(),
            backend: "auto",
            mfa: false,
            threshold_secs: None,
            stats_interval_ms: Some(200),
            ip_forward: false,
            core: None,
            state_tmpfs_bytes: None,
        }
    }
}

/// One client: its namespace and its WireGuard interface.
#[derive(Debug)]
pub struct Client {
    index: usize,
    wg: WgInterface,
    netns: Netns,
}

impl Client {
    /// The client's index in the location.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The name the gateway's config gives this client's peer.
    pub fn name(&self) -> String {
        format!("client{}", self.index)
    }

    /// The client's namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The client's WireGuard interface.
    pub fn wg(&self) -> &WgInterface {
        &self.wg
    }

    /// The client's public key.
    pub fn public_key(&self) -> &str {
        self.wg.public_key()
    }

    /// The client's segment address.
    pub fn underlay(&self) -> Ipv4Addr {
        client_underlay(self.index)
    }

    /// The client's tunnel address.
    pub fn tunnel(&self) -> Ipv4Addr {
        client_tunnel(self.index)
    }

    /// The `[[peer]]` entry of this client in the gateway's config.
    pub fn peer_entry(&self) -> PeerEntry {
        PeerEntry {
            name: Some(self.name()),
            public_key: self.public_key().to_owned(),
            allowed_ips: vec![format!("{}/32", self.tunnel())],
            ..PeerEntry::default()
        }
    }

    /// The UDP port the client's WireGuard listens on (wireguard-go picks
    /// one).
    pub fn listen_port(&self) -> Result<u16> {
        let out = self.wg.wg(&["show", self.wg.name(), "listen-port"])?;
        out.trim()
            .parse()
            .with_context(|| format!("parsing the listen port {out:?} of {}", self.wg.name()))
    }

    /// Pings `target` through the tunnel `count` times, 0.2 s apart; every
    /// echo must be answered.
    pub fn ping(&self, target: Ipv4Addr, count: u32) -> Result<PingReport> {
        self.netns
            .ping(IpAddr::V4(target), count)
            .with_context(|| format!("ping {target} from client{}", self.index))
    }

    /// Starts pinging `target` every `interval` (one second to wait for
    /// each reply) until the ping is finished.
    pub fn start_ping(&self, target: Ipv4Addr, interval: Duration) -> Result<BackgroundPing> {
        self.netns
            .start_ping(IpAddr::V4(target), interval, Duration::from_secs(1))
            .with_context(|| format!("pinging {target} from client{}", self.index))
    }

    /// Pings `target` `count` times, `interval` apart (one second to wait
    /// for each reply), and reports the losses.
    pub fn ping_paced(
        &self,
        target: Ipv4Addr,
        count: u32,
        interval: Duration,
    ) -> Result<PingReport> {
        self.netns
            .ping_paced(IpAddr::V4(target), count, interval, Duration::from_secs(1))
            .with_context(|| format!("paced ping {target} from client{}", self.index))
    }
}

/// The whole location.
///
/// Fields drop in order: the daemon (SIGTERM), then the wireguard-go it
/// started (found by its UAPI socket and stopped by pid), then the clients'
/// WireGuard interfaces, then the namespaces and the run directory.
#[derive(Debug)]
pub struct Location {
    daemon: GatewayDaemon,
    gateway_wg: DetachedWireguardGo,
    clients: Vec<Client>,
    gateway: Netns,
    switch: Netns,
    gateway_keys: KeyPair,
    /// After the daemon, before the run directory it is mounted in.
    state_mount: Option<TmpfsMount>,
    // Last: the run directory goes after everything that writes into it.
    run: Run,
}

impl Location {
    /// Polls `tidectl peers` (the figures of the last stats poll) until
    /// `check` holds, for at most `timeout`.
    pub fn wait_peers(
        &mut self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&PeersReply) -> bool,
    ) -> Result<PeersReply> {
        crate::wait::poll_until(what, timeout, Duration::from_millis(100), || {
            let peers = self.daemon_mut().peers()?;
            Ok(if check(&peers) {
                crate::wait::Probe::Ready(peers)
            } else {
                crate::wait::Probe::NotYet(format!("{peers:?}"))
            })
        })
    }

    /// Builds the segment and the clients, then starts the gateway daemon
    /// with `[wireguard]` and one `[[peer]]` per client (plus the extra
    /// ones), and waits until it answers. The clients are configured but
    /// have sent nothing yet: the first packet a client sends starts its
    /// handshake.
    pub fn build(options: &LocationOptions) -> Result<Self> {
        for name in [GATEWAY_BIN, TIDECTL_BIN] {
            binary(name)?;
        }
        if options.clients > MAX_CLIENTS {
            bail!("{} clients asked, at most {MAX_CLIENTS}", options.clients);
        }
        let run = Run::new()?;
        let gateway = Netns::create(&run.netns_name("gateway"))?;
        let switch = Netns::create(&run.netns_name("switch"))?;
        let gateway_if = run.ifname("g");
        let gateway_port = run.ifname("gb");
        veth(&gateway, &gateway_if, &switch, &gateway_port)?;
        gateway.add_addr(
            &gateway_if,
            &format!("{GATEWAY_UNDERLAY}/{UNDERLAY_PREFIX}"),
        )?;
        gateway.set_up(&gateway_if)?;
        if options.ip_forward {
            gateway.exec_ok(
                "sysctl",
                &[
                    "-q",
                    "-w",
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.send_redirects=0",
                ],
            )?;
        }

        let gateway_keys = KeyPair::generate()?;
        let mut ports = vec![gateway_port];
        let mut clients = Vec::with_capacity(options.clients);
        for index in 0..options.clients {
            let netns = Netns::create(&run.netns_name(&format!("client{index}")))?;
            let link = run.ifname(&format!("c{index}"));
            let port = run.ifname(&format!("c{index}b"));
            veth(&netns, &link, &switch, &port)?;
            netns.add_addr(
                &link,
                &format!("{}/{UNDERLAY_PREFIX}", client_underlay(index)),
            )?;
            netns.set_up(&link)?;
            ports.push(port);

            let wg = WgInterface::create(&netns, &run.ifname(&format!("w{index}")), run.dir())
                .with_context(|| format!("creating the WireGuard interface of client{index}"))?;
            wg.add_peer(&WgPeer {
                public_key: &gateway_keys.public,
                endpoint: Some(SocketAddr::from((GATEWAY_UNDERLAY, WG_PORT))),
                allowed_ips: &[TUNNEL_NET],
                persistent_keepalive: None,
            })?;
            wg.add_addr(&format!("{}/32", client_tunnel(index)))?;
            wg.up()?;
            netns.ip(&["route", "add", TUNNEL_NET, "dev", wg.name()])?;
            clients.push(Client { index, wg, netns });
        }
        let port_refs: Vec<&str> = ports.iter().map(String::as_str).collect();
        bridge(&switch, &run.ifname("br"), &port_refs)?;

        let wg_interface = run.ifname("gw");
        // Before the daemon: if the start fails half-way, the daemon is
        // dropped first and then its wireguard-go.
        let gateway_wg = DetachedWireguardGo::new(&gateway, &wg_interface);
        let managed = options.core.is_some();
        let mut peers: Vec<PeerEntry> = if managed {
            Vec::new()
        } else {
            clients.iter().map(Client::peer_entry).collect()
        };
        peers.extend(options.extra_peers.iter().cloned());
        let mut config = GatewayConfig::shield(
            &gateway_if,
            XdpMode::Auto,
            run.dir().join("gateway.sock"),
            vec![SocketAddr::from((GATEWAY_UNDERLAY, WG_PORT))],
        );
        let state_dir = run.dir().join("state");
        let state_mount = match options.state_tmpfs_bytes {
            Some(bytes) => Some(TmpfsMount::mount(&state_dir, bytes)?),
            None => None,
        };
        config.state_dir = Some(state_dir);
        config.bpf_pin_dir = Some(run.bpffs()?);
        config.wireguard = Some(WireguardSection {
            interface: wg_interface,
            backend: options.backend.into(),
            private_key: (!managed).then(|| gateway_keys.private.clone()),
            listen_port: (!managed).then_some(WG_PORT),
            addresses: vec![format!("{GATEWAY_TUNNEL}/{TUNNEL_PREFIX}")],
            mtu: None,
            stats_interval_ms: options.stats_interval_ms,
            mfa: options.mfa,
            peer_disconnect_threshold_secs: options.threshold_secs,
        });
        config.peers = peers;
        config.core = options.core.clone();
        let daemon = GatewayDaemon::start(&gateway, config, run.dir())?;
        Ok(Self {
            daemon,
            gateway_wg,
            clients,
            gateway,
            switch,
            gateway_keys,
            state_mount,
            run,
        })
    }

    /// The tmpfs holding the gateway's state directory, if the options
    /// asked for one.
    pub fn state_mount(&self) -> Option<&TmpfsMount> {
        self.state_mount.as_ref()
    }

    /// The gateway's WireGuard private key in base64 (the location's key,
    /// which Core sends a Core-managed gateway).
    pub fn gateway_private_key(&self) -> &str {
        &self.gateway_keys.private
    }

    /// The run (id, temporary directory).
    pub fn run(&self) -> &Run {
        &self.run
    }

    /// The gateway namespace.
    pub fn gateway(&self) -> &Netns {
        &self.gateway
    }

    /// The switch namespace.
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// The gateway daemon.
    pub fn daemon(&self) -> &GatewayDaemon {
        &self.daemon
    }

    /// The gateway daemon, mutably (tidectl, restart, config).
    pub fn daemon_mut(&mut self) -> &mut GatewayDaemon {
        &mut self.daemon
    }

    /// The daemon and the clients at once: to drive the daemon while the
    /// clients send traffic from other threads.
    pub fn split_mut(&mut self) -> (&mut GatewayDaemon, &[Client]) {
        (&mut self.daemon, &self.clients)
    }

    /// The gateway's WireGuard public key.
    pub fn gateway_public_key(&self) -> &str {
        &self.gateway_keys.public
    }

    /// The gateway's WireGuard interface name.
    pub fn wg_interface(&self) -> &str {
        self.gateway_wg.interface()
    }

    /// The clients.
    pub fn clients(&self) -> &[Client] {
        &self.clients
    }

    /// Client `i`.
    ///
    /// # Panics
    /// If there is no client `i`.
    pub fn client(&self, i: usize) -> &Client {
        &self.clients[i]
    }

    /// `wg show <if> dump` of the gateway's interface.
    pub fn wg_dump(&self) -> Result<String> {
        self.gateway
            .exec_ok("wg", &["show", self.wg_interface(), "dump"])
            .with_context(|| format!("reading {} in {}", self.wg_interface(), self.gateway.name()))
    }

    /// The gateway's peers as `wg show <if> dump` reports them.
    pub fn wg_peers(&self) -> Result<Vec<PeerStats>> {
        PeerStats::parse_dump(&self.wg_dump()?)
    }

    /// The pid of the wireguard-go serving the gateway's interface, found
    /// through its UAPI socket (none on the kernel backend).
    pub fn wireguard_go_pid(&self) -> Result<Option<u32>> {
        self.gateway_wg.pid()
    }

    /// The gateway's WireGuard interface index and whether it is a kernel
    /// WireGuard link (`ip -d link` says `wireguard`), as the kernel sees it.
    pub fn wg_link(&self) -> Result<(u32, bool)> {
        let out = self
            .gateway
            .ip(&["-d", "-o", "link", "show", "dev", self.wg_interface()])?;
        let index = out
            .split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .with_context(|| format!("no index in {out:?}"))?;
        Ok((index, out.contains(" wireguard ")))
    }

    /// Restarts the daemon (after it was killed) with the same config;
    /// returns the log offset before the restart.
    pub fn restart_daemon(&mut self) -> Result<usize> {
        self.daemon.restart(&self.gateway)
    }
}
