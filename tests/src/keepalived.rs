//! keepalived on the HA segment: the same namespaces, addresses, VIP, echo
//! services and prober as [`crate::ha`], with Debian's `keepalived`
//! (VRRPv3) electing the VIP's holder instead of `tidegate-gateway`. The
//! failover benchmark measures both on this segment.
//!
//! ```text
//!  gateway i ns (i = 1..=N)                 switch ns              client ns
//!  tg<id>g<i> 198.51.100.i/24 ------------ tg<id>p<i> [tg<id>br] tg<id>cb ---- tg<id>c 198.51.100.50/24
//!  keepalived -P (VRRP only), VIP 198.51.100.100/32 on tg<id>g<i> while MASTER
//!  tidegate-echo on VIP:7 answering "i"
//! ```
//!
//! Each gateway's keepalived runs in the foreground inside the gateway's
//! namespace, so it sees and touches only that namespace's interfaces,
//! with its config, pid files, notify script and track file in the run
//! directory: nothing under `/etc` or `/run` is read or written. Only the
//! VRRP subsystem runs (no IPVS checker, no BFD); without `vrrp_strict`,
//! VMACs or `no_accept` it installs no firewall rules. The notify script
//! appends the time of each state change (`date +%s%N`) and the new state
//! to `notify.log`. A track file (weight -[`PRIORITY_DROP`]) lowers the
//! priority at run time: the closest keepalived has to a planned handover.
//!
//! Teardown on drop: keepalived (SIGTERM to the parent, which stops its
//! VRRP child; then SIGKILL to a VRRP child still ours, by pid), the
//! echoes, the namespaces, then the run directory.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::failover::parse_epoch_ns_ms;
use crate::ha::{
    AdvertTransport, CLIENT_ADDR, ELECTION_TIMEOUT, HaOptions, MAX_GATEWAYS, POLL, PREFIX, Prober,
    VIP, gateway_addr, start_echo_service, start_prober_in,
};
use crate::netns::{Netns, bridge, veth};
use crate::process::{LOG_TAIL_LINES, Process};
use crate::run::Run;
use crate::wait::{Probe, poll_until};

/// The binary, from `PATH` (Debian: `/usr/sbin/keepalived`).
pub const KEEPALIVED_BIN: &str = "keepalived";
/// The VRRP virtual router id of the location.
pub const VRID: u8 = 77;
/// How much the track file lowers the priority when it holds 1.
pub const PRIORITY_DROP: u8 = 50;
/// The name of the VRRP instance (and of the track file block).
const INSTANCE: &str = "tidegate";
/// How long keepalived may take to start its VRRP child.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A keepalived state, as its notify script receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VrrpState {
    Master,
    Backup,
    Fault,
    Stop,
}

impl VrrpState {
    /// Parses the notify script's `$3` (`MASTER`, `BACKUP`, `FAULT`, `STOP`).
    pub fn parse(word: &str) -> Option<Self> {
        match word {
            "MASTER" => Some(Self::Master),
            "BACKUP" => Some(Self::Backup),
            "FAULT" => Some(Self::Fault),
            "STOP" => Some(Self::Stop),
            _ => None,
        }
    }
}

/// One line of `notify.log`: when (Unix ms) keepalived reported a state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Notification {
    pub at_unix_ms: f64,
    pub state: VrrpState,
}

/// Parses `notify.log`: lines of `<ns since the epoch> <STATE>`.
pub fn parse_notifications(log: &str) -> Result<Vec<Notification>> {
    log.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let (time, state) = line
                .split_once(' ')
                .with_context(|| format!("notify line {line:?}"))?;
            Ok(Notification {
                at_unix_ms: parse_epoch_ns_ms(time)?,
                state: VrrpState::parse(state.trim())
                    .with_context(|| format!("unknown state in notify line {line:?}"))?,
            })
        })
        .collect()
}

