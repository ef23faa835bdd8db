//! A throwaway PostgreSQL cluster for tests and benchmarks: initdb into a
//! fresh directory under /tmp, a server listening on a Unix socket there
//! (and on one TCP address when asked), removed again on drop.
//!
//! initdb and postgres refuse to run as root: when this process is root,
//! every PostgreSQL tool runs as the `postgres` system user (through
//! `runuser`) and the directory belongs to that user. The directory is
//! mode 0700, so only its owner and root reach the socket; authentication
//! is `trust`.

mod command;
mod error;
mod install;

use std::{
    fmt::Write as _,
    hash::{BuildHasher as _, Hasher as _},
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
};

use command::Runner;
pub use error::ClusterError;

/// The port when [`Options::listen`] does not name one (the socket file is
/// `.s.PGSQL.5432` in the cluster's own directory, so clusters never clash).
const DEFAULT_PORT: u16 = 5432;
/// Seconds `pg_ctl` waits for the server to start or stop.
const PG_CTL_WAIT_SECONDS: &str = "30";
/// Lines of the server log quoted when it does not start.
const LOG_TAIL_LINES: usize = 30;
/// Longest prefix [`Cluster::create_database`] takes (names stay under
/// PostgreSQL's 63 bytes with the suffix).
const MAX_PREFIX: usize = 40;

/// How a [`Cluster`] listens and how durable it is.
#[derive(Debug, Clone)]
pub struct Options {
    /// A TCP address to listen on besides the Unix socket (TEST-NET or
    /// loopback addresses only). Its port is the cluster's port; the /24
    /// around it (/64 for IPv6) may connect without a password.
    pub listen: Option<SocketAddr>,
    /// A network namespace to start the server in (`ip netns exec`), so
    /// that it listens on an address inside it. Needs root.
    pub netns: Option<String>,
    /// No fsync, asynchronous commit, no full-page writes: fast, and lost
    /// on a crash of the machine. `false` keeps PostgreSQL's durable
    /// defaults, for benchmarks that compare write rates honestly.
    pub fast: bool,
}

impl Default for Options {
    /// Unix socket only, no namespace, fast.
    fn default() -> Self {
        Self {
            listen: None,
            netns: None,
            fast: true,
        }
    }
}

/// A running (or stopped) PostgreSQL cluster in a temporary directory;
/// dropping it stops the server and removes the directory.
#[derive(Debug)]
pub struct Cluster {
    /// The directory: the socket, `data/` and `server.log`.
    dir: Option<tempfile::TempDir>,
    dir_path: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    options: Options,
    runner: Runner,
    running: bool,
}

impl Cluster {
    /// Creates a cluster in a new directory under /tmp (initdb), starts it
    /// and waits until it accepts connections.
    pub fn start(options: Options) -> Result<Cluster, ClusterError> {
        let bindir = install::bindir()?;
        let run_as = install::run_as()?;
        // Under /tmp rather than $TMPDIR: the postgres user must be able to
        // enter it, and a Unix socket path has to stay short.
        let dir = tempfile::Builder::new()
            .prefix("tgpg-")
            .tempdir_in("/tmp")
            .map_err(|source| ClusterError::Io {
                op: "creating a temporary directory in",
                path: PathBuf::from("/tmp"),
                source,
            })?;
        let dir_path = dir.path().to_path_buf();
        if let Some(user) = run_as {
            nix::unistd::chown(&dir_path, Some(user.uid), Some(user.gid)).map_err(|source| {
                ClusterError::Chown {
                    path: dir_path.clone(),
                    source,
                }
            })?;
        }
        let mut cluster = Cluster {
            data: dir_path.join("data"),
            log: dir_path.join("server.log"),
            port: options.listen.map_or(DEFAULT_PORT, |addr| addr.port()),
            runner: Runner {
                bindir,
                as_postgres: run_as.is_some(),
                dir: dir_path.clone(),
            },
            dir: Some(dir),
            dir_path,
            options,
            running: false,
        };
        cluster.initdb()?;
        cluster.configure()?;
        cluster.start_server()?;
        Ok(cluster)
    }

