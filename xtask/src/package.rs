//! `cargo xtask package`: the Debian packages, built with cargo-deb from
//! release binaries, each with its systemd unit, example config, manual
//! pages and shell completions (written from the binaries' own clap
//! commands). `cargo xtask test-packages`: installs them with dpkg on a
//! fresh Debian 12 root made by debootstrap (cached under the target
//! directory) and checks what they installed and that it runs there.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    ebpf::{self, tools_dir},
    run::{self, Cmd, Workspace, step},
    setup,
};

/// The cargo-deb release the packages are built with.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Debian packages the packaging needs on the host: dpkg-shlibdeps (for
/// the packages' library Depends) and, for the test, debootstrap.
pub const PACKAGE_TOOLS: &[&str] = &["dpkg-dev", "debootstrap"];

/// The Debian release the packages are for and tested on.
const SUITE: &str = "bookworm";

/// What the test's root has beyond debootstrap's minbase, as every real
/// host has: systemd, and procps (its `/bin/kill` runs the units'
/// ExecReload=).
const INCLUDE: &str = "systemd,procps";

/// One Debian package: the crate (and cargo-deb variant) it is made from,
/// its binaries, and what it installs besides them.
#[derive(Debug)]
pub struct Package {
    pub name: &'static str,
    krate: &'static str,
    variant: Option<&'static str>,
    binaries: &'static [&'static str],
    /// Its systemd unit, in `dist/systemd/`.
    unit: Option<&'static str>,
    /// Its example config, in `dist/examples/`.
    example: Option<&'static str>,
    /// Any other file it must install.
    extra: &'static [&'static str],
}

/// Every package, in the order dpkg gets them.
pub const PACKAGES: [Package; 4] = [
    Package {
        name: "tidectl",
        krate: "tidegate-gateway",
        variant: None,
        binaries: &["tidectl"],
        unit: None,
        example: None,
        extra: &[],
    },
    Package {
        name: "tidegate-gateway",
        krate: "tidegate-gateway",
        variant: Some("daemon"),
        binaries: &["tidegate-gateway"],
        unit: Some("tidegate-gateway.service"),
        example: Some("gateway.toml"),
        extra: &[],
    },
    Package {
        name: "tidegate-core",
        krate: "tidegate-core",
        variant: None,
        binaries: &["tidegate-core"],
        unit: Some("tidegate-core.service"),
        example: Some("core.toml"),
        extra: &[],
    },
    Package {
        name: "tidegate-edge",
        krate: "tidegate-edge",
        variant: None,
        binaries: &["tidegate-edge"],
        unit: Some("tidegate-edge.service"),
        example: Some("edge.toml"),
        // The service's user, made by the postinst (systemd-sysusers).
        extra: &["/usr/lib/sysusers.d/tidegate-edge.conf"],
    },
];

/// How a binary writes its manual pages and completions under a directory
/// (a hidden flag or subcommand of its own).
fn manual_args(binary: &str) -> &'static [&'static str] {
    match binary {
        "tidectl" | "tidegate-core" => &["generate-manual"],
        _ => &["--generate-manual"],
    }
}

/// Where the packages land.
pub fn output_dir(ws: &Workspace) -> PathBuf {
    ws.target.join("debian")
}

