//! Gateways (per location: where Core dials them and the identity their
//! certificate must carry) and what the link supervisor dials.

use super::db::{Db, OptionalExtension as _, Row, params};
use tidegate_proto::admin::v1 as admin;

use super::{Store, StoreError, begin, db, locations, sql, validate};

/// A gateway Core keeps a link to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GatewayTarget {
    pub name: String,
    pub location_id: u32,
    pub location: String,
    pub address: String,
    pub identity: String,
}

/// An Edge Core keeps a link to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EdgeTarget {
    pub name: String,
    pub address: String,
    pub identity: String,
}

const SELECT: &str = "SELECT g.name, l.name, g.address, g.identity, g.enabled, g.created_ms, g.id, g.location_id \
     FROM gateways g JOIN locations l ON l.id = g.location_id";

fn from_row(row: &Row) -> db::Result<(admin::Gateway, i64, u32)> {
    Ok((
        admin::Gateway {
            name: row.get(0)?,
            location: row.get(1)?,
            address: row.get(2)?,
            identity: row.get(3)?,
            enabled: row.get(4)?,
            created_unix_ms: row.get(5)?,
        },
        row.get(6)?,
        row.get(7)?,
    ))
}

fn by_name(conn: &Db, name: &str) -> Result<(admin::Gateway, i64, u32), StoreError> {
    conn.query_row(&format!("{SELECT} WHERE g.name = ?1"), [name], from_row)
        .optional()
        .map_err(sql("reading a gateway"))?
        .ok_or_else(|| StoreError::not_found("gateway", name))
}

fn name_taken(conn: &Db, name: &str) -> Result<bool, StoreError> {
    super::name_taken(conn, "gateways", "looking up a gateway", name)
}

