//! Locations: the WireGuard interface every gateway of the location runs,
//! what devices get in their config, and the MFA settings.

use super::db::{Db, OptionalExtension as _, Row, params};
use ipnet::IpNet;
use tidegate_proto::admin::v1 as admin;

use super::{Store, StoreError, begin, db, from_json, sql, to_json, validate};
use crate::keys::Key;

/// The default WireGuard listen port.
pub const DEFAULT_LISTEN_PORT: u32 = 51820;
/// The default MFA peer-disconnect threshold.
pub const DEFAULT_THRESHOLD_S: u32 = 300;
/// The default keepalive devices are told to send.
pub const DEFAULT_KEEPALIVE_S: u32 = 25;

/// A location as stored.
#[derive(Debug, Clone)]
pub(crate) struct LocationRow {
    pub id: u32,
    pub name: String,
    pub addresses: Vec<String>,
    pub listen_port: u32,
    pub vips: Vec<String>,
    pub endpoint: String,
    pub allowed_ips: Vec<String>,
    pub dns: Vec<String>,
    pub mtu: u32,
    pub mfa: bool,
    pub threshold_s: u32,
    pub keepalive_s: u32,
    /// MFA sessions end this long after their login; 0: only when idle.
    pub mfa_session_s: u32,
    pub private_key: Key,
    pub version: u64,
    pub created_ms: i64,
}

const COLUMNS: &str = "id, name, addresses, listen_port, vips, endpoint, allowed_ips, dns, mtu, \
    mfa, peer_disconnect_threshold_s, persistent_keepalive_s, private_key, version, created_ms, \
    mfa_session_s";

impl LocationRow {
    fn from_row(row: &Row) -> db::Result<Self> {
        let key: Vec<u8> = row.get(12)?;
        Ok(Self {
            id: row.get(0)?,
            name: row.get(1)?,
            addresses: from_json(&row.get::<_, String>(2)?),
            listen_port: row.get(3)?,
            vips: from_json(&row.get::<_, String>(4)?),
            endpoint: row.get(5)?,
            allowed_ips: from_json(&row.get::<_, String>(6)?),
            dns: from_json(&row.get::<_, String>(7)?),
            mtu: row.get(8)?,
            mfa: row.get(9)?,
            threshold_s: row.get(10)?,
            keepalive_s: row.get(11)?,
            private_key: Key::from_slice(&key).map_err(|e| db::DbError::column(12, e))?,
            version: row.get::<_, i64>(13)? as u64,
            created_ms: row.get(14)?,
            mfa_session_s: row.get(15)?,
        })
    }

    /// The interface networks, as checked when stored.
    pub fn nets(&self) -> Vec<IpNet> {
        self.addresses
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect()
    }

    /// Checks every field together.
    fn check(&self) -> Result<(), StoreError> {
        validate::name("name", &self.name)?;
        let nets = validate::interface_addresses(&self.addresses)?;
        validate::port("listen_port", self.listen_port)?;
        validate::ips("vips", &self.vips)?;
        validate::endpoint("endpoint", &self.endpoint)?;
        if self.vips.is_empty() && self.endpoint.is_empty() {
            return Err(StoreError::invalid(
                "endpoint",
                "a location needs VIPs or an endpoint: devices must know where to connect",
            ));
        }
        validate::networks("allowed_ips", &self.allowed_ips)?;
        validate::ips("dns", &self.dns)?;
        validate::mtu(self.mtu, &nets)?;
        validate::threshold(self.threshold_s)?;
        validate::keepalive(self.keepalive_s)?;
        validate::mfa_session(self.mfa_session_s)?;
        Ok(())
    }

    /// What the gateways see: a change here means a full config.
    fn gateway_view(&self) -> impl PartialEq + use<> {
        (
            self.name.clone(),
            self.addresses.clone(),
            self.listen_port,
            self.mtu,
            self.mfa,
            self.threshold_s,
            self.private_key,
        )
    }
}

