//! WireGuard interfaces inside a namespace: the kernel module when
//! `ip link add ... type wireguard` works, else Debian's `wireguard-go` in
//! the foreground; configured with `wg` and `ip` either way.

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd::{self, DEFAULT_TIMEOUT};
use crate::netns::Netns;
use crate::process::Process;
use crate::wait::{Probe, poll_until};

/// Directory of wireguard-go's UAPI sockets. It is shared by all network
/// namespaces, which is why interface names must be unique per run.
pub const UAPI_DIR: &str = "/var/run/wireguard";

/// How long wireguard-go gets to create its interface and UAPI socket.
const WIREGUARD_GO_START: Duration = Duration::from_secs(10);

/// How long a detached wireguard-go gets to exit after SIGTERM, and then
/// after SIGKILL.
const DETACHED_GRACE: Duration = Duration::from_secs(5);

/// Which WireGuard implementation backs an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgBackend {
    /// The kernel module (`ip link add ... type wireguard`).
    Kernel,
    /// Debian's userspace `wireguard-go`, driven through its UAPI socket.
    WireguardGo,
}

impl fmt::Display for WgBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kernel => "kernel module",
            Self::WireguardGo => "wireguard-go (userspace)",
        })
    }
}

/// What a gateway's `backend = "auto"` picks on this machine, as its
/// daemon would: the kernel module where the kernel has it (loaded on
/// demand, as creating a WireGuard link loads it), else wireguard-go.
pub fn auto_backend() -> WgBackend {
    let loaded = || Path::new("/sys/module/wireguard").exists();
    if loaded()
        || Command::new("modprobe")
            .args(["-q", "wireguard"])
            .status()
            .is_ok_and(|s| s.success())
            && loaded()
    {
        WgBackend::Kernel
    } else {
        WgBackend::WireguardGo
    }
}

/// A WireGuard key pair in base64, as `wg` prints it.
#[derive(Clone)]
pub struct KeyPair {
    /// The private key.
    pub private: String,
    /// The public key derived from it.
    pub public: String,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// Generates a key pair with `wg genkey` and `wg pubkey`.
    pub fn generate() -> Result<Self> {
        let private = cmd::run_ok(Command::new("wg").arg("genkey"), DEFAULT_TIMEOUT)
            .context("generating a WireGuard private key")?
            .trim()
            .to_owned();
        let public = pubkey(&private)?;
        Ok(Self { private, public })
    }
}

/// The public key of `private`, computed by `wg pubkey`.
fn pubkey(private: &str) -> Result<String> {
    let input = format!("{private}\n").into_bytes();
    let public = cmd::run_with_input(
        Command::new("wg").arg("pubkey"),
        Some(input),
        DEFAULT_TIMEOUT,
    )?
    .into_success()
    .context("deriving a WireGuard public key")?;
    Ok(public.trim().to_owned())
}

/// One peer to add to an interface.
#[derive(Debug, Clone)]
pub struct WgPeer<'a> {
    /// The peer's public key.
    pub public_key: &'a str,
    /// Where to send to the peer, if known.
    pub endpoint: Option<SocketAddr>,
    /// Tunnel addresses routed to the peer (`10.77.0.2/32`, ...).
    pub allowed_ips: &'a [&'a str],
    /// Keepalive interval in seconds, if any.
    pub persistent_keepalive: Option<u16>,
}

/// A peer as `wg show <if> dump` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    /// The peer's public key.
    pub public_key: String,
    /// The endpoint last seen or configured, if any.
    pub endpoint: Option<String>,
    /// The peer's allowed IPs.
    pub allowed_ips: Vec<String>,
    /// Unix time of the last completed handshake, 0 if none.
    pub latest_handshake: u64,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
}