impl Store {
    pub fn create_gateway(
        &mut self,
        req: admin::CreateGatewayRequest,
        now_ms: i64,
    ) -> Result<admin::Gateway, StoreError> {
        let name = validate::name("name", &req.name)?;
        let address = validate::dial_address("address", req.address.trim())?;
        let identity = validate::identity_or_name(&req.identity, &name)?;
        let mut tx = begin(&mut self.conn)?;
        let location = locations::by_name(&tx, &req.location)?;
        if name_taken(&tx, &name)? {
            return Err(StoreError::Exists {
                kind: "gateway",
                name,
            });
        }
        super::identity_free(&tx, None, &name, &identity)?;
        tx.execute(
            "INSERT INTO gateways (name, location_id, address, identity, enabled, created_ms) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                name,
                location.id,
                address,
                identity,
                req.enabled.unwrap_or(true),
                now_ms
            ],
        )
        .map_err(sql("storing a gateway"))?;
        tx.links();
        let (view, ..) = by_name(&tx, &name)?;
        self.notices.extend(tx.commit()?);
        Ok(view)
    }

    /// Gateways, of one location or all, by name.
    pub fn list_gateways(&self, location: &str) -> Result<Vec<admin::Gateway>, StoreError> {
        let location_id = if location.is_empty() {
            None
        } else {
            Some(locations::by_name(&self.conn, location)?.id)
        };
        let mut stmt = self
            .conn
            .prepare(&format!(
                "{SELECT} WHERE CAST(?1 AS BIGINT) IS NULL OR g.location_id = ?1 ORDER BY g.name"
            ))
            .map_err(sql("listing gateways"))?;
        let rows = stmt
            .query_map([location_id], from_row)
            .map_err(sql("listing gateways"))?;
        rows.map(|row| row.map(|(view, ..)| view))
            .collect::<Result<_, _>>()
            .map_err(sql("listing gateways"))
    }

    pub fn gateway(&self, name: &str) -> Result<admin::Gateway, StoreError> {
        Ok(by_name(&self.conn, name)?.0)
    }

    pub fn update_gateway(
        &mut self,
        req: admin::UpdateGatewayRequest,
    ) -> Result<admin::Gateway, StoreError> {
        let mut tx = begin(&mut self.conn)?;
        let (old, id, mut location_id) = by_name(&tx, &req.name)?;
        let mut new = old.clone();
        if let Some(name) = req.rename {
            new.name = validate::name("rename", &name)?;
            if new.name != old.name && name_taken(&tx, &new.name)? {
                return Err(StoreError::Exists {
                    kind: "gateway",
                    name: new.name,
                });
            }
        }
        if let Some(location) = req.location {
            location_id = locations::by_name(&tx, &location)?.id;
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
        super::identity_free(&tx, Some(("gateway", id)), &new.name, &new.identity)?;
        tx.execute(
            "UPDATE gateways SET name = ?2, location_id = ?3, address = ?4, identity = ?5, enabled = ?6 \
             WHERE id = ?1",
            params![id, new.name, location_id, new.address, new.identity, new.enabled],
        )
        .map_err(sql("updating a gateway"))?;
        tx.links();
        let (view, ..) = by_name(&tx, &new.name)?;
        self.notices.extend(tx.commit()?);
        Ok(view)
    }

    pub fn delete_gateway(&mut self, name: &str) -> Result<(), StoreError> {
        let mut tx = begin(&mut self.conn)?;
        let (_, id, _) = by_name(&tx, name)?;
        tx.execute("DELETE FROM gateways WHERE id = ?1", [id])
            .map_err(sql("deleting a gateway"))?;
        tx.links();
        self.notices.extend(tx.commit()?);
        Ok(())
    }

    /// The enabled gateways and Edges, which Core keeps links to.
    pub fn link_targets(&self) -> Result<(Vec<GatewayTarget>, Vec<EdgeTarget>), StoreError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT g.name, g.location_id, l.name, g.address, g.identity FROM gateways g \
                 JOIN locations l ON l.id = g.location_id WHERE g.enabled ORDER BY g.name",
            )
            .map_err(sql("listing gateways"))?;
        let gateways = stmt
            .query_map([], |row| {
                Ok(GatewayTarget {
                    name: row.get(0)?,
                    location_id: row.get(1)?,
                    location: row.get(2)?,
                    address: row.get(3)?,
                    identity: row.get(4)?,
                })
            })
            .map_err(sql("listing gateways"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("listing gateways"))?;
        let mut stmt = self
            .conn
            .prepare("SELECT name, address, identity FROM edges WHERE enabled ORDER BY name")
            .map_err(sql("listing Edges"))?;
        let edges = stmt
            .query_map([], |row| {
                Ok(EdgeTarget {
                    name: row.get(0)?,
                    address: row.get(1)?,
                    identity: row.get(2)?,
                })
            })
            .map_err(sql("listing Edges"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("listing Edges"))?;
        Ok((gateways, edges))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Notice, locations::tests::request, testing};

    fn gateway(name: &str, location: &str) -> admin::CreateGatewayRequest {
        admin::CreateGatewayRequest {
            name: name.into(),
            location: location.into(),
            address: "198.51.100.2:50051".into(),
            ..Default::default()
        }
    }

    #[test]
    fn gateways_and_edges_share_one_namespace_without_cores_identity() {
        let (_dir, mut store) = testing::store();
        store.create_location(request("ams"), 0).unwrap();
        let edge = |name: &str, identity: &str| admin::CreateEdgeRequest {
            name: name.into(),
            identity: identity.into(),
            address: "203.0.113.5:50052".into(),
            ..Default::default()
        };
        let message = |e: StoreError| e.to_string();
        // Core's identity, in any case, as a name or an identity.
        for (name, identity) in [
            ("core", ""),
            ("Core", ""),
            ("gw-x", "CORE"),
            ("gw-y", "core."),
        ] {
            let err = store
                .create_gateway(
                    admin::CreateGatewayRequest {
                        identity: identity.into(),
                        ..gateway(name, "ams")
                    },
                    5,
                )
                .unwrap_err();
            assert!(
                message(err).contains("Core's identity"),
                "{name} {identity}"
            );
            let err = store.create_edge(edge(name, identity), 5).unwrap_err();
            assert!(
                message(err).contains("Core's identity"),
                "{name} {identity}"
            );
        }
        store.create_gateway(gateway("gw-a", "ams"), 5).unwrap();
        // An Edge with the gateway's name, in another case.
        let err = store.create_edge(edge("GW-A", "edge-1"), 5).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::IdentityTaken {
                    what: "name",
                    kind: "gateway",
                    ..
                }
            ),
            "{err}"
        );
        assert!(message(err).contains("\"gw-a\""));
        // An Edge claiming the gateway's identity under another name.
        let err = store.create_edge(edge("edge-1", "Gw-A"), 5).unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::IdentityTaken {
                    what: "identity",
                    kind: "gateway",
                    ..
                }
            ),
            "{err}"
        );
        // A second gateway whose identity is the first one's.
        let err = store
            .create_gateway(
                admin::CreateGatewayRequest {
                    identity: "gw-a".into(),
                    ..gateway("gw-b", "ams")
                },
                5,
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::IdentityTaken {
                    what: "identity",
                    ..
                }
            ),
            "{err}"
        );
        store.create_edge(edge("edge-1", ""), 5).unwrap();
        // Updates are held to the same rules; a row does not clash with itself.
        let err = store
            .update_gateway(admin::UpdateGatewayRequest {
                name: "gw-a".into(),
                identity: Some("EDGE-1".into()),
                ..Default::default()
            })
            .unwrap_err();
        assert!(
            matches!(err, StoreError::IdentityTaken { kind: "Edge", .. }),
            "{err}"
        );
        let err = store
            .update_edge(admin::UpdateEdgeRequest {
                name: "edge-1".into(),
                identity: Some("core".into()),
                ..Default::default()
            })
            .unwrap_err();
        assert!(message(err).contains("Core's identity"));
        store
            .update_gateway(admin::UpdateGatewayRequest {
                name: "gw-a".into(),
                identity: Some("gw-a".into()),
                enabled: Some(false),
                ..Default::default()
            })
            .unwrap();
    }

    #[test]
    fn gateways_are_dialled_while_enabled() {
        let (_dir, mut store) = testing::store();
        store.create_location(request("ams"), 0).unwrap();
        let gw = store.create_gateway(gateway("gw-a", "ams"), 5).unwrap();
        assert_eq!(gw.identity, "gw-a");
        assert!(gw.enabled);
        assert!(matches!(store.take_notices().as_slice(), [Notice::Links]));
        store
            .create_gateway(
                admin::CreateGatewayRequest {
                    identity: "gw-b.example.org".into(),
                    enabled: Some(false),
                    ..gateway("gw-b", "ams")
                },
                5,
            )
            .unwrap();
        let (targets, edges) = store.link_targets().unwrap();
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].identity, "gw-a");
        assert!(edges.is_empty());
        store
            .update_gateway(admin::UpdateGatewayRequest {
                name: "gw-b".into(),
                enabled: Some(true),
                address: Some("[2001:db8::2]:50051".into()),
                ..Default::default()
            })
            .unwrap();
        let (targets, _) = store.link_targets().unwrap();
        assert_eq!(targets[1].identity, "gw-b.example.org");
        assert_eq!(targets[1].address, "[2001:db8::2]:50051");
        assert_eq!(store.list_gateways("ams").unwrap().len(), 2);
        assert_eq!(store.list_gateways("").unwrap().len(), 2);
        assert!(store.list_gateways("nowhere").is_err());
        let err = store.delete_location("ams").unwrap_err();
        assert!(err.to_string().contains("2 gateways"), "{err}");
        store.delete_gateway("gw-a").unwrap();
        store.delete_gateway("gw-b").unwrap();
        store.delete_location("ams").unwrap();
    }

    #[test]
    fn bad_gateways_are_refused() {
        let (_dir, mut store) = testing::store();
        store.create_location(request("ams"), 0).unwrap();
        for (req, says) in [
            (gateway("gw a", "ams"), "name"),
            (gateway("gw-a", "nowhere"), "no location"),
            (
                admin::CreateGatewayRequest {
                    address: "198.51.100.2".into(),
                    ..gateway("gw-a", "ams")
                },
                "address",
            ),
            (
                admin::CreateGatewayRequest {
                    identity: "not a name".into(),
                    ..gateway("gw-a", "ams")
                },
                "identity",
            ),
        ] {
            let err = store.create_gateway(req, 0).unwrap_err();
            assert!(err.to_string().contains(says), "{says}: {err}");
        }
        store.create_gateway(gateway("gw-a", "ams"), 0).unwrap();
        assert!(matches!(
            store.create_gateway(gateway("gw-a", "ams"), 0),
            Err(StoreError::Exists { .. })
        ));
        assert_eq!(store.list_gateways("").unwrap().len(), 1);
    }
}
