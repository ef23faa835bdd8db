//! Core's store: locations, gateways, users, devices, MFA sessions,
//! download tokens, Edges and the event log, in one SQLite file (WAL,
//! foreign keys; a single Core) or one PostgreSQL database (several Cores;
//! see [`db`]).
//!
//! Every change is checked whole and made in one transaction: a refused
//! request stores nothing. A change to what a location's gateways run bumps
//! the location's config version in the same transaction and, once
//! committed, leaves a [`Notice`] for the gateway links.
//!
//! The store speaks the operator API's messages (`tidegate.admin.v1`):
//! requests in, views out. It is owned by one thread (see [`crate::state`]).

pub mod db;
mod devices;
mod edges;
mod events;
mod gateways;
mod locations;
mod mfa;
mod migrate;
mod render;
mod schema;
mod tokens;
mod users;
pub mod validate;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
    path::{Path, PathBuf},
    str::FromStr,
    sync::Arc,
    time::Duration,
};

use self::db::{Backend, Db, DbError, OptionalExtension as _, params};

pub use self::{
    events::EventKind,
    gateways::{EdgeTarget, GatewayTarget},
    mfa::{ClientError, FinishedLogin, MfaSettings, RemovalOutcome},
    migrate::{Copied, copy_to_postgres},
    render::PeerSpec,
    tokens::Enrolled,
};
use crate::{challenge::Challenges, keys::Key, lockout::Sources};

/// Why the store refused or failed a request.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the database {database}")]
    Open {
        database: Database,
        #[source]
        source: DbError,
    },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is in use by another tidegate-core")]
    Locked { path: PathBuf },
    #[error(
        "the database is at schema version {found}, newer than this tidegate-core knows ({known})"
    )]
    TooNew { found: i64, known: i64 },
    #[error("migrating the schema to version {version}: {problem}")]
    Migration { version: i64, problem: String },
    #[error("database: {op}")]
    Sql {
        op: &'static str,
        #[source]
        source: DbError,
    },
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("no {kind} named {name:?}")]
    NotFound { kind: &'static str, name: String },
    #[error("a {kind} named {name:?} exists already")]
    Exists { kind: &'static str, name: String },
    #[error("{0}")]
    InUse(String),
    /// A write asked of a Core that does not lead (several Cores).
    #[error("{0}")]
    NotLeader(String),
    /// One of a batch was refused; nothing of the batch was stored.
    #[error("item {index} ({name:?}); nothing was added")]
    Batch {
        index: usize,
        name: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error(
        "{what} {value:?} is taken by the {kind} {name:?}: gateways and Edges need distinct names and identities (compared ignoring case)"
    )]
    IdentityTaken {
        what: &'static str,
        value: String,
        kind: &'static str,
        name: String,
    },
}

impl StoreError {
    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            message: message.into(),
        }
    }

    pub(crate) fn not_found(kind: &'static str, name: &str) -> Self {
        Self::NotFound {
            kind,
            name: name.to_owned(),
        }
    }
}

/// Wraps a database error with what was being done.
pub(crate) fn sql(op: &'static str) -> impl FnOnce(DbError) -> StoreError {
    move |source| StoreError::Sql { op, source }
}

