//! Stateless public HTTP service for clients, relaying to Core; filled by the Core and Edge issue.
