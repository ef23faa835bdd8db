//! Kicking handshakes after a failover, and keeping count of how the
//! clients came back. Pure: what to send, in which order, and the figures;
//! the WireGuard task does the sending and the polling.
//!
//! A client keeps using its session with the old master until that session
//! times out (about 15 s for a busy client, longer for a quiet one). The
//! new master knows where the client is (the location's endpoint table)
//! and starts a handshake itself, so the tunnel resumes in about one round
//! trip. Neither WireGuard implementation has a "send a handshake now"
//! request, so a kick makes one happen:
//!
//! * a peer with no usable session on this device (no handshake in the
//!   last [`KEYPAIR_LIFE`]): its endpoint is set and its persistent
//!   keepalive turned from 0 to on in one request; WireGuard sends a
//!   keepalive at once, and with no session that is a handshake
//!   initiation ([`Method::Keepalive`]);
//! * a peer with a session here that may still be valid (this gateway was
//!   master not long ago): a keepalive would go out as data on that stale
//!   session, which the client has replaced, so the peer is removed and
//!   added again, with all its settings, in the same request; that clears
//!   its sessions ([`Method::Readd`]). Its traffic counters start again.
//!
//! Either way a peer whose configured keepalive is off gets it back off in a
//! second request right after. Kicks go most recently active peer first,
//! paced (`kick_rate` per second), so ten thousand peers neither flood the
//! link nor starve the CPU.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{
    key::Key,
    reconcile::{Actual, ActualPeer, OpKind, PeerOp, Plan},
    spec::PeerSpec,
};

/// How long a WireGuard session may be used (Reject-After-Time): a peer
/// whose last handshake on this device is older has no usable session.
pub const KEYPAIR_LIFE: Duration = Duration::from_secs(180);

/// A margin on [`KEYPAIR_LIFE`] for clocks and polling.
const KEYPAIR_MARGIN: Duration = Duration::from_secs(5);

/// How long after its last kick a failover is followed: clients that have
/// not come back by then are counted as not back.
pub const FOLLOW_FOR: Duration = Duration::from_secs(30);

/// A handshake this soon after a kick is taken as the kick's own: it tells
/// where the client is, but not that its user was active.
pub const KICK_GRACE: Duration = Duration::from_secs(10);

/// The share of recently active peers whose return is timed.
const QUORUM: f64 = 0.95;

/// One peer to kick: where its client was last seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    pub key: Key,
    pub endpoint: SocketAddr,
    pub last_handshake: SystemTime,
}

/// What happened, for the record of a failover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverMeta {
    /// When this gateway took the VIPs.
    #[serde(with = "unix_ms")]
    pub at: SystemTime,
    /// Why (the transition's reason).
    pub cause: String,
    /// A handover (planned) rather than a takeover.
    pub planned: bool,
    /// From the last advert heard of the old master (or the handover
    /// request) to this gateway becoming master, in ms.
    pub detection_ms: Option<u64>,
    /// From becoming master to the VIPs on the interface and the first
    /// announcement sent, in ms.
    pub vip_move_ms: u64,
}

/// A kick request: the recently active peers, most recent first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KickRequest {
    pub meta: FailoverMeta,
    pub candidates: Vec<Candidate>,
    /// Kicks per second.
    pub rate: u32,
}

/// How a peer is made to initiate (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Keepalive,
    Readd,
}

/// How `have` (the peer on this device) is kicked at `now`.
pub fn method(have: &ActualPeer, now: SystemTime) -> Method {
    match have.last_handshake {
        Some(at) if now.duration_since(at).unwrap_or_default() < KEYPAIR_LIFE + KEYPAIR_MARGIN => {
            Method::Readd
        }
        _ => Method::Keepalive,
    }
}

