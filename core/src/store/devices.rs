//! Devices: a user's WireGuard client at one location, with its public key
//! and tunnel addresses. A device created without a key awaits enrolment:
//! no peer until the client brings its key with a token (see `enrol`).

use std::{collections::HashSet, net::IpAddr};

use super::db::{Db, OptionalExtension as _, Row, params};
use ipnet::IpNet;
use tidegate_proto::admin::v1 as admin;

use super::{Store, StoreError, Tx, begin, db, locations, render, sql, users, validate};
use crate::{
    keys::Key,
    lockout::{Failures, Verdict},
};

const SELECT: &str = "SELECT d.name, u.name, l.name, d.public_key, d.enabled, s.started_ms, d.created_ms, d.id, d.location_id, \
     d.mfa_failures, d.mfa_failed_ms \
     FROM devices d JOIN users u ON u.id = d.user_id JOIN locations l ON l.id = d.location_id \
     LEFT JOIN mfa_sessions s ON s.device_id = d.id";

/// A device row: its view, id, location id and wrong MFA codes.
pub(crate) struct DeviceRow {
    pub view: admin::Device,
    pub id: i64,
    pub location_id: u32,
    pub failures: Failures,
}

fn from_row(row: &Row) -> db::Result<DeviceRow> {
    let key: Option<Vec<u8>> = row.get(3)?;
    let key = key.and_then(|k| Key::from_slice(&k).ok());
    let session: Option<i64> = row.get(5)?;
    Ok(DeviceRow {
        view: admin::Device {
            name: row.get(0)?,
            user: row.get(1)?,
            location: row.get(2)?,
            public_key: key.map(|k| k.to_base64()).unwrap_or_default(),
            enrolled: key.is_some(),
            addresses: Vec::new(),
            enabled: row.get(4)?,
            mfa_session: session.is_some(),
            mfa_session_since_unix_ms: session.unwrap_or(0),
            created_unix_ms: row.get(6)?,
            ..Default::default()
        },
        id: row.get(7)?,
        location_id: row.get(8)?,
        failures: Failures {
            count: row.get(9)?,
            last_ms: row.get(10)?,
        },
    })
}

pub(crate) fn by_name(conn: &Db, name: &str) -> Result<DeviceRow, StoreError> {
    let mut row = conn
        .query_row(&format!("{SELECT} WHERE d.name = ?1"), [name], from_row)
        .optional()
        .map_err(sql("reading a device"))?
        .ok_or_else(|| StoreError::not_found("device", name))?;
    row.view.addresses = render::device_addresses(conn, row.id)?;
    Ok(row)
}

fn name_taken(conn: &Db, name: &str) -> Result<bool, StoreError> {
    super::name_taken(conn, "devices", "looking up a device", name)
}

/// The name of the device of this location holding `key`, if any.
pub(crate) fn key_holder(
    conn: &Db,
    location_id: u32,
    key: &Key,
) -> Result<Option<(i64, String)>, StoreError> {
    conn.query_row(
        "SELECT id, name FROM devices WHERE location_id = ?1 AND public_key = ?2",
        params![location_id, key.as_bytes().as_slice()],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )
    .optional()
    .map_err(sql("looking up a public key"))
}

/// Addresses used by the location's devices, other than `except`'s.
fn used_addresses(conn: &Db, location_id: u32, except: i64) -> Result<HashSet<IpAddr>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT address FROM device_addresses WHERE location_id = ?1 AND device_id != ?2",
        )
        .map_err(sql("reading device addresses"))?;
    let rows = stmt
        .query_map(params![location_id, except], |row| row.get::<_, String>(0))
        .map_err(sql("reading device addresses"))?;
    let mut used = HashSet::new();
    for row in rows {
        let text = row.map_err(sql("reading device addresses"))?;
        if let Ok(net) = text.parse::<IpNet>() {
            used.insert(net.addr());
        }
    }
    Ok(used)
}

/// The device holding `ip` at the location, if any (one index lookup,
/// where [`used_addresses`] reads them all).
fn address_holder(conn: &Db, location_id: u32, ip: IpAddr) -> Result<Option<i64>, StoreError> {
    conn.prepare_cached(
        "SELECT device_id FROM device_addresses WHERE location_id = ?1 AND address = ?2",
    )
    .and_then(|mut stmt| {
        stmt.query_row(params![location_id, validate::host_cidr(ip)], |row| {
            row.get(0)
        })
        .optional()
    })
    .map_err(sql("reading device addresses"))
}

