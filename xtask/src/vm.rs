//! The kernel suite: the tests that matter most on a real host, run inside
//! VMs on Debian's own kernels (see [`crate::kernels`]) with kernel
//! WireGuard on gateways and clients.
//!
//! The host builds the test binaries; each VM (virtme-ng, qemu under TCG,
//! the host's files shared read-only) runs `xtask guest` with a plan of
//! binaries and test names, which writes its log and a result file to a
//! directory shared read-write with the host. The host prints the log as it
//! grows and fails unless every planned test ran and passed.

use std::{
    borrow::Cow,
    collections::BTreeMap,
    fs,
    io::{Read as _, Seek as _, SeekFrom},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use serde_json::{Value, json};

use crate::{
    ebpf::EbpfObjects,
    kernels::{self, Kernel},
    run::{self, Workspace, step},
};

/// One test target of the suite and the tests of it that run in the VMs
/// (all of them when empty).
#[derive(Debug, Clone)]
pub struct Entry {
    pub package: &'static str,
    pub target: &'static str,
    pub tests: Cow<'static, [&'static str]>,
}

/// What every kernel of the suite runs. The packet tests load and run
/// every program on the kernel's own verifier; the namespace tests run the
/// gateway with kernel WireGuard (its `auto` backend) and kernel WireGuard
/// clients.
pub const SUITE: &[Entry] = &[
    Entry {
        package: "tidegate-gateway",
        target: "packets",
        tests: Cow::Borrowed(&[]),
    },
    Entry {
        package: "tidegate-gateway",
        target: "egress",
        tests: Cow::Borrowed(&[]),
    },
    Entry {
        package: "tidegate-gateway",
        target: "director",
        tests: Cow::Borrowed(&[]),
    },
    Entry {
        package: "tidegate-tests",
        target: "guard",
        tests: Cow::Borrowed(&[]),
    },
    Entry {
        package: "tidegate-tests",
        target: "dataplane",
        tests: Cow::Borrowed(&[
            "three_clients_connect_and_reach_each_other_through_the_gateway",
            "adding_changing_and_removing_a_peer_loses_no_reply_of_others",
            "killing_and_restarting_the_daemon_leaves_the_tunnels_up",
            "mfa_removes_idle_and_silent_peers_and_keeps_active_ones",
        ]),
    },
    Entry {
        package: "tidegate-tests",
        target: "continuity",
        tests: Cow::Borrowed(&[
            "a_crashed_master_is_replaced_and_every_tunnel_resumes",
            "planned_failovers_back_and_forth_and_sigterm_lose_no_probe",
            "a_restarted_higher_priority_gateway_fails_back_by_a_handover_losing_no_probe",
            "the_egress_guard_stops_an_old_master_stealing_its_clients_back",
            "a_killed_daemon_on_a_live_master_is_fenced_and_its_clients_resume_on_the_backup",
        ]),
    },
    Entry {
        package: "tidegate-tests",
        target: "director",
        tests: Cow::Borrowed(&["the_director_spreads_clients_survives_its_crash_and_drains"]),
    },
    // The users' client on kernel WireGuard: a full tunnel and its DNS
    // through Debian's resolvconf, which only a VM's /etc may take.
    Entry {
        package: "tidegate-tests",
        target: "client",
        tests: Cow::Borrowed(&[
            "the_locations_dns_servers_go_to_resolvconf_while_the_tunnel_is_up",
        ]),
    },
    // Steps the wall clock, which only a VM may do: ignored on the host.
    Entry {
        package: "tidegate-tests",
        target: "ha",
        tests: Cow::Borrowed(&[
            "a_gateway_restarted_after_its_clock_stepped_back_is_heard_and_no_split_brain",
        ]),
    },
];

