//! Failover continuity: what a gateway does around a change of role so that
//! clients' tunnels carry on. Its logic is one pure [`Controller`]; the HA
//! agent feeds it the election's actions, the location as adverts describe
//! it and the endpoint table, and carries out the [`Effect`]s it returns.

mod controller;

use std::time::Duration;

pub use controller::{Controller, ControllerConfig, Effect, Input};

/// Failover continuity settings (`[ha]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Handshakes kicked per second after becoming master; 0: none.
    pub kick_rate: u32,
    /// Peers with a handshake this recent are kicked.
    pub kick_window: Duration,
    /// How long after a planned handover frames of the other gateway's
    /// sessions are handed on (plus the time the kicks take); 0: never.
    pub handover_window: Duration,
    /// How often the whole endpoint table is sent to the other gateways.
    pub endpoint_refresh: Duration,
    /// Endpoints whose last handshake is older are forgotten.
    pub endpoint_max_age: Duration,
}
