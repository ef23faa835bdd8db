//! A whole control plane in namespaces: Core in an intranet namespace that
//! nothing can reach, gateways (HA, WireGuard run by the daemon, `[core]`
//! link), Edges behind a real nginx in a DMZ namespace, and a client with a
//! real WireGuard interface on the public segment.
//!
//! ```text
//!  intranet ns            mgmt bridge 192.0.2.0/24             public bridge 198.51.100.0/24
//!  Core 192.0.2.1 ----+-- gw<i> ns 192.0.2.(10+i):7443 (link) -- gw<i> 198.51.100.i (XDP, HA,
//!  (no listener)      |                                           VIP 198.51.100.100, WireGuard)
//!                     +-- dmz ns 192.0.2.20:7444+j (Edge links) -- dmz 198.51.100.60:8080 (nginx
//!                                                                  -> Edges on 127.0.0.1:8081+j)
//!                                                                -- client ns 198.51.100.50
//! ```
//!
//! Core dials the gateways' and Edges' link servers on the management
//! segment; clients reach only nginx and the VIP. With several Cores
//! (`cores`), they share a PostgreSQL database in a namespace of its own
//! on the management segment, 192.0.2.5:5432; Core k (`core-k`) is at
//! 192.0.2.k, the first in the intranet namespace, the others in `core<k>`. The PKI is made by
//! `tidegate-core init` and `issue`. Everything is torn down on drop, in
//! order: Core, the gateways (daemon, then its wireguard-go), nginx, the
//! Edges, the client, the namespaces, the run directory.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::bins::binary;
use crate::core_daemon::{CORE_BIN, CoreConfig, CoreDaemon, CorePki};
use crate::edge::{EDGE_BIN, EdgeConfig, EdgeDaemon};
use crate::gateway::{
    CoreSection, GATEWAY_BIN, GatewayConfig, GatewayDaemon, HaSection, TIDECTL_BIN,
    WireguardSection, XdpMode,
};
use crate::ha::HaStatus;
use crate::http::{self, HttpAnswer};
use crate::netns::{Netns, bridge, veth};
use crate::nginx::{Nginx, NginxTls};
use crate::pki::TestPki;
use crate::process::Process;
use crate::run::Run;
use crate::wait::{Probe, poll_until};
use crate::wireguard::{DetachedWireguardGo, WgInterface};
use aya::Ebpf;

/// The location's name in Core.
pub const LOCATION: &str = "lab";
/// The location's floating address.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 100);
/// The WireGuard port.
pub const WG_PORT: u16 = 51820;
/// The gateways' tunnel address.
pub const GATEWAY_TUNNEL: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// Core's management address.
pub const CORE_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The port a gateway serves `/metrics` on (on its management address);
/// Core serves it on the next port of its namespace's loopback, the Edges
/// on [`edge_metrics`].
pub const METRICS_PORT: u16 = 9771;
/// The DMZ's management address (the Edges' link servers).
pub const DMZ_MGMT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
/// The DMZ's public address (nginx).
pub const DMZ_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 60);
/// nginx's public port.
pub const NGINX_PORT: u16 = 8080;
/// nginx's HTTPS port, where users' clients go.
pub const NGINX_TLS_PORT: u16 = 8443;
/// The client's public address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 50);
/// The gateways' link port on the management segment.
pub const GATEWAY_LINK_PORT: u16 = 7443;
/// The HA advert key of the location.
pub const HA_KEY: &str = "tidegate-control-test-key";
/// The Edges' body limit: small, so that an oversized test body still
/// arrives whole with the request's first read (a body the Edge leaves
/// unread makes its close a reset, which nginx reports as 502).
pub const EDGE_BODY_LIMIT: usize = 2048;
/// Most gateways and Edges a lab holds.
pub const MAX_GATEWAYS: usize = 3;
pub const MAX_EDGES: usize = 2;
/// The second location's name in Core (see [`SecondLocation`]).
pub const SECOND_LOCATION: &str = "lab-mfa";
/// The second location's floating address.
pub const SECOND_VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 101);
/// The second location's gateways' tunnel address.
pub const SECOND_TUNNEL: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
/// The port of each gateway's `tidegate-echo` on its tunnel address.
pub const ECHO_PORT: u16 = 7;
/// The PostgreSQL server's address, with several Cores.
pub const DB_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 5)), 5432);
/// Most Cores a lab holds.
pub const MAX_CORES: usize = 3;

/// The management address of Core `k` (1-based): [`CORE_ADDR`] for the
/// first.
pub fn core_addr(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, k as u8)
}

/// The `core_id` of Core `k`.
pub fn core_id(k: usize) -> String {
    format!("core-{k}")
}

/// The public address of client namespace `k` (1-based): [`CLIENT_ADDR`]
/// for the first, 198.51.100.(150 + k) for the others (k up to 100).
pub fn client_addr(k: usize) -> Ipv4Addr {
    match k {
        0 | 1 => CLIENT_ADDR,
        k => Ipv4Addr::new(198, 51, 100, 150 + k as u8),
    }
}