/// Builds every package; returns the .deb files, in [`PACKAGES`] order.
/// `release`: from the release build, as shipped; else from the dev build
/// `cargo xtask test` made already (stripped, faster compression), which
/// is what the package test installs: it checks the packaging, not the
/// optimiser, and saves CI a second build of every crate.
pub fn build(ws: &Workspace, release: bool) -> Result<Vec<PathBuf>> {
    setup::install_missing(PACKAGE_TOOLS)?;
    let cargo_deb = ensure_cargo_deb()?;
    let ebpf = ebpf::build(ws)?;
    let profile = if release { "release" } else { "dev" };
    step(&format!(
        "building the packaged binaries ({profile} profile)"
    ));
    let mut build = run::cargo(ws, &ebpf).args(["build", "--bins"]);
    if release {
        build = build.arg("--release");
    }
    let mut crates: Vec<&str> = PACKAGES.iter().map(|p| p.krate).collect();
    crates.dedup();
    for krate in crates {
        build = build.args(["--package", krate]);
    }
    build.status_ok()?;

    step("writing manual pages and shell completions from the binaries' command lines");
    let bin_dir = ws.profile_dir(release);
    for binary in PACKAGES.iter().flat_map(|p| p.binaries) {
        let dir = bin_dir.join("manual").join(binary);
        if dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Cmd::new(bin_dir.join(binary))
            .args(manual_args(binary))
            .arg(&dir)
            .status_ok()?;
        gzip_pages(&dir.join("man/man1"))?;
    }

    let out = output_dir(ws);
    fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut debs = Vec::new();
    for package in &PACKAGES {
        step(&format!("packaging {} with cargo-deb", package.name));
        let mut cmd = Cmd::new(&cargo_deb)
            .args(["deb", "--no-build", "--package", package.krate])
            .args(if release {
                &[][..]
            } else {
                &["--profile", "dev", "--strip", "--fast"][..]
            })
            .arg("--output")
            .arg(&out)
            .current_dir(&ws.root)
            .env("CARGO_TARGET_DIR", &ws.target);
        if let Some(variant) = package.variant {
            cmd = cmd.args(["--variant", variant]);
        }
        let printed = cmd.output_ok()?;
        // cargo-deb prints the path of the package it wrote, last.
        let deb = printed
            .lines()
            .rev()
            .map(str::trim)
            .find(|line| line.ends_with(".deb"))
            .map(PathBuf::from)
            .with_context(|| format!("cargo-deb printed no .deb path for {}", package.name))?;
        ensure!(
            deb.is_file(),
            "cargo-deb printed {} but it is not there",
            deb.display()
        );
        debs.push(deb);
    }
    for deb in &debs {
        println!("{}", deb.display());
    }
    Ok(debs)
}

/// Compresses the manual pages in `dir` as Debian wants them (`gzip -9n`:
/// no name or time in the header, so the same page makes the same file).
/// cargo-deb compresses only what it does not take for a build product,
/// and everything under the target directory is one.
fn gzip_pages(dir: &Path) -> Result<()> {
    let mut pages = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "1") {
            pages.push(path);
        }
    }
    ensure!(
        !pages.is_empty(),
        "no manual page was written to {}",
        dir.display()
    );
    Cmd::new("gzip")
        .args(["-9n", "--force"])
        .args(&pages)
        .output_ok()?;
    Ok(())
}

/// The `cargo-deb` binary, installed once per machine beside bpf-linker.
fn ensure_cargo_deb() -> Result<PathBuf> {
    let root = tools_dir()?.join(format!("cargo-deb-{CARGO_DEB_VERSION}"));
    let bin = root.join("bin/cargo-deb");
    if Cmd::new(&bin).arg("--version").succeeds() {
        return Ok(bin);
    }
    step(&format!(
        "installing cargo-deb {CARGO_DEB_VERSION} into {} (once per machine, about 5 min)",
        root.display()
    ));
    Cmd::new("cargo")
        .args(["install", "cargo-deb", "--locked", "--force"])
        .args(["--version", CARGO_DEB_VERSION])
        .arg("--root")
        .arg(&root)
        .env_remove("CARGO_TARGET_DIR")
        .status_ok()?;
    Ok(bin)
}

/// One check in the fresh root: a command run there (`chroot ROOT ...`)
/// that must exit 0 and print what [`Expect`] says.
#[derive(Debug)]
struct Row {
    args: &'static [&'static str],
    expect: Expect,
}

