//! Tidegate's client for users: enrolment through an Edge with a one-time
//! token and a key made on the host, the tunnel as wg-quick makes it, and
//! the MFA session kept alive while the tunnel is up.

pub mod api;
pub mod profile;
pub mod retry;
pub mod running;
pub mod session;
pub mod tunnel;
