//! What Core knows of each link: connected or not, since when, what the
//! gateway last reported (HA role, priority, health, peers), and when each
//! peer was last active by that gateway's account.

use std::{collections::HashMap, sync::Arc};

use tidegate_proto::gateway::v1 as gateway;

use crate::keys::Key;

/// A handshake younger than this counts as recent (WireGuard's
/// REJECT_AFTER_TIME: a session older than that is dead).
pub const RECENT_HANDSHAKE_MS: i64 = 180_000;

/// One gateway link as its task sees it.
#[derive(Debug, Clone, Default)]
pub struct GatewayState {
    pub connected: bool,
    /// When the link came up or went down.
    pub since_ms: i64,
    pub last_seen_ms: i64,
    pub link_error: String,
    pub hello: Option<gateway::Hello>,
    /// The newest config version sent, and applied.
    pub sent_version: u64,
    pub applied_version: u64,
    /// The last refused version and why.
    pub apply_error: Option<(u64, String)>,
    pub ha: Option<gateway::HaStatus>,
    pub status_ms: i64,
    pub peers: u32,
    pub peers_recent_handshake: u32,
    /// Peer -> when this gateway last saw it active (Unix ms).
    pub activity: Arc<HashMap<Key, i64>>,
}

impl GatewayState {
    /// Whether the gateway has applied `version` (or a later one).
    pub fn has_applied(&self, version: u64) -> bool {
        self.applied_version >= version
    }

    /// The refusal of `version` or later, if any.
    pub fn refused_since(&self, version: u64) -> Option<&str> {
        self.apply_error
            .as_ref()
            .filter(|(v, _)| *v >= version)
            .map(|(_, e)| e.as_str())
    }

    pub fn role(&self) -> Option<&str> {
        self.ha.as_ref().map(|ha| ha.role.as_str())
    }
}

/// One Edge link.
#[derive(Debug, Clone, Default)]
pub struct EdgeState {
    pub connected: bool,
    pub since_ms: i64,
    pub link_error: String,
    pub requests: u64,
    /// The Edge's link certificate's notAfter (its EdgeHello), Unix
    /// seconds; 0: not known.
    pub cert_not_after_unix_s: i64,
}

/// A peer's counters as last seen, for telling activity apart.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerSeen {
    pub rx_bytes: u64,
    pub last_active_ms: i64,
}

/// Folds a Status into what is known of each peer: a peer is active when
/// it completes a handshake or sends data. Returns (peers, peers with a
/// recent handshake).
pub fn fold_peers(seen: &mut HashMap<Key, PeerSeen>, status: &gateway::Status) -> (u32, u32) {
    let at = status.at_unix_ms;
    let mut next = HashMap::with_capacity(status.peers.len());
    let mut recent = 0u32;
    for peer in &status.peers {
        let Ok(key) = Key::from_slice(&peer.public_key) else {
            continue;
        };
        let before = seen.get(&key).copied().unwrap_or_default();
        let mut last_active = before.last_active_ms.max(peer.last_handshake_unix_ms);
        if peer.rx_bytes > before.rx_bytes {
            last_active = last_active.max(at);
        }
        if peer.last_handshake_unix_ms > 0 && at - peer.last_handshake_unix_ms < RECENT_HANDSHAKE_MS
        {
            recent += 1;
        }
        next.insert(
            key,
            PeerSeen {
                rx_bytes: peer.rx_bytes,
                last_active_ms: last_active,
            },
        );
    }
    *seen = next;
    (
        u32::try_from(status.peers.len()).unwrap_or(u32::MAX),
        recent,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u8, handshake: i64, rx: u64) -> gateway::PeerStatus {
        gateway::PeerStatus {
            public_key: vec![n; 32],
            endpoint: String::new(),
            last_handshake_unix_ms: handshake,
            rx_bytes: rx,
            tx_bytes: 0,
        }
    }

    #[test]
    fn activity_is_a_handshake_or_data_received() {
        let mut seen = HashMap::new();
        let status = gateway::Status {
            peers: vec![peer(1, 0, 0), peer(2, 500_000, 100), peer(3, 100_000, 0)],
            at_unix_ms: 600_000,
            ..Default::default()
        };
        assert_eq!(fold_peers(&mut seen, &status), (3, 1));
        assert_eq!(seen[&Key::new([1; 32])].last_active_ms, 0);
        // First sight of bytes counts as activity at the snapshot time.
        assert_eq!(seen[&Key::new([2; 32])].last_active_ms, 600_000);
        assert_eq!(seen[&Key::new([3; 32])].last_active_ms, 100_000);
        let status = gateway::Status {
            peers: vec![peer(2, 500_000, 100), peer(3, 100_000, 50)],
            at_unix_ms: 700_000,
            ..Default::default()
        };
        assert_eq!(fold_peers(&mut seen, &status), (2, 0));
        // No new bytes: still the old time; new bytes: now.
        assert_eq!(seen[&Key::new([2; 32])].last_active_ms, 600_000);
        assert_eq!(seen[&Key::new([3; 32])].last_active_ms, 700_000);
        assert!(!seen.contains_key(&Key::new([1; 32])));
    }
}