/// What a [`Row`]'s command must print, on stdout and stderr together.
#[derive(Debug)]
enum Expect {
    /// This text, among the rest.
    Prints(&'static str),
    /// Nothing: `systemd-analyze verify` exits 0 on what it only warns
    /// about (an unknown key, a bad value), so a warning must fail too.
    Nothing,
}

/// What runs in the root once the packages are in: each binary's
/// version, and systemd's verdict on each unit as installed (its
/// ExecStart binary is there; the manual pages its Documentation= names
/// are checked as files, since the root has no `man` to run).
const ROWS: &[Row] = &[
    Row {
        args: &["tidegate-gateway", "--version"],
        expect: Expect::Prints("tidegate-gateway "),
    },
    Row {
        args: &["tidectl", "--version"],
        expect: Expect::Prints("tidectl "),
    },
    Row {
        args: &["tidegate-core", "--version"],
        expect: Expect::Prints("tidegate-core "),
    },
    Row {
        args: &["tidegate-edge", "--version"],
        expect: Expect::Prints("tidegate-edge "),
    },
    Row {
        args: &[
            "systemd-analyze",
            "verify",
            "--man=no",
            "/usr/lib/systemd/system/tidegate-gateway.service",
        ],
        expect: Expect::Nothing,
    },
    Row {
        args: &[
            "systemd-analyze",
            "verify",
            "--man=no",
            "/usr/lib/systemd/system/tidegate-core.service",
        ],
        expect: Expect::Nothing,
    },
    Row {
        args: &[
            "systemd-analyze",
            "verify",
            "--man=no",
            "/usr/lib/systemd/system/tidegate-edge.service",
        ],
        expect: Expect::Nothing,
    },
    Row {
        args: &["getent", "passwd", "tidegate-edge"],
        expect: Expect::Prints("tidegate-edge:"),
    },
    // An operator's first steps (DEPLOY.md): the CA and Core's certificate,
    // then the Edge's, where the shipped examples name them; then each
    // example passes its daemon's config check.
    Row {
        args: &["tidegate-core", "init"],
        expect: Expect::Prints("CA: /etc/tidegate/pki/ca.pem"),
    },
    Row {
        args: &[
            "tidegate-core",
            "issue",
            "edge-a",
            "--out",
            "/etc/tidegate/pki",
        ],
        expect: Expect::Prints("edge-a"),
    },
    Row {
        args: &[
            "tidegate-gateway",
            "--check",
            "--config",
            "/usr/share/doc/tidegate-gateway/examples/gateway.toml",
        ],
        expect: Expect::Prints("gateway.toml: ok"),
    },
    Row {
        args: &[
            "tidegate-core",
            "check",
            "--config",
            "/usr/share/doc/tidegate-core/examples/core.toml",
        ],
        expect: Expect::Prints("core.toml: ok"),
    },
    Row {
        args: &[
            "tidegate-edge",
            "--check",
            "--config",
            "/usr/share/doc/tidegate-edge/examples/edge.toml",
        ],
        expect: Expect::Prints("edge.toml: ok"),
    },
];

/// Builds the packages, installs them on a fresh Debian 12 root and
/// checks them there.
pub fn test(ws: &Workspace) -> Result<()> {
    setup::require_root(
        "`cargo xtask test-packages` (debootstrap, chroot and dpkg in the new root)",
    )?;
    let debs = build(ws, false)?;
    let started = Instant::now();
    let tarball = base_root(ws)?;
    let root = FreshRoot::unpack(ws, &tarball)?;
    step(&format!(
        "installing {} with dpkg in {}",
        PACKAGES.map(|p| p.name).join(", "),
        root.path.display()
    ));
    let inside = root.path.join("tmp/debs");
    fs::create_dir_all(&inside)?;
    let mut names = Vec::new();
    for deb in &debs {
        let name = deb.file_name().context("a .deb path without a file name")?;
        fs::copy(deb, inside.join(name))
            .with_context(|| format!("copying {} into the root", deb.display()))?;
        names.push(format!("/tmp/debs/{}", name.to_string_lossy()));
    }
    // dpkg refuses a package whose Depends the root does not satisfy.
    root.run(&["dpkg", "--install"], &names)?;

    step("checking each package's files against dpkg -L");
    for package in &PACKAGES {
        check_files(&root, package)?;
    }
    step("running the checks in the root");
    for row in ROWS {
        let printed = root
            .run(row.args, &[] as &[String])
            .with_context(|| format!("`{}` in the fresh root", row.args.join(" ")))?;
        match row.expect {
            Expect::Prints(text) => ensure!(
                printed.contains(text),
                "`{}` printed no {text:?}: {printed}",
                row.args.join(" ")
            ),
            Expect::Nothing => ensure!(
                printed.trim().is_empty(),
                "`{}` complained:\n{printed}",
                row.args.join(" ")
            ),
        }
        println!("ok: {}", row.args.join(" "));
    }
    for package in PACKAGES.iter().filter(|p| p.unit.is_some()) {
        let unit = package.unit.unwrap_or_default();
        let wants = root
            .path
            .join("etc/systemd/system/multi-user.target.wants")
            .join(unit);
        ensure!(
            wants.is_symlink(),
            "{}'s postinst did not enable {unit} ({} is missing)",
            package.name,
            wants.display()
        );
        println!("ok: {unit} enabled");
    }
    let units = PACKAGES.iter().filter(|p| p.unit.is_some()).count();
    let rows = ROWS.len() + PACKAGES.len() + units;
    step(&format!(
        "packages passed: {rows} checks in {:.0} s after the build",
        started.elapsed().as_secs_f64()
    ));
    println!("{rows} passed, 0 failed");
    Ok(())
}

/// What `package` must install, each path in the root: its binaries,
/// their manual pages and completions, its unit and its example.
fn expected_files(package: &Package) -> Vec<String> {
    let mut files = Vec::new();
    for binary in package.binaries {
        files.push(format!("/usr/bin/{binary}"));
        files.push(format!("/usr/share/man/man1/{binary}.1.gz"));
        files.push(format!("/usr/share/bash-completion/completions/{binary}"));
        files.push(format!("/usr/share/zsh/vendor-completions/_{binary}"));
        files.push(format!(
            "/usr/share/fish/vendor_completions.d/{binary}.fish"
        ));
    }
    if let Some(unit) = package.unit {
        files.push(format!("/usr/lib/systemd/system/{unit}"));
        files.push(format!("/usr/share/doc/{}/PACKAGES.md", package.name));
    }
    if let Some(example) = package.example {
        files.push(format!(
            "/usr/share/doc/{}/examples/{example}",
            package.name
        ));
    }
    files.extend(package.extra.iter().map(|path| (*path).to_owned()));
    files
}

/// Where a package may put files at all.
fn allowed(package: &Package, path: &str) -> bool {
    let doc = format!("/usr/share/doc/{}/", package.name);
    [
        "/usr/bin/",
        "/usr/share/man/man1/",
        "/usr/share/bash-completion/completions/",
        "/usr/share/zsh/vendor-completions/",
        "/usr/share/fish/vendor_completions.d/",
        "/usr/lib/systemd/system/",
        "/usr/lib/sysusers.d/",
        doc.as_str(),
    ]
    .iter()
    .any(|prefix| path.starts_with(prefix))
}

/// Every expected file is in the root and in `dpkg -L`; every file `dpkg
/// -L` lists is in the root and in an allowed place.
fn check_files(root: &FreshRoot, package: &Package) -> Result<()> {
    let listed = root.run(&["dpkg", "--listfiles", package.name], &[] as &[String])?;
    let files: BTreeSet<&str> = listed
        .lines()
        .map(str::trim)
        .filter(|path| {
            // Directories are listed too.
            let inside = root.path.join(path.trim_start_matches('/'));
            !inside.is_dir()
        })
        .collect();
    for path in &files {
        let inside = root.path.join(path.trim_start_matches('/'));
        ensure!(
            inside.exists(),
            "{}: dpkg -L lists {path}, which is not in the root",
            package.name
        );
        ensure!(
            allowed(package, path),
            "{}: installs {path}, outside the places a package of ours uses",
            package.name
        );
    }
    for path in expected_files(package) {
        ensure!(
            files.contains(path.as_str()),
            "{}: does not install {path} (dpkg -L lists: {})",
            package.name,
            files.iter().copied().collect::<Vec<_>>().join(" ")
        );
    }
    println!("ok: {} installs its {} files", package.name, files.len());
    Ok(())
}

/// The cached tarball of a fresh Debian 12 root (minbase with
/// [`INCLUDE`]), made by debootstrap the first time.
fn base_root(ws: &Workspace) -> Result<PathBuf> {
    let dir = ws.target.join("packages");
    let tarball = dir.join(format!(
        "{SUITE}-minbase-{}.tar.gz",
        INCLUDE.replace(',', "-")
    ));
    if tarball.is_file() {
        step(&format!(
            "reusing the Debian {SUITE} root {}",
            tarball.display()
        ));
        return Ok(tarball);
    }
    let mirror = apt_mirror()?;
    let build = dir.join(format!("{SUITE}-debootstrap"));
    if build.exists() {
        fs::remove_dir_all(&build).with_context(|| format!("removing {}", build.display()))?;
    }
    fs::create_dir_all(&dir)?;
    step(&format!(
        "making a fresh Debian {SUITE} root with debootstrap from {mirror} (once per target directory, about 2 min)"
    ));
    Cmd::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={INCLUDE}"), SUITE])
        .arg(&build)
        .arg(&mirror)
        .status_ok()?;
    let partial = tarball.with_extension("partial");
    Cmd::new("tar")
        .arg("--create")
        .arg("--gzip")
        .arg("--file")
        .arg(&partial)
        .arg("--directory")
        .arg(&build)
        .arg(".")
        .status_ok()?;
    fs::rename(&partial, &tarball)?;
    fs::remove_dir_all(&build).with_context(|| format!("removing {}", build.display()))?;
    Ok(tarball)
}

/// The Debian mirror this host's apt uses for the main archive.
fn apt_mirror() -> Result<String> {
    let targets = Cmd::new("apt-get")
        .args(["indextargets", "--format", "$(REPO_URI) $(RELEASE)"])
        .output_ok()?;
    targets
        .lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(uri, release)| {
            release.starts_with(SUITE) && !release.contains('-') && !uri.contains("security")
        })
        .map(|(uri, _)| uri.trim_end_matches('/').to_owned())
        .with_context(|| {
            format!("apt has no source for Debian {SUITE}: run `apt-get update` first")
        })
}

