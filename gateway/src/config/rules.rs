//! The rules between sections of a validated config: what each section
//! accepts alone but the sections together get wrong (a VIP no service
//! protects, an IPv6 advert peer on the IPv4 advert socket). Pure: the
//! daemon's start, `tidegate-gateway --check` and a reload run the same
//! [`check`], so they never disagree.

use std::{fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

use super::Config;
use crate::ha::transport::Destination;

/// How much a finding matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Severity {
    /// The gateway cannot run this config as written: the start, the check
    /// and a reload refuse it.
    Error,
    /// It runs, but probably not as meant: logged at start and on reload,
    /// printed by the check.
    Warning,
}

/// One rule a config breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub severity: Severity,
    /// The rule's name, as docs/CONTROL.md lists it.
    pub rule: &'static str,
    /// The fields that disagree, e.g. `[[service]] 198.51.100.10:51820`.
    pub fields: String,
    pub reason: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} ({})", self.fields, self.reason, self.rule)
    }
}

/// Every rule, by name: the ones [`check`] applies, for the docs' table.
pub const RULES: &[(&str, Severity)] = &[
    (ADVERT_PEER_IPV6, Severity::Error),
    (ADVERT_PEER_IS_VIP, Severity::Error),
    (ADVERT_PEER_TWICE, Severity::Error),
    (VIP_IN_TUNNEL, Severity::Error),
    (SERVICE_IN_TUNNEL, Severity::Error),
    (SERVICE_NOT_VIP, Severity::Warning),
    (VIP_WITHOUT_SERVICE, Severity::Warning),
    (LISTEN_PORT_WITHOUT_SERVICE, Severity::Warning),
    (SERVICE_PORT_NOT_LISTEN_PORT, Severity::Warning),
    (CORE_LISTEN_ON_VIP, Severity::Warning),
];

const ADVERT_PEER_IPV6: &str = "advert-peer-ipv6";
const ADVERT_PEER_IS_VIP: &str = "advert-peer-is-vip";
const ADVERT_PEER_TWICE: &str = "advert-peer-twice";
const VIP_IN_TUNNEL: &str = "vip-in-tunnel";
const SERVICE_IN_TUNNEL: &str = "service-in-tunnel";
const SERVICE_NOT_VIP: &str = "service-not-vip";
const VIP_WITHOUT_SERVICE: &str = "vip-without-service";
const LISTEN_PORT_WITHOUT_SERVICE: &str = "listen-port-without-service";
const SERVICE_PORT_NOT_LISTEN_PORT: &str = "service-port-not-listen-port";
const CORE_LISTEN_ON_VIP: &str = "core-listen-on-vip";

