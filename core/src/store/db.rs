//! The store's two databases behind one small API: SQLite (rusqlite) for a
//! single Core, PostgreSQL (the `postgres` crate, tokio-postgres's blocking
//! client) for several Cores sharing one database.
//!
//! Statements are written once, in the SQL both speak, with `?N`
//! parameters; for PostgreSQL they are rewritten to `$N` once and kept
//! prepared. Values cross as [`Value`]: integers, text, blobs and NULL,
//! the four kinds the schema uses (booleans are integers 0 and 1, as
//! SQLite stores them; PostgreSQL's columns are `BIGINT`).
//!
//! One thread owns the store (see [`crate::state`]), so one connection
//! serves it: its jobs run one at a time.

use std::{
    cell::{Cell, RefCell},
    collections::HashMap,
    error::Error as StdError,
    fmt,
};

use bytes::BytesMut;
use postgres::types::{IsNull, ToSql as PgToSql, Type};
use tokio::sync::watch;

use crate::leader::Leadership;

/// A failed statement, or a column that did not hold what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Postgres(#[from] postgres::Error),
    /// A statement meant to return one row returned none.
    #[error("no row")]
    NoRow,
    #[error("column {column}: {message}")]
    Column { column: usize, message: String },
    /// A write on PostgreSQL by a Core that does not hold the lease.
    #[error("{0}")]
    Fenced(String),
}

impl DbError {
    /// A column's value could not be read as the type asked for.
    pub fn column(column: usize, message: impl fmt::Display) -> Self {
        Self::Column {
            column,
            message: message.to_string(),
        }
    }
}

pub type Result<T, E = DbError> = std::result::Result<T, E>;

/// One value of a parameter or a column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Integer(i64),
    Text(String),
    Blob(Vec<u8>),
}

/// A Rust value a statement takes as a parameter.
pub trait ToValue {
    fn to_value(&self) -> Value;
}

/// A Rust value a column is read into.
pub trait FromValue: Sized {
    /// `Err` says what the value was instead.
    fn from_value(value: &Value) -> Result<Self, String>;
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Self::Null => "NULL",
            Self::Integer(_) => "an integer",
            Self::Text(_) => "text",
            Self::Blob(_) => "a blob",
        }
    }
}

impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}

impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}

impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToValue::to_value)
    }
}

macro_rules! integer_values {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Integer(i64::from(*self))
            }
        }
        impl FromValue for $t {
            fn from_value(value: &Value) -> Result<Self, String> {
                match value {
                    Value::Integer(v) => <$t>::try_from(*v)
                        .map_err(|_| format!("{v} is out of range for {}", stringify!($t))),
                    other => Err(format!("{} where an integer was expected", other.kind())),
                }
            }
        }
    )*};
}
integer_values!(i64, i32, u32, u16, u8);

impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Integer(i64::from(*self))
    }
}

impl FromValue for bool {
    fn from_value(value: &Value) -> Result<Self, String> {
        i64::from_value(value).map(|v| v != 0)
    }
}

impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}

impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl FromValue for String {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Text(text) => Ok(text.clone()),
            other => Err(format!("{} where text was expected", other.kind())),
        }
    }
}

impl ToValue for [u8] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}

impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}

impl FromValue for Vec<u8> {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Blob(bytes) => Ok(bytes.clone()),
            other => Err(format!("{} where a blob was expected", other.kind())),
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Null => Ok(None),
            other => T::from_value(other).map(Some),
        }
    }
}

impl FromValue for Value {
    fn from_value(value: &Value) -> Result<Self, String> {
        Ok(value.clone())
    }
}

/// A statement's parameters: `[a]`, `[]` or `params![a, b]`.
pub trait Params {
    fn values(&self) -> Vec<Value>;
}

impl Params for [&dyn ToValue; 0] {
    fn values(&self) -> Vec<Value> {
        Vec::new()
    }
}

impl Params for &[&dyn ToValue] {
    fn values(&self) -> Vec<Value> {
        self.iter().map(|v| v.to_value()).collect()
    }
}

impl Params for Vec<Value> {
    fn values(&self) -> Vec<Value> {
        self.clone()
    }
}

