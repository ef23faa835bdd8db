//! How large a message each link takes, one value for both ends: a
//! location's whole config and a gateway's status are sized for
//! [`MAX_DEVICES`] devices, an Edge's request or reply is small.

/// Devices of one location the links are sized for.
pub const MAX_DEVICES: usize = 100_000;

/// Core to gateway: a location's whole config. A peer takes at most 140
/// bytes (two keys, an IPv4 and an IPv6 host address, keepalive), so
/// [`MAX_DEVICES`] peers take under 14 MB.
pub const MAX_CONFIG_BYTES: usize = 32 * 1024 * 1024;

/// Gateway to Core: a status. A peer's takes at most 120 bytes (key,
/// an IPv6 endpoint, three counters); [`MAX_DEVICES`] of them and
/// [`MAX_REMOVALS_PER_STATUS`] MFA removals fit with room.
pub const MAX_STATUS_BYTES: usize = 16 * 1024 * 1024;

/// MFA removals in one status: a gateway sends at most this many, Core
/// handles at most this many (and acknowledges those).
pub const MAX_REMOVALS_PER_STATUS: usize = 256;

/// Core and an Edge: one client request or its reply.
pub const MAX_EDGE_MESSAGE_BYTES: usize = 1024 * 1024;

/// Core's admin socket (local, root only): a listing of every device of
/// [`MAX_DEVICES`]-device locations fits.
pub const MAX_ADMIN_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;
    use crate::gateway::v1 as pb;

    /// The largest peer: both keys, the longest host address of each
    /// family.
    fn largest_peer() -> pb::Peer {
        pb::Peer {
            public_key: vec![0xff; 32],
            preshared_key: vec![0xff; 32],
            allowed_ips: vec![
                "255.255.255.255/32".into(),
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128".into(),
            ],
            persistent_keepalive_s: 65_535,
        }
    }

    #[test]
    fn a_config_of_the_most_devices_fits() {
        let config = pb::CoreMessage {
            // The largest term: every byte of the varint.
            term: u64::MAX,
            msg: Some(pb::core_message::Msg::Config(pb::LocationConfig {
                version: u64::MAX,
                location_id: u32::MAX,
                location_name: "x".repeat(64),
                interface: Some(pb::WireguardInterface {
                    private_key: vec![0xff; 32],
                    listen_port: 65_535,
                    addresses: vec!["255.255.255.255/32".into(); 2],
                    mtu: 9000,
                }),
                mfa: true,
                peer_disconnect_threshold_s: u32::MAX,
                peers: vec![largest_peer(); MAX_DEVICES],
            })),
        };
        assert_eq!(largest_peer().encoded_len() + 3, 140);
        let len = config.encoded_len();
        assert!(
            len * 2 < MAX_CONFIG_BYTES,
            "{len} bytes leave too little room under {MAX_CONFIG_BYTES}"
        );
    }

    #[test]
    fn a_status_of_the_most_peers_fits() {
        let peer = pb::PeerStatus {
            public_key: vec![0xff; 32],
            endpoint: "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".into(),
            last_handshake_unix_ms: i64::MAX,
            rx_bytes: u64::MAX,
            tx_bytes: u64::MAX,
        };
        let removal = pb::MfaRemoval {
            public_key: vec![0xff; 32],
            at_unix_ms: i64::MAX,
            reason: "inactive".into(),
            seq: u64::MAX,
        };
        let status = pb::GatewayMessage {
            msg: Some(pb::gateway_message::Msg::Status(pb::Status {
                ha: Some(pb::HaStatus {
                    role: "master".into(),
                    faults: vec!["x".repeat(200); 8],
                    ..Default::default()
                }),
                peers: vec![peer; MAX_DEVICES],
                removals: vec![removal; MAX_REMOVALS_PER_STATUS],
                at_unix_ms: i64::MAX,
            })),
        };
        let len = status.encoded_len();
        assert!(
            len + len / 4 < MAX_STATUS_BYTES,
            "{len} bytes leave too little room under {MAX_STATUS_BYTES}"
        );
    }
}