/// Reads a location by name.
pub(crate) fn by_name(conn: &Db, name: &str) -> Result<LocationRow, StoreError> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM locations WHERE name = ?1"),
        [name],
        LocationRow::from_row,
    )
    .optional()
    .map_err(sql("reading a location"))?
    .ok_or_else(|| StoreError::not_found("location", name))
}

/// Reads a location by id.
pub(crate) fn by_id(conn: &Db, id: u32) -> Result<Option<LocationRow>, StoreError> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM locations WHERE id = ?1"),
        [id],
        LocationRow::from_row,
    )
    .optional()
    .map_err(sql("reading a location"))
}

fn view(conn: &Db, row: &LocationRow) -> Result<admin::Location, StoreError> {
    let count = |table: &str| -> Result<u32, StoreError> {
        conn.query_row(
            &format!("SELECT count(*) FROM {table} WHERE location_id = ?1"),
            [row.id],
            |r| r.get(0),
        )
        .map_err(sql("counting"))
    };
    Ok(admin::Location {
        id: row.id,
        name: row.name.clone(),
        addresses: row.addresses.clone(),
        listen_port: row.listen_port,
        vips: row.vips.clone(),
        endpoint: row.endpoint.clone(),
        allowed_ips: row.allowed_ips.clone(),
        dns: row.dns.clone(),
        mtu: row.mtu,
        mfa: row.mfa,
        peer_disconnect_threshold_s: row.threshold_s,
        persistent_keepalive_s: row.keepalive_s,
        public_key: row.private_key.public().to_base64(),
        version: row.version,
        gateways: count("gateways")?,
        devices: count("devices")?,
        created_unix_ms: row.created_ms,
        mfa_session_s: row.mfa_session_s,
    })
}

fn exists(conn: &Db, name: &str) -> Result<bool, StoreError> {
    conn.query_row(
        "SELECT 1 FROM locations WHERE name = ?1",
        [name],
        |_| Ok(()),
    )
    .optional()
    .map(|found| found.is_some())
    .map_err(sql("looking up a location"))
}

impl Store {
    pub fn create_location(
        &mut self,
        req: admin::CreateLocationRequest,
        now_ms: i64,
    ) -> Result<admin::Location, StoreError> {
        let private_key = if req.private_key.is_empty() {
            Key::generate_private()
        } else {
            validate::key("private_key", &req.private_key)?
        };
        let mut row = LocationRow {
            id: 0,
            name: req.name,
            addresses: req.addresses.iter().map(|a| a.trim().to_owned()).collect(),
            listen_port: req.listen_port.unwrap_or(DEFAULT_LISTEN_PORT),
            vips: req.vips,
            endpoint: req.endpoint,
            allowed_ips: Vec::new(),
            dns: req.dns,
            mtu: req.mtu,
            mfa: req.mfa,
            threshold_s: req
                .peer_disconnect_threshold_s
                .unwrap_or(DEFAULT_THRESHOLD_S),
            keepalive_s: req.persistent_keepalive_s.unwrap_or(DEFAULT_KEEPALIVE_S),
            mfa_session_s: req.mfa_session_s,
            private_key,
            version: 1,
            created_ms: now_ms,
        };
        row.check()?;
        row.allowed_ips = validate::networks("allowed_ips", &req.allowed_ips)?;
        row.vips = validate::ips("vips", &row.vips)?;
        row.dns = validate::ips("dns", &row.dns)?;
        let tx = begin(&mut self.conn)?;
        if exists(&tx, &row.name)? {
            return Err(StoreError::Exists {
                kind: "location",
                name: row.name,
            });
        }
        let id: i64 = tx.query_row(
            "INSERT INTO locations (name, addresses, listen_port, vips, endpoint, allowed_ips, dns, \
             mtu, mfa, peer_disconnect_threshold_s, persistent_keepalive_s, private_key, version, \
             created_ms, mfa_session_s) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15) RETURNING id",
            params![
                row.name,
                to_json(&row.addresses),
                row.listen_port,
                to_json(&row.vips),
                row.endpoint,
                to_json(&row.allowed_ips),
                to_json(&row.dns),
                row.mtu,
                row.mfa,
                row.threshold_s,
                row.keepalive_s,
                row.private_key.as_bytes().as_slice(),
                row.version as i64,
                row.created_ms,
                row.mfa_session_s,
            ],
            |r| r.get(0),
        )
        .map_err(sql("storing a location"))?;
        row.id = u32::try_from(id)
            .map_err(|_| StoreError::InUse("location ids are exhausted".into()))?;
        let view = view(&tx, &row)?;
        self.notices.extend(tx.commit()?);
        Ok(view)
    }