/// A root unpacked from the cached tarball for one run, with /proc
/// mounted; unmounted and removed when dropped.
#[derive(Debug)]
struct FreshRoot {
    path: PathBuf,
}

impl FreshRoot {
    fn unpack(ws: &Workspace, tarball: &Path) -> Result<Self> {
        let path = ws
            .target
            .join("packages")
            .join(format!("root-{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path)?;
        }
        fs::create_dir_all(&path)?;
        let root = Self { path };
        Cmd::new("tar")
            .arg("--extract")
            .arg("--gzip")
            .arg("--file")
            .arg(tarball)
            .arg("--directory")
            .arg(&root.path)
            .status_ok()?;
        Cmd::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(root.path.join("proc"))
            .status_ok()?;
        Ok(root)
    }

    /// Runs `args` then `more` in the root; stdout and stderr together.
    fn run(&self, args: &[&str], more: &[String]) -> Result<String> {
        let line = format!(
            "chroot {} {} {}",
            self.path.display(),
            args.join(" "),
            more.join(" ")
        );
        let out = std::process::Command::new("chroot")
            .arg(&self.path)
            .args(args)
            .args(more)
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C")
            .output()
            .with_context(|| format!("could not start `{line}`"))?;
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("`{line}` failed ({}):\n{printed}", out.status);
        }
        Ok(printed)
    }
}

