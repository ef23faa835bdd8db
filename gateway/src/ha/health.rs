//! The gateway's own health, from netlink link events: the public link up
//! with a carrier and the XDP program on it, and the WireGuard interface up.
//! Any of these failing makes the gateway FAULT at once. Link events are the
//! trigger; a slow re-check catches what the kernel does not announce.

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

/// Watches the links until `cancel` fires, sending `(healthy, reason)` to
/// the agent on every change (the agent starts out assuming healthy).
pub async fn watch(
    watched: Watched,
    tx: mpsc::Sender<(bool, String)>,
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
    let mut last: Result<(), String> = Ok(());
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
            if tx.send((healthy, reason)).await.is_err() {
                return Ok(());
            }
            last = now;
        }
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            _ = recheck.tick() => {
                public = read(&handle, &watched.public).await;
                if let Some(name) = &watched.wireguard {
                    wireguard = read(&handle, name).await;
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
                match name_of(&link) {
                    Some(name) if name == watched.public => public = health,
                    Some(name) if watched.wireguard.as_deref() == Some(name) => wireguard = health,
                    _ => {}
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
        }
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
