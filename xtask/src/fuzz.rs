//! `cargo xtask fuzz`: the cargo-fuzz targets in `fuzz/` (libFuzzer on the
//! nightly toolchain, debug assertions on), each for a bounded time. The
//! code they reach is safe Rust, so the findings are panics and failed
//! assertions, and they build without a sanitizer. A crash fails the run
//! and leaves its input in `fuzz/artifacts/<target>/`: it becomes a
//! regression test where the bug is fixed.

use anyhow::{Result, bail};

use crate::{
    ebpf::{self, tools_dir},
    run::{Cmd, Workspace, step},
};

/// The cargo-fuzz release the targets are built with.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Every target, as `fuzz/Cargo.toml` names it.
pub const TARGETS: &[&str] = &[
    "advert",
    "endpoints",
    "gateway_config",
    "edge_config",
    "edge_api",
    "control_request",
];

/// Builds the targets, then runs `targets` (every one when empty) for
/// `seconds` each.
pub fn run(ws: &Workspace, seconds: u64, targets: &[String]) -> Result<()> {
    for target in targets {
        if !TARGETS.contains(&target.as_str()) {
            bail!(
                "no fuzz target {target:?}; the targets: {}",
                TARGETS.join(", ")
            );
        }
    }
    let chosen: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    let cargo_fuzz = ensure_cargo_fuzz()?;
    step("building the fuzz targets (nightly)");
    fuzz(ws, &cargo_fuzz)
        .args(["build", "--sanitizer", "none"])
        .status_ok()?;
    for target in chosen {
        step(&format!("fuzzing {target} for {seconds} s"));
        fuzz(ws, &cargo_fuzz)
            .args(["run", "--sanitizer", "none", target, "--"])
            .arg(format!("-max_total_time={seconds}"))
            .args(["-rss_limit_mb=2048", "-max_len=8192"])
            .status_ok()?;
    }
    Ok(())
}

/// `cargo fuzz` on the nightly toolchain, in the workspace.
fn fuzz(ws: &Workspace, cargo_fuzz: &std::path::Path) -> Cmd {
    ebpf::nightly(&cargo_fuzz.to_string_lossy())
        .arg("fuzz")
        .current_dir(&ws.root)
        .env("CARGO_TARGET_DIR", ws.root.join("fuzz/target"))
}

/// The `cargo-fuzz` binary, installed once per machine beside bpf-linker.
fn ensure_cargo_fuzz() -> Result<std::path::PathBuf> {
    let root = tools_dir()?.join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let bin = root.join("bin/cargo-fuzz");
    if Cmd::new(&bin).args(["fuzz", "--version"]).succeeds() {
        return Ok(bin);
    }
    step(&format!(
        "installing cargo-fuzz {CARGO_FUZZ_VERSION} into {} (once per machine, about 2 min)",
        root.display()
    ));
    Cmd::new("cargo")
        .args(["install", "cargo-fuzz", "--locked", "--force"])
        .args(["--version", CARGO_FUZZ_VERSION])
        .arg("--root")
        .arg(&root)
        .status_ok()?;
    Ok(bin)
}
