//! The Tidegate gateway: the XDP WireGuard shield on the public interface,
//! its configuration, and the local control socket that `tidectl` talks to.

pub mod config;
pub mod control;
pub mod datapath;
pub mod xdp;