macro_rules! array_params {
    ($($n:literal),*) => {$(
        impl<T: ToValue> Params for [T; $n] {
            fn values(&self) -> Vec<Value> {
                self.iter().map(ToValue::to_value).collect()
            }
        }
    )*};
}
array_params!(1, 2, 3, 4);

/// Parameters of different types, as rusqlite's `params!`.
macro_rules! params {
    ($($p:expr),* $(,)?) => {
        &[$(&$p as &dyn $crate::store::db::ToValue),*] as &[&dyn $crate::store::db::ToValue]
    };
}
pub(crate) use params;

/// Which column of a row.
pub trait RowIndex {
    fn index(&self) -> usize;
}

impl RowIndex for usize {
    fn index(&self) -> usize {
        *self
    }
}

/// One row a query returned.
#[derive(Debug, Clone)]
pub struct Row {
    values: Vec<Value>,
}

impl Row {
    /// Column `idx`, as `T`.
    pub fn get<I: RowIndex, T: FromValue>(&self, idx: I) -> Result<T> {
        let column = idx.index();
        let value = self
            .values
            .get(column)
            .ok_or_else(|| DbError::column(column, "no such column"))?;
        T::from_value(value).map_err(|message| DbError::column(column, message))
    }

    /// Every column.
    pub fn into_values(self) -> Vec<Value> {
        self.values
    }
}

/// `.optional()` on a one-row result: no row is `None`.
pub trait OptionalExtension<T> {
    fn optional(self) -> Result<Option<T>>;
}

impl<T> OptionalExtension<T> for Result<T> {
    fn optional(self) -> Result<Option<T>> {
        match self {
            Ok(value) => Ok(Some(value)),
            Err(DbError::NoRow) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Which database a store is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A connection to either database.
pub enum Db {
    Sqlite(rusqlite::Connection),
    Postgres(Box<Pg>),
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Sqlite(_) => f.write_str("Db::Sqlite"),
            Self::Postgres(pg) => f.debug_tuple("Db::Postgres").field(pg).finish(),
        }
    }
}

/// A PostgreSQL connection and its prepared statements. A connection
/// found closed (the server restarted, the network failed) is made again
/// for the next statement outside a transaction, which is then tried once
/// more; inside a transaction the statement fails, and with it the
/// transaction.
pub struct Pg {
    config: postgres::Config,
    client: RefCell<postgres::Client>,
    /// Between BEGIN and COMMIT or ROLLBACK.
    in_transaction: Cell<bool>,
    statements: RefCell<HashMap<String, postgres::Statement>>,
    /// Once set, every write transaction first checks that this Core
    /// holds the lease at the term it leads at.
    fence: Option<Fence>,
}

/// Which Core writes, and its leadership as the lease task publishes it.
#[derive(Debug, Clone)]
pub struct Fence {
    pub core_id: String,
    pub leadership: watch::Receiver<Leadership>,
}

impl Fence {
    /// Fails unless this Core leads and the lease row, locked against a
    /// takeover until the transaction ends, says so too.
    fn check(&self, db: &Db) -> Result<()> {
        let lead = self.leadership.borrow().clone();
        if !lead.leading {
            let leader = lead
                .leader
                .map_or_else(|| "no Core leads now".to_owned(), |l| format!("{l} leads"));
            return Err(DbError::Fenced(format!(
                "this Core ({}) is a standby: {leader} (term {}); send changes to the leader",
                self.core_id, lead.term
            )));
        }
        let held = db
            .query_row(
                "SELECT term FROM core_leader WHERE id = 1 AND holder = ?1 AND term = ?2 \
                 AND expires_at > clock_timestamp() FOR SHARE",
                params![self.core_id, lead.term as i64],
                |row| row.get::<_, i64>(0),
            )
            .optional()?;
        match held {
            Some(_) => Ok(()),
            None => Err(DbError::Fenced(format!(
                "this Core ({}) no longer holds the lease at term {}: another Core leads",
                self.core_id, lead.term
            ))),
        }
    }
}

impl fmt::Debug for Pg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pg")
            .field("statements", &self.statements.borrow().len())
            .finish_non_exhaustive()
    }
}

impl Pg {
    /// Connects as `config` says.
    pub fn connect(config: postgres::Config) -> Result<Self, postgres::Error> {
        let client = config.connect(postgres::NoTls)?;
        Ok(Self {
            config,
            client: RefCell::new(client),
            in_transaction: Cell::new(false),
            statements: RefCell::default(),
            fence: None,
        })
    }