/// The management address of gateway `i` (1-based).
pub fn gateway_mgmt(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 10 + i as u8)
}

/// The public address of gateway `i` (1-based).
pub fn gateway_public(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, i as u8)
}

/// The link address of Edge `j` (1-based).
pub fn edge_link(j: usize) -> SocketAddr {
    SocketAddr::from((DMZ_MGMT, 7443 + j as u16))
}

/// Where Edge `j` (1-based) serves `/metrics`, in the DMZ.
pub fn edge_metrics(j: usize) -> SocketAddr {
    SocketAddr::from((DMZ_MGMT, METRICS_PORT + 1 + j as u16))
}

/// The HTTP address of Edge `j` (1-based), inside the DMZ.
pub fn edge_http(j: usize) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 8080 + j as u16))
}

/// The location (1 or 2) gateway `i` (1-based) serves: the first
/// location's gateways come first.
fn location_of(options: &ControlOptions, i: usize) -> usize {
    if i <= options.gateways { 1 } else { 2 }
}

/// The gateways (1-based indices) of `location`.
fn gateways_of(options: &ControlOptions, location: usize) -> std::ops::RangeInclusive<usize> {
    let second = options.second.as_ref().map_or(0, |s| s.gateways);
    if location == 1 {
        1..=options.gateways
    } else {
        options.gateways + 1..=options.gateways + second
    }
}

/// What a lab is made of.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// 1 to 3 gateways (`gw1`...), each with `[ha]` (priority 200, 100, 50).
    pub gateways: usize,
    /// 0 to 2 Edges (`edge1`...) behind nginx.
    pub edges: usize,
    /// The location uses MFA, with this peer-disconnect threshold.
    pub mfa_threshold_s: Option<u32>,
    /// The location's MFA sessions end after this many seconds.
    pub mfa_session_s: Option<u32>,
    /// The location's allowed IPs (empty: its address networks).
    pub allowed_ips: Vec<String>,
    /// The location's DNS servers.
    pub dns: Vec<String>,
    /// The location's MTU (`None`: the gateways').
    pub mtu: Option<u32>,
    /// Core's `[mfa] challenge_ttl_s`, if set.
    pub challenge_ttl_s: Option<u32>,
    /// Core's `[mfa] device_lockout_after`, if set.
    pub device_lockout_after: Option<u32>,
    /// The Edges' `core_timeout_ms`, if set.
    pub edge_core_timeout_ms: Option<u64>,
    /// How often gateways send their status.
    pub status_interval_ms: u64,
    /// Start Core and create the location, gateways and Edges in it.
    pub start_core: bool,
    /// The gateways' tunnel address (its network holds the devices).
    pub tunnel_address: String,
    /// Client namespaces on the public segment (1 or more): the first is
    /// [`ControlLab::client`], the others [`ControlLab::other_client`].
    pub clients: usize,
    /// The gateways run `[ha] mode = "director"`: the switch's ports
    /// toward them carry an `XDP_PASS` program (a veth drops frames sent
    /// with `XDP_TX` unless its peer runs XDP too) and the clients compute
    /// their UDP checksums in software, as frames from a real network
    /// arrive (`XDP_TX` passes on a veth's unfinished offload checksum).
    pub director: bool,
    /// A second location, with gateways of its own.
    pub second: Option<SecondLocation>,
    /// How the gateways attach their XDP programs.
    pub xdp_mode: XdpMode,
    /// Every daemon serves `/metrics`: see [`ControlLab::metrics_of_gateway`],
    /// [`ControlLab::metrics_of_core`], [`ControlLab::metrics_of_edge`].
    pub metrics: bool,
    /// 1 to 3 Cores; more than one share a PostgreSQL database.
    pub cores: usize,
    /// Core's `[lease]` (duration, renew, poll in ms), if set.
    pub lease_ms: Option<(u64, u64, u64)>,
}

/// A second location on the same segments: [`SECOND_LOCATION`], with MFA,
/// its VIP [`SECOND_VIP`] and tunnel network 10.78.0.0/24, served by
/// gateways numbered after the first location's.
#[derive(Debug, Clone)]
pub struct SecondLocation {
    /// 1 or more gateways (active/standby).
    pub gateways: usize,
    /// The MFA peer-disconnect threshold.
    pub mfa_threshold_s: u32,
}

impl Default for ControlOptions {
    fn default() -> Self {
        Self {
            gateways: 2,
            edges: 2,
            mfa_threshold_s: None,
            mfa_session_s: None,
            allowed_ips: Vec::new(),
            dns: Vec::new(),
            mtu: None,
            challenge_ttl_s: None,
            device_lockout_after: None,
            edge_core_timeout_ms: None,
            status_interval_ms: 300,
            start_core: true,
            tunnel_address: format!("{GATEWAY_TUNNEL}/24"),
            clients: 1,
            director: false,
            second: None,
            xdp_mode: XdpMode::Auto,
            metrics: false,
            cores: 1,
            lease_ms: None,
        }
    }
}

