//! Debian's own kernels for the VM suite: resolved from Debian's meta
//! packages (never a hard-coded version), downloaded with apt, unpacked and
//! given their module index once, and cached outside the clone beside
//! bpf-linker, so fresh clones and CI runs reuse them.

use std::{fs, path::PathBuf};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    ebpf::tools_dir,
    run::{Cmd, step},
    setup,
};

/// A kernel series the suite boots, and the Debian 12 meta package whose
/// dependency names its current image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Series {
    /// What the suite calls it: `6.1`, `6.12`.
    pub name: &'static str,
    pub meta_package: &'static str,
}

/// Debian 12's stock kernel (the oldest the gateway supports), and the
/// newer series Debian 12 ships, which has tcx links.
pub const SERIES: &[Series] = &[
    Series {
        name: "6.1",
        meta_package: "linux-image-amd64",
    },
    Series {
        name: "6.12",
        meta_package: "linux-image-6.12-amd64",
    },
];

/// Debian packages the VMs need: qemu (run under TCG), `depmod` for the
/// unpacked modules, and busybox for virtme-ng's initramfs.
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "kmod", "busybox-static"];

/// virtme-ng, from PyPI: boots a kernel with the host's files shared in.
const VIRTME_NG: &str = "virtme-ng==1.42";

/// A kernel ready to boot: its image and its modules.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub series: Series,
    /// The image package (`linux-image-6.1.0-57-amd64`) and its version.
    pub package: String,
    pub version: String,
    /// `uname -r` of the kernel (`6.1.0-57-amd64`).
    pub release: String,
    /// The unpacked package: `boot/` and `lib/modules/`.
    pub dir: PathBuf,
    /// virtme-ng's `vng`, which boots it.
    pub vng: PathBuf,
}

impl Kernel {
    /// The image to boot.
    pub fn image(&self) -> PathBuf {
        self.dir
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }
}

/// Looks a series up by name.
pub fn series(name: &str) -> Result<Series> {
    SERIES
        .iter()
        .copied()
        .find(|s| s.name == name)
        .with_context(|| {
            let known: Vec<&str> = SERIES.iter().map(|s| s.name).collect();
            format!("no kernel series {name:?}; the suite boots {known:?}")
        })
}

/// Installs the VM tools and makes each of `series` ready, downloading
/// what the cache lacks.
pub fn prepare(series: &[Series]) -> Result<Vec<Kernel>> {
    setup::install_missing(VM_PACKAGES)?;
    let vng = ensure_virtme_ng()?;
    series.iter().map(|s| prepare_one(*s, &vng)).collect()
}

/// Debian's `resolvconf` package as a .deb, downloaded once into the tools
/// cache: the client's DNS test installs it into a VM's own /etc and /usr
/// (never on this host).
pub fn resolvconf_deb() -> Result<PathBuf> {
    let dir = tools_dir()?.join("debs");
    let deb = dir.join("resolvconf.deb");
    if deb.exists() {
        return Ok(deb);
    }
    step(&format!(
        "downloading Debian's resolvconf package into {} (for the client's DNS test in the VMs; not installed here)",
        dir.display()
    ));
    let download = dir.join("download");
    let fetched = apt_download("resolvconf", &download)?;
    fs::rename(&fetched, &deb)?;
    fs::remove_dir_all(&download)?;
    Ok(deb)
}

/// Downloads the .deb of `package` (`name` or `name=version`) into `dir`,
/// created; its path.
fn apt_download(package: &str, dir: &std::path::Path) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    // apt drops to its own user to download unless told otherwise; this
    // directory is root's.
    Cmd::new("apt-get")
        .args(["download", "-q", "-o", "APT::Sandbox::User=root", package])
        .current_dir(dir)
        .status_ok()?;
    fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))
}

/// `vng`, installed from PyPI if it is nowhere to be found.
fn ensure_virtme_ng() -> Result<PathBuf> {
    if let Some(vng) = find_vng() {
        return Ok(vng);
    }
    step(&format!(
        "installing {VIRTME_NG} from PyPI (boots Debian's kernels with this machine's files)"
    ));
    Cmd::new("python3")
        .args(["-m", "pip", "install", "--quiet", VIRTME_NG])
        .status_ok()?;
    find_vng().context("virtme-ng is installed but no `vng` that starts was found")
}

/// `vng` on PATH, else in the script directories pip installs to.
fn find_vng() -> Option<PathBuf> {
    let starts = |vng: &PathBuf| Cmd::new(vng).arg("--version").succeeds();
    let mut candidates = vec![PathBuf::from("vng")];
    for code in [
        "import sysconfig; print(sysconfig.get_path('scripts'))",
        "import site; print(site.getuserbase() + '/bin')",
    ] {
        if let Ok(dir) = Cmd::new("python3").args(["-c", code]).output_ok() {
            candidates.push(PathBuf::from(dir.trim()).join("vng"));
        }
    }
    candidates.into_iter().find(starts)
}

