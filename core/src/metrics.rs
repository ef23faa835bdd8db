//! Core's Prometheus metrics: what the link tasks count as they go (MFA
//! logins, config push latency), and what a scrape reads from the links'
//! published states and the store (links by state, gateways by role,
//! locations).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use tokio::sync::watch;
use tracing::debug;

use crate::{links::Directory, state::StateHandle, store::ClientError};

/// Config push latency buckets, in seconds: a change is sent at once and
/// applied in milliseconds; a busy or slow gateway takes seconds.
const PUSH_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The roles a gateway reports, as label values; anything else (no
/// status yet, an unknown word) counts as `unknown`.
const ROLES: [&str; 5] = ["master", "backup", "fault", "init", "unknown"];

/// Why an MFA login failed, as a label value.
pub fn failure_reason(error: &ClientError) -> &'static str {
    match error {
        ClientError::Invalid(_) => "invalid",
        ClientError::Unauthorized(_) => "unauthorized",
        ClientError::NotFound(_) => "not-found",
        ClientError::Expired(_) => "expired",
        ClientError::Conflict(_) => "conflict",
        ClientError::Unavailable(_) => "unavailable",
        ClientError::Limited { .. } => "limited",
        ClientError::Internal(_) => "internal",
    }
}

/// A gateway's reported role, as a label value.
pub fn role_label(role: Option<&str>) -> &'static str {
    match role.map(str::to_ascii_lowercase).as_deref() {
        Some("master") => "master",
        Some("backup") => "backup",
        Some("fault") => "fault",
        Some("init") => "init",
        _ => "unknown",
    }
}

type Labels = Vec<(&'static str, String)>;

/// The metrics Core's tasks count.
#[derive(Debug)]
pub struct CoreMetrics {
    registry: Registry,
    /// MFA logins that gave the client its config; bumped by the link
    /// task that answered.
    pub mfa_logins: Counter,
    /// MFA logins refused, by reason.
    pub mfa_login_failures: Family<Labels, Counter>,
    /// From Core learning of a location's config change to a gateway's
    /// acknowledgement that it applied that version (or a later one);
    /// observed by the gateway's link task.
    pub config_push: Histogram,
}

impl Default for CoreMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CoreMetrics {
    /// Registers every metric the tasks count.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tidegate_core");
        let mfa_logins = Counter::default();
        registry.register(
            "mfa_logins",
            "MFA logins that gave the client its config",
            mfa_logins.clone(),
        );
        let mfa_login_failures = Family::<Labels, Counter>::default();
        registry.register(
            "mfa_login_failures",
            "MFA logins refused, by reason",
            mfa_login_failures.clone(),
        );
        // Every reason shows from the start, at 0.
        for reason in [
            "invalid",
            "unauthorized",
            "not-found",
            "expired",
            "conflict",
            "unavailable",
            "limited",
            "internal",
        ] {
            mfa_login_failures
                .get_or_create(&vec![("reason", reason.to_owned())])
                .inc_by(0);
        }
        let config_push = Histogram::new(PUSH_BUCKETS);
        registry.register_with_unit(
            "config_push",
            "Time from Core learning of a config change to a gateway acknowledging it applied that version",
            Unit::Seconds,
            config_push.clone(),
        );
        Self {
            registry,
            mfa_logins,
            mfa_login_failures,
            config_push,
        }
    }

    /// Counts an MFA login that failed with `error`.
    pub fn mfa_failed(&self, error: &ClientError) {
        self.mfa_login_failures
            .get_or_create(&vec![("reason", failure_reason(error).to_owned())])
            .inc();
    }

    /// Observes one config push that took `latency`.
    pub fn pushed(&self, latency: Duration) {
        self.config_push.observe(latency.as_secs_f64());
    }
}

/// Renders a scrape of Core from the links' published states and the
/// store.
#[derive(Debug, Clone)]
pub struct Scraper {
    pub metrics: Arc<CoreMetrics>,
    pub directory: watch::Receiver<Arc<Directory>>,
    pub state: StateHandle,
}

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

impl Scraper {
    async fn snapshot(&self) -> Registry {
        let mut registry = Registry::with_prefix("tidegate_core");
        let directory = self.directory.borrow().clone();
        let links = gauge_family(
            &mut registry,
            "links",
            "Links Core keeps, by peer kind (gateway, edge) and state (up, down)",
        );
        let mut counts: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        for kind in ["gateway", "edge"] {
            for state in ["up", "down"] {
                counts.insert((kind, state), 0);
            }
        }
        let mut roles: BTreeMap<&str, i64> = ROLES.iter().map(|r| (*r, 0)).collect();
        for gateway in directory.gateways.values() {
            let state = gateway.state.borrow();
            let up = if state.connected { "up" } else { "down" };
            *counts.entry(("gateway", up)).or_default() += 1;
            if state.connected {
                *roles.entry(role_label(state.role())).or_default() += 1;
            }
        }
        for edge in directory.edges.values() {
            let up = if edge.state.borrow().connected {
                "up"
            } else {
                "down"
            };
            *counts.entry(("edge", up)).or_default() += 1;
        }
        for ((kind, state), count) in counts {
            links
                .get_or_create(&vec![
                    ("kind", kind.to_owned()),
                    ("state", state.to_owned()),
                ])
                .set(count);
        }
        let by_role = gauge_family(
            &mut registry,
            "gateways",
            "Gateways with their link up, by the HA role they last reported",
        );
        for (role, count) in roles {
            by_role
                .get_or_create(&vec![("role", role.to_owned())])
                .set(count);
        }
        match self
            .state
            .call(|s| s.list_locations().map(|l| l.len()))
            .await
        {
            Ok(Ok(count)) => {
                let locations = Gauge::<i64>::default();
                locations.set(count as i64);
                registry.register("locations", "Locations in Core's store", locations);
            }
            Ok(Err(error)) => {
                debug!(error = %crate::error_chain(&error), "no location count for this scrape")
            }
            Err(error) => debug!(%error, "no location count for this scrape"),
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
    use super::*;

    #[test]
    fn roles_are_bounded() {
        let cases: &[(Option<&str>, &str)] = &[
            (Some("master"), "master"),
            (Some("MASTER"), "master"),
            (Some("backup"), "backup"),
            (Some("fault"), "fault"),
            (Some("init"), "init"),
            (Some("leader"), "unknown"),
            (Some(""), "unknown"),
            (None, "unknown"),
        ];
        for (role, want) in cases {
            assert_eq!(role_label(*role), *want, "{role:?}");
            assert!(ROLES.contains(want));
        }
    }

    #[test]
    fn failure_reasons_are_bounded() {
        let cases: &[(ClientError, &str)] = &[
            (
                ClientError::Unauthorized("wrong code".into()),
                "unauthorized",
            ),
            (ClientError::Expired("session".into()), "expired"),
            (
                ClientError::Limited {
                    message: "too many".into(),
                    retry_after_s: 30,
                },
                "limited",
            ),
            (ClientError::Unavailable("no gateway".into()), "unavailable"),
        ];
        for (error, want) in cases {
            assert_eq!(failure_reason(error), *want, "{error:?}");
        }
    }
}
