//! One-time tokens with which a device's owner downloads its config through
//! an Edge. Only a hash of each token is stored. An enrolment whose answer
//! was lost (an Edge died after Core used the token) may be retried with
//! the same key for a short while and gets the same answer.

use super::db::{Db, OptionalExtension as _, params};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest as _, Sha256};
use tidegate_proto::{admin::v1 as admin, edge::v1 as edge};

use super::{ClientError, EventKind, Notice, Store, StoreError, begin, devices, render, sql};
use crate::keys::Key;

/// Lifetime of a token when none is asked for: a day.
pub const DEFAULT_TTL_S: u32 = 24 * 3600;
/// Longest lifetime: 30 days.
pub const MAX_TTL_S: u32 = 30 * 24 * 3600;
/// Length of a token (32 random bytes, base64url).
pub const TOKEN_LEN: usize = 43;
/// How long after its use a token still answers an enrolment retried with
/// the key it enrolled (never past the token's expiry): 10 minutes.
pub const ENROL_RETRY_GRACE_MS: i64 = 10 * 60 * 1000;

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A token with what redeeming it needs.
struct TokenRow {
    device_id: i64,
    device: String,
    location_id: u32,
    location: String,
    /// None: the device awaits enrolment.
    public_key: Option<Vec<u8>>,
    expires_ms: i64,
    /// The token was used already and this is a retry of the enrolment
    /// that used it, within the grace: answered again, not used again.
    retry: bool,
    /// The device and its user are enabled.
    enabled: bool,
    mfa: bool,
    psk: Vec<u8>,
}

/// What an enrolment did.
#[derive(Debug, Clone, PartialEq)]
pub struct Enrolled {
    pub config: edge::DeviceConfig,
    pub location_id: u32,
    /// The device got its key now (false: it had this key already).
    pub new_key: bool,
    /// The location's config version that made the device a peer, when it
    /// became one (a location without MFA); the caller waits for the
    /// gateways to apply it.
    pub peer_version: Option<u64>,
    /// A retry of an enrolment already answered: the same answer again.
    pub retry: bool,
}

/// The location's config version.
fn location_version(tx: &Db, location_id: u32) -> Result<u64, ClientError> {
    let version: i64 = tx
        .query_row(
            "SELECT version FROM locations WHERE id = ?1",
            [location_id],
            |r| r.get(0),
        )
        .map_err(sql("reading the location's version"))?;
    Ok(version as u64)
}

/// Checks a token's form and finds it: usable, for an enabled device. A
/// used token is usable only by `enrolling` the key it enrolled, within
/// [`ENROL_RETRY_GRACE_MS`] of its use (the row then says `retry`).
fn find_token(
    tx: &Db,
    token: &str,
    enrolling: Option<&Key>,
    now_ms: i64,
) -> Result<TokenRow, ClientError> {
    if token.is_empty() {
        return Err(ClientError::Invalid("token: missing".into()));
    }
    if token.len() != TOKEN_LEN || URL_SAFE_NO_PAD.decode(token).is_err() {
        return Err(ClientError::Invalid(format!(
            "token: not a download token (expected {TOKEN_LEN} base64url characters)"
        )));
    }
    let row = tx
        .query_row(
            "SELECT t.device_id, d.name, d.location_id, l.name, d.public_key, t.expires_ms, t.used_ms, \
             d.enabled AND u.enabled, l.mfa, d.preshared_key, t.used_key \
             FROM download_tokens t JOIN devices d ON d.id = t.device_id \
             JOIN users u ON u.id = d.user_id JOIN locations l ON l.id = d.location_id \
             WHERE t.hash = ?1",
            [hash(token).as_slice()],
            |r| {
                let used_ms: Option<i64> = r.get(6)?;
                let used_key: Option<Vec<u8>> = r.get(10)?;
                Ok((
                    TokenRow {
                        device_id: r.get(0)?,
                        device: r.get(1)?,
                        location_id: r.get(2)?,
                        location: r.get(3)?,
                        public_key: r.get(4)?,
                        expires_ms: r.get(5)?,
                        retry: false,
                        enabled: r.get(7)?,
                        mfa: r.get(8)?,
                        psk: r.get(9)?,
                    },
                    used_ms,
                    used_key,
                ))
            },
        )
        .optional()
        .map_err(sql("reading a token"))?;
    let Some((mut row, used_ms, used_key)) = row else {
        return Err(ClientError::Unauthorized("token: not valid".into()));
    };
    if let Some(used_ms) = used_ms {
        let same_key = enrolling
            .zip(used_key.as_deref())
            .is_some_and(|(key, used)| key.as_bytes().as_slice() == used);
        if !same_key || now_ms >= used_ms.saturating_add(ENROL_RETRY_GRACE_MS) {
            return Err(ClientError::Unauthorized(
                "token: used already; ask for a new one".into(),
            ));
        }
        row.retry = true;
    }
    if row.expires_ms <= now_ms {
        return Err(ClientError::Expired(
            "token: expired; ask for a new one".into(),
        ));
    }
    if !row.enabled {
        return Err(ClientError::Unauthorized(
            "the device or its user is disabled".into(),
        ));
    }
    Ok(row)
}

