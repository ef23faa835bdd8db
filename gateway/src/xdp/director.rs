//! The director's maps: writing the backends and the Maglev table, turning
//! steering on and off, reading the pins and the per-backend counters.
//!
//! Writes are ordered so that the program never picks a slot that is not
//! filled: a backend that joins is written before the table that names it,
//! and one that leaves is cleared only after a table without it.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd as _,
    time::Instant,
};

use aya::maps::{HashMap, IterableMap as _, Map, MapData, MapError};
use serde::{Deserialize, Serialize};
use tidegate_common::{
    client::ClientKey,
    director::{
        BACKEND_DRAINING, BACKEND_LOCAL, BACKEND_PRESENT, Backend, BackendCounters, BackendTable,
        DIRECTOR_ON, Director, MAX_BACKENDS, MAX_TABLE_SIZE, MaglevTable, Session,
    },
    maps,
};

use super::{Datapath, XdpError, counters::PacketCount};
use crate::director::{BackendSpec, DirectorState, Mac, maglev};

/// What the director maps hold.
#[derive(Debug, Clone)]
pub(super) struct Written {
    desired: DirectorState,
    /// The gateways the Maglev table was built from, and its share of each.
    table_members: Vec<u32>,
    shares: BTreeMap<u32, u32>,
}

/// One backend, for `tidectl director`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub gateway_id: u32,
    /// Its Ethernet address, `aa:bb:..`; empty for a gateway that has gone.
    pub mac: String,
    /// This gateway.
    pub local: bool,
    /// Healthy and known to the program (gone gateways still show their
    /// counters).
    pub present: bool,
    pub draining: bool,
    /// Maglev table entries that name it.
    pub table_entries: u32,
    /// Frames the director sent it.
    pub packets: u64,
    pub bytes: u64,
    /// Clients pinned to it, new ones and re-pins.
    pub new_pins: u64,
}

/// The director, for `tidectl director`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectorStatus {
    /// Steering now (this gateway is the master).
    pub on: bool,
    pub table_size: u32,
    pub max_sessions: u32,
    pub backends: Vec<BackendStatus>,
    /// Frames passed locally without a pin: no backend could be picked.
    pub unpinned: PacketCount,
}

/// One pin, for `tidectl sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEntry {
    /// The client's address and UDP port.
    pub client: SocketAddr,
    /// The gateway it is pinned to.
    pub gateway_id: u32,
    /// Milliseconds since its last frame through the director; `None`
    /// before the kernel's clock has been read (no HA lease yet).
    pub last_seen_ms: Option<u64>,
}

impl Datapath {
    /// Makes the director maps hold `desired`: the backends, the Maglev
    /// table of the healthy, non-draining ones, and steering on or off.
    pub fn set_director(&mut self, desired: &DirectorState) -> Result<(), XdpError> {
        if desired.on && !self.options.director {
            return Err(XdpError::NoDirector);
        }
        let members = desired.table_members();
        let size = self.options.table_size;
        let old = self.steering.take();
        if desired.on && !old.as_ref().is_some_and(|w| w.desired.on) {
            // A new term: pins of earlier ones are made again.
            self.generation = self.generation.wrapping_add(1).max(1);
        }
        let table_changed = old.as_ref().is_none_or(|w| w.table_members != members);
        let shares = if table_changed {
            let table = maglev::build(&members, size)?;
            // Joining backends first, leaving ones still in place, so that
            // neither the old table nor the new one names an empty slot.
            if let Some(old) = &old {
                let mut union = desired.backends.clone();
                for backend in &old.desired.backends {
                    if !union.iter().any(|b| b.gateway_id == backend.gateway_id) {
                        union.push(*backend);
                    }
                }
                self.write_backends(&union)?;
            } else {
                self.write_backends(&desired.backends)?;
            }
            let mut entries: Box<MaglevTable> = vec![0u8; MAX_TABLE_SIZE]
                .into_boxed_slice()
                .try_into()
                .expect("a slice of MAX_TABLE_SIZE bytes");
            entries[..table.len()].copy_from_slice(&table);
            self.maglev
                .set(0, entries.as_ref(), 0)
                .map_err(write_err(maps::MAGLEV))?;
            let mut shares = BTreeMap::new();
            for &id in &table {
                *shares.entry(u32::from(id)).or_default() += 1;
            }
            shares
        } else {
            old.map(|w| w.shares).unwrap_or_default()
        };
        self.write_backends(&desired.backends)?;
        let director = Director {
            mac: desired.mac,
            _pad: [0; 2],
            flags: if desired.on { DIRECTOR_ON } else { 0 },
            table_size: size,
            generation: self.generation,
            _pad2: 0,
        };
        // On: the maps first, then the program that reads them. Off: the
        // shield's program back first.
        if !desired.on {
            self.switch_program(maps::PROGRAM)?;
        }
        self.director
            .set(0, director, 0)
            .map_err(write_err(maps::DIRECTOR))?;
        if desired.on {
            self.switch_program(maps::DIRECTOR_PROGRAM)?;
        }
        self.steering = Some(Written {
            desired: desired.clone(),
            table_members: members,
            shares,
        });
        Ok(())
    }

