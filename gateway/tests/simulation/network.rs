//! The public segment: every advert is broadcast to the other gateways,
//! each copy lost or delayed by the weather, and cut by a partition both
//! when it is sent and when it would arrive.

use std::{collections::BTreeMap, time::Duration};

use tidegate_gateway::ha::advert::Advert;

use crate::{forge::Forgery, host::key, scenario::Weather};

/// One datagram on its way to one gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// The sender; `None` for a forger.
    pub from: Option<u32>,
    pub to: u32,
    pub bytes: Vec<u8>,
    /// What the simulation forged it as (the gateway does not know).
    pub forged: Option<Forgery>,
}

impl Datagram {
    /// A few words for the trace.
    pub fn describe(&self) -> String {
        match Advert::decode(&self.bytes, &key()) {
            Ok(a) => format!(
                "gw {} {} p{} #{}{}{}",
                a.gateway_id,
                a.role,
                a.priority,
                a.sequence,
                a.handover_to
                    .map(|to| format!(" handing over to {to}"))
                    .unwrap_or_default(),
                if a.preempt { " asking" } else { "" },
            ),
            Err(error) => format!("{} bytes ({error})", self.bytes.len()),
        }
    }
}

/// The segment.
#[derive(Debug)]
pub struct Segment {
    interval: Duration,
    /// Datagrams on their way, by arrival time and order of sending.
    in_flight: BTreeMap<(Duration, u64), Datagram>,
    sent: u64,
    /// While partitioned: the gateways on one side.
    side: Option<Vec<u32>>,
    pub weather: Weather,
    /// The last advert any gateway sent, for forgers to alter.
    pub last_seen: Option<Vec<u8>>,
}

impl Segment {
    /// A calm, whole segment for gateways advertising every `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            in_flight: BTreeMap::new(),
            sent: 0,
            side: None,
            weather: Weather::Calm,
            last_seen: None,
        }
    }

    /// Splits the segment: `side` and the others.
    pub fn partition(&mut self, side: Vec<u32>) {
        self.side = Some(side);
    }

    /// Joins the segment again.
    pub fn heal(&mut self) {
        self.side = None;
    }

    /// Whether `a` and `b` are on the same side.
    pub fn joins(&self, a: u32, b: u32) -> bool {
        self.side
            .as_ref()
            .is_none_or(|side| side.contains(&a) == side.contains(&b))
    }

    /// Nothing is lost: gateways on the same side hear each other.
    pub fn lossless(&self) -> bool {
        !matches!(self.weather, Weather::Lossy(_))
    }

    /// The longest the segment delays a datagram, in any weather.
    pub fn max_delay(interval: Duration) -> Duration {
        2 * interval
    }

    /// `from` broadcasts `bytes` at `now` to the gateways `to`.
    pub fn broadcast(
        &mut self,
        rng: &mut fastrand::Rng,
        now: Duration,
        from: u32,
        to: &[u32],
        bytes: &[u8],
    ) {
        self.last_seen = Some(bytes.to_vec());
        for &to in to.iter().filter(|&&to| to != from) {
            let (loss, delay) = match self.weather {
                Weather::Calm => (0, self.interval / 10),
                Weather::Slow => (0, Self::max_delay(self.interval)),
                Weather::Lossy(percent) => (percent, self.interval / 2),
            };
            if !self.joins(from, to) || rng.u32(0..100) < loss {
                continue;
            }
            let delay = Duration::from_micros(rng.u64(0..=delay.as_micros() as u64));
            let datagram = Datagram {
                from: Some(from),
                to,
                bytes: bytes.to_vec(),
                forged: None,
            };
            self.push(now + delay, datagram);
        }
    }

    /// A forger on `to`'s side sends it `bytes` at once.
    pub fn inject(&mut self, now: Duration, to: u32, bytes: Vec<u8>, forgery: Forgery) {
        let datagram = Datagram {
            from: None,
            to,
            bytes,
            forged: Some(forgery),
        };
        self.push(now, datagram);
    }

    fn push(&mut self, at: Duration, datagram: Datagram) {
        self.sent += 1;
        self.in_flight.insert((at, self.sent), datagram);
    }

    /// When the next datagram arrives.
    pub fn next_arrival(&self) -> Option<Duration> {
        self.in_flight.keys().next().map(|&(at, _)| at)
    }

    /// The next datagram to arrive, unless a partition cut it on the way.
    pub fn arrive(&mut self) -> Option<Datagram> {
        let (_, datagram) = self.in_flight.pop_first()?;
        let cut = datagram
            .from
            .is_some_and(|from| !self.joins(from, datagram.to));
        (!cut).then_some(datagram)
    }
}
