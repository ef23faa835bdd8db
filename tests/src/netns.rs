//! Network namespaces, veth pairs and bridges, driven through `ip`.

use std::ffi::OsStr;
use std::fs::File;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sched::CloneFlags;

use crate::cmd::{self, CmdOutput, DEFAULT_TIMEOUT};

/// Where `ip netns` keeps its namespace handles.
const NETNS_RUN_DIR: &str = "/run/netns";

/// Serialises `ip netns add` and `ip netns del` within the process: the first
/// `ip netns add` on a machine sets up the `/run/netns` mount, and parallel
/// first calls race on it.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// A named network namespace, deleted with `ip netns del` when the last
/// handle is dropped.
///
/// Handles are cheap clones of one shared namespace. Process and interface
/// guards keep a handle on the namespace they live in, so the namespace
/// outlives everything inside it whatever order a test drops things in.
#[derive(Debug, Clone)]
pub struct Netns {
    inner: Arc<NetnsInner>,
}

/// The owned namespace behind [`Netns`] handles.
#[derive(Debug)]
struct NetnsInner {
    name: String,
}

impl Drop for NetnsInner {
    fn drop(&mut self) {
        let _guard = NETNS_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        let result = cmd::run_ok(
            Command::new("ip").args(["netns", "del", &self.name]),
            DEFAULT_TIMEOUT,
        );
        if let Err(err) = result {
            eprintln!("warning: deleting network namespace {}: {err:#}", self.name);
        }
    }
}

impl Netns {
    /// Creates the namespace `name` and brings its `lo` up.
    ///
    /// # Panics
    /// If not running as root (see [`crate::require_root`]).
    pub fn create(name: &str) -> Result<Self> {
        crate::require_root();
        {
            let _guard = NETNS_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
            cmd::run_ok(
                Command::new("ip").args(["netns", "add", name]),
                DEFAULT_TIMEOUT,
            )
            .with_context(|| format!("creating network namespace {name}"))?;
        }
        let ns = Self {
            inner: Arc::new(NetnsInner {
                name: name.to_owned(),
            }),
        };
        ns.set_up("lo")?;
        Ok(ns)
    }

