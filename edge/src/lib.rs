//! The Edge: the only public face of a Tidegate installation. A stateless
//! HTTP JSON API for clients (device config download, MFA login, health)
//! that relays every request to Core over the link Core dials, and answers
//! 503 while no Core link is up. Several Edges run behind one proxy.

pub mod api;
pub mod config;
pub mod http;
pub mod link;
pub mod relay;
pub mod serve;

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