/// The two requests that kick `kicks` (peer, endpoint, method): the kick
/// itself, and the one that turns keepalives back off where the config
/// has them off (empty when none does).
pub fn plans(kicks: &[(&PeerSpec, SocketAddr, Method)]) -> (Plan, Plan) {
    let mut kick = Plan::default();
    let mut restore = Plan::default();
    for &(spec, endpoint, method) in kicks {
        let on = spec.persistent_keepalive.unwrap_or(1);
        match method {
            Method::Keepalive => {
                kick.peers.push(PeerOp {
                    persistent_keepalive: Some(0),
                    endpoint: Some(endpoint),
                    ..update(spec.public_key)
                });
                kick.peers.push(PeerOp {
                    persistent_keepalive: Some(on),
                    ..update(spec.public_key)
                });
            }
            Method::Readd => {
                kick.peers.push(PeerOp {
                    kind: OpKind::Remove,
                    ..update(spec.public_key)
                });
                kick.peers.push(PeerOp {
                    kind: OpKind::Add,
                    public_key: spec.public_key,
                    preshared_key: spec.preshared_key,
                    persistent_keepalive: Some(on),
                    endpoint: Some(endpoint),
                    allowed_ips: Some(spec.allowed_ips.iter().copied().collect()),
                });
            }
        }
        if spec.persistent_keepalive.is_none() {
            restore.peers.push(PeerOp {
                persistent_keepalive: Some(0),
                ..update(spec.public_key)
            });
        }
    }
    (kick, restore)
}

fn update(public_key: Key) -> PeerOp {
    PeerOp {
        kind: OpKind::Update,
        public_key,
        preshared_key: None,
        persistent_keepalive: None,
        endpoint: None,
        allowed_ips: None,
    }
}

/// One peer's way back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Progress {
    kicked_at: Option<SystemTime>,
    /// Its first handshake after the failover.
    fresh_at: Option<SystemTime>,
}

/// A failover being followed: the kicks still to send, and which clients
/// came back when.
#[derive(Debug, Clone)]
pub struct FailoverRun {
    meta: FailoverMeta,
    queue: VecDeque<Candidate>,
    progress: HashMap<Key, Progress>,
    skipped: usize,
    last_kick: Option<SystemTime>,
    interrupted: bool,
}

impl FailoverRun {
    /// Follows the failover `meta`, kicking the `candidates` (most recent
    /// first) that `configured` still has.
    pub fn new(
        meta: FailoverMeta,
        candidates: Vec<Candidate>,
        configured: impl Fn(&Key) -> bool,
    ) -> Self {
        let total = candidates.len();
        let queue: VecDeque<Candidate> = candidates
            .into_iter()
            .filter(|c| configured(&c.key))
            .collect();
        let progress = queue.iter().map(|c| (c.key, Progress::default())).collect();
        Self {
            meta,
            skipped: total - queue.len(),
            queue,
            progress,
            last_kick: None,
            interrupted: false,
        }
    }

    /// The next (up to) `n` peers to kick.
    pub fn next_batch(&mut self, n: usize) -> Vec<Candidate> {
        let n = n.min(self.queue.len());
        self.queue.drain(..n).collect()
    }

    /// Peers still to kick.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// Kicks nobody (kicks are turned off): the peers are only followed,
    /// coming back by themselves or not.
    pub fn kick_none(&mut self) {
        self.skipped += self.queue.len();
        self.queue.clear();
    }

    /// `keys` were kicked at `at`.
    pub fn kicked(&mut self, keys: impl IntoIterator<Item = Key>, at: SystemTime) {
        for key in keys {
            if let Some(progress) = self.progress.get_mut(&key) {
                progress.kicked_at = Some(at);
            }
        }
        self.last_kick = Some(at);
    }

    /// `keys` could not be kicked (not on the device, or the request
    /// failed): they are not counted as kicked.
    pub fn not_kicked(&mut self, count: usize) {
        self.skipped += count;
    }

    /// Takes in a stats poll: a peer whose last handshake is after the
    /// failover came back.
    pub fn observe(&mut self, actual: &Actual) {
        for (key, progress) in &mut self.progress {
            if progress.fresh_at.is_some() {
                continue;
            }
            if let Some(at) = actual.peers.get(key).and_then(|p| p.last_handshake)
                && at > self.meta.at
            {
                progress.fresh_at = Some(at);
            }
        }
    }

    /// Whether following is over at `now`: every peer is back, or nothing
    /// is left to kick and the last kick was [`FOLLOW_FOR`] ago.
    pub fn done(&self, now: SystemTime) -> bool {
        if !self.queue.is_empty() {
            return false;
        }
        let all_back = self.progress.values().all(|p| p.fresh_at.is_some());
        let since = self.last_kick.unwrap_or(self.meta.at);
        all_back || now.duration_since(since).unwrap_or_default() >= FOLLOW_FOR
    }

    /// Another failover replaced this one before it was done.
    pub fn interrupt(&mut self) {
        self.interrupted = true;
        self.queue.clear();
    }

