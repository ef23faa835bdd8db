//! The admin socket: a Unix socket, mode 0600 in a 0700 directory, that
//! only Core's own user (root) may use; a connection from another user is
//! closed at once. Core listens on no network port.

use std::{
    io,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use futures::Stream;
use tidegate_proto::admin::v1::admin_server::AdminServer;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::AdminService;
use tidegate_proto::limits::MAX_ADMIN_MESSAGE_BYTES;

/// Why the admin socket could not be set up or served.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another tidegate-core is listening on {path}")]
    InUse { path: PathBuf },
    #[error("serving the admin API")]
    Serve(#[source] tonic::transport::Error),
}

/// A bound admin socket; the file is removed on drop.
#[derive(Debug)]
pub struct AdminSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl AdminSocket {
    /// Binds `path` (mode 0600; its directory is made 0700 if missing). A
    /// socket left by a dead Core is replaced; a live one is an error.
    pub fn bind(path: &Path) -> Result<Self, SocketError> {
        let io_err = |op, source| SocketError::Io {
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
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(|e| io_err("removing the stale socket", e))?;
        }
        let listener = UnixListener::bind(path).map_err(|e| io_err("binding", e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err("restricting", e))?;
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves the admin API until `cancel`.
    pub async fn serve(
        self,
        service: AdminService,
        cancel: CancellationToken,
    ) -> Result<(), SocketError> {
        let server = AdminServer::new(service)
            .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_ADMIN_MESSAGE_BYTES);
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming_shutdown(accept_own_user(&self.listener), cancel.cancelled())
            .await
            .map_err(SocketError::Serve)
    }
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Connections from the user Core runs as; others are dropped.
fn accept_own_user(
    listener: &UnixListener,
) -> impl Stream<Item = Result<UnixStream, io::Error>> + '_ {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own = unsafe { libc::geteuid() };
    futures::stream::unfold(listener, move |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => match stream.peer_cred() {
                    Ok(cred) if cred.uid() == own => return Some((Ok(stream), listener)),
                    Ok(cred) => warn!(
                        uid = cred.uid(),
                        "admin connection from another user refused"
                    ),
                    Err(e) => warn!(error = %e, "admin connection without credentials refused"),
                },
                Err(e) => {
                    // Out of descriptors or the like: wait, and go on.
                    warn!(error = %e, "accepting an admin connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    })
}