    fn write_backends(&mut self, backends: &[BackendSpec]) -> Result<(), XdpError> {
        let mut table: BackendTable = [Backend::ABSENT; MAX_BACKENDS];
        for backend in backends {
            let slot = backend.gateway_id as usize;
            if slot == 0 || slot >= MAX_BACKENDS {
                continue;
            }
            let mut flags = BACKEND_PRESENT;
            if backend.local {
                flags |= BACKEND_LOCAL;
            }
            if backend.draining {
                flags |= BACKEND_DRAINING;
            }
            table[slot] = Backend {
                mac: backend.mac,
                flags,
                _pad: 0,
            };
        }
        self.backends
            .set(0, table, 0)
            .map_err(write_err(maps::BACKENDS))
    }

    /// The director's state and each backend's counters, summed over CPUs.
    pub fn director_status(&self) -> Result<DirectorStatus, XdpError> {
        let mut sums = [BackendCounters::default(); MAX_BACKENDS];
        for (slot, sum) in sums.iter_mut().enumerate() {
            let per_cpu = self
                .backend_counters
                .get(&(slot as u32), 0)
                .map_err(read_err(maps::BACKEND_COUNTERS))?;
            for counters in per_cpu.iter() {
                sum.packets += counters.packets;
                sum.bytes += counters.bytes;
                sum.new_pins += counters.new_pins;
            }
        }
        let written = self.steering.as_ref();
        let known: &[BackendSpec] = written.map_or(&[], |w| &w.desired.backends);
        let mut backends = Vec::new();
        for (slot, sum) in sums.iter().enumerate().skip(1) {
            let spec = known.iter().find(|b| b.gateway_id as usize == slot);
            if spec.is_none() && *sum == BackendCounters::default() {
                continue;
            }
            backends.push(BackendStatus {
                gateway_id: slot as u32,
                mac: spec.map(|b| format_mac(&b.mac)).unwrap_or_default(),
                local: spec.is_some_and(|b| b.local),
                present: spec.is_some(),
                draining: spec.is_some_and(|b| b.draining),
                table_entries: written
                    .and_then(|w| w.shares.get(&(slot as u32)).copied())
                    .unwrap_or(0),
                packets: sum.packets,
                bytes: sum.bytes,
                new_pins: sum.new_pins,
            });
        }
        Ok(DirectorStatus {
            on: written.is_some_and(|w| w.desired.on),
            table_size: self.options.table_size,
            max_sessions: self.options.max_sessions,
            backends,
            unpinned: PacketCount {
                packets: sums[0].packets,
                bytes: sums[0].bytes,
            },
        })
    }

    /// A reader of the pins that works apart from this owner: listing a
    /// full session map takes seconds of syscalls, which must not hold up
    /// the lease renewals that go through the owner.
    pub fn session_reader(&self) -> Result<SessionReader, XdpError> {
        let fd = self
            .sessions
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| read_err(maps::SESSIONS)(MapError::from(e)))?;
        let map = Map::from_map_data(MapData::from_fd(fd).map_err(read_err(maps::SESSIONS))?)
            .map_err(read_err(maps::SESSIONS))?;
        let clock = match (self.renewed, self.hz) {
            (Some((at, _, _)), Some(hz)) => Some(Clock {
                jiffies: self.read_fence()?.renewed_jiffies,
                at,
                hz,
            }),
            _ => None,
        };
        Ok(SessionReader {
            sessions: HashMap::try_from(map).map_err(|source| XdpError::MapType {
                name: maps::SESSIONS,
                source,
            })?,
            clock,
            generation: self.generation,
        })
    }

    /// Every pin, ordered by client. (Reads the map in this thread; see
    /// [`Datapath::session_reader`].)
    pub fn sessions(&self) -> Result<Vec<SessionEntry>, XdpError> {
        self.session_reader()?.sessions()
    }

    /// The pin of `client`, if the director holds one.
    pub fn session(&self, client: SocketAddr) -> Result<Option<SessionEntry>, XdpError> {
        self.session_reader()?.session(client)
    }

    /// The director as last written: steering on, and the backends.
    pub fn director_desired(&self) -> Option<&DirectorState> {
        self.steering.as_ref().map(|w| &w.desired)
    }
}

