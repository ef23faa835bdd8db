//! `tidegate-gateway`: the per-host daemon. Today it loads the XDP WireGuard
//! shield onto the public interface and serves counters to `tidectl`.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Parser;
use tidegate_gateway::{
    config::{self, Config, Overrides},
    control::server::ControlSocket,
    datapath, error_chain,
    xdp::{Datapath, XdpModeSetting},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Tidegate gateway daemon.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, env = "TIDEGATE_CONFIG", default_value = config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Public interface to attach the XDP program to (overrides the file).
    #[arg(long)]
    interface: Option<String>,
    /// XDP attach mode (overrides the file).
    #[arg(long, value_enum)]
    xdp_mode: Option<XdpModeSetting>,
    /// Control socket path (overrides the file).
    #[arg(long)]
    control_socket: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
        .and_then(|runtime| runtime.block_on(run(args)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            error!("{}", error_chain(error.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let overrides = Overrides {
        interface: args.interface,
        xdp_mode: args.xdp_mode,
        control_socket: args.control_socket,
    };
    let config = Config::load(&args.config, overrides)?;
    info!(config = %args.config.display(), services = ?config.services.services(), "starting");

    let mut datapath = Datapath::load()?;
    datapath.install_services(config.services.clone())?;
    let control = ControlSocket::bind(&config.control_socket)?;
    datapath.attach(&config.interface, config.xdp_mode)?;

    let cancel = CancellationToken::new();
    let (handle, datapath_task) = datapath::spawn(datapath, cancel.clone());
    let mut tasks = JoinSet::new();
    tasks.spawn(async move { datapath_task.await.context("datapath task") });
    let control_cancel = cancel.clone();
    tasks.spawn(async move {
        control.serve(handle, control_cancel).await;
        Ok(())
    });
    info!(socket = %config.control_socket.display(), "ready");

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut failure = None;
    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: shutting down"),
        _ = sigint.recv() => info!("SIGINT: shutting down"),
        Some(joined) = tasks.join_next() => {
            failure = Some(task_failure(joined));
        }
    }
    cancel.cancel();
    while let Some(joined) = tasks.join_next().await {
        if let Err(error) = flatten(joined) {
            failure.get_or_insert(Err(error));
        }
    }
    match failure {
        Some(result) => result,
        None => {
            info!("stopped");
            Ok(())
        }
    }
}

/// A task that ends before shutdown is a failure, even when it returned Ok.
fn task_failure(joined: Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    flatten(joined)?;
    anyhow::bail!("a daemon task stopped unexpectedly")
}

fn flatten(joined: Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    joined.context("a daemon task panicked")?
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        super::Args::command().debug_assert();
    }
}
