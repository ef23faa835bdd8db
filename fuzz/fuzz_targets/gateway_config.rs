//! The gateway's config file: any text is a config or an error naming
//! what is wrong, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tidegate_gateway::config::{Config, Overrides};

fuzz_target!(|text: &str| {
    let _ = Config::parse(Path::new("gateway.toml"), text, Overrides::default());
});
