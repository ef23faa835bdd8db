//! Prometheus metrics of every daemon, scraped for real: Core, two HA
//! gateways and an Edge behind nginx serve `/metrics`, `promtool check
//! metrics` accepts each scrape, and the figures match what the location
//! does; a master's crash moves the new master's failover histograms by
//! exactly one failover, with sane times.

use std::time::Duration;

use anyhow::{Result, ensure};
use tidegate_tests::control::{ControlLab, ControlOptions, LOCATION};
use tidegate_tests::metrics::{promtool_check, sample, value};
use tidegate_tests::wait::{Probe, poll_until};

#[test]
fn every_daemon_serves_metrics_that_promtool_accepts() -> Result<()> {
    let mut lab = ControlLab::build(&ControlOptions {
        gateways: 2,
        edges: 1,
        metrics: true,
        ..ControlOptions::default()
    })?;
    let master = lab.wait_master(Duration::from_secs(10))?;
    // A request through nginx, for the Edge's request counter.
    let health = lab.api("GET", "/health", None)?;
    ensure!(health.status == 200, "/health answered {}", health.status);

    for i in 1..=2 {
        let scrape = lab.metrics_of_gateway(i)?;
        promtool_check(&scrape).map_err(|e| e.context(format!("gw{i}'s scrape")))?;
        let is_master = f64::from(u8::from(i == master));
        ensure!(
            value(&scrape, "tidegate_ha_role{role=\"master\"}")? == is_master,
            "gw{i}: the role gauge says otherwise (master is gw{master})"
        );
        ensure!(value(&scrape, "tidegate_ha_gateways_heard")? == 1.0);
        ensure!(
            value(&scrape, "tidegate_ha_lease_holds_vips")? == is_master,
            "gw{i}: the lease gauge"
        );
        ensure!(
            scrape.contains("tidegate_xdp_packets_total{verdict=\"pass\""),
            "gw{i}: no XDP counters:\n{scrape}"
        );
        ensure!(value(&scrape, "tidegate_wireguard_peers")? == 0.0);
    }

    // A device with its key: a peer for the location, which Core pushes
    // to both gateways and times until each acknowledges it.
    let core = lab.core()?;
    core.tidectl_json(&["user", "create", "alice"])?;
    core.tidectl_ok(&[
        "device",
        "create",
        "laptop",
        "--user",
        "alice",
        "--location",
        LOCATION,
        "--public-key",
        "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=",
    ])?;

    // Core: both gateway links and the Edge's up, one master, the push
    // acknowledged by both gateways.
    let core = poll_until(
        "Core's links up and the push acknowledged in its metrics",
        Duration::from_secs(10),
        Duration::from_millis(100),
        || {
            let scrape = lab.metrics_of_core()?;
            let up = sample(
                &scrape,
                "tidegate_core_links{kind=\"gateway\",state=\"up\"}",
            );
            let edges = sample(&scrape, "tidegate_core_links{kind=\"edge\",state=\"up\"}");
            let masters = sample(&scrape, "tidegate_core_gateways{role=\"master\"}");
            let pushes = sample(&scrape, "tidegate_core_config_push_seconds_count");
            Ok(match (up, edges, masters, pushes) {
                (Some(2.0), Some(1.0), Some(1.0), Some(2.0)) => Probe::Ready(scrape),
                other => Probe::NotYet(format!(
                    "gateways up, edges up, masters, pushes acknowledged: {other:?}"
                )),
            })
        },
    )?;
    promtool_check(&core).map_err(|e| e.context("Core's scrape"))?;
    ensure!(value(&core, "tidegate_core_locations")? == 1.0);
    ensure!(value(&core, "tidegate_core_mfa_logins_total")? == 0.0);
    ensure!(
        value(
            &core,
            "tidegate_core_mfa_login_failures_total{reason=\"unauthorized\"}"
        )? == 0.0
    );
    let push = value(&core, "tidegate_core_config_push_seconds_sum")?;
    ensure!(
        (0.0..5.0).contains(&push),
        "two pushes took {push} s in all"
    );

    // The gateways run the new peer, which never made a handshake.
    for i in 1..=2 {
        let scrape = lab.metrics_of_gateway(i)?;
        ensure!(
            value(&scrape, "tidegate_wireguard_peers")? == 1.0,
            "gw{i}: peers"
        );
        let never = "tidegate_wireguard_peers_by_handshake_age{age=\"never\"}";
        ensure!(value(&scrape, never)? == 1.0, "gw{i}: {never}");
    }

    // The Edge: linked, and the request counted by route and status.
    let edge = lab.metrics_of_edge(1)?;
    promtool_check(&edge).map_err(|e| e.context("the Edge's scrape"))?;
    ensure!(value(&edge, "tidegate_edge_core_link_up")? == 1.0);
    ensure!(
        value(
            &edge,
            "tidegate_edge_http_requests_total{route=\"/health\",status=\"200\"}"
        )? >= 1.0
    );
    ensure!(
        value(
            &edge,
            "tidegate_edge_http_request_duration_seconds_count{route=\"/health\"}"
        )? >= 1.0
    );
    Ok(())
}