/// Whether a row of `table` (one of the store's own tables, never input)
/// already has `name`; `op` names the lookup in an error.
/// Fails if a gateway or Edge other than `own` (its kind and row id) has
/// `name` as its name or `identity` as its identity, ignoring case (and a
/// trailing dot): certificates name gateways and Edges in one namespace,
/// and DNS names compare ignoring case.
pub(crate) fn identity_free(
    conn: &Db,
    own: Option<(&'static str, i64)>,
    name: &str,
    identity: &str,
) -> Result<(), StoreError> {
    let norm = |text: &str| text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    let (name, identity) = (norm(name), norm(identity));
    for (kind, table) in [("gateway", "gateways"), ("Edge", "edges")] {
        let skip = own.filter(|(k, _)| *k == kind).map(|(_, id)| id);
        let mut stmt = conn
            .prepare(&format!(
                "SELECT id, name, identity FROM {table} WHERE CAST(?1 AS BIGINT) IS NULL OR id != ?1"
            ))
            .map_err(sql("checking identities"))?;
        let rows = stmt
            .query_map([skip], |row| {
                Ok((row.get::<_, String>(1)?, row.get::<_, String>(2)?))
            })
            .map_err(sql("checking identities"))?;
        for row in rows {
            let (other_name, other_identity) = row.map_err(sql("checking identities"))?;
            let taken = |what, value: &str| StoreError::IdentityTaken {
                what,
                value: value.to_owned(),
                kind,
                name: other_name.clone(),
            };
            if norm(&other_name) == name {
                return Err(taken("name", &name));
            }
            if norm(&other_identity) == identity {
                return Err(taken("identity", &identity));
            }
        }
    }
    Ok(())
}

pub(crate) fn name_taken(
    conn: &Db,
    table: &'static str,
    op: &'static str,
    name: &str,
) -> Result<bool, StoreError> {
    conn.query_row(
        &format!("SELECT 1 FROM {table} WHERE name = ?1"),
        [name],
        |_| Ok(()),
    )
    .optional()
    .map(|found| found.is_some())
    .map_err(sql(op))
}

/// What a committed change means for the links.
#[derive(Debug, Clone)]
pub enum Notice {
    /// A location's config moved from `base_version` to `version`.
    Location(Arc<Change>),
    /// Gateways or Edges were added, changed or removed: the links to dial
    /// are to be read again.
    Links,
}

/// One step of a location's config.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub location_id: u32,
    pub base_version: u64,
    pub version: u64,
    pub kind: ChangeKind,
}

/// What changed.
#[derive(Debug, Clone, PartialEq)]
pub enum ChangeKind {
    /// Only peers: these added or replaced, these removed (public keys).
    Peers {
        upsert: Vec<PeerSpec>,
        remove: Vec<Key>,
    },
    /// The interface or the MFA settings: the whole config is to be sent.
    Config,
}

/// Where the store is: an SQLite file, for a single Core, or a PostgreSQL
/// database (`postgres://` or `postgresql://`), which several Cores share.
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite(PathBuf),
    Postgres(String),
}

/// A `database` setting that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("database {shown}: {problem}")]
pub struct DatabaseError {
    shown: String,
    problem: String,
}

impl FromStr for Database {
    type Err = DatabaseError;

    fn from_str(text: &str) -> Result<Self, DatabaseError> {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            postgres::Config::from_str(text).map_err(|e| DatabaseError {
                shown: redact(text),
                problem: e.to_string(),
            })?;
            return Ok(Self::Postgres(text.to_owned()));
        }
        if text.contains("://") {
            return Err(DatabaseError {
                shown: redact(text),
                problem: "not a file path, and the only URLs taken are postgres:// and \
                          postgresql://"
                    .into(),
            });
        }
        if text.is_empty() {
            return Err(DatabaseError {
                shown: "\"\"".into(),
                problem: "empty: a file path or a postgres:// URL".into(),
            });
        }
        Ok(Self::Sqlite(PathBuf::from(text)))
    }
}

impl From<PathBuf> for Database {
    fn from(path: PathBuf) -> Self {
        Self::Sqlite(path)
    }
}

impl From<&Path> for Database {
    fn from(path: &Path) -> Self {
        Self::Sqlite(path.to_owned())
    }
}

/// A URL with its password, if any, replaced by `***`.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host}{tail}"),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

impl fmt::Display for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => write!(f, "{}", path.display()),
            Self::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            Self::Postgres(url) => f.debug_tuple("Postgres").field(&redact(url)).finish(),
        }
    }
}

/// The store: the database and the MFA logins in progress.
#[derive(Debug)]
pub struct Store {
    conn: Db,
    database: Database,
    /// SQLite: held (flock) for as long as the store is open.
    _lock: Option<fs::File>,
    challenges: Challenges,
    /// Wrong MFA codes by client address.
    sources: Sources,
    mfa: MfaSettings,
    notices: Vec<Notice>,
    /// The next end of an MFA session by its age, once read (see
    /// [`Store::next_session_end`]); `None`: to be read again.
    session_ends_known: Option<Option<i64>>,
}