    /// Runs `op`; on a closed connection outside a transaction, connects
    /// again and runs it once more.
    fn retrying<T>(&self, op: impl Fn() -> Result<T, postgres::Error>) -> Result<T> {
        match op() {
            Err(e) if e.is_closed() && !self.in_transaction.get() => {
                let client = self.config.connect(postgres::NoTls)?;
                *self.client.borrow_mut() = client;
                self.statements.borrow_mut().clear();
                Ok(op()?)
            }
            other => Ok(other?),
        }
    }

    /// Whether writes may be tried: no fence, or the lease task says this
    /// Core leads.
    pub fn may_write(&self) -> bool {
        self.fence
            .as_ref()
            .is_none_or(|f| f.leadership.borrow().leading)
    }

    /// From now on, writes need the lease (see [`Fence`]).
    pub fn fence(&mut self, fence: Fence) {
        self.fence = Some(fence);
    }

    fn statement(&self, sql: &str) -> Result<postgres::Statement, postgres::Error> {
        if let Some(statement) = self.statements.borrow().get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.borrow_mut().prepare(&dollar_params(sql))?;
        self.statements
            .borrow_mut()
            .insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    fn query(&self, sql: &str, values: &[Value]) -> Result<Vec<Row>> {
        let params: Vec<&(dyn PgToSql + Sync)> =
            values.iter().map(|v| v as &(dyn PgToSql + Sync)).collect();
        let rows = self.retrying(|| {
            let statement = self.statement(sql)?;
            self.client.borrow_mut().query(&statement, &params)
        })?;
        rows.iter().map(pg_row).collect()
    }

    fn execute(&self, sql: &str, values: &[Value]) -> Result<usize> {
        let params: Vec<&(dyn PgToSql + Sync)> =
            values.iter().map(|v| v as &(dyn PgToSql + Sync)).collect();
        let count = self.retrying(|| {
            let statement = self.statement(sql)?;
            self.client.borrow_mut().execute(&statement, &params)
        })?;
        Ok(count as usize)
    }

    /// Runs statements without parameters (a schema, BEGIN, COMMIT).
    pub fn batch(&self, sql: &str) -> Result<()> {
        let result = self.retrying(|| self.client.borrow_mut().batch_execute(sql));
        match sql {
            "BEGIN" => self.in_transaction.set(result.is_ok()),
            "COMMIT" | "ROLLBACK" => self.in_transaction.set(false),
            _ => {}
        }
        result
    }
}

impl Db {
    pub fn backend(&self) -> Backend {
        match self {
            Self::Sqlite(_) => Backend::Sqlite,
            Self::Postgres(_) => Backend::Postgres,
        }
    }

    /// Runs a statement, returning how many rows it changed.
    pub fn execute<P: Params>(&self, sql: &str, params: P) -> Result<usize> {
        let values = params.values();
        match self {
            Self::Sqlite(conn) => Ok(conn
                .prepare_cached(sql)?
                .execute(rusqlite::params_from_iter(values.iter()))?),
            Self::Postgres(pg) => pg.execute(sql, &values),
        }
    }

    /// Runs statements without parameters.
    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        match self {
            Self::Sqlite(conn) => Ok(conn.execute_batch(sql)?),
            Self::Postgres(pg) => pg.batch(sql),
        }
    }

    /// Every row of a query.
    pub fn rows<P: Params>(&self, sql: &str, params: P) -> Result<Vec<Row>> {
        let values = params.values();
        match self {
            Self::Sqlite(conn) => {
                let mut statement = conn.prepare_cached(sql)?;
                let columns = statement.column_count();
                let mut rows = statement.query(rusqlite::params_from_iter(values.iter()))?;
                let mut out = Vec::new();
                while let Some(row) = rows.next()? {
                    out.push(sqlite_row(row, columns)?);
                }
                Ok(out)
            }
            Self::Postgres(pg) => pg.query(sql, &values),
        }
    }

    /// The first row of a query through `f`; [`DbError::NoRow`] if none.
    pub fn query_row<T, P, F>(&self, sql: &str, params: P, f: F) -> Result<T>
    where
        P: Params,
        F: FnOnce(&Row) -> Result<T>,
    {
        let rows = self.rows(sql, params)?;
        f(rows.first().ok_or(DbError::NoRow)?)
    }

