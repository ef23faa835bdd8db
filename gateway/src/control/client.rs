//! `tidectl`'s side of the control socket.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::{Reply, Request, Response};

/// How long `tidectl` waits for the daemon.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request got no answer.
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
}

/// Sends one request and waits for its answer.
pub fn request(path: &Path, request: &Request) -> Result<Reply, ClientError> {
    let io_err = |source| ClientError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
            path: path.to_owned(),
            source,
        },
        io::ErrorKind::PermissionDenied => ClientError::Denied {
            path: path.to_owned(),
            source,
        },
        _ => io_err(source),
    })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
    let mut line = serde_json::to_vec(request).expect("requests always serialize");
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .map_err(io_err)?;
    match serde_json::from_str(&answer) {
        Ok(Response::Ok(reply)) => Ok(reply),
        Ok(Response::Error(message)) => Err(ClientError::Daemon(message)),
        Err(source) => Err(ClientError::Protocol { answer, source }),
    }
}
