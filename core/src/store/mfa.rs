//! MFA logins: a device starts one at a location, finishes it with a TOTP
//! code, and gets a session with a fresh preshared key; the session's peer
//! goes to every gateway of the location. A gateway's MFA removal ends the
//! session unless another gateway still sees the device active. On a
//! location with `mfa_session_s`, Core ends a session that old itself (the
//! state thread sleeps until [`Store::next_session_end`]); a new login
//! before then renews it.

use super::db::{Db, OptionalExtension as _, params};
use tidegate_proto::edge::v1 as edge;

use super::{EventKind, Notice, Store, StoreError, begin, locations, render, sql};
use crate::{
    challenge::{ChallengeError, Lookup},
    keys::Key,
    lockout::{Failures, Policy, Source, Sources, Verdict},
    totp,
};

/// Why a client's request was refused; each maps to an Edge error code.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Malformed or incomplete.
    #[error("{0}")]
    Invalid(String),
    /// Wrong or replayed code, bad token.
    #[error("{0}")]
    Unauthorized(String),
    /// Unknown location, device or session.
    #[error("{0}")]
    NotFound(String),
    /// Expired token or session.
    #[error("{0}")]
    Expired(String),
    /// The device already has another key (an enrolment).
    #[error("{0}")]
    Conflict(String),
    /// The location's gateways could not be reached.
    #[error("{0}")]
    Unavailable(String),
    /// Too many wrong codes or logins from this device or address.
    #[error("{message}")]
    Limited { message: String, retry_after_s: u32 },
    #[error("internal error")]
    Internal(#[source] StoreError),
}

impl From<StoreError> for ClientError {
    fn from(error: StoreError) -> Self {
        Self::Internal(error)
    }
}

/// MFA settings (Core's config file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MfaSettings {
    /// How long a started login waits for its code.
    pub challenge_ttl_s: u32,
    /// Time steps accepted before and after the current one.
    pub totp_skew_steps: u32,
    /// Wrong codes before a login is over.
    pub max_attempts: u32,
    /// Logins in progress at most.
    pub max_challenges: usize,
    /// Wrong codes of one device, across logins.
    pub device: Policy,
    /// Wrong codes from one client address, across devices.
    pub source: Policy,
}

impl Default for MfaSettings {
    fn default() -> Self {
        Self {
            challenge_ttl_s: 120,
            totp_skew_steps: 1,
            max_attempts: 5,
            max_challenges: 10_000,
            device: Policy::DEVICE,
            source: Policy::SOURCE,
        }
    }
}

/// A finished login.
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedLogin {
    pub config: edge::DeviceConfig,
    pub location_id: u32,
    /// The location's config version carrying the session's peer.
    pub version: u64,
}

/// What became of a gateway's MFA removal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovalOutcome {
    /// No session (or a newer one) for that key: nothing to do.
    Ignored,
    /// Another gateway sees the device active: the session goes on.
    Kept,
    /// The session is over and its peer leaves every gateway.
    Ended,
}

/// What finishing a login reads of its device and user.
struct LoginRow {
    device: String,
    user_id: i64,
    user: String,
    secret: Vec<u8>,
    last_step: i64,
    /// The device and its user are enabled.
    enabled: bool,
    location: String,
    failures: Failures,
}

/// The refusal of an attempt a limit holds back.
fn limited(verdict: Verdict, now_ms: i64, whose: &str) -> ClientError {
    let until_ms = verdict.until_ms().unwrap_or(now_ms);
    let retry_after_s = u32::try_from((until_ms - now_ms + 999) / 1000)
        .unwrap_or(u32::MAX)
        .max(1);
    let message = match verdict {
        Verdict::LockedOut { .. } => format!(
            "too many wrong codes from {whose}: locked out for {retry_after_s} s \
             (an administrator can lift it)"
        ),
        _ => format!("too many wrong codes from {whose}: try again in {retry_after_s} s"),
    };
    ClientError::Limited {
        message,
        retry_after_s,
    }
}

