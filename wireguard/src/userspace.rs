//! Userspace WireGuard: `wireguard-go` started detached (it outlives the
//! daemon, so peers survive a daemon restart), driven over its UAPI socket,
//! and watched through a pidfd so the daemon notices when it dies.

use std::{
    fs::OpenOptions,
    io::{self, Read as _, Seek as _, SeekFrom},
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::net::UnixStream,
    },
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use tokio::io::{Interest, unix::AsyncFd};
use wireguard_uapi::xplatform::{self, parser::ParseGetResponseError, set};

use super::{
    backend::{ApplyCost, BackendError, actual_from},
    reconcile::{Actual, Plan},
};

/// Where wireguard-go puts its UAPI sockets (shared by all namespaces).
pub const UAPI_DIR: &str = "/var/run/wireguard";

/// The wireguard-go executable.
const WIREGUARD_GO: &str = "wireguard-go";

/// How long wireguard-go gets to create its interface and socket.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(10);

/// How often an empty answer is asked again, and how far apart.
const EMPTY_ANSWER_RETRIES: u32 = 10;
const EMPTY_ANSWER_PAUSE: Duration = Duration::from_millis(20);

/// `errno` values wireguard-go answers with (its `ipc.IpcError*` codes).
const EADDRINUSE: i64 = libc::EADDRINUSE as i64;

/// wireguard-go could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("opening the wireguard-go log {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("starting {WIREGUARD_GO} (is it installed and on PATH?)")]
    Spawn(#[source] io::Error),
    #[error("{WIREGUARD_GO} {interface} failed ({status}); its log {log} ends with:\n{tail}")]
    Failed {
        interface: String,
        status: std::process::ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("{WIREGUARD_GO} {interface} did not finish starting within {LAUNCH_TIMEOUT:?}")]
    Timeout { interface: String },
    #[error("waiting for {WIREGUARD_GO}")]
    Wait(#[source] io::Error),
    #[error("asking {socket} for its process id")]
    Pid {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("watching {WIREGUARD_GO} (pid {pid})")]
    PidFd {
        pid: u32,
        #[source]
        source: io::Error,
    },
}

/// A wireguard-go device, reached through its UAPI socket.
#[derive(Debug)]
pub struct Userspace {
    interface: String,
    socket: PathBuf,
}

impl Userspace {
    /// The device of `interface`, whether or not it runs yet.
    pub fn new(interface: &str) -> Self {
        Self {
            interface: interface.to_owned(),
            socket: socket_path(interface),
        }
    }

    /// The UAPI socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// True when a wireguard-go answers on the socket.
    pub fn is_running(&self) -> bool {
        UnixStream::connect(&self.socket).is_ok()
    }

    /// Starts wireguard-go for the interface, detached: it forks into its
    /// own session and the launcher exits once the interface and the socket
    /// exist. Its log goes to `log`.
    pub fn launch(&self, log: &Path) -> Result<(), LaunchError> {
        let log_err = |source| LaunchError::Log {
            path: log.to_owned(),
            source,
        };
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(log_err)?;
        let start = file.seek(SeekFrom::End(0)).map_err(log_err)?;
        let mut child = Command::new(WIREGUARD_GO)
            .arg(&self.interface)
            .env("LOG_LEVEL", "error")
            .env_remove("WG_PROCESS_FOREGROUND")
            .stdin(Stdio::null())
            .stdout(file.try_clone().map_err(log_err)?)
            .stderr(file.try_clone().map_err(log_err)?)
            .spawn()
            .map_err(LaunchError::Spawn)?;
        let deadline = Instant::now() + LAUNCH_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().map_err(LaunchError::Wait)? {
                break status;
            }
            if Instant::now() > deadline {
                // The launcher is our own child: end it by its pid.
                let _ = child.kill();
                let _ = child.wait();
                return Err(LaunchError::Timeout {
                    interface: self.interface.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if !status.success() {
            let mut tail = String::new();
            let _ = OpenOptions::new().read(true).open(log).and_then(|mut f| {
                f.seek(SeekFrom::Start(start))?;
                f.read_to_string(&mut tail)
            });
            return Err(LaunchError::Failed {
                interface: self.interface.clone(),
                status,
                log: log.to_owned(),
                tail: tail.trim_end().to_owned(),
            });
        }
        Ok(())
    }

    /// The pid of the wireguard-go serving the socket: the process holding
    /// the listening socket's inode. (The socket's peer credentials name
    /// the launcher that created it, which has exited.)
    pub fn server_pid(&self) -> Result<u32, LaunchError> {
        let pid_err = |source| LaunchError::Pid {
            socket: self.socket.clone(),
            source,
        };
        let table = std::fs::read_to_string("/proc/net/unix").map_err(pid_err)?;
        let inode = listening_inode(&table, &self.socket).ok_or_else(|| {
            pid_err(io::Error::new(
                io::ErrorKind::NotFound,
                "no listening socket with that path in /proc/net/unix",
            ))
        })?;
        let target = format!("socket:[{inode}]");
        for entry in std::fs::read_dir("/proc").map_err(pid_err)? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // Processes come and go while we look: skip what we cannot read.
            let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
                continue;
            };
            let holds = fds.filter_map(Result::ok).any(|fd| {
                std::fs::read_link(fd.path()).is_ok_and(|link| link.as_os_str() == target.as_str())
            });
            if holds {
                return Ok(pid);
            }
        }
        Err(pid_err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no process holds {target}"),
        )))
    }

    /// Reads the device.
    pub fn get(&self) -> Result<Actual, BackendError> {
        let mut attempt = 0;
        loop {
            // wireguard-uapi 3.0.1 panics on an answer with peers but no
            // listen_port, which wireguard-go sends while no port is bound:
            // make that an error rather than a dead WireGuard task.
            let answer = std::panic::catch_unwind(|| xplatform::Client::create(&self.socket).get())
                .map_err(|_| {
                    self.error(
                        "reading",
                        io::Error::other("the answer has peers but no listen_port (no port bound)"),
                    )
                })?;
            match answer {
                Ok(device) => return Ok(actual_from(device)),
                // A wireguard-go that has only just created its socket
                // sometimes answers with nothing at all: ask again.
                Err(xplatform::error::GetDeviceError::ParseGetDevice(
                    ParseGetResponseError::IncompleteResponse,
                )) if attempt < EMPTY_ANSWER_RETRIES => {
                    attempt += 1;
                    std::thread::sleep(EMPTY_ANSWER_PAUSE);
                }
                Err(error) => return Err(self.error("reading", error)),
            }
        }
    }

    /// Applies `plan`: the listen port alone first, then the rest in one
    /// transaction.
    pub fn apply(&self, plan: &Plan) -> Result<ApplyCost, BackendError> {
        let mut cost = ApplyCost::default();
        for request in requests(plan) {
            cost.requests += 1;
            let port = request.listen_port;
            xplatform::Client::create(&self.socket)
                .set(request)
                .map_err(|e| match (&e, port) {
                    (xplatform::error::SetDeviceError::ServerError(errno), Some(port))
                        if errno.parse::<i64>().is_ok_and(|n| n.abs() == EADDRINUSE) =>
                    {
                        BackendError::PortInUse { port }
                    }
                    _ => self.error("configuring", e),
                })?;
        }
        Ok(cost)
    }

    fn error(
        &self,
        op: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> BackendError {
        BackendError::Uapi {
            op,
            interface: self.interface.clone(),
            socket: self.socket.display().to_string(),
            source: Box::new(source),
        }
    }
}

/// The UAPI socket of `interface`.
pub fn socket_path(interface: &str) -> PathBuf {
    Path::new(UAPI_DIR).join(format!("{interface}.sock"))
}

/// The inode of the listening unix socket bound to `path`, from the text of
/// `/proc/net/unix` ("Num RefCount Protocol Flags Type St Inode Path").
fn listening_inode(table: &str, path: &Path) -> Option<u64> {
    /// `SS_UNCONNECTED`: the state of a listening socket.
    const UNCONNECTED: &str = "01";
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields[..] {
            [_, _, _, _, _, state, inode, bound]
                if state == UNCONNECTED && Path::new(bound) == path =>
            {
                inode.parse().ok()
            }
            _ => None,
        }
    })
}

