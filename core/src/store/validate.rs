//! Checks of operator input, each naming the field and what is wrong.

use std::{collections::BTreeSet, net::IpAddr};

use ipnet::IpNet;

use super::StoreError;
use crate::keys::Key;

/// Longest name of a location, gateway, device or Edge (a DNS label).
pub const NAME_MAX: usize = 63;
/// Longest user name (room for an e-mail address).
pub const USER_NAME_MAX: usize = 128;
/// Lowest MTU: IPv4's minimum, and IPv6's when the location has IPv6.
pub const MTU_MIN_V4: u32 = 576;
pub const MTU_MIN_V6: u32 = 1280;
pub const MTU_MAX: u32 = 9000;
/// Longest MFA peer-disconnect threshold: a week.
pub const THRESHOLD_MAX_S: u32 = 7 * 24 * 3600;
/// Shortest and longest MFA session lifetime (0 is none): a minute, 30 days.
pub const MFA_SESSION_MIN_S: u32 = 60;
pub const MFA_SESSION_MAX_S: u32 = 30 * 24 * 3600;
/// Longest list of VIPs, DNS servers or allowed IPs.
pub const LIST_MAX: usize = 64;

/// A name: ASCII letters, digits, `.`, `_`, `-`, starting with a letter or
/// digit.
pub fn name(field: &'static str, text: &str) -> Result<String, StoreError> {
    name_with(field, text, NAME_MAX, "")
}

/// A user name: as [`name`], with `@` and `+` too, up to 128 characters.
pub fn user_name(field: &'static str, text: &str) -> Result<String, StoreError> {
    name_with(field, text, USER_NAME_MAX, "@+")
}

fn name_with(
    field: &'static str,
    text: &str,
    max: usize,
    extra: &str,
) -> Result<String, StoreError> {
    if text.is_empty() {
        return Err(StoreError::invalid(field, "must not be empty"));
    }
    if text.len() > max {
        return Err(StoreError::invalid(
            field,
            format!("{} characters, at most {max}", text.len()),
        ));
    }
    let first = text.as_bytes()[0];
    if !first.is_ascii_alphanumeric() {
        return Err(StoreError::invalid(
            field,
            format!("{text:?} must start with a letter or digit"),
        ));
    }
    if let Some(bad) = text
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c) || extra.contains(*c)))
    {
        return Err(StoreError::invalid(
            field,
            format!(
                "{text:?} has {bad:?}; use letters, digits, '.', '_', '-'{}",
                if extra.is_empty() {
                    String::new()
                } else {
                    format!(", {extra:?}")
                }
            ),
        ));
    }
    Ok(text.to_owned())
}

/// A certificate identity: a DNS name, and not Core's in any case (a
/// gateway or Edge with Core's identity could open Links as Core).
pub fn identity(field: &'static str, text: &str) -> Result<String, StoreError> {
    tidegate_proto::tls::check_identity(text)
        .map_err(|_| StoreError::invalid(field, format!("{text:?} is not a DNS name")))?;
    if tidegate_proto::tls::is_reserved(text) {
        return Err(StoreError::invalid(
            field,
            format!(
                "{text:?} is Core's identity ({:?}, compared ignoring case): no gateway or Edge may have it",
                tidegate_proto::tls::CORE_IDENTITY
            ),
        ));
    }
    Ok(text.to_owned())
}

/// The certificate identity given, or the name when none is: either must
/// be a DNS name, and the error names the field it came from.
pub fn identity_or_name(identity: &str, name: &str) -> Result<String, StoreError> {
    if identity.is_empty() {
        self::identity("name", name)
    } else {
        self::identity("identity", identity)
    }
}

