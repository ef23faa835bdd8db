//! The election as the wire carries it: the [`Machine`] with the adverts
//! around it. What is heard is decoded, authenticated and checked for
//! replay before the machine hears it; what the machine advertises is
//! numbered, signed and encoded. Pure, like the machine: the agent and the
//! HA simulation run the same code, with sockets or without.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use super::{
    advert::{self, Advert, AdvertError, AdvertKey, HEALTH_OK, ReplayGuard},
    announce::Mac,
    machine::{Action, AdvertFields, Event, Heard, Machine, Role, Settings},
};
use crate::{continuity::Input, director::Member};

/// The fence's lease lasts this many advert intervals. Every advert renews
/// it, and a master-down interval is longer, so a live master never lapses
/// and a dead one is fenced before a backup takes over.
pub const LEASE_INTERVALS: u32 = 3;

/// Who this gateway is on the wire.
#[derive(Debug, Clone)]
pub struct Identity {
    pub location_id: u32,
    pub key: AdvertKey,
    /// Its Ethernet address on the public segment.
    pub mac: Mac,
    pub vips: Vec<IpAddr>,
    /// New at each start and growing across restarts and clock steps
    /// ([`super::epoch`]).
    pub epoch: u64,
}

/// What a gateway's adverts say beyond the election: for the director.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerExtra {
    pub mac: Mac,
    pub draining: bool,
}

/// The election state of this gateway and what it heard.
#[derive(Debug)]
pub struct Election {
    machine: Machine,
    identity: Identity,
    sequence: u64,
    guard: ReplayGuard,
    /// Draining flags and addresses from the other gateways' adverts.
    extras: BTreeMap<u32, PeerExtra>,
    /// This gateway takes no new clients (director mode).
    draining: bool,
}

impl Election {
    /// An election in INIT.
    pub fn new(settings: Settings, identity: Identity) -> Self {
        Self {
            machine: Machine::new(settings),
            identity,
            sequence: 0,
            guard: ReplayGuard::default(),
            extras: BTreeMap::new(),
            draining: false,
        }
    }

    /// An election that reads and writes advert formats up to `version`
    /// only ([`Machine::speaking_at_most`]).
    pub fn speaking_at_most(mut self, version: u8) -> Self {
        self.machine = self.machine.speaking_at_most(version);
        self
    }

