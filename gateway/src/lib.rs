//! The Tidegate gateway: the XDP WireGuard shield on the public interface,
//! the location's WireGuard interface and peers, its configuration, the
//! local control socket that `tidectl` talks to, and the server Core dials.

pub mod config;
pub mod continuity;
pub mod control;
pub mod core_link;
pub mod datapath;
pub mod director;
pub mod ha;
pub mod reload;
pub mod wireguard;
pub mod xdp;

/// An error and its sources on one line, for logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
