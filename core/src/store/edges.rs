//! Edges Core dials: where, and the identity their certificate must carry.

use super::db::{Db, OptionalExtension as _, Row, params};
use tidegate_proto::admin::v1 as admin;

use super::{Store, StoreError, begin, db, sql, validate};

const SELECT: &str = "SELECT name, address, identity, enabled, created_ms, id FROM edges";

fn from_row(row: &Row) -> db::Result<(admin::Edge, i64)> {
    Ok((
        admin::Edge {
            name: row.get(0)?,
            address: row.get(1)?,
            identity: row.get(2)?,
            enabled: row.get(3)?,
            created_unix_ms: row.get(4)?,
            ..Default::default()
        },
        row.get(5)?,
    ))
}

fn by_name(conn: &Db, name: &str) -> Result<(admin::Edge, i64), StoreError> {
    conn.query_row(&format!("{SELECT} WHERE name = ?1"), [name], from_row)
        .optional()
        .map_err(sql("reading an Edge"))?
        .ok_or_else(|| StoreError::not_found("Edge", name))
}

fn name_taken(conn: &Db, name: &str) -> Result<bool, StoreError> {
    super::name_taken(conn, "edges", "looking up an Edge", name)
}

impl Store {
    pub fn create_edge(
        &mut self,
        req: admin::CreateEdgeRequest,
        now_ms: i64,
    ) -> Result<admin::Edge, StoreError> {
        let name = validate::name("name", &req.name)?;
        let address = validate::dial_address("address", req.address.trim())?;
        let identity = validate::identity_or_name(&req.identity, &name)?;
        let mut tx = begin(&mut self.conn)?;
        if name_taken(&tx, &name)? {
            return Err(StoreError::Exists { kind: "Edge", name });
        }
        super::identity_free(&tx, None, &name, &identity)?;
        tx.execute(
            "INSERT INTO edges (name, address, identity, enabled, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, address, identity, req.enabled.unwrap_or(true), now_ms],
        )
        .map_err(sql("storing an Edge"))?;
        tx.links();
        let (view, _) = by_name(&tx, &name)?;
        self.notices.extend(tx.commit()?);
        Ok(view)
    }

    pub fn list_edges(&self) -> Result<Vec<admin::Edge>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("{SELECT} ORDER BY name"))
            .map_err(sql("listing Edges"))?;
        let rows = stmt.query_map([], from_row).map_err(sql("listing Edges"))?;
        rows.map(|row| row.map(|(view, _)| view))
            .collect::<Result<_, _>>()
            .map_err(sql("listing Edges"))
    }

    pub fn edge(&self, name: &str) -> Result<admin::Edge, StoreError> {
        Ok(by_name(&self.conn, name)?.0)
    }

    pub fn update_edge(
        &mut self,
        req: admin::UpdateEdgeRequest,
    ) -> Result<admin::Edge, StoreError> {
        let mut tx = begin(&mut self.conn)?;
        let (old, id) = by_name(&tx, &req.name)?;
        let mut new = old.clone();
        if let Some(name) = req.rename {
            new.name = validate::name("rename", &name)?;
            if new.name != old.name && name_taken(&tx, &new.name)? {
                return Err(StoreError::Exists {
                    kind: "Edge",
                    name: new.name,
                });
            }
        }
        if let Some(address) = req.address {
            new.address = validate::dial_address("address", address.trim())?;
        }
        if let Some(identity) = req.identity {
            new.identity = validate::identity("identity", &identity)?;
        }
        if let Some(enabled) = req.enabled {
            new.enabled = enabled;
        }
        super::identity_free(&tx, Some(("Edge", id)), &new.name, &new.identity)?;
        tx.execute(
            "UPDATE edges SET name = ?2, address = ?3, identity = ?4, enabled = ?5 WHERE id = ?1",
            params![id, new.name, new.address, new.identity, new.enabled],
        )
        .map_err(sql("updating an Edge"))?;
        tx.links();
        let (view, _) = by_name(&tx, &new.name)?;
        self.notices.extend(tx.commit()?);
        Ok(view)
    }

    pub fn delete_edge(&mut self, name: &str) -> Result<(), StoreError> {
        let mut tx = begin(&mut self.conn)?;
        let (_, id) = by_name(&tx, name)?;
        tx.execute("DELETE FROM edges WHERE id = ?1", [id])
            .map_err(sql("deleting an Edge"))?;
        tx.links();
        self.notices.extend(tx.commit()?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing;

    #[test]
    fn edges_crud() {
        let (_dir, mut store) = testing::store();
        let edge = store
            .create_edge(
                admin::CreateEdgeRequest {
                    name: "edge-1".into(),
                    address: "203.0.113.5:50052".into(),
                    ..Default::default()
                },
                7,
            )
            .unwrap();
        assert_eq!(edge.identity, "edge-1");
        assert!(
            store
                .create_edge(
                    admin::CreateEdgeRequest {
                        name: "edge-2".into(),
                        address: "nowhere".into(),
                        ..Default::default()
                    },
                    7,
                )
                .unwrap_err()
                .to_string()
                .starts_with("address: ")
        );
        store
            .update_edge(admin::UpdateEdgeRequest {
                name: "edge-1".into(),
                enabled: Some(false),
                ..Default::default()
            })
            .unwrap();
        assert!(store.link_targets().unwrap().1.is_empty());
        assert_eq!(store.list_edges().unwrap().len(), 1);
        store.delete_edge("edge-1").unwrap();
        assert!(store.edge("edge-1").is_err());
    }
}
