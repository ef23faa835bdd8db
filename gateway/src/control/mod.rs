//! The local control socket: one JSON request per line from `tidectl`, one
//! JSON response per line back. Root only.

pub mod client;
pub mod server;

use serde::{Deserialize, Serialize};
use tidegate_proto::expiry::PkiStatus;

pub use crate::datapath::DatapathCounters;
use crate::{
    ha::status::HaStatus,
    reload::ReloadPlan,
    wireguard::{ApplyReport, PeerEntry, PeersReply, state::Removal},
    xdp::{DirectorStatus, SessionEntry},
};

/// Longest request line the daemon reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What `tidectl` asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    /// The shield's counters.
    Counters,
    /// The WireGuard peers and their stats.
    Peers,
    /// Adds a peer.
    PeerAdd { peer: PeerEntry },
    /// Replaces the settings of a peer added at run time.
    PeerChange { peer: PeerEntry },
    /// Removes a peer added at run time.
    PeerRemove { public_key: String },
    /// Re-reads the config file and applies what changed.
    Reload,
    /// Re-reads the config file and says what a reload would change,
    /// applying nothing.
    ReloadCheck,
    /// The peers an MFA location removed.
    Removals,
    /// The HA agent's state.
    Status,
    /// A planned failover: the master hands over to its best backup.
    Failover,
    /// Maintenance mode on or off: the gateway stays BACKUP.
    Maintenance { on: bool },
    /// Draining on or off: no new clients for this gateway (director mode).
    Drain { on: bool },
    /// The director's pins.
    Sessions,
    /// The director: on or off, backends and their counters.
    Director,
    /// The certificate Core's link presents (as its files hold it now) and
    /// the CA's: serials, expiry.
    Certificates,
}

/// The daemon's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    Ok(Reply),
    Error(String),
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    Counters(DatapathCounters),
    Peers(PeersReply),
    /// What a change did to the WireGuard device.
    Applied(ApplyReport),
    /// What a reload would change.
    ReloadPlan(ReloadPlan),
    Removals(Vec<Removal>),
    Status(Box<HaStatus>),
    /// A handover has started to this gateway.
    HandingOver {
        to: u32,
    },
    /// Maintenance mode is now as asked.
    Maintenance {
        on: bool,
    },
    /// Draining is now as asked.
    Draining {
        on: bool,
    },
    Sessions(Vec<SessionEntry>),
    Director(DirectorStatus),
    /// `None` without a `[core]` section.
    Certificates(Option<PkiStatus>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xdp::{AttachMode, CounterSnapshot};

    /// The counters of a shield on eth0 that has seen nothing.
    pub(super) fn counters() -> DatapathCounters {
        DatapathCounters {
            interface: "eth0".into(),
            xdp_mode: AttachMode::Driver,
            snapshot: CounterSnapshot::default(),
            egress: None,
        }
    }

    #[test]
    fn wire_format_is_stable() {
        assert_eq!(
            serde_json::to_string(&Request::Counters).unwrap(),
            r#"{"command":"counters"}"#
        );
        assert_eq!(
            serde_json::to_string(&Response::Error("no".into())).unwrap(),
            r#"{"error":"no"}"#
        );
        let reply = Response::Ok(Reply::Counters(counters()));
        let json = serde_json::to_value(&reply).unwrap();
        assert_eq!(json["ok"]["counters"]["interface"], "eth0");
        assert_eq!(json["ok"]["counters"]["xdp_mode"], "driver");
        assert_eq!(json["ok"]["counters"]["totals"]["drop"]["packets"], 0);
        let add = Request::PeerAdd {
            peer: PeerEntry {
                public_key: "k".into(),
                ..PeerEntry::default()
            },
        };
        assert_eq!(
            serde_json::to_string(&add).unwrap(),
            r#"{"command":"peer-add","peer":{"public_key":"k","allowed_ips":[]}}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Drain { on: true }).unwrap(),
            r#"{"command":"drain","on":true}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::Sessions).unwrap(),
            r#"{"command":"sessions"}"#
        );
        assert_eq!(
            serde_json::to_string(&Request::PeerRemove {
                public_key: "k".into()
            })
            .unwrap(),
            r#"{"command":"peer-remove","public_key":"k"}"#
        );
    }
}