/// Checks the addresses asked for, or picks the lowest free host of each of
/// the location's networks.
fn pick_addresses(
    conn: &Db,
    location: &locations::LocationRow,
    device_id: i64,
    asked: &[String],
) -> Result<Vec<String>, StoreError> {
    let nets = location.nets();
    if asked.is_empty() {
        let used = used_addresses(conn, location.id, device_id)?;
        let mut picked = Vec::new();
        for net in &nets {
            let free = net
                .hosts()
                .find(|ip| *ip != net.addr() && *ip != net.network() && !used.contains(ip))
                .ok_or_else(|| {
                    StoreError::invalid(
                        "addresses",
                        format!("no free address left in {}", net.trunc()),
                    )
                })?;
            picked.push(validate::host_cidr(free));
        }
        return Ok(picked);
    }
    let mut picked: Vec<IpAddr> = Vec::new();
    for text in asked {
        let ip = validate::device_address(text, &nets)?;
        if address_holder(conn, location.id, ip)?.is_some_and(|holder| holder != device_id) {
            return Err(StoreError::invalid(
                "addresses",
                format!("{ip} is another device's"),
            ));
        }
        if picked.iter().any(|p| p.is_ipv4() == ip.is_ipv4()) {
            return Err(StoreError::invalid(
                "addresses",
                format!("{ip}: one address per network"),
            ));
        }
        picked.push(ip);
    }
    Ok(picked.into_iter().map(validate::host_cidr).collect())
}

fn store_addresses(
    tx: &Tx<'_>,
    device_id: i64,
    location_id: u32,
    addresses: &[String],
) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM device_addresses WHERE device_id = ?1",
        [device_id],
    )
    .map_err(sql("replacing device addresses"))?;
    for address in addresses {
        tx.execute(
            "INSERT INTO device_addresses (device_id, location_id, address) VALUES (?1, ?2, ?3)",
            params![device_id, location_id, address],
        )
        .map_err(sql("storing device addresses"))?;
    }
    Ok(())
}

/// Adds one device in `tx`; returns its name.
fn insert_device(
    tx: &mut Tx<'_>,
    req: admin::CreateDeviceRequest,
    now_ms: i64,
) -> Result<String, StoreError> {
    let name = validate::name("name", &req.name)?;
    // No key: the device awaits enrolment.
    let public_key = if req.public_key.trim().is_empty() {
        None
    } else {
        Some(validate::key("public_key", &req.public_key)?)
    };
    let (_, user_id) = users::by_name(&*tx, &req.user)?;
    let location = locations::by_name(&*tx, &req.location)?;
    if name_taken(&*tx, &name)? {
        return Err(StoreError::Exists {
            kind: "device",
            name,
        });
    }
    if let Some(key) = &public_key
        && let Some((_, holder)) = key_holder(&*tx, location.id, key)?
    {
        return Err(StoreError::invalid(
            "public_key",
            format!(
                "device {holder:?} of location {:?} has this key",
                location.name
            ),
        ));
    }
    let addresses = pick_addresses(&*tx, &location, -1, &req.addresses)?;
    let psk = Key::generate_preshared();
    let id: i64 = tx
        .query_row(
        "INSERT INTO devices (name, user_id, location_id, public_key, preshared_key, enabled, created_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) RETURNING id",
        params![
            name,
            user_id,
            location.id,
            public_key.as_ref().map(|k| k.as_bytes().as_slice()),
            psk.as_bytes().as_slice(),
            req.enabled.unwrap_or(true),
            now_ms
        ],
        |row| row.get(0),
    )
    .map_err(sql("storing a device"))?;
    store_addresses(tx, id, location.id, &addresses)?;
    tx.touch_new(id);
    Ok(name)
}

impl Store {
    pub fn create_device(
        &mut self,
        req: admin::CreateDeviceRequest,
        now_ms: i64,
    ) -> Result<admin::Device, StoreError> {
        let mut tx = begin(&mut self.conn)?;
        let name = insert_device(&mut tx, req, now_ms)?;
        let view = by_name(&tx, &name)?.view;
        self.notices.extend(tx.commit()?);
        Ok(view)
    }