fn prepare_one(series: Series, vng: &std::path::Path) -> Result<Kernel> {
    let package = match image_package(series) {
        Ok(package) => package,
        Err(_) => {
            step("refreshing apt's package lists (apt-get update)");
            Cmd::new("apt-get")
                .args(["update", "-q"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status_ok()?;
            image_package(series)?
        }
    };
    let version = package_version(&package)?;
    let release = package
        .strip_prefix("linux-image-")
        .with_context(|| format!("{package} is not a linux-image package"))?
        .to_owned();
    let dir = tools_dir()?
        .join("kernels")
        .join(format!("{package}_{version}"));
    let kernel = Kernel {
        series,
        package,
        version,
        release,
        dir,
        vng: vng.to_owned(),
    };
    if kernel.dir.join(READY).exists() {
        return Ok(kernel);
    }
    step(&format!(
        "fetching Debian's {} kernel: {} {} (once; cached in {})",
        series.name,
        kernel.package,
        kernel.version,
        kernel.dir.display()
    ));
    if kernel.dir.exists() {
        fs::remove_dir_all(&kernel.dir)
            .with_context(|| format!("removing the partial {}", kernel.dir.display()))?;
    }
    fs::create_dir_all(&kernel.dir)
        .with_context(|| format!("creating {}", kernel.dir.display()))?;
    if let Err(error) = download_and_unpack(&kernel) {
        // Stale lists name a version the mirror no longer has: refresh them
        // once and resolve again.
        step(&format!(
            "downloading {} failed ({error:#}); refreshing apt's lists and trying again",
            kernel.package
        ));
        fs::remove_dir_all(&kernel.dir).ok();
        Cmd::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status_ok()?;
        return prepare_one(series, vng);
    }
    Ok(kernel)
}

/// Marks a kernel directory whose unpacking and module index completed.
const READY: &str = ".ready";

fn download_and_unpack(kernel: &Kernel) -> Result<()> {
    let download = kernel.dir.join("download");
    let deb = apt_download(&format!("{}={}", kernel.package, kernel.version), &download)?;
    step(&format!("unpacking {}", deb.display()));
    Cmd::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&kernel.dir)
        .status_ok()?;
    fs::remove_dir_all(&download)?;
    ensure!(
        kernel.image().exists(),
        "{} holds no {}",
        kernel.package,
        kernel.image().display()
    );
    let modules = kernel.dir.join("lib/modules").join(&kernel.release);
    ensure!(
        modules
            .join("kernel/drivers/net/wireguard/wireguard.ko")
            .exists()
            || modules
                .join("kernel/drivers/net/wireguard/wireguard.ko.xz")
                .exists(),
        "{} has no WireGuard module under {}",
        kernel.package,
        modules.display()
    );
    step(&format!("indexing the modules of {}", kernel.release));
    Cmd::new("depmod")
        .arg("-b")
        .arg(&kernel.dir)
        .arg(&kernel.release)
        .status_ok()?;
    fs::write(kernel.dir.join(READY), format!("{}\n", kernel.version))?;
    Ok(())
}

/// The image package `series`'s meta package depends on now.
fn image_package(series: Series) -> Result<String> {
    let out = Cmd::new("apt-cache")
        .args(["depends", "--important", series.meta_package])
        .output_ok()?;
    parse_image_dependency(&out).with_context(|| {
        format!(
            "apt-cache names no kernel image that {} depends on",
            series.meta_package
        )
    })
}

/// The `linux-image-*` package in `apt-cache depends` output.
fn parse_image_dependency(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(|d| d.trim().trim_start_matches('<').trim_end_matches('>'))
        .find(|d| d.starts_with("linux-image-"))
        .map(str::to_owned)
}

/// The version of `package` apt would install.
fn package_version(package: &str) -> Result<String> {
    let out = Cmd::new("apt-cache")
        .args(["policy", package])
        .output_ok()?;
    parse_candidate(&out).with_context(|| format!("apt has no candidate version of {package}"))
}

/// The `Candidate:` of `apt-cache policy` output.
fn parse_candidate(out: &str) -> Option<String> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Candidate: "))
        .map(str::trim)
        .find(|v| *v != "(none)")
        .map(str::to_owned)
}

/// Fails unless every named series exists.
pub fn select(names: &[String]) -> Result<Vec<Series>> {
    if names.is_empty() {
        return Ok(SERIES.to_vec());
    }
    let mut out = Vec::new();
    for name in names {
        let s = series(name)?;
        if !out.contains(&s) {
            out.push(s);
        }
    }
    if out.is_empty() {
        bail!("no kernel series selected");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_image_package_comes_from_the_meta_packages_dependency() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-57-amd64\n";
        assert_eq!(
            parse_image_dependency(out).as_deref(),
            Some("linux-image-6.1.0-57-amd64")
        );
        let virtual_dep = "linux-image-6.12-amd64\n  Depends: <linux-image-6.12.118+deb12-amd64>\n";
        assert_eq!(
            parse_image_dependency(virtual_dep).as_deref(),
            Some("linux-image-6.12.118+deb12-amd64")
        );
        assert_eq!(parse_image_dependency("linux-image-amd64\n"), None);
    }

    #[test]
    fn the_candidate_version_is_read_from_apt_cache_policy() {
        let out = "linux-image-6.1.0-57-amd64:\n  Installed: (none)\n  Candidate: 6.1.192-3\n  Version table:\n";
        assert_eq!(parse_candidate(out).as_deref(), Some("6.1.192-3"));
        assert_eq!(parse_candidate("x:\n  Candidate: (none)\n"), None);
    }

    #[test]
    fn series_are_looked_up_by_name() {
        assert_eq!(series("6.1").unwrap().meta_package, "linux-image-amd64");
        assert!(series("5.10").is_err());
        assert_eq!(select(&[]).unwrap(), SERIES);
        assert_eq!(
            select(&["6.12".into(), "6.12".into()]).unwrap(),
            [SERIES[1]]
        );
    }
}