/// The UAPI transactions for `plan`.
pub fn requests(plan: &Plan) -> Vec<set::Device> {
    let mut out = Vec::new();
    if let Some(port) = plan.listen_port {
        out.push(set::Device {
            listen_port: Some(port),
            ..set::Device::default()
        });
    }
    if plan.private_key.is_some()
        || plan.replace_peers
        || !plan.peers.is_empty()
        || plan.fwmark.is_some()
    {
        out.push(set::Device {
            private_key: plan.private_key.map(|k| *k.as_bytes()),
            fwmark: plan.fwmark,
            replace_peers: plan.replace_peers.then_some(true),
            peers: plan.peers.iter().map(peer).collect(),
            ..set::Device::default()
        });
    }
    out
}

fn peer(op: &super::reconcile::PeerOp) -> set::Peer {
    use super::reconcile::OpKind;

    let mut peer = set::Peer::from_public_key(*op.public_key.as_bytes());
    match op.kind {
        OpKind::Remove => return peer.remove(true),
        OpKind::Update => peer = peer.update_only(true),
        OpKind::Add => {}
    }
    peer.preshared_key = op.preshared_key.map(|k| *k.as_bytes());
    peer.endpoint = op.endpoint;
    peer.persistent_keepalive_interval = op.persistent_keepalive;
    if let Some(ips) = &op.allowed_ips {
        peer = peer.replace_allowed_ips(true).allowed_ips(
            ips.iter()
                .map(|net: &IpNet| set::AllowedIp {
                    ipaddr: net.addr(),
                    cidr_mask: net.prefix_len(),
                })
                .collect(),
        );
    }
    peer
}

