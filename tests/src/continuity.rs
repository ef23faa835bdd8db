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
            // A veth hands a local socket's datagram on with its checksum
            // left to an offload that never runs; a gateway that sends the
            // frame on with XDP_TX (the handover's second chance) would
            // pass on a wrong checksum. Frames from a real wire carry a
            // complete one: so do these.
            netns
                .exec_ok("ethtool", &["-K", &link, "tx", "off"])
                .with_context(|| format!("turning checksum offload off on {link}"))?;
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

/// `bpf(2)` commands the harness uses on its own.
const BPF_OBJ_GET: i64 = 7;
const BPF_LINK_DETACH: i64 = 34;

/// Takes gateway `id`'s egress guard off its interface, as if it had never
/// been there: the link the daemon pinned is detached by force
/// (`BPF_LINK_DETACH`), which no handle on it can undo. For showing what
/// happens without the guard.
pub fn detach_egress_guard(location: &HaLocation, id: u32) -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;

    let gateway = location.gateway(id);
    let netns = std::fs::metadata(format!("/run/netns/{}", gateway.netns().name()))
        .with_context(|| format!("finding the namespace of gateway {id}"))?
        .ino();
    let bpffs = location.run().bpffs()?;
    let prefix = format!("tc-egress-{netns}-");
    let pin = std::fs::read_dir(&bpffs)
        .with_context(|| format!("listing {}", bpffs.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .with_context(|| format!("gateway {id} pinned no egress link in {}", bpffs.display()))?;
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())?;
    // bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags (and room for
    // the rest of the union, zeroed).
    let mut attr = [0u64; 8];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: `attr` is a zeroed bpf_attr of the size given whose pathname
    // points to a NUL-terminated string that outlives the call.
    let fd = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_bpf,
            BPF_OBJ_GET,
            attr.as_mut_ptr(),
            size_of_val(&attr),
        )
    };
    ensure!(
        fd >= 0,
        "opening the pinned link {}: {}",
        pin.display(),
        std::io::Error::last_os_error()
    );
    let mut attr = [0u64; 8];
    attr[0] = fd as u64 & 0xffff_ffff;
    // SAFETY: a zeroed bpf_attr whose link_fd is the descriptor just opened.
    let detached = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_bpf,
            BPF_LINK_DETACH,
            attr.as_mut_ptr(),
            size_of_val(&attr),
        )
    };
    let error = std::io::Error::last_os_error();
    // SAFETY: `fd` was returned by BPF_OBJ_GET above and is closed once.
    unsafe { nix::libc::close(fd as i32) };
    ensure!(detached == 0, "detaching {}: {error}", pin.display());
    Ok(())
}

/// Makes gateway `id`'s WireGuard start a handshake with client `client`
/// now, as its own rekey timer would: the peer is removed and added again
/// (which clears its sessions) with the client's endpoint and a keepalive,
/// through `wg` in the gateway's namespace, not through the daemon.
pub fn force_rekey(location: &TunnelLocation, id: u32, client: usize) -> Result<()> {
    let gateway = location.location().gateway(id);
    let interface = gateway
        .wireguard_interface()
        .with_context(|| format!("gateway {id} runs no WireGuard"))?
        .to_owned();
    let client = &location.clients()[client];
    let key = client.wg().public_key().to_owned();
    let port = client
        .wg()
        .wg(&["show", client.wg().name(), "listen-port"])?
        .trim()
        .to_owned();
    let endpoint = format!("{}:{port}", client_addr(client.index()));
    let allowed = format!("{}/32", client_tunnel(client.index()));
    let netns = gateway.netns();
    netns.exec_ok("wg", &["set", &interface, "peer", &key, "remove"])?;
    netns.exec_ok(
        "wg",
        &[
            "set",
            &interface,
            "peer",
            &key,
            "allowed-ips",
            &allowed,
            "endpoint",
            &endpoint,
            "persistent-keepalive",
            "1",
        ],
    )?;
    netns.exec_ok(
        "wg",
        &["set", &interface, "peer", &key, "persistent-keepalive", "0"],
    )?;
    Ok(())
}
