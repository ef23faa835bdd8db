//! `tidegate-core migrate`: a SQLite store copied whole into an empty
//! PostgreSQL database, in one transaction, ids kept.

use super::{
    Database, Store, StoreError,
    db::{Db, Value},
    schema::TABLES,
    sql,
};

/// Rows copied, by table, in copy order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub tables: Vec<(&'static str, u64)>,
}

/// Copies the SQLite store `from` into the PostgreSQL database `to`,
/// which must hold no table yet. Either every row arrives, checked by
/// count, or nothing does. `from` is opened as Core opens it (its lock is
/// held, so a running Core is refused, and its schema brought up to date
/// first).
pub fn copy_to_postgres(from: &Database, to: &Database) -> Result<Copied, StoreError> {
    let Database::Sqlite(_) = from else {
        return Err(StoreError::invalid(
            "from",
            format!("{from} is not an SQLite file: migrate copies SQLite into PostgreSQL"),
        ));
    };
    let Database::Postgres(url) = to else {
        return Err(StoreError::invalid(
            "to",
            format!("{to} is not a postgres:// URL"),
        ));
    };
    let source = Store::open(from, Default::default())?;
    let target = super::connect_postgres(to, url)?;
    refuse_unless_empty(&target, to)?;
    target
        .execute_batch("BEGIN")
        .map_err(sql("starting the copy"))?;
    let result = copy(&source.conn, &target);
    let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
    target
        .execute_batch(end)
        .map_err(sql("ending the copy"))?;
    result
}

/// A target with any table in it is refused: the copy never merges.
fn refuse_unless_empty(target: &Db, to: &Database) -> Result<(), StoreError> {
    let tables: Vec<String> = target
        .prepare(
            "SELECT tablename::text FROM pg_catalog.pg_tables \
             WHERE schemaname = current_schema() ORDER BY tablename",
        )
        .and_then(|mut s| s.query_map([], |row| row.get(0)))
        .map_err(sql("listing the target's tables"))?
        .collect::<Result<_, _>>()
        .map_err(sql("listing the target's tables"))?;
    if tables.is_empty() {
        return Ok(());
    }
    Err(StoreError::InUse(format!(
        "{to} is not empty (it has the tables {}): migrate copies into an empty database only",
        tables.join(", ")
    )))
}

fn copy(source: &Db, target: &Db) -> Result<Copied, StoreError> {
    super::schema::migrate_postgres_in(target)?;
    let mut copied = Vec::new();
    for &table in TABLES {
        let columns: Vec<String> = source
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}') ORDER BY cid"))
            .and_then(|mut s| s.query_map([], |row| row.get(0)))
            .map_err(sql("reading the source's columns"))?
            .collect::<Result<_, _>>()
            .map_err(sql("reading the source's columns"))?;
        let list = columns.join(", ");
        let marks: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
        let insert = format!("INSERT INTO {table} ({list}) VALUES ({})", marks.join(", "));
        let rows = source
            .rows(&format!("SELECT {list} FROM {table} ORDER BY rowid"), [])
            .map_err(sql("reading the source"))?;
        for row in &rows {
            let values: Vec<Value> = row.clone().into_values();
            target
                .execute(&insert, values)
                .map_err(sql("writing the target"))?;
        }
        let count: i64 = target
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
                row.get(0)
            })
            .map_err(sql("counting the copy"))?;
        if count != rows.len() as i64 {
            return Err(StoreError::InUse(format!(
                "{table}: {} rows read, {count} written",
                rows.len()
            )));
        }
        if columns.first().is_some_and(|c| c == "id") {
            // New rows continue after the copied ids.
            target
                .execute(
                    &format!(
                        "SELECT setval(pg_get_serial_sequence('{table}', 'id'), \
                         COALESCE(max(id), 0) + 1, false) FROM {table}"
                    ),
                    [],
                )
                .map_err(sql("moving the id sequence past the copied ids"))?;
        }
        copied.push((table, rows.len() as u64));
    }
    Ok(Copied { tables: copied })
}
