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
pub mod hooks;
pub mod metrics;
pub mod preflight;
pub mod reload;
pub mod wireguard;
pub mod xdp;

pub use tidegate_proto::error_chain;