impl PeerStats {
    /// Parses the peer lines of `wg show <if> dump` (the first line describes
    /// the interface itself and is skipped).
    pub fn parse_dump(dump: &str) -> Result<Vec<Self>> {
        dump.lines()
            .skip(1)
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                let f: Vec<&str> = line.split('\t').collect();
                if f.len() != 8 {
                    bail!(
                        "expected 8 tab-separated fields in a peer line, found {}: {line:?}",
                        f.len()
                    );
                }
                let none_if = |s: &str| (s != "(none)").then(|| s.to_owned());
                let number = |i: usize, what: &str| -> Result<u64> {
                    f[i].parse()
                        .with_context(|| format!("parsing {what} {:?} in {line:?}", f[i]))
                };
                Ok(Self {
                    public_key: f[0].to_owned(),
                    endpoint: none_if(f[2]),
                    allowed_ips: none_if(f[3])
                        .map(|s| s.split(',').map(str::to_owned).collect())
                        .unwrap_or_default(),
                    latest_handshake: number(4, "latest handshake")?,
                    rx_bytes: number(5, "rx bytes")?,
                    tx_bytes: number(6, "tx bytes")?,
                })
            })
            .collect()
    }
}

/// A WireGuard interface in a namespace, removed on drop (wireguard-go is
/// stopped and a UAPI socket it left behind is deleted).
#[derive(Debug)]
pub struct WgInterface {
    daemon: Option<Process>,
    netns: Netns,
    name: String,
    backend: WgBackend,
    keys: KeyPair,
    uapi_socket: Option<PathBuf>,
}

impl WgInterface {
    /// Creates interface `name` in `netns` with a fresh key pair (key file
    /// and wireguard-go log go to `dir`). The interface is down, with no
    /// address, listen port or peer yet.
    pub fn create(netns: &Netns, name: &str, dir: &Path) -> Result<Self> {
        let keys = KeyPair::generate()?;
        let key_file = dir.join(format!("{name}.key"));
        write_private(&key_file, &keys.private)?;

        let kernel = netns
            .ip(&["link", "add", "dev", name, "type", "wireguard"])
            .is_ok();
        let mut wg = if kernel {
            Self {
                daemon: None,
                netns: netns.clone(),
                name: name.to_owned(),
                backend: WgBackend::Kernel,
                keys,
                uapi_socket: None,
            }
        } else {
            let mut command = netns.command("wireguard-go");
            command
                .args(["-f", name])
                .env("LOG_LEVEL", "verbose")
                .env("WG_PROCESS_FOREGROUND", "1");
            let log = dir.join(format!("{name}-wireguard-go.log"));
            let daemon = Process::spawn(&format!("wireguard-go {name}"), netns, command, &log)?;
            Self {
                daemon: Some(daemon),
                netns: netns.clone(),
                name: name.to_owned(),
                backend: WgBackend::WireguardGo,
                keys,
                uapi_socket: Some(Path::new(UAPI_DIR).join(format!("{name}.sock"))),
            }
        };
        wg.wait_ready()?;
        let key_arg = key_file.to_string_lossy();
        wg.wg(&["set", name, "private-key", &key_arg])
            .with_context(|| format!("setting the private key of {name}"))?;
        Ok(wg)
    }

