//! Scraping a daemon's `/metrics` and checking it as Prometheus would:
//! `promtool check metrics` (Debian's `prometheus` package) lints the
//! exposition, and [`sample`] reads one series' value.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};

use crate::http;
use crate::netns::Netns;

/// `GET /metrics` on `address` from inside `netns`, in Prometheus' text
/// format (the tests' client does not ask for OpenMetrics).
pub fn scrape(netns: &Netns, address: SocketAddr) -> Result<String> {
    let answer = netns
        .run(|| http::get(address, "/metrics"))?
        .with_context(|| format!("scraping http://{address}/metrics"))?;
    ensure!(
        answer.status == 200,
        "http://{address}/metrics answered {}: {}",
        answer.status,
        answer.body
    );
    let content_type = answer.header("content-type").unwrap_or_default();
    ensure!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "http://{address}/metrics: content type {content_type:?}"
    );
    Ok(answer.body)
}

/// Runs `promtool check metrics` on `exposition`; fails with what it
/// reports (a badly named metric, a missing help text, a parse error).
pub fn promtool_check(exposition: &str) -> Result<()> {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context(
            "running promtool (Debian's prometheus package; `cargo xtask test` installs it)",
        )?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(exposition.as_bytes())
        .context("writing to promtool")?;
    let output = child.wait_with_output().context("waiting for promtool")?;
    if !output.status.success() {
        bail!(
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The value of the series `series` (its name and labels exactly as the
/// exposition writes them, e.g. `tidegate_ha_role{role="master"}`).
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        let value = rest.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// Like [`sample`], failing when the series is missing.
pub fn value(exposition: &str, series: &str) -> Result<f64> {
    sample(exposition, series)
        .with_context(|| format!("no series {series} in the scrape:\n{exposition}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_by_exact_series() {
        let text = "# TYPE a counter\na_total 3\na_total{x=\"1\"} 4\nab_total 5\nh_bucket{le=\"+Inf\"} 2\n";
        let cases: &[(&str, Option<f64>)] = &[
            ("a_total", Some(3.0)),
            ("a_total{x=\"1\"}", Some(4.0)),
            ("ab_total", Some(5.0)),
            ("h_bucket{le=\"+Inf\"}", Some(2.0)),
            ("a", None),
            ("b_total", None),
        ];
        for (series, want) in cases {
            assert_eq!(sample(text, series), *want, "{series}");
        }
    }
}
