//! The Edge's Prometheus metrics: requests by route and status and their
//! latency, counted by a layer around the API's router, the state of the
//! link to Core, read from the relay's published state at each scrape, and
//! the requests refused because no Core led, which the relay counts.

use std::{sync::Arc, time::Instant};

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::Response,
};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

use crate::relay::RelayHandle;

/// Latency buckets, in seconds: `/health` answers at once; the API waits
/// for Core, and an MFA login for the gateways too.
const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// The API's routes, as label values; any other path is `other`.
const ROUTES: [&str; 5] = [
    "/health",
    "/api/v1/device-config",
    "/api/v1/enrol",
    "/api/v1/mfa/start",
    "/api/v1/mfa/finish",
];

/// A request path as a label value: the route it names, or `other` (a
/// scanner's paths must not make new series).
pub fn route_label(path: &str) -> &'static str {
    ROUTES
        .iter()
        .find(|route| **route == path)
        .copied()
        .unwrap_or("other")
}

type Labels = Vec<(&'static str, String)>;

/// Histograms per route, with the Edge's buckets.
fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

/// The metrics the Edge counts.
#[derive(Debug)]
pub struct EdgeMetrics {
    registry: Registry,
    requests: Family<Labels, Counter>,
    latency: Family<Labels, Histogram, fn() -> Histogram>,
}

impl Default for EdgeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl EdgeMetrics {
    /// Registers every metric the HTTP layer counts.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tidegate_edge");
        let requests = Family::<Labels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by route and status code",
            requests.clone(),
        );
        let latency =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register_with_unit(
            "http_request_duration",
            "Time from a request's head to its answer, by route",
            Unit::Seconds,
            latency.clone(),
        );
        Self {
            registry,
            requests,
            latency,
        }
    }

    /// Counts one request to `path` answered with `status` after `seconds`.
    pub fn record(&self, path: &str, status: u16, seconds: f64) {
        let route = route_label(path);
        self.requests
            .get_or_create(&vec![
                ("route", route.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
        self.latency
            .get_or_create(&vec![("route", route.to_owned())])
            .observe(seconds);
    }
}

/// The router layer that counts every request (`axum::middleware::from_fn_with_state`).
pub async fn count(
    State(metrics): State<Arc<EdgeMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.record(
        &path,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

/// Renders a scrape of the Edge.
#[derive(Debug, Clone)]
pub struct Scraper {
    pub metrics: Arc<EdgeMetrics>,
    pub relay: RelayHandle,
}

impl tidegate_proto::metrics::Render for Scraper {
    async fn render(&self) -> String {
        let mut registry = Registry::with_prefix("tidegate_edge");
        let up = Gauge::<i64>::default();
        up.set(i64::from(self.relay.state().is_up()));
        registry.register("core_link_up", "1 while Core's link to this Edge is up", up);
        registry.register(
            "no_leader",
            "Requests answered 503 because no linked Core led at the highest term (a takeover under way)",
            self.relay.no_leader(),
        );
        tidegate_proto::metrics::encode(&[&self.metrics.registry, &registry])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_bounded() {
        let cases: &[(&str, &str)] = &[
            ("/health", "/health"),
            ("/api/v1/enrol", "/api/v1/enrol"),
            ("/api/v1/mfa/finish", "/api/v1/mfa/finish"),
            ("/api/v1/mfa/finish/", "other"),
            ("/wp-login.php", "other"),
            ("/", "other"),
            ("/api/v1/../health", "other"),
        ];
        for (path, want) in cases {
            assert_eq!(route_label(path), *want, "{path}");
        }
    }
}
