//! The gateway's side of the link with Core: a gRPC server (mutual TLS)
//! that accepts only Core's certificate. Every Core sharing the database
//! opens one Link stream; the gateway greets each, streams its status to
//! each, and acts only on the leader at the highest term ([`fence`]): it
//! applies the location config and peer changes the leader sends through
//! the WireGuard task, answers each message in order (a refusal names the
//! term that fenced it) and turns a failover request into the HA agent's
//! planned handover.
//!
//! Losing Core changes nothing on the gateway: it keeps running the last
//! config it applied (kept in the state directory, so a restart without
//! Core comes up on it too), and an MFA location keeps removing idle peers.

pub mod convert;
pub mod fence;
pub mod links;
pub mod server;
pub mod session;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

pub use links::{CoreLinkStatus, CoreLinks, CoreLinksStatus};
pub use server::{CoreLinkError, serve, serve_with};
pub use session::Parts;

/// The `[core]` section, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreLinkConfig {
    /// Where the gRPC server listens for Core.
    pub listen: SocketAddr,
    /// The CA that issued every certificate (PEM).
    pub ca_file: PathBuf,
    /// This gateway's certificate (PEM), issued for `identity`.
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// This gateway's name in its certificate.
    pub identity: String,
    /// The name Core's certificate must carry.
    pub core_identity: String,
    /// The id the gateway gives in its Hello (0: none).
    pub gateway_id: u32,
    /// How often a status goes to Core besides the HA changes.
    pub status_interval: Duration,
}
