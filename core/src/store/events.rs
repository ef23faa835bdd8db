//! The event log: gateway and Edge links, role changes, failovers, MFA
//! logins and session ends, refused configs.

use super::db::params;
use tidegate_proto::admin::v1 as admin;

use super::{EVENTS_KEPT, Store, StoreError, locations, sql};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    GatewayConnected,
    GatewayDisconnected,
    RoleChange,
    Failover,
    ApplyError,
    MfaLogin,
    MfaSessionEnd,
    /// A wrong MFA code.
    MfaFailed,
    /// A device or address locked out by wrong codes.
    MfaLocked,
    EdgeConnected,
    EdgeDisconnected,
    /// A device awaiting its key got one from its client, with a token.
    DeviceEnrolled,
    /// An MFA session ended by its age (the location's `mfa_session_s`).
    MfaSessionEnded,
}

impl EventKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::GatewayConnected => "gateway-connected",
            Self::GatewayDisconnected => "gateway-disconnected",
            Self::RoleChange => "role-change",
            Self::Failover => "failover",
            Self::ApplyError => "apply-error",
            Self::MfaLogin => "mfa-login",
            Self::MfaSessionEnd => "mfa-session-end",
            Self::MfaFailed => "mfa-failed",
            Self::MfaLocked => "mfa-locked",
            Self::EdgeConnected => "edge-connected",
            Self::EdgeDisconnected => "edge-disconnected",
            Self::DeviceEnrolled => "device-enrolled",
            Self::MfaSessionEnded => "mfa-session-ended",
        }
    }
}

/// Most events one listing returns.
pub const LIST_MAX: u32 = 10_000;
/// Events a listing returns when it names no limit.
pub const LIST_DEFAULT: u32 = 50;

impl Store {
    /// Appends an event.
    pub fn log_event(
        &mut self,
        kind: EventKind,
        location: &str,
        subject: &str,
        message: &str,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        self.conn
            .execute(
                "INSERT INTO events (at_ms, kind, location, subject, message) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![now_ms, kind.as_str(), location, subject, message],
            )
            .map_err(sql("logging an event"))?;
        Ok(())
    }

    /// The newest events, of one location or all.
    pub fn list_events(&self, location: &str, limit: u32) -> Result<Vec<admin::Event>, StoreError> {
        if !location.is_empty() {
            // Named locations must exist; old events keep the name they had.
            locations::by_name(&self.conn, location)?;
        }
        let limit = match limit {
            0 => LIST_DEFAULT,
            n if n > LIST_MAX => {
                return Err(StoreError::invalid(
                    "limit",
                    format!("{n} is over {LIST_MAX}"),
                ));
            }
            n => n,
        };
        let mut stmt = self
            .conn
            .prepare(
                "SELECT at_ms, kind, location, subject, message FROM events \
                 WHERE ?1 = '' OR location = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(sql("listing events"))?;
        let rows = stmt
            .query_map(params![location, limit], |row| {
                Ok(admin::Event {
                    at_unix_ms: row.get(0)?,
                    kind: row.get(1)?,
                    location: row.get(2)?,
                    subject: row.get(3)?,
                    message: row.get(4)?,
                })
            })
            .map_err(sql("listing events"))?;
        rows.collect::<Result<_, _>>()
            .map_err(sql("listing events"))
    }

    /// Drops expired tokens, finished logins and the oldest events past
    /// [`EVENTS_KEPT`].
    pub fn housekeeping(&mut self, now_ms: i64) -> Result<(), StoreError> {
        const WEEK_MS: i64 = 7 * 24 * 3600 * 1000;
        self.conn
            .execute(
                "DELETE FROM download_tokens WHERE expires_ms < ?1",
                [now_ms - WEEK_MS],
            )
            .map_err(sql("dropping old tokens"))?;
        self.conn
            .execute(
                "DELETE FROM events WHERE id <= (SELECT max(id) FROM events) - ?1",
                [EVENTS_KEPT],
            )
            .map_err(sql("pruning events"))?;
        let grace = i64::from(self.mfa.challenge_ttl_s) * 1000;
        self.challenges.purge(now_ms, grace);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{locations::tests::request, testing};

    #[test]
    fn events_are_listed_newest_first_by_location() {
        let (_dir, mut store) = testing::store();
        store.create_location(request("ams"), 0).unwrap();
        store
            .log_event(EventKind::GatewayConnected, "ams", "gw-a", "connected", 1)
            .unwrap();
        store
            .log_event(EventKind::EdgeConnected, "", "edge-1", "connected", 2)
            .unwrap();
        store
            .log_event(EventKind::RoleChange, "ams", "gw-a", "backup -> master", 3)
            .unwrap();
        let all = store.list_events("", 0).unwrap();
        assert_eq!(
            all.iter().map(|e| e.at_unix_ms).collect::<Vec<_>>(),
            [3, 2, 1]
        );
        let ams = store.list_events("ams", 1).unwrap();
        assert_eq!(ams.len(), 1);
        assert_eq!(ams[0].kind, "role-change");
        assert!(store.list_events("nowhere", 1).is_err());
        assert!(store.list_events("", LIST_MAX + 1).is_err());
        store.housekeeping(10).unwrap();
        assert_eq!(store.list_events("", 0).unwrap().len(), 3);
    }
}