    /// Waits until wireguard-go has created the interface and its socket.
    fn wait_ready(&mut self) -> Result<()> {
        let Some(socket) = self.uapi_socket.clone() else {
            return Ok(());
        };
        let what = format!(
            "wireguard-go to create {} in {}",
            self.name,
            self.netns.name()
        );
        poll_until(&what, WIREGUARD_GO_START, Duration::from_millis(20), || {
            if let Some(daemon) = self.daemon.as_mut() {
                daemon.ensure_running()?;
            }
            if !socket.exists() {
                return Ok(Probe::NotYet(format!("no socket {}", socket.display())));
            }
            Ok(match self.netns.ip(&["link", "show", "dev", &self.name]) {
                Ok(_) => Probe::Ready(()),
                Err(err) => Probe::NotYet(format!("{err:#}")),
            })
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace the interface lives in.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// Which implementation backs the interface.
    pub fn backend(&self) -> WgBackend {
        self.backend
    }

    /// The interface's public key.
    pub fn public_key(&self) -> &str {
        &self.keys.public
    }

    /// The wireguard-go process, if that backend is in use.
    pub fn daemon(&self) -> Option<&Process> {
        self.daemon.as_ref()
    }

    /// Kills the wireguard-go serving the interface (SIGKILL), as a host
    /// crash would; a kernel interface is left alone.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(daemon) = self.daemon.as_mut() {
            daemon.kill()?;
        }
        Ok(())
    }

    /// Runs `wg <args>` inside the interface's namespace.
    pub fn wg(&self, args: &[&str]) -> Result<String> {
        self.netns.exec_ok("wg", args)
    }

    /// Sets the UDP port WireGuard listens on.
    pub fn set_listen_port(&self, port: u16) -> Result<()> {
        self.wg(&["set", &self.name, "listen-port", &port.to_string()])
            .with_context(|| format!("setting listen port {port} on {}", self.name))?;
        Ok(())
    }

    /// Adds (or updates) a peer.
    pub fn add_peer(&self, peer: &WgPeer<'_>) -> Result<()> {
        let mut args: Vec<String> = vec![
            "set".into(),
            self.name.clone(),
            "peer".into(),
            peer.public_key.into(),
            "allowed-ips".into(),
            peer.allowed_ips.join(","),
        ];
        if let Some(endpoint) = peer.endpoint {
            args.extend(["endpoint".into(), endpoint.to_string()]);
        }
        if let Some(interval) = peer.persistent_keepalive {
            args.extend(["persistent-keepalive".into(), interval.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.wg(&args)
            .with_context(|| format!("adding peer {} to {}", peer.public_key, self.name))?;
        Ok(())
    }

    /// Adds a tunnel address (e.g. `10.77.0.1/24`).
    pub fn add_addr(&self, cidr: &str) -> Result<()> {
        self.netns.add_addr(&self.name, cidr)
    }

    /// Sets the interface up.
    pub fn up(&self) -> Result<()> {
        self.netns.set_up(&self.name)
    }

    /// The peers and their handshake and transfer counters.
    pub fn peers(&self) -> Result<Vec<PeerStats>> {
        let dump = self
            .wg(&["show", &self.name, "dump"])
            .with_context(|| format!("reading the state of {}", self.name))?;
        PeerStats::parse_dump(&dump)
    }
}

impl Drop for WgInterface {
    fn drop(&mut self) {
        match self.backend {
            WgBackend::Kernel => {
                if let Err(err) = self.netns.ip(&["link", "del", "dev", &self.name]) {
                    eprintln!(
                        "warning: deleting WireGuard interface {}: {err:#}",
                        self.name
                    );
                }
            }
            WgBackend::WireguardGo => {
                // Stops the process (SIGTERM, then SIGKILL); the TUN device
                // goes with it.
                drop(self.daemon.take());
            }
        }
        if let Some(socket) = &self.uapi_socket
            && socket.exists()
            && let Err(err) = std::fs::remove_file(socket)
        {
            eprintln!("warning: removing stale socket {}: {err}", socket.display());
        }
    }
}

/// The fields of a `wg show <if> dump` that are configuration rather than
/// traffic: the device line whole, and of each peer line the public key,
/// preshared key, endpoint, allowed IPs and keepalive (no handshake time and
/// no byte counters). Two dumps with equal results describe the same device.
pub fn dump_config(dump: &str) -> Vec<String> {
    dump.lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            let fields: Vec<&str> = line.split('\t').collect();
            if i == 0 || fields.len() != 8 {
                return line.to_owned();
            }
            [0, 1, 2, 3, 7].map(|f| fields[f]).join("\t")
        })
        .collect()
}

/// The pid of the process serving the UAPI socket of `ifname`, whose
/// listening socket lives in `netns`; `None` if nothing listens there.
///
/// The listening entry (state 01) for the socket's path in the namespace's
/// `/proc/net/unix` gives an inode; the process holding `socket:[inode]`
/// among its descriptors is the server (pids are global, so the scan of
/// `/proc/*/fd` runs from here).
pub fn uapi_server_pid(netns: &Netns, ifname: &str) -> Result<Option<u32>> {
    let socket = Path::new(UAPI_DIR).join(format!("{ifname}.sock"));
    let table = netns
        .exec_ok("cat", &["/proc/net/unix"])
        .with_context(|| format!("reading /proc/net/unix in {}", netns.name()))?;
    let Some(inode) = listening_inode(&table, &socket) else {
        return Ok(None);
    };
    let target = format!("socket:[{inode}]");
    let proc_dir = std::fs::read_dir("/proc").context("listing /proc")?;
    for entry in proc_dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go during the scan: skip what cannot be read.
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str())
        });
        if holds {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

/// The inode of the listening unix socket bound to `path` in the text of
/// `/proc/net/unix` ("Num RefCount Protocol Flags Type St Inode Path").
fn listening_inode(table: &str, path: &Path) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields[..] {
            [_, _, _, _, _, "01", inode, bound] if Path::new(bound) == path => inode.parse().ok(),
            _ => None,
        }
    })
}