/// The session key of a client.
pub fn client_key(client: SocketAddr) -> ClientKey {
    match client {
        SocketAddr::V4(v4) => ClientKey::v4(v4.ip().octets(), v4.port().to_be()),
        SocketAddr::V6(v6) => ClientKey::v6(v6.ip().octets(), v6.port().to_be()),
    }
}

/// The kernel's `jiffies` at an instant: a lease renewal's stamp.
#[derive(Debug, Clone, Copy)]
struct Clock {
    jiffies: u64,
    at: Instant,
    hz: u64,
}

impl Clock {
    /// The kernel's `jiffies` now, at the measured tick rate.
    fn now(&self) -> u64 {
        let since = Instant::now().saturating_duration_since(self.at);
        self.jiffies + (since.as_nanos() as u64 * self.hz) / 1_000_000_000
    }

    /// Milliseconds since `jiffies`.
    fn ms_since(&self, jiffies: u64) -> u64 {
        self.now().saturating_sub(jiffies) * 1000 / self.hz
    }
}

/// Reads the director's pins through a handle of its own on the session
/// map (see [`Datapath::session_reader`]); it only reads.
#[derive(Debug)]
pub struct SessionReader {
    sessions: HashMap<MapData, ClientKey, Session>,
    /// `None` before the first lease renewal: no last-seen ages then.
    clock: Option<Clock>,
    /// The director's current (or, when off, last) term: pins of earlier
    /// terms are dead and left out.
    generation: u32,
}

impl SessionReader {
    /// Every pin of the current (or last) term, ordered by client.
    pub fn sessions(&self) -> Result<Vec<SessionEntry>, XdpError> {
        let mut out = Vec::new();
        for item in self.sessions.iter() {
            let (key, session) = match item {
                Ok(item) => item,
                // Evicted between listing its key and reading it.
                Err(MapError::KeyNotFound) => continue,
                Err(source) => return Err(read_err(maps::SESSIONS)(source)),
            };
            if session.generation != self.generation {
                continue;
            }
            out.push(SessionEntry {
                client: client_addr(&key),
                gateway_id: session.backend,
                last_seen_ms: self.clock.map(|c| c.ms_since(session.last_seen_jiffies)),
            });
        }
        out.sort_by_key(|s| s.client);
        Ok(out)
    }

    /// The pin of `client`, if the director holds one.
    pub fn session(&self, client: SocketAddr) -> Result<Option<SessionEntry>, XdpError> {
        let session = match self.sessions.get(&client_key(client), 0) {
            Ok(session) if session.generation == self.generation => session,
            Ok(_) | Err(MapError::KeyNotFound) => return Ok(None),
            Err(source) => return Err(read_err(maps::SESSIONS)(source)),
        };
        Ok(Some(SessionEntry {
            client,
            gateway_id: session.backend,
            last_seen_ms: self.clock.map(|c| c.ms_since(session.last_seen_jiffies)),
        }))
    }
}

/// The client of a session key.
fn client_addr(key: &ClientKey) -> SocketAddr {
    let ip = match key.v4_addr_be() {
        Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        None => IpAddr::V6(Ipv6Addr::from(key.addr_be)),
    };
    SocketAddr::new(ip, u16::from_be(key.port_be))
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &Mac) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn write_err(name: &'static str) -> impl Fn(MapError) -> XdpError {
    move |source| XdpError::Map {
        op: "writing",
        name,
        source,
    }
}

fn read_err(name: &'static str) -> impl Fn(MapError) -> XdpError {
    move |source| XdpError::Map {
        op: "reading",
        name,
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_keys_name_their_client() {
        let v4 = ClientKey::v4([198, 51, 100, 7], 40000u16.to_be());
        assert_eq!(
            client_addr(&v4),
            "198.51.100.7:40000".parse::<SocketAddr>().unwrap()
        );
        let v6 = ClientKey::v6(
            "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets(),
            51820u16.to_be(),
        );
        assert_eq!(
            client_addr(&v6),
            "[2001:db8::7]:51820".parse::<SocketAddr>().unwrap()
        );
        for client in ["198.51.100.7:40000", "[2001:db8::7]:51820"] {
            let client: SocketAddr = client.parse().unwrap();
            assert_eq!(client_addr(&client_key(client)), client);
        }
        assert_eq!(format_mac(&[2, 0, 0xab, 0, 0, 1]), "02:00:ab:00:00:01");
    }
}
