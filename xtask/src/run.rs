//! Announced steps, commands that fail loudly, and where the workspace lives.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{Context as _, Result, bail};

use crate::ebpf::EbpfObjects;

/// Set when this xtask was sent SIGINT or SIGTERM after [`catch_interrupts`].
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM only set a flag ([`interrupted`]), so
/// this xtask outlives a Ctrl-C: a program it started in the terminal's
/// process group gets the signal too and ends in its own way (programs
/// started later have the default handlers again), and a VM in its own
/// process group is stopped by the loop watching it.
pub fn catch_interrupts() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe.
        unsafe { libc::signal(signal, on_interrupt as *const () as libc::sighandler_t) };
    }
}

/// Whether SIGINT or SIGTERM arrived since [`catch_interrupts`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Prints one step of a task, so a reader of the log sees what happens.
pub fn step(what: &str) {
    eprintln!("xtask: {what}");
}

/// A command that is echoed before it runs and fails with its exit status.
#[derive(Debug)]
pub struct Cmd(Command);

impl Cmd {
    pub fn new(program: impl AsRef<OsStr>) -> Self {
        Self(Command::new(program))
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.0.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.0.args(args);
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.0.env(key, value);
        self
    }

    pub fn env_remove(mut self, key: impl AsRef<OsStr>) -> Self {
        self.0.env_remove(key);
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Self {
        self.0.current_dir(dir);
        self
    }

    fn describe(&self) -> String {
        let mut line = self.0.get_program().to_string_lossy().into_owned();
        for arg in self.0.get_args() {
            line.push(' ');
            line.push_str(&arg.to_string_lossy());
        }
        line
    }

    /// Runs to completion with inherited output; its exit status, whatever
    /// it is.
    pub fn status(mut self) -> Result<std::process::ExitStatus> {
        let line = self.describe();
        eprintln!("  $ {line}");
        self.0
            .status()
            .with_context(|| format!("could not start `{line}`"))
    }

    /// Runs to completion with inherited output; an error unless it exits 0.
    pub fn status_ok(mut self) -> Result<()> {
        let line = self.describe();
        eprintln!("  $ {line}");
        let status = self
            .0
            .status()
            .with_context(|| format!("could not start `{line}`"))?;
        if !status.success() {
            bail!("`{line}` failed ({status})");
        }
        Ok(())
    }

    /// Runs with stdout echoed line by line as it comes, and returns it; an
    /// error unless it exits 0.
    pub fn status_ok_tee(mut self) -> Result<String> {
        use std::io::BufRead as _;

        let line = self.describe();
        eprintln!("  $ {line}");
        let mut child = self
            .0
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("could not start `{line}`"))?;
        let mut out = String::new();
        let stdout = child.stdout.take().context("no stdout pipe")?;
        for text in std::io::BufReader::new(stdout).lines() {
            let text = text.with_context(|| format!("reading the output of `{line}`"))?;
            println!("{text}");
            out.push_str(&text);
            out.push('\n');
        }
        let status = child
            .wait()
            .with_context(|| format!("waiting for `{line}`"))?;
        if !status.success() {
            bail!("`{line}` failed ({status})");
        }
        Ok(out)
    }

    /// Runs quietly and returns stdout; an error (with stderr) unless it exits 0.
    pub fn output_ok(mut self) -> Result<String> {
        let line = self.describe();
        let out = self
            .0
            .output()
            .with_context(|| format!("could not start `{line}`"))?;
        if !out.status.success() {
            bail!(
                "`{line}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed invalid UTF-8"))
    }

    /// Runs quietly; whether it exited 0. For probes, not for steps.
    pub fn succeeds(mut self) -> bool {
        self.0
            .output()
            .map(|out| out.status.success())
            .unwrap_or(false)
    }
}

/// The workspace root and its target directory, as cargo reports them.
#[derive(Debug)]
pub struct Workspace {
    pub root: PathBuf,
    pub target: PathBuf,
}

impl Workspace {
    pub fn locate() -> Result<Self> {
        let out = Cmd::new(cargo_bin())
            .args(["metadata", "--no-deps", "--format-version", "1"])
            .output_ok()?;
        let meta: serde_json::Value =
            serde_json::from_str(&out).context("cargo metadata printed invalid JSON")?;
        let path = |key: &str| {
            meta[key]
                .as_str()
                .map(PathBuf::from)
                .with_context(|| format!("cargo metadata has no `{key}`"))
        };
        Ok(Self {
            root: path("workspace_root")?,
            target: path("target_directory")?,
        })
    }

    /// Where user-space binaries of a profile land.
    pub fn profile_dir(&self, release: bool) -> PathBuf {
        self.target.join(if release { "release" } else { "debug" })
    }
}

/// The feature of the test packages that builds their tests needing root
/// and the BPF objects (a plain `cargo test` leaves them out).
pub const PRIVILEGED_FEATURE: &str = "privileged";

/// [`PRIVILEGED_FEATURE`] of every package that has it, for workspace-wide
/// cargo commands.
pub const PRIVILEGED: &str = "tidegate-gateway/privileged,tidegate-tests/privileged";

/// The cargo that runs this xtask.
pub fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// A stable-toolchain cargo command in the workspace, with the BPF objects
/// that `tidegate-gateway`'s build script embeds.
pub fn cargo(ws: &Workspace, ebpf: &EbpfObjects) -> Cmd {
    Cmd::new(cargo_bin())
        .current_dir(&ws.root)
        .env(EbpfObjects::ENV, &ebpf.dir)
}

/// Builds every user-space binary (gateway, tidectl, the lab and the test tools).
pub fn build_user_space(ws: &Workspace, ebpf: &EbpfObjects, release: bool) -> Result<()> {
    step(&format!(
        "building user space ({} profile)",
        if release { "release" } else { "dev" }
    ));
    let mut cmd = cargo(ws, ebpf).args(["build", "--bins"]);
    if release {
        cmd = cmd.arg("--release");
    }
    cmd.status_ok()
}
