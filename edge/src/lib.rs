//! The Edge: the only public face of a Tidegate installation. A stateless
//! HTTP JSON API for clients (device config download, MFA login, health)
//! that relays every request to Core over the link Core dials (to the Core
//! that leads, when several share one database), and answers 503 while no
//! Core link is up or none leads. Several Edges run behind one proxy.

pub mod api;
pub mod config;
pub mod http;
pub mod leader;
pub mod link;
pub mod metrics;
pub mod relay;
pub mod serve;

pub use tidegate_proto::error_chain;