/// Waits this long for a lock held by a reader before failing a write.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Waits this long for PostgreSQL to accept a connection, unless the URL
/// says otherwise (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection to PostgreSQL whose data goes unacknowledged this long is
/// given up (TCP_USER_TIMEOUT), unless the URL says otherwise: a network
/// cut fails the store's statement instead of holding every job behind it
/// for the kernel's whole retransmission time.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(5);
/// Client addresses whose wrong MFA codes are remembered, at most.
const SOURCES_KEPT: usize = 100_000;
/// Events kept in the log; older ones are pruned.
pub const EVENTS_KEPT: i64 = 100_000;
/// The PostgreSQL advisory lock every write transaction takes first, so
/// that writes from any Core are serialized as SQLite's are.
const WRITE_LOCK: i64 = 0x7469_6465_6761_7465; // "tidegate"

impl Store {
    /// Opens (creating if missing) the database and brings its schema up
    /// to date. A second Core on the same SQLite file is refused.
    pub fn open(database: &Database, mfa: MfaSettings) -> Result<Self, StoreError> {
        let (conn, lock) = match database {
            Database::Sqlite(path) => {
                let (conn, lock) = open_sqlite(path)?;
                (conn, Some(lock))
            }
            Database::Postgres(url) => (open_postgres(database, url)?, None),
        };
        Ok(Self {
            conn,
            database: database.clone(),
            _lock: lock,
            challenges: Challenges::default(),
            sources: Sources::new(mfa.source, SOURCES_KEPT),
            mfa,
            notices: Vec::new(),
            session_ends_known: None,
        })
    }

    /// Where the database is.
    pub fn database(&self) -> &Database {
        &self.database
    }

    /// From now on, every write needs this Core to hold the lease (on
    /// PostgreSQL; a Core alone on SQLite always writes).
    pub fn fence(&mut self, fence: db::Fence) {
        if let Db::Postgres(pg) = &mut self.conn {
            pg.fence(fence);
        }
    }

    /// Whether this Core may write now: it leads, or it is alone.
    pub fn may_write(&self) -> bool {
        match &self.conn {
            Db::Sqlite(_) => true,
            Db::Postgres(pg) => pg.may_write(),
        }
    }

    /// Forgets what it read of the database that other Cores may have
    /// changed meanwhile (a Core that starts to lead).
    pub fn forget_cached(&mut self) {
        self.session_ends_known = None;
    }

    /// Every Core sharing the database, as each last wrote its roster line
    /// (see [`crate::leader::roster`]), by name; none on SQLite.
    pub fn roster(&self) -> Result<Vec<tidegate_proto::admin::v1::CoreNode>, StoreError> {
        if self.conn.backend() == Backend::Sqlite {
            return Ok(Vec::new());
        }
        let stale_ms = crate::leader::roster::STALE.as_millis() as i64;
        let count = |row: &db::Row, i: usize| row.get::<_, i64>(i).map(|v| v as u32);
        self.conn
            .prepare(
                "SELECT core_id, leads, term, \
                 CAST(extract(epoch FROM seen_at) * 1000 AS BIGINT), \
                 gateways_connected, gateways, edges_connected, edges FROM core_roster \
                 WHERE seen_at > clock_timestamp() - CAST(?1 AS BIGINT) * interval '1 millisecond' \
                 ORDER BY core_id",
            )
            .and_then(|mut s| {
                s.query_map([stale_ms], |row| {
                    Ok(tidegate_proto::admin::v1::CoreNode {
                        core_id: row.get(0)?,
                        leading: row.get(1)?,
                        term: row.get::<_, i64>(2)? as u64,
                        seen_unix_ms: row.get(3)?,
                        gateways_connected: count(row, 4)?,
                        gateways: count(row, 5)?,
                        edges_connected: count(row, 6)?,
                        edges: count(row, 7)?,
                    })
                })
            })
            .map_err(sql("reading the roster"))?
            .collect::<Result<_, _>>()
            .map_err(sql("reading the roster"))
    }

    /// Which kind of database the store is on.
    pub fn backend(&self) -> Backend {
        self.conn.backend()
    }

    /// Takes the notices of the changes committed since the last call.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// A location's whole config for its gateways, at its current version;
    /// `None` once the location is gone.
    pub fn location_config(
        &self,
        location_id: u32,
    ) -> Result<Option<tidegate_proto::gateway::v1::LocationConfig>, StoreError> {
        render::location_config(&self.conn, location_id)
    }

