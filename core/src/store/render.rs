//! What the store renders for the links: a location's config for its
//! gateways, one device's peer, and a device's config for its owner.
//!
//! A device is a peer of its location's gateways when it and its user are
//! enabled and, on an MFA location, while it has an MFA session (with that
//! session's preshared key); without MFA, with the device's own preshared
//! key. A device awaiting enrolment (no public key yet) is never a peer.

use std::collections::BTreeMap;

use super::db::{Db, OptionalExtension as _, params};
use tidegate_proto::{edge::v1 as edge, gateway::v1 as gateway};

use super::{StoreError, db, locations, sql};
use crate::keys::Key;

/// One peer as the gateways get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    /// The device's addresses, CIDR, sorted.
    pub allowed_ips: Vec<String>,
}

impl PeerSpec {
    pub fn to_proto(&self) -> gateway::Peer {
        gateway::Peer {
            public_key: self.public_key.as_bytes().to_vec(),
            preshared_key: self
                .preshared_key
                .map(|k| k.as_bytes().to_vec())
                .unwrap_or_default(),
            allowed_ips: self.allowed_ips.clone(),
            persistent_keepalive_s: 0,
        }
    }
}

fn key_column(bytes: Vec<u8>, column: usize) -> db::Result<Key> {
    Key::from_slice(&bytes).map_err(|e| db::DbError::column(column, e))
}

/// The device's addresses, sorted.
pub(crate) fn device_addresses(conn: &Db, device_id: i64) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT address FROM device_addresses WHERE device_id = ?1 ORDER BY address",
        )
        .map_err(sql("reading device addresses"))?;
    let rows = stmt
        .query_map([device_id], |row| row.get(0))
        .map_err(sql("reading device addresses"))?;
    rows.collect::<Result<_, _>>()
        .map_err(sql("reading device addresses"))
}

/// The device's peer and its location's id, or `None` when it is not a
/// peer now (or does not exist).
pub(crate) fn device_peer(
    conn: &Db,
    device_id: i64,
) -> Result<Option<(u32, PeerSpec)>, StoreError> {
    let row = conn
        .prepare_cached(
            "SELECT d.location_id, d.public_key, d.preshared_key, l.mfa, s.preshared_key \
             FROM devices d JOIN users u ON u.id = d.user_id JOIN locations l ON l.id = d.location_id \
             LEFT JOIN mfa_sessions s ON s.device_id = d.id \
             WHERE d.id = ?1 AND d.enabled AND u.enabled AND d.public_key IS NOT NULL",
        )
        .map_err(sql("reading a device's peer"))?
        .query_row([device_id], |row| {
            Ok((
                row.get::<_, u32>(0)?,
                key_column(row.get(1)?, 1)?,
                key_column(row.get(2)?, 2)?,
                row.get::<_, bool>(3)?,
                row.get::<_, Option<Vec<u8>>>(4)?,
            ))
        })
        .optional()
        .map_err(sql("reading a device's peer"))?;
    let Some((location, public_key, device_psk, mfa, session_psk)) = row else {
        return Ok(None);
    };
    let preshared_key = match (mfa, session_psk) {
        (false, _) => device_psk,
        (true, Some(psk)) => key_column(psk, 4).map_err(sql("reading a session key"))?,
        (true, None) => return Ok(None),
    };
    Ok(Some((
        location,
        PeerSpec {
            public_key,
            preshared_key: Some(preshared_key),
            allowed_ips: device_addresses(conn, device_id)?,
        },
    )))
}

