//! `cargo xtask`: every step from a fresh machine to a tested, running Tidegate.
//!
//! Each command installs what it needs first (the nightly toolchain's rust-src,
//! bpf-linker, Debian packages) and announces every step it takes.

mod bench;
mod ebpf;
mod fuzz;
mod kernels;
mod lab;
mod package;
mod run;
mod setup;
mod vm;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(about = "Tidegate build, test, lab and benchmark tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Install what the BPF build needs, then build the XDP object.
    BuildEbpf,
    /// Build the XDP object, then the user-space binaries.
    Build {
        /// Build user space with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Format check, clippy, unit tests, BPF packet tests and the namespace
    /// integration tests on this machine's kernel, then the kernel suite in
    /// VMs on Debian's 6.1 and 6.12 kernels. Needs root.
    Test {
        /// Only this machine's kernel: skip the kernel suite.
        #[arg(long)]
        host_only: bool,
    },
    /// The kernel suite alone: BPF packet tests and namespace tests with
    /// kernel WireGuard, in VMs on Debian's kernels. Needs root.
    TestKernels {
        /// A kernel series to boot (6.1 or 6.12); every one when not given.
        #[arg(long = "kernel")]
        kernels: Vec<String>,
        /// Run only the suite's tests whose names contain one of these.
        filters: Vec<String>,
    },
    /// Runs inside a kernel VM: the plan the host wrote, with the log and
    /// the result written to the shared directory.
    #[command(hide = true)]
    Guest {
        #[arg(long)]
        plan: std::path::PathBuf,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Build the Debian packages (tidectl, tidegate-gateway, tidegate-core,
    /// tidegate-edge) with cargo-deb from release binaries, into
    /// target/debian/, and print their paths.
    Package,
    /// Build the Debian packages, install them with dpkg on a fresh Debian
    /// 12 root (debootstrap, cached under the target directory) and check
    /// their files, binaries and systemd units there. Needs root.
    TestPackages,
    /// Run the lab: a Tidegate location in network namespaces on real
    /// WireGuard, narrated step by step; here (wireguard-go when the kernel
    /// has no WireGuard) or in a VM on Debian's kernel. Needs root.
    Lab(lab::LabArgs),
    /// Fuzz what Tidegate decodes and parses from others (adverts,
    /// endpoint messages, config files, the Edge's JSON, control requests)
    /// with cargo-fuzz, each target for a bounded time.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only these targets; every one when none is given.
        targets: Vec<String>,
    },
    /// Benchmarks; figures go to docs/BENCHMARKS.md.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
}

fn main() -> std::process::ExitCode {
    match dispatch(Cli::parse()) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the command; the exit code of the program it ran for the user (the
/// lab's), else success.
fn dispatch(cli: Cli) -> Result<std::process::ExitCode> {
    if let Command::Guest { plan, out } = &cli.command {
        // Inside the VM there is no cargo to ask for the workspace.
        vm::guest(plan, out)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let ws = run::Workspace::locate()?;
    match cli.command {
        Command::BuildEbpf => {
            setup::packages()?;
            ebpf::build(&ws)?;
        }
        Command::Build { release } => {
            let ebpf = ebpf::build(&ws)?;
            run::build_user_space(&ws, &ebpf, release)?;
        }
        Command::Test { host_only } => test(&ws, host_only)?,
        Command::Package => {
            package::build(&ws, true)?;
        }
        Command::TestPackages => package::test(&ws)?,
        Command::TestKernels { kernels, filters } => {
            setup::require_root(
                "`cargo xtask test-kernels` (it boots VMs that load XDP programs)",
            )?;
            setup::packages()?;
            let ebpf = ebpf::build(&ws)?;
            run::build_user_space(&ws, &ebpf, false)?;
            let entries = vm::select(&filters)?;
            let kernels = kernels::prepare(&kernels::select(&kernels)?)?;
            let totals = vm::run_suite(&ws, &ebpf, &kernels, &entries)?;
            print_kernel_totals(&totals);
        }
        Command::Guest { .. } => unreachable!("handled above"),
        Command::Lab(args) => return lab::run(&ws, &args),
        Command::Fuzz { seconds, targets } => fuzz::run(&ws, seconds, &targets)?,
        Command::Bench { which } => bench::run(&ws, which)?,
    }
    Ok(std::process::ExitCode::SUCCESS)
}

fn print_kernel_totals(totals: &[(String, vm::Totals)]) {
    for (kernel, t) in totals {
        println!(
            "xtask: kernel {kernel}: {} passed, {} failed",
            t.passed, t.failed
        );
    }
}

/// The environment variable `cargo xtask test` passes to the tests: a
/// conninfo URL for the `postgres` database of a throwaway cluster.
const TEST_POSTGRES_ENV: &str = "TIDEGATE_TEST_POSTGRES";

fn test(ws: &run::Workspace, host_only: bool) -> Result<()> {
    setup::require_root(
        "`cargo xtask test` (the BPF packet tests load XDP programs and the integration tests build network namespaces)",
    )?;
    setup::packages()?;
    let ebpf = ebpf::build(ws)?;

    run::step("checking formatting (cargo fmt --all --check)");
    run::cargo(ws, &ebpf)
        .args(["fmt", "--all", "--check"])
        .status_ok()?;

    run::step("clippy on user space, warnings denied");
    run::cargo(ws, &ebpf)
        .args(["clippy", "--all-targets", "--features", run::PRIVILEGED])
        .args(["--", "-D", "warnings"])
        .status_ok()?;

    run::step("clippy on the BPF program, warnings denied");
    ebpf::clippy(ws)?;

    run::build_user_space(ws, &ebpf, false)?;

    run::step(
        "starting a throwaway PostgreSQL cluster for the store's tests (a Unix socket in a \
         directory under /tmp, run as the postgres user; TIDEGATE_TEST_POSTGRES names it)",
    );
    let postgres = tidegate_pgcluster::Cluster::start(tidegate_pgcluster::Options::default())
        .context("starting the tests' PostgreSQL cluster")?;
    run::step("unit tests, BPF packet tests and namespace integration tests (cargo test)");
    let output = run::cargo(ws, &ebpf)
        .args([
            "test",
            "--lib",
            "--bins",
            "--tests",
            "--features",
            run::PRIVILEGED,
        ])
        .env("TIDEGATE_BIN_DIR", ws.profile_dir(false))
        .env(TEST_POSTGRES_ENV, postgres.url("postgres"))
        .status_ok_tee()
        .and_then(|output| {
            run::step(
                "Core's tests again, on PostgreSQL (TIDEGATE_TEST_STORE=postgres): the store's \
                 tests, each on a new database of the cluster, the migration and the leader lease",
            );
            let on_postgres = run::cargo(ws, &ebpf)
                .args(["test", "-p", "tidegate-core", "--lib", "--test", "leader"])
                // The tests that need PostgreSQL are ignored by a plain
                // `cargo test`; here they run.
                .args(["--", "--include-ignored"])
                .env(TEST_POSTGRES_ENV, postgres.url("postgres"))
                .env("TIDEGATE_TEST_STORE", "postgres")
                .status_ok_tee()?;
            Ok((output, on_postgres))
        });
    // Stopped and removed whether the tests passed or not.
    drop(postgres);
    let (output, on_postgres) = output?;
    let (mut passed, failed) = test_totals(&output);
    if passed == 0 {
        anyhow::bail!("cargo test ran no test");
    }
    println!("xtask: host kernel: {passed} passed, {failed} failed");
    let (store_passed, _) = test_totals(&on_postgres);
    if store_passed == 0 {
        anyhow::bail!("Core's tests on PostgreSQL ran no test");
    }
    println!("xtask: Core on PostgreSQL: {store_passed} passed");
    passed += store_passed;
    run::step("the Debian packages on a fresh Debian 12 root");
    package::test(ws)?;
    if !host_only {
        run::step("the kernel suite: Debian's kernels in VMs, with kernel WireGuard");
        let kernels = kernels::prepare(kernels::SERIES)?;
        let totals = vm::run_suite(ws, &ebpf, &kernels, vm::SUITE)?;
        print_kernel_totals(&totals);
        passed += totals.iter().map(|(_, t)| t.passed).sum::<u64>();
    }
    run::step("all checks and tests passed");
    println!("xtask: {passed} passed, {failed} failed");
    Ok(())
}

/// Sums the `test result:` lines of cargo test's output.
pub fn test_totals(output: &str) -> (u64, u64) {
    let count = |line: &str, word: &str| -> u64 {
        line.split(';')
            .find_map(|part| part.trim().strip_suffix(word))
            .and_then(|n| n.trim().rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    output
        .lines()
        .filter(|line| line.starts_with("test result:"))
        .fold((0, 0), |(p, f), line| {
            (p + count(line, "passed"), f + count(line, "failed"))
        })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        super::Cli::command().debug_assert();
    }

    #[test]
    fn test_totals_sum_every_result_line() {
        let output = "running 2 tests\n\
            test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out\n\
            test result: FAILED. 7 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n";
        assert_eq!(super::test_totals(output), (9, 1));
    }
}