/// One gateway of the lab. Fields drop in the order they are declared.
#[derive(Debug)]
pub struct LabGateway {
    pub name: String,
    /// Its `tidegate-echo` on the tunnel address, once started.
    pub echo: Option<Process>,
    pub daemon: GatewayDaemon,
    /// The wireguard-go the daemon started (stopped after the daemon).
    pub wg: DetachedWireguardGo,
    pub netns: Netns,
    pub dir: PathBuf,
    /// Its interface on the public segment.
    pub public: String,
    /// 1 for the first location, 2 for the second.
    pub location: usize,
    /// Its number in the lab (`gw<index>`), what its echo answers.
    pub index: usize,
}

impl LabGateway {
    /// The gateway's HA role as `tidectl status --json` reports it.
    pub fn role(&mut self) -> Result<String> {
        let out = self.daemon.tidectl_ok(&["status", "--json"])?;
        let status: serde_json::Value = serde_json::from_str(&out)?;
        Ok(status["role"].as_str().unwrap_or_default().to_owned())
    }

    /// `tidectl status --json`.
    pub fn status(&mut self) -> Result<HaStatus> {
        HaStatus::parse(&self.daemon.tidectl_ok(&["status", "--json"])?)
    }

    /// Kills the daemon (SIGKILL) and its echo, and takes its public link
    /// down: a host that died. Its wireguard-go stays, cut off.
    pub fn crash(&mut self) -> Result<()> {
        self.daemon.kill()?;
        if let Some(echo) = self.echo.as_mut() {
            echo.kill()?;
        }
        self.netns
            .ip(&["link", "set", "dev", &self.public, "down"])?;
        Ok(())
    }

    /// The daemon is alive.
    pub fn running(&mut self) -> bool {
        self.daemon.ensure_running().is_ok()
    }

    /// The tunnel address its location's gateways hold.
    pub fn tunnel(&self) -> Ipv4Addr {
        if self.location == 1 {
            GATEWAY_TUNNEL
        } else {
            SECOND_TUNNEL
        }
    }

    /// Starts its `tidegate-echo` on the tunnel address, answering with
    /// its number in the lab, and waits until it listens.
    pub fn start_echo(&mut self) -> Result<()> {
        self.echo = None;
        let log = self.dir.join("echo.log");
        let bind = SocketAddr::from((self.tunnel(), ECHO_PORT));
        self.echo = Some(crate::ha::start_echo_listening(
            &self.netns,
            self.index as u32,
            bind,
            &log,
        )?);
        Ok(())
    }
}

/// The lab. Fields drop in the order they are declared.
#[derive(Debug)]
pub struct ControlLab {
    core: Option<CoreDaemon>,
    /// Cores 2 and 3, each in its namespace (several Cores).
    more_cores: Vec<(CoreDaemon, Netns)>,
    /// The Cores' PostgreSQL, its namespace and the database's name
    /// (several Cores).
    postgres: Option<(tidegate_pgcluster::Cluster, Netns, String)>,
    gateways: Vec<LabGateway>,
    /// The `XDP_PASS` programs on the switch's ports toward the gateways
    /// (director mode).
    _passes: Option<Ebpf>,
    nginx: Option<Nginx>,
    edges: Vec<EdgeDaemon>,
    client_wg: Option<WgInterface>,
    client: Netns,
    other_clients: Vec<Netns>,
    dmz: Netns,
    intranet: Netns,
    switch: Netns,
    pki: CorePki,
    /// The CA of nginx's HTTPS certificate.
    web_ca: PathBuf,
    core_dir: PathBuf,
    options: ControlOptions,
    run: Run,
}

