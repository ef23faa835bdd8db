//! The schema, as numbered migrations. `PRAGMA user_version` records how
//! many have run; each runs in its own transaction.

use rusqlite::Connection;

use super::{StoreError, sql};

/// Migration `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "
    CREATE TABLE locations (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        addresses TEXT NOT NULL,
        listen_port INTEGER NOT NULL,
        vips TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        allowed_ips TEXT NOT NULL,
        dns TEXT NOT NULL,
        mtu INTEGER NOT NULL,
        mfa INTEGER NOT NULL,
        peer_disconnect_threshold_s INTEGER NOT NULL,
        persistent_keepalive_s INTEGER NOT NULL,
        private_key BLOB NOT NULL CHECK (length(private_key) = 32),
        version INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE gateways (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        location_id INTEGER NOT NULL REFERENCES locations(id),
        address TEXT NOT NULL,
        identity TEXT NOT NULL,
        enabled INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE INDEX gateways_location ON gateways(location_id);
    CREATE TABLE users (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        totp_secret BLOB NOT NULL,
        -- The newest TOTP time step used; older and equal codes are replays.
        totp_last_step INTEGER NOT NULL DEFAULT -1,
        enabled INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE devices (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        user_id INTEGER NOT NULL REFERENCES users(id),
        location_id INTEGER NOT NULL REFERENCES locations(id),
        public_key BLOB NOT NULL CHECK (length(public_key) = 32),
        preshared_key BLOB NOT NULL CHECK (length(preshared_key) = 32),
        enabled INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        UNIQUE (location_id, public_key)
    );
    CREATE INDEX devices_user ON devices(user_id);
    CREATE TABLE device_addresses (
        device_id INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        location_id INTEGER NOT NULL REFERENCES locations(id),
        address TEXT NOT NULL,
        PRIMARY KEY (location_id, address)
    );
    CREATE INDEX device_addresses_device ON device_addresses(device_id);
    CREATE TABLE mfa_sessions (
        device_id INTEGER PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
        preshared_key BLOB NOT NULL CHECK (length(preshared_key) = 32),
        started_ms INTEGER NOT NULL
    );
    CREATE TABLE download_tokens (
        hash BLOB PRIMARY KEY,
        device_id INTEGER NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        used_ms INTEGER
    );
    CREATE TABLE edges (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        address TEXT NOT NULL,
        identity TEXT NOT NULL,
        enabled INTEGER NOT NULL,
        created_ms INTEGER NOT NULL
    );
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        kind TEXT NOT NULL,
        location TEXT NOT NULL,
        subject TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX events_location ON events(location, id);
    ",
    // 2: wrong MFA codes of a device, counted across logins.
    "
    ALTER TABLE devices ADD COLUMN mfa_failures INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE devices ADD COLUMN mfa_failed_ms INTEGER NOT NULL DEFAULT 0;
    ",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Runs the migrations the database has not had yet.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(sql("reading the schema version"))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction().map_err(sql("starting a migration"))?;
        tx.execute_batch(migration)
            .map_err(sql("migrating the schema"))?;
        tx.pragma_update(None, "user_version", index as i64 + 1)
            .map_err(sql("recording the schema version"))?;
        tx.commit().map_err(sql("committing a migration"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_run_once_and_a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core.db");
        let mut conn = Connection::open(&path).unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        assert!(matches!(migrate(&mut conn), Err(StoreError::TooNew { .. })));
    }
}