    /// A conninfo URL for database `db`, as tokio-postgres, the `postgres`
    /// crate and libpq take it: over the Unix socket
    /// (`postgresql://postgres@/db?host=/tmp/tgpg-xxxx&port=5432`), or over
    /// TCP when [`Options::listen`] is set
    /// (`postgresql://postgres@198.51.100.9:5432/db`).
    pub fn url(&self, db: &str) -> String {
        let db = percent_encode(db);
        match self.options.listen {
            Some(addr) => format!("postgresql://postgres@{addr}/{db}"),
            None => format!(
                "postgresql://postgres@/{db}?host={}&port={}",
                percent_encode(&self.dir_path.to_string_lossy()),
                self.port
            ),
        }
    }

    /// Creates a database named `prefix` and a random suffix
    /// (`prefix_0123456789ab`) and returns that name. `prefix` is lowercase
    /// ASCII letters, digits and underscores, starting with a letter.
    pub fn create_database(&self, prefix: &str) -> Result<String, ClusterError> {
        let valid = prefix.len() <= MAX_PREFIX
            && prefix.starts_with(|c: char| c.is_ascii_lowercase())
            && prefix
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(ClusterError::InvalidPrefix {
                prefix: prefix.to_owned(),
            });
        }
        let name = format!("{prefix}_{:012x}", random() & 0xffff_ffff_ffff);
        self.psql(&format!("CREATE DATABASE \"{name}\""))?;
        Ok(name)
    }

    /// Stops the server (`pg_ctl stop -m fast`); the data stays for
    /// [`Cluster::restart`]. Nothing to do when it is not running.
    pub fn stop(&mut self) -> Result<(), ClusterError> {
        if !self.running {
            return Ok(());
        }
        self.pg_ctl_stop("fast")?;
        self.running = false;
        Ok(())
    }

    /// Starts the server again on the same directory and address (stopping
    /// it first when it runs).
    pub fn restart(&mut self) -> Result<(), ClusterError> {
        self.stop()?;
        self.start_server()
    }

    /// The data directory (`PGDATA`); `postmaster.pid` there names the
    /// server's process while it runs.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    fn initdb(&self) -> Result<(), ClusterError> {
        let mut initdb = self.runner.command(
            "initdb",
            [
                "-D".as_ref(),
                self.data.as_os_str(),
                "-A".as_ref(),
                "trust".as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--no-sync".as_ref(),
                "-E".as_ref(),
                "UTF8".as_ref(),
                "--locale=C".as_ref(),
            ],
            None,
        );
        command::run(&mut initdb).map(drop)
    }

    /// Appends this cluster's settings to `postgresql.conf` and, with a
    /// TCP address, a trust line for its network to `pg_hba.conf`.
    fn configure(&self) -> Result<(), ClusterError> {
        let listen = self
            .options
            .listen
            .map(|addr| addr.ip().to_string())
            .unwrap_or_default();
        let mut conf = String::from("\n# tidegate-pgcluster\n");
        let _ = writeln!(conf, "listen_addresses = '{listen}'");
        let _ = writeln!(conf, "port = {}", self.port);
        let _ = writeln!(
            conf,
            "unix_socket_directories = '{}'",
            self.dir_path.to_string_lossy().replace('\'', "''")
        );
        conf.push_str("max_connections = 200\n");
        if self.options.fast {
            conf.push_str("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n");
        }
        append(&self.data.join("postgresql.conf"), &conf)?;
        if let Some(addr) = self.options.listen {
            let network = match addr.ip() {
                std::net::IpAddr::V4(ip) => {
                    let [a, b, c, _] = ip.octets();
                    format!("{a}.{b}.{c}.0/24")
                }
                std::net::IpAddr::V6(ip) => {
                    let s = ip.segments();
                    format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
                }
            };
            append(
                &self.data.join("pg_hba.conf"),
                &format!("\n# tidegate-pgcluster\nhost all all {network} trust\n"),
            )?;
        }
        Ok(())
    }

    /// `pg_ctl start -w`, then a `select 1` over the socket; on failure
    /// the server is stopped again and the error quotes its log.
    fn start_server(&mut self) -> Result<(), ClusterError> {
        let mut start = self.runner.command(
            "pg_ctl",
            [
                "-D".as_ref(),
                self.data.as_os_str(),
                "-l".as_ref(),
                self.log.as_os_str(),
                "-w".as_ref(),
                "-t".as_ref(),
                PG_CTL_WAIT_SECONDS.as_ref(),
                "start".as_ref(),
            ],
            self.options.netns.as_deref(),
        );
        let started = command::run(&mut start).and_then(|_| self.psql("select 1"));
        match started {
            Ok(_) => {
                self.running = true;
                Ok(())
            }
            Err(source) => {
                let log_tail = command::tail(&self.log, LOG_TAIL_LINES);
                // It may be up without answering, or still starting.
                let _ = self.pg_ctl_stop("immediate");
                Err(ClusterError::Start {
                    log: self.log.clone(),
                    log_tail,
                    source: Box::new(source),
                })
            }
        }
    }

    /// `pg_ctl stop` on this cluster's data directory only: it signals the
    /// postmaster named in that directory's `postmaster.pid`.
    fn pg_ctl_stop(&self, mode: &str) -> Result<(), ClusterError> {
        let mut stop = self.runner.command(
            "pg_ctl",
            [
                "-D".as_ref(),
                self.data.as_os_str(),
                "-m".as_ref(),
                mode.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                PG_CTL_WAIT_SECONDS.as_ref(),
                "stop".as_ref(),
            ],
            None,
        );
        command::run(&mut stop).map(drop)
    }

    /// Runs one SQL command with psql over the Unix socket, as `postgres`
    /// in database `postgres`.
    fn psql(&self, sql: &str) -> Result<String, ClusterError> {
        let port = self.port.to_string();
        let mut psql = self.runner.command(
            "psql",
            [
                "-X".as_ref(),
                "-q".as_ref(),
                "-A".as_ref(),
                "-t".as_ref(),
                "-v".as_ref(),
                "ON_ERROR_STOP=1".as_ref(),
                "-h".as_ref(),
                self.dir_path.as_os_str(),
                "-p".as_ref(),
                port.as_ref(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "-d".as_ref(),
                "postgres".as_ref(),
                "-c".as_ref(),
                sql.as_ref(),
            ],
            None,
        );
        command::run(&mut psql)
    }
}