/// "host:port" to dial: an IP address (IPv6 in brackets) or a DNS name, and
/// a port.
pub fn dial_address(field: &'static str, text: &str) -> Result<String, StoreError> {
    let (host, port) = split_host_port(text)
        .ok_or_else(|| StoreError::invalid(field, format!("{text:?} is not host:port")))?;
    let port = port
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
        .ok_or_else(|| {
            StoreError::invalid(field, format!("{text:?} needs a port from 1 to 65535"))
        })?;
    host_name(field, host)?;
    let _ = port;
    Ok(text.to_owned())
}

/// "host" or "host:port" clients dial, empty allowed.
pub fn endpoint(field: &'static str, text: &str) -> Result<String, StoreError> {
    if text.is_empty() {
        return Ok(String::new());
    }
    let (host, port) = split_host_port(text)
        .ok_or_else(|| StoreError::invalid(field, format!("{text:?} is not host or host:port")))?;
    if let Some(port) = port
        && port.parse::<u16>().ok().filter(|p| *p != 0).is_none()
    {
        return Err(StoreError::invalid(
            field,
            format!("{text:?}: the port must be 1 to 65535"),
        ));
    }
    host_name(field, host)?;
    Ok(text.to_owned())
}

/// Splits "host", "host:port", "[v6]" or "[v6]:port"; a bare IPv6 address
/// is a host without a port.
fn split_host_port(text: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            _ => Some((host, Some(after.strip_prefix(':')?))),
        };
    }
    if text.parse::<IpAddr>().is_ok() {
        return Some((text, None));
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host, Some(port))),
        Some(_) => None,
        None => Some((text, None)),
    }
}

fn host_name(field: &'static str, host: &str) -> Result<(), StoreError> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let valid = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid {
        Ok(())
    } else {
        Err(StoreError::invalid(
            field,
            format!("{host:?} is neither an IP address nor a DNS name"),
        ))
    }
}

/// The gateway side's tunnel addresses: one or two interface addresses
/// (address and prefix, "10.8.0.1/24"), at most one per family, each in a
/// network with room for devices.
pub fn interface_addresses(list: &[String]) -> Result<Vec<IpNet>, StoreError> {
    const FIELD: &str = "addresses";
    if list.is_empty() {
        return Err(StoreError::invalid(
            FIELD,
            "at least one address is needed (e.g. 10.8.0.1/24)",
        ));
    }
    let mut nets: Vec<IpNet> = Vec::new();
    for text in list {
        let net: IpNet = text
            .trim()
            .parse()
            .map_err(|_| StoreError::invalid(FIELD, format!("{text:?} is not address/prefix")))?;
        let (room, family) = match net {
            IpNet::V4(n) => (n.prefix_len() <= 30, "IPv4"),
            IpNet::V6(n) => (n.prefix_len() <= 126, "IPv6"),
        };
        if !room {
            return Err(StoreError::invalid(
                FIELD,
                format!(
                    "{text}: the network leaves no room for devices (at most /30 for IPv4, /126 for IPv6)"
                ),
            ));
        }
        if net.addr() == net.network() || (net.addr().is_ipv4() && net.addr() == net.broadcast()) {
            return Err(StoreError::invalid(
                FIELD,
                format!(
                    "{text}: use a host address of the network, e.g. {}",
                    first_host(&net)
                ),
            ));
        }
        if nets
            .iter()
            .any(|n| n.addr().is_ipv4() == net.addr().is_ipv4())
        {
            return Err(StoreError::invalid(
                FIELD,
                format!("{text}: one {family} address per location"),
            ));
        }
        nets.push(net);
    }
    Ok(nets)
}

fn first_host(net: &IpNet) -> IpAddr {
    net.hosts().next().unwrap_or(net.addr())
}

/// CIDR networks without host bits (allowed IPs).
pub fn networks(field: &'static str, list: &[String]) -> Result<Vec<String>, StoreError> {
    limit(field, list)?;
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for text in list {
        let net: IpNet = text
            .trim()
            .parse()
            .or_else(|_| text.trim().parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| StoreError::invalid(field, format!("{text:?} is not a CIDR network")))?;
        if net.trunc() != net {
            return Err(StoreError::invalid(
                field,
                format!("{text} has host bits set; the network is {}", net.trunc()),
            ));
        }
        if seen.insert(net) {
            out.push(net.to_string());
        }
    }
    Ok(out)
}

