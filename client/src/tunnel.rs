//! The tunnel on this host, as wg-quick makes it: the WireGuard interface
//! (kernel or wireguard-go), its key and the location's peer, addresses,
//! MTU, routes for the allowed IPs (a default route through policy routing
//! so the tunnel's own packets go around it), and DNS. Brought up whole or
//! not at all; taken down from the record of what was done.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Command,
};

use futures::TryStreamExt as _;
use ipnet::IpNet;
use netlink_packet_route::rule::{RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};
use serde::{Deserialize, Serialize};
use tidegate_wireguard::{
    Backend, BackendError, BackendKind, BackendSetting, Key, PeerSpec,
    kernel::Kernel,
    link::{LinkError, Links},
    reconcile::{self, Desired},
    userspace::{LaunchError, Userspace},
};
use tracing::{info, warn};

use crate::api::DeviceConfig;

/// The MTU when the location sets none (wg-quick's for an Ethernet path).
pub const DEFAULT_MTU: u32 = 1420;
/// The routing table and the mark of the tunnel's own packets when it
/// routes everything (wg-quick's choice).
pub const FULL_TUNNEL_TABLE: u32 = 51820;
/// The rules' priorities: the main table without its default route first,
/// then everything unmarked through the tunnel's table.
const SUPPRESS_PRIORITY: u32 = 32764;
const TUNNEL_PRIORITY: u32 = 32765;
/// Lets the reverse-path filter see the tunnel's mark.
const SRC_VALID_MARK: &str = "/proc/sys/net/ipv4/conf/all/src_valid_mark";

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the config's {field} {value:?}: {reason}")]
    Config {
        field: &'static str,
        value: String,
        reason: String,
    },
    #[error("the endpoint {0} cannot be resolved")]
    Resolve(String, #[source] std::io::Error),
    #[error(
        "the allowed IPs {net} hold the endpoint {endpoint}: the tunnel would carry its own packets"
    )]
    EndpointInside { net: IpNet, endpoint: IpAddr },
    #[error(
        "interface {0} exists already; if it is this tunnel, take it down first (tidegate-client down {0})"
    )]
    Exists(String),
    #[error(
        "kernel WireGuard is not available for {interface} (no module?); install wireguard-go or use --backend auto"
    )]
    NoKernel {
        interface: String,
        #[source]
        source: LinkError,
    },
    #[error(
        "a policy rule for table {FULL_TUNNEL_TABLE} exists already: is another full tunnel up?"
    )]
    TableInUse,
    #[error("starting wireguard-go")]
    Launch(#[from] LaunchError),
    #[error("configuring WireGuard")]
    Backend(#[from] BackendError),
    #[error("configuring the interface")]
    Link(#[from] LinkError),
    #[error("{op}")]
    Netlink {
        op: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("{command} failed: {detail}")]
    Dns { command: String, detail: String },
    #[error("a WireGuard call did not finish")]
    Task(#[from] tokio::task::JoinError),
}

fn netlink(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> TunnelError {
    let op = op.into();
    move |source| TunnelError::Netlink {
        op,
        source: Box::new(source),
    }
}

/// Everything the host needs for the tunnel. Pure to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSpec {
    pub interface: String,
    pub private_key: Key,
    pub peer: PeerSpec,
    pub addresses: Vec<IpNet>,
    pub mtu: u32,
    pub dns: Vec<IpAddr>,
}

fn bad(field: &'static str, value: &str, reason: impl ToString) -> TunnelError {
    TunnelError::Config {
        field,
        value: value.into(),
        reason: reason.to_string(),
    }
}

impl TunnelSpec {
    /// The tunnel of `config`, its endpoint resolved to `endpoint`.
    pub fn new(
        interface: &str,
        private_key: Key,
        config: &DeviceConfig,
        preshared_key: Option<Key>,
        endpoint: SocketAddr,
    ) -> Result<Self, TunnelError> {
        let server: Key = config
            .server_public_key
            .parse()
            .map_err(|e| bad("server_public_key", &config.server_public_key, e))?;
        let nets = |field, list: &[String]| -> Result<Vec<IpNet>, TunnelError> {
            list.iter()
                .map(|text| {
                    text.trim()
                        .parse::<IpNet>()
                        .map_err(|e| bad(field, text, e))
                })
                .collect()
        };
        let addresses = nets("addresses", &config.addresses)?;
        if addresses.is_empty() {
            return Err(bad(
                "addresses",
                "",
                "none: the device has no tunnel address",
            ));
        }
        let allowed_ips: BTreeSet<IpNet> = nets("allowed_ips", &config.allowed_ips)?
            .into_iter()
            .map(|net| net.trunc())
            .collect();
        if let Some(net) = allowed_ips
            .iter()
            .find(|net| net.prefix_len() > 0 && net.contains(&endpoint.ip()))
        {
            return Err(TunnelError::EndpointInside {
                net: *net,
                endpoint: endpoint.ip(),
            });
        }
        let dns = config
            .dns
            .iter()
            .map(|text| {
                text.trim()
                    .parse::<IpAddr>()
                    .map_err(|e| bad("dns", text, e))
            })
            .collect::<Result<_, _>>()?;
        let keepalive = u16::try_from(config.persistent_keepalive).map_err(|_| {
            bad(
                "persistent_keepalive",
                &config.persistent_keepalive.to_string(),
                "past 65535 s",
            )
        })?;
        Ok(Self {
            interface: interface.to_owned(),
            private_key,
            peer: PeerSpec {
                name: Some(config.location.clone()),
                public_key: server,
                allowed_ips,
                preshared_key,
                persistent_keepalive: Some(keepalive).filter(|&k| k != 0),
                endpoint: Some(endpoint),
            },
            addresses,
            mtu: config.mtu.unwrap_or(DEFAULT_MTU),
            dns,
        })
    }

    /// Routes everything of a family through the tunnel (a /0 allowed IP).
    pub fn full_tunnel(&self) -> bool {
        self.peer
            .allowed_ips
            .iter()
            .any(|net| net.prefix_len() == 0)
    }
}

/// Resolves `host:port` (a name or an address).
pub async fn resolve(endpoint: &str) -> Result<SocketAddr, TunnelError> {
    if let Ok(addr) = endpoint.parse() {
        return Ok(addr);
    }
    let mut found = tokio::net::lookup_host(endpoint)
        .await
        .map_err(|e| TunnelError::Resolve(endpoint.into(), e))?;
    found
        .next()
        .ok_or_else(|| TunnelError::Resolve(endpoint.into(), std::io::Error::other("no address")))
}

/// How DNS was set, to undo it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DnsVia {
    Resolvconf,
    Resolved,
}

/// What bringing the tunnel up did: what taking it down undoes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub interface: String,
    pub backend: BackendKind,
    /// The tunnel routes everything: policy rules to remove.
    pub full_tunnel: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsVia>,
}

/// Brings the tunnel up: on any failure, whatever was done is undone.
pub async fn up(
    spec: &TunnelSpec,
    backend: BackendSetting,
    wireguard_go_log: PathBuf,
) -> Result<Applied, TunnelError> {
    let links = Links::connect()?;
    if links.find(&spec.interface).await?.is_some() {
        return Err(TunnelError::Exists(spec.interface.clone()));
    }
    let (connection, handle, _) = rtnetlink::new_connection().map_err(LinkError::Connect)?;
    tokio::spawn(connection);
    if spec.full_tunnel() && table_in_use(&handle).await? {
        return Err(TunnelError::TableInUse);
    }
    let kind = create(&links, &spec.interface, backend, wireguard_go_log).await?;
    let mut applied = Applied {
        interface: spec.interface.clone(),
        backend: kind,
        full_tunnel: false,
        dns: None,
    };
    match configure(spec, &links, &handle, &mut applied).await {
        Ok(()) => Ok(applied),
        Err(error) => {
            warn!(interface = %spec.interface, %error, "bringing the tunnel up failed; undoing it");
            down(&applied).await;
            Err(error)
        }
    }
}

/// Creates the interface with the backend asked for.
async fn create(
    links: &Links,
    interface: &str,
    backend: BackendSetting,
    log: PathBuf,
) -> Result<BackendKind, TunnelError> {
    if backend != BackendSetting::Userspace {
        match links.add_wireguard(interface).await {
            Ok(()) => return Ok(BackendKind::Kernel),
            Err(source) if backend == BackendSetting::Kernel => {
                return Err(TunnelError::NoKernel {
                    interface: interface.into(),
                    source,
                });
            }
            Err(error) => info!(%error, "no kernel WireGuard; starting wireguard-go"),
        }
    }
    let userspace = Userspace::new(interface);
    let name = interface.to_owned();
    tokio::task::spawn_blocking(move || Userspace::new(&name).launch(&log)).await??;
    info!(
        interface,
        pid = userspace.server_pid().ok(),
        "started wireguard-go"
    );
    Ok(BackendKind::Userspace)
}

/// The device handle of a backend kind.
pub fn device(interface: &str, kind: BackendKind) -> Backend {
    match kind {
        BackendKind::Kernel => Backend::Kernel(Kernel::new(interface)),
        BackendKind::Userspace => Backend::Userspace(Userspace::new(interface)),
    }
}

async fn configure(
    spec: &TunnelSpec,
    links: &Links,
    handle: &Handle,
    applied: &mut Applied,
) -> Result<(), TunnelError> {
    let full = spec.full_tunnel();
    set_peer(spec, applied.backend, full.then_some(FULL_TUNNEL_TABLE)).await?;
    let link = links
        .find(&spec.interface)
        .await?
        .ok_or_else(|| TunnelError::Exists(spec.interface.clone()))?;
    links
        .configure(&spec.interface, &link, &spec.addresses, spec.mtu)
        .await?;
    for net in &spec.peer.allowed_ips {
        let table = (net.prefix_len() == 0).then_some(FULL_TUNNEL_TABLE);
        add_route(handle, link.index, *net, table).await?;
    }
    if full {
        applied.full_tunnel = true;
        if families(&spec.peer.allowed_ips).contains(&IpVersion::V4) {
            // Replies from the endpoint pass the reverse-path check only if
            // it looks up their source with the mark (as wg-quick does).
            std::fs::write(SRC_VALID_MARK, "1").map_err(|e| TunnelError::Config {
                field: "allowed_ips",
                value: "0.0.0.0/0".into(),
                reason: format!("setting {SRC_VALID_MARK}: {e}"),
            })?;
        }
        for version in families(&spec.peer.allowed_ips) {
            for rule in full_tunnel_rules(version) {
                let mut add = handle.rule().add();
                *add.message_mut() = rule;
                add.execute()
                    .await
                    .map_err(netlink("adding a policy rule for the full tunnel"))?;
            }
        }
    }
    if !spec.dns.is_empty() {
        applied.dns = set_dns(&spec.interface, &spec.dns)?;
    }
    Ok(())
}

/// Sets the key, the peer and the mark on the device.
async fn set_peer(
    spec: &TunnelSpec,
    kind: BackendKind,
    fwmark: Option<u32>,
) -> Result<(), TunnelError> {
    let device = device(&spec.interface, kind);
    let desired = Desired {
        private_key: Some(spec.private_key),
        listen_port: None,
        peers: BTreeMap::from([(spec.peer.public_key, spec.peer.clone())]),
    };
    tokio::task::spawn_blocking(move || {
        let actual = device.get()?;
        let mut plan = reconcile::plan(&desired, &actual, &HashMap::new());
        plan.fwmark = fwmark;
        device.apply(&plan).map(|_| ())
    })
    .await??;
    Ok(())
}

/// Replaces the peer's preshared key (a renewed MFA session): the
/// tunnel's current WireGuard session goes on; the next handshake uses it.
pub async fn set_preshared_key(
    interface: &str,
    kind: BackendKind,
    peer: &PeerSpec,
    preshared_key: Key,
) -> Result<(), TunnelError> {
    let device = device(interface, kind);
    let mut want = peer.clone();
    want.preshared_key = Some(preshared_key);
    tokio::task::spawn_blocking(move || {
        let actual = device.get()?;
        let desired = Desired {
            private_key: None,
            listen_port: None,
            peers: BTreeMap::from([(want.public_key, want)]),
        };
        let plan = reconcile::plan(&desired, &actual, &HashMap::new());
        device.apply(&plan).map(|_| ())
    })
    .await??;
    Ok(())
}

fn families(nets: &BTreeSet<IpNet>) -> Vec<IpVersion> {
    let mut out = Vec::new();
    if nets
        .iter()
        .any(|n| n.prefix_len() == 0 && n.addr().is_ipv4())
    {
        out.push(IpVersion::V4);
    }
    if nets
        .iter()
        .any(|n| n.prefix_len() == 0 && n.addr().is_ipv6())
    {
        out.push(IpVersion::V6);
    }
    out
}

async fn add_route(
    handle: &Handle,
    index: u32,
    net: IpNet,
    table: Option<u32>,
) -> Result<(), TunnelError> {
    let mut route = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(net.addr(), net.prefix_len())
        .map_err(|e| bad("allowed_ips", &net.to_string(), e))?
        .output_interface(index);
    if let Some(table) = table {
        route = route.table_id(table);
    }
    handle
        .route()
        .add(route.build())
        .execute()
        .await
        .map_err(|e| match &e {
            rtnetlink::Error::NetlinkError(m) if m.raw_code() == -libc::EEXIST => {
                TunnelError::Config {
                    field: "allowed_ips",
                    value: net.to_string(),
                    reason: "a route to it exists already (through another interface?)".into(),
                }
            }
            _ => netlink(format!("adding the route to {net}"))(e),
        })
}

/// wg-quick's two rules: the main table, its default route left out, then
/// everything the tunnel did not mark through the tunnel's table.
fn full_tunnel_rules(version: IpVersion) -> [RuleMessage; 2] {
    let family = match version {
        IpVersion::V4 => netlink_packet_route::AddressFamily::Inet,
        IpVersion::V6 => netlink_packet_route::AddressFamily::Inet6,
    };
    let mut suppress = RuleMessage::default();
    suppress.header.family = family;
    suppress.header.action = netlink_packet_route::rule::RuleAction::ToTable;
    suppress.header.table = libc::RT_TABLE_MAIN;
    suppress.attributes = vec![
        RuleAttribute::Table(u32::from(libc::RT_TABLE_MAIN)),
        RuleAttribute::SuppressPrefixLen(0),
        RuleAttribute::Priority(SUPPRESS_PRIORITY),
    ];
    let mut tunnel = RuleMessage::default();
    tunnel.header.family = family;
    tunnel.header.action = netlink_packet_route::rule::RuleAction::ToTable;
    tunnel.header.flags = RuleFlags::Invert;
    tunnel.attributes = vec![
        RuleAttribute::Table(FULL_TUNNEL_TABLE),
        RuleAttribute::FwMark(FULL_TUNNEL_TABLE),
        RuleAttribute::Priority(TUNNEL_PRIORITY),
    ];
    [suppress, tunnel]
}

/// True when a rule already sends packets to the full tunnel's table.
async fn table_in_use(handle: &Handle) -> Result<bool, TunnelError> {
    for version in [IpVersion::V4, IpVersion::V6] {
        let rules: Vec<RuleMessage> = handle
            .rule()
            .get(version)
            .execute()
            .try_collect()
            .await
            .map_err(netlink("listing policy rules"))?;
        if rules.iter().any(|r| {
            r.attributes
                .contains(&RuleAttribute::Table(FULL_TUNNEL_TABLE))
        }) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Sets the tunnel's DNS servers through systemd-resolved or resolvconf,
/// whichever the host has. `None` when it has neither (said in the log).
fn set_dns(interface: &str, servers: &[IpAddr]) -> Result<Option<DnsVia>, TunnelError> {
    let list: Vec<String> = servers.iter().map(ToString::to_string).collect();
    if resolved_running() {
        let mut dns = Command::new("resolvectl");
        dns.arg("dns").arg(interface).args(&list);
        run(dns)?;
        let mut domain = Command::new("resolvectl");
        domain.args(["domain", interface, "~."]);
        run(domain)?;
        return Ok(Some(DnsVia::Resolved));
    }
    if which("resolvconf") {
        let text: String = list.iter().map(|s| format!("nameserver {s}\n")).collect();
        let mut command = Command::new("resolvconf");
        command.args(["-a", &format!("tun.{interface}"), "-m", "0", "-x"]);
        run_with_input(command, &text)?;
        return Ok(Some(DnsVia::Resolvconf));
    }
    warn!(
        servers = %list.join(", "),
        "the location names DNS servers, but this host has neither systemd-resolved nor resolvconf: names resolve as before"
    );
    Ok(None)
}

fn resolved_running() -> bool {
    which("resolvectl") && std::path::Path::new("/run/systemd/resolve/io.systemd.Resolve").exists()
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

fn run(mut command: Command) -> Result<(), TunnelError> {
    let shown = format!("{command:?}");
    let out = command.output().map_err(|e| TunnelError::Dns {
        command: shown.clone(),
        detail: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(TunnelError::Dns {
            command: shown,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

fn run_with_input(mut command: Command, input: &str) -> Result<(), TunnelError> {
    use std::io::Write as _;
    let shown = format!("{command:?}");
    let failed = |detail: String| TunnelError::Dns {
        command: shown.clone(),
        detail,
    };
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| failed(e.to_string()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| failed(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(failed(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// Takes the tunnel down: DNS, the policy rules, then the interface (its
/// addresses and routes go with it; wireguard-go exits with its device).
/// Goes on past errors, which it logs.
pub async fn down(applied: &Applied) {
    match applied.dns {
        Some(DnsVia::Resolved) => {
            let mut revert = Command::new("resolvectl");
            revert.args(["revert", &applied.interface]);
            if let Err(error) = run(revert) {
                warn!(%error, "reverting DNS");
            }
        }
        Some(DnsVia::Resolvconf) => {
            let mut delete = Command::new("resolvconf");
            delete.args(["-d", &format!("tun.{}", applied.interface), "-f"]);
            if let Err(error) = run(delete) {
                warn!(%error, "removing DNS");
            }
        }
        None => {}
    }
    let Ok((connection, handle, _)) = rtnetlink::new_connection() else {
        warn!("no netlink socket: the interface is left");
        return;
    };
    tokio::spawn(connection);
    if applied.full_tunnel {
        for version in [IpVersion::V4, IpVersion::V6] {
            for rule in full_tunnel_rules(version) {
                // A family the tunnel did not route has no rules to remove.
                let _ = handle.rule().del(rule).execute().await;
            }
        }
    }
    let mut found = handle
        .link()
        .get()
        .match_name(applied.interface.clone())
        .execute();
    if let Ok(Some(link)) = found.try_next().await
        && let Err(error) = handle.link().del(link.header.index).execute().await
    {
        warn!(interface = %applied.interface, %error, "deleting the interface");
    }
}

/// Reads the peer's last handshake and traffic, for `status`.
pub async fn peer_stats(
    interface: &str,
    kind: BackendKind,
) -> Result<Option<(Option<std::time::SystemTime>, u64, u64)>, TunnelError> {
    let device = device(interface, kind);
    let actual = tokio::task::spawn_blocking(move || device.get()).await??;
    Ok(actual
        .peers
        .values()
        .next()
        .map(|p| (p.last_handshake, p.rx_bytes, p.tx_bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(allowed: &[&str], dns: &[&str]) -> DeviceConfig {
        DeviceConfig {
            device: "laptop".into(),
            location: "lab".into(),
            addresses: vec!["10.8.0.2/32".into(), "fd00::2/128".into()],
            dns: dns.iter().map(|s| s.to_string()).collect(),
            mtu: None,
            server_public_key: Key::new([1; 32]).to_string(),
            preshared_key: None,
            endpoint: "198.51.100.100:51820".into(),
            allowed_ips: allowed.iter().map(|s| s.to_string()).collect(),
            persistent_keepalive: 25,
            mfa: false,
            session_expires_in_s: None,
        }
    }

    fn spec(config: &DeviceConfig) -> Result<TunnelSpec, TunnelError> {
        TunnelSpec::new(
            "lab",
            Key::new([2; 32]),
            config,
            Some(Key::new([3; 32])),
            "198.51.100.100:51820".parse().unwrap(),
        )
    }

    #[test]
    fn a_config_becomes_the_tunnel_wg_quick_would_make() {
        let spec = spec(&config(&["10.8.0.0/24", "10.9.0.7/16"], &["10.8.0.1"])).unwrap();
        assert_eq!(spec.mtu, DEFAULT_MTU);
        assert_eq!(spec.peer.persistent_keepalive, Some(25));
        assert_eq!(
            spec.peer
                .allowed_ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.8.0.0/24", "10.9.0.0/16"],
            "host bits are dropped"
        );
        assert!(!spec.full_tunnel());
        let full = self::spec(&config(&["0.0.0.0/0", "::/0"], &[])).unwrap();
        assert!(full.full_tunnel());
        assert_eq!(
            families(&full.peer.allowed_ips),
            [IpVersion::V4, IpVersion::V6]
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        let mut no_key = config(&["10.8.0.0/24"], &[]);
        no_key.server_public_key = "short".into();
        let mut no_address = config(&["10.8.0.0/24"], &[]);
        no_address.addresses.clear();
        for (config, expected) in [
            (config(&["10.8.0.0/33"], &[]), "allowed_ips \"10.8.0.0/33\""),
            (
                config(&["10.8.0.0/24"], &["dns.example"]),
                "dns \"dns.example\"",
            ),
            (no_key, "server_public_key \"short\""),
            (no_address, "addresses"),
            (
                config(&["198.51.100.0/24"], &[]),
                "the allowed IPs 198.51.100.0/24 hold the endpoint 198.51.100.100",
            ),
        ] {
            let error = spec(&config).unwrap_err().to_string();
            assert!(error.contains(expected), "{expected}: {error}");
        }
    }

    #[test]
    fn the_full_tunnel_rules_are_wg_quicks() {
        let [suppress, tunnel] = full_tunnel_rules(IpVersion::V4);
        assert!(
            suppress
                .attributes
                .contains(&RuleAttribute::SuppressPrefixLen(0))
        );
        assert!(suppress.attributes.contains(&RuleAttribute::Table(254)));
        assert_eq!(tunnel.header.flags, RuleFlags::Invert);
        assert!(
            tunnel
                .attributes
                .contains(&RuleAttribute::FwMark(FULL_TUNNEL_TABLE))
        );
        assert!(
            tunnel
                .attributes
                .contains(&RuleAttribute::Table(FULL_TUNNEL_TABLE))
        );
    }
}