/// Set in the guest: the machine is the VM's own, so a test may step its
/// wall clock (`tidegate_tests::clock::STEPPABLE_ENV`).
const CLOCK_STEPPABLE_ENV: &str = "TIDEGATE_TEST_CLOCK_STEPPABLE";
/// Set in the guest: its /etc and /usr are overlays of its own, so a test
/// may install a package's files there (`tidegate_tests::resolvconf`).
const OWN_ROOT_ENV: &str = "TIDEGATE_TEST_OWN_ROOT";
/// Set in the guest: Debian's resolvconf package, for that test.
const RESOLVCONF_DEB_ENV: &str = "TIDEGATE_RESOLVCONF_DEB";
/// What the guest may change without touching this host: overlays of
/// the host's directories, written in the guest's memory.
const GUEST_OVERLAYS: &[&str] = &["/etc", "/usr/sbin", "/usr/lib"];

/// Guest memory: each namespace test runs up to about 30 kernel WireGuard
/// interfaces and a few daemons.
const MEMORY: &str = "3G";
/// Guest CPUs: one. With two, TCG runs them on two host threads, and a
/// kernel patching its own code (a static key flipping, as when `ping`
/// turns on socket timestamps) on one while the other runs it ends in an
/// `Oops: int3` now and then (seen with Debian 12's qemu 7.2). One CPU per
/// VM, and the kernels' VMs side by side, keep this machine's two cores
/// busy instead.
const CPUS: &str = "1";
/// The longest one VM may run before it is stopped, unless one of its
/// programs may run longer (then that, plus [`BOOT_MARGIN`]).
const VM_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The longest one test binary may run inside the guest.
pub const BINARY_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Time for the VM to boot and shut down around its longest program.
const BOOT_MARGIN: Duration = Duration::from_secs(5 * 60);

/// How many times slower than the host the guest runs under TCG, about:
/// the tests stretch their waits by it (`tidegate_tests::pace`).
const SLOWDOWN: &str = "8";

/// The guest's log and result, in the directory it shares with the host.
const LOG: &str = "guest.log";
const RESULT: &str = "result.json";
const PLAN: &str = "plan.json";

/// One program a guest runs: a test binary (some of its tests) or a
/// benchmark.
#[derive(Debug, Clone)]
pub struct GuestRun {
    /// What the log and the errors call it (`package/target`).
    pub label: String,
    pub binary: PathBuf,
    pub args: Vec<String>,
    /// For a test binary, how many tests must pass (`None`: at least one);
    /// a benchmark (`Some(0)`) must only exit 0.
    pub tests: Option<usize>,
    /// The longest it may run inside the guest before it is stopped.
    pub timeout: Duration,
}

impl GuestRun {
    /// The tests of `entry` in `binary`, one at a time, each narrating its
    /// figures into the log. Tests ignored on the host because they need a
    /// machine of their own (they step the clock) run too.
    fn tests(entry: &Entry, binary: PathBuf) -> Self {
        let mut args: Vec<String> = vec![
            "--test-threads=1".into(),
            "--nocapture".into(),
            "--include-ignored".into(),
        ];
        if !entry.tests.is_empty() {
            args.push("--exact".into());
            args.extend(entry.tests.iter().map(|t| (*t).to_owned()));
        }
        Self {
            label: format!("{}/{}", entry.package, entry.target),
            binary,
            args,
            tests: (!entry.tests.is_empty()).then_some(entry.tests.len()),
            timeout: BINARY_TIMEOUT,
        }
    }
}

/// What one VM reported.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub passed: u64,
    pub failed: u64,
}

/// Entries of [`SUITE`], narrowed to tests whose names contain one of
/// `filters` (the whole suite when empty).
pub fn select(filters: &[String]) -> Result<Vec<Entry>> {
    if filters.is_empty() {
        return Ok(SUITE.to_vec());
    }
    let mut out = Vec::new();
    for entry in SUITE {
        if entry.tests.is_empty() {
            if filters.iter().any(|f| entry.target.contains(f.as_str())) {
                out.push(entry.clone());
            }
            continue;
        }
        let tests: Vec<&'static str> = entry
            .tests
            .iter()
            .copied()
            .filter(|t| filters.iter().any(|f| t.contains(f.as_str())))
            .collect();
        if !tests.is_empty() {
            out.push(Entry {
                tests: Cow::Owned(tests),
                ..entry.clone()
            });
        }
    }
    ensure!(
        !out.is_empty(),
        "no test of the kernel suite matches {filters:?}"
    );
    Ok(out)
}