/// What one gateway's keepalived is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeepalivedConfig {
    pub gateway_id: u32,
    pub priority: u8,
    pub advert_interval_ms: u64,
    pub interface: String,
    /// Unicast peers; empty for multicast (224.0.0.18).
    pub unicast_peers: Vec<Ipv4Addr>,
    pub notify_script: PathBuf,
    pub track_file: PathBuf,
}

impl KeepalivedConfig {
    /// The `keepalived.conf` text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# tidegate failover benchmark, gateway {}\n\
             global_defs {{\n    router_id tidegate-gw{}\n    vrrp_version 3\n    script_user root\n}}\n",
            self.gateway_id, self.gateway_id
        );
        let _ = writeln!(
            out,
            "track_file {INSTANCE}_priority_down {{\n    file \"{}\"\n    weight -{PRIORITY_DROP}\n}}\n",
            self.track_file.display()
        );
        let _ = writeln!(out, "vrrp_instance {INSTANCE} {{");
        let _ = writeln!(out, "    state BACKUP");
        let _ = writeln!(out, "    interface {}", self.interface);
        let _ = writeln!(out, "    virtual_router_id {VRID}");
        let _ = writeln!(out, "    priority {}", self.priority);
        let _ = writeln!(
            out,
            "    advert_int {}.{:03}",
            self.advert_interval_ms / 1000,
            self.advert_interval_ms % 1000
        );
        let _ = writeln!(out, "    accept");
        if !self.unicast_peers.is_empty() {
            let _ = writeln!(out, "    unicast_src_ip {}", gateway_addr(self.gateway_id));
            let _ = writeln!(out, "    unicast_peer {{");
            for peer in &self.unicast_peers {
                let _ = writeln!(out, "        {peer}");
            }
            let _ = writeln!(out, "    }}");
        }
        let _ = writeln!(
            out,
            "    virtual_ipaddress {{\n        {VIP}/32 dev {}\n    }}",
            self.interface
        );
        let _ = writeln!(
            out,
            "    track_file {{\n        {INSTANCE}_priority_down\n    }}"
        );
        let _ = writeln!(out, "    notify \"{}\"", self.notify_script.display());
        let _ = writeln!(out, "}}");
        out
    }
}

/// The notify script: appends `<ns since the epoch> <STATE>` to `log`.
fn notify_script(log: &Path) -> String {
    format!(
        "#!/bin/sh\n# keepalived notify: $1 INSTANCE|GROUP, $2 name, $3 state, $4 priority\n\
         echo \"$(date +%s%N) $3\" >> \"{}\"\n",
        log.display()
    )
}

/// One keepalived: the parent process we started and its VRRP child,
/// which it names in its pid file.
#[derive(Debug)]
struct Keepalived {
    parent: Process,
    vrrp_pid_file: PathBuf,
    config_path: PathBuf,
}

impl Keepalived {
    /// Starts keepalived in `netns` in the foreground, VRRP only, with
    /// pid files of its own in `dir`.
    fn spawn(netns: &Netns, config_path: &Path, dir: &Path) -> Result<Self> {
        let vrrp_pid_file = dir.join("vrrp.pid");
        let mut command = netns.command(KEEPALIVED_BIN);
        command
            // Foreground, log to the console (our log file) in detail and
            // not to syslog; VRRP only; no respawn of a killed child.
            .args([
                "--dont-fork",
                "--log-console",
                "--log-detail",
                "--no-syslog",
            ])
            .args(["--vrrp", "--dont-respawn"])
            .arg("--use-file")
            .arg(config_path)
            .arg("--pid")
            .arg(dir.join("keepalived.pid"))
            .arg("--vrrp_pid")
            .arg(&vrrp_pid_file)
            .arg("--checkers_pid")
            .arg(dir.join("checkers.pid"))
            .arg("--bfd_pid")
            .arg(dir.join("bfd.pid"));
        let parent = Process::spawn(KEEPALIVED_BIN, netns, command, &dir.join("keepalived.log"))?;
        Ok(Self {
            parent,
            vrrp_pid_file,
            config_path: config_path.to_owned(),
        })
    }