    /// Adds many devices in one transaction: all, or none (the error
    /// names the first refused and its place in the list).
    pub fn create_devices(
        &mut self,
        reqs: Vec<admin::CreateDeviceRequest>,
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        let count = reqs.len();
        let mut tx = begin(&mut self.conn)?;
        for (index, req) in reqs.into_iter().enumerate() {
            let name = req.name.clone();
            insert_device(&mut tx, req, now_ms).map_err(|error| StoreError::Batch {
                index,
                name,
                source: Box::new(error),
            })?;
        }
        self.notices.extend(tx.commit()?);
        Ok(count)
    }

    /// Devices, filtered by user and location names (empty: any), by name.
    pub fn list_devices(
        &self,
        user: &str,
        location: &str,
    ) -> Result<Vec<admin::Device>, StoreError> {
        let user_id = if user.is_empty() {
            None
        } else {
            Some(users::by_name(&self.conn, user)?.1)
        };
        let location_id = if location.is_empty() {
            None
        } else {
            Some(locations::by_name(&self.conn, location)?.id)
        };
        let mut stmt = self
            .conn
            .prepare(&format!(
                "{SELECT} WHERE (CAST(?1 AS BIGINT) IS NULL OR d.user_id = ?1) \
                 AND (CAST(?2 AS BIGINT) IS NULL OR d.location_id = ?2) \
                 ORDER BY d.name"
            ))
            .map_err(sql("listing devices"))?;
        let rows = stmt
            .query_map(params![user_id, location_id], from_row)
            .map_err(sql("listing devices"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql("listing devices"))?;
        rows.into_iter()
            .map(|mut row| {
                row.view.addresses = render::device_addresses(&self.conn, row.id)?;
                Ok(self.with_lockout(row))
            })
            .collect()
    }

    pub fn device(&self, name: &str) -> Result<admin::Device, StoreError> {
        Ok(self.with_lockout(by_name(&self.conn, name)?))
    }

    /// The device's view with its wrong MFA codes and any block they make.
    fn with_lockout(&self, row: DeviceRow) -> admin::Device {
        let now_ms = crate::now_ms();
        let policy = self.mfa.device;
        let verdict = policy.verdict(row.failures, now_ms);
        admin::Device {
            mfa_failures: policy.failures(row.failures, now_ms),
            mfa_blocked_until_unix_ms: verdict.until_ms().unwrap_or(0),
            mfa_locked_out: matches!(verdict, Verdict::LockedOut { .. }),
            ..row.view
        }
    }

    pub fn update_device(
        &mut self,
        req: admin::UpdateDeviceRequest,
    ) -> Result<admin::Device, StoreError> {
        let mut tx = begin(&mut self.conn)?;
        let old = by_name(&tx, &req.name)?;
        tx.touch(old.id)?;
        let mut name = old.view.name.clone();
        if let Some(rename) = req.rename {
            name = validate::name("rename", &rename)?;
            if name != old.view.name && name_taken(&tx, &name)? {
                return Err(StoreError::Exists {
                    kind: "device",
                    name,
                });
            }
        }
        let user_id = match &req.user {
            Some(user) => users::by_name(&tx, user)?.1,
            None => users::by_name(&tx, &old.view.user)?.1,
        };
        // None: the device awaits enrolment.
        let mut public_key = if old.view.public_key.is_empty() {
            None
        } else {
            Some(
                Key::parse(&old.view.public_key)
                    .map_err(|e| StoreError::InUse(format!("stored key: {e}")))?,
            )
        };
        if let Some(key) = &req.public_key {
            let key = validate::key("public_key", key)?;
            if Some(key) != public_key {
                if let Some((_, holder)) = key_holder(&tx, old.location_id, &key)? {
                    return Err(StoreError::invalid(
                        "public_key",
                        format!("device {holder:?} has this key"),
                    ));
                }
                // A session belongs to the key that logged in.
                tx.execute("DELETE FROM mfa_sessions WHERE device_id = ?1", [old.id])
                    .map_err(sql("ending an MFA session"))?;
                public_key = Some(key);
            }
        }
        if let Some(list) = &req.addresses {
            let location = locations::by_id(&tx, old.location_id)?
                .ok_or_else(|| StoreError::not_found("location", &old.view.location))?;
            let addresses = pick_addresses(&tx, &location, old.id, &list.values)?;
            store_addresses(&tx, old.id, old.location_id, &addresses)?;
        }
        if req.mfa_unlock {
            tx.execute(
                "UPDATE devices SET mfa_failures = 0, mfa_failed_ms = 0 WHERE id = ?1",
                [old.id],
            )
            .map_err(sql("lifting an MFA lockout"))?;
        }
        let enabled = req.enabled.unwrap_or(old.view.enabled);
        if !enabled {
            tx.execute("DELETE FROM mfa_sessions WHERE device_id = ?1", [old.id])
                .map_err(sql("ending an MFA session"))?;
        }
        tx.execute(
            "UPDATE devices SET name = ?2, user_id = ?3, public_key = ?4, enabled = ?5 WHERE id = ?1",
            params![
                old.id,
                name,
                user_id,
                public_key.as_ref().map(|k| k.as_bytes().as_slice()),
                enabled
            ],
        )
        .map_err(sql("updating a device"))?;
        let row = by_name(&tx, &name)?;
        self.notices.extend(tx.commit()?);
        Ok(self.with_lockout(row))
    }

    /// What the device's config holds, for the operator to hand to a stock
    /// WireGuard app (`tidectl device config`): refused on an MFA location
    /// (such apps cannot log in) and for a device awaiting its key.
    pub fn device_config(&self, name: &str) -> Result<admin::DeviceConfig, StoreError> {
        let row = by_name(&self.conn, name)?;
        let location = locations::by_id(&self.conn, row.location_id)?
            .ok_or_else(|| StoreError::not_found("location", &row.view.location))?;
        if location.mfa {
            return Err(StoreError::InUse(format!(
                "location {:?} uses MFA: a stock WireGuard app cannot log in; use tidegate-client",
                location.name
            )));
        }
        if !row.view.enrolled {
            return Err(StoreError::InUse(format!(
                "device {name:?} has no key yet: enrol it with tidegate-client, or give it one \
                 (tidectl device config --new-key)"
            )));
        }
        let psk: Vec<u8> = self
            .conn
            .query_row(
                "SELECT preshared_key FROM devices WHERE id = ?1",
                [row.id],
                |r| r.get(0),
            )
            .map_err(sql("reading a device"))?;
        let psk = Key::from_slice(&psk)
            .map_err(|e| StoreError::InUse(format!("stored preshared key: {e}")))?;
        let config = render::device_config(&self.conn, row.id, Some(psk))?;
        Ok(admin::DeviceConfig {
            device: config.device,
            location: config.location,
            addresses: config.addresses,
            dns: config.dns,
            mtu: config.mtu,
            server_public_key: config.server_public_key,
            preshared_key: config.preshared_key,
            endpoint: config.endpoint,
            allowed_ips: config.allowed_ips,
            persistent_keepalive_s: config.persistent_keepalive_s,
        })
    }

    /// Deletes a device: its peer leaves the gateways, its session and
    /// tokens go with it.
    pub fn delete_device(&mut self, name: &str) -> Result<(), StoreError> {
        let mut tx = begin(&mut self.conn)?;
        let row = by_name(&tx, name)?;
        tx.touch(row.id)?;
        tx.execute("DELETE FROM devices WHERE id = ?1", [row.id])
            .map_err(sql("deleting a device"))?;
        self.notices.extend(tx.commit()?);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::{ChangeKind, Notice, locations::tests::request, testing};

    pub(crate) fn setup(mfa: bool) -> (tempfile::TempDir, Store) {
        setup_on(testing::store(), mfa)
    }

    /// [`setup`] on a given store.
    pub(crate) fn setup_on(
        (dir, mut store): (tempfile::TempDir, Store),
        mfa: bool,
    ) -> (tempfile::TempDir, Store) {
        store
            .create_location(
                admin::CreateLocationRequest {
                    mfa,
                    ..request("ams")
                },
                0,
            )
            .unwrap();
        store
            .create_user(
                admin::CreateUserRequest {
                    name: "alice".into(),
                    enabled: None,
                },
                0,
            )
            .unwrap();
        store.take_notices();
        (dir, store)
    }

    pub(crate) fn device(name: &str, key: Key) -> admin::CreateDeviceRequest {
        admin::CreateDeviceRequest {
            name: name.into(),
            user: "alice".into(),
            location: "ams".into(),
            public_key: key.to_base64(),
            ..Default::default()
        }
    }

    fn one_change(store: &mut Store) -> std::sync::Arc<crate::store::Change> {
        let notices = store.take_notices();
        match notices.as_slice() {
            [Notice::Location(change)] => change.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_device_is_a_peer_with_the_next_free_addresses() {
        let (_dir, mut store) = setup(false);
        let key = Key::new([1; 32]);
        let dev = store.create_device(device("laptop", key), 0).unwrap();
        assert_eq!(dev.addresses, ["10.8.0.2/32", "fd00:8::2/128"]);
        let change = one_change(&mut store);
        assert_eq!((change.base_version, change.version), (1, 2));
        let ChangeKind::Peers { upsert, remove } = &change.kind else {
            panic!("{change:?}");
        };
        assert!(remove.is_empty());
        assert_eq!(upsert.len(), 1);
        assert_eq!(upsert[0].public_key, key);
        assert_eq!(upsert[0].allowed_ips, dev.addresses);
        assert!(upsert[0].preshared_key.is_some());
        let dev2 = store
            .create_device(device("phone", Key::new([2; 32])), 0)
            .unwrap();
        assert_eq!(dev2.addresses, ["10.8.0.3/32", "fd00:8::3/128"]);
        let config = render::location_config(&store.conn, 1).unwrap().unwrap();
        assert_eq!(config.version, 3);
        assert_eq!(config.peers.len(), 2);
        // Deleting frees the address for the next device.
        store.take_notices();
        store.delete_device("laptop").unwrap();
        let change = one_change(&mut store);
        assert_eq!(
            change.kind,
            ChangeKind::Peers {
                upsert: vec![],
                remove: vec![key]
            }
        );
        let dev3 = store
            .create_device(device("tablet", Key::new([3; 32])), 0)
            .unwrap();
        assert_eq!(dev3.addresses, ["10.8.0.2/32", "fd00:8::2/128"]);
    }

    #[test]
    fn bad_devices_are_refused_and_nothing_is_stored() {
        let (_dir, mut store) = setup(false);
        store
            .create_device(
                admin::CreateDeviceRequest {
                    addresses: vec!["10.8.0.9".into()],
                    ..device("laptop", Key::new([1; 32]))
                },
                0,
            )
            .unwrap();
        store.take_notices();
        for (req, says) in [
            (device("laptop", Key::new([2; 32])), "exists"),
            (device("phone", Key::new([1; 32])), "has this key"),
            (
                admin::CreateDeviceRequest {
                    public_key: "abc".into(),
                    ..device("phone", Key::new([2; 32]))
                },
                "public_key",
            ),
            (
                admin::CreateDeviceRequest {
                    user: "mallory".into(),
                    ..device("phone", Key::new([2; 32]))
                },
                "no user",
            ),
            (
                admin::CreateDeviceRequest {
                    location: "nowhere".into(),
                    ..device("phone", Key::new([2; 32]))
                },
                "no location",
            ),
            (
                admin::CreateDeviceRequest {
                    addresses: vec!["10.8.0.9".into()],
                    ..device("phone", Key::new([2; 32]))
                },
                "another device's",
            ),
            (
                admin::CreateDeviceRequest {
                    addresses: vec!["10.8.0.10".into(), "10.8.0.11".into()],
                    ..device("phone", Key::new([2; 32]))
                },
                "one address per network",
            ),
            (
                admin::CreateDeviceRequest {
                    addresses: vec!["10.9.0.10".into()],
                    ..device("phone", Key::new([2; 32]))
                },
                "outside",
            ),
        ] {
            let err = store.create_device(req, 0).unwrap_err();
            assert!(err.to_string().contains(says), "{says}: {err}");
        }
        assert_eq!(store.list_devices("", "").unwrap().len(), 1);
        assert!(store.take_notices().is_empty());
        assert_eq!(store.location("ams").unwrap().version, 2);
    }

    #[test]
    fn changes_to_a_device_or_its_user_move_its_peer() {
        let (_dir, mut store) = setup(false);
        let old_key = Key::new([1; 32]);
        store.create_device(device("laptop", old_key), 0).unwrap();
        store.take_notices();
        // A new key: the old peer goes, the new one comes.
        let new_key = Key::new([9; 32]);
        store
            .update_device(admin::UpdateDeviceRequest {
                name: "laptop".into(),
                public_key: Some(new_key.to_base64()),
                ..Default::default()
            })
            .unwrap();
        let change = one_change(&mut store);
        let ChangeKind::Peers { upsert, remove } = &change.kind else {
            panic!()
        };
        assert_eq!(remove, &[old_key]);
        assert_eq!(upsert[0].public_key, new_key);
        // New addresses: the peer is replaced in place.
        let dev = store
            .update_device(admin::UpdateDeviceRequest {
                name: "laptop".into(),
                addresses: Some(admin::StringList {
                    values: vec!["10.8.0.77/32".into()],
                }),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(dev.addresses, ["10.8.0.77/32"]);
        let change = one_change(&mut store);
        let ChangeKind::Peers { upsert, remove } = &change.kind else {
            panic!()
        };
        assert!(remove.is_empty());
        assert_eq!(upsert[0].allowed_ips, ["10.8.0.77/32"]);
        // A disabled user takes the device off the gateways.
        store
            .update_user(admin::UpdateUserRequest {
                name: "alice".into(),
                enabled: Some(false),
                ..Default::default()
            })
            .unwrap();
        let change = one_change(&mut store);
        assert_eq!(
            change.kind,
            ChangeKind::Peers {
                upsert: vec![],
                remove: vec![new_key]
            }
        );
        // A rename changes nothing the gateways see.
        store
            .update_device(admin::UpdateDeviceRequest {
                name: "laptop".into(),
                rename: Some("laptop2".into()),
                ..Default::default()
            })
            .unwrap();
        assert!(store.take_notices().is_empty());
        assert!(store.delete_user("alice").is_err());
    }

    #[test]
    fn mfa_devices_are_not_peers_without_a_session() {
        let (_dir, mut store) = setup(true);
        store
            .create_device(device("laptop", Key::new([1; 32])), 0)
            .unwrap();
        assert!(store.take_notices().is_empty());
        let config = render::location_config(&store.conn, 1).unwrap().unwrap();
        assert!(config.peers.is_empty());
        assert!(config.mfa);
        // Turning MFA off makes every device a peer: a full config.
        store
            .update_location(admin::UpdateLocationRequest {
                name: "ams".into(),
                mfa: Some(false),
                ..Default::default()
            })
            .unwrap();
        let change = one_change(&mut store);
        assert_eq!(change.kind, ChangeKind::Config);
        let config = render::location_config(&store.conn, 1).unwrap().unwrap();
        assert_eq!(config.peers.len(), 1);
        assert_eq!(config.version, change.version);
    }

    #[test]
    fn a_batch_of_devices_is_added_whole_or_not_at_all() {
        let (_dir, mut store) = setup(false);
        let batch = |names: &[&str], clash: Option<usize>| {
            names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    let n = u8::try_from(i).unwrap() + 1;
                    let mut req = device(name, Key::new([n; 32]));
                    if clash == Some(i) {
                        req.public_key = Key::new([1; 32]).to_base64();
                    }
                    req.addresses = vec![format!("10.8.0.{}/32", 10 + n)];
                    req
                })
                .collect::<Vec<_>>()
        };
        // The third repeats the first's key: nothing is stored.
        let err = store
            .create_devices(batch(&["a", "b", "c"], Some(2)), 0)
            .unwrap_err();
        assert!(
            crate::error_chain(&err).contains("item 2 (\"c\")"),
            "{}",
            crate::error_chain(&err)
        );
        assert!(matches!(
            crate::admin::status(err).code(),
            tonic::Code::InvalidArgument
        ));
        assert!(store.list_devices("", "").unwrap().is_empty());
        assert!(store.take_notices().is_empty());
        // Whole: every device, one change of three peers.
        assert_eq!(
            store
                .create_devices(batch(&["a", "b", "c"], None), 0)
                .unwrap(),
            3
        );
        assert_eq!(store.list_devices("", "").unwrap().len(), 3);
        let change = one_change(&mut store);
        let ChangeKind::Peers { upsert, .. } = &change.kind else {
            panic!("{change:?}")
        };
        assert_eq!(upsert.len(), 3);
        // An address another device holds is refused by one lookup.
        let mut taken = device("d", Key::new([9; 32]));
        taken.addresses = vec!["10.8.0.11/32".into()];
        let err = store.create_device(taken, 0).unwrap_err();
        assert!(err.to_string().contains("another device's"), "{err}");
    }
}
