//! A highly available location with real WireGuard: the HA segment of
//! [`crate::ha`], the location's WireGuard on every gateway (the same key
//! and peers; wireguard-go started by each daemon), and N clients, each in
//! its own namespace with its own wireguard-go, peered with the VIP. Each
//! client probes the echo on the gateways' tunnel address through its
//! tunnel, so a prober sees exactly when its tunnel works.
//!
//! ```text
//!  gateway g ns: tg<id>g<g> 198.51.100.g (XDP, egress guard), tg<id>w<g> 10.77.0.1/24
//!                tidegate-echo on 10.77.0.1:7 answering "g"
//!  client i ns:  tg<id>k<i> 198.51.100.(10+i) ---- switch
//!                tg<id>t<i> 10.77.0.(10+i)/32, peer: the location at VIP:51820
//! ```
//!
//! Clients are built after the gateways: their peers go into every
//! gateway's config file, applied with `tidectl reload`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::gateway::PeerEntry;
use crate::ha::{
    ECHO_PORT, HaLocation, HaOptions, HaStatus, PREFIX, Prober, SERVICE_PORT, TUNNEL_ADDR,
    TunnelOptions, VIP, start_prober_to,
};
use crate::netns::Netns;
use crate::probe::ProbeSummary;
use crate::wait::{Probe, poll_until};
use crate::wireguard::{KeyPair, WgInterface, WgPeer};

/// The last byte of client 0's addresses (segment and tunnel).
pub const FIRST_CLIENT: u8 = 10;
/// Most clients a tunnel location holds.
pub const MAX_CLIENTS: usize = 40;
/// How long a probe may wait for its answer.
const PROBER_COUNT_LIMIT: u64 = 100_000;

/// The segment address of client `i`.
pub fn client_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 51, 100, FIRST_CLIENT + i as u8)
}

/// The tunnel address of client `i`.
pub fn client_tunnel(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, FIRST_CLIENT + i as u8)
}

/// The clients of a [`TunnelLocation`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// How many.
    pub count: usize,
    /// The clients' persistent keepalive, if any.
    pub keepalive: Option<u16>,
}

/// One client: its namespace and its WireGuard.
#[derive(Debug)]
pub struct TunnelClient {
    index: usize,
    wg: WgInterface,
    netns: Netns,
}

impl TunnelClient {
    /// The client's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The WireGuard interface.
    pub fn wg(&self) -> &WgInterface {
        &self.wg
    }

    /// The endpoint this client's WireGuard has for the location, as
    /// `wg show` reports it.
    pub fn gateway_endpoint(&self) -> Result<Option<String>> {
        let peers = self.wg.peers()?;
        let peer = peers
            .first()
            .with_context(|| format!("client {} has no peer", self.index))?;
        Ok(peer.endpoint.clone())
    }

    /// The client's last handshake with the location (Unix seconds, 0 for
    /// none).
    pub fn latest_handshake(&self) -> Result<u64> {
        let peers = self.wg.peers()?;
        Ok(peers.first().map_or(0, |p| p.latest_handshake))
    }

    /// The client's `[[peer]]` entry on the gateways.
    fn peer_entry(&self) -> PeerEntry {
        PeerEntry {
            name: Some(format!("client{}", self.index)),
            public_key: self.wg.public_key().to_owned(),
            allowed_ips: vec![format!("{}/32", client_tunnel(self.index))],
            ..PeerEntry::default()
        }
    }
}

/// The location and its clients.
///
/// Fields drop in order: the clients (their wireguard-go), then the
/// location (daemons, gateways' wireguard-go, namespaces, run directory).
#[derive(Debug)]
pub struct TunnelLocation {
    clients: Vec<TunnelClient>,
    location: HaLocation,
    probers: u32,
}