    /// The VRRP child's pid, if its pid file names a live process that is
    /// ours: a keepalived started with our config file.
    fn vrrp_child(&self) -> Option<Pid> {
        let pid: i32 = std::fs::read_to_string(&self.vrrp_pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let ours = cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == self.config_path.as_os_str().as_encoded_bytes());
        ours.then(|| Pid::from_raw(pid))
    }

    /// Waits until the VRRP child runs.
    fn wait_ready(&mut self) -> Result<()> {
        let what = format!(
            "keepalived (pid {}) to start its VRRP child",
            self.parent.pid()
        );
        poll_until(&what, START_TIMEOUT, Duration::from_millis(20), || {
            self.parent.ensure_running()?;
            Ok(match self.vrrp_child() {
                Some(pid) => Probe::Ready(pid),
                None => Probe::NotYet(self.parent.log_tail(5)),
            })
        })?;
        Ok(())
    }

    /// Whether the parent still runs.
    fn running(&mut self) -> bool {
        self.parent.ensure_running().is_ok()
    }

    /// A crash: the parent is stopped (so it can neither respawn nor
    /// signal its child), the VRRP child is killed with SIGKILL (it sends
    /// nothing, unlike on SIGTERM), then the parent.
    fn kill(&mut self) -> Result<()> {
        self.parent.signal(Signal::SIGSTOP)?;
        let Some(pid) = self.vrrp_child() else {
            self.parent.kill()?;
            bail!("keepalived's VRRP child was not running when it was to be killed");
        };
        kill(pid, Signal::SIGKILL)
            .with_context(|| format!("killing keepalived's VRRP child {pid}"))?;
        self.parent.kill()?;
        Ok(())
    }

    /// SIGTERM: keepalived's own shutdown (a priority-0 advert as master,
    /// the VIP removed). Returns the parent's exit status.
    fn stop(&mut self) -> Result<ExitStatus> {
        let status = self.parent.stop();
        self.kill_leftover_child();
        status
    }

    /// SIGKILL to a VRRP child that outlived its parent, by pid, if it is
    /// still ours.
    fn kill_leftover_child(&self) {
        if let Some(pid) = self.vrrp_child() {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!("warning: stopping keepalived: {err:#}");
        }
    }
}

/// One gateway: keepalived, the echo service, its namespace and link.
///
/// Fields drop in order: keepalived, the echo, then the namespace handle.
#[derive(Debug)]
pub struct KeepalivedGateway {
    keepalived: Keepalived,
    echo: Process,
    id: u32,
    ifname: String,
    mac: String,
    dir: PathBuf,
    track_file: PathBuf,
    notify_log: PathBuf,
    netns: Netns,
}

impl KeepalivedGateway {
    /// The gateway id (also the last byte of its address).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The public interface.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The public interface's MAC address, lowercase.
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// The gateway's directory (config, logs, pid files).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether keepalived runs.
    pub fn running(&mut self) -> bool {
        self.keepalived.running()
    }

    /// Whether the public interface holds the VIP.
    pub fn vip_on_public(&self) -> Result<bool> {
        let out = self
            .netns
            .ip(&["-o", "-4", "addr", "show", "dev", &self.ifname])?;
        let needle = format!(" {VIP}/32 ");
        Ok(out.lines().any(|line| line.contains(&needle)))
    }

    /// Every state change keepalived reported, in order.
    pub fn notifications(&self) -> Result<Vec<Notification>> {
        match std::fs::read_to_string(&self.notify_log) {
            Ok(log) => parse_notifications(&log),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(err) => Err(err).with_context(|| format!("reading {}", self.notify_log.display())),
        }
    }

    /// The last state keepalived reported.
    pub fn state(&self) -> Result<Option<VrrpState>> {
        Ok(self.notifications()?.last().map(|n| n.state))
    }