/// IP addresses (VIPs, DNS servers): unicast, no duplicates.
pub fn ips(field: &'static str, list: &[String]) -> Result<Vec<String>, StoreError> {
    limit(field, list)?;
    let mut seen = BTreeSet::new();
    for text in list {
        let ip: IpAddr = text
            .trim()
            .parse()
            .map_err(|_| StoreError::invalid(field, format!("{text:?} is not an IP address")))?;
        if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
            return Err(StoreError::invalid(
                field,
                format!("{ip} is not a unicast address"),
            ));
        }
        if !seen.insert(ip) {
            return Err(StoreError::invalid(field, format!("{ip} is listed twice")));
        }
    }
    Ok(list.iter().map(|s| s.trim().to_owned()).collect())
}

fn limit(field: &'static str, list: &[String]) -> Result<(), StoreError> {
    if list.len() > LIST_MAX {
        return Err(StoreError::invalid(
            field,
            format!("{} entries, at most {LIST_MAX}", list.len()),
        ));
    }
    Ok(())
}

/// A listen port.
pub fn port(field: &'static str, port: u32) -> Result<u16, StoreError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| StoreError::invalid(field, format!("{port} is not a port from 1 to 65535")))
}

/// An MTU: 0 (the gateway's default) or within the bounds for the
/// location's address families.
pub fn mtu(mtu: u32, nets: &[IpNet]) -> Result<u32, StoreError> {
    if mtu == 0 {
        return Ok(0);
    }
    let min = if nets.iter().any(|n| matches!(n, IpNet::V6(_))) {
        MTU_MIN_V6
    } else {
        MTU_MIN_V4
    };
    if !(min..=MTU_MAX).contains(&mtu) {
        return Err(StoreError::invalid(
            "mtu",
            format!(
                "{mtu} is outside {min}..={MTU_MAX} (IPv6 needs at least {MTU_MIN_V6}; 0 for the gateway's default)"
            ),
        ));
    }
    Ok(mtu)
}

/// The MFA peer-disconnect threshold.
pub fn threshold(secs: u32) -> Result<u32, StoreError> {
    if !(1..=THRESHOLD_MAX_S).contains(&secs) {
        return Err(StoreError::invalid(
            "peer_disconnect_threshold_s",
            format!("{secs} is outside 1..={THRESHOLD_MAX_S} seconds"),
        ));
    }
    Ok(secs)
}

/// The lifetime of an MFA session: 0 (until the device is idle) or
/// 60..=2592000 seconds.
pub fn mfa_session(secs: u32) -> Result<u32, StoreError> {
    if secs != 0 && !(MFA_SESSION_MIN_S..=MFA_SESSION_MAX_S).contains(&secs) {
        return Err(StoreError::invalid(
            "mfa_session_s",
            format!(
                "{secs} is outside {MFA_SESSION_MIN_S}..={MFA_SESSION_MAX_S} seconds (0: no limit)"
            ),
        ));
    }
    Ok(secs)
}

/// A persistent keepalive interval (WireGuard takes 16 bits; 0 is off).
pub fn keepalive(secs: u32) -> Result<u32, StoreError> {
    if secs > u32::from(u16::MAX) {
        return Err(StoreError::invalid(
            "persistent_keepalive_s",
            format!("{secs} is over {} seconds", u16::MAX),
        ));
    }
    Ok(secs)
}

/// A WireGuard key in base64.
pub fn key(field: &'static str, text: &str) -> Result<Key, StoreError> {
    Key::parse(text).map_err(|e| StoreError::invalid(field, e.to_string()))
}

