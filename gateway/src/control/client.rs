//! `tidectl`'s side of the control socket: a typed client, one method per
//! request.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::PathBuf,
    time::Duration,
};

use tidegate_proto::expiry::PkiStatus;

use super::{DatapathCounters, Reply, Request, Response};
use crate::{
    ha::status::HaStatus,
    reload::ReloadPlan,
    wireguard::{ApplyReport, PeerEntry, PeersReply, state::Removal},
    xdp::{DirectorStatus, SessionEntry},
};

/// How long `tidectl` waits for the daemon's answer.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How long it waits for a change to the WireGuard device: the daemon
/// answers once it is applied, which for a config of many peers on a busy
/// host takes longer.
const APPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a request got no answer, or not the one it asked for.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no control socket at {path}: is tidegate-gateway running (and is this its socket)?")]
    NotRunning {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("permission denied on {path}: the control socket is for root only")]
    Denied {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no answer from the daemon on {path} within {} s", waited.as_secs())]
    TimedOut { path: PathBuf, waited: Duration },
    #[error("talking to the daemon on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the daemon's answer is not valid: {answer:?}")]
    Protocol {
        answer: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the daemon refused: {0}")]
    Daemon(String),
    /// The daemon answered, but with a reply of another kind than the
    /// request calls for.
    #[error("asked for {asked}, the daemon answered with {answered}")]
    WrongReply {
        asked: &'static str,
        answered: &'static str,
    },
}

/// The daemon's control socket. Each call connects, sends one request and
/// waits for its answer.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
}

impl Client {
    /// A client of the control socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// The shield's counters and where it is attached.
    pub fn counters(&self) -> Result<DatapathCounters, ClientError> {
        let request = Request::Counters;
        match self.send(&request)? {
            Reply::Counters(counters) => Ok(counters),
            other => Err(wrong_reply(&request, &other)),
        }
    }

    /// The WireGuard peers and their stats.
    pub fn peers(&self) -> Result<PeersReply, ClientError> {
        let request = Request::Peers;
        match self.send(&request)? {
            Reply::Peers(peers) => Ok(peers),
            other => Err(wrong_reply(&request, &other)),
        }
    }

    /// Adds a peer.
    pub fn add_peer(&self, peer: PeerEntry) -> Result<ApplyReport, ClientError> {
        self.apply(&Request::PeerAdd { peer })
    }

    /// Replaces the settings of a peer added at run time.
    pub fn change_peer(&self, peer: PeerEntry) -> Result<ApplyReport, ClientError> {
        self.apply(&Request::PeerChange { peer })
    }

    /// Removes a peer added at run time.
    pub fn remove_peer(&self, public_key: String) -> Result<ApplyReport, ClientError> {
        self.apply(&Request::PeerRemove { public_key })
    }

    /// Has the daemon re-read its config file and apply what changed.
    pub fn reload(&self) -> Result<ApplyReport, ClientError> {
        self.apply(&Request::Reload)
    }

    /// Has the daemon re-read its config file and say what a reload would
    /// change, applying nothing.
    pub fn reload_check(&self) -> Result<ReloadPlan, ClientError> {
        let request = Request::ReloadCheck;
        match self.send(&request)? {
            Reply::ReloadPlan(plan) => Ok(plan),
            other => Err(wrong_reply(&request, &other)),
        }
    }

    /// The peers an MFA location removed, oldest first.
    pub fn removals(&self) -> Result<Vec<Removal>, ClientError> {
        let request = Request::Removals;
        match self.send(&request)? {
            Reply::Removals(removals) => Ok(removals),
            other => Err(wrong_reply(&request, &other)),
        }
    }

    /// The HA agent's state.
    pub fn status(&self) -> Result<HaStatus, ClientError> {
        let request = Request::Status;
        match self.send(&request)? {
            Reply::Status(status) => Ok(*status),
            other => Err(wrong_reply(&request, &other)),
        }
    }

    /// Starts a planned failover; the gateway the master hands over to.
    pub fn failover(&self) -> Result<u32, ClientError> {
        let request = Request::Failover;
        match self.send(&request)? {
            Reply::HandingOver { to } => Ok(to),
            other => Err(wrong_reply(&request, &other)),
        }
    }

    /// Turns maintenance mode on or off; whether it is now on.
    pub fn maintenance(&self, on: bool) -> Result<bool, ClientError> {
        let request = Request::Maintenance { on };
        match self.send(&request)? {
            Reply::Maintenance { on } => Ok(on),
            other => Err(wrong_reply(&request, &other)),
        }
    }

    /// Turns draining on or off (director mode); whether it is now on.
    pub fn drain(&self, on: bool) -> Result<bool, ClientError> {
        let request = Request::Drain { on };
        match self.send(&request)? {
            Reply::Draining { on } => Ok(on),
            other => Err(wrong_reply(&request, &other)),
        }
    }