    /// The namespace's name as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The names of all namespaces `ip netns list` shows.
    pub fn list() -> Result<Vec<String>> {
        let out = cmd::run_ok(Command::new("ip").args(["netns", "list"]), DEFAULT_TIMEOUT)?;
        // Lines look like "name" or "name (id: 3)".
        Ok(out
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_owned)
            .collect())
    }

    /// Runs `ip -n <ns> <args>` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", self.name()]).args(args);
        cmd::run_ok(&mut cmd, DEFAULT_TIMEOUT)
    }

    /// A command that runs `program` inside the namespace
    /// (`ip netns exec <ns> <program>`); add arguments and run it with
    /// [`cmd::run_bounded`] or spawn it as a [`crate::Process`].
    ///
    /// `ip netns exec` execs the program, so a spawned child's pid is the
    /// program's own pid.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.name()]).arg(program);
        cmd
    }

    /// Runs `program args` inside the namespace with `timeout`; the output is
    /// returned whatever the exit status.
    pub fn exec(&self, program: &str, args: &[&str], timeout: Duration) -> Result<CmdOutput> {
        cmd::run_bounded(self.command(program).args(args), timeout)
    }

    /// Runs `program args` inside the namespace with the default timeout and
    /// returns its stdout, or an error if it failed.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> Result<String> {
        self.exec(program, args, DEFAULT_TIMEOUT)?.into_success()
    }

    /// Runs `f` on a new thread that has joined this namespace (setns(2)),
    /// and returns its result.
    ///
    /// Sockets created inside `f` belong to this namespace and stay there
    /// after `f` returns, so `f` may hand them back. A panic in `f` is
    /// propagated.
    pub fn run<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = PathBuf::from(NETNS_RUN_DIR).join(self.name());
        let handle = File::open(&path)
            .with_context(|| format!("opening namespace handle {}", path.display()))?;
        let name = self.name();
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name(format!("netns {name}"))
                .spawn_scoped(scope, move || -> Result<R> {
                    nix::sched::setns(&handle, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("joining network namespace {name}"))?;
                    Ok(f())
                })
                .context("spawning a thread for the namespace")?;
            match thread.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Sets interface `ifname` up.
    pub fn set_up(&self, ifname: &str) -> Result<()> {
        self.ip(&["link", "set", "dev", ifname, "up"])
            .with_context(|| format!("setting {ifname} up in {}", self.name()))?;
        Ok(())
    }

    /// The MAC address of `ifname`, lowercase.
    pub fn link_mac(&self, ifname: &str) -> Result<String> {
        let out = self.ip(&["-o", "link", "show", "dev", ifname])?;
        out.split_whitespace()
            .skip_while(|word| *word != "link/ether")
            .nth(1)
            .map(str::to_lowercase)
            .with_context(|| format!("no link/ether in {out:?}"))
    }

    /// The MAC address the neighbour table of `ifname` has for `addr`, if
    /// it has a usable entry.
    pub fn neighbour_mac(&self, ifname: &str, addr: IpAddr) -> Result<Option<String>> {
        let out = self.ip(&["neigh", "show", &addr.to_string(), "dev", ifname])?;
        Ok(out
            .split_whitespace()
            .skip_while(|word| *word != "lladdr")
            .nth(1)
            .map(str::to_lowercase))
    }

    /// Drops the neighbour entry of `ifname` for `addr`.
    pub fn flush_neighbour(&self, ifname: &str, addr: IpAddr) -> Result<()> {
        self.ip(&["neigh", "flush", "to", &addr.to_string(), "dev", ifname])?;
        Ok(())
    }

    /// Adds address `cidr` (e.g. `198.51.100.1/24` or `2001:db8::1/64`) to
    /// `ifname`. IPv6 addresses skip duplicate address detection so that they
    /// are usable at once.
    pub fn add_addr(&self, ifname: &str, cidr: &str) -> Result<()> {
        let mut args = vec!["addr", "add", cidr, "dev", ifname];
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.ip(&args)
            .with_context(|| format!("adding {cidr} to {ifname} in {}", self.name()))?;
        Ok(())
    }

    /// Pings `target` `count` times from inside the namespace (0.2 s apart,
    /// 2 s to wait for each reply, stretched to the machine's speed) and
    /// returns the report if every echo was answered, else an error with
    /// ping's output.
    pub fn ping(&self, target: IpAddr, count: u32) -> Result<PingReport> {
        let count_arg = count.to_string();
        let target_arg = target.to_string();
        let wait = crate::pace::stretch(Duration::from_secs(2));
        let wait_arg = wait.as_secs().to_string();
        let timeout = Duration::from_secs(10) + wait + Duration::from_millis(300) * count;
        let out = self.exec(
            "ping",
            &[
                "-n",
                "-c",
                &count_arg,
                "-i",
                "0.2",
                "-W",
                &wait_arg,
                &target_arg,
            ],
            timeout,
        )?;
        let report = PingReport::parse(&out.stdout).with_context(|| {
            format!(
                "reading the summary of `{}`\nstdout:\n{}\nstderr:\n{}",
                out.command, out.stdout, out.stderr
            )
        })?;
        if report.received != count || !out.status.success() {
            bail!(
                "`{}` in {}: {} of {count} echoes answered ({})\n{}{}",
                out.command,
                self.name(),
                report.received,
                out.status,
                out.stdout,
                out.stderr
            );
        }
        Ok(report)
    }
}