    /// Checks the database's integrity: SQLite's `PRAGMA integrity_check`;
    /// PostgreSQL checks its own pages, so there a round trip is asked.
    pub fn integrity_check(&self) -> Result<(), StoreError> {
        let result: String = match self.conn.backend() {
            Backend::Sqlite => self
                .conn
                .query_row("PRAGMA integrity_check", [], |row| row.get(0))
                .map_err(sql("checking integrity"))?,
            Backend::Postgres => self
                .conn
                .query_row("SELECT 'ok'::text", [], |row| row.get(0))
                .map_err(sql("reaching the database"))?,
        };
        if result == "ok" {
            Ok(())
        } else {
            Err(StoreError::InUse(format!(
                "the database fails its integrity check: {result}"
            )))
        }
    }
}

/// Opens the SQLite file, holding its lock file.
fn open_sqlite(path: &Path) -> Result<(Db, fs::File), StoreError> {
    let lock_path = path.with_extension("lock");
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|source| StoreError::Io {
            op: "opening the lock file",
            path: lock_path.clone(),
            source,
        })?;
    // SAFETY: flock on a file descriptor we own and keep open.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(StoreError::Locked {
            path: path.to_owned(),
        });
    }
    let open_err = |source: rusqlite::Error| StoreError::Open {
        database: Database::Sqlite(path.to_owned()),
        source: source.into(),
    };
    let mut conn = rusqlite::Connection::open(path).map_err(open_err)?;
    // The database holds keys and TOTP secrets: root only.
    set_private(path)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(open_err)?;
    // FULL: a committed change survives a power cut, not only a crash.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .map_err(open_err)?;
    schema::migrate(&mut conn)?;
    Ok((Db::Sqlite(conn), lock))
}

/// Connects to PostgreSQL and brings the schema up to date.
fn open_postgres(database: &Database, url: &str) -> Result<Db, StoreError> {
    let db = connect_postgres(database, url)?;
    schema::migrate_postgres(&db)?;
    Ok(db)
}

/// Connects to PostgreSQL.
fn connect_postgres(database: &Database, url: &str) -> Result<Db, StoreError> {
    let open_err = |source: postgres::Error| StoreError::Open {
        database: database.clone(),
        source: source.into(),
    };
    let mut config = postgres::Config::from_str(url).map_err(open_err)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    config.application_name("tidegate-core");
    let pg = db::Pg::connect(config).map_err(open_err)?;
    Ok(Db::Postgres(Box::new(pg)))
}

/// Starts a tracked transaction; on PostgreSQL it first takes the write
/// lock, so that it sees every change committed before it.
pub(crate) fn begin(conn: &mut Db) -> Result<Tx<'_>, StoreError> {
    let tx = db::Transaction::begin(conn, WRITE_LOCK).map_err(|e| match e {
        DbError::Fenced(message) => StoreError::NotLeader(message),
        other => sql("starting a transaction")(other),
    })?;
    Ok(Tx {
        tx,
        before: BTreeMap::new(),
        full: BTreeSet::new(),
        links: false,
    })
}

fn set_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| StoreError::Io {
        op: "making private",
        path: path.to_owned(),
        source,
    })
}

/// A transaction that tracks what it does to the peers of each location.
///
/// Call [`Tx::touch`] on a device before changing it (and after creating
/// one, with [`Tx::touch_new`]); [`Tx::commit`] then compares each touched
/// device's peer before and after, bumps the version of every location
/// whose peers or settings changed, and returns the notices.
pub(crate) struct Tx<'c> {
    pub(crate) tx: db::Transaction<'c>,
    /// Device id -> its peer (and location) before the change.
    before: BTreeMap<i64, Option<(u32, PeerSpec)>>,
    /// Locations whose whole config changed.
    full: BTreeSet<u32>,
    /// Whether gateways or Edges changed.
    links: bool,
}

impl std::ops::Deref for Tx<'_> {
    type Target = Db;

    fn deref(&self) -> &Db {
        &self.tx
    }
}