/// Builds the suite's test binaries (dev profile) and finds each.
fn plan(ws: &Workspace, ebpf: &EbpfObjects, entries: &[Entry]) -> Result<Vec<GuestRun>> {
    step("building the kernel suite's test binaries");
    let mut packages: Vec<&str> = entries.iter().map(|e| e.package).collect();
    packages.sort_unstable();
    packages.dedup();
    let mut binaries: BTreeMap<(&str, String), PathBuf> = BTreeMap::new();
    for package in packages {
        // One package at a time: every test executable cargo reports then
        // belongs to it.
        let features = format!("{package}/{}", run::PRIVILEGED_FEATURE);
        let out = run::cargo(ws, ebpf)
            .args([
                "test",
                "--no-run",
                "--message-format=json",
                "--package",
                package,
                "--features",
                &features,
            ])
            .output_ok()?;
        for line in out.lines() {
            let Ok(message) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if let (Some(executable), Some(target), true) = (
                message["executable"].as_str(),
                message["target"]["name"].as_str(),
                message["target"]["kind"][0] == "test",
            ) {
                binaries.insert((package, target.to_owned()), PathBuf::from(executable));
            }
        }
    }
    entries
        .iter()
        .map(|entry| {
            let binary = binaries
                .get(&(entry.package, entry.target.to_owned()))
                .with_context(|| {
                    format!(
                        "cargo built no test target {} in {}",
                        entry.target, entry.package
                    )
                })?
                .clone();
            Ok(GuestRun::tests(entry, binary))
        })
        .collect()
}

/// Runs `entries` in a VM of each of `kernels`, side by side; the totals
/// per kernel. Fails if any kernel's run failed, naming each.
pub fn run_suite(
    ws: &Workspace,
    ebpf: &EbpfObjects,
    kernels: &[Kernel],
    entries: &[Entry],
) -> Result<Vec<(String, Totals)>> {
    let planned = plan(ws, ebpf, entries)?;
    run_in_vms(ws, kernels, &planned)
}

/// Runs `planned` in a VM of each of `kernels`, side by side; the totals
/// per kernel. Fails if any kernel's run failed, naming each.
pub fn run_in_vms(
    ws: &Workspace,
    kernels: &[Kernel],
    planned: &[GuestRun],
) -> Result<Vec<(String, Totals)>> {
    let bin_dir = ws.profile_dir(false);
    let resolvconf = kernels::resolvconf_deb()?;
    // A Ctrl-C stops the VMs rather than leaving them to their timeout.
    run::catch_interrupts();
    let outcomes: Vec<(&Kernel, PathBuf, Result<Totals>)> = std::thread::scope(|scope| {
        let runs: Vec<_> = kernels
            .iter()
            .map(|kernel| {
                let (bin_dir, resolvconf) = (&bin_dir, &resolvconf);
                scope.spawn(move || -> Result<(PathBuf, Result<Totals>)> {
                    let out = guest_dir(ws, kernel)?;
                    let totals = run_one(kernel, planned, bin_dir, resolvconf, &out);
                    Ok((out, totals))
                })
            })
            .collect();
        kernels
            .iter()
            .zip(runs)
            .map(|(kernel, run)| match run.join() {
                Ok(Ok((out, totals))) => (kernel, out, totals),
                Ok(Err(error)) => (kernel, PathBuf::new(), Err(error)),
                Err(_) => (
                    kernel,
                    PathBuf::new(),
                    Err(anyhow::anyhow!("the thread running the VM panicked")),
                ),
            })
            .collect()
    });
    let mut totals = Vec::new();
    let mut failures = Vec::new();
    for (kernel, out, outcome) in outcomes {
        match outcome {
            Ok(t) => {
                step(&format!(
                    "kernel {} ({}): {} tests passed, {} failed, every program exited 0",
                    kernel.series.name, kernel.release, t.passed, t.failed
                ));
                totals.push((kernel.series.name.to_owned(), t));
                fs::remove_dir_all(&out).ok();
            }
            Err(error) => failures.push(format!(
                "on {} ({}): {error:#}; the guest's files are in {}",
                kernel.series.name,
                kernel.release,
                out.display()
            )),
        }
    }
    if !failures.is_empty() {
        bail!("the VM runs failed {}", failures.join("; and "));
    }
    Ok(totals)
}

