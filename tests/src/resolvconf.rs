//! Debian's resolvconf, installed from its package into a machine of the
//! test's own: the kernel suite's VMs, whose /etc and /usr are overlays in
//! the guest's memory (their runner sets [`OWN_ROOT_ENV`] and gives the
//! package in [`DEB_ENV`]). Never on a host: /etc/resolv.conf becomes
//! resolvconf's.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Set to 1 where the machine's /etc and /usr are the test's to change.
pub const OWN_ROOT_ENV: &str = "TIDEGATE_TEST_OWN_ROOT";
/// The resolvconf .deb `cargo xtask` downloads for the VMs.
pub const DEB_ENV: &str = "TIDEGATE_RESOLVCONF_DEB";
/// Where resolvconf puts the resolver config it makes.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";
/// resolvconf's record of one interface's servers.
pub fn record(interface_record: &str) -> PathBuf {
    Path::new("/run/resolvconf/interface").join(interface_record)
}

/// Installs resolvconf's files from the package (as its postinst would:
/// /etc/resolv.conf linked to its output, updates on), or says why not.
pub fn install(scratch: &Path) -> Result<()> {
    if std::env::var(OWN_ROOT_ENV).ok().as_deref() != Some("1") {
        bail!(
            "refusing to install resolvconf into this machine's /etc and /usr: {OWN_ROOT_ENV} is not 1 \
             (the test runs in the kernel suite's VMs: cargo xtask test-kernels)"
        );
    }
    let deb = std::env::var(DEB_ENV).with_context(|| format!("{DEB_ENV} is not set"))?;
    let unpacked = scratch.join("resolvconf-deb");
    std::fs::create_dir_all(&unpacked)?;
    cmd::run_ok(
        std::process::Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&unpacked),
        std::time::Duration::from_secs(30),
    )?;
    // Copied file by file: unpacking into / would replace the merged-/usr
    // links (/sbin, /lib) with directories.
    for (from, to) in [
        ("etc/resolvconf", "/etc/resolvconf"),
        ("lib/resolvconf", "/usr/lib/resolvconf"),
        ("sbin/resolvconf", "/usr/sbin/resolvconf"),
    ] {
        cmd::run_ok(
            std::process::Command::new("cp")
                .arg("-a")
                .arg(unpacked.join(from))
                .arg(to),
            std::time::Duration::from_secs(30),
        )?;
    }
    std::fs::create_dir_all("/run/resolvconf/interface")?;
    let _ = std::fs::remove_file(RESOLV_CONF);
    std::os::unix::fs::symlink("/run/resolvconf/resolv.conf", RESOLV_CONF)
        .with_context(|| format!("linking {RESOLV_CONF}"))?;
    for arg in ["--enable-updates", "-u"] {
        cmd::run_ok(
            std::process::Command::new("/usr/sbin/resolvconf").arg(arg),
            std::time::Duration::from_secs(30),
        )?;
    }
    read()?;
    Ok(())
}

/// What the resolver reads: resolvconf's output.
pub fn read() -> Result<String> {
    std::fs::read_to_string(RESOLV_CONF).with_context(|| format!("reading {RESOLV_CONF}"))
}
