//! Builds the XDP object with the nightly toolchain and a cached bpf-linker.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::run::{Cmd, Workspace, step};

/// bpf-linker release built against the nightly toolchain's own LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";
const BPF_TARGET: &str = "bpfel-unknown-none";
const TOOLCHAIN: &str = "nightly";
/// The objects `cargo xtask build-ebpf` must produce; the gateway embeds them.
const OBJECTS: [&str; 3] = ["tidegate", "tidegate-baseline", "tidegate-bench"];

/// Where the built BPF objects are; passed to user-space builds in [`Self::ENV`].
#[derive(Debug)]
pub struct EbpfObjects {
    pub dir: PathBuf,
}

impl EbpfObjects {
    /// The variable `tidegate-gateway`'s build script reads.
    pub const ENV: &str = "TIDEGATE_EBPF_DIR";
}

/// A cargo command on the nightly toolchain, free of the outer cargo's
/// toolchain choice (this xtask itself runs on stable).
pub fn nightly(program: &str) -> Cmd {
    Cmd::new("rustup")
        .args(["run", TOOLCHAIN, program])
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO")
}

/// The LLVM major version inside the nightly toolchain.
fn nightly_llvm_major() -> Result<u32> {
    let out = nightly("rustc").arg("-vV").output_ok().context(
        "the nightly Rust toolchain is missing; it builds the BPF object. \
         Install it with `rustup toolchain install nightly`",
    )?;
    let version = out
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .context("`rustc +nightly -vV` printed no LLVM version")?;
    let major = version.split('.').next().unwrap_or_default();
    major
        .parse()
        .with_context(|| format!("unexpected LLVM version `{version}` from rustc +nightly"))
}

fn ensure_rust_src() -> Result<()> {
    let installed = Cmd::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", TOOLCHAIN])
        .output_ok()?;
    if installed.lines().any(|line| line.starts_with("rust-src")) {
        return Ok(());
    }
    step("installing rust-src for the nightly toolchain (needed for -Z build-std=core)");
    Cmd::new("rustup")
        .args(["component", "add", "rust-src", "--toolchain", TOOLCHAIN])
        .status_ok()
}

/// Tools built once per machine live outside the clone, so fresh clones and
/// CI runs reuse them.
pub fn tools_dir() -> Result<PathBuf> {
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        return Ok(PathBuf::from(home).join("tidegate-tools"));
    }
    let home = std::env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cargo/tidegate-tools"))
}

/// The directory holding a working `bpf-linker`, building it if needed.
fn ensure_bpf_linker(llvm_major: u32) -> Result<PathBuf> {
    let root = tools_dir()?.join(format!("bpf-linker-{BPF_LINKER_VERSION}-llvm{llvm_major}"));
    let bin = root.join("bin");
    // It loads the nightly toolchain's libLLVM at run time: check it still starts.
    if Cmd::new(bin.join("bpf-linker")).arg("--version").succeeds() {
        return Ok(bin);
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly toolchain's LLVM {llvm_major} \
         into {} (once per machine, about 80 s)",
        root.display()
    ));
    let llvm_prefix = root.join("llvm");
    link_nightly_llvm(&llvm_prefix.join("lib"))?;
    Cmd::new("cargo")
        .args(["install", "bpf-linker", "--locked", "--force"])
        .args(["--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{llvm_major}"))
        .arg("--root")
        .arg(&root)
        .env("LLVM_PREFIX", &llvm_prefix)
        .status_ok()?;
    if !Cmd::new(bin.join("bpf-linker")).arg("--version").succeeds() {
        bail!(
            "bpf-linker was built into {} but does not start",
            bin.display()
        );
    }
    Ok(bin)
}

/// Points `lib` at the shared LLVM library inside the nightly toolchain, as
/// `libLLVM.so` (for linking) and under its own name (for the rpath).
fn link_nightly_llvm(lib: &Path) -> Result<()> {
    let sysroot = nightly("rustc").args(["--print", "sysroot"]).output_ok()?;
    let toolchain_lib = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = fs::read_dir(&toolchain_lib)
        .with_context(|| format!("reading {}", toolchain_lib.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("libLLVM.so."))
        })
        .with_context(|| {
            format!(
                "no libLLVM.so.* in {}: the nightly toolchain ships no shared LLVM",
                toolchain_lib.display()
            )
        })?;
    fs::create_dir_all(lib).with_context(|| format!("creating {}", lib.display()))?;
    let own_name = lib.join(llvm.file_name().context("libLLVM path has no file name")?);
    for link in [lib.join("libLLVM.so"), own_name] {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm, &link)
            .with_context(|| format!("linking {} to {}", link.display(), llvm.display()))?;
    }
    Ok(())
}

/// The flags aya's own build helper passes (the host architecture for
/// `bpf_target_arch`, full debug info, BTF for the loader), and two more.
/// Packet headers sit at any byte offset, and without
/// `allows-misaligned-mem-access` LLVM loads every multi-byte field a byte at
/// a time; the verifier accepts unaligned packet loads on architectures with
/// efficient unaligned access (x86-64, arm64), whose JITs emit plain loads
/// for them. BPF ISA v3 (kernel 5.1+) adds 32-bit jumps and ALU ops, so
/// 32-bit header words need no zero-extending shifts and 32-bit masks fit in
/// an instruction's immediate. Both objects, the program and the benchmark's
/// baseline, get the same flags.
fn bpf_rustflags() -> String {
    [
        format!("--cfg=bpf_target_arch=\"{}\"", std::env::consts::ARCH),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        "-Clink-arg=--cpu-features=+allows-misaligned-mem-access".into(),
        "-Ctarget-cpu=v3".into(),
    ]
    .join("\x1f")
}

fn bpf_cargo(ws: &Workspace, linker_bin: &Path, subcommand: &str) -> Result<Cmd> {
    let path = std::env::join_paths(std::iter::once(linker_bin.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    Ok(nightly("cargo")
        .current_dir(&ws.root)
        .args([
            subcommand,
            "--package",
            "tidegate-ebpf",
            "--bins",
            "--release",
        ])
        .args(["--target", BPF_TARGET, "-Z", "build-std=core"])
        .env("CARGO_ENCODED_RUSTFLAGS", bpf_rustflags())
        .env("PATH", path))
}

fn prepare() -> Result<PathBuf> {
    let llvm_major = nightly_llvm_major()?;
    ensure_rust_src()?;
    ensure_bpf_linker(llvm_major)
}

/// Installs what is missing, then builds the XDP object and the baseline.
pub fn build(ws: &Workspace) -> Result<EbpfObjects> {
    let linker = prepare()?;
    step("building the XDP object (nightly, bpfel-unknown-none)");
    bpf_cargo(ws, &linker, "build")?.status_ok()?;
    let dir = ws.target.join(BPF_TARGET).join("release");
    for object in OBJECTS {
        let path = dir.join(object);
        if !path.is_file() {
            bail!("the BPF build succeeded but left no {}", path.display());
        }
    }
    Ok(EbpfObjects { dir })
}

/// Clippy on the BPF crate, for its own target, warnings denied.
pub fn clippy(ws: &Workspace) -> Result<()> {
    let linker = prepare()?;
    bpf_cargo(ws, &linker, "clippy")?
        .args(["--", "-D", "warnings"])
        .status_ok()
}
