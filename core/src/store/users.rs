//! Users: who owns devices, and the TOTP secret of their MFA logins.

use super::db::{Db, OptionalExtension as _, Row, params};
use tidegate_proto::admin::v1 as admin;

use super::{Store, StoreError, begin, db, sql, validate};
use crate::totp;

/// The issuer authenticator apps show beside the account.
pub const TOTP_ISSUER: &str = "Tidegate";

const SELECT: &str = "SELECT u.name, u.enabled, u.created_ms, u.id, \
     (SELECT count(*) FROM devices d WHERE d.user_id = u.id) FROM users u";

fn from_row(row: &Row) -> db::Result<(admin::User, i64)> {
    Ok((
        admin::User {
            name: row.get(0)?,
            enabled: row.get(1)?,
            created_unix_ms: row.get(2)?,
            devices: row.get(4)?,
        },
        row.get(3)?,
    ))
}

pub(crate) fn by_name(conn: &Db, name: &str) -> Result<(admin::User, i64), StoreError> {
    conn.query_row(&format!("{SELECT} WHERE u.name = ?1"), [name], from_row)
        .optional()
        .map_err(sql("reading a user"))?
        .ok_or_else(|| StoreError::not_found("user", name))
}

fn name_taken(conn: &Db, name: &str) -> Result<bool, StoreError> {
    super::name_taken(conn, "users", "looking up a user", name)
}

fn with_secret(user: admin::User, secret: Option<&[u8]>) -> admin::UserWithSecret {
    let (totp_secret, totp_uri) = match secret {
        Some(secret) => (
            totp::secret_base32(secret),
            totp::otpauth_uri(TOTP_ISSUER, &user.name, secret),
        ),
        None => Default::default(),
    };
    admin::UserWithSecret {
        user: Some(user),
        totp_secret,
        totp_uri,
    }
}

impl Store {
    /// Creates a user with a new TOTP secret, returned this once.
    pub fn create_user(
        &mut self,
        req: admin::CreateUserRequest,
        now_ms: i64,
    ) -> Result<admin::UserWithSecret, StoreError> {
        let name = validate::user_name("name", &req.name)?;
        let secret = totp::generate_secret();
        let tx = begin(&mut self.conn)?;
        if name_taken(&tx, &name)? {
            return Err(StoreError::Exists { kind: "user", name });
        }
        tx.execute(
            "INSERT INTO users (name, totp_secret, enabled, created_ms) VALUES (?1, ?2, ?3, ?4)",
            params![name, secret.as_slice(), req.enabled.unwrap_or(true), now_ms],
        )
        .map_err(sql("storing a user"))?;
        let (user, _) = by_name(&tx, &name)?;
        self.notices.extend(tx.commit()?);
        Ok(with_secret(user, Some(&secret)))
    }

    pub fn list_users(&self) -> Result<Vec<admin::User>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("{SELECT} ORDER BY u.name"))
            .map_err(sql("listing users"))?;
        let rows = stmt.query_map([], from_row).map_err(sql("listing users"))?;
        rows.map(|row| row.map(|(user, _)| user))
            .collect::<Result<_, _>>()
            .map_err(sql("listing users"))
    }

    pub fn user(&self, name: &str) -> Result<admin::User, StoreError> {
        Ok(by_name(&self.conn, name)?.0)
    }

    /// Renames, enables or disables a user (a disabled user's devices stop
    /// being peers and cannot log in), or issues a new TOTP secret.
    pub fn update_user(
        &mut self,
        req: admin::UpdateUserRequest,
    ) -> Result<admin::UserWithSecret, StoreError> {
        let mut tx = begin(&mut self.conn)?;
        let (old, id) = by_name(&tx, &req.name)?;
        let mut new = old.clone();
        if let Some(name) = req.rename {
            new.name = validate::user_name("rename", &name)?;
            if new.name != old.name && name_taken(&tx, &new.name)? {
                return Err(StoreError::Exists {
                    kind: "user",
                    name: new.name,
                });
            }
        }
        if let Some(enabled) = req.enabled {
            new.enabled = enabled;
        }
        if new.enabled != old.enabled {
            tx.touch_user_devices(id)?;
        }
        tx.execute(
            "UPDATE users SET name = ?2, enabled = ?3 WHERE id = ?1",
            params![id, new.name, new.enabled],
        )
        .map_err(sql("updating a user"))?;
        let secret = req.reset_totp.then(totp::generate_secret);
        if let Some(secret) = &secret {
            tx.execute(
                "UPDATE users SET totp_secret = ?2, totp_last_step = -1 WHERE id = ?1",
                params![id, secret.as_slice()],
            )
            .map_err(sql("storing a TOTP secret"))?;
        }
        let (user, _) = by_name(&tx, &new.name)?;
        self.notices.extend(tx.commit()?);
        Ok(with_secret(user, secret.as_ref().map(|s| s.as_slice())))
    }

    /// Deletes a user who has no devices left.
    pub fn delete_user(&mut self, name: &str) -> Result<(), StoreError> {
        let tx = begin(&mut self.conn)?;
        let (user, id) = by_name(&tx, name)?;
        if user.devices > 0 {
            return Err(StoreError::InUse(format!(
                "user {name:?} still has {} devices; delete them first",
                user.devices
            )));
        }
        tx.execute("DELETE FROM users WHERE id = ?1", [id])
            .map_err(sql("deleting a user"))?;
        self.notices.extend(tx.commit()?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing;

    #[test]
    fn users_get_a_secret_once() {
        let (_dir, mut store) = testing::store();
        let created = store
            .create_user(
                admin::CreateUserRequest {
                    name: "alice@example.org".into(),
                    enabled: None,
                },
                3,
            )
            .unwrap();
        assert_eq!(created.totp_secret.len(), 32);
        assert!(
            created
                .totp_uri
                .starts_with("otpauth://totp/Tidegate:alice%40example.org?secret=")
        );
        let user = created.user.unwrap();
        assert!(user.enabled);
        assert_eq!(store.user("alice@example.org").unwrap(), user);
        let changed = store
            .update_user(admin::UpdateUserRequest {
                name: "alice@example.org".into(),
                rename: Some("alice".into()),
                ..Default::default()
            })
            .unwrap();
        assert!(changed.totp_secret.is_empty());
        let reset = store
            .update_user(admin::UpdateUserRequest {
                name: "alice".into(),
                reset_totp: true,
                ..Default::default()
            })
            .unwrap();
        assert_ne!(reset.totp_secret, created.totp_secret);
        assert!(matches!(
            store.create_user(
                admin::CreateUserRequest {
                    name: "alice".into(),
                    enabled: None
                },
                3
            ),
            Err(StoreError::Exists { .. })
        ));
        assert!(
            store
                .create_user(
                    admin::CreateUserRequest {
                        name: "bob smith".into(),
                        enabled: None
                    },
                    3
                )
                .is_err()
        );
        assert_eq!(store.list_users().unwrap().len(), 1);
        store.delete_user("alice").unwrap();
        assert!(store.list_users().unwrap().is_empty());
    }
}
