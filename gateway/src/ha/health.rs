//! The gateway's own health, from netlink link events: the public link up
//! with a carrier and the XDP program on it, and the WireGuard interface up.
//! Any of these failing makes the gateway FAULT at once. Tracked interfaces
//! (an uplink, say) lower the priority by their weight while they are down.
//! Link events are the trigger; a slow re-check catches what the kernel
//! does not announce.

use std::time::Duration;

use futures::StreamExt as _;
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkFlags, LinkMessage, LinkXdp, XdpAttached},
};
use netlink_sys::{AsyncSocket as _, SocketAddr};
use rtnetlink::{Handle, constants::RTMGRP_LINK, packet_core::NetlinkPayload};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often links are re-read even without an event.
const RECHECK: Duration = Duration::from_secs(1);

/// The health watch could not start.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("opening a netlink socket for link events")]
    Connect(#[source] std::io::Error),
}

/// The links a gateway's health depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    /// The public interface; the XDP program must be on it.
    pub public: String,
    /// The WireGuard interface, when the daemon runs one.
    pub wireguard: Option<String>,
    /// Interfaces whose failure costs priority, with their weights.
    pub tracked: Vec<(String, u8)>,
}

/// A change the agent must hear of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthEvent {
    /// Healthy or not (FAULT), and why.
    Fault { healthy: bool, reason: String },
    /// The points failing tracked interfaces take off the priority, and why.
    Penalty { points: u8, reason: String },
}

/// What one link looks like, as far as health goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkHealth {
    pub up: bool,
    pub carrier: bool,
    pub xdp: bool,
}

impl LinkHealth {
    fn of(message: &LinkMessage) -> Self {
        let flags = message.header.flags;
        let xdp = message.attributes.iter().any(|a| match a {
            LinkAttribute::Xdp(xdp) => xdp
                .iter()
                .any(|x| matches!(x, LinkXdp::Attached(att) if *att != XdpAttached::None)),
            _ => false,
        });
        Self {
            up: flags.contains(LinkFlags::Up),
            carrier: flags.contains(LinkFlags::LowerUp),
            xdp,
        }
    }
}

/// The verdict on the watched links: `Ok` or the first problem, in words.
pub fn verdict(
    watched: &Watched,
    public: Option<LinkHealth>,
    wireguard: Option<LinkHealth>,
) -> Result<(), String> {
    let name = &watched.public;
    match public {
        None => return Err(format!("public interface {name} is gone")),
        Some(link) if !link.up => return Err(format!("public interface {name} is down")),
        Some(link) if !link.carrier => {
            return Err(format!("public interface {name} has no carrier"));
        }
        Some(link) if !link.xdp => {
            return Err(format!("the XDP program is not attached to {name}"));
        }
        Some(_) => {}
    }
    if let Some(name) = &watched.wireguard {
        match wireguard {
            None => return Err(format!("WireGuard interface {name} is gone")),
            Some(link) if !link.up => return Err(format!("WireGuard interface {name} is down")),
            Some(_) => {}
        }
    }
    Ok(())
}

/// The penalty of the tracked interfaces that are down or gone, and which.
pub fn penalty(watched: &Watched, links: &[Option<LinkHealth>]) -> (u8, String) {
    let down: Vec<&(String, u8)> = watched
        .tracked
        .iter()
        .zip(links)
        .filter(|(_, link)| !link.is_some_and(|l| l.up && l.carrier))
        .map(|(tracked, _)| tracked)
        .collect();
    let points = down
        .iter()
        .fold(0u8, |sum, (_, weight)| sum.saturating_add(*weight));
    let reason = if down.is_empty() {
        "every tracked interface is up".to_owned()
    } else {
        let names: Vec<String> = down
            .iter()
            .map(|(name, weight)| format!("{name} (-{weight})"))
            .collect();
        format!("tracked interfaces down: {}", names.join(", "))
    };
    (points, reason)
}

