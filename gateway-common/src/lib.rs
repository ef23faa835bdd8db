//! Map keys, values and names shared by the Tidegate XDP program and user space.
//!
//! Every type here is `#[repr(C)]` with explicit padding and a size assert, so
//! both sides agree on the layout byte for byte. Integers stand in for bool and
//! enum values; multi-byte fields in network byte order end in `_be`.
#![no_std]

pub mod client;
pub mod director;
pub mod egress;
pub mod fence;
pub mod handover;
pub mod maps;
pub mod service;
pub mod shield;
pub mod stats;
pub mod wireguard;
