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
pub mod links;
pub mod lockout;
pub mod pki;
pub mod state;
pub mod store;
pub mod totp;

/// An error and its sources on one line, for logs and command-line errors.
/// A source whose text the line already holds (some wrappers repeat their
/// source's message) is not repeated.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

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

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Text(String, #[source] Option<Box<Text>>);

    #[test]
    fn error_chain_joins_sources_once() {
        let inner = Text("refused".into(), None);
        let middle = Text("transport error: refused".into(), Some(Box::new(inner)));
        let outer = Text("connecting".into(), Some(Box::new(middle)));
        assert_eq!(
            super::error_chain(&outer),
            "connecting: transport error: refused"
        );
    }
}
