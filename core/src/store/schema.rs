//! The schema. On SQLite, as numbered migrations: `PRAGMA user_version`
//! records how many have run; each runs in its own transaction. On
//! PostgreSQL, a new database gets the schema of the current version whole
//! (its table `tidegate_schema` records the version); later migrations
//! will carry their PostgreSQL text beside SQLite's.

use rusqlite::{Connection, OptionalExtension as _};

use super::{
    StoreError,
    db::{Db, DbError},
    sql,
};

/// [`sql`] for rusqlite's own errors.
fn lite(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| sql(op)(DbError::from(source))
}

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
    // 3: a device may await its key (enrolment): public_key NULL. SQLite
    // cannot drop a NOT NULL: the table is rebuilt, rows, ids and index
    // kept (foreign keys are off while it runs; see `migrate`).
    "
    CREATE TABLE devices_new (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        user_id INTEGER NOT NULL REFERENCES users(id),
        location_id INTEGER NOT NULL REFERENCES locations(id),
        public_key BLOB CHECK (public_key IS NULL OR length(public_key) = 32),
        preshared_key BLOB NOT NULL CHECK (length(preshared_key) = 32),
        enabled INTEGER NOT NULL,
        created_ms INTEGER NOT NULL,
        mfa_failures INTEGER NOT NULL DEFAULT 0,
        mfa_failed_ms INTEGER NOT NULL DEFAULT 0,
        UNIQUE (location_id, public_key)
    );
    INSERT INTO devices_new (id, name, user_id, location_id, public_key, preshared_key, enabled,
        created_ms, mfa_failures, mfa_failed_ms)
        SELECT id, name, user_id, location_id, public_key, preshared_key, enabled, created_ms,
        mfa_failures, mfa_failed_ms FROM devices;
    DROP TABLE devices;
    ALTER TABLE devices_new RENAME TO devices;
    CREATE INDEX devices_user ON devices(user_id);
    ",
    // 4: MFA sessions that end by their age (0: only when idle).
    "
    ALTER TABLE locations ADD COLUMN mfa_session_s INTEGER NOT NULL DEFAULT 0;
    ",
    // 5: the key an enrolment used a token for (NULL: unused, or used by
    // a download); a retry of that enrolment is answered again.
    "
    ALTER TABLE download_tokens ADD COLUMN used_key BLOB CHECK (used_key IS NULL OR length(used_key) = 32);
    ",
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// PostgreSQL's schema at [`SCHEMA_VERSION`]: SQLite's, with PostgreSQL's
/// types. Integers are `BIGINT` (the store reads them as i64), flags
/// `BOOLEAN`, blobs `BYTEA`; names sort bytewise (`COLLATE "C"`) as on
/// SQLite. Ids are identities that also take a given value, so that
/// `tidegate-core migrate` keeps them. Two tables are PostgreSQL's only:
/// `core_leader`, the lease of the Cores sharing the database, and
/// `core_roster`, where each of them says how it is (see
/// [`crate::leader`]).
const POSTGRES_SCHEMA: &str = r#"
    CREATE TABLE tidegate_schema (version BIGINT NOT NULL);
    CREATE TABLE locations (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        name TEXT COLLATE "C" NOT NULL UNIQUE,
        addresses TEXT NOT NULL,
        listen_port BIGINT NOT NULL,
        vips TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        allowed_ips TEXT NOT NULL,
        dns TEXT NOT NULL,
        mtu BIGINT NOT NULL,
        mfa BOOLEAN NOT NULL,
        peer_disconnect_threshold_s BIGINT NOT NULL,
        persistent_keepalive_s BIGINT NOT NULL,
        private_key BYTEA NOT NULL CHECK (length(private_key) = 32),
        version BIGINT NOT NULL,
        created_ms BIGINT NOT NULL,
        mfa_session_s BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE gateways (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        name TEXT COLLATE "C" NOT NULL UNIQUE,
        location_id BIGINT NOT NULL REFERENCES locations(id),
        address TEXT NOT NULL,
        identity TEXT NOT NULL,
        enabled BOOLEAN NOT NULL,
        created_ms BIGINT NOT NULL
    );
    CREATE INDEX gateways_location ON gateways(location_id);
    CREATE TABLE users (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        name TEXT COLLATE "C" NOT NULL UNIQUE,
        totp_secret BYTEA NOT NULL,
        totp_last_step BIGINT NOT NULL DEFAULT -1,
        enabled BOOLEAN NOT NULL,
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE devices (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        name TEXT COLLATE "C" NOT NULL UNIQUE,
        user_id BIGINT NOT NULL REFERENCES users(id),
        location_id BIGINT NOT NULL REFERENCES locations(id),
        public_key BYTEA CHECK (public_key IS NULL OR length(public_key) = 32),
        preshared_key BYTEA NOT NULL CHECK (length(preshared_key) = 32),
        enabled BOOLEAN NOT NULL,
        created_ms BIGINT NOT NULL,
        mfa_failures BIGINT NOT NULL DEFAULT 0,
        mfa_failed_ms BIGINT NOT NULL DEFAULT 0,
        UNIQUE (location_id, public_key)
    );
    CREATE INDEX devices_user ON devices(user_id);
    CREATE TABLE device_addresses (
        device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        location_id BIGINT NOT NULL REFERENCES locations(id),
        address TEXT COLLATE "C" NOT NULL,
        PRIMARY KEY (location_id, address)
    );
    CREATE INDEX device_addresses_device ON device_addresses(device_id);
    CREATE TABLE mfa_sessions (
        device_id BIGINT PRIMARY KEY REFERENCES devices(id) ON DELETE CASCADE,
        preshared_key BYTEA NOT NULL CHECK (length(preshared_key) = 32),
        started_ms BIGINT NOT NULL
    );
    CREATE TABLE download_tokens (
        hash BYTEA PRIMARY KEY,
        device_id BIGINT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        created_ms BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL,
        used_ms BIGINT,
        used_key BYTEA CHECK (used_key IS NULL OR length(used_key) = 32)
    );
    CREATE TABLE edges (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        name TEXT COLLATE "C" NOT NULL UNIQUE,
        address TEXT NOT NULL,
        identity TEXT NOT NULL,
        enabled BOOLEAN NOT NULL,
        created_ms BIGINT NOT NULL
    );
    CREATE TABLE events (
        id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        at_ms BIGINT NOT NULL,
        kind TEXT NOT NULL,
        location TEXT COLLATE "C" NOT NULL,
        subject TEXT NOT NULL,
        message TEXT NOT NULL
    );
    CREATE INDEX events_location ON events(location, id);
    CREATE TABLE core_leader (
        id BIGINT PRIMARY KEY CHECK (id = 1),
        term BIGINT NOT NULL,
        holder TEXT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    );
    INSERT INTO core_leader (id, term, holder, expires_at) VALUES (1, 0, '', '-infinity');
    CREATE TABLE core_roster (
        core_id TEXT COLLATE "C" PRIMARY KEY,
        seen_at TIMESTAMPTZ NOT NULL,
        term BIGINT NOT NULL,
        leads BOOLEAN NOT NULL,
        gateways_connected BIGINT NOT NULL,
        gateways BIGINT NOT NULL,
        edges_connected BIGINT NOT NULL,
        edges BIGINT NOT NULL
    );
"#;

/// The store's tables in the order their rows can be copied (a table
/// after those it refers to).
pub const TABLES: &[&str] = &[
    "locations",
    "gateways",
    "users",
    "devices",
    "device_addresses",
    "mfa_sessions",
    "download_tokens",
    "edges",
    "events",
];

/// The PostgreSQL advisory lock held while a schema is made or migrated,
/// so that Cores starting together do it once.
const SCHEMA_LOCK: i64 = 0x7469_6465_7363_6865; // "tidesche"

/// Brings a PostgreSQL database's schema to [`SCHEMA_VERSION`]: creates it
/// whole in an empty database. A database whose schema is newer, or that
/// holds tables but not Tidegate's, is refused.
pub fn migrate_postgres(db: &Db) -> Result<(), StoreError> {
    db.execute_batch("BEGIN")
        .map_err(sql("starting the schema check"))?;
    let result = migrate_postgres_in(db);
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    db.execute_batch(end)
        .map_err(sql("ending the schema check"))?;
    result
}

/// [`migrate_postgres`] inside a transaction the caller runs.
pub(super) fn migrate_postgres_in(db: &Db) -> Result<(), StoreError> {
    db.execute("SELECT pg_advisory_xact_lock(?1)", [SCHEMA_LOCK])
        .map_err(sql("waiting for the schema lock"))?;
    let ours: bool = db
        .query_row(
            "SELECT to_regclass('tidegate_schema') IS NOT NULL",
            [],
            |row| row.get(0),
        )
        .map_err(sql("reading the schema version"))?;
    if !ours {
        let tables: i64 = db
            .query_row(
                "SELECT count(*) FROM pg_catalog.pg_tables WHERE schemaname = current_schema()",
                [],
                |row| row.get(0),
            )
            .map_err(sql("listing tables"))?;
        if tables > 0 {
            return Err(StoreError::Migration {
                version: SCHEMA_VERSION,
                problem: format!(
                    "the database holds {tables} tables but not Tidegate's schema: \
                     give tidegate-core a database of its own"
                ),
            });
        }
        db.execute_batch(POSTGRES_SCHEMA)
            .map_err(sql("creating the schema"))?;
        db.execute(
            "INSERT INTO tidegate_schema (version) VALUES (?1)",
            [SCHEMA_VERSION],
        )
        .map_err(sql("recording the schema version"))?;
        return Ok(());
    }
    let found: i64 = db
        .query_row("SELECT version FROM tidegate_schema", [], |row| row.get(0))
        .map_err(sql("reading the schema version"))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    if found < SCHEMA_VERSION {
        return Err(StoreError::Migration {
            version: found + 1,
            problem: format!(
                "PostgreSQL schemas start at version {SCHEMA_VERSION}; this one is at {found}"
            ),
        });
    }
    Ok(())
}

/// Runs the migrations the database has not had yet.
///
/// Foreign keys are off while they run (a table rebuild drops a table
/// others refer to, which would otherwise cascade) and each migration is
/// checked with `PRAGMA foreign_key_check` before it commits.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(lite("reading the schema version"))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    let foreign_keys: bool = conn
        .pragma_query_value(None, "foreign_keys", |row| row.get(0))
        .map_err(lite("reading the foreign keys setting"))?;
    conn.pragma_update(None, "foreign_keys", false)
        .map_err(lite("turning foreign keys off for a migration"))?;
    let result = run_migrations(conn, found);
    conn.pragma_update(None, "foreign_keys", foreign_keys)
        .map_err(lite("turning foreign keys back on"))?;
    result
}

fn run_migrations(conn: &mut Connection, found: i64) -> Result<(), StoreError> {
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let version = index as i64 + 1;
        let tx = conn.transaction().map_err(lite("starting a migration"))?;
        tx.execute_batch(migration)
            .map_err(lite("migrating the schema"))?;
        let broken: Option<String> = tx
            .query_row("PRAGMA foreign_key_check", [], |row| {
                Ok(format!(
                    "row {} of {} refers to a missing {}",
                    row.get::<_, Option<i64>>(1)?.unwrap_or_default(),
                    row.get::<_, String>(0)?,
                    row.get::<_, String>(2)?
                ))
            })
            .optional()
            .map_err(lite("checking foreign keys"))?;
        if let Some(problem) = broken {
            return Err(StoreError::Migration { version, problem });
        }
        tx.pragma_update(None, "user_version", version)
            .map_err(lite("recording the schema version"))?;
        tx.commit().map_err(lite("committing a migration"))?;
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

    #[test]
    fn version_2_devices_keep_their_rows_sessions_addresses_and_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("core.db")).unwrap();
        conn.pragma_update(None, "foreign_keys", true).unwrap();
        for migration in &MIGRATIONS[..2] {
            conn.execute_batch(migration).unwrap();
        }
        conn.pragma_update(None, "user_version", 2).unwrap();
        conn.execute_batch(
            "INSERT INTO locations VALUES (1, 'ams', '[]', 51820, '[]', 'vpn.example.org', '[]', \
                 '[]', 0, 1, 300, 25, zeroblob(32), 7, 0);
             INSERT INTO users (id, name, totp_secret, enabled, created_ms) VALUES (1, 'alice', x'00', 1, 0);
             INSERT INTO devices (id, name, user_id, location_id, public_key, preshared_key, enabled, \
                 created_ms, mfa_failures, mfa_failed_ms) \
                 VALUES (5, 'laptop', 1, 1, randomblob(32), randomblob(32), 1, 3, 2, 4), \
                        (9, 'phone', 1, 1, randomblob(32), randomblob(32), 0, 6, 0, 0);
             INSERT INTO device_addresses VALUES (5, 1, '10.8.0.2/32'), (9, 1, '10.8.0.3/32');
             INSERT INTO mfa_sessions VALUES (5, randomblob(32), 11);
             INSERT INTO download_tokens VALUES (x'01', 9, 0, 100, NULL);",
        )
        .unwrap();
        let devices = |conn: &Connection| -> Vec<(i64, String, Vec<u8>, i64)> {
            let mut stmt = conn
                .prepare("SELECT id, name, public_key, mfa_failures FROM devices ORDER BY id")
                .unwrap();
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap()
        };
        let devices_before = devices(&conn);
        migrate(&mut conn).unwrap();
        let count = |table: &str| -> i64 {
            conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(count("device_addresses"), 2);
        assert_eq!(count("mfa_sessions"), 1);
        assert_eq!(count("download_tokens"), 1);
        let devices_after = devices(&conn);
        assert_eq!(devices_after, devices_before);
        // Foreign keys are back on, still point at devices and hold.
        let on: bool = conn
            .pragma_query_value(None, "foreign_keys", |r| r.get(0))
            .unwrap();
        assert!(on);
        let broken: Option<String> = conn
            .query_row("PRAGMA foreign_key_check", [], |r| r.get(0))
            .optional()
            .unwrap();
        assert_eq!(broken, None);
        let index: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = 'devices_user'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(index, 1);
        // A key may now be absent, twice at one location; a duplicate key
        // is still refused.
        conn.execute_batch(
            "INSERT INTO devices (name, user_id, location_id, public_key, preshared_key, enabled, created_ms) \
                 VALUES ('a', 1, 1, NULL, randomblob(32), 1, 0), ('b', 1, 1, NULL, randomblob(32), 1, 0)",
        )
        .unwrap();
        assert!(
            conn.execute(
                "INSERT INTO devices (name, user_id, location_id, public_key, preshared_key, enabled, created_ms) \
                 SELECT 'c', 1, 1, public_key, randomblob(32), 1, 0 FROM devices WHERE id = 5",
                [],
            )
            .is_err()
        );
        // Deleting a device still takes its session and addresses along.
        conn.execute("DELETE FROM devices WHERE id = 5", [])
            .unwrap();
        assert_eq!(count("mfa_sessions"), 0);
        assert_eq!(count("device_addresses"), 1);
        let mfa_session_s: i64 = conn
            .query_row("SELECT mfa_session_s FROM locations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mfa_session_s, 0);
    }
}