    /// A statement to run with [`Statement::query_map`].
    pub fn prepare(&self, sql: &str) -> Result<Statement<'_>> {
        Ok(Statement {
            db: self,
            sql: sql.to_owned(),
        })
    }

    /// As [`Db::prepare`]: statements are always kept prepared.
    pub fn prepare_cached(&self, sql: &str) -> Result<Statement<'_>> {
        self.prepare(sql)
    }
}

/// A transaction: [`Transaction::commit`] commits it; dropped otherwise,
/// it is rolled back.
#[derive(Debug)]
pub struct Transaction<'d> {
    db: &'d Db,
    done: bool,
}

impl<'d> Transaction<'d> {
    /// Begins a write transaction. SQLite: `BEGIN IMMEDIATE`, which takes
    /// the file's write lock. PostgreSQL: `BEGIN`, then the advisory lock
    /// `lock`, held until the end of the transaction: writers of every
    /// Core sharing the database take their turns, as on SQLite.
    pub fn begin(db: &'d mut Db, lock: i64) -> Result<Self> {
        let tx = Self { db, done: false };
        match tx.db {
            Db::Sqlite(conn) => conn.execute_batch("BEGIN IMMEDIATE")?,
            Db::Postgres(pg) => {
                pg.batch("BEGIN")?;
                tx.db.execute("SELECT pg_advisory_xact_lock(?1)", [lock])?;
                if let Some(fence) = &pg.fence {
                    fence.check(tx.db)?;
                }
            }
        }
        Ok(tx)
    }

    /// Commits; if that fails, the transaction is rolled back on drop.
    pub fn commit(mut self) -> Result<()> {
        self.db.execute_batch("COMMIT")?;
        self.done = true;
        Ok(())
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done {
            // A connection that is gone has no transaction left to end.
            let _ = self.db.execute_batch("ROLLBACK");
        }
    }
}

impl std::ops::Deref for Transaction<'_> {
    type Target = Db;

    fn deref(&self) -> &Db {
        self.db
    }
}

/// A statement and its connection.
#[derive(Debug)]
pub struct Statement<'d> {
    db: &'d Db,
    sql: String,
}

impl Statement<'_> {
    /// Every row through `f`.
    pub fn query_map<T, P, F>(
        &mut self,
        params: P,
        mut f: F,
    ) -> Result<std::vec::IntoIter<Result<T>>>
    where
        P: Params,
        F: FnMut(&Row) -> Result<T>,
    {
        let rows = self.db.rows(&self.sql, params)?;
        Ok(rows.iter().map(&mut f).collect::<Vec<_>>().into_iter())
    }

    /// The first row through `f`; [`DbError::NoRow`] if none.
    pub fn query_row<T, P, F>(&mut self, params: P, f: F) -> Result<T>
    where
        P: Params,
        F: FnOnce(&Row) -> Result<T>,
    {
        self.db.query_row(&self.sql, params, f)
    }
}

fn sqlite_row(row: &rusqlite::Row<'_>, columns: usize) -> Result<Row> {
    use rusqlite::types::ValueRef;
    let mut values = Vec::with_capacity(columns);
    for column in 0..columns {
        values.push(match row.get_ref(column)? {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(v) => Value::Integer(v),
            ValueRef::Text(text) => Value::Text(
                String::from_utf8(text.to_vec()).map_err(|e| DbError::column(column, e))?,
            ),
            ValueRef::Blob(bytes) => Value::Blob(bytes.to_vec()),
            ValueRef::Real(v) => return Err(DbError::column(column, format!("a real ({v})"))),
        });
    }
    Ok(Row { values })
}