impl Netns {
    /// Pings `target` `count` times, `interval` apart, waiting up to
    /// `wait` for each reply, and returns the report whatever the losses
    /// (an error only if ping could not run or printed no summary). For
    /// counting lost replies while something else happens.
    pub fn ping_paced(
        &self,
        target: IpAddr,
        count: u32,
        interval: Duration,
        wait: Duration,
    ) -> Result<PingReport> {
        let count_arg = count.to_string();
        let interval_arg = format!("{:.3}", interval.as_secs_f64());
        let wait_arg = wait.as_secs().max(1).to_string();
        let target_arg = target.to_string();
        let timeout =
            Duration::from_secs(10) + wait + (interval + Duration::from_millis(1)) * count;
        let out = self.exec(
            "ping",
            &[
                "-n",
                "-q",
                "-c",
                &count_arg,
                "-i",
                &interval_arg,
                "-W",
                &wait_arg,
                &target_arg,
            ],
            timeout,
        )?;
        PingReport::parse(&out.stdout).with_context(|| {
            format!(
                "reading the summary of `{}` in {}\nstdout:\n{}\nstderr:\n{}",
                out.command,
                self.name(),
                out.stdout,
                out.stderr
            )
        })
    }

    /// Starts pinging `target` every `interval` (waiting up to `wait` for
    /// each reply) until [`BackgroundPing::finish`], for counting lost
    /// replies across something that takes however long it takes.
    pub fn start_ping(
        &self,
        target: IpAddr,
        interval: Duration,
        wait: Duration,
    ) -> Result<BackgroundPing> {
        let out = tempfile::NamedTempFile::new().context("creating a file for ping's output")?;
        let mut command = self.command("ping");
        command
            .args(["-n", "-i", &format!("{:.3}", interval.as_secs_f64())])
            .args(["-W", &wait.as_secs().max(1).to_string()])
            // A bound on a ping nobody stops.
            .args(["-w", &BACKGROUND_PING_LIMIT.as_secs().to_string()])
            .arg(target.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(out.reopen().context("reopening ping's output file")?)
            .stderr(std::process::Stdio::null());
        let child = command
            .spawn()
            .with_context(|| format!("starting ping {target} in {}", self.name()))?;
        Ok(BackgroundPing {
            child,
            out,
            target,
            netns: self.clone(),
        })
    }

    /// One echo request to `target` with a one-second wait: true if it was
    /// answered.
    pub fn ping_once(&self, target: IpAddr) -> Result<bool> {
        let report = self.ping_paced(
            target,
            1,
            Duration::from_millis(200),
            Duration::from_secs(1),
        )?;
        Ok(report.received == 1)
    }
}

/// The longest a [`BackgroundPing`] runs if nobody stops it.
const BACKGROUND_PING_LIMIT: Duration = Duration::from_secs(600);

/// A ping running until it is told to stop (see [`Netns::start_ping`]).
/// Dropped unfinished, it is killed.
#[derive(Debug)]
pub struct BackgroundPing {
    child: std::process::Child,
    out: tempfile::NamedTempFile,
    target: IpAddr,
    // The namespace outlives the ping in it.
    netns: Netns,
}

impl BackgroundPing {
    /// Stops the ping (SIGINT: it prints its summary) and returns its
    /// report, whatever the losses. An echo request sent just before the
    /// stop, whose reply had no time to come, is not counted.
    pub fn finish(mut self) -> Result<PingReport> {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)
            .context("stopping a background ping")?;
        let deadline = std::time::Instant::now() + crate::pace::stretch(Duration::from_secs(5));
        while self.child.try_wait()?.is_none() {
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("ping {} in {} did not stop", self.target, self.netns.name());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let stdout = std::fs::read_to_string(self.out.path())?;
        let mut report = PingReport::parse(&stdout).with_context(|| {
            format!(
                "reading the summary of ping {} in {}:\n{stdout}",
                self.target,
                self.netns.name()
            )
        })?;
        let answered: std::collections::BTreeSet<u32> = stdout
            .lines()
            .filter_map(|l| l.split("icmp_seq=").nth(1))
            .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .collect();
        let last = report.transmitted;
        if report.lost() == 1 && !answered.contains(&last) {
            report.transmitted -= 1;
        }
        Ok(report)
    }
}

impl Drop for BackgroundPing {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The summary of one `ping` run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingReport {
    /// Echo requests sent.
    pub transmitted: u32,
    /// Echo replies received.
    pub received: u32,
    /// The summary line and round-trip statistics as ping printed them.
    pub summary: String,
}

impl PingReport {
    /// Echo requests that got no reply.
    pub fn lost(&self) -> u32 {
        self.transmitted.saturating_sub(self.received)
    }

