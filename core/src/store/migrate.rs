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
    target.execute_batch(end).map_err(sql("ending the copy"))?;
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
            .prepare(&format!(
                "SELECT name FROM pragma_table_info('{table}') ORDER BY cid"
            ))
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

#[cfg(test)]
mod tests {
    use tidegate_proto::admin::v1 as admin;

    use super::*;
    use crate::{
        keys::Key,
        store::{
            EventKind, MfaSettings,
            devices::tests::{device, setup_on},
            testing,
        },
    };

    const NOW: i64 = 1_700_000_000_000;

    /// Everything an operator can see of a store, and each location's
    /// config as its gateways get it.
    fn everything(store: &Store) -> String {
        let mut seen = format!(
            "{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n",
            store.list_locations().unwrap(),
            store.list_devices("", "").unwrap(),
            store.list_gateways("").unwrap(),
            store.list_edges().unwrap(),
            store.list_events("", 100).unwrap(),
        );
        for location in store.list_locations().unwrap() {
            let id = store.location_id(&location.name).unwrap();
            seen.push_str(&format!("{:?}\n", store.location_config(id).unwrap()));
        }
        seen
    }

    #[test]
    #[ignore = "needs PostgreSQL: `cargo xtask test` runs it on its cluster"]
    fn a_sqlite_store_is_copied_whole_into_an_empty_database_and_never_into_another() {
        let (dir, mut source) = setup_on(testing::sqlite_store(), true);
        let key = Key::new([1; 32]);
        source.create_device(device("laptop", key), 0).unwrap();
        source
            .create_device(device("phone", Key::new([2; 32])), 0)
            .unwrap();
        testing::login(&mut source, "ams", key, NOW);
        source
            .create_gateway(
                admin::CreateGatewayRequest {
                    name: "gw-1".into(),
                    location: "ams".into(),
                    address: "198.51.100.2:50051".into(),
                    ..Default::default()
                },
                1,
            )
            .unwrap();
        source
            .create_edge(
                admin::CreateEdgeRequest {
                    name: "edge-1".into(),
                    address: "203.0.113.5:50052".into(),
                    ..Default::default()
                },
                2,
            )
            .unwrap();
        source
            .create_download_token(
                admin::CreateDownloadTokenRequest {
                    device: "phone".into(),
                    ttl_s: None,
                },
                NOW,
            )
            .unwrap();
        source
            .log_event(EventKind::Failover, "ams", "gw-1", "took over", 3)
            .unwrap();
        source.delete_device("phone").unwrap();
        let before = everything(&source);
        let from = source.database().clone();
        drop(source);

        let to = Database::Postgres(testing::postgres_database());
        let copied = copy_to_postgres(&from, &to).unwrap();
        let rows: Vec<u64> = copied.tables.iter().map(|(_, n)| *n).collect();
        // locations, gateways, users, devices, addresses, sessions, tokens
        // (the phone's went with it), edges, events (the login's and the
        // failover's).
        assert_eq!(rows, [1, 1, 1, 1, 2, 1, 0, 1, 2], "{copied:?}");

        let mut target = Store::open(&to, MfaSettings::default()).unwrap();
        // The laptop's MFA session came along: it is still a peer in its
        // location's config.
        assert_eq!(everything(&target), before);
        assert!(before.contains("public_key"), "{before}");
        // New rows take ids after the copied ones.
        target
            .create_device(device("tablet", Key::new([3; 32])), 4)
            .unwrap();
        target
            .log_event(EventKind::Failover, "ams", "gw-1", "again", 5)
            .unwrap();
        drop(target);

        // A database that holds anything is refused, and left as it was.
        let err = copy_to_postgres(&from, &to).unwrap_err().to_string();
        assert!(
            err.contains(
                "is not empty (it has the tables core_leader, core_roster, device_addresses,"
            ),
            "{err}"
        );
        let target = Store::open(&to, MfaSettings::default()).unwrap();
        assert_eq!(target.list_devices("", "").unwrap().len(), 2);
        drop(dir);
    }
}