    /// The record of this failover so far.
    pub fn report(&self, finished: bool) -> FailoverReport {
        let mut fresh: Vec<SystemTime> =
            self.progress.values().filter_map(|p| p.fresh_at).collect();
        fresh.sort_unstable();
        let total = self.progress.len();
        let quorum = (total as f64 * QUORUM).ceil() as usize;
        let since = |at: SystemTime| {
            at.duration_since(self.meta.at)
                .unwrap_or_default()
                .as_millis() as u64
        };
        let fresh_95_ms = match quorum {
            0 => Some(0),
            n if fresh.len() >= n => Some(since(fresh[n - 1])),
            _ => None,
        };
        let kicked = self
            .progress
            .values()
            .filter(|p| p.kicked_at.is_some())
            .count();
        let completed = self
            .progress
            .values()
            .filter(|p| matches!((p.kicked_at, p.fresh_at), (Some(k), Some(f)) if f >= k))
            .count();
        FailoverReport {
            meta: self.meta.clone(),
            recently_active: total,
            kicked,
            completed,
            fresh: fresh.len(),
            skipped: self.skipped,
            fresh_95_ms,
            last_kick_ms: self.last_kick.map(since),
            finished,
            interrupted: self.interrupted,
        }
    }

    /// When this gateway took the VIPs.
    pub fn started(&self) -> SystemTime {
        self.meta.at
    }

    /// Whether `key` was kicked less than [`KICK_GRACE`] before `handshake`
    /// (so that handshake is the kick's own).
    pub fn kicked_handshake(&self, key: &Key, handshake: SystemTime) -> bool {
        self.progress
            .get(key)
            .and_then(|p| p.kicked_at)
            .is_some_and(|kicked| {
                handshake >= kicked
                    && handshake.duration_since(kicked).unwrap_or_default() <= KICK_GRACE
            })
    }
}

/// How the clients came back after one failover, for `tidectl status` and
/// the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverReport {
    #[serde(flatten)]
    pub meta: FailoverMeta,
    /// Peers with a handshake within the kick window, in the config.
    pub recently_active: usize,
    /// Of those, how many were kicked.
    pub kicked: usize,
    /// Kicked peers that completed a handshake after their kick.
    pub completed: usize,
    /// Peers with a handshake after the failover (kicked or not).
    pub fresh: usize,
    /// Candidates not kicked: not in the config, not on the device, or the
    /// request failed.
    pub skipped: usize,
    /// From taking the VIPs until 95% of the recently active peers had a
    /// fresh handshake, in ms; `None` while fewer have.
    pub fresh_95_ms: Option<u64>,
    /// From taking the VIPs to the last kick, in ms.
    pub last_kick_ms: Option<u64>,
    /// Following is over.
    pub finished: bool,
    /// Another failover came first.
    pub interrupted: bool,
}

/// Reports kept.
pub const MAX_REPORTS: usize = 8;

/// The newest reports, oldest first.
pub fn keep(reports: &mut VecDeque<FailoverReport>, report: FailoverReport) {
    if reports.len() == MAX_REPORTS {
        reports.pop_front();
    }
    reports.push_back(report);
}

/// The peers of `desired` among `candidates`, with the device's view of
/// each: what a batch can kick.
pub fn resolve<'a>(
    batch: &[Candidate],
    desired: &'a BTreeMap<Key, PeerSpec>,
    actual: &Actual,
    now: SystemTime,
) -> Vec<(&'a PeerSpec, SocketAddr, Method)> {
    batch
        .iter()
        .filter_map(|c| {
            let spec = desired.get(&c.key)?;
            let have = actual.peers.get(&c.key)?;
            Some((spec, c.endpoint, method(have, now)))
        })
        .collect()
}

