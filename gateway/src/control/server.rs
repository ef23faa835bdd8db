//! The daemon's side of the control socket.

use std::{
    io,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{MAX_REQUEST_BYTES, Reply, Request, Response};
use crate::{
    core_link::CoreLinks,
    datapath::DatapathHandle,
    error_chain,
    ha::agent::HaHandle,
    reload::Reloader,
    wireguard::{Key, WireguardHandle, spec::PeerError},
};

/// The daemon's parts a control request can reach.
#[derive(Debug, Clone)]
pub struct Handles {
    pub datapath: DatapathHandle,
    /// `None` when the config has no `[wireguard]` section.
    pub wireguard: Option<WireguardHandle>,
    /// `None` when the config has no `[ha]` section.
    pub ha: Option<HaHandle>,
    /// The location runs in director mode (`[ha] mode = "director"`).
    pub director_mode: bool,
    pub reloader: Reloader,
    /// The TLS files of Core's link; `None` without a `[core]` section.
    pub pki: Option<tidegate_proto::tls::Pki>,
    /// Core's Links and their term fence; `None` without a `[core]` section.
    pub core_links: Option<CoreLinks>,
}

/// Why the control socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another daemon is already listening on {path}")]
    InUse { path: PathBuf },
}

/// A bound control socket; the socket file is removed on drop.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Binds `path` with mode 0600 in a directory created with mode 0700.
    /// A stale socket left by a dead daemon is replaced; a live one is an error.
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        let io_err = |op, source| ControlError::Io {
            op,
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| io_err("creating the directory of", e))?;
        }
        if path.exists() {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => {
                    return Err(ControlError::InUse {
                        path: path.to_owned(),
                    });
                }
                Err(_) => std::fs::remove_file(path)
                    .map_err(|e| io_err("removing the stale socket", e))?,
            }
        }
        let listener = UnixListener::bind(path).map_err(|e| io_err("binding", e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err("restricting permissions of", e))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    /// Answers connections until `cancel` fires.
    pub async fn serve(self, handles: Handles, cancel: CancellationToken) {
        loop {
            let stream = tokio::select! {
                () = cancel.cancelled() => return,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        warn!(%error, "control socket accept failed");
                        continue;
                    }
                },
            };
            let handles = handles.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = cancel.cancelled() => {}
                    result = connection(stream, handles) => if let Err(error) = result {
                        debug!(%error, "control connection ended with an error");
                    },
                }
            });
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn connection(stream: UnixStream, handles: Handles) -> io::Result<()> {
    let peer_uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    let limit = MAX_REQUEST_BYTES as u64;
    let mut lines = BufReader::new(read).take(limit);
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        // A refused peer or an over-long line ends the connection after the answer.
        let (response, close) = if peer_uid != 0 {
            let message = "permission denied: the control socket is for root only";
            (Response::Error(message.into()), true)
        } else if !line.ends_with('\n') {
            let message =
                format!("request too long or unterminated: at most {limit} bytes, one per line");
            (Response::Error(message), true)
        } else {
            match serde_json::from_str::<Request>(&line) {
                Ok(request) => (answer(request, &handles).await, false),
                Err(error) => (Response::Error(format!("bad request: {error}")), false),
            }
        };
        let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
        out.push(b'\n');
        write.write_all(&out).await?;
        if close {
            return Ok(());
        }
        lines.set_limit(limit);
    }
}

async fn answer(request: Request, handles: &Handles) -> Response {
    let wireguard = || {
        handles.wireguard.as_ref().ok_or_else(|| {
            "this gateway runs no WireGuard interface (its config has no [wireguard] section)"
                .to_owned()
        })
    };
    let ha = || {
        handles.ha.as_ref().ok_or_else(|| {
            "this gateway takes part in no election (its config has no [ha] section)".to_owned()
        })
    };
    let director = || {
        if handles.director_mode {
            Ok(())
        } else {
            Err("this gateway does not run the director (its [ha] section has no mode = \"director\")"
                .to_owned())
        }
    };
    let chain = |e: &dyn std::error::Error| error_chain(e);
    let result: Result<Reply, String> = match request {
        Request::Counters => (handles.datapath.counters().await)
            .map(Reply::Counters)
            .map_err(|e| chain(&e)),
        Request::Reload => (handles.reloader.reload().await)
            .map(Reply::Applied)
            .map_err(|e| chain(&e)),
        Request::ReloadCheck => (handles.reloader.check().await)
            .map(Reply::ReloadPlan)
            .map_err(|e| chain(&e)),
        Request::Peers => async { wireguard()?.peers().await.map_err(|e| chain(&e)) }
            .await
            .map(Reply::Peers),
        Request::Removals => async { wireguard()?.removals().await.map_err(|e| chain(&e)) }
            .await
            .map(Reply::Removals),
        Request::PeerAdd { peer } => async {
            let peer = peer.validate().map_err(|e| chain(&e))?;
            wireguard()?.add_peer(peer).await.map_err(|e| chain(&e))
        }
        .await
        .map(Reply::Applied),
        Request::PeerChange { peer } => async {
            let peer = peer.validate().map_err(|e| chain(&e))?;
            wireguard()?.change_peer(peer).await.map_err(|e| chain(&e))
        }
        .await
        .map(Reply::Applied),
        Request::PeerRemove { public_key } => async {
            let key = public_key.parse::<Key>().map_err(|source| {
                chain(&PeerError::Key {
                    peer: PeerError::label_of(&public_key),
                    field: "public_key",
                    source,
                })
            })?;
            wireguard()?.remove_peer(key).await.map_err(|e| chain(&e))
        }
        .await
        .map(Reply::Applied),
        Request::Certificates => Ok(Reply::Certificates(
            handles
                .pki
                .as_ref()
                .map(|pki| pki.status(tidegate_proto::expiry::now_unix())),
        )),
        Request::Status => async { ha()?.status().await.map_err(|e| chain(&e)) }
            .await
            .map(|mut status| {
                status.state_unsaved = handles
                    .wireguard
                    .as_ref()
                    .and_then(WireguardHandle::state_unsaved);
                status.core_links = handles.core_links.as_ref().map(CoreLinks::status);
                Reply::Status(Box::new(status))
            }),
        Request::Failover => async { ha()?.failover().await.map_err(|e| chain(&e)) }
            .await
            .map(|to| Reply::HandingOver { to }),
        Request::Maintenance { on } => async { ha()?.maintenance(on).await.map_err(|e| chain(&e)) }
            .await
            .map(|()| Reply::Maintenance { on }),
        Request::Drain { on } => async { ha()?.drain(on).await.map_err(|e| chain(&e)) }
            .await
            .map(|()| Reply::Draining { on }),
        Request::Sessions => async {
            director()?;
            handles.datapath.sessions().await.map_err(|e| chain(&e))
        }
        .await
        .map(Reply::Sessions),
        Request::Director => async {
            director()?;
            handles
                .datapath
                .director_status()
                .await
                .map_err(|e| chain(&e))
        }
        .await
        .map(Reply::Director),
    };
    match result {
        Ok(reply) => Response::Ok(reply),
        Err(message) => Response::Error(message),
    }
}