fn pg_row(row: &postgres::Row) -> Result<Row> {
    let mut values = Vec::with_capacity(row.len());
    for (column, info) in row.columns().iter().enumerate() {
        let get_err = |e: postgres::Error| DbError::column(column, e);
        let ty = info.type_();
        let value = if *ty == Type::INT8 {
            row.try_get::<_, Option<i64>>(column)
                .map_err(get_err)?
                .map(Value::Integer)
        } else if *ty == Type::INT4 {
            row.try_get::<_, Option<i32>>(column)
                .map_err(get_err)?
                .map(|v| Value::Integer(v.into()))
        } else if *ty == Type::INT2 {
            row.try_get::<_, Option<i16>>(column)
                .map_err(get_err)?
                .map(|v| Value::Integer(v.into()))
        } else if *ty == Type::BOOL {
            row.try_get::<_, Option<bool>>(column)
                .map_err(get_err)?
                .map(|v| Value::Integer(v.into()))
        } else if *ty == Type::BYTEA {
            row.try_get::<_, Option<Vec<u8>>>(column)
                .map_err(get_err)?
                .map(Value::Blob)
        } else if [Type::TEXT, Type::VARCHAR, Type::NAME, Type::BPCHAR].contains(ty) {
            row.try_get::<_, Option<String>>(column)
                .map_err(get_err)?
                .map(Value::Text)
        } else {
            return Err(DbError::column(
                column,
                format!("type {ty} is not one the store reads (cast it to bigint, text or bytea)"),
            ));
        };
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(Row { values })
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Self::Null => ValueRef::Null,
            Self::Integer(v) => ValueRef::Integer(*v),
            Self::Text(text) => ValueRef::Text(text.as_bytes()),
            Self::Blob(bytes) => ValueRef::Blob(bytes),
        }))
    }
}

impl PgToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match self {
            Self::Null => Ok(IsNull::Yes),
            Self::Integer(v) if *ty == Type::INT8 => v.to_sql(ty, out),
            Self::Integer(v) if *ty == Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
            Self::Integer(v) if *ty == Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
            Self::Integer(v) if *ty == Type::BOOL => (*v != 0).to_sql(ty, out),
            Self::Integer(_) => Err(format!("an integer for a parameter of type {ty}").into()),
            Self::Text(text) => text.to_sql(ty, out),
            Self::Blob(bytes) => bytes.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

/// `?N` (and a bare `?`, numbered in order) as PostgreSQL's `$N`; string
/// literals and quoted identifiers are left alone.
pub fn dollar_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut chars = sql.chars().peekable();
    let mut quote: Option<char> = None;
    let mut next = 1;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => {
                quote = None;
                out.push(c);
            }
            (Some(_), c) => out.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                out.push(c);
            }
            (None, '?') => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().copied().filter(char::is_ascii_digit) {
                    digits.push(d);
                    chars.next();
                }
                if digits.is_empty() {
                    digits = next.to_string();
                    next += 1;
                }
                out.push('$');
                out.push_str(&digits);
            }
            (None, c) => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_marks_become_dollars_outside_quotes() {
        for (sql, want) in [
            (
                "SELECT 1 WHERE a = ?1 AND b = ?12",
                "SELECT 1 WHERE a = $1 AND b = $12",
            ),
            ("VALUES (?, ?, ?)", "VALUES ($1, $2, $3)"),
            (
                "SELECT '?1', \"a?\" WHERE x = ?2",
                "SELECT '?1', \"a?\" WHERE x = $2",
            ),
            ("SELECT 'it''s ?' , ?3", "SELECT 'it''s ?' , $3"),
            ("no parameters", "no parameters"),
        ] {
            assert_eq!(dollar_params(sql), want, "{sql}");
        }
    }

    #[test]
    fn values_read_back_as_asked_or_say_what_they_were() {
        let row = Row {
            values: vec![
                Value::Integer(7),
                Value::Null,
                Value::Text("ams".into()),
                Value::Integer(-1),
                Value::Blob(vec![1, 2]),
            ],
        };
        assert_eq!(row.get::<_, u32>(0).unwrap(), 7);
        assert!(row.get::<_, bool>(0).unwrap());
        assert_eq!(row.get::<_, Option<i64>>(1).unwrap(), None);
        assert_eq!(row.get::<_, String>(2).unwrap(), "ams");
        assert_eq!(row.get::<_, Vec<u8>>(4).unwrap(), vec![1, 2]);
        let err = row.get::<_, u32>(3).unwrap_err().to_string();
        assert_eq!(err, "column 3: -1 is out of range for u32");
        let err = row.get::<_, String>(0).unwrap_err().to_string();
        assert_eq!(err, "column 0: an integer where text was expected");
        let err = row.get::<_, i64>(9).unwrap_err().to_string();
        assert_eq!(err, "column 9: no such column");
    }
}