/// One failover's share of a histogram: the change of `_count`, `_sum`
/// and one bucket between two scrapes.
fn moved(before: &str, after: &str, series: &str) -> Result<f64> {
    Ok(value(after, series)? - value(before, series)?)
}

#[test]
fn a_crash_moves_the_new_masters_failover_histograms_by_one() -> Result<()> {
    let mut lab = ControlLab::build(&ControlOptions {
        gateways: 2,
        edges: 0,
        start_core: false,
        metrics: true,
        ..ControlOptions::default()
    })?;
    let master = lab.wait_master(Duration::from_secs(10))?;
    let next = if master == 1 { 2 } else { 1 };
    let before = lab.metrics_of_gateway(next)?;
    lab.gateway_mut(master).crash()?;
    poll_until(
        "the backup takes over",
        Duration::from_secs(10),
        Duration::from_millis(50),
        || {
            let role = lab.gateway_mut(next).role()?;
            Ok(if role == "master" {
                Probe::Ready(())
            } else {
                Probe::NotYet(role)
            })
        },
    )?;
    let after = lab.metrics_of_gateway(next)?;
    promtool_check(&after)?;

    let detection = "tidegate_failover_detection_seconds";
    let vip_move = "tidegate_failover_vip_move_seconds";
    for histogram in [detection, vip_move] {
        let count = moved(&before, &after, &format!("{histogram}_count"))?;
        ensure!(count == 1.0, "{histogram}_count moved by {count}, not one");
    }
    // Adverts every 100 ms: a master-down interval is 300 ms plus a skew.
    let detected = moved(&before, &after, &format!("{detection}_sum"))?;
    ensure!(
        (0.3..2.0).contains(&detected),
        "detection took {detected} s"
    );
    let under_100ms = moved(
        &before,
        &after,
        &format!("{detection}_bucket{{le=\"0.1\"}}"),
    )?;
    let under_2s = moved(
        &before,
        &after,
        &format!("{detection}_bucket{{le=\"2.0\"}}"),
    )?;
    ensure!(
        (under_100ms, under_2s) == (0.0, 1.0),
        "detection buckets moved: le=0.1 by {under_100ms}, le=2.0 by {under_2s}"
    );
    let vip = moved(&before, &after, &format!("{vip_move}_sum"))?;
    ensure!((0.0..0.5).contains(&vip), "the VIP move took {vip} s");
    let vip_under_half = moved(&before, &after, &format!("{vip_move}_bucket{{le=\"0.5\"}}"))?;
    ensure!(
        vip_under_half == 1.0,
        "VIP move bucket le=0.5 moved by {vip_under_half}"
    );
    let transitions = moved(
        &before,
        &after,
        "tidegate_ha_transitions_total{from=\"backup\",to=\"master\",reason=\"master-down\"}",
    )
    .or_else(|_| {
        value(
            &after,
            "tidegate_ha_transitions_total{from=\"backup\",to=\"master\",reason=\"master-down\"}",
        )
    })?;
    ensure!(
        transitions == 1.0,
        "backup -> master counted {transitions} times"
    );
    ensure!(value(&after, "tidegate_ha_role{role=\"master\"}")? == 1.0);
    ensure!(value(&after, "tidegate_ha_gateways_heard")? <= 1.0);
    Ok(())
}