impl Tx<'_> {
    /// Records the device's peer before it changes.
    pub(crate) fn touch(&mut self, device_id: i64) -> Result<(), StoreError> {
        if !self.before.contains_key(&device_id) {
            let peer = render::device_peer(&self.tx, device_id)?;
            self.before.insert(device_id, peer);
        }
        Ok(())
    }

    /// Records that a device was just created (it had no peer).
    pub(crate) fn touch_new(&mut self, device_id: i64) {
        self.before.insert(device_id, None);
    }

    /// Touches every device of a location.
    pub(crate) fn touch_location_devices(&mut self, location_id: u32) -> Result<(), StoreError> {
        for id in ids(
            &self.tx,
            "SELECT id FROM devices WHERE location_id = ?1",
            location_id,
        )? {
            self.touch(id)?;
        }
        Ok(())
    }

    /// Touches every device of a user.
    pub(crate) fn touch_user_devices(&mut self, user_id: i64) -> Result<(), StoreError> {
        for id in ids(
            &self.tx,
            "SELECT id FROM devices WHERE user_id = ?1",
            user_id,
        )? {
            self.touch(id)?;
        }
        Ok(())
    }

    /// The location's whole config changed.
    pub(crate) fn full(&mut self, location_id: u32) {
        self.full.insert(location_id);
    }

    /// The set of links to dial changed.
    pub(crate) fn links(&mut self) {
        self.links = true;
    }

    /// Commits, returning the notices of what changed.
    pub(crate) fn commit(mut self) -> Result<Vec<Notice>, StoreError> {
        // Peer differences per location.
        let mut diffs: BTreeMap<u32, (BTreeMap<Key, PeerSpec>, BTreeSet<Key>)> = BTreeMap::new();
        let before = std::mem::take(&mut self.before);
        for (device, old) in before {
            let new = render::device_peer(&self.tx, device)?;
            if old == new {
                continue;
            }
            if let Some((location, peer)) = &old {
                let same_key_kept = new
                    .as_ref()
                    .is_some_and(|(l, p)| l == location && p.public_key == peer.public_key);
                if !same_key_kept {
                    diffs
                        .entry(*location)
                        .or_default()
                        .1
                        .insert(peer.public_key);
                }
            }
            if let Some((location, peer)) = new {
                let diff = diffs.entry(location).or_default();
                diff.1.remove(&peer.public_key);
                diff.0.insert(peer.public_key, peer);
            }
        }
        let mut notices = Vec::new();
        let locations: BTreeSet<u32> = diffs
            .keys()
            .copied()
            .chain(self.full.iter().copied())
            .collect();
        for location in locations {
            let base: Option<i64> = self
                .tx
                .query_row(
                    "UPDATE locations SET version = version + 1 WHERE id = ?1 RETURNING version - 1",
                    [location],
                    |row| row.get(0),
                )
                .optional()
                .map_err(sql("bumping the config version"))?;
            // A deleted location has no version left to announce.
            let Some(base) = base else { continue };
            let base = base as u64;
            let kind = if self.full.contains(&location) {
                ChangeKind::Config
            } else {
                let (upsert, remove) = diffs.remove(&location).unwrap_or_default();
                ChangeKind::Peers {
                    upsert: upsert.into_values().collect(),
                    remove: remove.into_iter().collect(),
                }
            };
            notices.push(Notice::Location(Arc::new(Change {
                location_id: location,
                base_version: base,
                version: base + 1,
                kind,
            })));
        }
        if self.links {
            notices.push(Notice::Links);
        }
        self.tx.commit().map_err(sql("committing"))?;
        Ok(notices)
    }
}

/// The ids a one-parameter query returns.
fn ids(conn: &Db, query: &str, param: impl db::ToValue) -> Result<Vec<i64>, StoreError> {
    let mut stmt = conn.prepare_cached(query).map_err(sql("listing ids"))?;
    let rows = stmt
        .query_map(params![param], |row| row.get(0))
        .map_err(sql("listing ids"))?;
    rows.collect::<Result<_, _>>().map_err(sql("listing ids"))
}

