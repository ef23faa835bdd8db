//! The metrics endpoint every daemon serves: `GET /metrics` on the address
//! its config names (off unless it names one), in the OpenMetrics text
//! format, or Prometheus' classic text format for a client that does not
//! ask for OpenMetrics (curl, `promtool check metrics`).

use std::{future::Future, net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus_client::{encoding::text, registry::Registry};
use tokio::net::TcpListener;
use tracing::info;

/// The content type of an OpenMetrics answer.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of a classic Prometheus text answer.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The metrics endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("binding the metrics endpoint on {address} ({field})")]
    Bind {
        address: SocketAddr,
        /// The config field that names the address.
        field: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Parses a `listen` value: an IP address and a port other than 0. The
/// error is the reason, for the config's own error naming the field.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let address: SocketAddr = text.parse().map_err(|_| {
        format!("{text:?} is not an address and port such as \"127.0.0.1:9771\" or \"[::1]:9771\"")
    })?;
    if address.port() == 0 {
        return Err(format!("{text:?}: port 0 is not a port to scrape"));
    }
    Ok(address)
}

/// Encodes `registries`, in order, as one OpenMetrics exposition.
pub fn encode(registries: &[&Registry]) -> String {
    let mut out = String::new();
    for registry in registries {
        text::encode_registry(&mut out, registry).expect("writing to a String cannot fail");
    }
    text::encode_eof(&mut out).expect("writing to a String cannot fail");
    out
}

/// Rewrites an OpenMetrics exposition in Prometheus' classic text format
/// (0.0.4): a counter family `x` with samples `x_total` is named
/// `x_total` in its HELP and TYPE lines, and the `# UNIT` and `# EOF`
/// lines, which that format has not, are left out.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut counters = std::collections::BTreeSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.insert(name.to_owned());
        }
    }
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(line.trim_end()),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Whether a scraper that sent `headers` takes OpenMetrics.
fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("application/openmetrics-text"))
}

/// What renders one scrape: reads the published snapshots and encodes.
pub trait Render: Send + Sync + 'static {
    /// The exposition, in the OpenMetrics text format.
    fn render(&self) -> impl Future<Output = String> + Send;
}

/// A bound metrics endpoint.
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
}

impl MetricsServer {
    /// Binds `address`; `field` names it in the config, for the error.
    pub async fn bind(address: SocketAddr, field: &'static str) -> Result<Self, MetricsError> {
        let listener = TcpListener::bind(address)
            .await
            .map_err(|source| MetricsError::Bind {
                address,
                field,
                source,
            })?;
        Ok(Self { listener })
    }

    /// The address bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Answers scrapes until `shutdown` resolves.
    pub async fn serve<R: Render>(
        self,
        render: R,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        if let Ok(address) = self.listener.local_addr() {
            info!(%address, "metrics endpoint: /metrics");
        }
        let app = Router::new()
            .route("/metrics", get(scrape::<R>))
            .with_state(Arc::new(render));
        axum::serve(self.listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    }
}

async fn scrape<R: Render>(State(render): State<Arc<R>>, headers: HeaderMap) -> Response {
    let body = render.render().await;
    let (body, content_type) = if wants_openmetrics(&headers) {
        (body, OPENMETRICS)
    } else {
        (to_prometheus_text(&body), PROMETHEUS_TEXT)
    };
    let mut response = (StatusCode::OK, body).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        let cases: &[(&str, Result<&str, &str>)] = &[
            ("127.0.0.1:9771", Ok("127.0.0.1:9771")),
            ("[::1]:9772", Ok("[::1]:9772")),
            ("0.0.0.0:9773", Ok("0.0.0.0:9773")),
            ("127.0.0.1:0", Err("port 0")),
            ("localhost:9771", Err("not an address")),
            ("127.0.0.1", Err("not an address")),
            ("", Err("not an address")),
        ];
        for (text, expect) in cases {
            match (parse_listen(text), expect) {
                (Ok(got), Ok(want)) => assert_eq!(got.to_string(), *want, "{text:?}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{text:?}: {got}"),
                (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn classic_text_names_counters_by_their_samples() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "counter",
                "# HELP a_things Things.\n# TYPE a_things counter\na_things_total 3\n# EOF\n",
                "# HELP a_things_total Things.\n# TYPE a_things_total counter\na_things_total 3\n",
            ),
            (
                "gauge and unit",
                "# HELP b_seconds Age.\n# TYPE b_seconds gauge\n# UNIT b_seconds seconds\nb_seconds 1.5\n# EOF\n",
                "# HELP b_seconds Age.\n# TYPE b_seconds gauge\nb_seconds 1.5\n",
            ),
            (
                "a gauge named like a counter's prefix stays",
                "# HELP c Count.\n# TYPE c counter\nc_total 1\n# HELP c_x X.\n# TYPE c_x gauge\nc_x 2\n# EOF\n",
                "# HELP c_total Count.\n# TYPE c_total counter\nc_total 1\n# HELP c_x X.\n# TYPE c_x gauge\nc_x 2\n",
            ),
        ];
        for (name, input, want) in cases {
            assert_eq!(to_prometheus_text(input), *want, "{name}");
        }
    }

    #[test]
    fn openmetrics_only_when_asked() {
        let cases: &[(Option<&str>, bool)] = &[
            (None, false),
            (Some("*/*"), false),
            (Some("text/plain;version=0.0.4"), false),
            (
                Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
                true,
            ),
        ];
        for (accept, want) in cases {
            let mut headers = HeaderMap::new();
            if let Some(accept) = accept {
                headers.insert(header::ACCEPT, HeaderValue::from_str(accept).unwrap());
            }
            assert_eq!(wants_openmetrics(&headers), *want, "{accept:?}");
        }
    }
}
