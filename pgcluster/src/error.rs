//! What can go wrong with a throwaway cluster, each error naming what failed.

use std::{path::PathBuf, process::ExitStatus};

/// Starting, using or stopping a [`Cluster`](crate::Cluster) failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "PostgreSQL is not installed: install Debian's postgresql (cargo xtask test does); \
         no initdb in {looked}"
    )]
    NotInstalled {
        /// Where the binaries were looked for.
        looked: String,
    },
    /// Running as root, but there is no `postgres` system user to run the
    /// server as (initdb and postgres refuse to run as root).
    #[error(
        "running as root, but there is no `postgres` system user to run PostgreSQL as \
         (Debian's postgresql package creates it)"
    )]
    NoPostgresUser {
        /// The lookup's own error, when it failed rather than found nothing.
        #[source]
        source: Option<nix::Error>,
    },
    /// A file system operation failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Changing the owner of the cluster's directory to the `postgres` user failed.
    #[error("chown {} to the postgres user", path.display())]
    Chown {
        /// The directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: nix::Error,
    },
    /// A command could not be started at all.
    #[error("could not run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its standard error (and output), trimmed.
        stderr: String,
    },
    /// The server did not start or did not accept connections.
    #[error("the PostgreSQL server did not start; the end of its log {}:\n{log_tail}", log.display())]
    Start {
        /// The server's log file.
        log: PathBuf,
        /// The last lines of the log.
        log_tail: String,
        /// The step that failed.
        #[source]
        source: Box<ClusterError>,
    },
    /// A database name prefix that is not a plain lowercase identifier.
    #[error(
        "invalid database name prefix {prefix:?}: use 1 to 40 lowercase ASCII letters, digits \
         and underscores, starting with a letter"
    )]
    InvalidPrefix {
        /// The prefix given.
        prefix: String,
    },
}