    /// The state machine.
    pub fn machine(&self) -> &Machine {
        &self.machine
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The sequence number of the last advert encoded.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// What the other gateways' adverts say beyond the election.
    pub fn extras(&self) -> &BTreeMap<u32, PeerExtra> {
        &self.extras
    }

    pub fn draining(&self) -> bool {
        self.draining
    }

    /// Starts or stops draining; true when that changed. The next advert
    /// says so.
    pub fn set_draining(&mut self, on: bool) -> bool {
        std::mem::replace(&mut self.draining, on) != on
    }

    /// Feeds the machine one event.
    pub fn on_event(&mut self, event: Event, now: Instant) -> Vec<Action> {
        self.machine.on_event(event, now)
    }

    /// An advert from the segment: the machine hears it only if it decodes,
    /// authenticates, is of this location and is not a replay. Returns the
    /// advert and the machine's actions.
    pub fn receive(
        &mut self,
        bytes: &[u8],
        now: Instant,
    ) -> Result<(Advert, Vec<Action>), AdvertError> {
        let advert = Advert::decode(bytes, &self.identity.key)?;
        if advert.version > self.machine.newest() {
            return Err(AdvertError::Version(advert.version));
        }
        if advert.location_id != self.identity.location_id {
            return Err(AdvertError::Location(advert.location_id));
        }
        self.guard.check(&advert)?;
        // A gateway of this release writes the previous format beside its
        // own while the location needs it: that copy says nothing of these.
        if advert::carries_mac(advert.version) {
            self.extras.insert(
                advert.gateway_id,
                PeerExtra {
                    mac: advert.mac,
                    draining: advert.draining,
                },
            );
        }
        let heard = Heard {
            from: advert.gateway_id,
            role: advert.role,
            priority: advert.priority,
            interval: advert.interval,
            handover_to: advert.handover_to,
            maintenance: advert.maintenance,
            healthy: advert.health & HEALTH_OK != 0,
            preempt: advert.preempt,
            version: advert.version,
        };
        let actions = self.machine.on_event(Event::Heard(heard), now);
        Ok((advert, actions))
    }

    /// The next adverts, with `fields` from the machine, each numbered and
    /// signed: one in each format from this gateway's newest down to the
    /// oldest a gateway of the location reads, newest first (one alone
    /// unless a rolling upgrade is under way).
    pub fn encode(&mut self, fields: AdvertFields) -> Vec<Vec<u8>> {
        (fields.oldest_version..=self.machine.newest())
            .rev()
            .map(|version| self.encode_version(fields, version))
            .collect()
    }

    fn encode_version(&mut self, fields: AdvertFields, version: u8) -> Vec<u8> {
        self.sequence += 1;
        let settings = self.machine.settings();
        let advert = Advert {
            version,
            role: fields.role,
            priority: fields.priority,
            maintenance: fields.maintenance,
            location_id: self.identity.location_id,
            gateway_id: settings.gateway_id,
            interval: settings.interval,
            epoch: self.identity.epoch,
            sequence: self.sequence,
            health: if fields.healthy { HEALTH_OK } else { 0 },
            handover_to: fields.handover_to,
            draining: self.draining,
            preempt: fields.preempt,
            mac: self.identity.mac,
            vips: self.identity.vips.clone(),
        };
        advert.encode(&self.identity.key)
    }

    /// How long a renewal of the fence's lease lasts.
    pub fn lease(&self) -> Duration {
        LEASE_INTERVALS * self.machine.settings().interval
    }

    /// How long the agent was away at `now`, when that is past the lease:
    /// since its last wake, and for a master since its last renewal of the
    /// lease, from which the fence counts.
    pub fn paused(
        &self,
        now: Instant,
        last_wake: Instant,
        renewed_at: Option<Instant>,
    ) -> Option<Duration> {
        let since_wake = now.saturating_duration_since(last_wake);
        let since_renewal = match (self.machine.role(), renewed_at) {
            (Role::Master, Some(at)) => now.saturating_duration_since(at),
            _ => Duration::ZERO,
        };
        let paused = since_wake.max(since_renewal);
        (paused > self.lease()).then_some(paused)
    }

    /// The reason of the last role change.
    pub fn last_reason(&self) -> String {
        self.machine
            .transitions()
            .last()
            .map(|t| t.reason.clone())
            .unwrap_or_default()
    }

    /// The location as the adverts describe it at `now`, for the
    /// director: whether this gateway steers, every gateway, this one
    /// among them, and the master.
    pub fn location(&self, now: Instant) -> Input {
        Input::Location {
            steering: self.machine.role() == Role::Master,
            members: self.members(now),
            master: self.machine.master(),
        }
    }

    /// Every gateway of the location. One silent for three of its
    /// intervals is not healthy: a backup takes over from a master that
    /// silent, and its director must not send clients to the gateway it
    /// took over from while that one waits out the peer table's four. One
    /// whose adverts carry no Ethernet address (the previous release's
    /// format) is left out: nothing can be steered to it.
    fn members(&self, now: Instant) -> Vec<Member> {
        let role = self.machine.role();
        let own = self.machine.advert();
        let mut members = vec![Member {
            gateway_id: self.machine.settings().gateway_id,
            mac: self.identity.mac,
            local: true,
            healthy: own.healthy && matches!(role, Role::Backup | Role::Master),
            draining: self.draining,
        }];
        for (&id, peer) in self.machine.peers() {
            let Some(extra) = self.extras.get(&id) else {
                continue;
            };
            if !advert::carries_mac(peer.version) {
                continue;
            }
            members.push(Member {
                gateway_id: id,
                mac: extra.mac,
                local: false,
                healthy: peer.healthy
                    && peer.priority > 0
                    && matches!(peer.role, Role::Backup | Role::Master)
                    && now.saturating_duration_since(peer.last_seen)
                        < SILENT_INTERVALS * peer.interval,
                draining: extra.draining,
            });
        }
        members
    }
}

/// Intervals of silence after which a gateway gets no new clients: the
/// master-down interval's (without its skew).
const SILENT_INTERVALS: u32 = 3;

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(100);

