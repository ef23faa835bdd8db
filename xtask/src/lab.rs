//! `cargo xtask lab`: the lab on this machine's kernel, or in a VM on one
//! of Debian's kernels with kernel WireGuard, with the user's arguments
//! passed on to `tidegate-lab`.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    ebpf,
    kernels::{self, Series},
    run::{self, Workspace, step},
    setup, vm,
};

/// The kernel a VM lab boots unless told: the newer series, on which the
/// whole gateway runs (tcx links for the egress guard).
pub const DEFAULT_KERNEL: &str = "6.12";

/// Where the lab writes its report unless told, under the target directory
/// (which a VM shares with this host).
const REPORT_DIR: &str = "lab";

/// The longest the lab may run inside a VM: the dev build under emulated
/// CPUs (the lab of one gateway, a location and three users took about
/// 13 minutes on 6.12), and more clients to come.
const VM_LAB_TIMEOUT: Duration = Duration::from_secs(90 * 60);

/// The lab's flag naming its report directory.
const REPORT_FLAG: &str = "--report";

/// The lab's flag that runs keepalived + WireGuard through the same crash.
const COMPARE_FLAG: &str = "--compare";

/// Lab flags that only mean something on this host: a VM ends with the lab,
/// so there is nothing left to keep or stop.
const HOST_ONLY_FLAGS: &[&str] = &["--keep", "--stop"];

/// `cargo xtask lab [--vm] [--kernel SERIES] [-- LAB-ARGS...]`.
#[derive(Debug, clap::Args)]
pub struct LabArgs {
    /// Run the lab in a VM on one of Debian's kernels, with kernel
    /// WireGuard, as the kernel suite boots them.
    #[arg(long)]
    vm: bool,
    /// The Debian kernel series the VM boots: 6.1 or 6.12 (the default).
    /// Implies --vm.
    #[arg(long, value_name = "SERIES")]
    kernel: Option<String>,
    /// Passed to tidegate-lab as given, after `--` (e.g. `-- --clients 20
    /// --compare --xdp-mode generic`). Unless one is given, xtask adds
    /// `--report TARGET/lab`; a relative report directory is made absolute.
    #[arg(last = true, value_name = "LAB-ARGS")]
    lab_args: Vec<String>,
}

/// What `cargo xtask lab` runs: where, and with which arguments.
#[derive(Debug, PartialEq, Eq)]
pub struct Plan {
    /// The VM's kernel series; `None`: this machine's kernel.
    pub kernel: Option<Series>,
    /// `tidegate-lab`'s arguments.
    pub args: Vec<String>,
    /// The report directory the lab is given, if any.
    pub report: Option<PathBuf>,
}

impl LabArgs {
    /// Where the lab runs and its arguments: the user's, with relative
    /// report directories resolved against `cwd`, and `--report
    /// TARGET/lab` added when the user gave none.
    pub fn plan(&self, target: &Path, cwd: &Path) -> Result<Plan> {
        let kernel = match (&self.kernel, self.vm) {
            (Some(name), _) => Some(kernels::series(name)?),
            (None, true) => Some(kernels::series(DEFAULT_KERNEL)?),
            (None, false) => None,
        };
        if kernel.is_some()
            && let Some(flag) = self
                .lab_args
                .iter()
                .find(|a| HOST_ONLY_FLAGS.contains(&a.as_str()))
        {
            bail!(
                "the lab's {flag} works on this host only: a VM ends with the lab; \
                 run it without --vm/--kernel"
            );
        }
        let mut args = Vec::with_capacity(self.lab_args.len() + 2);
        let mut report = None;
        let mut given = false;
        let mut user = self.lab_args.iter();
        while let Some(arg) = user.next() {
            if arg == REPORT_FLAG {
                given = true;
                args.push(arg.clone());
                if let Some(dir) = user.next() {
                    let dir = cwd.join(dir);
                    args.push(dir.display().to_string());
                    report = Some(dir);
                }
            } else if let Some(dir) = arg
                .strip_prefix(REPORT_FLAG)
                .and_then(|rest| rest.strip_prefix('='))
            {
                given = true;
                let dir = cwd.join(dir);
                args.push(format!("{REPORT_FLAG}={}", dir.display()));
                report = Some(dir);
            } else {
                args.push(arg.clone());
            }
        }
        if !given {
            let dir = target.join(REPORT_DIR);
            args.extend([REPORT_FLAG.to_owned(), dir.display().to_string()]);
            report = Some(dir);
        }
        Ok(Plan {
            kernel,
            args,
            report,
        })
    }
}

