//! The shield topology shared by the end-to-end test and the lab: a client
//! and a gateway on one switched segment, a WireGuard tunnel between them,
//! and the gateway daemon with its XDP shield on the gateway's interface.
//!
//! ```text
//!  client ns                 switch ns                 gateway ns
//!  tg<id>c 198.51.100.2 ---- tg<id>cb  [tg<id>br]  tg<id>gb ---- tg<id>g 198.51.100.1 (XDP)
//!  tg<id>cw 10.77.0.2   ===== WireGuard, UDP 51820 =====        tg<id>gw 10.77.0.1
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::bins::binary;
use crate::gateway::{Counters, GATEWAY_BIN, GatewayConfig, GatewayDaemon, TIDECTL_BIN, XdpMode};
use crate::netns::{Netns, PingReport, bridge, veth};
use crate::packets::{Malformed, malformed_kinds, send_paced};
use crate::run::Run;
use crate::wait::{Probe, poll_until};
use crate::wireguard::{WgBackend, WgInterface, WgPeer};
use crate::xdp::{XdpAttachment, xdp_attachment};

/// The gateway's address on the segment.
pub const GATEWAY_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The client's address on the segment.
pub const CLIENT_UNDERLAY: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// Prefix length of the IPv4 segment.
pub const UNDERLAY_PREFIX: u8 = 24;
/// The gateway's IPv6 address on the segment.
pub const GATEWAY_UNDERLAY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 1);
/// The client's IPv6 address on the segment.
pub const CLIENT_UNDERLAY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0x77, 0, 0, 0, 0, 2);
/// Prefix length of the IPv6 segment.
pub const UNDERLAY_PREFIX_V6: u8 = 64;
/// The gateway's tunnel address.
pub const GATEWAY_TUNNEL: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The client's tunnel address.
pub const CLIENT_TUNNEL: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// Prefix length of the tunnel network.
pub const TUNNEL_PREFIX: u8 = 24;
/// The gateway's WireGuard port: the service the shield protects.
pub const WG_PORT: u16 = 51820;

/// How long to wait for the XDP counters to catch up with what was sent.
pub const COUNTER_TIMEOUT: Duration = Duration::from_secs(5);

/// Receives one line per step taken, for the lab's narration or a test's log.
pub type Narrate<'a> = &'a mut dyn FnMut(&str);

/// The switched segment: client, switch and gateway namespaces, two veth
/// pairs and a bridge, IPv4 and IPv6 addresses.
#[derive(Debug)]
pub struct Underlay {
    client: Netns,
    switch: Netns,
    gateway: Netns,
    client_if: String,
    gateway_if: String,
    bridge_if: String,
    // Last: the run directory goes after everything that writes into it.
    run: Run,
}

impl Underlay {
    /// Builds the segment with names unique to a new run.
    pub fn build(narrate: Narrate<'_>) -> Result<Self> {
        let run = Run::new()?;
        narrate(&format!(
            "run {}: working directory {}",
            run.id(),
            run.dir().display()
        ));
        let client = Netns::create(&run.netns_name("client"))?;
        let switch = Netns::create(&run.netns_name("switch"))?;
        let gateway = Netns::create(&run.netns_name("gateway"))?;
        narrate(&format!(
            "namespaces: {}, {}, {}",
            client.name(),
            switch.name(),
            gateway.name()
        ));

        let client_if = run.ifname("c");
        let gateway_if = run.ifname("g");
        let bridge_if = run.ifname("br");
        let client_port = run.ifname("cb");
        let gateway_port = run.ifname("gb");
        veth(&client, &client_if, &switch, &client_port)?;
        veth(&gateway, &gateway_if, &switch, &gateway_port)?;
        bridge(&switch, &bridge_if, &[&client_port, &gateway_port])?;
        narrate(&format!(
            "veth {client_if} (client) <-> {client_port}, veth {gateway_if} (gateway) <-> {gateway_port}, both on bridge {bridge_if} (switch)"
        ));

        for (ns, ifname, v4, v6) in [
            (&client, &client_if, CLIENT_UNDERLAY, CLIENT_UNDERLAY_V6),
            (&gateway, &gateway_if, GATEWAY_UNDERLAY, GATEWAY_UNDERLAY_V6),
        ] {
            ns.add_addr(ifname, &format!("{v4}/{UNDERLAY_PREFIX}"))?;
            ns.add_addr(ifname, &format!("{v6}/{UNDERLAY_PREFIX_V6}"))?;
            ns.set_up(ifname)?;
        }
        narrate(&format!(
            "addresses: client {CLIENT_UNDERLAY}/{UNDERLAY_PREFIX} {CLIENT_UNDERLAY_V6}/{UNDERLAY_PREFIX_V6}, \
             gateway {GATEWAY_UNDERLAY}/{UNDERLAY_PREFIX} {GATEWAY_UNDERLAY_V6}/{UNDERLAY_PREFIX_V6}; no default route anywhere"
        ));
        Ok(Self {
            client,
            switch,
            gateway,
            client_if,
            gateway_if,
            bridge_if,
            run,
        })
    }