/// A process watched through a pidfd: readable once the process has exited.
/// Works for processes that are not our children, such as a wireguard-go
/// adopted from an earlier daemon.
#[derive(Debug)]
pub struct ProcessWatch {
    pid: u32,
    fd: AsyncFd<OwnedFd>,
}

impl ProcessWatch {
    /// Starts watching `pid`.
    pub fn new(pid: u32) -> Result<Self, LaunchError> {
        let pidfd_err = |source| LaunchError::PidFd { pid, source };
        let raw_pid = libc::pid_t::try_from(pid)
            .map_err(|_| pidfd_err(io::Error::from_raw_os_error(libc::ESRCH)))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new file
        // descriptor or -1; it touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
        if fd < 0 {
            return Err(pidfd_err(io::Error::last_os_error()));
        }
        let fd = RawFd::try_from(fd).map_err(|_| pidfd_err(io::Error::other("bad fd")))?;
        // SAFETY: `fd` was just returned by pidfd_open and nothing else owns it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the OwnedFd is moved into the AsyncFd, so the descriptor
        // stays open and the same for the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
            .map_err(|e| pidfd_err(e.into()))?;
        Ok(Self { pid, fd })
    }

    /// The watched pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Waits until the process has exited.
    pub async fn exited(&self) {
        // A pidfd becomes readable when its process exits, and stays so.
        loop {
            match self.fd.readable().await {
                Ok(_) => return,
                Err(error) => {
                    tracing::warn!(pid = self.pid, fd = self.fd.as_raw_fd(), %error, "pidfd poll failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        key::Key,
        reconcile::{OpKind, PeerOp},
    };

    fn op(kind: OpKind) -> PeerOp {
        PeerOp {
            kind,
            public_key: Key::new([1; 32]),
            preshared_key: None,
            persistent_keepalive: Some(25),
            endpoint: None,
            allowed_ips: Some(vec!["10.0.0.2/32".parse().unwrap()]),
        }
    }

    #[test]
    fn the_listen_port_goes_alone_and_first() {
        let plan = Plan {
            fwmark: None,
            listen_port: Some(51820),
            private_key: Some(Key::new([9; 32])),
            replace_peers: false,
            peers: vec![op(OpKind::Add)],
        };
        let text: Vec<String> = requests(&plan).iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 2);
        assert_eq!(text[0], "listen_port=51820\n");
        assert!(text[1].starts_with("private_key=0909"), "{}", text[1]);
        assert!(text[1].contains(
            "persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.0.0.2/32\n"
        ));
    }

    #[test]
    fn replacing_every_peer_says_so_before_the_peers() {
        let plan = Plan {
            replace_peers: true,
            peers: vec![op(OpKind::Add)],
            ..Plan::default()
        };
        let text = requests(&plan)[0].to_string();
        assert!(
            text.starts_with("replace_peers=true\npublic_key="),
            "{text}"
        );
        let none = Plan {
            replace_peers: true,
            ..Plan::default()
        };
        assert_eq!(requests(&none)[0].to_string(), "replace_peers=true\n");
    }

    #[test]
    fn updates_are_update_only_and_removals_carry_nothing_else() {
        let plan = Plan {
            peers: vec![op(OpKind::Update), op(OpKind::Remove)],
            ..Plan::default()
        };
        let text = requests(&plan)[0].to_string();
        let key = "0101010101010101010101010101010101010101010101010101010101010101";
        assert_eq!(
            text,
            format!(
                "public_key={key}\nupdate_only=true\npersistent_keepalive_interval=25\n\
                 replace_allowed_ips=true\nallowed_ip=10.0.0.2/32\n\
                 public_key={key}\nremove=true\n"
            )
        );
    }

    #[test]
    fn an_empty_plan_sends_nothing() {
        assert!(requests(&Plan::default()).is_empty());
    }

    #[test]
    fn finds_the_listening_socket_inode() {
        let table = "Num       RefCount Protocol Flags    Type St Inode Path\n\
            0000000011111111: 00000003 00000000 00000000 0001 03 555 /var/run/wireguard/wg0.sock\n\
            0000000022222222: 00000002 00000000 00010000 0001 01 123288 /var/run/wireguard/wg0.sock\n\
            0000000033333333: 00000002 00000000 00010000 0001 01 999 /var/run/wireguard/wg1.sock\n\
            0000000044444444: 00000002 00000000 00000000 0002 01 777\n";
        let path = Path::new("/var/run/wireguard/wg0.sock");
        assert_eq!(listening_inode(table, path), Some(123_288));
        assert_eq!(listening_inode(table, Path::new("/x.sock")), None);
    }

    #[tokio::test]
    async fn a_pidfd_fires_when_the_process_exits() {
        let mut child = Command::new("sleep").arg("0.2").spawn().unwrap();
        let watch = ProcessWatch::new(child.id()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), watch.exited())
            .await
            .expect("the pidfd became readable");
        child.wait().unwrap();
    }
}
