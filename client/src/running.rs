//! The record of a tunnel that is up: which process keeps it, what was set
//! on the host (so `down` can undo it even after that process died), and
//! the session, for `status`.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{session::State, tunnel::Applied};

/// Where the records live unless `--run-dir` says otherwise.
pub const DEFAULT_RUN_DIR: &str = "/run/tidegate-client";

#[derive(Debug, thiserror::Error)]
pub enum RunningError {
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a tunnel record")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The session as the keeper last saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub state: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logged_in_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_login_unix_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A tunnel that is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    /// The process keeping the tunnel.
    pub pid: u32,
    pub applied: Applied,
    pub endpoint: String,
    pub since_unix_ms: u64,
    /// `None` on a location without MFA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionRecord>,
}

fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> RunningError + '_ {
    move |source| RunningError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Running {
    /// The record of tunnel `name`, if it is up.
    pub fn load(dir: &Path, name: &str) -> Result<Option<Self>, RunningError> {
        let path = path(dir, name);
        let text = match fs::read(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            other => other.map_err(io_error(&path))?,
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| RunningError::Parse { path, source })
    }

    /// Writes the record, replacing the one before atomically.
    pub fn save(&self, dir: &Path, name: &str) -> Result<(), RunningError> {
        fs::create_dir_all(dir).map_err(io_error(dir))?;
        let path = path(dir, name);
        let temp = dir.join(format!(".{name}.json.new"));
        let text = serde_json::to_vec_pretty(self).map_err(|source| RunningError::Parse {
            path: path.clone(),
            source,
        })?;
        fs::write(&temp, text)
            .and_then(|()| fs::rename(&temp, &path))
            .map_err(io_error(&path))
    }

    /// Deletes the record of tunnel `name`.
    pub fn remove(dir: &Path, name: &str) -> Result<(), RunningError> {
        let path = path(dir, name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other.map_err(io_error(&path)),
        }
    }

    /// True while the keeping process runs (its id not reused by another
    /// program).
    pub fn keeper_alive(&self) -> bool {
        fs::read_to_string(format!("/proc/{}/comm", self.pid))
            .is_ok_and(|comm| comm.trim() == "tidegate-client")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidegate_wireguard::BackendKind;

    #[test]
    fn a_record_round_trips_and_a_dead_keeper_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Running::load(dir.path(), "lab").unwrap(), None);
        let record = Running {
            pid: u32::MAX,
            applied: Applied {
                interface: "lab".into(),
                backend: BackendKind::Userspace,
                full_tunnel: true,
                dns: None,
            },
            endpoint: "198.51.100.100:51820".into(),
            since_unix_ms: 1,
            session: Some(SessionRecord {
                state: State::Active,
                logged_in_unix_ms: Some(1),
                expires_unix_ms: Some(60_001),
                next_login_unix_ms: Some(45_001),
                last_error: None,
            }),
        };
        record.save(dir.path(), "lab").unwrap();
        assert_eq!(
            Running::load(dir.path(), "lab").unwrap(),
            Some(record.clone())
        );
        assert!(!record.keeper_alive(), "no process has that id");
        Running::remove(dir.path(), "lab").unwrap();
        assert_eq!(Running::load(dir.path(), "lab").unwrap(), None);
    }
}