impl TunnelLocation {
    /// Builds the HA location with `options` (its WireGuard key is made
    /// here), then the clients, peered with every gateway, and makes every
    /// client complete a handshake with the master.
    pub fn build(options: &HaOptions, tunnel: TunnelOptions, clients: &ClientOptions) -> Result<Self> {
        ensure!(
            (1..=MAX_CLIENTS).contains(&clients.count),
            "1 to {MAX_CLIENTS} clients, not {}",
            clients.count
        );
        let keys = KeyPair::generate()?;
        let options = HaOptions {
            wireguard: Some(TunnelOptions {
                private_key: keys.private.clone(),
                ..tunnel
            }),
            ..options.clone()
        };
        let location = HaLocation::build(&options)?;
        let mut this = Self {
            clients: Vec::new(),
            location,
            probers: 0,
        };
        let run = this.location.run();
        let bridge = run.ifname("br");
        for index in 0..clients.count {
            let netns = Netns::create(&run.netns_name(&format!("k{index}")))?;
            let link = run.ifname(&format!("k{index}"));
            let port = run.ifname(&format!("k{index}b"));
            crate::netns::veth(&netns, &link, this.location.switch(), &port)?;
            let switch = this.location.switch();
            switch.ip(&["link", "set", "dev", &port, "master", &bridge])?;
            switch.set_up(&port)?;
            netns.add_addr(&link, &format!("{}/{PREFIX}", client_addr(index)))?;
            netns.set_up(&link)?;
            let wg = WgInterface::create(&netns, &run.ifname(&format!("t{index}")), run.dir())
                .with_context(|| format!("creating the WireGuard interface of client {index}"))?;
            wg.add_peer(&WgPeer {
                public_key: &keys.public,
                endpoint: Some(SocketAddr::from((VIP, SERVICE_PORT))),
                allowed_ips: &[&format!("{TUNNEL_ADDR}/32")],
                persistent_keepalive: clients.keepalive,
            })?;
            wg.add_addr(&format!("{}/32", client_tunnel(index)))?;
            wg.up()?;
            netns.ip(&["route", "add", &format!("{TUNNEL_ADDR}/32"), "dev", wg.name()])?;
            this.clients.push(TunnelClient { index, wg, netns });
        }
        let peers: Vec<PeerEntry> = this.clients.iter().map(TunnelClient::peer_entry).collect();
        for id in this.location.ids() {
            let daemon = this.location.gateway_mut(id).daemon_mut();
            let mut config = daemon.config().clone();
            config.peers.clone_from(&peers);
            daemon.write_config(config)?;
            daemon
                .tidectl_ok(&["reload"])
                .with_context(|| format!("loading the clients' peers on gateway {id}"))?;
        }
        for client in &this.clients {
            let report = client.netns.ping_paced(
                IpAddr::V4(TUNNEL_ADDR),
                1,
                Duration::from_millis(200),
                Duration::from_secs(5),
            )?;
            ensure!(
                report.received == 1,
                "client {}: no answer through the tunnel: {}",
                client.index,
                report.summary
            );
        }
        Ok(this)
    }

    /// The HA location.
    pub fn location(&self) -> &HaLocation {
        &self.location
    }

    /// The HA location, mutably.
    pub fn location_mut(&mut self) -> &mut HaLocation {
        &mut self.location
    }

    /// The clients.
    pub fn clients(&self) -> &[TunnelClient] {
        &self.clients
    }

    /// Starts a prober on every client: `count` probes through its tunnel
    /// to the echo on the tunnel address, one every 10 ms.
    pub fn start_probers(&mut self, count: u64) -> Result<Vec<Prober>> {
        ensure!(count <= PROBER_COUNT_LIMIT, "{count} probes is too many");
        self.probers += 1;
        let target = SocketAddr::from((TUNNEL_ADDR, ECHO_PORT));
        let dir = self.location.run().dir().to_owned();
        self.clients
            .iter()
            .map(|client| {
                start_prober_to(
                    &client.netns,
                    target,
                    &dir,
                    &format!("tunnel{}-client{}", self.probers, client.index),
                    count,
                )
            })
            .collect()
    }

    /// Waits until gateway `id`'s endpoint table holds every client.
    pub fn wait_shared(&mut self, id: u32, timeout: Duration) -> Result<HaStatus> {
        let want = self.clients.len();
        let what = format!("gateway {id}'s endpoint table to hold all {want} clients");
        poll_until(&what, timeout, Duration::from_millis(50), || {
            let status = self.location.status(id)?;
            let entries = status.endpoints.as_ref().map_or(0, |e| e.entries);
            Ok(if entries >= want {
                Probe::Ready(status)
            } else {
                Probe::NotYet(format!("{entries} entries"))
            })
        })
    }

    /// Waits until gateway `id` has finished following its last failover,
    /// and returns its status.
    pub fn wait_followed(&mut self, id: u32, timeout: Duration) -> Result<HaStatus> {
        let what = format!("gateway {id} to finish following its failover");
        poll_until(&what, timeout, Duration::from_millis(100), || {
            let status = self.location.status(id)?;
            Ok(match status.failovers.last() {
                Some(last) if last.finished => Probe::Ready(status),
                Some(last) => Probe::NotYet(format!("{last:?}")),
                None => Probe::NotYet("no failover yet".into()),
            })
        })
    }

    /// Checks that every client's endpoint for the location is the VIP.
    pub fn ensure_endpoints_on_vip(&self) -> Result<()> {
        let vip = SocketAddr::from((VIP, SERVICE_PORT)).to_string();
        let mut wrong = Vec::new();
        for client in &self.clients {
            let endpoint = client.gateway_endpoint()?;
            if endpoint.as_deref() != Some(vip.as_str()) {
                wrong.push(format!("client {}: {endpoint:?}", client.index));
            }
        }
        if !wrong.is_empty() {
            bail!(
                "clients whose endpoint for the location is not {vip}: {}",
                wrong.join("; ")
            );
        }
        Ok(())
    }
}

/// Stops every prober (all at once) and returns their summaries, in client
/// order.
pub fn finish_probers(mut probers: Vec<Prober>) -> Result<Vec<ProbeSummary>> {
    for prober in &mut probers {
        prober.request_stop()?;
    }
    probers
        .into_iter()
        .map(|prober| prober.wait(Duration::from_secs(10)))
        .collect()
}
