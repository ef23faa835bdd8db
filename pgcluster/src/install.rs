//! Where PostgreSQL's server binaries are and which user runs them.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use nix::unistd::{Gid, Uid, User};

use crate::ClusterError;

/// Debian installs each major version's server binaries here.
const DEBIAN_LIB: &str = "/usr/lib/postgresql";

/// The directory holding `initdb`, `pg_ctl` and `psql`: `pg_config
/// --bindir` when it has them, else the highest
/// `/usr/lib/postgresql/*/bin` that has `initdb`.
pub(crate) fn bindir() -> Result<PathBuf, ClusterError> {
    let mut looked = Vec::new();
    if let Some(dir) = pg_config_bindir() {
        if has_initdb(&dir) {
            return Ok(dir);
        }
        looked.push(format!("{} (pg_config --bindir)", dir.display()));
    }
    if let Some(dir) = highest_debian_bindir() {
        return Ok(dir);
    }
    looked.push(format!("{DEBIAN_LIB}/*/bin"));
    Err(ClusterError::NotInstalled {
        looked: looked.join(" or "),
    })
}

fn has_initdb(dir: &Path) -> bool {
    dir.join("initdb").is_file()
}

fn pg_config_bindir() -> Option<PathBuf> {
    let output = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let dir = String::from_utf8(output.stdout).ok()?;
    let dir = dir.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// The highest version under [`DEBIAN_LIB`] whose `bin` has `initdb`.
fn highest_debian_bindir() -> Option<PathBuf> {
    std::fs::read_dir(DEBIAN_LIB)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = version_key(entry.file_name().to_str()?)?;
            let bin = entry.path().join("bin");
            has_initdb(&bin).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

/// "15" → [15], "9.6" → [9, 6]; anything else is not a version directory.
fn version_key(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// The user the cluster's commands run as when this process is root.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PostgresUser {
    pub uid: Uid,
    pub gid: Gid,
}

/// `None` when not root (the commands run as the current user), else the
/// `postgres` system user: initdb and postgres refuse to run as root.
pub(crate) fn run_as() -> Result<Option<PostgresUser>, ClusterError> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    match User::from_name("postgres") {
        Ok(Some(user)) => Ok(Some(PostgresUser {
            uid: user.uid,
            gid: user.gid,
        })),
        Ok(None) => Err(ClusterError::NoPostgresUser { source: None }),
        Err(source) => Err(ClusterError::NoPostgresUser {
            source: Some(source),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::version_key;

    #[test]
    fn versions_order_numerically() {
        assert!(version_key("15") > version_key("9.6"));
        assert!(version_key("16") > version_key("15"));
        assert_eq!(version_key("common"), None);
    }
}