    /// The run (id, temporary directory).
    pub fn run(&self) -> &Run {
        &self.run
    }

    /// The client namespace.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The switch namespace holding the bridge.
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// The gateway namespace.
    pub fn gateway(&self) -> &Netns {
        &self.gateway
    }

    /// The client's interface on the segment.
    pub fn client_if(&self) -> &str {
        &self.client_if
    }

    /// The gateway's public interface (where the XDP program goes).
    pub fn gateway_if(&self) -> &str {
        &self.gateway_if
    }

    /// The bridge in the switch namespace.
    pub fn bridge_if(&self) -> &str {
        &self.bridge_if
    }
}

/// A WireGuard tunnel between the client and the gateway of an [`Underlay`].
#[derive(Debug)]
pub struct Tunnel {
    client: WgInterface,
    gateway: WgInterface,
}

impl Tunnel {
    /// Creates, configures and raises both WireGuard interfaces.
    pub fn build(underlay: &Underlay, narrate: Narrate<'_>) -> Result<Self> {
        let dir = underlay.run.dir();
        let gateway = WgInterface::create(&underlay.gateway, &underlay.run.ifname("gw"), dir)
            .context("creating the gateway's WireGuard interface")?;
        let client = WgInterface::create(&underlay.client, &underlay.run.ifname("cw"), dir)
            .context("creating the client's WireGuard interface")?;
        narrate(&format!(
            "WireGuard: gateway {} and client {} on {}",
            gateway.name(),
            client.name(),
            gateway.backend()
        ));

        gateway.set_listen_port(WG_PORT)?;
        gateway.add_peer(&WgPeer {
            public_key: client.public_key(),
            endpoint: None,
            allowed_ips: &[&format!("{CLIENT_TUNNEL}/32")],
            persistent_keepalive: None,
        })?;
        client.add_peer(&WgPeer {
            public_key: gateway.public_key(),
            endpoint: Some(SocketAddr::from((GATEWAY_UNDERLAY, WG_PORT))),
            allowed_ips: &[&format!("{GATEWAY_TUNNEL}/32")],
            persistent_keepalive: None,
        })?;
        for (wg, addr) in [(&gateway, GATEWAY_TUNNEL), (&client, CLIENT_TUNNEL)] {
            wg.add_addr(&format!("{addr}/{TUNNEL_PREFIX}"))?;
            wg.up()?;
        }
        narrate(&format!(
            "tunnel: gateway {GATEWAY_TUNNEL}/{TUNNEL_PREFIX} listening on {GATEWAY_UNDERLAY}:{WG_PORT}, \
             client {CLIENT_TUNNEL}/{TUNNEL_PREFIX} with endpoint {GATEWAY_UNDERLAY}:{WG_PORT}"
        ));
        Ok(Self { client, gateway })
    }

    /// The client's WireGuard interface.
    pub fn client(&self) -> &WgInterface {
        &self.client
    }

    /// The gateway's WireGuard interface.
    pub fn gateway(&self) -> &WgInterface {
        &self.gateway
    }

    /// Which WireGuard implementation the tunnel runs on.
    pub fn backend(&self) -> WgBackend {
        self.gateway.backend()
    }
}

/// Options for [`Shield::build`].
#[derive(Debug, Clone, Default)]
pub struct ShieldOptions {
    /// How the gateway attaches its XDP program.
    pub xdp_mode: XdpMode,
}

/// The whole shield topology: segment, tunnel and gateway daemon.
///
/// Fields drop in order: the daemon (SIGTERM, XDP detached), then the
/// WireGuard interfaces, then the namespaces and the run directory.
#[derive(Debug)]
pub struct Shield {
    daemon: GatewayDaemon,
    tunnel: Tunnel,
    underlay: Underlay,
}

impl Shield {
    /// Builds the segment and the tunnel, then starts the gateway daemon
    /// with its shield on the gateway's interface, protecting
    /// `198.51.100.1:51820`, and waits until it answers on its socket.
    pub fn build(options: &ShieldOptions, narrate: Narrate<'_>) -> Result<Self> {
        // Fail before building anything if the binaries are missing.
        for name in [GATEWAY_BIN, TIDECTL_BIN] {
            binary(name)?;
        }
        let underlay = Underlay::build(narrate)?;
        let tunnel = Tunnel::build(&underlay, narrate)?;
        let mut config = GatewayConfig::shield(
            &underlay.gateway_if,
            options.xdp_mode,
            underlay.run.dir().join("gateway.sock"),
            vec![SocketAddr::from((GATEWAY_UNDERLAY, WG_PORT))],
        );
        config.bpf_pin_dir = Some(underlay.run.bpffs()?);
        narrate(&format!(
            "starting tidegate-gateway in {} (XDP on {}, mode {}, service {GATEWAY_UNDERLAY}:{WG_PORT})",
            underlay.gateway.name(),
            config.interface,
            config.xdp_mode
        ));
        let daemon = GatewayDaemon::start(&underlay.gateway, config, underlay.run.dir())?;
        narrate(&format!(
            "tidegate-gateway (pid {}, config {}) answers on {}",
            daemon.process().pid(),
            daemon.config_path().display(),
            daemon.config().control_socket.display()
        ));
        Ok(Self {
            daemon,
            tunnel,
            underlay,
        })
    }