/// Serde for a `SystemTime` as Unix milliseconds.
mod unix_ms {
    use std::time::{Duration, SystemTime};

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(
            at.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        Ok(SystemTime::UNIX_EPOCH + Duration::from_millis(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wireguard::userspace;

    fn k(n: u8) -> Key {
        Key::new([n; 32])
    }

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + ms)
    }

    fn spec(n: u8, keepalive: Option<u16>) -> PeerSpec {
        PeerSpec {
            name: None,
            public_key: k(n),
            allowed_ips: [format!("10.77.0.{n}/32").parse().unwrap()].into(),
            preshared_key: Some(k(100 + n)),
            persistent_keepalive: keepalive,
            endpoint: None,
        }
    }

    fn candidate(n: u8, ms: u64) -> Candidate {
        Candidate {
            key: k(n),
            endpoint: format!("198.51.100.{n}:{}", 40_000 + u16::from(n))
                .parse()
                .unwrap(),
            last_handshake: at(ms),
        }
    }

    fn meta() -> FailoverMeta {
        FailoverMeta {
            at: at(10_000),
            cause: "master 2 down".into(),
            planned: false,
            detection_ms: Some(350),
            vip_move_ms: 3,
        }
    }

    #[test]
    fn a_peer_with_a_live_session_here_is_readded_others_get_a_keepalive() {
        let now = at(200_000);
        let peer = |handshake: Option<u64>| ActualPeer {
            last_handshake: handshake.map(at),
            ..ActualPeer::default()
        };
        assert_eq!(method(&peer(None), now), Method::Keepalive);
        assert_eq!(method(&peer(Some(0)), now), Method::Keepalive);
        assert_eq!(method(&peer(Some(100_000)), now), Method::Readd);
    }

    #[test]
    fn the_requests_toggle_keepalives_and_restore_them() {
        let quiet = spec(1, None);
        let chatty = spec(2, Some(25));
        let e1: SocketAddr = "198.51.100.1:40001".parse().unwrap();
        let e2: SocketAddr = "198.51.100.2:40002".parse().unwrap();
        let (kick, restore) = plans(&[
            (&quiet, e1, Method::Keepalive),
            (&chatty, e2, Method::Readd),
        ]);
        let text: String = userspace::requests(&kick)
            .iter()
            .map(ToString::to_string)
            .collect();
        let hex = |n: u8| format!("{n:02x}").repeat(32);
        assert_eq!(
            text,
            format!(
                "public_key={k1}\nupdate_only=true\nendpoint=198.51.100.1:40001\n\
                 persistent_keepalive_interval=0\n\
                 public_key={k1}\nupdate_only=true\npersistent_keepalive_interval=1\n\
                 public_key={k2}\nremove=true\n\
                 public_key={k2}\npreshared_key={psk}\nendpoint=198.51.100.2:40002\n\
                 persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
                 allowed_ip=10.77.0.2/32\n",
                k1 = hex(1),
                k2 = hex(2),
                psk = hex(102),
            )
        );
        let text = userspace::requests(&restore)[0].to_string();
        assert_eq!(
            text,
            format!(
                "public_key={}\nupdate_only=true\npersistent_keepalive_interval=0\n",
                hex(1)
            )
        );
        let (_, nothing) = plans(&[(&chatty, e2, Method::Keepalive)]);
        assert!(nothing.is_empty());
    }

    #[test]
    fn a_run_kicks_in_order_and_times_the_return() {
        let candidates: Vec<Candidate> = (1..=20)
            .map(|n| candidate(n, 9_000 - u64::from(n)))
            .collect();
        // Peer 20 left the config.
        let mut run = FailoverRun::new(meta(), candidates, |key| *key != k(20));
        assert_eq!(run.pending(), 19);
        let first = run.next_batch(10);
        assert_eq!(
            first.iter().map(|c| c.key).collect::<Vec<_>>(),
            (1..=10).map(k).collect::<Vec<_>>()
        );
        run.kicked(first.iter().map(|c| c.key), at(10_005));
        let rest = run.next_batch(10);
        assert_eq!(rest.len(), 9);
        run.kicked(rest.iter().map(|c| c.key), at(10_025));
        assert!(!run.done(at(10_030)));

        // Peers come back 10 ms apart from 10_040 on; one never does.
        let mut actual = Actual::default();
        for n in 1..=18u8 {
            actual.peers.insert(
                k(n),
                ActualPeer {
                    last_handshake: Some(at(10_030 + 10 * u64::from(n))),
                    ..ActualPeer::default()
                },
            );
        }
        // Peer 19 still shows its handshake from before the failover.
        actual.peers.insert(
            k(19),
            ActualPeer {
                last_handshake: Some(at(9_000)),
                ..ActualPeer::default()
            },
        );
        run.observe(&actual);
        let report = run.report(false);
        assert_eq!(report.recently_active, 19);
        assert_eq!(report.kicked, 19);
        assert_eq!(
            (report.completed, report.fresh, report.skipped),
            (18, 18, 1)
        );
        // 95% of 19 is 18.05: 19 peers are needed, and one is missing.
        assert_eq!(report.fresh_95_ms, None);
        assert_eq!(report.last_kick_ms, Some(25));
        assert!(!run.done(at(10_030)));
        assert!(run.done(at(10_025) + FOLLOW_FOR));

        actual.peers.get_mut(&k(19)).unwrap().last_handshake = Some(at(10_500));
        run.observe(&actual);
        let report = run.report(true);
        assert_eq!(report.fresh_95_ms, Some(500));
        assert!(run.done(at(10_600)));
        assert!(run.kicked_handshake(&k(19), at(10_500)));
        assert!(!run.kicked_handshake(&k(19), at(10_025) + KICK_GRACE + Duration::from_millis(1)));
        assert!(!run.kicked_handshake(&k(20), at(10_500)));
    }

    #[test]
    fn with_kicks_off_the_peers_are_only_followed() {
        let mut run = FailoverRun::new(meta(), vec![candidate(1, 9_000)], |_| true);
        run.kick_none();
        assert_eq!(run.pending(), 0);
        assert!(run.next_batch(10).is_empty());
        assert!(!run.done(at(10_001)));
        assert!(run.done(at(10_000) + FOLLOW_FOR));
        let report = run.report(true);
        assert_eq!(
            (report.recently_active, report.kicked, report.skipped),
            (1, 0, 1)
        );
    }

    #[test]
    fn an_empty_failover_is_done_at_once_and_reports_are_bounded() {
        let run = FailoverRun::new(meta(), Vec::new(), |_| true);
        assert!(run.done(at(10_000)));
        let report = run.report(true);
        assert_eq!((report.recently_active, report.fresh_95_ms), (0, Some(0)));
        let mut reports = VecDeque::new();
        for _ in 0..MAX_REPORTS + 3 {
            keep(&mut reports, report.clone());
        }
        assert_eq!(reports.len(), MAX_REPORTS);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["at"], 1_700_000_010_000_u64);
        assert_eq!(json["cause"], "master 2 down");
    }

