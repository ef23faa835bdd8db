//! One-time tokens with which a device's owner downloads its config through
//! an Edge. Only a hash of each token is stored.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use rusqlite::{OptionalExtension as _, params};
use sha2::{Digest as _, Sha256};
use tidegate_proto::{admin::v1 as admin, edge::v1 as edge};

use super::{ClientError, Store, StoreError, begin, devices, render, sql};
use crate::keys::Key;

/// Lifetime of a token when none is asked for: a day.
pub const DEFAULT_TTL_S: u32 = 24 * 3600;
/// Longest lifetime: 30 days.
pub const MAX_TTL_S: u32 = 30 * 24 * 3600;
/// Length of a token (32 random bytes, base64url).
pub const TOKEN_LEN: usize = 43;

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A token with what redeeming it needs.
struct TokenRow {
    device_id: i64,
    expires_ms: i64,
    used_ms: Option<i64>,
    /// The device and its user are enabled.
    enabled: bool,
    mfa: bool,
    psk: Vec<u8>,
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

    /// Uses a token: the device's config, once.
    pub fn redeem_token(
        &mut self,
        token: &str,
        now_ms: i64,
    ) -> Result<edge::DeviceConfig, ClientError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(ClientError::Invalid("token: missing".into()));
        }
        if token.len() != TOKEN_LEN || URL_SAFE_NO_PAD.decode(token).is_err() {
            return Err(ClientError::Invalid(format!(
                "token: not a download token (expected {TOKEN_LEN} base64url characters)"
            )));
        }
        let tx = begin(&mut self.conn)?;
        let row = tx
            .query_row(
                "SELECT t.device_id, t.expires_ms, t.used_ms, d.enabled AND u.enabled, l.mfa, d.preshared_key \
                 FROM download_tokens t JOIN devices d ON d.id = t.device_id \
                 JOIN users u ON u.id = d.user_id JOIN locations l ON l.id = d.location_id \
                 WHERE t.hash = ?1",
                [hash(token).as_slice()],
                |r| {
                    Ok(TokenRow {
                        device_id: r.get(0)?,
                        expires_ms: r.get(1)?,
                        used_ms: r.get(2)?,
                        enabled: r.get(3)?,
                        mfa: r.get(4)?,
                        psk: r.get(5)?,
                    })
                },
            )
            .optional()
            .map_err(sql("reading a token"))?;
        let Some(TokenRow {
            device_id,
            expires_ms,
            used_ms,
            enabled,
            mfa,
            psk,
        }) = row
        else {
            return Err(ClientError::Unauthorized("token: not valid".into()));
        };
        if used_ms.is_some() {
            return Err(ClientError::Unauthorized(
                "token: used already; ask for a new one".into(),
            ));
        }
        if expires_ms <= now_ms {
            return Err(ClientError::Expired(
                "token: expired; ask for a new one".into(),
            ));
        }
        if !enabled {
            return Err(ClientError::Unauthorized(
                "the device or its user is disabled".into(),
            ));
        }
        let psk = if mfa {
            // The key comes with each MFA login.
            None
        } else {
            Some(Key::from_slice(&psk).map_err(|e| {
                ClientError::Internal(StoreError::InUse(format!("stored preshared key: {e}")))
            })?)
        };
        tx.execute(
            "UPDATE download_tokens SET used_ms = ?2 WHERE hash = ?1",
            params![hash(token).as_slice(), now_ms],
        )
        .map_err(sql("using a token"))?;
        let config = render::device_config(&tx, device_id, psk)?;
        self.notices.extend(tx.commit()?);
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::devices::tests::{device, setup};

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
}