    /// The segment.
    pub fn underlay(&self) -> &Underlay {
        &self.underlay
    }

    /// The WireGuard tunnel.
    pub fn tunnel(&self) -> &Tunnel {
        &self.tunnel
    }

    /// The gateway daemon.
    pub fn daemon(&self) -> &GatewayDaemon {
        &self.daemon
    }

    /// The gateway daemon, mutably (to stop it or read counters).
    pub fn daemon_mut(&mut self) -> &mut GatewayDaemon {
        &mut self.daemon
    }

    /// Which WireGuard implementation the tunnel runs on.
    pub fn wg_backend(&self) -> WgBackend {
        self.tunnel.backend()
    }

    /// The counters from `tidectl counters --json`.
    pub fn counters(&mut self) -> Result<Counters> {
        self.daemon.counters()
    }

    /// The human table from `tidectl counters`.
    pub fn counters_table(&mut self) -> Result<String> {
        self.daemon.counters_table()
    }

    /// The XDP program attached to the gateway's interface, as the kernel
    /// reports it.
    pub fn gateway_xdp(&self) -> Result<Option<XdpAttachment>> {
        xdp_attachment(&self.underlay.gateway, &self.underlay.gateway_if)
    }

    /// Pings the gateway's tunnel address from the client, through WireGuard.
    pub fn ping_tunnel(&self, count: u32) -> Result<PingReport> {
        self.underlay
            .client
            .ping(IpAddr::V4(GATEWAY_TUNNEL), count)
            .context("ping through the tunnel")
    }

    /// Pings the gateway's segment address from the client, outside the
    /// tunnel.
    pub fn ping_underlay(&self, count: u32) -> Result<PingReport> {
        self.underlay
            .client
            .ping(IpAddr::V4(GATEWAY_UNDERLAY), count)
            .context("ping on the segment")
    }

    /// Sends `count` copies of `payload` from the client to the gateway's
    /// segment address on UDP `port`, paced (see [`send_paced`]).
    pub fn send_udp(&self, port: u16, payload: &[u8], count: u32) -> Result<u32> {
        let target = SocketAddr::from((GATEWAY_UNDERLAY, port));
        let payload = payload.to_vec();
        self.underlay.client.run(move || -> Result<u32> {
            let socket = UdpSocket::bind((CLIENT_UNDERLAY, 0))
                .context("binding a UDP socket in the client namespace")?;
            send_paced(&socket, target, &payload, count)
        })?
    }

    /// Sends `per_kind` datagrams of every [`malformed_kinds`] kind from the
    /// client to the WireGuard service and returns how many were sent per
    /// drop counter.
    pub fn send_malformed(
        &self,
        per_kind: u32,
        narrate: Narrate<'_>,
    ) -> Result<BTreeMap<&'static str, u64>> {
        let mut sent: BTreeMap<&'static str, u64> = BTreeMap::new();
        for Malformed {
            name,
            counter,
            payload,
        } in malformed_kinds()
        {
            let n = self
                .send_udp(WG_PORT, &payload, per_kind)
                .with_context(|| format!("sending malformed datagrams ({name})"))?;
            narrate(&format!(
                "sent {n} x {name} ({} bytes) to {GATEWAY_UNDERLAY}:{WG_PORT}, expecting drop reason {counter}",
                payload.len()
            ));
            *sent.entry(counter).or_default() += u64::from(n);
        }
        Ok(sent)
    }

    /// Polls the counters until each counter in `targets` has grown by at
    /// least its value since `baseline`, and returns the counters then.
    pub fn wait_for_growth(
        &mut self,
        baseline: &Counters,
        targets: &BTreeMap<&str, u64>,
    ) -> Result<Counters> {
        let what = format!("counter growth {targets:?}");
        poll_until(&what, COUNTER_TIMEOUT, Duration::from_millis(50), || {
            let now = self.daemon.counters()?;
            let mut short = String::new();
            for (name, want) in targets {
                let got = now.counter_growth(baseline, name)?;
                if got < *want {
                    let _ = write!(short, "{name} +{got} of +{want}; ");
                }
            }
            Ok(if short.is_empty() {
                Probe::Ready(now)
            } else {
                Probe::NotYet(short)
            })
        })
    }

    /// Stops the gateway daemon with SIGTERM and returns its exit status.
    pub fn stop_gateway(&mut self) -> Result<ExitStatus> {
        self.daemon.stop()
    }
}
