//! The HA agent: a VRRP-like election among the gateways of a location,
//! which decides who holds the floating IPs.

pub mod advert;
pub mod agent;
pub mod announce;
pub mod election;
pub mod epoch;
pub mod health;
pub mod machine;
pub mod sharing;
pub mod status;
pub mod thread;
pub mod transport;
pub mod vip;