    /// When keepalived last reported `state` at or after `after_unix_ms`.
    pub fn first_notification_after(
        &self,
        state: VrrpState,
        after_unix_ms: f64,
    ) -> Result<Option<f64>> {
        Ok(self
            .notifications()?
            .iter()
            .find(|n| n.state == state && n.at_unix_ms >= after_unix_ms)
            .map(|n| n.at_unix_ms))
    }

    /// Sets the public interface up or down.
    pub fn set_link(&self, up: bool) -> Result<()> {
        self.netns.ip(&[
            "link",
            "set",
            "dev",
            &self.ifname,
            if up { "up" } else { "down" },
        ])?;
        Ok(())
    }

    /// A host crash, as [`crate::ha::HaGateway::crash`]: keepalived and
    /// the echo die with SIGKILL and the public link goes down.
    pub fn crash(&mut self) -> Result<()> {
        self.keepalived.kill()?;
        self.echo.kill()?;
        self.set_link(false)
    }

    /// Writes 1 to the track file: keepalived (watching it with inotify)
    /// lowers its priority by [`PRIORITY_DROP`].
    pub fn lower_priority(&self) -> Result<()> {
        std::fs::write(&self.track_file, "1\n")
            .with_context(|| format!("writing {}", self.track_file.display()))
    }

    /// Stops keepalived with SIGTERM (as master it sends priority 0 and
    /// removes the VIP) and returns its exit status.
    pub fn stop_keepalived(&mut self) -> Result<ExitStatus> {
        self.keepalived.stop()
    }

    /// keepalived's log tail, for failure messages.
    pub fn log_tail(&self) -> String {
        self.keepalived.parent.log_tail(LOG_TAIL_LINES)
    }
}

/// The whole location with keepalived.
///
/// Fields drop in order: the gateways, the client and switch namespaces,
/// then the run directory.
#[derive(Debug)]
pub struct KeepalivedLocation {
    gateways: Vec<KeepalivedGateway>,
    client: Netns,
    switch: Netns,
    client_if: String,
    probers: u32,
    run: Run,
}