/// Every peer of a location, by public key.
pub(crate) fn location_peers(conn: &Db, location_id: u32) -> Result<Vec<PeerSpec>, StoreError> {
    let mut addresses: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    {
        let mut stmt = conn
            .prepare_cached(
                "SELECT device_id, address FROM device_addresses WHERE location_id = ?1 ORDER BY address",
            )
            .map_err(sql("reading device addresses"))?;
        let rows = stmt
            .query_map([location_id], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })
            .map_err(sql("reading device addresses"))?;
        for row in rows {
            let (device, address) = row.map_err(sql("reading device addresses"))?;
            addresses.entry(device).or_default().push(address);
        }
    }
    let mut stmt = conn
        .prepare_cached(
            "SELECT d.id, d.public_key, CASE WHEN l.mfa THEN s.preshared_key ELSE d.preshared_key END \
             FROM devices d JOIN users u ON u.id = d.user_id JOIN locations l ON l.id = d.location_id \
             LEFT JOIN mfa_sessions s ON s.device_id = d.id \
             WHERE d.location_id = ?1 AND d.enabled AND u.enabled AND d.public_key IS NOT NULL \
             AND (NOT l.mfa OR s.device_id IS NOT NULL) \
             ORDER BY d.public_key",
        )
        .map_err(sql("reading peers"))?;
    let rows = stmt
        .query_map([location_id], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                key_column(row.get(1)?, 1)?,
                key_column(row.get(2)?, 2)?,
            ))
        })
        .map_err(sql("reading peers"))?;
    let mut peers = Vec::new();
    for row in rows {
        let (device, public_key, preshared_key) = row.map_err(sql("reading peers"))?;
        peers.push(PeerSpec {
            public_key,
            preshared_key: Some(preshared_key),
            allowed_ips: addresses.remove(&device).unwrap_or_default(),
        });
    }
    Ok(peers)
}

/// The whole config of a location, at its current version; `None` when the
/// location is gone.
pub(crate) fn location_config(
    conn: &Db,
    location_id: u32,
) -> Result<Option<gateway::LocationConfig>, StoreError> {
    let Some(location) = locations::by_id(conn, location_id)? else {
        return Ok(None);
    };
    let peers = location_peers(conn, location_id)?;
    Ok(Some(gateway::LocationConfig {
        version: location.version,
        location_id,
        location_name: location.name,
        interface: Some(gateway::WireguardInterface {
            private_key: location.private_key.as_bytes().to_vec(),
            listen_port: location.listen_port,
            addresses: location.addresses,
            mtu: location.mtu,
        }),
        mfa: location.mfa,
        peer_disconnect_threshold_s: location.threshold_s,
        peers: peers.iter().map(PeerSpec::to_proto).collect(),
    }))
}

/// A device's config for its owner, with `preshared_key` (the device's own,
/// or an MFA session's; `None` on an MFA location before a login).
pub(crate) fn device_config(
    conn: &Db,
    device_id: i64,
    preshared_key: Option<Key>,
) -> Result<edge::DeviceConfig, StoreError> {
    let (device, location_id): (String, u32) = conn
        .query_row(
            "SELECT name, location_id FROM devices WHERE id = ?1",
            params![device_id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .map_err(sql("reading a device"))?;
    let location = locations::by_id(conn, location_id)?
        .ok_or_else(|| StoreError::InUse("the device's location is gone".into()))?;
    let host = if location.endpoint.is_empty() {
        location.vips.first().cloned().unwrap_or_default()
    } else {
        location.endpoint.clone()
    };
    let endpoint = with_port(&host, location.listen_port);
    let allowed_ips = if location.allowed_ips.is_empty() {
        location
            .nets()
            .iter()
            .map(|n| n.trunc().to_string())
            .collect()
    } else {
        location.allowed_ips.clone()
    };
    Ok(edge::DeviceConfig {
        device,
        location: location.name.clone(),
        addresses: device_addresses(conn, device_id)?,
        dns: location.dns.clone(),
        mtu: location.mtu,
        server_public_key: location.private_key.public().to_base64(),
        preshared_key: preshared_key.map(|k| k.to_base64()).unwrap_or_default(),
        endpoint,
        allowed_ips,
        persistent_keepalive_s: location.keepalive_s,
        mfa: location.mfa,
        session_expires_in_s: 0,
    })
}

/// "host:port" from an endpoint that may carry its own port.
fn with_port(host: &str, port: u32) -> String {
    if host.starts_with('[') {
        if host.contains("]:") {
            host.to_owned()
        } else {
            format!("{host}:{port}")
        }
    } else if host.parse::<std::net::Ipv6Addr>().is_ok() {
        format!("[{host}]:{port}")
    } else if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_get_the_port_when_they_have_none() {
        assert_eq!(with_port("198.51.100.1", 51820), "198.51.100.1:51820");
        assert_eq!(
            with_port("vpn.example.org:443", 51820),
            "vpn.example.org:443"
        );
        assert_eq!(with_port("2001:db8::1", 51820), "[2001:db8::1]:51820");
        assert_eq!(with_port("[2001:db8::1]", 51820), "[2001:db8::1]:51820");
        assert_eq!(with_port("[2001:db8::1]:1", 51820), "[2001:db8::1]:1");
    }
}
