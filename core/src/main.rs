//! `tidegate-core`: the control plane daemon (`run`), the check of its
//! config (`check`), and the commands that make its certificate authority
//! (`init`) and issue certificates for gateways and Edges (`issue`).

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use tidegate_core::{
    config::{self, Config, Overrides},
    error_chain,
    pki::{self, PkiDir},
    store::Database,
};
use tidegate_proto::logs::{self, LogArgs};
use tracing::error;

/// Tidegate Core: the control plane of Tidegate locations.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run Core: serve the admin API and keep links to every gateway and Edge.
    Run {
        /// Configuration file (TOML); missing at the default path means defaults.
        #[arg(long, env = "TIDEGATE_CORE_CONFIG", default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// The database: an SQLite file or a postgres:// URL (overrides the file).
        #[arg(long)]
        database: Option<String>,
        /// The admin socket (overrides the file).
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
    /// Check the config and the TLS files it names, print what would run,
    /// and exit (0: `run` would start) without opening the database or
    /// binding the admin socket.
    Check {
        /// Configuration file (TOML); missing at the default path means defaults.
        #[arg(long, env = "TIDEGATE_CORE_CONFIG", default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// The database: an SQLite file or a postgres:// URL (overrides the file).
        #[arg(long)]
        database: Option<String>,
        /// The admin socket (overrides the file).
        #[arg(long)]
        admin_socket: Option<PathBuf>,
    },
    /// Make the certificate authority and Core's certificate (ca.pem, ca.key,
    /// core.pem, core.key). Refuses to replace an existing CA.
    Init {
        /// Where the CA and Core's certificate go.
        #[arg(long, default_value = config::DEFAULT_PKI_DIR)]
        dir: PathBuf,
    },
    /// Issue a certificate for a gateway or an Edge: NAME.pem, NAME.key and
    /// ca.pem in the output directory. With --renew, re-sign the existing
    /// certificate of NAME in place (Core's own too, as `core`): running
    /// daemons present the new one on their next connection, no restart.
    Issue {
        /// The identity: a lowercase DNS name, the gateway's or Edge's name
        /// in Core (or the identity configured for it); never `core`, which
        /// is Core's.
        name: String,
        /// Renew: NAME.pem and NAME.key must exist in the output directory;
        /// a new certificate for the same key replaces NAME.pem atomically.
        #[arg(long)]
        renew: bool,
        /// With --renew: make a new private key too (NAME.key is replaced
        /// first), e.g. after a suspected compromise. Without it the key
        /// is kept.
        #[arg(long, requires = "renew")]
        new_key: bool,
        /// The CA's directory.
        #[arg(long, default_value = config::DEFAULT_PKI_DIR)]
        dir: PathBuf,
        /// Where to write the files (created 0700).
        #[arg(long)]
        out: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = pki::DEFAULT_DAYS)]
        days: u32,
    },
    /// Copy an SQLite store whole into an empty PostgreSQL database (ids,
    /// keys, sessions and the event log kept), in one transaction. Core
    /// must be stopped; the SQLite file is left as it was.
    Migrate {
        /// Configuration file (TOML): its `database` is the SQLite file to copy.
        #[arg(long, env = "TIDEGATE_CORE_CONFIG", default_value = config::DEFAULT_CONFIG)]
        config: PathBuf,
        /// The SQLite file to copy (overrides the config's `database`).
        #[arg(long)]
        from: Option<PathBuf>,
        /// The PostgreSQL database: a postgres:// URL. It must hold no table.
        #[arg(long)]
        to: String,
    },
    /// Write tidegate-core's manual pages and shell completions under DIR
    /// (what `cargo xtask package` ships).
    #[command(hide = true)]
    GenerateManual { dir: PathBuf },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logs::init(cli.log.log_format);
    if let Command::Check {
        config,
        database,
        admin_socket,
    } = cli.command
    {
        return check(
            &config,
            Overrides {
                database,
                admin_socket,
            },
        );
    }
    match dispatch(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `tidegate-core check`: the start's own validation, and nothing else.
fn check(path: &std::path::Path, overrides: Overrides) -> std::process::ExitCode {
    let file = path.display();
    let checked = Config::load(path, overrides)
        .map_err(|e| error_chain(&e))
        .and_then(|config| {
            tidegate_core::daemon::load_pki(&config)
                .map(|pki| (config, pki))
                .map_err(|e| format!("{file}: {}", error_chain(e.as_ref())))
        });
    match checked {
        Ok((config, pki)) => {
            let own = pki.own().current();
            println!(
                "{file}: ok (database {}, admin socket {}, core id {}, certificate {} serial {}, \
                 CA {}, links: connect timeout {:?}, reconnect {:?}..{:?})",
                config.database,
                config.admin_socket.display(),
                config.core_id,
                config.tls.cert.display(),
                own.info.serial,
                config.tls.ca.display(),
                config.links.connect_timeout,
                config.links.reconnect_min,
                config.links.reconnect_max,
            );
            std::process::ExitCode::SUCCESS
        }
        Err(problem) => {
            eprintln!("{problem}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            config,
            database,
            admin_socket,
        } => {
            let overrides = Overrides {
                database,
                admin_socket,
            };
            let path = config;
            let config = Config::load(&path, overrides.clone())?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?
                .block_on(tidegate_core::daemon::run(config, &path, overrides))
        }
        Command::Check { .. } => unreachable!("handled in main"),
        Command::Migrate { config, from, to } => {
            let from = match from {
                Some(path) => Database::Sqlite(path),
                None => Config::load(&config, Overrides::default())?.database,
            };
            let to: Database = to.parse()?;
            let copied = tidegate_core::store::copy_to_postgres(&from, &to)
                .with_context(|| format!("copying {from} into {to}"))?;
            for (table, rows) in &copied.tables {
                println!("{table}: {rows} rows");
            }
            println!("{from} copied into {to}; set `database` in core.toml to the URL");
            Ok(())
        }
        Command::Init { dir } => {
            let dir = PkiDir::new(dir);
            let core = pki::init(&dir)?;
            println!(
                "CA: {} (key {})",
                dir.ca_cert().display(),
                dir.ca_key().display()
            );
            println!("Core: {} (key {})", core.cert.display(), core.key.display());
            Ok(())
        }
        Command::GenerateManual { dir } => {
            use clap::CommandFactory as _;
            tidegate_proto::manual::write(Cli::command(), &dir)
                .with_context(|| format!("writing the manual to {}", dir.display()))?;
            Ok(())
        }
        Command::Issue {
            name,
            renew,
            new_key,
            dir,
            out,
            days,
        } => {
            let dir = PkiDir::new(dir);
            let issued = if renew {
                let key = if new_key {
                    pki::RenewKey::New
                } else {
                    pki::RenewKey::Keep
                };
                pki::renew(&dir, &name, &out, days, key)?
            } else {
                pki::issue(&dir, &name, &out, days)?
            };
            println!(
                "{name}{}: {} (key {}{}), CA {}",
                if renew { " renewed" } else { "" },
                issued.cert.display(),
                issued.key.display(),
                match (renew, new_key) {
                    (true, true) => ", new",
                    (true, false) => ", kept",
                    _ => "",
                },
                issued.ca.display()
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