impl KeepalivedLocation {
    /// Builds the segment as [`crate::HaLocation::build`] does, starts
    /// keepalived on every gateway at about the same time, the echo
    /// services, and waits until the election settles on the expected
    /// master.
    pub fn build(options: &HaOptions) -> Result<Self> {
        ensure!(
            (1..=MAX_GATEWAYS).contains(&options.priorities.len()),
            "1 to {MAX_GATEWAYS} gateways, not {}",
            options.priorities.len()
        );
        let run = Run::new()?;
        let switch = Netns::create(&run.netns_name("switch"))?;
        let client = Netns::create(&run.netns_name("client"))?;
        let client_if = run.ifname("c");
        let client_port = run.ifname("cb");
        veth(&client, &client_if, &switch, &client_port)?;
        client.add_addr(&client_if, &format!("{CLIENT_ADDR}/{PREFIX}"))?;
        client.set_up(&client_if)?;

        let ids: Vec<u32> = (1..=options.priorities.len() as u32).collect();
        let mut ports = vec![client_port];
        let mut links = Vec::new();
        for &id in &ids {
            let netns = Netns::create(&run.netns_name(&format!("gw{id}")))?;
            let ifname = run.ifname(&format!("g{id}"));
            let port = run.ifname(&format!("p{id}"));
            veth(&netns, &ifname, &switch, &port)?;
            netns.add_addr(&ifname, &format!("{}/{PREFIX}", gateway_addr(id)))?;
            netns.set_up(&ifname)?;
            let mac = netns.link_mac(&ifname)?;
            ports.push(port);
            links.push((id, netns, ifname, mac));
        }
        let port_refs: Vec<&str> = ports.iter().map(String::as_str).collect();
        bridge(&switch, &run.ifname("br"), &port_refs)?;

        let mut started = Vec::new();
        for ((id, netns, ifname, mac), priority) in links.into_iter().zip(&options.priorities) {
            let dir = run.dir().join(format!("gw{id}"));
            std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let notify_log = dir.join("notify.log");
            let notify = dir.join("notify.sh");
            std::fs::write(&notify, notify_script(&notify_log))
                .with_context(|| format!("writing {}", notify.display()))?;
            std::fs::set_permissions(&notify, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("making {} executable", notify.display()))?;
            let track_file = dir.join("priority-down");
            std::fs::write(&track_file, "0\n")
                .with_context(|| format!("writing {}", track_file.display()))?;
            let unicast_peers = match options.transport {
                AdvertTransport::Multicast => Vec::new(),
                AdvertTransport::Unicast => ids
                    .iter()
                    .filter(|&&other| other != id)
                    .map(|&other| gateway_addr(other))
                    .collect(),
            };
            let config = KeepalivedConfig {
                gateway_id: id,
                priority: *priority,
                advert_interval_ms: options.advert_interval_ms,
                interface: ifname.clone(),
                unicast_peers,
                notify_script: notify,
                track_file: track_file.clone(),
            };
            let config_path = dir.join("keepalived.conf");
            std::fs::write(&config_path, config.render())
                .with_context(|| format!("writing {}", config_path.display()))?;
            let keepalived = Keepalived::spawn(&netns, &config_path, &dir)?;
            started.push((
                keepalived, id, netns, ifname, mac, dir, track_file, notify_log,
            ));
        }
        let mut gateways = Vec::new();
        for (mut keepalived, id, netns, ifname, mac, dir, track_file, notify_log) in started {
            keepalived.wait_ready()?;
            let echo = start_echo_service(&netns, id, &dir)?;
            gateways.push(KeepalivedGateway {
                keepalived,
                echo,
                id,
                ifname,
                mac,
                dir,
                track_file,
                notify_log,
                netns,
            });
        }
        let mut location = Self {
            gateways,
            client,
            switch,
            client_if,
            probers: 0,
            run,
        };
        location.wait_master(options.expected_master(), ELECTION_TIMEOUT)?;
        Ok(location)
    }

    /// The run (id, directory).
    pub fn run(&self) -> &Run {
        &self.run
    }

    /// The client namespace.
    pub fn client(&self) -> &Netns {
        &self.client
    }

    /// The switch namespace.
    pub fn switch(&self) -> &Netns {
        &self.switch
    }

    /// Gateway `id`.
    ///
    /// # Panics
    /// If there is no gateway `id`.
    pub fn gateway(&self, id: u32) -> &KeepalivedGateway {
        self.gateways
            .iter()
            .find(|g| g.id == id)
            .unwrap_or_else(|| panic!("no gateway {id}"))
    }

    /// Gateway `id`, mutably.
    ///
    /// # Panics
    /// If there is no gateway `id`.
    pub fn gateway_mut(&mut self, id: u32) -> &mut KeepalivedGateway {
        self.gateways
            .iter_mut()
            .find(|g| g.id == id)
            .unwrap_or_else(|| panic!("no gateway {id}"))
    }

    /// Waits until gateway `id` reported MASTER and is the only running
    /// gateway whose interface holds the VIP, and every other running
    /// gateway last reported BACKUP.
    pub fn wait_master(&mut self, id: u32, timeout: Duration) -> Result<()> {
        let what = format!("keepalived on gateway {id} to be the only MASTER");
        let result = poll_until(&what, timeout, POLL, || {
            let mut holders = Vec::new();
            let mut states = Vec::new();
            for gateway in &mut self.gateways {
                if !gateway.running() {
                    continue;
                }
                if gateway.vip_on_public()? {
                    holders.push(gateway.id);
                }
                states.push((gateway.id, gateway.state()?));
            }
            let settled = holders == [id]
                && states.iter().all(|(gw, state)| {
                    *state
                        == Some(if *gw == id {
                            VrrpState::Master
                        } else {
                            VrrpState::Backup
                        })
                });
            Ok(if settled {
                Probe::Ready(())
            } else {
                Probe::NotYet(format!("states {states:?}; VIP on {holders:?}"))
            })
        });
        result.map_err(|error| error.context(self.log_tails()))
    }