impl ControlLab {
    /// Builds the namespaces, the PKI, starts the gateways, the Edges and
    /// nginx, then (with `start_core`) Core with the location, its gateways
    /// and the Edges created through `tidectl`, and waits until every link
    /// is up and every gateway runs Core's config.
    pub fn build(options: &ControlOptions) -> Result<Self> {
        for name in [CORE_BIN, GATEWAY_BIN, TIDECTL_BIN, EDGE_BIN] {
            binary(name)?;
        }
        let second = options.second.as_ref().map_or(0, |s| s.gateways);
        ensure!(
            (1..=MAX_GATEWAYS).contains(&options.gateways)
                && second <= MAX_GATEWAYS
                && options.edges <= MAX_EDGES,
            "1 to {MAX_GATEWAYS} gateways a location and at most {MAX_EDGES} Edges"
        );
        ensure!(
            (1..=100).contains(&options.clients),
            "1 to 100 client namespaces, not {}",
            options.clients
        );
        ensure!(
            (1..=MAX_CORES).contains(&options.cores),
            "1 to {MAX_CORES} Cores, not {}",
            options.cores
        );
        let run = Run::new()?;
        let switch = Netns::create(&run.netns_name("switch"))?;
        let intranet = Netns::create(&run.netns_name("intranet"))?;
        let dmz = Netns::create(&run.netns_name("dmz"))?;
        let client = Netns::create(&run.netns_name("client"))?;
        let mut mgmt_ports = Vec::new();
        let mut public_ports = Vec::new();

        // Core: on the management segment only.
        let core_if = run.ifname("m0");
        let core_port = run.ifname("mp0");
        veth(&intranet, &core_if, &switch, &core_port)?;
        intranet.add_addr(&core_if, &format!("{CORE_ADDR}/24"))?;
        intranet.set_up(&core_if)?;
        mgmt_ports.push(core_port);

        // More Cores, and their database: on the management segment too.
        let mut core_netns = Vec::new();
        for k in 2..=options.cores {
            let netns = Netns::create(&run.netns_name(&format!("core{k}")))?;
            let ifname = run.ifname(&format!("mc{k}"));
            let port = run.ifname(&format!("mpc{k}"));
            veth(&netns, &ifname, &switch, &port)?;
            netns.add_addr(&ifname, &format!("{}/24", core_addr(k)))?;
            netns.set_up(&ifname)?;
            mgmt_ports.push(port);
            core_netns.push(netns);
        }
        let db_netns = if options.cores > 1 {
            let netns = Netns::create(&run.netns_name("db"))?;
            let ifname = run.ifname("mdb");
            let port = run.ifname("mpdb");
            veth(&netns, &ifname, &switch, &port)?;
            netns.add_addr(&ifname, &format!("{}/24", DB_ADDR.ip()))?;
            netns.set_up(&ifname)?;
            mgmt_ports.push(port);
            Some(netns)
        } else {
            None
        };

        // The DMZ: management (Edge links) and public (nginx).
        let dmz_mgmt = run.ifname("md");
        let dmz_mgmt_port = run.ifname("mpd");
        veth(&dmz, &dmz_mgmt, &switch, &dmz_mgmt_port)?;
        dmz.add_addr(&dmz_mgmt, &format!("{DMZ_MGMT}/24"))?;
        dmz.set_up(&dmz_mgmt)?;
        mgmt_ports.push(dmz_mgmt_port);
        let dmz_public = run.ifname("pd");
        let dmz_public_port = run.ifname("ppd");
        veth(&dmz, &dmz_public, &switch, &dmz_public_port)?;
        dmz.add_addr(&dmz_public, &format!("{DMZ_PUBLIC}/24"))?;
        dmz.set_up(&dmz_public)?;
        public_ports.push(dmz_public_port);

        // The clients: public only.
        let client_link = |netns: &Netns, ifname: &str, addr: Ipv4Addr| -> Result<()> {
            netns.add_addr(ifname, &format!("{addr}/24"))?;
            netns.set_up(ifname)?;
            if options.director {
                netns.exec_ok("ethtool", &["-K", ifname, "tx", "off"])?;
            }
            Ok(())
        };
        let client_if = run.ifname("c");
        let client_port = run.ifname("pc");
        veth(&client, &client_if, &switch, &client_port)?;
        client_link(&client, &client_if, CLIENT_ADDR)?;
        public_ports.push(client_port);
        let mut other_clients = Vec::new();
        for k in 2..=options.clients {
            let netns = Netns::create(&run.netns_name(&format!("client{k}")))?;
            let ifname = run.ifname(&format!("c{k}"));
            let port = run.ifname(&format!("pc{k}"));
            veth(&netns, &ifname, &switch, &port)?;
            client_link(&netns, &ifname, client_addr(k))?;
            public_ports.push(port);
            other_clients.push(netns);
        }

        let mut gateway_links = Vec::new();
        let mut gateway_ports = Vec::new();
        for i in 1..=options.gateways + second {
            let netns = Netns::create(&run.netns_name(&format!("gw{i}")))?;
            let public = run.ifname(&format!("g{i}"));
            let public_port = run.ifname(&format!("pg{i}"));
            veth(&netns, &public, &switch, &public_port)?;
            netns.add_addr(&public, &format!("{}/24", gateway_public(i)))?;
            netns.set_up(&public)?;
            public_ports.push(public_port.clone());
            gateway_ports.push(public_port);
            let mgmt = run.ifname(&format!("m{i}"));
            let mgmt_port = run.ifname(&format!("mp{i}"));
            veth(&netns, &mgmt, &switch, &mgmt_port)?;
            netns.add_addr(&mgmt, &format!("{}/24", gateway_mgmt(i)))?;
            netns.set_up(&mgmt)?;
            mgmt_ports.push(mgmt_port);
            gateway_links.push((i, netns, public));
        }
        fn refs(ports: &[String]) -> Vec<&str> {
            ports.iter().map(String::as_str).collect()
        }
        bridge(&switch, &run.ifname("bm"), &refs(&mgmt_ports))?;
        bridge(&switch, &run.ifname("bp"), &refs(&public_ports))?;
        let passes = if options.director {
            Some(crate::director::attach_passes(&switch, &gateway_ports)?)
        } else {
            None
        };

        let pki = CorePki::init(&run.dir().join("pki"))?;
        let core_dir = run.dir().join("core");
        std::fs::create_dir(&core_dir)
            .with_context(|| format!("creating {}", core_dir.display()))?;

        // Gateways: every daemon first, then wait for each.
        let mut spawned = Vec::new();
        for (i, netns, public) in gateway_links {
            let name = format!("gw{i}");
            let location = location_of(options, i);
            let members = gateways_of(options, location);
            let dir = run.dir().join(&name);
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let wg_name = run.ifname(&format!("w{i}"));
            let wg = DetachedWireguardGo::new(&netns, &wg_name);
            let vip = if location == 1 { VIP } else { SECOND_VIP };
            let mut config = GatewayConfig::shield(
                &public,
                options.xdp_mode,
                dir.join("gateway.sock"),
                vec![SocketAddr::from((vip, WG_PORT))],
            );
            config.state_dir = Some(dir.join("state"));
            config.bpf_pin_dir = Some(run.bpffs()?);
            config.wireguard = Some(WireguardSection {
                interface: wg_name,
                backend: "auto".into(),
                private_key: None,
                listen_port: None,
                addresses: Vec::new(),
                mtu: None,
                stats_interval_ms: Some(200),
                mfa: false,
                peer_disconnect_threshold_secs: None,
            });
            let first = *members.start();
            config.ha = Some(HaSection {
                location_id: location as u32,
                gateway_id: (i - first + 1) as u32,
                priority: Some([200, 100, 50][i - first]),
                advert_interval_ms: Some(100),
                preempt: Some(false),
                preempt_delay_ms: None,
                key: HA_KEY.to_owned(),
                vips: vec![IpAddr::V4(vip)],
                port: None,
                multicast_group: None,
                peers: members
                    .filter(|&other| other != i)
                    .map(|other| IpAddr::V4(gateway_public(other)))
                    .collect(),
                track: Vec::new(),
                kick_rate: None,
                handover_window_ms: None,
                mode: (options.director && location == 1).then(|| "director".to_owned()),
            });
            let mut section = CoreSection::new(
                SocketAddr::from((gateway_mgmt(i), GATEWAY_LINK_PORT)),
                &name,
                pki.issue(&name)?,
            );
            section.status_interval_ms = Some(options.status_interval_ms);
            config.core = Some(section);
            if options.metrics {
                config.metrics = Some(SocketAddr::from((gateway_mgmt(i), METRICS_PORT)));
            }
            let daemon = GatewayDaemon::spawn(&netns, config, &dir)?;
            spawned.push(LabGateway {
                name,
                echo: None,
                daemon,
                wg,
                netns,
                dir,
                public,
                location,
                index: i,
            });
        }
        let mut gateways = Vec::new();
        for mut gateway in spawned {
            gateway.daemon.wait_ready()?;
            gateways.push(gateway);
        }

        let mut edges = Vec::new();
        for j in 1..=options.edges {
            let name = format!("edge{j}");
            let dir = run.dir().join(&name);
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let mut config = EdgeConfig::new(&name, edge_http(j), edge_link(j), pki.issue(&name)?);
            config.trusted_proxies = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
            config.body_limit_bytes = Some(EDGE_BODY_LIMIT);
            config.core_timeout_ms = options.edge_core_timeout_ms;
            if options.metrics {
                config.metrics_listen = Some(edge_metrics(j));
            }
            edges.push(EdgeDaemon::start(&dmz, config, &dir)?);
        }
        // The public web server's certificate, of a CA of its own (a
        // public CA's, in a real deployment), for the address clients use.
        let web = TestPki::new(run.dir(), "web")?.issue(&DMZ_PUBLIC.to_string())?;
        let nginx = if options.edges > 0 {
            let upstreams: Vec<SocketAddr> = (1..=options.edges).map(edge_http).collect();
            Some(Nginx::start(
                &dmz,
                &run.dir().join("nginx"),
                SocketAddr::from((DMZ_PUBLIC, NGINX_PORT)),
                &upstreams,
                Some(&NginxTls {
                    listen: SocketAddr::from((DMZ_PUBLIC, NGINX_TLS_PORT)),
                    cert: web.cert.clone(),
                    key: web.key.clone(),
                }),
            )?)
        } else {
            None
        };

        let postgres = match db_netns {
            Some(netns) => {
                netns.set_up("lo")?;
                let cluster = tidegate_pgcluster::Cluster::start(tidegate_pgcluster::Options {
                    listen: Some(DB_ADDR),
                    netns: Some(netns.name().to_owned()),
                    // Durable: a change Core acknowledged is on disk.
                    fast: false,
                })
                .context("starting the Cores' PostgreSQL")?;
                let database = cluster.create_database("tidegate")?;
                Some((cluster, netns, database))
            }
            None => None,
        };
        let mut lab = Self {
            core: None,
            more_cores: Vec::new(),
            postgres,
            gateways,
            _passes: passes,
            nginx,
            edges,
            client_wg: None,
            client,
            other_clients,
            dmz,
            intranet,
            switch,
            pki,
            web_ca: web.ca,
            core_dir,
            options: options.clone(),
            run,
        };
        lab.wait_master(Duration::from_secs(10))?;
        if second > 0 {
            lab.wait_master_of(2, Duration::from_secs(10))?;
        }
        if options.start_core {
            let mut config = CoreConfig::new(&lab.core_dir, lab.pki.core_files());
            if options.metrics {
                // On loopback: nothing outside Core's namespace reaches it.
                config.metrics = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, METRICS_PORT + 1)));
            }
            lab.start_core(config)?;
            lab.create_location()?;
            for (netns, k) in core_netns.into_iter().zip(2..) {
                lab.start_more_core(netns, k)?;
            }
        }
        Ok(lab)
    }

    /// Starts Core `k` (2 or 3) in `netns`, on the Cores' database, and
    /// waits until it answers as a standby.
    fn start_more_core(&mut self, netns: Netns, k: usize) -> Result<()> {
        let dir = self.run.dir().join(format!("core{k}"));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut config = CoreConfig::new(&dir, self.pki.core_files());
        config.database = self.database_url()?;
        config.core_id = Some(core_id(k));
        config.lease_ms = self.options.lease_ms;
        config.challenge_ttl_s = self.options.challenge_ttl_s;
        config.device_lockout_after = self.options.device_lockout_after;
        config.reconnect_max_ms = Some(1000);
        let core = CoreDaemon::start(&netns, config, &dir)?;
        self.more_cores.push((core, netns));
        Ok(())
    }

    /// The Cores' database, as a URL (several Cores).
    pub fn database_url(&self) -> Result<String> {
        let (cluster, _, database) = self.postgres.as_ref().context("one Core: no PostgreSQL")?;
        Ok(cluster.url(database))
    }

    /// The Cores' PostgreSQL (several Cores).
    pub fn postgres_mut(&mut self) -> Result<&mut tidegate_pgcluster::Cluster> {
        Ok(&mut self.postgres.as_mut().context("one Core: no PostgreSQL")?.0)
    }

    /// Core `k` (1-based).
    pub fn core_k(&self, k: usize) -> Result<&CoreDaemon> {
        match k {
            1 => self.core(),
            k => self
                .more_cores
                .get(k - 2)
                .map(|(core, _)| core)
                .with_context(|| format!("no Core {k}")),
        }
    }

    /// Core `k` (1-based), to stop or signal.
    pub fn core_k_mut(&mut self, k: usize) -> Result<&mut CoreDaemon> {
        match k {
            1 => self.core_mut(),
            k => self
                .more_cores
                .get_mut(k - 2)
                .map(|(core, _)| core)
                .with_context(|| format!("no Core {k}")),
        }
    }

    /// Waits until one of the Cores `among` (1-based) says it leads, and
    /// returns it and its term.
    pub fn wait_leader(&self, among: &[usize], timeout: Duration) -> Result<(usize, u64)> {
        poll_until("a Core to lead", timeout, Duration::from_millis(20), || {
            let mut seen = Vec::new();
            for &k in among {
                match self.core_k(k)?.lease() {
                    Ok(lease) if lease.leading => return Ok(Probe::Ready((k, lease.term))),
                    Ok(lease) => seen.push(format!("core-{k}: {lease:?}")),
                    Err(e) => seen.push(format!("core-{k}: {e:#}")),
                }
            }
            Ok(Probe::NotYet(seen.join("; ")))
        })
    }

    /// The Core that leads now (waiting up to 10 s for one to).
    pub fn leader(&self) -> Result<&CoreDaemon> {
        let all: Vec<usize> = (1..=self.options.cores).collect();
        let (k, _) = self.wait_leader(&all, Duration::from_secs(10))?;
        self.core_k(k)
    }

    /// How many Cores the lab runs.
    pub fn cores(&self) -> usize {
        self.options.cores
    }

    /// A scrape of gateway `i`'s (1-based) `/metrics`, from its namespace,
    /// in Prometheus' text format (options.metrics).
    pub fn metrics_of_gateway(&self, i: usize) -> Result<String> {
        let address = SocketAddr::from((gateway_mgmt(i), METRICS_PORT));
        crate::metrics::scrape(&self.gateway(i).netns, address)
    }

    /// A scrape of Core's `/metrics`, from its namespace (it listens on
    /// loopback only).
    pub fn metrics_of_core(&self) -> Result<String> {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, METRICS_PORT + 1));
        crate::metrics::scrape(&self.intranet, address)
    }

    /// A scrape of Edge `j`'s (1-based) `/metrics`, from the DMZ.
    pub fn metrics_of_edge(&self, j: usize) -> Result<String> {
        crate::metrics::scrape(&self.dmz, edge_metrics(j))
    }

    /// Waits until exactly one gateway of the first location is MASTER (by
    /// its own `tidectl status`) and returns its index.
    pub fn wait_master(&mut self, timeout: Duration) -> Result<usize> {
        self.wait_master_of(1, timeout)
    }

    /// Waits until exactly one running gateway of `location` (1 or 2) is
    /// MASTER and returns its index. Gateways whose daemon is down (a
    /// crash) are not asked.
    pub fn wait_master_of(&mut self, location: usize, timeout: Duration) -> Result<usize> {
        poll_until("one master", timeout, Duration::from_millis(50), || {
            let mut masters = Vec::new();
            for (index, gateway) in self.gateways.iter_mut().enumerate() {
                if gateway.location == location && gateway.running() && gateway.role()? == "master"
                {
                    masters.push(index + 1);
                }
            }
            Ok(match masters.as_slice() {
                [one] => Probe::Ready(*one),
                _ => Probe::NotYet(format!("masters: {masters:?}")),
            })
        })
    }

    /// Starts Core in the intranet namespace with `config`.
    pub fn start_core(&mut self, config: CoreConfig) -> Result<()> {
        let mut config = config;
        config.challenge_ttl_s = config.challenge_ttl_s.or(self.options.challenge_ttl_s);
        config.device_lockout_after = config
            .device_lockout_after
            .or(self.options.device_lockout_after);
        // Reconnect fast in tests.
        config.reconnect_max_ms = config.reconnect_max_ms.or(Some(1000));
        if self.options.cores > 1 {
            config.database = self.database_url()?;
            config.core_id = Some(core_id(1));
            config.lease_ms = self.options.lease_ms;
        }
        self.core = Some(CoreDaemon::start(&self.intranet, config, &self.core_dir)?);
        Ok(())
    }

    /// Creates the location, its gateways and the Edges in Core, and waits
    /// until every link is up and every gateway runs Core's config.
    pub fn create_location(&mut self) -> Result<()> {
        let options = self.options.clone();
        let core = self.core_mut()?;
        let mut args = vec![
            "location".to_owned(),
            "create".into(),
            LOCATION.into(),
            "--address".into(),
            options.tunnel_address.clone(),
            "--vip".into(),
            VIP.to_string(),
            "--port".into(),
            WG_PORT.to_string(),
        ];
        if let Some(threshold) = options.mfa_threshold_s {
            args.extend(["--mfa".into(), "--threshold".into(), threshold.to_string()]);
        }
        if let Some(session_s) = options.mfa_session_s {
            args.extend(["--mfa-session-s".into(), session_s.to_string()]);
        }
        for net in &options.allowed_ips {
            args.extend(["--allowed-ip".into(), net.clone()]);
        }
        for server in &options.dns {
            args.extend(["--dns".into(), server.clone()]);
        }
        if let Some(mtu) = options.mtu {
            args.extend(["--mtu".into(), mtu.to_string()]);
        }
        core.tidectl_ok(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        if let Some(second) = &options.second {
            core.tidectl_ok(&[
                "location",
                "create",
                SECOND_LOCATION,
                "--address",
                &format!("{SECOND_TUNNEL}/24"),
                "--vip",
                &SECOND_VIP.to_string(),
                "--port",
                &WG_PORT.to_string(),
                "--mfa",
                "--threshold",
                &second.mfa_threshold_s.to_string(),
            ])?;
        }
        let second = options.second.as_ref().map_or(0, |s| s.gateways);
        for i in 1..=options.gateways + second {
            let address = SocketAddr::from((gateway_mgmt(i), GATEWAY_LINK_PORT)).to_string();
            let location = match location_of(&options, i) {
                1 => LOCATION,
                _ => SECOND_LOCATION,
            };
            core.tidectl_ok(&[
                "gateway",
                "create",
                &format!("gw{i}"),
                "--location",
                location,
                "--address",
                &address,
            ])?;
        }
        for j in 1..=options.edges {
            core.tidectl_ok(&[
                "edge",
                "create",
                &format!("edge{j}"),
                "--address",
                &edge_link(j).to_string(),
            ])?;
        }
        core.wait_applied(LOCATION, Duration::from_secs(30))?;
        if second > 0 {
            core.wait_applied(SECOND_LOCATION, Duration::from_secs(30))?;
        }
        if options.edges > 0 {
            core.wait_edges(Duration::from_secs(30))?;
        }
        Ok(())
    }

    pub fn core(&self) -> Result<&CoreDaemon> {
        self.core.as_ref().context("Core is not started")
    }

    pub fn core_mut(&mut self) -> Result<&mut CoreDaemon> {
        self.core.as_mut().context("Core is not started")
    }

    pub fn pki(&self) -> &CorePki {
        &self.pki
    }

    pub fn run(&self) -> &Run {
        &self.run
    }

    pub fn gateway(&self, i: usize) -> &LabGateway {
        &self.gateways[i - 1]
    }

    /// Every gateway, of both locations, in order (`gw1` first).
    pub fn gateways_mut(&mut self) -> &mut [LabGateway] {
        &mut self.gateways
    }

    /// Starts every gateway's `tidegate-echo` on its tunnel address (the
    /// gateways must run Core's config, which makes the address).
    pub fn start_echoes(&mut self) -> Result<()> {
        for gateway in &mut self.gateways {
            gateway
                .start_echo()
                .with_context(|| format!("starting {}'s echo", gateway.name))?;
        }
        Ok(())
    }

    pub fn gateway_mut(&mut self, i: usize) -> &mut LabGateway {
        &mut self.gateways[i - 1]
    }

    pub fn edge(&self, j: usize) -> &EdgeDaemon {
        &self.edges[j - 1]
    }

    pub fn edge_mut(&mut self, j: usize) -> &mut EdgeDaemon {
        &mut self.edges[j - 1]
    }

    /// nginx in front of the Edges, if the lab has Edges.
    pub fn nginx(&self) -> Option<&Nginx> {
        self.nginx.as_ref()
    }

    pub fn intranet(&self) -> &Netns {
        &self.intranet
    }

    pub fn dmz(&self) -> &Netns {
        &self.dmz
    }

    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// Client namespace `k` (2-based, up to `clients`).
    pub fn other_client(&self, k: usize) -> &Netns {
        &self.other_clients[k - 2]
    }

    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// A request to the public API through nginx, sent from the client's
    /// namespace.
    pub fn api(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<HttpAnswer> {
        let addr = SocketAddr::from((DMZ_PUBLIC, NGINX_PORT));
        let (method, path, body) = (method.to_owned(), path.to_owned(), body.map(<[u8]>::to_vec));
        self.client
            .run(move || http::request(addr, &method, &path, body.as_deref(), &[]))?
    }

    /// The URL users' clients reach the Edges at: nginx over HTTPS.
    pub fn edge_url(&self) -> String {
        format!("https://{DMZ_PUBLIC}:{NGINX_TLS_PORT}")
    }

    /// The CA file of nginx's HTTPS certificate.
    pub fn web_ca(&self) -> &Path {
        &self.web_ca
    }

    /// Gives the client another public address (of 198.51.100.0/24).
    pub fn add_client_addr(&self, addr: Ipv4Addr) -> Result<()> {
        self.client
            .add_addr(&self.run.ifname("c"), &format!("{addr}/24"))
    }

    /// `POST path` with a JSON body through nginx, from the client's
    /// address `from`.
    pub fn post_from(
        &self,
        from: Ipv4Addr,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<HttpAnswer> {
        let addr = SocketAddr::from((DMZ_PUBLIC, NGINX_PORT));
        let (path, body) = (path.to_owned(), body.to_string());
        self.client.run(move || {
            http::request_from(from.into(), addr, "POST", &path, Some(body.as_bytes()))
        })?
    }

    /// `POST path` with a JSON body through nginx, from the client.
    pub fn post(&self, path: &str, body: &serde_json::Value) -> Result<HttpAnswer> {
        self.api("POST", path, Some(body.to_string().as_bytes()))
    }

    /// Creates the client's WireGuard interface (a fresh key pair; no peer
    /// yet) and returns its public key.
    pub fn create_client_wg(&mut self) -> Result<String> {
        let dir = self.run.dir().join("client");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let wg = WgInterface::create(&self.client, &self.run.ifname("cw"), &dir)?;
        let key = wg.public_key().to_owned();
        self.client_wg = Some(wg);
        Ok(key)
    }

    /// Configures the client's WireGuard from a device config as the Edge
    /// serves it (JSON), and brings it up.
    pub fn apply_device_config(&mut self, config: &serde_json::Value) -> Result<()> {
        let dir = self.run.dir().join("client");
        let wg = self.client_wg.as_ref().context("no client interface")?;
        let field = |name: &str| -> Result<String> {
            config[name]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("the device config has no {name}: {config}"))
        };
        let list = |name: &str| -> Vec<String> {
            config[name]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let psk_file = dir.join("psk");
        let mut args = vec![
            "set".to_owned(),
            wg.name().to_owned(),
            "peer".into(),
            field("server_public_key")?,
            "endpoint".into(),
            field("endpoint")?,
            "allowed-ips".into(),
            list("allowed_ips").join(","),
        ];
        if let Some(psk) = config["preshared_key"].as_str() {
            std::fs::write(&psk_file, format!("{psk}\n"))
                .with_context(|| format!("writing {}", psk_file.display()))?;
            args.extend([
                "preshared-key".into(),
                psk_file.to_string_lossy().into_owned(),
            ]);
        }
        wg.wg(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        let addresses = list("addresses");
        if addresses.is_empty() {
            bail!("the device config has no addresses: {config}");
        }
        let existing = self.client.ip(&["-o", "addr", "show", "dev", wg.name()])?;
        for address in &addresses {
            let host = address.split('/').next().unwrap_or_default();
            if !existing.contains(&format!(" {host}/")) {
                wg.add_addr(address)?;
            }
        }
        wg.up()?;
        for net in list("allowed_ips") {
            let _ = self
                .client
                .ip(&["route", "replace", &net, "dev", wg.name()]);
        }
        Ok(())
    }

    /// The client's WireGuard interface, if created.
    pub fn client_wg(&self) -> Option<&WgInterface> {
        self.client_wg.as_ref()
    }

    /// Removes the client's WireGuard interface (the device goes quiet).
    pub fn drop_client_wg(&mut self) {
        self.client_wg = None;
    }

    /// Where the lab's files are.
    pub fn dir(&self) -> &Path {
        self.run.dir()
    }
}