    /// The director's pins.
    pub fn sessions(&self) -> Result<Vec<SessionEntry>, ClientError> {
        let request = Request::Sessions;
        match self.send(&request)? {
            Reply::Sessions(sessions) => Ok(sessions),
            other => Err(wrong_reply(&request, &other)),
        }
    }

    /// The director: on or off, its backends and their counters.
    pub fn director(&self) -> Result<DirectorStatus, ClientError> {
        let request = Request::Director;
        match self.send(&request)? {
            Reply::Director(director) => Ok(director),
            other => Err(wrong_reply(&request, &other)),
        }
    }

    /// This gateway's certificate for Core's link and the CA's; `None`
    /// without a `[core]` section.
    pub fn certificates(&self) -> Result<Option<PkiStatus>, ClientError> {
        let request = Request::Certificates;
        match self.send(&request)? {
            Reply::Certificates(status) => Ok(status),
            other => Err(wrong_reply(&request, &other)),
        }
    }

    /// Sends a change to the WireGuard device (a peer or a reload) and
    /// returns what it did.
    fn apply(&self, request: &Request) -> Result<ApplyReport, ClientError> {
        match self.send(request)? {
            Reply::Applied(report) => Ok(report),
            other => Err(wrong_reply(request, &other)),
        }
    }

    /// Sends one request and waits for its answer, of whatever kind.
    fn send(&self, request: &Request) -> Result<Reply, ClientError> {
        let path = &self.path;
        let io_err = |source| ClientError::Io {
            path: path.clone(),
            source,
        };
        let mut stream = UnixStream::connect(path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
                path: path.clone(),
                source,
            },
            io::ErrorKind::PermissionDenied => ClientError::Denied {
                path: path.clone(),
                source,
            },
            _ => io_err(source),
        })?;
        let waited = match request {
            Request::PeerAdd { .. }
            | Request::PeerChange { .. }
            | Request::PeerRemove { .. }
            | Request::Reload => APPLY_TIMEOUT,
            _ => TIMEOUT,
        };
        stream.set_read_timeout(Some(waited)).map_err(io_err)?;
        stream.set_write_timeout(Some(waited)).map_err(io_err)?;
        let mut line = serde_json::to_vec(request).expect("requests always serialize");
        line.push(b'\n');
        stream.write_all(&line).map_err(io_err)?;
        let mut answer = String::new();
        BufReader::new(stream)
            .read_line(&mut answer)
            .map_err(|source| match source.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::TimedOut {
                    path: path.clone(),
                    waited,
                },
                _ => io_err(source),
            })?;
        match serde_json::from_str(&answer) {
            Ok(Response::Ok(reply)) => Ok(reply),
            Ok(Response::Error(message)) => Err(ClientError::Daemon(message)),
            Err(source) => Err(ClientError::Protocol { answer, source }),
        }
    }
}

/// The error for `reply`, which is not what `request` calls for.
fn wrong_reply(request: &Request, reply: &Reply) -> ClientError {
    ClientError::WrongReply {
        asked: request_name(request),
        answered: reply_name(reply),
    }
}

/// What `request` asks for, for "asked for ...".
fn request_name(request: &Request) -> &'static str {
    match request {
        Request::Counters => "counters",
        Request::Peers => "peers",
        Request::PeerAdd { .. } => "a new peer",
        Request::PeerChange { .. } => "a peer change",
        Request::PeerRemove { .. } => "a peer removal",
        Request::Reload => "a reload",
        Request::ReloadCheck => "a reload check",
        Request::Removals => "removals",
        Request::Status => "a status",
        Request::Failover => "a failover",
        Request::Maintenance { on: true } => "maintenance on",
        Request::Maintenance { on: false } => "maintenance off",
        Request::Drain { on: true } => "draining on",
        Request::Drain { on: false } => "draining off",
        Request::Sessions => "sessions",
        Request::Director => "the director",
        Request::Certificates => "certificates",
    }
}

