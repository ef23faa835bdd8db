//! Copies the BPF objects that `cargo xtask build-ebpf` built into OUT_DIR,
//! where `include_bytes_aligned!` embeds them.

use std::{env, fs, path::PathBuf};

const ENV: &str = "TIDEGATE_EBPF_DIR";
const OBJECTS: [&str; 3] = ["tidegate", "tidegate-baseline", "tidegate-bench"];

fn main() {
    println!("cargo::rerun-if-env-changed={ENV}");
    let Some(dir) = env::var_os(ENV).map(PathBuf::from) else {
        panic!(
            "{ENV} is not set. tidegate-gateway embeds the XDP object, which the nightly \
             toolchain builds: use `cargo xtask build` (or `cargo xtask test`), which builds \
             it first and sets {ENV}."
        );
    };
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for object in OBJECTS {
        let src = dir.join(object);
        println!("cargo::rerun-if-changed={}", src.display());
        let dst = out.join(format!("{object}.bpf.o"));
        if let Err(error) = fs::copy(&src, &dst) {
            panic!(
                "cannot copy the BPF object {} ({error}); run `cargo xtask build-ebpf`",
                src.display()
            );
        }
    }
}