/// Marks a token used (by an enrolment of `key`, kept for its retries) and
/// renders the device's config: its own preshared key, none on an MFA
/// location (each login brings one). A retry leaves the token as it is.
fn use_token(
    tx: &Db,
    token: &str,
    row: &TokenRow,
    key: Option<&Key>,
    now_ms: i64,
) -> Result<edge::DeviceConfig, ClientError> {
    let psk = if row.mfa {
        None
    } else {
        Some(Key::from_slice(&row.psk).map_err(|e| {
            ClientError::Internal(StoreError::InUse(format!("stored preshared key: {e}")))
        })?)
    };
    if !row.retry {
        tx.execute(
            "UPDATE download_tokens SET used_ms = ?2, used_key = ?3 WHERE hash = ?1",
            params![
                hash(token).as_slice(),
                now_ms,
                key.map(|k| k.as_bytes().to_vec())
            ],
        )
        .map_err(sql("using a token"))?;
    }
    Ok(render::device_config(tx, row.device_id, psk)?)
}

impl Store {
    /// Issues a token for `device`'s config, valid `ttl_s` seconds and once.
    pub fn create_download_token(
        &mut self,
        req: admin::CreateDownloadTokenRequest,
        now_ms: i64,
    ) -> Result<admin::DownloadToken, StoreError> {
        let ttl_s = req.ttl_s.unwrap_or(DEFAULT_TTL_S);
        if !(1..=MAX_TTL_S).contains(&ttl_s) {
            return Err(StoreError::invalid(
                "ttl_s",
                format!("{ttl_s} is outside 1..={MAX_TTL_S} seconds"),
            ));
        }
        let tx = begin(&mut self.conn)?;
        let device = devices::by_name(&tx, &req.device)?;
        let token = URL_SAFE_NO_PAD.encode(crate::random::<32>());
        let expires_ms = now_ms + i64::from(ttl_s) * 1000;
        tx.execute(
            "INSERT INTO download_tokens (hash, device_id, created_ms, expires_ms) VALUES (?1, ?2, ?3, ?4)",
            params![hash(&token).as_slice(), device.id, now_ms, expires_ms],
        )
        .map_err(sql("storing a token"))?;
        self.notices.extend(tx.commit()?);
        Ok(admin::DownloadToken {
            device: device.view.name,
            token,
            expires_unix_ms: expires_ms,
        })
    }

    /// Uses a token: the device's config, once. A device awaiting its key
    /// is refused (and the token kept): it enrols instead.
    pub fn redeem_token(
        &mut self,
        token: &str,
        now_ms: i64,
    ) -> Result<edge::DeviceConfig, ClientError> {
        let token = token.trim();
        let tx = begin(&mut self.conn)?;
        let row = find_token(&tx, token, None, now_ms)?;
        if row.public_key.is_none() {
            return Err(ClientError::Invalid(
                "the device has no key yet: enrol it with tidegate-client enrol".into(),
            ));
        }
        let config = use_token(&tx, token, &row, None, now_ms)?;
        self.notices.extend(tx.commit()?);
        Ok(config)
    }

