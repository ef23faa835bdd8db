//! The Edge's config file: any text is a config or an error naming what
//! is wrong, never a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use tidegate_edge::config::{Config, Overrides};

fuzz_target!(|text: &str| {
    let _ = Config::parse(Path::new("edge.toml"), text, Overrides::default());
});