impl Drop for Cluster {
    /// Stops the server at once (`pg_ctl stop -m immediate`) when it runs,
    /// then removes the whole directory.
    fn drop(&mut self) {
        if self.running {
            if let Err(error) = self.pg_ctl_stop("immediate") {
                eprintln!(
                    "tidegate-pgcluster: stopping the cluster in {} failed: {error}",
                    self.dir_path.display()
                );
            }
            self.running = false;
        }
        if let Some(dir) = self.dir.take()
            && let Err(error) = dir.close()
        {
            eprintln!(
                "tidegate-pgcluster: removing {} failed: {error}",
                self.dir_path.display()
            );
        }
    }
}

fn append(path: &Path, text: &str) -> Result<(), ClusterError> {
    let io = |source| ClusterError::Io {
        op: "appending to",
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)
}

/// Percent-encodes everything but unreserved characters and `/`.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~/".contains(&byte) {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// A random number from std alone: a randomly keyed hasher over a
/// process-wide counter.
fn random() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_encoding_keeps_paths_and_names() {
        assert_eq!(percent_encode("/tmp/tgpg-aB3_x"), "/tmp/tgpg-aB3_x");
        assert_eq!(percent_encode("a b&c"), "a%20b%26c");
    }

    #[test]
    fn random_suffixes_differ() {
        assert_ne!(random(), random());
    }
}
