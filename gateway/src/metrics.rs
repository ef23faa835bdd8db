//! The gateway's Prometheus metrics: what its owners count as they go
//! (failover histograms, kicks), and what a scrape reads from their
//! published snapshots (the XDP and egress counters, the election, the
//! peers, the director).
//!
//! A scrape never reaches the HA agent's loop: the election's figures come
//! from the view the agent publishes after each step, the peers from the
//! table the WireGuard task publishes after each poll, and the XDP
//! counters from the datapath task, which answers after any lease renewal
//! it has pending (as for `tidectl counters`). The agent and the WireGuard
//! task bump their own metrics (atomics, or a histogram's short lock that
//! a scrape holds only while it encodes).

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use tidegate_common::stats::Counter as XdpCounter;
use tokio::sync::watch;
use tracing::debug;

use crate::{
    datapath::DatapathHandle,
    error_chain,
    ha::{agent::HaHandle, machine::Role},
    wireguard::LocalPeers,
};

/// Detection time buckets, in seconds: a master-down interval is 3
/// advert intervals plus a skew (about 0.35 s at 100 ms adverts).
const DETECTION_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0,
];
/// VIP move buckets, in seconds: netlink and the first announcement.
const VIP_MOVE_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];
/// Time until 95% of the clients are back, in seconds.
const CLIENTS_BACK_BUCKETS: [f64; 11] =
    [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0];

/// Every role, for the role gauge (one series per role, 1 for the one held).
const ROLES: [Role; 4] = [Role::Init, Role::Backup, Role::Master, Role::Fault];

/// The metrics the gateway's tasks count as they go.
#[derive(Debug)]
pub struct GatewayMetrics {
    registry: Registry,
    /// From the last advert heard of the old master to this gateway
    /// becoming master; observed by the HA agent on each takeover.
    pub failover_detection: Histogram,
    /// From becoming master to the VIPs on the interface and announced;
    /// observed by the HA agent on each move of the VIPs here.
    pub failover_vip_move: Histogram,
    /// From taking the VIPs to 95% of the recently active peers with a
    /// fresh handshake; observed by the WireGuard task when it stops
    /// following a failover in which that many came back.
    pub failover_clients_back: Histogram,
    /// Handshakes kicked after failovers; bumped by the WireGuard task.
    pub kicks: Counter,
}

impl Default for GatewayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayMetrics {
    /// Registers every metric the tasks count.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tidegate");
        let failover_detection = Histogram::new(DETECTION_BUCKETS);
        registry.register_with_unit(
            "failover_detection",
            "Time from the last advert heard of the old master to this gateway becoming master, per takeover",
            Unit::Seconds,
            failover_detection.clone(),
        );
        let failover_vip_move = Histogram::new(VIP_MOVE_BUCKETS);
        registry.register_with_unit(
            "failover_vip_move",
            "Time from becoming master to the VIPs on the public interface and announced, per failover to this gateway",
            Unit::Seconds,
            failover_vip_move.clone(),
        );
        let failover_clients_back = Histogram::new(CLIENTS_BACK_BUCKETS);
        registry.register_with_unit(
            "failover_clients_back",
            "Time from taking the VIPs until 95% of the recently active peers had a fresh handshake, per failover followed to its end",
            Unit::Seconds,
            failover_clients_back.clone(),
        );
        let kicks = Counter::default();
        registry.register(
            "wireguard_kicks",
            "Handshakes this gateway kicked after becoming master or inheriting clients",
            kicks.clone(),
        );
        Self {
            registry,
            failover_detection,
            failover_vip_move,
            failover_clients_back,
            kicks,
        }
    }

    /// Observes `duration` in `histogram`, in seconds.
    pub fn observe(histogram: &Histogram, duration: Duration) {
        histogram.observe(duration.as_secs_f64());
    }
}

/// A peer's last handshake, by age: the buckets follow WireGuard's own
/// times (a session is rekeyed after 2 minutes and unusable after 3) and
/// how long the location remembers an endpoint (10 minutes by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum HandshakeAge {
    /// Under 2 minutes: a live session.
    Under2m,
    /// 2 to 3 minutes: due for a rekey, still usable.
    Under3m,
    /// 3 to 10 minutes: no usable session; recently active.
    Under10m,
    /// 10 minutes or more.
    Older,
    /// No handshake (or no endpoint) on this gateway.
    Never,
}

impl HandshakeAge {
    /// Every bucket, in order.
    pub const ALL: [Self; 5] = [
        Self::Under2m,
        Self::Under3m,
        Self::Under10m,
        Self::Older,
        Self::Never,
    ];

    /// The bucket of a handshake at `last` seen at `now`; a handshake in
    /// the future (clocks) is live.
    pub fn of(last: Option<SystemTime>, now: SystemTime) -> Self {
        let Some(last) = last else {
            return Self::Never;
        };
        let age = now.duration_since(last).unwrap_or_default();
        match age.as_secs() {
            0..120 => Self::Under2m,
            120..180 => Self::Under3m,
            180..600 => Self::Under10m,
            _ => Self::Older,
        }
    }

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Under2m => "under-2m",
            Self::Under3m => "2m-3m",
            Self::Under10m => "3m-10m",
            Self::Older => "over-10m",
            Self::Never => "never",
        }
    }
}