impl Store {
    /// Starts an MFA login of the device with `public_key` at `location`,
    /// for a client at `client_addr`.
    pub fn mfa_start(
        &mut self,
        location: &str,
        public_key: &str,
        client_addr: &str,
        now_ms: i64,
    ) -> Result<edge::MfaChallenge, ClientError> {
        if location.is_empty() {
            return Err(ClientError::Invalid("location: missing".into()));
        }
        if public_key.is_empty() {
            return Err(ClientError::Invalid("public_key: missing".into()));
        }
        let key =
            Key::parse(public_key).map_err(|e| ClientError::Invalid(format!("public_key: {e}")))?;
        let row = match locations::by_name(&self.conn, location) {
            Ok(row) => row,
            Err(StoreError::NotFound { .. }) => {
                return Err(ClientError::NotFound(format!(
                    "no location named {location:?}"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        if !row.mfa {
            return Err(ClientError::Invalid(format!(
                "location {location:?} does not use MFA: download the device config instead"
            )));
        }
        let device: Option<(i64, bool, bool, Failures)> = self
            .conn
            .query_row(
                "SELECT d.id, d.enabled, u.enabled, d.mfa_failures, d.mfa_failed_ms \
                 FROM devices d JOIN users u ON u.id = d.user_id \
                 WHERE d.location_id = ?1 AND d.public_key = ?2",
                params![row.id, key.as_bytes().as_slice()],
                |r| {
                    let failures = Failures {
                        count: r.get(3)?,
                        last_ms: r.get(4)?,
                    };
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, failures))
                },
            )
            .optional()
            .map_err(sql("looking up a device"))?;
        let Some((device_id, device_on, user_on, failures)) = device else {
            return Err(ClientError::NotFound(format!(
                "no device with this public key at location {location:?}"
            )));
        };
        if !(device_on && user_on) {
            return Err(ClientError::Unauthorized(
                "the device or its user is disabled".into(),
            ));
        }
        // A locked-out device is told so at once; a backoff only holds
        // back the code.
        let verdict = self.mfa.device.verdict(failures, now_ms);
        if let Verdict::LockedOut { .. } = verdict {
            return Err(limited(verdict, now_ms, "this device"));
        }
        let ttl_s = self.mfa.challenge_ttl_s;
        let source = Source::parse(client_addr);
        let session = self
            .challenges
            .start(
                device_id,
                row.id,
                source,
                now_ms,
                i64::from(ttl_s) * 1000,
                self.mfa.max_challenges,
            )
            .map_err(|error| match error {
                ChallengeError::Full(_) => ClientError::Unavailable(
                    "too many logins in progress; try again shortly".into(),
                ),
                ChallengeError::DeviceBusy { until_ms }
                | ChallengeError::SourceBusy { until_ms } => ClientError::Limited {
                    message: format!("{error}; try again when one ends"),
                    retry_after_s: u32::try_from((until_ms - now_ms + 999) / 1000)
                        .unwrap_or(u32::MAX)
                        .max(1),
                },
            })?;
        Ok(edge::MfaChallenge {
            session,
            expires_in_s: ttl_s,
        })
    }

    /// The location a login in progress is for.
    pub fn mfa_location(&self, session: &str, now_ms: i64) -> Result<u32, ClientError> {
        match self.challenges.get(session, now_ms) {
            Lookup::Found(challenge) => Ok(challenge.location_id),
            Lookup::Expired => Err(ClientError::Expired(
                "session: expired; start the login again".into(),
            )),
            Lookup::Unknown if session.is_empty() => {
                Err(ClientError::Invalid("session: missing".into()))
            }
            Lookup::Unknown => Err(ClientError::NotFound(
                "session: unknown (finished, failed or never started)".into(),
            )),
        }
    }

    /// Finishes a login with a TOTP code from a client at `client_addr`:
    /// a new session with a fresh preshared key, stored with the code's
    /// time step so the code works once. A code is checked only while
    /// neither the device nor the address is held back by wrong codes;
    /// each wrong one counts against both and is an event.
    pub fn mfa_finish(
        &mut self,
        session: &str,
        code: &str,
        client_addr: &str,
        now_ms: i64,
    ) -> Result<FinishedLogin, ClientError> {
        self.mfa_location(session, now_ms)?;
        let Lookup::Found(challenge) = self.challenges.get(session, now_ms) else {
            unreachable!("mfa_location found the session");
        };
        let mut tx = begin(&mut self.conn)?;
        let row = tx
            .query_row(
                "SELECT d.name, u.id, u.name, u.totp_secret, u.totp_last_step, d.enabled AND u.enabled, l.name, \
                 d.mfa_failures, d.mfa_failed_ms FROM devices d JOIN users u ON u.id = d.user_id JOIN locations l ON l.id = d.location_id \
                 WHERE d.id = ?1",
                [challenge.device_id],
                |r| {
                    Ok(LoginRow {
                        device: r.get(0)?,
                        user_id: r.get(1)?,
                        user: r.get(2)?,
                        secret: r.get(3)?,
                        last_step: r.get(4)?,
                        enabled: r.get(5)?,
                        location: r.get(6)?,
                        failures: Failures {
                            count: r.get(7)?,
                            last_ms: r.get(8)?,
                        },
                    })
                },
            )
            .optional()
            .map_err(sql("reading a device"))?
            .ok_or_else(|| ClientError::NotFound("the device was deleted".into()))?;
        if !row.enabled {
            self.challenges.finish(session);
            return Err(ClientError::Unauthorized(
                "the device or its user is disabled".into(),
            ));
        }
        let source = Source::parse(client_addr);
        let device_verdict = self.mfa.device.verdict(row.failures, now_ms);
        let source_verdict = self.sources.verdict(source, now_ms);
        if device_verdict != Verdict::Allowed {
            return Err(limited(
                device_verdict.max(source_verdict),
                now_ms,
                "this device",
            ));
        }
        if source_verdict != Verdict::Allowed {
            return Err(limited(source_verdict, now_ms, "this address"));
        }
        let check = totp::check(
            &row.secret,
            code,
            now_ms.div_euclid(1000),
            row.last_step,
            i64::from(self.mfa.totp_skew_steps),
        )
        .map_err(|e| ClientError::Invalid(format!("code: {e}")))?;
        let step = match check {
            totp::Check::Valid { step } => step,
            totp::Check::Wrong => {
                let notices = count_wrong_code(
                    tx,
                    &mut self.sources,
                    &self.mfa,
                    challenge.device_id,
                    &row,
                    source,
                    now_ms,
                )?;
                self.notices.extend(notices);
                let left = self.challenges.fail(session, self.mfa.max_attempts);
                return Err(ClientError::Unauthorized(if left == 0 {
                    "code: wrong; too many wrong codes, start the login again".into()
                } else {
                    format!("code: wrong ({left} attempts left)")
                }));
            }
            totp::Check::Replayed => {
                drop(tx);
                let left = self.challenges.fail(session, self.mfa.max_attempts);
                let what = "code: used already; wait for the next one";
                return Err(ClientError::Unauthorized(if left == 0 {
                    format!("{what}; too many wrong codes, start the login again")
                } else {
                    format!("{what} ({left} attempts left)")
                }));
            }
        };
        tx.touch(challenge.device_id)?;
        tx.execute(
            "UPDATE devices SET mfa_failures = 0, mfa_failed_ms = 0 WHERE id = ?1",
            [challenge.device_id],
        )
        .map_err(sql("clearing wrong codes"))?;
        let psk = Key::generate_preshared();
        let used = tx
            .execute(
                "UPDATE users SET totp_last_step = ?2 WHERE id = ?1 AND totp_last_step < ?2",
                params![row.user_id, step],
            )
            .map_err(sql("recording the code"))?;
        if used != 1 {
            return Err(ClientError::Unauthorized(
                "code: used already; wait for the next one".into(),
            ));
        }
        tx.execute(
            "INSERT INTO mfa_sessions (device_id, preshared_key, started_ms) VALUES (?1, ?2, ?3) \
             ON CONFLICT (device_id) DO UPDATE SET preshared_key = excluded.preshared_key, \
             started_ms = excluded.started_ms",
            params![challenge.device_id, psk.as_bytes().as_slice(), now_ms],
        )
        .map_err(sql("storing an MFA session"))?;
        tx.execute(
            "INSERT INTO events (at_ms, kind, location, subject, message) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                now_ms,
                EventKind::MfaLogin.as_str(),
                row.location,
                row.device,
                format!("user {} logged in", row.user)
            ],
        )
        .map_err(sql("logging an event"))?;
        let mut config = render::device_config(&tx, challenge.device_id, Some(psk))?;
        config.session_expires_in_s = locations::by_id(&tx, challenge.location_id)?
            .map(|l| l.mfa_session_s)
            .unwrap_or_default();
        self.notices.extend(tx.commit()?);
        // A new session may end before the one the state thread waits for.
        self.session_ends_known = None;
        self.challenges.finish(session);
        let version = locations::by_id(&self.conn, challenge.location_id)?
            .map(|l| l.version)
            .unwrap_or_default();
        Ok(FinishedLogin {
            config,
            location_id: challenge.location_id,
            version,
        })
    }

    /// A gateway removed the peer `key` of an MFA location at `at_ms` for
    /// inactivity. The session ends unless it started after that removal
    /// or `active_elsewhere` (another gateway saw the device within the
    /// threshold), in which case the session goes on there.
    pub fn mfa_removed(
        &mut self,
        location_id: u32,
        key: &Key,
        gateway: &str,
        reason: &str,
        at_ms: i64,
        active_elsewhere: bool,
    ) -> Result<RemovalOutcome, StoreError> {
        let mut tx = begin(&mut self.conn)?;
        let session: Option<(i64, String, i64, String)> = tx
            .query_row(
                "SELECT d.id, d.name, s.started_ms, l.name FROM devices d \
                 JOIN mfa_sessions s ON s.device_id = d.id JOIN locations l ON l.id = d.location_id \
                 WHERE d.location_id = ?1 AND d.public_key = ?2 AND l.mfa",
                params![location_id, key.as_bytes().as_slice()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()
            .map_err(sql("looking up an MFA session"))?;
        let Some((device_id, device, started_ms, location)) = session else {
            return Ok(RemovalOutcome::Ignored);
        };
        if at_ms < started_ms {
            return Ok(RemovalOutcome::Ignored);
        }
        if active_elsewhere {
            // The gateway that dropped the peer keeps it out until a new
            // login (a new preshared key); the session goes on elsewhere.
            return Ok(RemovalOutcome::Kept);
        }
        tx.touch(device_id)?;
        tx.execute("DELETE FROM mfa_sessions WHERE device_id = ?1", [device_id])
            .map_err(sql("ending an MFA session"))?;
        tx.execute(
            "INSERT INTO events (at_ms, kind, location, subject, message) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                at_ms,
                EventKind::MfaSessionEnd.as_str(),
                location,
                device,
                format!("removed by {gateway}: {reason}")
            ],
        )
        .map_err(sql("logging an event"))?;
        self.notices.extend(tx.commit()?);
        Ok(RemovalOutcome::Ended)
    }
}

/// When sessions end by their age: the earliest end, in Unix milliseconds,
/// of the sessions of locations with an `mfa_session_s`.
fn earliest_session_end(conn: &Db) -> Result<Option<i64>, StoreError> {
    conn.query_row(
        "SELECT min(s.started_ms + l.mfa_session_s * 1000) FROM mfa_sessions s \
         JOIN devices d ON d.id = s.device_id JOIN locations l ON l.id = d.location_id \
         WHERE l.mfa AND l.mfa_session_s > 0",
        [],
        |r| r.get(0),
    )
    .map_err(sql("finding the next MFA session end"))
}

impl Store {
    /// When the next MFA session ends by its age (Unix ms), if any. Read
    /// from the database only after a change that may bring it nearer (a
    /// login, a location's lifetime): otherwise the last answer stands (an
    /// early wake-up just finds nothing to end).
    pub fn next_session_end(&mut self) -> Result<Option<i64>, StoreError> {
        if let Some(known) = self.session_ends_known {
            return Ok(known);
        }
        let next = earliest_session_end(&self.conn)?;
        self.session_ends_known = Some(next);
        Ok(next)
    }

    /// Ends every MFA session that has lasted its location's
    /// `mfa_session_s` at `now_ms`: its peer leaves the gateways (a version
    /// bump) and an `mfa-session-ended` event names it. Returns how many.
    pub fn end_old_sessions(&mut self, now_ms: i64) -> Result<usize, StoreError> {
        let mut tx = begin(&mut self.conn)?;
        let ended: Vec<(i64, String, String, i64)> = {
            let mut stmt = tx
                .prepare(
                    "SELECT d.id, d.name, l.name, s.started_ms FROM mfa_sessions s \
                     JOIN devices d ON d.id = s.device_id JOIN locations l ON l.id = d.location_id \
                     WHERE l.mfa AND l.mfa_session_s > 0 \
                     AND s.started_ms + l.mfa_session_s * 1000 <= ?1",
                )
                .map_err(sql("finding old MFA sessions"))?;
            stmt.query_map([now_ms], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .map_err(sql("finding old MFA sessions"))?
            .collect::<Result<_, _>>()
            .map_err(sql("finding old MFA sessions"))?
        };
        for (device_id, device, location, started_ms) in &ended {
            tx.touch(*device_id)?;
            tx.execute("DELETE FROM mfa_sessions WHERE device_id = ?1", [device_id])
                .map_err(sql("ending an MFA session"))?;
            tx.execute(
                "INSERT INTO events (at_ms, kind, location, subject, message) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    now_ms,
                    EventKind::MfaSessionEnded.as_str(),
                    location,
                    device,
                    format!("lasted {} s", (now_ms - started_ms) / 1000)
                ],
            )
            .map_err(sql("logging an event"))?;
        }
        self.notices.extend(tx.commit()?);
        self.session_ends_known = None;
        Ok(ended.len())
    }
}

/// Counts a wrong code against the device (stored, with an event, in
/// `tx`) and the address (in memory); a lockout is an event too.
fn count_wrong_code(
    tx: super::Tx<'_>,
    sources: &mut Sources,
    mfa: &MfaSettings,
    device_id: i64,
    row: &LoginRow,
    source: Source,
    now_ms: i64,
) -> Result<Vec<Notice>, ClientError> {
    let policy = mfa.device;
    let (failures, device_locked) = policy.fail(row.failures, now_ms);
    tx.execute(
        "UPDATE devices SET mfa_failures = ?2, mfa_failed_ms = ?3 WHERE id = ?1",
        params![device_id, failures.count, failures.last_ms],
    )
    .map_err(sql("counting a wrong code"))?;
    let source_locked = sources.fail(source, now_ms);
    let mut events = vec![(
        EventKind::MfaFailed,
        row.device.clone(),
        format!(
            "wrong code for user {} from {source} ({} in a row)",
            row.user, failures.count
        ),
    )];
    if device_locked {
        events.push((
            EventKind::MfaLocked,
            row.device.clone(),
            format!(
                "locked out for {} s after {} wrong codes",
                policy.lockout_ms / 1000,
                failures.count
            ),
        ));
    }
    if source_locked {
        events.push((
            EventKind::MfaLocked,
            source.to_string(),
            format!(
                "address locked out for {} s after too many wrong codes",
                mfa.source.lockout_ms / 1000
            ),
        ));
    }
    for (kind, subject, message) in events {
        tx.execute(
            "INSERT INTO events (at_ms, kind, location, subject, message) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![now_ms, kind.as_str(), row.location, subject, message],
        )
        .map_err(sql("logging an event"))?;
    }
    Ok(tx.commit()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        ChangeKind, Notice,
        devices::tests::{device, setup},
    };

    const NOW: i64 = 1_700_000_000_000;

    fn secret(store: &Store) -> Vec<u8> {
        store
            .conn
            .query_row(
                "SELECT totp_secret FROM users WHERE name = 'alice'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    }

    fn code(store: &Store, now_ms: i64) -> String {
        totp::code_at(&secret(store), totp::step_at(now_ms / 1000))
    }

    fn mfa_store() -> (tempfile::TempDir, Store, Key) {
        let (dir, mut store) = setup(true);
        let key = Key::new([1; 32]);
        store.create_device(device("laptop", key), 0).unwrap();
        store.take_notices();
        (dir, store, key)
    }

    #[test]
    fn a_login_makes_a_session_with_a_fresh_key_pushed_as_a_peer() {
        let (_dir, mut store, key) = mfa_store();
        let challenge = store
            .mfa_start("ams", &key.to_base64(), "192.0.2.1", NOW)
            .unwrap();
        assert_eq!(challenge.expires_in_s, 120);
        assert_eq!(store.mfa_location(&challenge.session, NOW).unwrap(), 1);
        let code = code(&store, NOW);
        let login = store
            .mfa_finish(&challenge.session, &code, "192.0.2.1", NOW)
            .unwrap();
        assert_eq!(login.location_id, 1);
        assert_eq!(login.version, 2);
        assert_eq!(login.config.device, "laptop");
        let psk = Key::parse(&login.config.preshared_key).unwrap();
        let notices = store.take_notices();
        let [Notice::Location(change)] = notices.as_slice() else {
            panic!("{notices:?}")
        };
        let ChangeKind::Peers { upsert, .. } = &change.kind else {
            panic!()
        };
        assert_eq!(upsert[0].public_key, key);
        assert_eq!(upsert[0].preshared_key, Some(psk));
        assert!(store.device("laptop").unwrap().mfa_session);
        let events = store.list_events("ams", 0).unwrap();
        assert_eq!(events[0].kind, "mfa-login");
        // The session is used up; the code cannot serve another login.
        assert!(matches!(
            store.mfa_finish(&challenge.session, &code, "192.0.2.1", NOW),
            Err(ClientError::NotFound(_))
        ));
        let again = store
            .mfa_start("ams", &key.to_base64(), "192.0.2.1", NOW)
            .unwrap();
        let err = store
            .mfa_finish(&again.session, &code, "192.0.2.1", NOW)
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Unauthorized(m) if m.contains("used already")),
            "{err}"
        );
        // The next step's code gives a new session with a new key.
        let later = NOW + 30_000;
        let next = self::code(&store, later);
        let relogin = store
            .mfa_finish(&again.session, &next, "192.0.2.1", later)
            .unwrap();
        assert_ne!(relogin.config.preshared_key, login.config.preshared_key);
    }

    #[test]
    fn bad_logins_store_nothing() {
        let (_dir, mut store, key) = mfa_store();
        let k = key.to_base64();
        for (location, public_key, want) in [
            ("", k.as_str(), "Invalid"),
            ("ams", "", "Invalid"),
            ("ams", "not-a-key", "Invalid"),
            ("nowhere", k.as_str(), "NotFound"),
            ("ams", &Key::new([2; 32]).to_base64(), "NotFound"),
        ] {
            let err = store
                .mfa_start(location, public_key, "192.0.2.1", NOW)
                .unwrap_err();
            assert!(
                format!("{err:?}").starts_with(want),
                "{location} {public_key}: {err:?}"
            );
        }
        let challenge = store.mfa_start("ams", &k, "192.0.2.1", NOW).unwrap();
        let s = &challenge.session;
        assert!(matches!(
            store.mfa_finish(s, "12345", "192.0.2.1", NOW),
            Err(ClientError::Invalid(_))
        ));
        let right = code(&store, NOW);
        let wrong = if right == "000000" {
            "111111"
        } else {
            "000000"
        };
        for left in (1..5).rev() {
            let err = store.mfa_finish(s, wrong, "192.0.2.1", NOW).unwrap_err();
            assert!(
                err.to_string().contains(&format!("{left} attempts left")),
                "{err}"
            );
        }
        let err = store.mfa_finish(s, wrong, "192.0.2.1", NOW).unwrap_err();
        assert!(err.to_string().contains("start the login again"), "{err}");
        assert!(matches!(
            store.mfa_finish(s, &right, "192.0.2.1", NOW),
            Err(ClientError::NotFound(_))
        ));
        // Expired.
        let challenge = store.mfa_start("ams", &k, "192.0.2.1", NOW).unwrap();
        assert!(matches!(
            store.mfa_finish(&challenge.session, &right, "192.0.2.1", NOW + 121_000),
            Err(ClientError::Expired(_))
        ));
        assert!(matches!(
            store.mfa_finish("", &right, "192.0.2.1", NOW),
            Err(ClientError::Invalid(_))
        ));
        // Nothing was stored: no session, no code used, no version bump.
        assert!(!store.device("laptop").unwrap().mfa_session);
        assert!(store.take_notices().is_empty());
        let last: i64 = store
            .conn
            .query_row("SELECT totp_last_step FROM users", [], |r| r.get(0))
            .unwrap();
        assert_eq!(last, -1);
        // A non-MFA location refuses logins.
        store
            .update_location(tidegate_proto::admin::v1::UpdateLocationRequest {
                name: "ams".into(),
                mfa: Some(false),
                ..Default::default()
            })
            .unwrap();
        assert!(matches!(
            store.mfa_start("ams", &k, "192.0.2.1", NOW),
            Err(ClientError::Invalid(_))
        ));
    }

    #[test]
    fn a_removal_ends_the_session_unless_the_device_is_active_elsewhere() {
        let (_dir, mut store, key) = mfa_store();
        let challenge = store
            .mfa_start("ams", &key.to_base64(), "192.0.2.1", NOW)
            .unwrap();
        store
            .mfa_finish(&challenge.session, &code(&store, NOW), "192.0.2.1", NOW)
            .unwrap();
        store.take_notices();
        // A removal from before the session began is stale.
        assert_eq!(
            store
                .mfa_removed(1, &key, "gw-b", "inactive", NOW - 1, false)
                .unwrap(),
            RemovalOutcome::Ignored
        );
        assert!(store.take_notices().is_empty());
        // Active on another gateway: the session goes on, nothing changes.
        assert_eq!(
            store
                .mfa_removed(1, &key, "gw-b", "inactive", NOW + 1, true)
                .unwrap(),
            RemovalOutcome::Kept
        );
        assert!(store.take_notices().is_empty());
        assert!(store.device("laptop").unwrap().mfa_session);
        assert_eq!(
            store
                .mfa_removed(1, &key, "gw-a", "inactive", NOW + 2, false)
                .unwrap(),
            RemovalOutcome::Ended
        );
        let notices = store.take_notices();
        let [Notice::Location(change)] = notices.as_slice() else {
            panic!()
        };
        assert_eq!(
            change.kind,
            ChangeKind::Peers {
                upsert: vec![],
                remove: vec![key]
            }
        );
        assert!(!store.device("laptop").unwrap().mfa_session);
        assert_eq!(
            store.list_events("ams", 1).unwrap()[0].kind,
            "mfa-session-end"
        );
        assert_eq!(
            store
                .mfa_removed(1, &key, "gw-a", "inactive", NOW + 3, false)
                .unwrap(),
            RemovalOutcome::Ignored
        );
    }

    fn wrong(store: &Store, now_ms: i64) -> &'static str {
        let step = totp::step_at(now_ms / 1000);
        ["000000", "111111", "222222", "333333"]
            .into_iter()
            .find(|c| (step - 2..=step + 2).all(|s| totp::code_at(&secret(store), s) != *c))
            .unwrap()
    }

    fn kinds(store: &Store) -> Vec<String> {
        store
            .list_events("ams", 1000)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect()
    }

    #[test]
    fn wrong_codes_count_across_logins_and_hold_the_device_back_then_lock_it_out() {
        let (_dir, mut store, key) = mfa_store();
        let k = key.to_base64();
        let from = "192.0.2.1";
        // The admin view reads the clock.
        let mut now = crate::now_ms();
        // A new login each time: the count goes on regardless.
        for n in 1..=5 {
            let login = store.mfa_start("ams", &k, from, now).unwrap();
            let err = store
                .mfa_finish(&login.session, wrong(&store, now), from, now)
                .unwrap_err();
            assert!(matches!(err, ClientError::Unauthorized(_)), "{n}: {err}");
        }
        assert_eq!(store.device("laptop").unwrap().mfa_failures, 5);
        // Held back: even the right code is not checked, and not used up.
        let held = store.mfa_start("ams", &k, from, now).unwrap();
        let err = store
            .mfa_finish(&held.session, &code(&store, now), from, now)
            .unwrap_err();
        let ClientError::Limited { retry_after_s, .. } = &err else {
            panic!("{err}")
        };
        assert_eq!(*retry_after_s, 1);
        assert!(err.to_string().contains("this device"), "{err}");
        // Backoff after backoff up to the lockout.
        for n in 6..=Policy::DEVICE.lockout_after {
            // Past the longest backoff of the device and the address.
            now += 301_000;
            let login = store.mfa_start("ams", &k, from, now).unwrap();
            let err = store
                .mfa_finish(&login.session, wrong(&store, now), from, now)
                .unwrap_err();
            assert!(matches!(err, ClientError::Unauthorized(_)), "{n}: {err}");
        }
        let device = store.device("laptop").unwrap();
        assert!(device.mfa_locked_out, "{device:?}");
        assert_eq!(device.mfa_blocked_until_unix_ms, now + 3_600_000);
        // Locked out: told at the start, and the right code is refused.
        let err = store.mfa_start("ams", &k, from, now + 1_000).unwrap_err();
        assert!(
            matches!(
                &err,
                ClientError::Limited {
                    retry_after_s: 3599,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("locked out"), "{err}");
        let failed = kinds(&store).iter().filter(|k| *k == "mfa-failed").count();
        assert_eq!(failed, Policy::DEVICE.lockout_after as usize);
        assert!(kinds(&store).iter().any(|k| k == "mfa-locked"));
        // An operator lifts it; the right code then logs in and clears it.
        store
            .update_device(tidegate_proto::admin::v1::UpdateDeviceRequest {
                name: "laptop".into(),
                mfa_unlock: true,
                ..Default::default()
            })
            .unwrap();
        // (From another address: this one is still held back on its own.)
        let home = "192.0.2.2";
        let login = store.mfa_start("ams", &k, home, now + 2_000).unwrap();
        store
            .mfa_finish(
                &login.session,
                &code(&store, now + 2_000),
                home,
                now + 2_000,
            )
            .unwrap();
        assert_eq!(store.device("laptop").unwrap().mfa_failures, 0);
    }

    #[test]
    fn one_address_guessing_at_many_devices_is_held_back() {
        let (_dir, mut store, _key) = mfa_store();
        let keys: Vec<Key> = (10..30).map(|n| Key::new([n; 32])).collect();
        for (n, key) in keys.iter().enumerate() {
            store
                .create_device(device(&format!("d{n}"), *key), 0)
                .unwrap();
        }
        let attacker = "198.51.100.9";
        let mut limited = 0;
        for key in &keys {
            for _ in 0..2 {
                let login = store
                    .mfa_start("ams", &key.to_base64(), attacker, NOW)
                    .unwrap();
                match store.mfa_finish(&login.session, wrong(&store, NOW), attacker, NOW) {
                    Err(ClientError::Unauthorized(_)) => {}
                    Err(ClientError::Limited { message, .. }) => {
                        assert!(message.contains("this address"), "{message}");
                        limited += 1;
                    }
                    other => panic!("{other:?}"),
                }
            }
        }
        // Ten wrong codes counted, then the address waits.
        assert_eq!(limited, 40 - Policy::SOURCE.free);
        // Another address is not held back.
        let login = store
            .mfa_start("ams", &keys[19].to_base64(), "203.0.113.5", NOW)
            .unwrap();
        assert!(matches!(
            store.mfa_finish(&login.session, wrong(&store, NOW), "203.0.113.5", NOW),
            Err(ClientError::Unauthorized(_))
        ));
    }

    #[test]
    fn a_start_from_another_address_does_not_cancel_the_users_login() {
        let (_dir, mut store, key) = mfa_store();
        let k = key.to_base64();
        let user = store.mfa_start("ams", &k, "192.0.2.1", NOW).unwrap();
        let stranger = store.mfa_start("ams", &k, "198.51.100.9", NOW).unwrap();
        assert_ne!(user.session, stranger.session);
        store
            .mfa_finish(&user.session, &code(&store, NOW), "192.0.2.1", NOW)
            .unwrap();
    }

    fn session_limit(store: &mut Store, secs: u32) {
        store
            .update_location(tidegate_proto::admin::v1::UpdateLocationRequest {
                name: "ams".into(),
                mfa_session_s: Some(secs),
                ..Default::default()
            })
            .unwrap();
        store.take_notices();
    }

    fn ended_events(store: &Store) -> Vec<String> {
        store
            .list_events("ams", 1000)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "mfa-session-ended")
            .map(|e| format!("{}: {}", e.subject, e.message))
            .collect()
    }

    #[test]
    fn a_session_ends_on_time_by_its_age() {
        let (_dir, mut store, key) = mfa_store();
        session_limit(&mut store, 3600);
        let login = crate::store::testing::login(&mut store, "ams", key, NOW);
        assert_eq!(login.config.session_expires_in_s, 3600);
        assert!(login.config.mfa);
        store.take_notices();
        assert_eq!(store.next_session_end().unwrap(), Some(NOW + 3_600_000));
        // A millisecond early: nothing ends.
        assert_eq!(store.end_old_sessions(NOW + 3_599_999).unwrap(), 0);
        assert!(store.take_notices().is_empty());
        assert!(store.device("laptop").unwrap().mfa_session);
        // On time: the session and its peer go.
        assert_eq!(store.end_old_sessions(NOW + 3_600_000).unwrap(), 1);
        let notices = store.take_notices();
        let [Notice::Location(change)] = notices.as_slice() else {
            panic!("{notices:?}")
        };
        assert_eq!(
            change.kind,
            ChangeKind::Peers {
                upsert: vec![],
                remove: vec![key]
            }
        );
        assert!(!store.device("laptop").unwrap().mfa_session);
        assert_eq!(ended_events(&store), ["laptop: lasted 3600 s"]);
        assert_eq!(store.next_session_end().unwrap(), None);
    }

    #[test]
    fn a_new_login_renews_the_session_as_a_peer_update() {
        let (_dir, mut store, key) = mfa_store();
        session_limit(&mut store, 3600);
        let first = crate::store::testing::login(&mut store, "ams", key, NOW);
        store.take_notices();
        assert_eq!(store.next_session_end().unwrap(), Some(NOW + 3_600_000));
        let half = NOW + 1_800_000;
        let renewed = crate::store::testing::login(&mut store, "ams", key, half);
        assert_eq!(renewed.config.session_expires_in_s, 3600);
        assert_ne!(renewed.config.preshared_key, first.config.preshared_key);
        // The gateways update the peer's preshared key in place: no removal
        // (the tunnel's WireGuard session survives).
        let notices = store.take_notices();
        let [Notice::Location(change)] = notices.as_slice() else {
            panic!("{notices:?}")
        };
        let ChangeKind::Peers { upsert, remove } = &change.kind else {
            panic!("{change:?}")
        };
        assert!(remove.is_empty(), "{remove:?}");
        assert_eq!(upsert.len(), 1);
        assert_eq!(
            upsert[0].preshared_key,
            Some(Key::parse(&renewed.config.preshared_key).unwrap())
        );
        // The end moves out with the new start.
        assert_eq!(store.next_session_end().unwrap(), Some(half + 3_600_000));
        assert_eq!(store.end_old_sessions(NOW + 3_600_000).unwrap(), 0);
        assert!(store.device("laptop").unwrap().mfa_session);
        assert_eq!(store.end_old_sessions(half + 3_600_000).unwrap(), 1);
        assert_eq!(ended_events(&store), ["laptop: lasted 3600 s"]);
    }

    #[test]
    fn without_a_limit_a_session_never_ends_by_age_until_one_is_set() {
        let (_dir, mut store, key) = mfa_store();
        let login = crate::store::testing::login(&mut store, "ams", key, NOW);
        assert_eq!(login.config.session_expires_in_s, 0);
        let years = NOW + 10 * 365 * 24 * 3_600_000;
        assert_eq!(store.end_old_sessions(years).unwrap(), 0);
        assert!(store.device("laptop").unwrap().mfa_session);
        assert_eq!(store.next_session_end().unwrap(), None);
        // A limit set later counts from the login.
        session_limit(&mut store, 600);
        assert_eq!(store.next_session_end().unwrap(), Some(NOW + 600_000));
        assert_eq!(store.end_old_sessions(NOW + 600_000).unwrap(), 1);
        assert_eq!(ended_events(&store), ["laptop: lasted 600 s"]);
    }

    #[test]
    fn a_session_lifetime_out_of_range_is_refused_naming_the_field() {
        let (_dir, mut store, _key) = mfa_store();
        for secs in [1, 59, 2_592_001] {
            let err = store
                .update_location(tidegate_proto::admin::v1::UpdateLocationRequest {
                    name: "ams".into(),
                    mfa_session_s: Some(secs),
                    ..Default::default()
                })
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::Invalid {
                        field: "mfa_session_s",
                        ..
                    }
                ),
                "{err}"
            );
            let err = store
                .create_location(
                    tidegate_proto::admin::v1::CreateLocationRequest {
                        mfa_session_s: secs,
                        ..locations::tests::request("fra")
                    },
                    0,
                )
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::Invalid {
                        field: "mfa_session_s",
                        ..
                    }
                ),
                "{err}"
            );
        }
        assert_eq!(store.location("ams").unwrap().mfa_session_s, 0);
        let fra = store
            .create_location(
                tidegate_proto::admin::v1::CreateLocationRequest {
                    mfa: true,
                    mfa_session_s: 60,
                    ..locations::tests::request("fra")
                },
                0,
            )
            .unwrap();
        assert_eq!(fra.mfa_session_s, 60);
    }
}
