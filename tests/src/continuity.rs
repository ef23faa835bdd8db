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
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};

use crate::gateway::PeerEntry;
use crate::ha::{
    ECHO_PORT, HaLocation, HaOptions, HaStatus, PREFIX, Prober, SERVICE_PORT, TUNNEL_ADDR,
    TunnelOptions, VIP, start_echo_at, start_prober_to,
};
use crate::handshakes::{HandshakeWatch, first_initiation_sent};
use crate::keepalived::KeepalivedLocation;
use crate::netns::Netns;
use crate::probe::ProbeSummary;
use crate::process::Process;
use crate::run::Run;
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

/// One client: its namespace, its link to the segment and its WireGuard.
#[derive(Debug)]
pub struct TunnelClient {
    index: usize,
    wg: WgInterface,
    link: String,
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

    /// Starts recording the handshake messages between this client and the
    /// location.
    pub fn watch_handshakes(&self) -> Result<HandshakeWatch> {
        HandshakeWatch::start(&self.netns, &self.link, SERVICE_PORT)
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
    pub fn build(
        options: &HaOptions,
        tunnel: TunnelOptions,
        clients: &ClientOptions,
    ) -> Result<Self> {
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
        this.clients = build_clients(
            this.location.run(),
            this.location.switch(),
            &keys.public,
            clients,
        )?;
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
        warm_up(&this.clients)?;
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
        self.probers += 1;
        start_probers(
            &self.clients,
            self.location.run().dir(),
            self.probers,
            count,
        )
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

    /// Waits until gateway `id` has finished following a failover it took
    /// at or after `since` (the event that caused it), and returns its
    /// status. An earlier failover, such as the one a gateway records when
    /// it starts alone, never counts, even when it is the last one listed.
    pub fn wait_followed(
        &mut self,
        id: u32,
        since: SystemTime,
        timeout: Duration,
    ) -> Result<HaStatus> {
        // Failover times are recorded in whole milliseconds.
        let since = since
            .duration_since(UNIX_EPOCH)
            .map(|t| UNIX_EPOCH + Duration::from_millis(t.as_millis() as u64))
            .unwrap_or(since);
        let what = format!("gateway {id} to finish following a failover since the event");
        poll_until(&what, timeout, Duration::from_millis(100), || {
            let status = self.location.status(id)?;
            Ok(match status.failovers.last() {
                Some(last) if last.meta.at >= since && last.finished => Probe::Ready(status),
                Some(last) if last.meta.at >= since => Probe::NotYet(format!("{last:?}")),
                _ => Probe::NotYet("no failover since the event yet".into()),
            })
        })
        .with_context(|| {
            format!(
                "gateway {id}'s log:\n{}",
                self.location.gateway(id).log_tail()
            )
        })
    }

    /// Checks that every client's endpoint for the location is the VIP.
    pub fn ensure_endpoints_on_vip(&self) -> Result<()> {
        ensure_endpoints_on_vip(&self.clients)
    }

    /// Starts recording every client's handshake messages.
    pub fn watch_handshakes(&self) -> Result<Vec<HandshakeWatch>> {
        self.clients
            .iter()
            .map(TunnelClient::watch_handshakes)
            .collect()
    }
}

/// Checks that the first handshake of every client after `since` was
/// started by the location (a kick), not by the client's own timer: the
/// client received the initiation. `watches` are in client order.
pub fn ensure_gateway_initiated(
    watches: Vec<HandshakeWatch>,
    since: std::time::Instant,
) -> Result<()> {
    let mut wrong = Vec::new();
    for (index, watch) in watches.into_iter().enumerate() {
        match first_initiation_sent(&watch.finish()?, since) {
            Some(false) => {}
            Some(true) => wrong.push(format!("client {index} started it itself")),
            None => wrong.push(format!("client {index} saw no initiation")),
        }
    }
    ensure!(
        wrong.is_empty(),
        "handshakes not started by the location: {}",
        wrong.join("; ")
    );
    Ok(())
}

/// Builds `options.count` clients on the segment of `run` (bridge in
/// `switch`), each peered with the location (public key `location_key`)
/// at the VIP.
pub fn build_clients(
    run: &Run,
    switch: &Netns,
    location_key: &str,
    options: &ClientOptions,
) -> Result<Vec<TunnelClient>> {
    ensure!(
        (1..=MAX_CLIENTS).contains(&options.count),
        "1 to {MAX_CLIENTS} clients, not {}",
        options.count
    );
    let bridge = run.ifname("br");
    let mut clients = Vec::with_capacity(options.count);
    for index in 0..options.count {
        let netns = Netns::create(&run.netns_name(&format!("k{index}")))?;
        let link = run.ifname(&format!("k{index}"));
        let port = run.ifname(&format!("k{index}b"));
        crate::netns::veth(&netns, &link, switch, &port)?;
        switch.ip(&["link", "set", "dev", &port, "master", &bridge])?;
        switch.set_up(&port)?;
        netns.add_addr(&link, &format!("{}/{PREFIX}", client_addr(index)))?;
        // A veth hands a local socket's datagram on with its checksum
        // left to an offload that never runs; a gateway that sends the
        // frame on with XDP_TX (the handover's second chance) would pass
        // on a wrong checksum. Frames from a real wire carry a complete
        // one: so do these.
        netns
            .exec_ok("ethtool", &["-K", &link, "tx", "off"])
            .with_context(|| format!("turning checksum offload off on {link}"))?;
        netns.set_up(&link)?;
        let wg = WgInterface::create(&netns, &run.ifname(&format!("t{index}")), run.dir())
            .with_context(|| format!("creating the WireGuard interface of client {index}"))?;
        wg.add_peer(&WgPeer {
            public_key: location_key,
            endpoint: Some(SocketAddr::from((VIP, SERVICE_PORT))),
            allowed_ips: &[&format!("{TUNNEL_ADDR}/32")],
            persistent_keepalive: options.keepalive,
        })?;
        wg.add_addr(&format!("{}/32", client_tunnel(index)))?;
        wg.up()?;
        netns.ip(&[
            "route",
            "add",
            &format!("{TUNNEL_ADDR}/32"),
            "dev",
            wg.name(),
        ])?;
        clients.push(TunnelClient {
            index,
            wg,
            link,
            netns,
        });
    }
    Ok(clients)
}

/// Makes every client complete a handshake with the location: one echo
/// request through each tunnel, answered.
pub fn warm_up(clients: &[TunnelClient]) -> Result<()> {
    for client in clients {
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
    Ok(())
}

/// Starts a prober on every client (round `round`, for file names):
/// `count` probes through its tunnel to the echo on the tunnel address.
pub fn start_probers(
    clients: &[TunnelClient],
    dir: &Path,
    round: u32,
    count: u64,
) -> Result<Vec<Prober>> {
    ensure!(count <= PROBER_COUNT_LIMIT, "{count} probes is too many");
    let target = SocketAddr::from((TUNNEL_ADDR, ECHO_PORT));
    clients
        .iter()
        .map(|client| {
            start_prober_to(
                &client.netns,
                target,
                dir,
                &format!("tunnel{round}-client{}", client.index),
                count,
            )
        })
        .collect()
}

/// Checks that every client's endpoint for the location is the VIP.
pub fn ensure_endpoints_on_vip(clients: &[TunnelClient]) -> Result<()> {
    let vip = SocketAddr::from((VIP, SERVICE_PORT)).to_string();
    let mut wrong = Vec::new();
    for client in clients {
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

/// Waits until every client completed a handshake after the ones in
/// `before` (each client's latest handshake, Unix seconds, in order).
pub fn wait_fresh_handshakes(
    clients: &[TunnelClient],
    before: &[u64],
    timeout: Duration,
) -> Result<()> {
    poll_until(
        "every client to complete a new handshake",
        timeout,
        Duration::from_millis(100),
        || {
            let mut stale = Vec::new();
            for (client, before) in clients.iter().zip(before) {
                if client.latest_handshake()? <= *before {
                    stale.push(client.index);
                }
            }
            Ok(if stale.is_empty() {
                Probe::Ready(())
            } else {
                Probe::NotYet(format!("clients {stale:?} still on their old session"))
            })
        },
    )
}

/// Waits until every client's tunnel answers an echo request again.
pub fn wait_tunnels_answer(clients: &[TunnelClient], timeout: Duration) -> Result<()> {
    let started = std::time::Instant::now();
    for client in clients {
        loop {
            let report = client.netns.ping_paced(
                IpAddr::V4(TUNNEL_ADDR),
                1,
                Duration::from_millis(200),
                Duration::from_secs(1),
            )?;
            if report.received == 1 {
                break;
            }
            ensure!(
                started.elapsed() < timeout,
                "client {}'s tunnel did not answer within {timeout:?}",
                client.index
            );
        }
    }
    Ok(())
}

/// keepalived (VRRPv3) electing the VIP's holder on the same segment, with
/// the location's WireGuard on every gateway (wireguard-go configured with
/// `wg`, the same key and peers on each) and the same clients: what a
/// location without failover continuity does.
///
/// Fields drop in order: the clients, the gateways' echoes and WireGuard,
/// then the keepalived location.
#[derive(Debug)]
pub struct KeepalivedTunnel {
    clients: Vec<TunnelClient>,
    echoes: Vec<Process>,
    gateway_wg: Vec<WgInterface>,
    location: KeepalivedLocation,
    probers: u32,
}

impl KeepalivedTunnel {
    /// Builds the keepalived location with `options`, WireGuard on each
    /// gateway, the clients, and a handshake from every client.
    pub fn build(options: &HaOptions, clients: &ClientOptions) -> Result<Self> {
        let location = KeepalivedLocation::build(options)?;
        let keys = KeyPair::generate()?;
        let run = location.run();
        let key_file = run.dir().join("location.key");
        write_key(&key_file, &keys.private)?;
        let mut gateway_wg = Vec::new();
        let mut echoes = Vec::new();
        for id in 1..=options.priorities.len() as u32 {
            let gateway = location.gateway(id);
            let wg =
                WgInterface::create(gateway.netns(), &run.ifname(&format!("w{id}")), run.dir())?;
            wg.wg(&["set", wg.name(), "private-key", &key_file.to_string_lossy()])?;
            wg.set_listen_port(SERVICE_PORT)?;
            wg.add_addr(&format!("{TUNNEL_ADDR}/24"))?;
            wg.up()?;
            echoes.push(start_echo_at(
                gateway.netns(),
                id,
                SocketAddr::from((TUNNEL_ADDR, ECHO_PORT)),
                &gateway.dir().join("tunnel-echo.log"),
            )?);
            gateway_wg.push(wg);
        }
        let mut this = Self {
            clients: Vec::new(),
            echoes,
            gateway_wg,
            location,
            probers: 0,
        };
        this.clients = build_clients(
            this.location.run(),
            this.location.switch(),
            &keys.public,
            clients,
        )?;
        for wg in &this.gateway_wg {
            for client in &this.clients {
                let allowed = format!("{}/32", client_tunnel(client.index));
                wg.add_peer(&WgPeer {
                    public_key: client.wg.public_key(),
                    endpoint: None,
                    allowed_ips: &[&allowed],
                    persistent_keepalive: None,
                })?;
            }
        }
        // The echoes answer once they listen; give them the time the
        // warm-up's first ping would wait for anyway.
        std::thread::sleep(Duration::from_millis(200));
        warm_up(&this.clients)?;
        Ok(this)
    }

    /// The keepalived location.
    pub fn location(&self) -> &KeepalivedLocation {
        &self.location
    }

    /// The keepalived location, mutably.
    pub fn location_mut(&mut self) -> &mut KeepalivedLocation {
        &mut self.location
    }

    /// The clients.
    pub fn clients(&self) -> &[TunnelClient] {
        &self.clients
    }

    /// A host crash of gateway `id`: keepalived, its echoes and its
    /// wireguard-go die, and its link goes down.
    pub fn crash(&mut self, id: u32) -> Result<()> {
        self.location.gateway_mut(id).crash()?;
        let index = usize::try_from(id - 1)?;
        self.echoes[index].kill()?;
        self.gateway_wg[index].kill()
    }

    /// Starts a prober on every client, as [`TunnelLocation::start_probers`].
    pub fn start_probers(&mut self, count: u64) -> Result<Vec<Prober>> {
        self.probers += 1;
        start_probers(
            &self.clients,
            self.location.run().dir(),
            self.probers,
            count,
        )
    }
}

/// Writes a private key to a new file only its owner reads.
fn write_key(path: &Path, key: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;

    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{key}").with_context(|| format!("writing {}", path.display()))
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
/// been there: a tcx link the daemon pinned is detached by force
/// (`BPF_LINK_DETACH`), which no handle on it can undo; a clsact filter is
/// deleted. For showing what happens without the guard.
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
        });
    let Some(pin) = pin else {
        let interface = gateway.ifname().to_owned();
        let removed = gateway
            .netns()
            .run(|| tidegate_gateway::xdp::continuity::remove_clsact(&interface))??;
        ensure!(
            removed,
            "gateway {id} has no egress guard: no tcx link pinned in {} and no clsact filter on {interface}",
            bpffs.display()
        );
        return Ok(());
    };
    let path = std::ffi::CString::new(pin.as_os_str().as_encoded_bytes())?;
    // bpf_attr for BPF_OBJ_GET: pathname, bpf_fd, file_flags (and room for
    // the rest of the union, zeroed).
    let mut attr = [0u64; 8];
    attr[0] = path.as_ptr() as u64;
    // SAFETY: `attr` is a zeroed bpf_attr of the size given whose pathname
    // points to a NUL-terminated string that outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
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
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_DETACH,
            attr.as_mut_ptr(),
            size_of_val(&attr),
        )
    };
    let error = std::io::Error::last_os_error();
    // SAFETY: `fd` was returned by BPF_OBJ_GET above and is closed once.
    unsafe { libc::close(fd as i32) };
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