    /// The MAC address the client's neighbour table has for the VIP.
    pub fn client_neighbour(&self) -> Result<Option<String>> {
        self.client.neighbour_mac(&self.client_if, VIP.into())
    }

    /// Waits until the client's neighbour entry for the VIP is gateway
    /// `id`'s MAC.
    pub fn wait_client_neighbour(&self, id: u32, timeout: Duration) -> Result<()> {
        let mac = self.gateway(id).mac().to_owned();
        let what = format!("the client's neighbour entry for {VIP} to be gateway {id} ({mac})");
        poll_until(&what, timeout, POLL, || {
            let now = self.client_neighbour()?;
            Ok(if now.as_deref() == Some(mac.as_str()) {
                Probe::Ready(())
            } else {
                Probe::NotYet(format!("{now:?}"))
            })
        })
    }

    /// Starts a prober in the client namespace: `count` probes to the VIP,
    /// one every 10 ms.
    pub fn start_prober(&mut self, count: u64) -> Result<Prober> {
        self.probers += 1;
        start_prober_in(
            &self.client,
            self.run.dir(),
            &format!("probe{}", self.probers),
            count,
        )
    }

    /// The last lines of every keepalived's log, for failure messages.
    pub fn log_tails(&self) -> String {
        self.gateways
            .iter()
            .map(|g| format!("--- gateway {} keepalived log:\n{}", g.id, g.log_tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(peers: Vec<Ipv4Addr>) -> KeepalivedConfig {
        KeepalivedConfig {
            gateway_id: 2,
            priority: 120,
            advert_interval_ms: 100,
            interface: "tgabcdefghg2".into(),
            unicast_peers: peers,
            notify_script: "/r/gw2/notify.sh".into(),
            track_file: "/r/gw2/priority-down".into(),
        }
    }

    #[test]
    fn multicast_config_names_the_lab_interface_only() {
        let text = config(Vec::new()).render();
        for expected in [
            "vrrp_version 3\n",
            "file \"/r/gw2/priority-down\"\n    weight -50\n",
            "    state BACKUP\n    interface tgabcdefghg2\n    virtual_router_id 77\n    priority 120\n    advert_int 0.100\n    accept\n",
            "        198.51.100.100/32 dev tgabcdefghg2\n",
            "    track_file {\n        tidegate_priority_down\n    }\n",
            "    notify \"/r/gw2/notify.sh\"\n}\n",
        ] {
            assert!(text.contains(expected), "{expected:?} not in\n{text}");
        }
        assert!(!text.contains("unicast"), "{text}");
        assert!(!text.contains("strict"), "{text}");
        // Braces balance.
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }

    #[test]
    fn unicast_config_lists_the_peers() {
        let text = config(vec![Ipv4Addr::new(198, 51, 100, 1)]).render();
        assert!(
            text.contains(
                "    unicast_src_ip 198.51.100.2\n    unicast_peer {\n        198.51.100.1\n    }\n"
            ),
            "{text}"
        );
        let long = KeepalivedConfig {
            advert_interval_ms: 1250,
            ..config(Vec::new())
        };
        assert!(long.render().contains("advert_int 1.250\n"));
    }

    #[test]
    fn notifications_are_parsed_in_order() {
        let log = "1795401990000000000 BACKUP\n1795401990361500000 MASTER\n\n";
        let n = parse_notifications(log).unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(n[1].state, VrrpState::Master);
        assert!((n[1].at_unix_ms - n[0].at_unix_ms - 361.5).abs() < 1e-3);
        assert!(parse_notifications("12 LEADER\n").is_err());
        assert!(parse_notifications("soon MASTER\n").is_err());
        assert!(notify_script(Path::new("/r/n.log")).contains(">> \"/r/n.log\""));
    }
}
