//! `tidegate-core`: the control plane daemon (`run`), and the commands that
//! make its certificate authority (`init`) and issue certificates for
//! gateways and Edges (`issue`).

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use tidegate_core::{
    config::{self, Config, Overrides},
    error_chain,
    pki::{self, PkiDir},
};
use tracing::error;

/// Tidegate Core: the control plane of Tidegate locations.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
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
        /// The SQLite database (overrides the file).
        #[arg(long)]
        database: Option<PathBuf>,
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
    /// ca.pem in the output directory.
    Issue {
        /// The identity: a DNS name, the gateway's or Edge's name in Core
        /// (or the identity configured for it).
        name: String,
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
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match dispatch(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", error_chain(e.as_ref()));
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
            let config = Config::load(
                &config,
                Overrides {
                    database,
                    admin_socket,
                },
            )?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")?
                .block_on(tidegate_core::daemon::run(config))
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
        Command::Issue {
            name,
            dir,
            out,
            days,
        } => {
            let issued = pki::issue(&PkiDir::new(dir), &name, &out, days)?;
            println!(
                "{name}: {} (key {}), CA {}",
                issued.cert.display(),
                issued.key.display(),
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