/// A JSON array of strings, as list columns hold them.
pub(crate) fn to_json(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

/// A list column back into strings.
pub(crate) fn from_json(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A fresh store: an SQLite file in a temporary directory or, with
    /// `TIDEGATE_TEST_STORE=postgres`, a new database on the PostgreSQL
    /// server `TIDEGATE_TEST_POSTGRES` names (`cargo xtask test` runs the
    /// store's tests both ways, on a throwaway cluster).
    pub(crate) fn store() -> (tempfile::TempDir, Store) {
        match std::env::var("TIDEGATE_TEST_STORE").as_deref() {
            Err(_) | Ok("sqlite") => sqlite_store(),
            Ok("postgres") => {
                let database = Database::Postgres(postgres_database());
                let store = Store::open(&database, MfaSettings::default()).unwrap();
                (tempfile::tempdir().unwrap(), store)
            }
            Ok(other) => panic!("TIDEGATE_TEST_STORE={other}: sqlite or postgres"),
        }
    }

    /// A store in a new SQLite file, whatever `TIDEGATE_TEST_STORE` says.
    pub(crate) fn sqlite_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let database = Database::Sqlite(dir.path().join("core.db"));
        let store = Store::open(&database, MfaSettings::default()).unwrap();
        (dir, store)
    }

    /// A new, empty database on the test server, as a URL.
    pub(crate) fn postgres_database() -> String {
        let server = std::env::var("TIDEGATE_TEST_POSTGRES").expect(
            "TIDEGATE_TEST_POSTGRES names no PostgreSQL server: `cargo xtask test` starts one",
        );
        let mut client = postgres::Client::connect(&server, postgres::NoTls).unwrap();
        let mut name = [0u8; 8];
        getrandom::getrandom(&mut name).unwrap();
        let name = format!("store_{}", data_encoding::HEXLOWER.encode(&name));
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        with_dbname(&server, &name)
    }

    /// `url` with its database replaced by `name`.
    fn with_dbname(url: &str, name: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap();
        let start = rest.find('/').unwrap_or(rest.len());
        let end = rest.find('?').unwrap_or(rest.len()).max(start);
        format!("{scheme}://{}/{name}{}", &rest[..start], &rest[end..])
    }

    /// An MFA login of the device with `key` at `location`, by its user,
    /// at `at_ms` (with that time's right code).
    pub(crate) fn login(store: &mut Store, location: &str, key: Key, at_ms: i64) -> FinishedLogin {
        let challenge = store
            .mfa_start(location, &key.to_base64(), "192.0.2.1", at_ms)
            .unwrap();
        let secret: Vec<u8> = store
            .conn
            .query_row(
                "SELECT u.totp_secret FROM users u JOIN devices d ON d.user_id = u.id \
                 WHERE d.public_key = ?1",
                [key.as_bytes().as_slice()],
                |r| r.get(0),
            )
            .unwrap();
        let code = crate::totp::code_at(&secret, crate::totp::step_at(at_ms / 1000));
        store
            .mfa_finish(&challenge.session, &code, "192.0.2.1", at_ms)
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_core_on_the_same_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let database = Database::Sqlite(dir.path().join("core.db"));
        let store = Store::open(&database, MfaSettings::default()).unwrap();
        let err = Store::open(store.database(), MfaSettings::default()).unwrap_err();
        assert!(matches!(err, StoreError::Locked { .. }), "{err}");
        drop(store);
        Store::open(&database, MfaSettings::default()).unwrap();
    }

    #[test]
    fn database_settings_are_a_path_or_a_postgres_url_and_passwords_are_never_shown() {
        assert_eq!(
            "/var/lib/tidegate/core.db".parse::<Database>().unwrap(),
            Database::Sqlite("/var/lib/tidegate/core.db".into())
        );
        let url = "postgres://core:s3cret@db.example.org:5432/tidegate?connect_timeout=2";
        let database: Database = url.parse().unwrap();
        assert_eq!(database, Database::Postgres(url.into()));
        for shown in [database.to_string(), format!("{database:?}")] {
            assert!(!shown.contains("s3cret"), "{shown}");
            assert!(
                shown.contains("core:***@db.example.org:5432/tidegate"),
                "{shown}"
            );
        }
        for (bad, says) in [
            ("", "empty"),
            ("mysql://db/tidegate", "the only URLs taken are postgres://"),
            ("postgres://core:s3cret@db/x?sslmode=bogus", "sslmode"),
        ] {
            let err = bad.parse::<Database>().unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn database_is_wal_and_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("core.db");
        let store = Store::open(&path.clone().into(), MfaSettings::default()).unwrap();
        let mode: String = store
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let perms = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(perms & 0o777, 0o600);
        store.integrity_check().unwrap();
    }
}