/// Builds user space and runs `tidegate-lab` here (the dev profile, the
/// build `cargo xtask test` uses) or in a VM (the release profile: under
/// emulation every start of a debug binary and its unoptimised crypto
/// cost seconds); the lab's exit code.
pub fn run(ws: &Workspace, lab: &LabArgs) -> Result<ExitCode> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let plan = lab.plan(&ws.target, &cwd)?;
    setup::require_root(
        "`cargo xtask lab` (it builds network namespaces and attaches XDP programs)",
    )?;
    setup::packages()?;
    if plan.args.iter().any(|a| a == COMPARE_FLAG) {
        // The comparison's baseline.
        setup::install_missing(setup::BENCH_PACKAGES)?;
    }
    let kernel = match plan.kernel {
        Some(series) => Some(kernels::prepare(&[series])?.remove(0)),
        None => None,
    };
    let ebpf = ebpf::build(ws)?;
    let release = kernel.is_some();
    run::build_user_space(ws, &ebpf, release)?;
    let bin_dir = ws.profile_dir(release);
    let binary = bin_dir.join("tidegate-lab");
    // A Ctrl-C reaches the lab here (which tears itself down) and stops a
    // VM there; either way this xtask reports how it ended.
    run::catch_interrupts();
    let code = match kernel {
        None => {
            step("running the lab");
            let status = run::Cmd::new(&binary)
                .args(&plan.args)
                .env("TIDEGATE_BIN_DIR", &bin_dir)
                .status()?;
            status
                .code()
                .with_context(|| format!("tidegate-lab ended without an exit code ({status})"))?
        }
        Some(kernel) => {
            step(&format!(
                "running the lab in a VM on Debian's {} kernel, with kernel WireGuard",
                kernel.series.name
            ));
            let program = vm::GuestRun {
                label: "tidegate-lab".into(),
                binary,
                args: plan.args.clone(),
                tests: Some(0),
                timeout: VM_LAB_TIMEOUT,
            };
            let rwdirs: Vec<PathBuf> = plan.report.iter().cloned().collect();
            vm::run_program(ws, &kernel, &program, &bin_dir, &rwdirs)?
        }
    };
    if code != 0 {
        step(&format!("the lab exited with {code}"));
    }
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{Cli, Command};

    const TARGET: &str = "/ws/target";
    const CWD: &str = "/home/me";

    /// Parses `cargo xtask lab ARGS` and plans it.
    fn plan(args: &[&str]) -> Result<Plan> {
        let cli = Cli::try_parse_from(["xtask", "lab"].iter().chain(args))?;
        let Command::Lab(lab) = cli.command else {
            panic!("not the lab command");
        };
        lab.plan(Path::new(TARGET), Path::new(CWD))
    }

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|a| (*a).to_owned()).collect()
    }

    /// One `cargo xtask lab` invocation and what it must plan.
    struct Case {
        name: &'static str,
        args: &'static [&'static str],
        kernel: Option<&'static str>,
        forwarded: &'static [&'static str],
        report: Option<&'static str>,
    }

    #[test]
    fn the_lab_gets_the_users_arguments_and_a_report_directory() {
        let cases = [
            Case {
                name: "nothing given: here, the default report",
                args: &[],
                kernel: None,
                forwarded: &["--report", "/ws/target/lab"],
                report: Some("/ws/target/lab"),
            },
            Case {
                name: "--vm boots the default kernel",
                args: &["--vm"],
                kernel: Some(DEFAULT_KERNEL),
                forwarded: &["--report", "/ws/target/lab"],
                report: Some("/ws/target/lab"),
            },
            Case {
                name: "--kernel implies the VM",
                args: &["--kernel", "6.1"],
                kernel: Some("6.1"),
                forwarded: &["--report", "/ws/target/lab"],
                report: Some("/ws/target/lab"),
            },
            Case {
                name: "lab arguments after -- pass in order",
                args: &[
                    "--vm",
                    "--kernel",
                    "6.12",
                    "--",
                    "--clients",
                    "20",
                    "--compare",
                ],
                kernel: Some("6.12"),
                forwarded: &["--clients", "20", "--compare", "--report", "/ws/target/lab"],
                report: Some("/ws/target/lab"),
            },
            Case {
                name: "a relative report directory is made absolute, and no default added",
                args: &["--", "--report", "out", "--xdp-mode", "generic"],
                kernel: None,
                forwarded: &["--report", "/home/me/out", "--xdp-mode", "generic"],
                report: Some("/home/me/out"),
            },
            Case {
                name: "--report= with an absolute directory is kept",
                args: &["--vm", "--", "--report=/srv/lab"],
                kernel: Some(DEFAULT_KERNEL),
                forwarded: &["--report=/srv/lab"],
                report: Some("/srv/lab"),
            },
            Case {
                name: "--report without a directory goes on for the lab to refuse",
                args: &["--", "--report"],
                kernel: None,
                forwarded: &["--report"],
                report: None,
            },
            Case {
                name: "--keep stays on this host",
                args: &["--", "--keep"],
                kernel: None,
                forwarded: &["--keep", "--report", "/ws/target/lab"],
                report: Some("/ws/target/lab"),
            },
        ];
        for case in cases {
            let name = case.name;
            let got = plan(case.args).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let want = Plan {
                kernel: case.kernel.map(|k| kernels::series(k).unwrap()),
                args: strings(case.forwarded),
                report: case.report.map(PathBuf::from),
            };
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn bad_lab_invocations_are_refused_with_the_reason() {
        let cases: &[(&str, &[&str], &str)] = &[
            ("an unknown kernel", &["--kernel", "5.10"], "5.10"),
            ("--keep in a VM", &["--vm", "--", "--keep"], "--keep"),
            (
                "--stop in a VM",
                &["--kernel", "6.1", "--", "--stop"],
                "--stop",
            ),
            (
                "lab flags without --",
                &["--xdp-mode", "generic"],
                "--xdp-mode",
            ),
        ];
        for (name, args, named) in cases {
            let error = match plan(args) {
                Ok(plan) => panic!("{name}: accepted as {plan:?}"),
                Err(error) => format!("{error:#}"),
            };
            assert!(error.contains(named), "{name}: {error}");
        }
    }
}