/// Every rule `config` breaks, errors first, each in file order.
pub fn check(config: &Config) -> Vec<Finding> {
    let mut found = Vec::new();
    let mut add = |severity, rule, fields: String, reason: String| {
        found.push(Finding {
            severity,
            rule,
            fields,
            reason,
        });
    };
    let services = config.services.services();
    let vips: &[IpAddr] = config.ha.as_ref().map_or(&[], |ha| &ha.vips);
    let tunnel = config
        .wireguard
        .as_ref()
        .map_or(&[][..], |w| &w.addresses[..]);
    let listen_port = config.wireguard.as_ref().and_then(|w| w.listen_port);

    if let Some(ha) = &config.ha
        && let Destination::Unicast(peers) = &ha.destination
    {
        for (i, peer) in peers.iter().enumerate() {
            if peer.is_ipv6() {
                add(
                    Severity::Error,
                    ADVERT_PEER_IPV6,
                    format!("[ha] peers {peer}"),
                    "the advert socket is IPv4: list the peers' IPv4 addresses".into(),
                );
            }
            if vips.contains(peer) {
                add(
                    Severity::Error,
                    ADVERT_PEER_IS_VIP,
                    format!("[ha] peers {peer}, [ha] vips"),
                    "a VIP moves between the gateways: list each peer's own address".into(),
                );
            }
            if peers[..i].contains(peer) {
                add(
                    Severity::Error,
                    ADVERT_PEER_TWICE,
                    format!("[ha] peers {peer}"),
                    "listed twice: every advert would go to it twice".into(),
                );
            }
        }
    }
    for vip in vips {
        if let Some(net) = tunnel.iter().find(|net| net.contains(vip)) {
            add(
                Severity::Error,
                VIP_IN_TUNNEL,
                format!("[ha] vips {vip}, [wireguard] addresses {net}"),
                "the VIP would be routed into the tunnel it serves".into(),
            );
        }
    }
    for service in services {
        if let Some(net) = tunnel.iter().find(|net| net.contains(&service.ip())) {
            add(
                Severity::Error,
                SERVICE_IN_TUNNEL,
                format!("[[service]] {service}, [wireguard] addresses {net}"),
                "clients would reach the service through the tunnel it carries".into(),
            );
        }
    }
    if config.ha.is_some() {
        for service in services {
            if !vips.contains(&service.ip()) {
                add(
                    Severity::Warning,
                    SERVICE_NOT_VIP,
                    format!("[[service]] {service}, [ha] vips"),
                    "the address is no VIP: clients of an HA location reach the VIPs, \
                     and this address stays on one host through a failover"
                        .into(),
                );
            }
        }
        for vip in vips {
            if !services.iter().any(|s| s.ip() == *vip) {
                add(
                    Severity::Warning,
                    VIP_WITHOUT_SERVICE,
                    format!("[ha] vips {vip}, [[service]]"),
                    "no service has this VIP: the shield does not check its WireGuard traffic"
                        .into(),
                );
            }
        }
    }
    if let Some(port) = listen_port {
        if !services.iter().any(|s| s.port() == port) {
            add(
                Severity::Warning,
                LISTEN_PORT_WITHOUT_SERVICE,
                format!("[wireguard] listen_port {port}, [[service]]"),
                "no service has the listen port: the shield does not check its traffic".into(),
            );
        }
        for service in services.iter().filter(|s| s.port() != port) {
            add(
                Severity::Warning,
                SERVICE_PORT_NOT_LISTEN_PORT,
                format!("[[service]] {service}, [wireguard] listen_port {port}"),
                "the service's port is not the one this gateway's WireGuard listens on".into(),
            );
        }
    }
    if let Some(core) = &config.core
        && vips.contains(&core.listen.ip())
    {
        add(
            Severity::Warning,
            CORE_LISTEN_ON_VIP,
            format!("[core] listen {}, [ha] vips", core.listen),
            "Core would reach only the gateway that holds the VIP, never the backups".into(),
        );
    }
    found.sort_by_key(|f| f.severity != Severity::Error);
    found
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::{config::Overrides, wireguard::key::Key};

    fn config(text: &str) -> Config {
        Config::parse_sections(Path::new("gw.toml"), text, Overrides::default())
            .unwrap_or_else(|e| panic!("{}", crate::error_chain(&e)))
    }

    fn services(list: &[&str]) -> String {
        let mut text = String::from("interface = \"eth0\"\n");
        for s in list {
            let addr: std::net::SocketAddr = s.parse().unwrap();
            text += &format!(
                "[[service]]\naddress = \"{}\"\nport = {}\n",
                addr.ip(),
                addr.port()
            );
        }
        text
    }

    fn ha(vips: &str, extra: &str) -> String {
        format!(
            "[ha]\nlocation_id = 1\ngateway_id = 1\nkey = \"a-shared-key-of-16+\"\nvips = [{vips}]\n{extra}"
        )
    }

    fn wireguard(port: u16, addresses: &str) -> String {
        format!(
            "[wireguard]\ninterface = \"wg0\"\nprivate_key = \"{}\"\nlisten_port = {port}\naddresses = [{addresses}]\n",
            Key::new([1; 32])
        )
    }

    const CORE: &str = "[core]\nlisten = \"198.51.100.100:7443\"\nca_file = \"/ca\"\ncert_file = \"/c\"\nkey_file = \"/k\"\nidentity = \"gw-a\"\n";

    #[test]
    fn each_rule_and_its_severity() {
        let vip = "\"198.51.100.100\"";
        let svc = ["198.51.100.100:51820"];
        let wg = wireguard(51820, "\"10.77.0.1/24\"");
        type Found = Vec<(&'static str, Severity)>;
        let cases: Vec<(&str, String, Found)> = vec![
            (
                "a location that agrees with itself",
                format!("{}{}{wg}", services(&svc), ha(vip, "")),
                vec![],
            ),
            (
                "no [ha]: a host address is fine",
                format!("{}{wg}", services(&["192.0.2.10:51820"])),
                vec![],
            ),
            (
                "an IPv6 advert peer",
                format!(
                    "{}{}",
                    services(&svc),
                    ha(vip, "peers = [\"198.51.100.2\", \"2001:db8::2\"]\n")
                ),
                vec![(ADVERT_PEER_IPV6, Severity::Error)],
            ),
            (
                "a VIP as an advert peer",
                format!(
                    "{}{}",
                    services(&svc),
                    ha(vip, &format!("peers = [{vip}]\n"))
                ),
                vec![(ADVERT_PEER_IS_VIP, Severity::Error)],
            ),
            (
                "a peer twice",
                format!(
                    "{}{}",
                    services(&svc),
                    ha(vip, "peers = [\"198.51.100.2\", \"198.51.100.2\"]\n")
                ),
                vec![(ADVERT_PEER_TWICE, Severity::Error)],
            ),
            (
                "a VIP and a service inside the tunnel's network",
                format!(
                    "{}{}{}",
                    services(&["10.77.0.9:51820"]),
                    ha("\"10.77.0.9\"", ""),
                    wg
                ),
                vec![
                    (VIP_IN_TUNNEL, Severity::Error),
                    (SERVICE_IN_TUNNEL, Severity::Error),
                ],
            ),
            (
                "a service on a host address and a VIP without a service",
                format!(
                    "{}{}",
                    services(&["198.51.100.1:51820"]),
                    ha(&format!("{vip}, \"2001:db8::100\""), "")
                ),
                vec![
                    (SERVICE_NOT_VIP, Severity::Warning),
                    (VIP_WITHOUT_SERVICE, Severity::Warning),
                    (VIP_WITHOUT_SERVICE, Severity::Warning),
                ],
            ),
            (
                "the listen port on no service",
                format!(
                    "{}{}",
                    services(&["198.51.100.100:443"]),
                    wireguard(51820, "")
                ),
                vec![
                    (LISTEN_PORT_WITHOUT_SERVICE, Severity::Warning),
                    (SERVICE_PORT_NOT_LISTEN_PORT, Severity::Warning),
                ],
            ),
            (
                "Core dials a VIP",
                format!(
                    "{}{}{}{CORE}",
                    services(&svc),
                    ha(vip, ""),
                    wireguard(51820, "")
                ),
                vec![(CORE_LISTEN_ON_VIP, Severity::Warning)],
            ),
        ];
        for (name, text, expected) in cases {
            let found: Vec<_> = check(&config(&text))
                .into_iter()
                .map(|f| (f.rule, f.severity))
                .collect();
            assert_eq!(found, expected, "{name}");
        }
    }

    #[test]
    fn the_docs_list_every_rule_with_its_severity() {
        let docs = include_str!("../../../docs/CONTROL.md");
        for (name, severity) in RULES {
            let row = docs
                .lines()
                .find(|line| line.starts_with(&format!("| `{name}` |")))
                .unwrap_or_else(|| panic!("docs/CONTROL.md has no row for {name}"));
            let severity = match severity {
                Severity::Error => "| error |",
                Severity::Warning => "| warning |",
            };
            assert!(row.contains(severity), "{name}: {row}");
        }
    }

    #[test]
    fn a_finding_names_the_fields() {
        let text = format!(
            "{}{}",
            services(&["198.51.100.100:51820"]),
            ha("\"198.51.100.100\"", "peers = [\"2001:db8::2\"]\n")
        );
        let finding = &check(&config(&text))[0];
        assert_eq!(
            finding.to_string(),
            "[ha] peers 2001:db8::2: the advert socket is IPv4: list the peers' IPv4 \
             addresses (advert-peer-ipv6)"
        );
    }
}