/// True while `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // "pid (comm) S ...": the state follows the last ')'.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// The command name of `pid` (`/proc/<pid>/comm`), if it exists.
pub fn pid_comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|comm| comm.trim().to_owned())
}

/// Sends `signal` to the wireguard-go process `pid`, after checking that
/// `pid` is a wireguard-go: the harness only signals what it started.
pub fn signal_wireguard_go(pid: u32, signal: Signal) -> Result<()> {
    let comm = pid_comm(pid).with_context(|| format!("no process {pid}"))?;
    if comm != "wireguard-go" {
        bail!("process {pid} is {comm:?}, not wireguard-go: not signalling it");
    }
    let raw = i32::try_from(pid).with_context(|| format!("pid {pid} out of range"))?;
    kill(Pid::from_raw(raw), signal).with_context(|| format!("sending {signal} to {pid}"))?;
    Ok(())
}

/// A wireguard-go that the gateway daemon under test started detached (it
/// is nobody's child here and outlives the daemon). Dropping the guard ends
/// whichever wireguard-go serves the interface's UAPI socket at that time
/// (SIGTERM, then SIGKILL) and removes a socket left behind, so nothing
/// survives its namespace. Drop it after the daemon, which would otherwise
/// start a new one, and before the namespace.
#[derive(Debug)]
pub struct DetachedWireguardGo {
    netns: Netns,
    interface: String,
}

impl DetachedWireguardGo {
    /// A guard for the wireguard-go of `interface` in `netns`.
    pub fn new(netns: &Netns, interface: &str) -> Self {
        Self {
            netns: netns.clone(),
            interface: interface.to_owned(),
        }
    }

    /// The interface's name.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// The pid of the wireguard-go serving the interface now, if any.
    pub fn pid(&self) -> Result<Option<u32>> {
        uapi_server_pid(&self.netns, &self.interface)
    }

    /// Stops the wireguard-go serving the interface, if any, and returns
    /// its pid.
    pub fn stop(&self) -> Result<Option<u32>> {
        let Some(pid) = self.pid()? else {
            self.remove_socket();
            return Ok(None);
        };
        signal_wireguard_go(pid, Signal::SIGTERM)?;
        let what = format!("wireguard-go {} (pid {pid}) to exit", self.interface);
        let gone = || -> Result<Probe<()>> {
            Ok(if pid_alive(pid) {
                Probe::NotYet("still running".into())
            } else {
                Probe::Ready(())
            })
        };
        if poll_until(&what, DETACHED_GRACE, Duration::from_millis(20), &gone).is_err() {
            if pid_alive(pid) {
                signal_wireguard_go(pid, Signal::SIGKILL)?;
            }
            poll_until(&what, DETACHED_GRACE, Duration::from_millis(20), &gone)?;
        }
        self.remove_socket();
        Ok(Some(pid))
    }