impl Drop for FreshRoot {
    fn drop(&mut self) {
        let proc = self.path.join("proc");
        if !Cmd::new("umount").arg(&proc).succeeds() {
            eprintln!(
                "xtask: could not unmount {}; the root is left",
                proc.display()
            );
            return;
        }
        if let Err(error) = fs::remove_dir_all(&self.path) {
            eprintln!("xtask: could not remove {}: {error}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, path::Path};

    use super::PACKAGES;

    fn names_in(dir: &str, suffix: &str) -> BTreeSet<String> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
        std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(suffix))
            .collect()
    }

    /// Every unit and example in dist/ is some package's, and every
    /// package's is in dist/.
    #[test]
    fn every_unit_and_example_is_packaged() {
        let units: BTreeSet<String> = PACKAGES
            .iter()
            .filter_map(|p| p.unit.map(str::to_owned))
            .collect();
        assert_eq!(units, names_in("dist/systemd", ".service"));
        let examples: BTreeSet<String> = PACKAGES
            .iter()
            .filter_map(|p| p.example.map(str::to_owned))
            .collect();
        assert_eq!(examples, names_in("dist/examples", ".toml"));
    }

    #[test]
    fn expected_files_of_the_edge() {
        let edge = PACKAGES.iter().find(|p| p.name == "tidegate-edge").unwrap();
        let files = super::expected_files(edge);
        for path in [
            "/usr/bin/tidegate-edge",
            "/usr/share/man/man1/tidegate-edge.1.gz",
            "/usr/share/bash-completion/completions/tidegate-edge",
            "/usr/share/zsh/vendor-completions/_tidegate-edge",
            "/usr/share/fish/vendor_completions.d/tidegate-edge.fish",
            "/usr/lib/systemd/system/tidegate-edge.service",
            "/usr/share/doc/tidegate-edge/examples/edge.toml",
            "/usr/lib/sysusers.d/tidegate-edge.conf",
        ] {
            assert!(files.iter().any(|f| f == path), "{path} not in {files:?}");
            assert!(super::allowed(edge, path), "{path}");
        }
        assert!(!super::allowed(edge, "/etc/tidegate/edge.toml"));
        assert!(!super::allowed(edge, "/usr/share/doc/tidegate-core/x"));
    }
}
