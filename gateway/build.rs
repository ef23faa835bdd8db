//! Copies the BPF objects that `cargo xtask build-ebpf` built into OUT_DIR,
//! where `include_bytes_aligned!` embeds them. Without them (a plain
//! `cargo build` or `cargo test`, which the nightly BPF build is not part
//! of) the crate still builds, with empty objects: loading one is then an
//! error that says how to build it, and the tests that read the object are
//! ignored (cfg `tidegate_no_bpf`).

use std::{env, fs, path::PathBuf};

const ENV: &str = "TIDEGATE_EBPF_DIR";
const OBJECTS: [&str; 3] = ["tidegate", "tidegate-baseline", "tidegate-bench"];
const NO_BPF: &str = "tidegate_no_bpf";

fn main() {
    println!("cargo::rerun-if-env-changed={ENV}");
    println!("cargo::rustc-check-cfg=cfg({NO_BPF})");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dir = env::var_os(ENV).map(PathBuf::from);
    if dir.is_none() {
        println!("cargo::rustc-cfg={NO_BPF}");
    }
    for object in OBJECTS {
        let dst = out.join(format!("{object}.bpf.o"));
        let Some(dir) = &dir else {
            fs::write(&dst, []).expect("writing to OUT_DIR");
            continue;
        };
        let src = dir.join(object);
        println!("cargo::rerun-if-changed={}", src.display());
        if let Err(error) = fs::copy(&src, &dst) {
            panic!(
                "cannot copy the BPF object {} ({error}); run `cargo xtask build-ebpf`",
                src.display()
            );
        }
    }
}