    fn remove_socket(&self) {
        let socket = Path::new(UAPI_DIR).join(format!("{}.sock", self.interface));
        if socket.exists()
            && let Err(err) = std::fs::remove_file(&socket)
        {
            eprintln!("warning: removing stale socket {}: {err}", socket.display());
        }
    }
}

impl Drop for DetachedWireguardGo {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            eprintln!(
                "warning: stopping the wireguard-go of {} in {}: {err:#}",
                self.interface,
                self.netns.name()
            );
        }
    }
}

/// Writes a private key to a new file readable only by its owner.
fn write_private(path: &Path, key: &str) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating key file {}", path.display()))?;
    writeln!(file, "{key}").with_context(|| format!("writing key file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wg_dump() {
        let dump = "cHJpdmF0ZQ==\tcHVibGlj\t51820\toff\n\
                    UGVlcg==\t(none)\t198.51.100.2:40000\t10.77.0.2/32,10.77.1.0/24\t1700000000\t1234\t5678\toff\n\
                    T3RoZXI=\t(none)\t(none)\t(none)\t0\t0\t0\t25\n";
        let peers = PeerStats::parse_dump(dump).unwrap();
        assert_eq!(
            peers,
            vec![
                PeerStats {
                    public_key: "UGVlcg==".into(),
                    endpoint: Some("198.51.100.2:40000".into()),
                    allowed_ips: vec!["10.77.0.2/32".into(), "10.77.1.0/24".into()],
                    latest_handshake: 1_700_000_000,
                    rx_bytes: 1234,
                    tx_bytes: 5678,
                },
                PeerStats {
                    public_key: "T3RoZXI=".into(),
                    endpoint: None,
                    allowed_ips: vec![],
                    latest_handshake: 0,
                    rx_bytes: 0,
                    tx_bytes: 0,
                },
            ]
        );
    }

    #[test]
    fn dump_config_drops_handshakes_and_counters() {
        let dump = "cHJpdmF0ZQ==\tcHVibGlj\t51820\toff\n\
                    UGVlcg==\t(none)\t198.51.100.2:40000\t10.77.0.2/32\t1700000000\t1234\t5678\t25\n";
        assert_eq!(
            dump_config(dump),
            [
                "cHJpdmF0ZQ==\tcHVibGlj\t51820\toff",
                "UGVlcg==\t(none)\t198.51.100.2:40000\t10.77.0.2/32\t25"
            ]
        );
    }

    #[test]
    fn finds_the_listening_socket_inode() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000011111111: 00000003 00000000 00000000 0001 03 555 /var/run/wireguard/wg0.sock\n\
            0000000022222222: 00000002 00000000 00010000 0001 01 123288 /var/run/wireguard/wg0.sock\n\
            0000000044444444: 00000002 00000000 00000000 0002 01 777\n";
        let path = Path::new("/var/run/wireguard/wg0.sock");
        assert_eq!(listening_inode(table, path), Some(123_288));
        assert_eq!(listening_inode(table, Path::new("/x.sock")), None);
    }

    #[test]
    fn knows_whether_a_pid_is_alive() {
        assert!(pid_alive(std::process::id()));
        assert!(pid_comm(std::process::id()).is_some());
        assert!(!pid_alive(u32::MAX));
    }

    #[test]
    fn rejects_a_malformed_dump_line() {
        let dump = "priv\tpub\t51820\toff\nUGVlcg==\t(none)\t(none)\n";
        assert!(PeerStats::parse_dump(dump).is_err());
    }

    #[test]
    fn key_pair_is_valid_base64_of_32_bytes() {
        let keys = KeyPair::generate().unwrap();
        for key in [&keys.private, &keys.public] {
            assert_eq!(key.len(), 44, "{key}");
            assert!(key.ends_with('='), "{key}");
        }
        assert_ne!(keys.private, keys.public);
        // Deterministic: the same private key gives the same public key.
        assert_eq!(pubkey(&keys.private).unwrap(), keys.public);
    }
}