/// A device's tunnel address: one host ("10.8.0.2", "10.8.0.2/32") inside
/// one of the location's networks, not the network's own, broadcast or
/// gateway address.
pub fn device_address(text: &str, nets: &[IpNet]) -> Result<IpAddr, StoreError> {
    const FIELD: &str = "addresses";
    let text = text.trim();
    let ip = match text.parse::<IpNet>() {
        Ok(net) if net.prefix_len() == net.max_prefix_len() => net.addr(),
        Ok(net) => {
            return Err(StoreError::invalid(
                FIELD,
                format!(
                    "{net}: a device address is one host (/{})",
                    net.max_prefix_len()
                ),
            ));
        }
        Err(_) => text
            .parse::<IpAddr>()
            .map_err(|_| StoreError::invalid(FIELD, format!("{text:?} is not an IP address")))?,
    };
    let Some(net) = nets.iter().find(|n| n.contains(&ip)) else {
        let nets: Vec<String> = nets.iter().map(|n| n.trunc().to_string()).collect();
        return Err(StoreError::invalid(
            FIELD,
            format!(
                "{ip} is outside the location's networks ({})",
                nets.join(", ")
            ),
        ));
    };
    if ip == net.network() || (ip.is_ipv4() && ip == net.broadcast()) {
        return Err(StoreError::invalid(
            FIELD,
            format!("{ip} is the network's own or broadcast address"),
        ));
    }
    if ip == net.addr() {
        return Err(StoreError::invalid(
            FIELD,
            format!("{ip} is the gateways' address"),
        ));
    }
    Ok(ip)
}