/// A fresh directory the guest may write, under the target directory.
fn guest_dir(ws: &Workspace, kernel: &Kernel) -> Result<PathBuf> {
    let dir =
        ws.target
            .join("kernel-suite")
            .join(format!("{}-{}", kernel.release, std::process::id()));
    if dir.exists() {
        fs::remove_dir_all(&dir)?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn run_one(
    kernel: &Kernel,
    planned: &[GuestRun],
    bin_dir: &Path,
    resolvconf: &Path,
    out: &Path,
) -> Result<Totals> {
    let vm = Vm {
        kernel,
        out,
        rwdirs: &[],
        prefix: &format!("[{}] ", kernel.series.name),
    };
    let result = vm.run(planned, bin_dir, Some(resolvconf))?;
    check_result(&result, planned)
}

/// Runs one program (the lab) in a VM of `kernel`, its output printed as
/// it comes without a prefix; its exit code. `bin_dir` holds the build it
/// runs with (this tool's among it). `rwdirs` are directories of this host
/// the guest may write besides its own (created first). The guest's files
/// are removed when the program exited 0, kept otherwise.
pub fn run_program(
    ws: &Workspace,
    kernel: &Kernel,
    program: &GuestRun,
    bin_dir: &Path,
    rwdirs: &[PathBuf],
) -> Result<i32> {
    for dir in rwdirs {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let out = guest_dir(ws, kernel)?;
    let vm = Vm {
        kernel,
        out: &out,
        rwdirs,
        prefix: "",
    };
    let result = vm.run(std::slice::from_ref(program), bin_dir, None);
    let code = result.and_then(|result| exit_code(&result, &program.label));
    match code {
        Ok(0) => {
            fs::remove_dir_all(&out).ok();
            Ok(0)
        }
        Ok(code) => {
            step(&format!(
                "the guest's files (its log, the VM's console) are in {}",
                out.display()
            ));
            Ok(code)
        }
        Err(error) => Err(error.context(format!(
            "on {} ({}); the guest's files are in {}",
            kernel.series.name,
            kernel.release,
            out.display()
        ))),
    }
}

/// The exit code of `target` in a guest's result.
fn exit_code(result: &Value, target: &str) -> Result<i32> {
    let runs = result["runs"].as_array().context("no runs in the result")?;
    let run = runs
        .iter()
        .find(|r| r["target"] == target)
        .with_context(|| format!("{target} did not run"))?;
    run["code"]
        .as_i64()
        .and_then(|c| i32::try_from(c).ok())
        .with_context(|| format!("{target} ended without an exit code: {}", run["outcome"]))
}

/// One VM: the kernel it boots, the directory it reports into, what else
/// of this host it may write, and the prefix of its log lines here.
struct Vm<'a> {
    kernel: &'a Kernel,
    out: &'a Path,
    rwdirs: &'a [PathBuf],
    prefix: &'a str,
}

impl Vm<'_> {
    /// Boots the VM to run `planned` with `xtask guest`, printing the
    /// guest's log as it grows, stopping it after [`vm_timeout`] or when
    /// this xtask is interrupted; the
    /// result the guest wrote.
    fn run(
        &self,
        planned: &[GuestRun],
        bin_dir: &Path,
        resolvconf: Option<&Path>,
    ) -> Result<Value> {
        let (kernel, out) = (self.kernel, self.out);
        let plan = json!({
            "bin_dir": bin_dir,
            "resolvconf_deb": resolvconf,
            "runs": planned.iter().map(|p| json!({
                "target": p.label,
                "binary": p.binary,
                "args": p.args,
                "timeout_secs": p.timeout.as_secs(),
            })).collect::<Vec<_>>(),
        });
        fs::write(out.join(PLAN), serde_json::to_vec_pretty(&plan)?)?;
        // The workspace's own build of this tool (the running one may have been
        // replaced on disk by that build).
        let xtask = bin_dir.join("xtask");
        let exec = format!(
            "{} guest --plan {} --out {}",
            xtask.display(),
            out.join(PLAN).display(),
            out.display()
        );
        step(&format!(
            "booting Debian's {} kernel ({}) under qemu (TCG) to run {} program{}",
            kernel.series.name,
            kernel.release,
            planned.len(),
            if planned.len() == 1 { "" } else { "s" }
        ));
        let vng_log = fs::File::create(out.join("vng.log"))?;
        let mut command = Command::new(&kernel.vng);
        command
            .arg("-r")
            .arg(kernel.image())
            .args(["--disable-kvm", "--cpus", CPUS, "--memory", MEMORY])
            // The guest's console (kernel messages) goes to vng.log.
            .arg("--verbose")
            .arg("--rwdir")
            .arg(out)
            .args(
                self.rwdirs
                    .iter()
                    .flat_map(|dir| ["--rwdir".as_ref(), dir.as_os_str()]),
            )
            .args(
                GUEST_OVERLAYS
                    .iter()
                    .flat_map(|dir| ["--overlay-rwdir", dir]),
            )
            .args(["--exec", &exec])
            .stdin(Stdio::null())
            .stdout(vng_log.try_clone()?)
            .stderr(vng_log)
            // Its own process group: on a timeout the VM and whatever vng
            // started go together, and nothing else.
            .process_group(0);
        eprintln!(
            "  $ vng -r {} ... --exec '{exec}'",
            kernel.image().display()
        );
        let mut child = command.spawn().context("starting vng")?;
        let started = Instant::now();
        let log_path = out.join(LOG);
        let mut offset = 0;
        let prefix = self.prefix;
        let timeout = vm_timeout(planned);
        let status = loop {
            offset = print_new(&log_path, offset, prefix)?;
            if let Some(status) = child.try_wait()? {
                break status;
            }
            let stop = if run::interrupted() {
                Some("this xtask was interrupted: the VM was stopped".to_owned())
            } else if started.elapsed() > timeout {
                Some(format!(
                    "the VM ran longer than {timeout:?} and was stopped"
                ))
            } else {
                None
            };
            if let Some(why) = stop {
                // SAFETY: kill(2) on the process group this xtask created for
                // the VM; no memory is involved.
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                print_new(&log_path, offset, prefix)?;
                bail!("{why}");
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        print_new(&log_path, offset, prefix)?;
        let result = fs::read_to_string(out.join(RESULT)).with_context(|| {
            format!(
                "the guest wrote no result (vng {status}); its console is in {}",
                out.join("vng.log").display()
            )
        })?;
        Ok(serde_json::from_str(&result)?)
    }
}

/// How long a VM running `planned` may run: [`VM_TIMEOUT`], or longer
/// when one program may take longer than that.
fn vm_timeout(planned: &[GuestRun]) -> Duration {
    let longest = planned.iter().map(|p| p.timeout).max().unwrap_or_default();
    VM_TIMEOUT.max(longest + BOOT_MARGIN)
}

/// Prints what was appended to `path` since `offset`; the new offset.
fn print_new(path: &Path, offset: u64, prefix: &str) -> Result<u64> {
    let Ok(mut file) = fs::File::open(path) else {
        return Ok(offset);
    };
    let len = file.metadata()?.len();
    if len <= offset {
        return Ok(offset);
    }
    file.seek(SeekFrom::Start(offset))?;
    let mut text = String::new();
    file.take(len - offset).read_to_string(&mut text).ok();
    // Only whole lines: the rest is printed next time.
    let whole = text.rfind('\n').map_or(0, |i| i + 1);
    for line in text[..whole].lines() {
        println!("{prefix}{line}");
    }
    Ok(offset + whole as u64)
}

/// Every planned program ran and exited 0; each test binary ran every
/// planned test.
fn check_result(result: &Value, planned: &[GuestRun]) -> Result<Totals> {
    let runs = result["runs"].as_array().context("no runs in the result")?;
    let mut totals = Totals::default();
    let mut problems = Vec::new();
    for p in planned {
        let target = &p.label;
        let Some(run) = runs.iter().find(|r| r["target"] == target.as_str()) else {
            problems.push(format!("{target} did not run"));
            continue;
        };
        let passed = run["passed"].as_u64().unwrap_or(0);
        let failed = run["failed"].as_u64().unwrap_or(0);
        totals.passed += passed;
        totals.failed += failed;
        if run["success"] != true {
            problems.push(format!("{target}: {}", run["outcome"]));
            continue;
        }
        match p.tests {
            Some(0) => {}
            Some(n) if passed != n as u64 => {
                problems.push(format!("{target}: {passed} of {n} planned tests ran"));
            }
            None if passed == 0 => problems.push(format!("{target}: ran no test")),
            _ => {}
        }
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(totals)
}

/// Inside the VM: runs the plan, writing the log and the result into `out`.
pub fn guest(plan: &Path, out: &Path) -> Result<()> {
    let plan: Value = serde_json::from_str(
        &fs::read_to_string(plan).with_context(|| format!("reading {}", plan.display()))?,
    )?;
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out.join(LOG))?;
    let mut say = |line: &str| {
        use std::io::Write as _;
        let _ = writeln!(log, "{line}");
    };
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    say(&format!("guest: kernel {release}"));
    let modprobe = Command::new("modprobe").arg("wireguard").output()?;
    ensure!(
        modprobe.status.success(),
        "modprobe wireguard in the guest: {}",
        String::from_utf8_lossy(&modprobe.stderr)
    );
    say("guest: WireGuard module loaded");
    let bin_dir = plan["bin_dir"].as_str().context("no bin_dir in the plan")?;
    // Only the suite's client test needs it; the lab runs without.
    let resolvconf = plan["resolvconf_deb"].as_str();
    let mut runs = Vec::new();
    for run in plan["runs"].as_array().context("no runs in the plan")? {
        let target = run["target"].as_str().unwrap_or_default().to_owned();
        let binary = run["binary"].as_str().context("a run without a binary")?;
        let args: Vec<&str> = run["args"]
            .as_array()
            .map(|t| t.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        say(&format!("guest: running {target}"));
        let started = Instant::now();
        let mut command = Command::new(binary);
        command
            .args(&args)
            .env("TIDEGATE_BIN_DIR", bin_dir)
            .env("TIDEGATE_TEST_SLOWDOWN", SLOWDOWN)
            .env(CLOCK_STEPPABLE_ENV, "1")
            .env(OWN_ROOT_ENV, "1")
            .env_remove("RUST_LOG");
        if let Some(resolvconf) = resolvconf {
            command.env(RESOLVCONF_DEB_ENV, resolvconf);
        }
        let timeout = run["timeout_secs"]
            .as_u64()
            .map_or(BINARY_TIMEOUT, Duration::from_secs);
        let outcome = run_bounded(command, &out.join(LOG), timeout);
        let (passed, failed) = totals_in(
            &fs::read_to_string(out.join(LOG)).unwrap_or_default(),
            &target,
        );
        let (success, code, outcome) = match outcome {
            Ok(status) => (status.success(), status.code(), status.to_string()),
            Err(error) => (false, None, format!("{error:#}")),
        };
        say(&format!(
            "guest: {target}: {outcome} in {:.0?} ({passed} passed, {failed} failed)",
            started.elapsed()
        ));
        runs.push(json!({
            "target": target,
            "success": success,
            "code": code,
            "outcome": outcome,
            "passed": passed,
            "failed": failed,
        }));
    }
    fs::write(
        out.join(RESULT),
        serde_json::to_vec_pretty(&json!({ "release": release, "runs": runs }))?,
    )?;
    Ok(())
}

/// Runs `command` with its output appended to `log`, stopping it (its
/// process group) after `timeout`.
fn run_bounded(
    mut command: Command,
    log: &Path,
    timeout: Duration,
) -> Result<std::process::ExitStatus> {
    let file = fs::OpenOptions::new().append(true).open(log)?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .process_group(0)
        .spawn()
        .context("starting the program")?;
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if started.elapsed() > timeout {
            // SAFETY: kill(2) on the process group created for this child.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            bail!("stopped after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pass and fail counts of the `test result:` lines in `log` between
/// the line that started `target` and the next run.
fn totals_in(log: &str, target: &str) -> (u64, u64) {
    let marker = format!("guest: running {target}\n");
    let Some(start) = log.rfind(&marker).map(|i| i + marker.len()) else {
        return (0, 0);
    };
    let section = &log[start..];
    let end = section.find("guest: running ").unwrap_or(section.len());
    section[..end]
        .lines()
        .filter(|l| l.starts_with("test result:"))
        .map(crate::test_totals)
        .fold((0, 0), |(p, f), (p2, f2)| (p + p2, f + f2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_narrow_the_suite_to_matching_tests() {
        let picked = select(&["crashed".into()]).unwrap();
        assert_eq!(picked.len(), 1);
        assert_eq!(picked[0].target, "continuity");
        assert_eq!(
            *picked[0].tests,
            ["a_crashed_master_is_replaced_and_every_tunnel_resumes"]
        );
        let whole = select(&["guard".into()]).unwrap();
        assert!(
            whole
                .iter()
                .any(|e| e.target == "guard" && e.tests.is_empty())
        );
        let clock = select(&["clock".into()]).unwrap();
        assert_eq!(clock.len(), 1);
        assert_eq!(clock[0].target, "ha");
        assert!(select(&["no such test".into()]).is_err());
        assert_eq!(select(&[]).unwrap().len(), SUITE.len());
    }

    #[test]
    fn a_guest_log_yields_the_totals_of_its_own_run() {
        let log = "guest: running a/x\ntest result: ok. 3 passed; 0 failed; 0 ignored\n\
                   guest: running a/y\ntest result: FAILED. 1 passed; 2 failed; 0 ignored\n";
        assert_eq!(totals_in(log, "a/x"), (3, 0));
        assert_eq!(totals_in(log, "a/y"), (1, 2));
    }

    #[test]
    fn a_vm_outlives_its_longest_program() {
        let run = |minutes: u64| GuestRun {
            label: "p".into(),
            binary: PathBuf::from("/p"),
            args: Vec::new(),
            tests: Some(0),
            timeout: Duration::from_secs(minutes * 60),
        };
        assert_eq!(vm_timeout(&[run(15), run(15), run(15)]), VM_TIMEOUT);
        assert_eq!(
            vm_timeout(&[run(15), run(90)]),
            Duration::from_secs(95 * 60)
        );
    }

    #[test]
    fn a_programs_exit_code_is_read_from_the_result() {
        let result = json!({"runs": [
            {"target": "lab", "success": false, "code": 3, "outcome": "exit status: 3"},
            {"target": "killed", "success": false, "code": null, "outcome": "stopped after 900s"},
        ]});
        assert_eq!(exit_code(&result, "lab").unwrap(), 3);
        let killed = format!("{:#}", exit_code(&result, "killed").unwrap_err());
        assert!(killed.contains("stopped after 900s"), "{killed}");
        assert!(exit_code(&result, "other").is_err());
        assert!(exit_code(&json!({}), "lab").is_err());
    }

    #[test]
    fn a_result_must_show_every_planned_test_passing() {
        let planned = vec![GuestRun::tests(
            &Entry {
                package: "p",
                target: "t",
                tests: Cow::Borrowed(&["a", "b"]),
            },
            PathBuf::from("/x"),
        )];
        let ok = json!({"runs": [{"target": "p/t", "success": true, "passed": 2, "failed": 0}]});
        assert_eq!(
            check_result(&ok, &planned).unwrap(),
            Totals {
                passed: 2,
                failed: 0
            }
        );
        let short = json!({"runs": [{"target": "p/t", "success": true, "passed": 1, "failed": 0}]});
        assert!(check_result(&short, &planned).is_err());
        let failed = json!({"runs": [{"target": "p/t", "success": false, "outcome": "exit status: 101", "passed": 1, "failed": 1}]});
        assert!(check_result(&failed, &planned).is_err());
        assert!(check_result(&json!({"runs": []}), &planned).is_err());
    }
}