    pub fn list_locations(&self) -> Result<Vec<admin::Location>, StoreError> {
        let mut stmt = self
            .conn
            .prepare(&format!("SELECT {COLUMNS} FROM locations ORDER BY name"))
            .map_err(sql("listing locations"))?;
        let rows = stmt
            .query_map([], LocationRow::from_row)
            .map_err(sql("listing locations"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("listing locations"))?;
        rows.iter().map(|row| view(&self.conn, row)).collect()
    }

    pub fn location(&self, name: &str) -> Result<admin::Location, StoreError> {
        view(&self.conn, &by_name(&self.conn, name)?)
    }

    /// The id of a location.
    pub fn location_id(&self, name: &str) -> Result<u32, StoreError> {
        Ok(by_name(&self.conn, name)?.id)
    }

    pub fn update_location(
        &mut self,
        req: admin::UpdateLocationRequest,
    ) -> Result<admin::Location, StoreError> {
        let mut tx = begin(&mut self.conn)?;
        let old = by_name(&tx, &req.name)?;
        let mut row = old.clone();
        if let Some(name) = req.rename {
            row.name = name;
        }
        if let Some(list) = req.addresses {
            row.addresses = list.values.iter().map(|a| a.trim().to_owned()).collect();
        }
        if let Some(port) = req.listen_port {
            row.listen_port = port;
        }
        if let Some(list) = req.vips {
            row.vips = list.values;
        }
        if let Some(endpoint) = req.endpoint {
            row.endpoint = endpoint;
        }
        if let Some(list) = req.allowed_ips {
            row.allowed_ips = list.values;
        }
        if let Some(list) = req.dns {
            row.dns = list.values;
        }
        if let Some(mtu) = req.mtu {
            row.mtu = mtu;
        }
        if let Some(mfa) = req.mfa {
            row.mfa = mfa;
        }
        if let Some(secs) = req.peer_disconnect_threshold_s {
            row.threshold_s = secs;
        }
        if let Some(secs) = req.persistent_keepalive_s {
            row.keepalive_s = secs;
        }
        if let Some(secs) = req.mfa_session_s {
            row.mfa_session_s = secs;
        }
        match (req.private_key, req.rotate_key) {
            (Some(_), true) => {
                return Err(StoreError::invalid(
                    "private_key",
                    "give a key or ask for a new one, not both",
                ));
            }
            (Some(key), false) => row.private_key = validate::key("private_key", &key)?,
            (None, true) => row.private_key = Key::generate_private(),
            (None, false) => {}
        }
        row.check()?;
        row.allowed_ips = validate::networks("allowed_ips", &row.allowed_ips)?;
        row.vips = validate::ips("vips", &row.vips)?;
        row.dns = validate::ips("dns", &row.dns)?;
        if row.name != old.name && exists(&tx, &row.name)? {
            return Err(StoreError::Exists {
                kind: "location",
                name: row.name,
            });
        }
        if row.addresses != old.addresses {
            // Every device address must still be a host of the new networks.
            let nets = row.nets();
            let mut stmt = tx
                .prepare(
                    "SELECT d.name, a.address FROM device_addresses a JOIN devices d ON d.id = a.device_id \
                     WHERE a.location_id = ?1",
                )
                .map_err(sql("reading device addresses"))?;
            let addresses = stmt
                .query_map([row.id], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
                })
                .map_err(sql("reading device addresses"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql("reading device addresses"))?;
            drop(stmt);
            for (device, address) in addresses {
                validate::device_address(&address, &nets).map_err(|e| {
                    StoreError::invalid(
                        "addresses",
                        format!("device {device:?} would be left outside: {e}"),
                    )
                })?;
            }
        }
        if row.mfa != old.mfa {
            tx.touch_location_devices(row.id)?;
            if !row.mfa {
                tx.execute(
                    "DELETE FROM mfa_sessions WHERE device_id IN (SELECT id FROM devices WHERE location_id = ?1)",
                    [row.id],
                )
                .map_err(sql("ending MFA sessions"))?;
            }
        }
        tx.execute(
            "UPDATE locations SET name = ?2, addresses = ?3, listen_port = ?4, vips = ?5, endpoint = ?6, \
             allowed_ips = ?7, dns = ?8, mtu = ?9, mfa = ?10, peer_disconnect_threshold_s = ?11, \
             persistent_keepalive_s = ?12, private_key = ?13, mfa_session_s = ?14 WHERE id = ?1",
            params![
                row.id,
                row.name,
                to_json(&row.addresses),
                row.listen_port,
                to_json(&row.vips),
                row.endpoint,
                to_json(&row.allowed_ips),
                to_json(&row.dns),
                row.mtu,
                row.mfa,
                row.threshold_s,
                row.keepalive_s,
                row.private_key.as_bytes().as_slice(),
                row.mfa_session_s,
            ],
        )
        .map_err(sql("updating a location"))?;
        if row.gateway_view() != old.gateway_view() {
            tx.full(row.id);
        }
        self.notices.extend(tx.commit()?);
        if row.mfa_session_s != old.mfa_session_s {
            self.session_ends_known = None;
        }
        self.location(&row.name)
    }

    /// Deletes a location that has no gateways and no devices left.
    pub fn delete_location(&mut self, name: &str) -> Result<(), StoreError> {
        let tx = begin(&mut self.conn)?;
        let row = by_name(&tx, name)?;
        let view = view(&tx, &row)?;
        if view.gateways > 0 || view.devices > 0 {
            return Err(StoreError::InUse(format!(
                "location {name:?} still has {} gateways and {} devices; delete them first",
                view.gateways, view.devices
            )));
        }
        tx.execute("DELETE FROM locations WHERE id = ?1", [row.id])
            .map_err(sql("deleting a location"))?;
        self.notices.extend(tx.commit()?);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::{ChangeKind, Notice, testing};

    pub(crate) fn request(name: &str) -> admin::CreateLocationRequest {
        admin::CreateLocationRequest {
            name: name.into(),
            addresses: vec!["10.8.0.1/24".into(), "fd00:8::1/64".into()],
            vips: vec!["198.51.100.100".into()],
            ..Default::default()
        }
    }

    #[test]
    fn create_show_list_with_defaults() {
        let (_dir, mut store) = testing::store();
        let created = store.create_location(request("ams"), 1000).unwrap();
        assert_eq!(created.listen_port, DEFAULT_LISTEN_PORT);
        assert_eq!(created.peer_disconnect_threshold_s, DEFAULT_THRESHOLD_S);
        assert_eq!(created.persistent_keepalive_s, DEFAULT_KEEPALIVE_S);
        assert_eq!(created.version, 1);
        assert_eq!(created.public_key.len(), 44);
        assert_eq!(store.location("ams").unwrap(), created);
        store.create_location(request("fra"), 1000).unwrap();
        let names: Vec<_> = store
            .list_locations()
            .unwrap()
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert_eq!(names, ["ams", "fra"]);
        let err = store.create_location(request("ams"), 1000).unwrap_err();
        assert!(matches!(err, StoreError::Exists { .. }), "{err}");
    }

    #[test]
    fn bad_locations_are_refused_whole() {
        let (_dir, mut store) = testing::store();
        let cases: Vec<(admin::CreateLocationRequest, &str)> = vec![
            (
                admin::CreateLocationRequest {
                    listen_port: Some(0),
                    ..request("a")
                },
                "listen_port",
            ),
            (
                admin::CreateLocationRequest {
                    vips: vec![],
                    ..request("a")
                },
                "endpoint",
            ),
            (
                admin::CreateLocationRequest {
                    private_key: "short".into(),
                    ..request("a")
                },
                "private_key",
            ),
            (
                admin::CreateLocationRequest {
                    dns: vec!["resolver".into()],
                    ..request("a")
                },
                "dns",
            ),
            (
                admin::CreateLocationRequest {
                    addresses: vec!["10.8.0.1/33".into()],
                    ..request("a")
                },
                "addresses",
            ),
            (
                admin::CreateLocationRequest {
                    name: "a b".into(),
                    ..request("a")
                },
                "name",
            ),
        ];
        for (req, field) in cases {
            let err = store.create_location(req, 0).unwrap_err();
            assert!(
                matches!(&err, StoreError::Invalid { field: f, .. } if *f == field),
                "{field}: {err}"
            );
        }
        assert!(store.list_locations().unwrap().is_empty());
        assert!(store.take_notices().is_empty());
    }

    #[test]
    fn interface_changes_bump_the_version_and_ask_for_a_full_config() {
        let (_dir, mut store) = testing::store();
        let loc = store.create_location(request("ams"), 0).unwrap();
        // Device-side settings do not concern the gateways.
        let updated = store
            .update_location(admin::UpdateLocationRequest {
                name: "ams".into(),
                dns: Some(admin::StringList {
                    values: vec!["10.8.0.1".into()],
                }),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(updated.version, 1);
        assert_eq!(updated.dns, ["10.8.0.1"]);
        assert!(store.take_notices().is_empty());
        let updated = store
            .update_location(admin::UpdateLocationRequest {
                name: "ams".into(),
                rotate_key: true,
                ..Default::default()
            })
            .unwrap();
        assert_ne!(updated.public_key, loc.public_key);
        assert_eq!(updated.version, 2);
        let notices = store.take_notices();
        let [Notice::Location(change)] = notices.as_slice() else {
            panic!("{notices:?}");
        };
        assert_eq!((change.base_version, change.version), (1, 2));
        assert_eq!(change.kind, ChangeKind::Config);
        // A refused change leaves everything as it was.
        let err = store
            .update_location(admin::UpdateLocationRequest {
                name: "ams".into(),
                mtu: Some(100),
                listen_port: Some(1),
                ..Default::default()
            })
            .unwrap_err();
        assert!(err.to_string().starts_with("mtu: "), "{err}");
        assert_eq!(store.location("ams").unwrap(), updated);
    }

    #[test]
    fn rename_and_delete() {
        let (_dir, mut store) = testing::store();
        store.create_location(request("ams"), 0).unwrap();
        store.create_location(request("fra"), 0).unwrap();
        let err = store
            .update_location(admin::UpdateLocationRequest {
                name: "ams".into(),
                rename: Some("fra".into()),
                ..Default::default()
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::Exists { .. }));
        store
            .update_location(admin::UpdateLocationRequest {
                name: "ams".into(),
                rename: Some("ams2".into()),
                ..Default::default()
            })
            .unwrap();
        store.delete_location("ams2").unwrap();
        assert!(matches!(
            store.delete_location("ams2"),
            Err(StoreError::NotFound { .. })
        ));
    }
}
