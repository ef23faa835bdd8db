//! Tidegate Core: the control plane. It keeps locations, gateways, users,
//! devices and Edges in a SQLite store, dials every gateway and Edge over
//! mutual TLS, pushes each location's WireGuard config to its gateways,
//! answers the Edges' client requests (config download, MFA login), and
//! serves the operator API on a local Unix socket.

pub mod admin;
pub mod challenge;
pub mod config;
pub mod daemon;
pub mod keys;
pub mod leader;
pub mod links;
pub mod lockout;
pub mod metrics;
pub mod pki;
pub mod state;
pub mod store;
pub mod totp;

pub use tidegate_proto::error_chain;

/// Milliseconds since the Unix epoch, the unit of every time Core stores.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Fills a buffer from the operating system's random source.
///
/// # Panics
/// When the kernel's random source fails, which leaves Core nothing safe to
/// make keys, tokens or secrets from.
pub fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0; N];
    getrandom::getrandom(&mut bytes).expect("the operating system's random source failed");
    bytes
}