/// What kind of reply `reply` is, for "answered with ...".
fn reply_name(reply: &Reply) -> &'static str {
    match reply {
        Reply::Counters(_) => "counters",
        Reply::Peers(_) => "peers",
        Reply::Applied(_) => "a change report",
        Reply::ReloadPlan(_) => "a reload plan",
        Reply::Removals(_) => "removals",
        Reply::Status(_) => "a status",
        Reply::HandingOver { .. } => "a handover",
        Reply::Maintenance { on: true } => "maintenance on",
        Reply::Maintenance { on: false } => "maintenance off",
        Reply::Draining { on: true } => "draining on",
        Reply::Draining { on: false } => "draining off",
        Reply::Sessions(_) => "sessions",
        Reply::Director(_) => "the director",
        Reply::Certificates(_) => "certificates",
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        io::{BufRead as _, BufReader, Write as _},
        os::unix::net::UnixListener,
        thread,
    };

    use super::{super::tests::counters, *};
    use crate::ha::{agent::HaMode, machine::Role};

    /// Runs `call` against a socket that reads one request and answers
    /// `answer`; the request it read, and what `call` returned.
    fn exchange<T>(
        answer: &Response,
        call: impl FnOnce(&Client) -> Result<T, ClientError>,
    ) -> (Request, Result<T, ClientError>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let mut line = serde_json::to_string(answer).unwrap();
        line.push('\n');
        let daemon = thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut request = String::new();
            BufReader::new(&stream).read_line(&mut request).unwrap();
            (&stream).write_all(line.as_bytes()).unwrap();
            serde_json::from_str::<Request>(&request).unwrap()
        });
        let result = call(&Client::new(&path));
        (daemon.join().unwrap(), result)
    }

    fn status() -> HaStatus {
        HaStatus {
            location_id: 7,
            gateway_id: 1,
            role: Role::Master,
            priority: 100,
            advert_interval_ms: 100,
            advert_version: 2,
            master: Some(1),
            maintenance: false,
            mode: HaMode::ActiveStandby,
            draining: false,
            vips: Vec::new(),
            vips_held: Vec::new(),
            peers: Vec::new(),
            transitions: Vec::new(),
            dropped: BTreeMap::new(),
            fence: None,
            failovers: Vec::new(),
            endpoints: None,
            state_unsaved: None,
            core_links: None,
        }
    }

    #[test]
    fn each_method_sends_its_request_and_returns_its_reply() {
        let (sent, reply) = exchange(&Response::Ok(Reply::Counters(counters())), Client::counters);
        assert_eq!((sent, reply.unwrap()), (Request::Counters, counters()));

        let (sent, reply) = exchange(
            &Response::Ok(Reply::Status(Box::new(status()))),
            Client::status,
        );
        assert_eq!((sent, reply.unwrap()), (Request::Status, status()));

        let (sent, reply) = exchange(
            &Response::Ok(Reply::HandingOver { to: 2 }),
            Client::failover,
        );
        assert_eq!((sent, reply.unwrap()), (Request::Failover, 2));

        let (sent, reply) = exchange(&Response::Ok(Reply::Maintenance { on: true }), |client| {
            client.maintenance(true)
        });
        assert_eq!(
            (sent, reply.unwrap()),
            (Request::Maintenance { on: true }, true)
        );

        let (sent, reply) = exchange(&Response::Ok(Reply::Draining { on: false }), |client| {
            client.drain(false)
        });
        assert_eq!(
            (sent, reply.unwrap()),
            (Request::Drain { on: false }, false)
        );

        let session = SessionEntry {
            client: "198.51.100.7:40000".parse().unwrap(),
            gateway_id: 2,
            last_seen_ms: None,
        };
        let (sent, reply) = exchange(
            &Response::Ok(Reply::Sessions(vec![session.clone()])),
            |client| client.sessions(),
        );
        assert_eq!((sent, reply.unwrap()), (Request::Sessions, vec![session]));

        let report = ApplyReport {
            added: 1,
            requests: 1,
            ..ApplyReport::default()
        };
        let peer = PeerEntry {
            public_key: "k".into(),
            ..PeerEntry::default()
        };
        let (sent, reply) = exchange(&Response::Ok(Reply::Applied(report)), |client| {
            client.add_peer(peer.clone())
        });
        assert_eq!(
            (sent, reply.unwrap()),
            (Request::PeerAdd { peer: peer.clone() }, report)
        );

        let (sent, reply) = exchange(&Response::Ok(Reply::Applied(report)), |client| {
            client.remove_peer("k".into())
        });
        assert_eq!(
            (sent, reply.unwrap()),
            (
                Request::PeerRemove {
                    public_key: "k".into()
                },
                report
            )
        );

        let (sent, reply) = exchange(&Response::Ok(Reply::Applied(report)), Client::reload);
        assert_eq!((sent, reply.unwrap()), (Request::Reload, report));
    }

    #[test]
    fn a_reply_of_the_wrong_kind_names_the_request_and_the_reply() {
        let answer = Response::Ok(Reply::Status(Box::new(status())));
        let (_, reply) = exchange(&answer, Client::counters);
        let error = reply.unwrap_err();
        assert!(
            matches!(
                error,
                ClientError::WrongReply {
                    asked: "counters",
                    answered: "a status"
                }
            ),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "asked for counters, the daemon answered with a status"
        );

        let answer = Response::Ok(Reply::HandingOver { to: 2 });
        let (_, reply) = exchange(&answer, Client::reload);
        assert_eq!(
            reply.unwrap_err().to_string(),
            "asked for a reload, the daemon answered with a handover"
        );
    }

    #[test]
    fn a_refusal_is_the_daemons_error() {
        let answer = Response::Error("no peer k".into());
        let (_, reply) = exchange(&answer, |client| client.remove_peer("k".into()));
        assert!(
            matches!(&reply, Err(ClientError::Daemon(message)) if message == "no peer k"),
            "{reply:?}"
        );
    }

    #[test]
    fn no_socket_means_no_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let reply = Client::new(dir.path().join("control.sock")).counters();
        assert!(
            matches!(reply, Err(ClientError::NotRunning { .. })),
            "{reply:?}"
        );
    }
}