/// Watches the links until `cancel` fires, telling the agent of every
/// change (it starts out assuming healthy, with no penalty).
pub async fn watch(
    watched: Watched,
    tx: mpsc::Sender<HealthEvent>,
    cancel: CancellationToken,
) -> Result<(), HealthError> {
    let (mut connection, handle, mut events) =
        rtnetlink::new_connection().map_err(HealthError::Connect)?;
    connection
        .socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, RTMGRP_LINK))
        .map_err(HealthError::Connect)?;
    tokio::spawn(connection);
    let mut public = read(&handle, &watched.public).await;
    let mut wireguard = match &watched.wireguard {
        Some(name) => read(&handle, name).await,
        None => None,
    };
    let mut tracked = Vec::new();
    for (name, _) in &watched.tracked {
        tracked.push(read(&handle, name).await);
    }
    let mut last: Result<(), String> = Ok(());
    let mut last_points = 0;
    let mut recheck = tokio::time::interval(RECHECK);
    loop {
        let now = verdict(&watched, public, wireguard);
        if now != last {
            let (healthy, reason) = match &now {
                Ok(()) => (true, "every health check passes".to_owned()),
                Err(problem) => (false, problem.clone()),
            };
            if healthy {
                info!(%reason, "healthy again");
            } else {
                warn!(%reason, "unhealthy");
            }
            if tx
                .send(HealthEvent::Fault { healthy, reason })
                .await
                .is_err()
            {
                return Ok(());
            }
            last = now;
        }
        let (points, reason) = penalty(&watched, &tracked);
        if points != last_points {
            info!(points, %reason, "priority penalty");
            if tx
                .send(HealthEvent::Penalty { points, reason })
                .await
                .is_err()
            {
                return Ok(());
            }
            last_points = points;
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            _ = recheck.tick() => {
                public = read(&handle, &watched.public).await;
                if let Some(name) = &watched.wireguard {
                    wireguard = read(&handle, name).await;
                }
                for ((name, _), link) in watched.tracked.iter().zip(&mut tracked) {
                    *link = read(&handle, name).await;
                }
            }
            event = events.next() => {
                let Some((message, _)) = event else { return Ok(()) };
                let (link, gone) = match message.payload {
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => (link, false),
                    NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => (link, true),
                    _ => continue,
                };
                let health = (!gone).then(|| LinkHealth::of(&link));
                let Some(name) = name_of(&link) else { continue };
                if name == watched.public {
                    public = health;
                }
                if watched.wireguard.as_deref() == Some(name) {
                    wireguard = health;
                }
                for ((tracked_name, _), slot) in watched.tracked.iter().zip(&mut tracked) {
                    if tracked_name == name {
                        *slot = health;
                    }
                }
            }
        }
    }
}

async fn read(handle: &Handle, name: &str) -> Option<LinkHealth> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.next().await {
        Some(Ok(link)) => Some(LinkHealth::of(&link)),
        _ => None,
    }
}

fn name_of(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.as_str()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: LinkHealth = LinkHealth {
        up: true,
        carrier: true,
        xdp: true,
    };

    fn watched(wireguard: bool) -> Watched {
        Watched {
            public: "eth0".into(),
            wireguard: wireguard.then(|| "wg0".into()),
            tracked: vec![("up1".into(), 30), ("up2".into(), 240)],
        }
    }

    #[test]
    fn tracked_interfaces_that_are_down_cost_their_weight() {
        let w = watched(false);
        let down = LinkHealth {
            carrier: false,
            ..GOOD
        };
        assert_eq!(
            penalty(&w, &[Some(GOOD), Some(GOOD)]),
            (0, "every tracked interface is up".into())
        );
        assert_eq!(
            penalty(&w, &[Some(down), Some(GOOD)]),
            (30, "tracked interfaces down: up1 (-30)".into())
        );
        // Gone counts as down; the sum saturates.
        assert_eq!(penalty(&w, &[Some(down), None]).0, 255);
    }

    #[test]
    fn every_check_names_its_problem() {
        let w = watched(true);
        assert_eq!(verdict(&w, Some(GOOD), Some(GOOD)), Ok(()));
        let cases = [
            (None, Some(GOOD), "public interface eth0 is gone"),
            (
                Some(LinkHealth { up: false, ..GOOD }),
                Some(GOOD),
                "eth0 is down",
            ),
            (
                Some(LinkHealth {
                    carrier: false,
                    ..GOOD
                }),
                Some(GOOD),
                "no carrier",
            ),
            (
                Some(LinkHealth { xdp: false, ..GOOD }),
                Some(GOOD),
                "XDP program is not attached",
            ),
            (Some(GOOD), None, "WireGuard interface wg0 is gone"),
            (
                Some(GOOD),
                Some(LinkHealth { up: false, ..GOOD }),
                "wg0 is down",
            ),
        ];
        for (public, wireguard, expected) in cases {
            let problem = verdict(&w, public, wireguard).unwrap_err();
            assert!(problem.contains(expected), "{problem}");
        }
    }

    #[test]
    fn without_wireguard_only_the_public_link_counts() {
        assert_eq!(verdict(&watched(false), Some(GOOD), None), Ok(()));
    }
}