    /// Enrols a device with a token and the public key its client made, in
    /// one transaction: a device awaiting its key gets this one (and, on a
    /// location without MFA, becomes a peer); a device that has this key
    /// already just gets its config; another key is a conflict. The token
    /// is used only when the device's config is answered.
    ///
    /// The same enrolment again (this token, the key it enrolled, within
    /// [`ENROL_RETRY_GRACE_MS`] of its use and before its expiry) gets the
    /// same config, `new_key: false`, and waits for the gateways as the
    /// first did: its answer may have been lost on the way (an Edge died).
    pub fn enrol(
        &mut self,
        token: &str,
        public_key: &str,
        now_ms: i64,
    ) -> Result<Enrolled, ClientError> {
        let token = token.trim();
        if public_key.trim().is_empty() {
            return Err(ClientError::Invalid("public_key: missing".into()));
        }
        let key =
            Key::parse(public_key).map_err(|e| ClientError::Invalid(format!("public_key: {e}")))?;
        let mut tx = begin(&mut self.conn)?;
        let row = find_token(&tx, token, Some(&key), now_ms)?;
        let location_id = row.location_id;
        let held = row.public_key.as_deref().map(Key::from_slice);
        match held {
            Some(Ok(held)) if held == key => {
                let config = use_token(&tx, token, &row, Some(&key), now_ms)?;
                // A retry waits for the location's config as it is now (a
                // peer on a location without MFA), as the first try did.
                let peer_version = if row.retry && !row.mfa {
                    Some(location_version(&tx, location_id)?)
                } else {
                    None
                };
                self.notices.extend(tx.commit()?);
                return Ok(Enrolled {
                    config,
                    location_id,
                    new_key: false,
                    peer_version,
                    retry: row.retry,
                });
            }
            // The key the token enrolled has been changed since.
            _ if row.retry => {
                return Err(ClientError::Unauthorized(
                    "token: used already; ask for a new one".into(),
                ));
            }
            Some(_) => {
                return Err(ClientError::Conflict(format!(
                    "device {:?} already has a key; ask the operator for a new device or a key change",
                    row.device
                )));
            }
            None => {}
        }
        if let Some((_, holder)) = devices::key_holder(&tx, location_id, &key)? {
            return Err(ClientError::Invalid(format!(
                "public_key: device {holder:?} has this key"
            )));
        }
        tx.touch(row.device_id)?;
        tx.execute(
            "UPDATE devices SET public_key = ?2 WHERE id = ?1",
            params![row.device_id, key.as_bytes().as_slice()],
        )
        .map_err(sql("storing the device's key"))?;
        tx.execute(
            "INSERT INTO events (at_ms, kind, location, subject, message) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                now_ms,
                EventKind::DeviceEnrolled.as_str(),
                row.location,
                row.device,
                format!("key {key} brought with a token")
            ],
        )
        .map_err(sql("logging an event"))?;
        let config = use_token(&tx, token, &row, Some(&key), now_ms)?;
        let notices = tx.commit()?;
        let peer_version = notices.iter().find_map(|notice| match notice {
            Notice::Location(change) if change.location_id == location_id => Some(change.version),
            _ => None,
        });
        self.notices.extend(notices);
        Ok(Enrolled {
            config,
            location_id,
            new_key: true,
            peer_version,
            retry: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        ChangeKind,
        devices::tests::{device, setup},
    };

    fn token(store: &mut Store, ttl_s: Option<u32>, now_ms: i64) -> String {
        store
            .create_download_token(
                admin::CreateDownloadTokenRequest {
                    device: "laptop".into(),
                    ttl_s,
                },
                now_ms,
            )
            .unwrap()
            .token
    }

    #[test]
    fn a_token_gives_the_config_once() {
        let (_dir, mut store) = setup(false);
        let dev = store
            .create_device(device("laptop", Key::new([1; 32])), 0)
            .unwrap();
        let t = token(&mut store, None, 1_000);
        assert_eq!(t.len(), TOKEN_LEN);
        let config = store.redeem_token(&t, 2_000).unwrap();
        assert_eq!(config.device, "laptop");
        assert_eq!(config.location, "ams");
        assert_eq!(config.addresses, dev.addresses);
        assert_eq!(config.endpoint, "198.51.100.100:51820");
        assert_eq!(config.allowed_ips, ["10.8.0.0/24", "fd00:8::/64"]);
        assert_eq!(config.persistent_keepalive_s, 25);
        assert_eq!(
            config.server_public_key,
            store.location("ams").unwrap().public_key
        );
        assert_eq!(config.preshared_key.len(), 44);
        let err = store.redeem_token(&t, 3_000).unwrap_err();
        assert!(matches!(err, ClientError::Unauthorized(_)), "{err}");
    }

    #[test]
    fn bad_tokens_say_why() {
        let (_dir, mut store) = setup(true);
        store
            .create_device(device("laptop", Key::new([1; 32])), 0)
            .unwrap();
        let t = token(&mut store, Some(60), 0);
        assert!(matches!(
            store.redeem_token(&t, 60_000),
            Err(ClientError::Expired(_))
        ));
        assert!(matches!(
            store.redeem_token("", 0),
            Err(ClientError::Invalid(_))
        ));
        assert!(matches!(
            store.redeem_token("short", 0),
            Err(ClientError::Invalid(_))
        ));
        let forged = URL_SAFE_NO_PAD.encode([0u8; 32]);
        assert!(matches!(
            store.redeem_token(&forged, 0),
            Err(ClientError::Unauthorized(_))
        ));
        // An expired token stays unused; a fresh one on an MFA location
        // carries no preshared key (each login brings one).
        let t = token(&mut store, None, 0);
        let config = store.redeem_token(&t, 1).unwrap();
        assert!(config.preshared_key.is_empty());
        assert!(
            store
                .create_download_token(
                    admin::CreateDownloadTokenRequest {
                        device: "laptop".into(),
                        ttl_s: Some(0),
                    },
                    0,
                )
                .is_err()
        );
    }

    /// How the enrolment's token is.
    #[derive(Debug, Clone, Copy)]
    enum Token {
        Good,
        Expired,
        Used,
        Unknown,
        /// Good, for a disabled device.
        Disabled,
    }

    /// What an enrolment should give.
    #[derive(Debug)]
    enum Want {
        /// The config; whether the device became a peer now.
        Config { new_peer: bool },
        /// Refused with this error kind and words.
        Refused(fn(&ClientError) -> bool, &'static str),
    }

    struct Case {
        name: &'static str,
        mfa: bool,
        /// The key "laptop" has before; `None`: awaiting enrolment.
        held: Option<Key>,
        token: Token,
        key: String,
        want: Want,
    }

    fn used_tokens(store: &Store) -> i64 {
        store
            .conn
            .query_row(
                "SELECT count(*) FROM download_tokens WHERE used_ms IS NOT NULL",
                [],
                |r| r.get(0),
            )
            .unwrap()
    }

    #[test]
    fn an_enrolment_gives_a_keyless_device_its_key_once_and_refuses_the_rest() {
        let new = Key::new([7; 32]);
        let phones = Key::new([2; 32]);
        let is_invalid: fn(&ClientError) -> bool = |e| matches!(e, ClientError::Invalid(_));
        let is_unauthorized: fn(&ClientError) -> bool =
            |e| matches!(e, ClientError::Unauthorized(_));
        let is_expired: fn(&ClientError) -> bool = |e| matches!(e, ClientError::Expired(_));
        let is_conflict: fn(&ClientError) -> bool = |e| matches!(e, ClientError::Conflict(_));
        let case = |name, held, token, key: Key, want| Case {
            name,
            mfa: false,
            held,
            token,
            key: key.to_base64(),
            want,
        };
        let cases = [
            case(
                "a keyless device gets the key and becomes a peer",
                None,
                Token::Good,
                new,
                Want::Config { new_peer: true },
            ),
            Case {
                mfa: true,
                ..case(
                    "on an MFA location the key waits for a login",
                    None,
                    Token::Good,
                    new,
                    Want::Config { new_peer: false },
                )
            },
            case(
                "the same key again is a download",
                Some(new),
                Token::Good,
                new,
                Want::Config { new_peer: false },
            ),
            case(
                "another key is a conflict",
                Some(Key::new([9; 32])),
                Token::Good,
                new,
                Want::Refused(
                    is_conflict,
                    "device \"laptop\" already has a key; ask the operator",
                ),
            ),
            case(
                "a key another device holds",
                None,
                Token::Good,
                phones,
                Want::Refused(is_invalid, "public_key: device \"phone\" has this key"),
            ),
            Case {
                key: "not a key".into(),
                ..case(
                    "a malformed key",
                    None,
                    Token::Good,
                    new,
                    Want::Refused(is_invalid, "public_key: "),
                )
            },
            case(
                "an expired token",
                None,
                Token::Expired,
                new,
                Want::Refused(is_expired, "token: expired"),
            ),
            case(
                "a used token",
                None,
                Token::Used,
                new,
                Want::Refused(is_unauthorized, "token: used already"),
            ),
            case(
                "an unknown token",
                None,
                Token::Unknown,
                new,
                Want::Refused(is_unauthorized, "token: not valid"),
            ),
            case(
                "a disabled device",
                None,
                Token::Disabled,
                new,
                Want::Refused(is_unauthorized, "disabled"),
            ),
        ];
        for case in cases {
            let name = case.name;
            let (_dir, mut store) = setup(case.mfa);
            store.create_device(device("phone", phones), 0).unwrap();
            store
                .create_device(
                    admin::CreateDeviceRequest {
                        public_key: case.held.map(|k| k.to_base64()).unwrap_or_default(),
                        ..device("laptop", new)
                    },
                    0,
                )
                .unwrap();
            let ttl = match case.token {
                Token::Expired => Some(1),
                _ => None,
            };
            let mut t = token(&mut store, ttl, 0);
            match case.token {
                Token::Used => {
                    store
                        .conn
                        .execute("UPDATE download_tokens SET used_ms = 1", [])
                        .unwrap();
                }
                Token::Unknown => t = URL_SAFE_NO_PAD.encode([0u8; 32]),
                Token::Disabled => {
                    store
                        .update_device(admin::UpdateDeviceRequest {
                            name: "laptop".into(),
                            enabled: Some(false),
                            ..Default::default()
                        })
                        .unwrap();
                }
                Token::Good | Token::Expired => {}
            }
            store.take_notices();
            let used_before = used_tokens(&store);
            let version = store.location("ams").unwrap().version;
            let result = store.enrol(&t, &case.key, 5_000);
            let laptop = store.device("laptop").unwrap();
            match (&case.want, result) {
                (Want::Config { new_peer }, Ok(enrolled)) => {
                    assert_eq!(enrolled.config.device, "laptop", "{name}");
                    assert_eq!(enrolled.config.mfa, case.mfa, "{name}");
                    assert_eq!(enrolled.config.preshared_key.is_empty(), case.mfa, "{name}");
                    assert_eq!(laptop.public_key, new.to_base64(), "{name}");
                    assert!(laptop.enrolled, "{name}");
                    assert_eq!(used_tokens(&store), used_before + 1, "{name}: token used");
                    assert_eq!(enrolled.new_key, case.held.is_none(), "{name}");
                    let notices = store.take_notices();
                    if *new_peer {
                        assert_eq!(enrolled.peer_version, Some(version + 1), "{name}");
                        let [Notice::Location(change)] = notices.as_slice() else {
                            panic!("{name}: {notices:?}")
                        };
                        assert_eq!(
                            change.kind,
                            ChangeKind::Peers {
                                upsert: vec![enrolled_peer(&store, new)],
                                remove: vec![]
                            },
                            "{name}"
                        );
                    } else {
                        assert_eq!(enrolled.peer_version, None, "{name}");
                        assert!(notices.is_empty(), "{name}: {notices:?}");
                        assert_eq!(store.location("ams").unwrap().version, version, "{name}");
                    }
                    let enrolled_events = store
                        .list_events("ams", 100)
                        .unwrap()
                        .into_iter()
                        .filter(|e| e.kind == "device-enrolled")
                        .count();
                    assert_eq!(enrolled_events, usize::from(case.held.is_none()), "{name}");
                }
                (Want::Refused(kind, says), Err(error)) => {
                    assert!(kind(&error), "{name}: {error:?}");
                    assert!(error.to_string().contains(says), "{name}: {error}");
                    assert_eq!(used_tokens(&store), used_before, "{name}: token kept");
                    assert_eq!(
                        laptop.public_key,
                        case.held.map(|k| k.to_base64()).unwrap_or_default(),
                        "{name}: key unchanged"
                    );
                    assert!(store.take_notices().is_empty(), "{name}");
                    assert_eq!(store.location("ams").unwrap().version, version, "{name}");
                }
                (want, got) => panic!("{name}: want {want:?}, got {got:?}"),
            }
        }
    }

    /// What happens between an enrolment and its retry.
    #[derive(Debug, Clone, Copy)]
    enum Between {
        Nothing,
        /// The operator disables the device.
        Disabled,
        /// The operator gives the device another key.
        KeyChanged,
    }

    /// A refusal: its kind and words.
    type Refused = (fn(&ClientError) -> bool, &'static str);

    struct RetryCase {
        name: &'static str,
        mfa: bool,
        /// The token's lifetime.
        ttl_s: u32,
        between: Between,
        /// The retry's key is the enrolled one (else another).
        same_key: bool,
        /// Milliseconds after the enrolment.
        after_ms: i64,
        /// `None`: the same config again; else refused with these words.
        refused: Option<Refused>,
    }

    #[test]
    fn an_enrolment_retried_with_its_key_within_the_grace_gets_the_same_answer() {
        let is_unauthorized: fn(&ClientError) -> bool =
            |e| matches!(e, ClientError::Unauthorized(_));
        let is_expired: fn(&ClientError) -> bool = |e| matches!(e, ClientError::Expired(_));
        let used = Some((is_unauthorized, "token: used already"));
        let case = |name, same_key, after_ms, refused| RetryCase {
            name,
            mfa: false,
            ttl_s: DEFAULT_TTL_S,
            between: Between::Nothing,
            same_key,
            after_ms,
            refused,
        };
        let cases = [
            case("the same key at once", true, 0, None),
            case("the same key a minute on", true, 60_000, None),
            case(
                "the same key at the grace's last moment",
                true,
                ENROL_RETRY_GRACE_MS - 1,
                None,
            ),
            case(
                "the same key after the grace",
                true,
                ENROL_RETRY_GRACE_MS,
                used,
            ),
            case("another key within the grace", false, 1_000, used),
            RetryCase {
                mfa: true,
                ..case(
                    "on an MFA location, without a preshared key",
                    true,
                    1_000,
                    None,
                )
            },
            RetryCase {
                ttl_s: 60,
                ..case(
                    "the same key once the token expired",
                    true,
                    60_000,
                    Some((is_expired, "token: expired")),
                )
            },
            RetryCase {
                between: Between::Disabled,
                ..case(
                    "the device disabled since",
                    true,
                    1_000,
                    Some((is_unauthorized, "disabled")),
                )
            },
            RetryCase {
                between: Between::KeyChanged,
                ..case("the enrolled key changed since", true, 1_000, used)
            },
            RetryCase {
                between: Between::KeyChanged,
                ..case("the device's new key", false, 1_000, used)
            },
        ];
        let enrolled_at = 5_000;
        for case in cases {
            let name = case.name;
            let (_dir, mut store) = setup(case.mfa);
            store
                .create_device(
                    admin::CreateDeviceRequest {
                        public_key: String::new(),
                        ..device("laptop", Key::new([1; 32]))
                    },
                    0,
                )
                .unwrap();
            let t = token(&mut store, Some(case.ttl_s), enrolled_at - 1);
            let key = Key::new([7; 32]);
            let other = Key::new([8; 32]);
            let first = store.enrol(&t, &key.to_base64(), enrolled_at).unwrap();
            assert!(first.new_key && !first.retry, "{name}");
            match case.between {
                Between::Nothing => {}
                Between::Disabled => {
                    store
                        .update_device(admin::UpdateDeviceRequest {
                            name: "laptop".into(),
                            enabled: Some(false),
                            ..Default::default()
                        })
                        .unwrap();
                }
                Between::KeyChanged => {
                    store
                        .update_device(admin::UpdateDeviceRequest {
                            name: "laptop".into(),
                            public_key: Some(other.to_base64()),
                            ..Default::default()
                        })
                        .unwrap();
                }
            }
            store.take_notices();
            let held = store.device("laptop").unwrap().public_key;
            let version = store.location("ams").unwrap().version;
            let retry_key = if case.same_key { key } else { other };
            let result = store.enrol(&t, &retry_key.to_base64(), enrolled_at + case.after_ms);
            match (case.refused, result) {
                (None, Ok(again)) => {
                    assert_eq!(again.config, first.config, "{name}: the same config");
                    assert!(!again.new_key && again.retry, "{name}");
                    assert_eq!(again.config.preshared_key.is_empty(), case.mfa, "{name}");
                    // It waits for the gateways as the first try did.
                    let waits = (!case.mfa).then_some(version);
                    assert_eq!(again.peer_version, waits, "{name}");
                    assert_eq!(first.peer_version.is_some(), !case.mfa, "{name}");
                }
                (Some((kind, says)), Err(error)) => {
                    assert!(kind(&error), "{name}: {error:?}");
                    assert!(error.to_string().contains(says), "{name}: {error}");
                }
                (want, got) => panic!("{name}: want {:?}, got {got:?}", want.map(|w| w.1)),
            }
            // Nothing changes: the key, the location, the events, the
            // token's use (its grace runs from the first use).
            assert_eq!(store.device("laptop").unwrap().public_key, held, "{name}");
            assert!(store.take_notices().is_empty(), "{name}");
            assert_eq!(store.location("ams").unwrap().version, version, "{name}");
            let used_at: Option<i64> = store
                .conn
                .query_row("SELECT used_ms FROM download_tokens", [], |r| r.get(0))
                .unwrap();
            assert_eq!(used_at, Some(enrolled_at), "{name}");
            let enrolled_events = store
                .list_events("ams", 100)
                .unwrap()
                .into_iter()
                .filter(|e| e.kind == "device-enrolled")
                .count();
            assert_eq!(enrolled_events, 1, "{name}");
        }
    }

    #[test]
    fn a_download_stays_one_time_and_is_no_enrolment_to_retry() {
        let key = Key::new([1; 32]);
        // A token used by a download does not answer an enrolment with
        // the device's key.
        let (_dir, mut store) = setup(false);
        store.create_device(device("laptop", key), 0).unwrap();
        let t = token(&mut store, None, 0);
        store.redeem_token(&t, 1).unwrap();
        let err = store.enrol(&t, &key.to_base64(), 2).unwrap_err();
        assert!(matches!(err, ClientError::Unauthorized(_)), "{err:?}");
        // A token used by an enrolment is no second download.
        let t = token(&mut store, None, 0);
        let again = store.enrol(&t, &key.to_base64(), 3).unwrap();
        assert!(!again.new_key && !again.retry);
        let err = store.redeem_token(&t, 4).unwrap_err();
        assert!(matches!(err, ClientError::Unauthorized(_)), "{err:?}");
        // That enrolment (a device with this key already) retries too.
        let retried = store.enrol(&t, &key.to_base64(), 5).unwrap();
        assert!(retried.retry);
        assert_eq!(retried.config, again.config);
    }

    /// The peer the gateways get for the enrolled "laptop".
    fn enrolled_peer(store: &Store, key: Key) -> crate::store::PeerSpec {
        let id: i64 = store
            .conn
            .query_row("SELECT id FROM devices WHERE name = 'laptop'", [], |r| {
                r.get(0)
            })
            .unwrap();
        let (_, peer) = render::device_peer(&store.conn, id).unwrap().unwrap();
        assert_eq!(peer.public_key, key);
        peer
    }

    #[test]
    fn a_keyless_device_is_no_peer_and_its_download_waits_for_the_enrolment() {
        let (_dir, mut store) = setup(false);
        let dev = store
            .create_device(
                admin::CreateDeviceRequest {
                    public_key: String::new(),
                    ..device("laptop", Key::new([1; 32]))
                },
                0,
            )
            .unwrap();
        assert!(!dev.enrolled && dev.public_key.is_empty());
        assert_eq!(dev.addresses.len(), 2);
        // Not a peer: no change for the gateways, none in their config.
        assert!(store.take_notices().is_empty());
        let config = render::location_config(&store.conn, 1).unwrap().unwrap();
        assert!(config.peers.is_empty());
        let t = token(&mut store, None, 0);
        let err = store.redeem_token(&t, 1).unwrap_err();
        assert!(matches!(err, ClientError::Invalid(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "the device has no key yet: enrol it with tidegate-client enrol"
        );
        assert_eq!(used_tokens(&store), 0);
        // The same token then enrols it.
        let key = Key::new([4; 32]);
        store.enrol(&t, &key.to_base64(), 2).unwrap();
        let config = render::location_config(&store.conn, 1).unwrap().unwrap();
        assert_eq!(config.peers.len(), 1);
        // Two keyless devices at one location are fine.
        for name in ["a", "b"] {
            store
                .create_device(
                    admin::CreateDeviceRequest {
                        public_key: String::new(),
                        ..device(name, key)
                    },
                    0,
                )
                .unwrap();
        }
        assert_eq!(store.list_devices("", "ams").unwrap().len(), 3);
        // An operator's key enrols it too, as a key change does.
        store
            .update_device(admin::UpdateDeviceRequest {
                name: "a".into(),
                public_key: Some(Key::new([5; 32]).to_base64()),
                ..Default::default()
            })
            .unwrap();
        assert!(store.device("a").unwrap().enrolled);
        let config = render::location_config(&store.conn, 1).unwrap().unwrap();
        assert_eq!(config.peers.len(), 2);
    }
}