    #[test]
    fn a_kick_is_the_same_operations_on_the_kernel() {
        use tidegate_wireguard::{
            kernel::{allowed_addrs, requests},
            spec::PeerSpec,
        };
        use wireguard_uapi::linux::set::WgPeerF;
        let spec = PeerSpec {
            name: None,
            public_key: Key::new([4; 32]),
            allowed_ips: ["10.77.0.4/32".parse().unwrap()].into(),
            preshared_key: None,
            persistent_keepalive: None,
            endpoint: None,
        };
        let endpoint = "198.51.100.4:40004".parse().unwrap();
        let (readd, restore) = plans(&[(&spec, endpoint, Method::Readd)]);
        let allowed = allowed_addrs(&readd);
        let kick = requests("wg0", &readd, &allowed);
        let [remove, add] = &kick[0].peers[..] else {
            panic!("two peer entries: {:?}", kick[0].peers);
        };
        // The same key twice in one message: removed (its sessions with
        // it), then added with the endpoint and a keepalive that sends at
        // once.
        assert_eq!((remove.public_key, add.public_key), (&[4; 32], &[4; 32]));
        assert_eq!(remove.flags, vec![WgPeerF::RemoveMe]);
        assert_eq!(add.flags, vec![WgPeerF::ReplaceAllowedIps]);
        assert_eq!(add.persistent_keepalive_interval, Some(1));
        assert_eq!(
            add.endpoint.map(ToString::to_string).as_deref(),
            Some("198.51.100.4:40004")
        );
        let allowed = allowed_addrs(&restore);
        let restore = requests("wg0", &restore, &allowed);
        assert_eq!(restore[0].peers[0].flags, vec![WgPeerF::UpdateOnly]);
        assert_eq!(restore[0].peers[0].persistent_keepalive_interval, Some(0));

        let (toggle, _) = plans(&[(&spec, endpoint, Method::Keepalive)]);
        let allowed = allowed_addrs(&toggle);
        let toggle = requests("wg0", &toggle, &allowed);
        let intervals: Vec<Option<u16>> = toggle[0]
            .peers
            .iter()
            .map(|p| p.persistent_keepalive_interval)
            .collect();
        assert_eq!(intervals, [Some(0), Some(1)]);
    }
}