/// Peers per handshake-age bucket, every bucket present: the configured
/// peers without a handshake here count as [`HandshakeAge::Never`].
pub fn handshake_ages(peers: &LocalPeers, now: SystemTime) -> [(HandshakeAge, u64); 5] {
    let mut counts = HandshakeAge::ALL.map(|age| (age, 0u64));
    for peer in &peers.active {
        let age = HandshakeAge::of(Some(peer.last_handshake), now);
        counts[age as usize].1 += 1;
    }
    let never = peers.configured.len().saturating_sub(peers.active.len()) as u64;
    counts[HandshakeAge::Never as usize].1 += never;
    counts
}

/// The role's label value.
fn role_label(role: Role) -> &'static str {
    match role {
        Role::Init => "init",
        Role::Backup => "backup",
        Role::Master => "master",
        Role::Fault => "fault",
    }
}

type Labels = Vec<(&'static str, String)>;

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let gauge = Gauge::<i64>::default();
    gauge.set(value);
    registry.register(name, help, gauge);
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Renders a scrape of the gateway from its owners' published state.
#[derive(Debug, Clone)]
pub struct Scraper {
    /// What the tasks count.
    pub metrics: Arc<GatewayMetrics>,
    pub datapath: DatapathHandle,
    /// `None` without `[ha]`.
    pub ha: Option<HaHandle>,
    /// The WireGuard task's published peers; `None` without `[wireguard]`.
    pub peers: Option<watch::Receiver<LocalPeers>>,
    /// The location runs in director mode.
    pub director: bool,
}

impl Scraper {
    /// The scrape-time metrics, in a registry of their own.
    async fn snapshot(&self) -> Registry {
        let mut registry = Registry::with_prefix("tidegate");
        match self.datapath.counters().await {
            Ok(counters) => {
                let packets = counter_family(
                    &mut registry,
                    "xdp_packets",
                    "Frames the XDP program handled, by verdict and reason",
                );
                let bytes = counter_family(
                    &mut registry,
                    "xdp_bytes",
                    "Bytes of the frames the XDP program handled, by verdict and reason",
                );
                for counter in XdpCounter::ALL {
                    let count = counters.snapshot.get(counter);
                    let labels = vec![
                        ("verdict", counter.verdict().name().to_owned()),
                        ("reason", counter.name().to_owned()),
                    ];
                    packets.get_or_create(&labels).inc_by(count.packets);
                    bytes.get_or_create(&labels).inc_by(count.bytes);
                }
                if let Some(egress) = &counters.egress {
                    let packets = counter_family(
                        &mut registry,
                        "egress_packets",
                        "Packets the egress guard handled, by outcome",
                    );
                    let bytes = counter_family(
                        &mut registry,
                        "egress_bytes",
                        "Bytes of the packets the egress guard handled, by outcome",
                    );
                    for (name, count) in &egress.counters {
                        let labels = vec![("outcome", name.clone())];
                        packets.get_or_create(&labels).inc_by(count.packets);
                        bytes.get_or_create(&labels).inc_by(count.bytes);
                    }
                }
            }
            Err(error) => debug!(error = %error_chain(&error), "no XDP counters for this scrape"),
        }
        if let Some(ha) = &self.ha {
            let view = ha.metrics_view();
            let roles = gauge_family(
                &mut registry,
                "ha_role",
                "1 for the HA role this gateway holds, 0 for the others",
            );
            for role in ROLES {
                roles
                    .get_or_create(&vec![("role", role_label(role).to_owned())])
                    .set(i64::from(role == view.role));
            }
            gauge(
                &mut registry,
                "ha_priority",
                "The priority this gateway advertises, after the penalties of tracked interfaces",
                i64::from(view.priority),
            );
            gauge(
                &mut registry,
                "ha_gateways_heard",
                "Other gateways of the location this gateway hears adverts from",
                view.gateways_heard as i64,
            );
            let transitions = counter_family(
                &mut registry,
                "ha_transitions",
                "Changes of HA role, by the role left, the role taken and why",
            );
            for ((from, to, kind), count) in &view.transitions {
                transitions
                    .get_or_create(&vec![
                        ("from", role_label(*from).to_owned()),
                        ("to", role_label(*to).to_owned()),
                        ("reason", kind.name().to_owned()),
                    ])
                    .inc_by(*count);
            }
            let dropped = counter_family(
                &mut registry,
                "ha_adverts_dropped",
                "Adverts dropped by the agent or the advert socket's queue, by reason",
            );
            for (reason, count) in &view.dropped {
                dropped
                    .get_or_create(&vec![("reason", reason.clone())])
                    .inc_by(*count);
            }
            if let Some(fence) = view.fence {
                gauge(
                    &mut registry,
                    "ha_lease_holds_vips",
                    "1 while the lease the agent renews lets this gateway answer for the VIPs",
                    i64::from(fence.holds_vips),
                );
                let left = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
                left.set(fence.lease_left_ms as f64 / 1000.0);
                registry.register_with_unit(
                    "ha_lease_left",
                    "Time the lease the XDP fence holds has left, as last renewed",
                    Unit::Seconds,
                    left,
                );
            }
        }
        if let Some(peers) = &self.peers {
            let peers = peers.borrow().clone();
            gauge(
                &mut registry,
                "wireguard_peers",
                "Peers of the location's WireGuard interface",
                peers.configured.len() as i64,
            );
            let ages = gauge_family(
                &mut registry,
                "wireguard_peers_by_handshake_age",
                "Peers by the age of their last handshake on this gateway (disjoint buckets)",
            );
            for (age, count) in handshake_ages(&peers, SystemTime::now()) {
                ages.get_or_create(&vec![("age", age.label().to_owned())])
                    .set(to_i64(count));
            }
        }
        if self.director {
            match self.datapath.director_status().await {
                Ok(status) => {
                    gauge(
                        &mut registry,
                        "director_steering",
                        "1 while this gateway's director steers (it is the master)",
                        i64::from(status.on),
                    );
                    let backends = gauge_family(
                        &mut registry,
                        "director_backends",
                        "Gateways the director knows, by state",
                    );
                    let (mut serving, mut draining) = (0, 0);
                    let entries = gauge_family(
                        &mut registry,
                        "director_table_entries",
                        "Maglev table entries that name each gateway",
                    );
                    let pins = counter_family(
                        &mut registry,
                        "director_pins",
                        "Clients the director pinned to each gateway (new pins and re-pins)",
                    );
                    for backend in &status.backends {
                        if backend.present {
                            if backend.draining {
                                draining += 1;
                            } else {
                                serving += 1;
                            }
                        }
                        let labels = vec![("gateway_id", backend.gateway_id.to_string())];
                        entries
                            .get_or_create(&labels)
                            .set(i64::from(backend.table_entries));
                        pins.get_or_create(&labels).inc_by(backend.new_pins);
                    }
                    backends
                        .get_or_create(&vec![("state", "serving".to_owned())])
                        .set(serving);
                    backends
                        .get_or_create(&vec![("state", "draining".to_owned())])
                        .set(draining);
                }
                Err(error) => {
                    debug!(error = %error_chain(&error), "no director status for this scrape")
                }
            }
        }
        registry
    }
}

impl tidegate_proto::metrics::Render for Scraper {
    async fn render(&self) -> String {
        let snapshot = self.snapshot().await;
        tidegate_proto::metrics::encode(&[&self.metrics.registry, &snapshot])
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::wireguard::{Key, PeerEndpoint};

    #[test]
    fn handshake_age_buckets() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let ago = |secs| Some(now - Duration::from_secs(secs));
        let cases: &[(&str, Option<SystemTime>, HandshakeAge)] = &[
            ("none", None, HandshakeAge::Never),
            ("just now", ago(0), HandshakeAge::Under2m),
            (
                "in the future",
                Some(now + Duration::from_secs(5)),
                HandshakeAge::Under2m,
            ),
            ("119 s", ago(119), HandshakeAge::Under2m),
            ("120 s: due for a rekey", ago(120), HandshakeAge::Under3m),
            ("179 s", ago(179), HandshakeAge::Under3m),
            ("180 s: no usable session", ago(180), HandshakeAge::Under10m),
            ("599 s", ago(599), HandshakeAge::Under10m),
            ("600 s", ago(600), HandshakeAge::Older),
            ("a day", ago(86_400), HandshakeAge::Older),
        ];
        for (name, last, want) in cases {
            assert_eq!(HandshakeAge::of(*last, now), *want, "{name}");
        }
    }

    #[test]
    fn handshake_ages_count_every_configured_peer_once() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let key = |n: u8| Key::new([n; 32]);
        let endpoint: SocketAddr = "198.51.100.7:51820".parse().unwrap();
        let active = |n, secs| PeerEndpoint {
            key: key(n),
            endpoint,
            last_handshake: now - Duration::from_secs(secs),
            kicked: false,
        };
        let cases: &[(&str, u8, Vec<PeerEndpoint>, [u64; 5])] = &[
            ("no peer", 0, vec![], [0, 0, 0, 0, 0]),
            ("none active", 3, vec![], [0, 0, 0, 0, 3]),
            (
                "mixed",
                5,
                vec![active(1, 10), active(2, 150), active(3, 4000)],
                [1, 1, 0, 1, 2],
            ),
        ];
        for (name, configured, active, want) in cases {
            let peers = LocalPeers {
                configured: (1..=*configured).map(key).collect(),
                active: active.clone(),
                listen_port: 51820,
            };
            let got = handshake_ages(&peers, now).map(|(_, count)| count);
            assert_eq!(got, *want, "{name}");
        }
    }

    #[test]
    fn every_role_has_a_label() {
        let labels: Vec<&str> = ROLES.iter().map(|r| role_label(*r)).collect();
        assert_eq!(labels, ["init", "backup", "master", "fault"]);
    }
}
