//! Installs what the build and the tests need, or says exactly what is missing.

use anyhow::{Result, bail};

use crate::run::{Cmd, step};

/// Debian packages the tests and the lab run: `ip`, `ping`, `wg`,
/// userspace WireGuard for kernels without the module, `ethtool` (the
/// failover and director tests turn checksum offload off on the clients'
/// veths), nginx in front of the Edges, oathtool, which computes the
/// users' TOTP codes as an authenticator app does for the client's tests,
/// nftables, which wg-quick's full tunnel uses in the tests of the
/// configs `tidectl device config --wg-quick` writes for stock apps, and
/// prometheus for `promtool check metrics`, which lints every daemon's
/// `/metrics` in the metrics tests (the package's server is not started
/// by them), and postgresql for Core's PostgreSQL store, whose tests start
/// throwaway clusters of their own (`tidegate-pgcluster`; the system's own
/// cluster is not used).
const PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "wireguard-tools",
    "wireguard-go",
    "ethtool",
    "nginx",
    "oathtool",
    "nftables",
    "prometheus",
    "postgresql",
];

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails with a clear message unless running as root.
pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root; run it as root, e.g. `sudo -E cargo xtask ...`");
    }
    Ok(())
}

/// Debian packages only the benchmarks and `cargo xtask lab -- --compare`
/// run: keepalived, the baseline of `cargo xtask bench failover` and of the
/// lab's comparison. `cargo xtask test` does not install them.
pub const BENCH_PACKAGES: &[&str] = &["keepalived"];

/// Debian packages `cargo xtask bench steer` runs besides the tests' own:
/// NGINX's stream module (a dynamic module on Debian 12), for the UDP
/// stream proxy the director is measured against; taskset for the lab's
/// receive threads.
pub const STEER_BENCH_PACKAGES: &[&str] = &["libnginx-mod-stream", "util-linux"];

fn installed(package: &str) -> bool {
    Cmd::new("dpkg-query")
        .args(["-W", "-f=${db:Status-Status}", package])
        .output_ok()
        .is_ok_and(|status| status.trim() == "installed")
}

/// Installs the Debian packages that are missing (as root), or fails naming them.
pub fn packages() -> Result<()> {
    install_missing(PACKAGES)
}

/// Installs the Debian packages among `packages` that are missing (as
/// root), or fails naming them.
pub fn install_missing(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root() {
        bail!(
            "Debian packages missing: {list}. Install them as root: \
             `apt-get install -y --no-install-recommends {list}`"
        );
    }
    step(&format!("installing Debian packages: {list}"));
    Cmd::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status_ok()?;
    // Without --no-install-recommends, wireguard pulls in a kernel image.
    Cmd::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status_ok()
        .map_err(|e| e.context(format!("could not install the Debian packages {list}")))
}
