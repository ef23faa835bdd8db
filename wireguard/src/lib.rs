//! A WireGuard device, the kernel module's or wireguard-go's, driven the
//! same way: a desired state, read back, reconciled into a plan, applied.
//! The gateway's location interface and the user's client both stand on it.

pub mod backend;
pub mod kernel;
pub mod key;
pub mod link;
pub mod reconcile;
pub mod spec;
pub mod userspace;

pub use backend::{Backend, BackendError, BackendKind, BackendSetting};
pub use key::{Key, KeyError};
pub use spec::{PeerEntry, PeerSpec};
