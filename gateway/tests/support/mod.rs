//! Helpers shared by the gateway's integration tests and its benchmark.

pub mod frames;