    fn election(id: u32, location_id: u32, key: &[u8], epoch: u64) -> Election {
        let settings = Settings {
            gateway_id: id,
            priority: 100,
            interval: INTERVAL,
            preempt: true,
            preempt_delay: Duration::ZERO,
        };
        let identity = Identity {
            location_id,
            key: AdvertKey::new(key.to_vec()),
            mac: [2, 0, 0, 0, 0, id as u8],
            vips: vec!["192.0.2.10".parse().unwrap()],
            epoch,
        };
        Election::new(settings, identity)
    }

    #[test]
    fn what_one_gateway_advertises_another_hears_once() {
        let t0 = Instant::now();
        let mut a = election(1, 7, b"location key", 1000);
        let mut b = election(2, 7, b"location key", 2000);
        for e in [&mut a, &mut b] {
            e.on_event(Event::Start, t0);
        }
        a.set_draining(true);
        let first = a.encode(a.machine().advert()).remove(0);
        let second = a.encode(a.machine().advert()).remove(0);
        assert_eq!(a.sequence(), 2);

        let (advert, _) = b.receive(&first, t0).unwrap();
        assert_eq!(
            (advert.gateway_id, advert.epoch, advert.sequence),
            (1, 1000, 1)
        );
        let extra = b.extras()[&1];
        assert_eq!((extra.mac, extra.draining), ([2, 0, 0, 0, 0, 1], true));
        assert_eq!(b.machine().peers()[&1].role, Role::Backup);

        // Every fault is an error naming it, and the machine hears nothing.
        let other_location = election(3, 8, b"location key", 1)
            .encode(a.machine().advert())
            .remove(0);
        let other_key = election(3, 7, b"another key", 1)
            .encode(a.machine().advert())
            .remove(0);
        let cases: [(&[u8], AdvertError); 4] = [
            (&first, AdvertError::Replay),
            (&other_location, AdvertError::Location(8)),
            (&other_key, AdvertError::Mac),
            (&first[..10], AdvertError::Truncated(10)),
        ];
        for (bytes, expected) in cases {
            assert_eq!(b.receive(bytes, t0).unwrap_err(), expected);
        }
        assert!(!b.machine().peers().contains_key(&3));
        assert_eq!(b.receive(&second, t0).unwrap().0.sequence, 2);
    }

    #[test]
    fn a_gateway_silent_for_three_intervals_is_no_healthy_member() {
        let t0 = Instant::now();
        let at = |n: u64| t0 + Duration::from_millis(n);
        let mut a = election(1, 7, b"k", 1);
        let mut b = election(2, 7, b"k", 1);
        a.on_event(Event::Start, t0);
        b.on_event(Event::Start, t0);
        b.receive(&a.encode(a.machine().advert()).remove(0), t0)
            .unwrap();
        // (ms after gateway 1's last advert, gateway 1 healthy in the
        // location gateway 2 sees)
        for (ms, healthy) in [(0, true), (299, true), (300, false), (399, false)] {
            let Input::Location { members, .. } = b.location(at(ms)) else {
                panic!("not a location");
            };
            let one = members.iter().find(|m| m.gateway_id == 1).unwrap();
            assert_eq!(one.healthy, healthy, "{ms} ms");
        }
    }

    #[test]
    fn a_pause_counts_from_the_last_wake_and_for_a_master_from_its_renewal() {
        let t0 = Instant::now();
        let at = |n: u64| t0 + Duration::from_millis(n);
        let mut e = election(1, 7, b"k", 1);
        e.on_event(Event::Start, t0);
        assert_eq!(e.lease(), Duration::from_millis(300));
        assert_eq!(e.paused(at(300), t0, None), None, "a lease, no more");
        assert_eq!(
            e.paused(at(301), t0, None),
            Some(Duration::from_millis(301))
        );
        // A backup renews nothing it relies on: its last wake counts.
        assert_eq!(e.paused(at(400), at(200), Some(t0)), None);
        e.on_event(Event::Tick, at(400));
        assert_eq!(e.machine().role(), Role::Master);
        // A master's fence counts from the renewal, however late it woke.
        assert_eq!(
            e.paused(at(400), at(200), Some(at(50))),
            Some(Duration::from_millis(350))
        );
    }
}