    /// Parses iputils ping output ("5 packets transmitted, 5 received, ...").
    pub fn parse(stdout: &str) -> Result<Self> {
        let Some((index, line)) = stdout
            .lines()
            .enumerate()
            .find(|(_, l)| l.contains("packets transmitted"))
        else {
            bail!("no \"packets transmitted\" line");
        };
        let mut fields = line.split(',').map(str::trim);
        let transmitted = leading_number(fields.next(), "packets transmitted")?;
        let received = leading_number(fields.next(), "received")?;
        let summary = stdout.lines().skip(index).collect::<Vec<_>>().join("\n");
        Ok(Self {
            transmitted,
            received,
            summary,
        })
    }
}

/// The number at the start of `field`, which must end with `label`.
fn leading_number(field: Option<&str>, label: &str) -> Result<u32> {
    let field = field.unwrap_or_default();
    let Some(number) = field.strip_suffix(label) else {
        bail!("expected \"N {label}\", found {field:?}");
    };
    number
        .trim()
        .parse()
        .with_context(|| format!("parsing the count in {field:?}"))
}

/// Creates a veth pair with end `a_if` in `a` and end `b_if` in `b`, both
/// down. The pair is created inside `a` (`ip -n A link add ... netns B`), so
/// no end ever appears in the root namespace.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        "dev",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])
    .with_context(|| {
        format!(
            "creating veth pair {a_if} ({}) <-> {b_if} ({})",
            a.name(),
            b.name()
        )
    })?;
    Ok(())
}

/// Creates bridge `name` in `ns` with spanning tree off and no forwarding
/// delay, enslaves `ports` (interfaces already in `ns`) and sets everything up.
pub fn bridge(ns: &Netns, name: &str, ports: &[&str]) -> Result<()> {
    ns.ip(&[
        "link",
        "add",
        "dev",
        name,
        "type",
        "bridge",
        "stp_state",
        "0",
        "forward_delay",
        "0",
        "mcast_snooping",
        "0",
    ])
    .with_context(|| format!("creating bridge {name} in {}", ns.name()))?;
    for port in ports {
        ns.ip(&["link", "set", "dev", port, "master", name])
            .with_context(|| format!("adding {port} to bridge {name}"))?;
        ns.set_up(port)?;
    }
    ns.set_up(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summary() {
        let out = "PING 10.77.0.1 (10.77.0.1) 56(84) bytes of data.\n\
                   64 bytes from 10.77.0.1: icmp_seq=1 ttl=64 time=0.5 ms\n\
                   \n\
                   --- 10.77.0.1 ping statistics ---\n\
                   5 packets transmitted, 4 received, 20% packet loss, time 803ms\n\
                   rtt min/avg/max/mdev = 0.4/0.5/0.6/0.1 ms\n";
        let report = PingReport::parse(out).unwrap();
        assert_eq!(report.transmitted, 5);
        assert_eq!(report.received, 4);
        assert!(report.summary.starts_with("5 packets transmitted"));
        assert!(report.summary.ends_with("0.1 ms"));
    }

    #[test]
    fn parses_ping_summary_with_errors() {
        let out = "3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 2ms\n";
        let report = PingReport::parse(out).unwrap();
        assert_eq!((report.transmitted, report.received), (3, 0));
    }

    #[test]
    fn rejects_output_without_summary() {
        assert!(PingReport::parse("connect: Network is unreachable\n").is_err());
    }
}