/// A host address as CIDR ("10.8.0.2/32").
pub fn host_cidr(ip: IpAddr) -> String {
    IpNet::from(ip).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn message(err: StoreError) -> String {
        err.to_string()
    }

    #[test]
    fn names() {
        assert_eq!(name("name", "gw-a.1").unwrap(), "gw-a.1");
        assert!(message(name("name", "").unwrap_err()).contains("empty"));
        assert!(message(name("name", "-a").unwrap_err()).contains("start"));
        assert!(message(name("name", "a b").unwrap_err()).contains("' '"));
        assert!(name("name", &"a".repeat(64)).is_err());
        assert!(name("name", "a@b").is_err());
        assert_eq!(
            user_name("name", "alice@example.org").unwrap(),
            "alice@example.org"
        );
    }

    #[test]
    fn identities_are_dns_names_other_than_cores() {
        let cases: &[(&str, Option<&str>)] = &[
            ("gw-a", None),
            ("edge.example", None),
            ("core-1", None),
            ("core", Some("Core's identity")),
            ("Core", Some("Core's identity")),
            ("CORE.", Some("Core's identity")),
            ("not a name", Some("not a DNS name")),
        ];
        for (text, expect) in cases {
            match (identity("identity", text), expect) {
                (Ok(_), None) => {}
                (Err(e), Some(part)) => assert!(message(e).contains(part), "{text:?}"),
                (got, _) => panic!("{text:?}: {got:?}"),
            }
        }
        let err = identity_or_name("", "CoRe").unwrap_err();
        assert!(message(err).starts_with("name: "));
    }

    #[test]
    fn addresses_to_dial_and_endpoints() {
        dial_address("address", "198.51.100.7:50051").unwrap();
        dial_address("address", "[2001:db8::7]:50051").unwrap();
        dial_address("address", "gw-a.example.org:50051").unwrap();
        for bad in [
            "198.51.100.7",
            "198.51.100.7:0",
            "gw a:1",
            ":50",
            "2001:db8::7",
        ] {
            assert!(dial_address("address", bad).is_err(), "{bad}");
        }
        endpoint("endpoint", "").unwrap();
        endpoint("endpoint", "vpn.example.org").unwrap();
        endpoint("endpoint", "vpn.example.org:51820").unwrap();
        endpoint("endpoint", "2001:db8::1").unwrap();
        endpoint("endpoint", "[2001:db8::1]:51820").unwrap();
        assert!(endpoint("endpoint", "vpn:x").is_err());
        assert!(endpoint("endpoint", "a..b").is_err());
    }

    #[test]
    fn interface_addresses_need_room_and_one_per_family() {
        let nets = interface_addresses(&strings(&["10.8.0.1/24", "fd00:8::1/64"])).unwrap();
        assert_eq!(nets.len(), 2);
        for (bad, says) in [
            (vec![], "at least one"),
            (vec!["10.8.0.1"], "address/prefix"),
            (vec!["10.8.0.1/32"], "no room"),
            (vec!["10.8.0.0/24"], "host address"),
            (vec!["10.8.0.255/24"], "host address"),
            (vec!["10.8.0.1/24", "10.9.0.1/24"], "one IPv4"),
        ] {
            let err = message(interface_addresses(&strings(&bad)).unwrap_err());
            assert!(err.contains(says), "{bad:?}: {err}");
            assert!(err.starts_with("addresses: "), "{err}");
        }
    }

    #[test]
    fn networks_and_ips() {
        assert_eq!(
            networks(
                "allowed_ips",
                &strings(&["10.0.0.0/8", "10.0.0.0/8", "0.0.0.0/0"])
            )
            .unwrap(),
            ["10.0.0.0/8", "0.0.0.0/0"]
        );
        assert!(
            message(networks("allowed_ips", &strings(&["10.0.0.1/8"])).unwrap_err())
                .contains("host bits")
        );
        ips("vips", &strings(&["198.51.100.100", "2001:db8::100"])).unwrap();
        assert!(message(ips("vips", &strings(&["224.0.0.1"])).unwrap_err()).contains("unicast"));
        assert!(
            message(ips("dns", &strings(&["1.1.1.1", "1.1.1.1"])).unwrap_err()).contains("twice")
        );
        assert!(ips("dns", &strings(&["one"])).is_err());
    }

    #[test]
    fn numbers() {
        assert!(port("listen_port", 0).is_err());
        assert!(port("listen_port", 70000).is_err());
        assert_eq!(port("listen_port", 51820).unwrap(), 51820);
        let v4 = interface_addresses(&strings(&["10.8.0.1/24"])).unwrap();
        let v6 = interface_addresses(&strings(&["fd00::1/64"])).unwrap();
        assert_eq!(mtu(0, &v6).unwrap(), 0);
        assert_eq!(mtu(600, &v4).unwrap(), 600);
        assert!(mtu(600, &v6).is_err());
        assert!(mtu(9001, &v4).is_err());
        assert!(threshold(0).is_err());
        assert!(keepalive(70000).is_err());
        for (secs, ok) in [
            (0, true),
            (1, false),
            (59, false),
            (60, true),
            (2_592_000, true),
            (2_592_001, false),
        ] {
            let result = mfa_session(secs);
            assert_eq!(result.is_ok(), ok, "{secs}");
            if let Err(e) = result {
                assert!(e.to_string().starts_with("mfa_session_s: "), "{e}");
            }
        }
    }

    #[test]
    fn device_addresses_are_hosts_of_the_location() {
        let nets = interface_addresses(&strings(&["10.8.0.1/24", "fd00:8::1/64"])).unwrap();
        assert_eq!(
            device_address("10.8.0.2", &nets).unwrap(),
            "10.8.0.2".parse::<IpAddr>().unwrap()
        );
        device_address("10.8.0.3/32", &nets).unwrap();
        device_address("fd00:8::2/128", &nets).unwrap();
        for (bad, says) in [
            ("10.8.0.0/24", "one host"),
            ("10.9.0.2", "outside"),
            ("10.8.0.0", "network's own"),
            ("10.8.0.255", "broadcast"),
            ("10.8.0.1", "gateways' address"),
            ("ten", "not an IP"),
        ] {
            let err = message(device_address(bad, &nets).unwrap_err());
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
