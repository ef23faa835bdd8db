//! Control plane (store, gateway and Edge links, admin API, MFA); filled by the Core and Edge issue.
