//! `tidegate-edge`: the public HTTP API for clients, relaying to Core over
//! the link Core dials.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::{Context as _, Result};
use axum::http::HeaderName;
use clap::Parser;
use tidegate_edge::{
    config::{self, Config, Overrides},
    error_chain,
    http::{self, AppState},
    link::{self, LinkSettings},
    relay,
    serve::{self, HttpLimits},
};
use tidegate_proto::{
    certs::ReloadingCert,
    logs::{self, LogArgs},
    service,
};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Tidegate Edge: the public HTTP API for clients.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, env = "TIDEGATE_EDGE_CONFIG", default_value = config::DEFAULT_CONFIG)]
    config: PathBuf,
    /// Address of the HTTP API (overrides the file).
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// Address Core dials (overrides the file).
    #[arg(long)]
    link_listen: Option<SocketAddr>,
    #[command(flatten)]
    log: LogArgs,
    /// Write the manual page and shell completions under DIR (what `cargo
    /// xtask package` ships), and exit.
    #[arg(long, hide = true, value_name = "DIR")]
    generate_manual: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    logs::init(args.log.log_format);
    if let Some(dir) = &args.generate_manual {
        use clap::CommandFactory as _;
        return match tidegate_proto::manual::write(Args::command(), dir) {
            Ok(_) => std::process::ExitCode::SUCCESS,
            Err(error) => {
                error!(%error, dir = %dir.display(), "writing the manual");
                std::process::ExitCode::FAILURE
            }
        };
    }
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
        http_listen: args.http_listen,
        link_listen: args.link_listen,
    };
    let config = Config::load(&args.config, overrides)?;
    info!(config = %args.config.display(), identity = %config.identity, "starting");

    // HTTP stops first (in-flight requests still get Core's answers), then
    // the link and the relay.
    let http_cancel = CancellationToken::new();
    let link_cancel = CancellationToken::new();
    let (relay, relay_task) = relay::spawn(link_cancel.clone());
    let relay_task = tokio::spawn(relay_task);
    let link = link::serve(
        LinkSettings {
            listen: config.link_listen,
            ca_file: config.ca_file.clone(),
            cert_file: config.cert_file.clone(),
            key_file: config.key_file.clone(),
            identity: config.identity.clone(),
            core_identity: config.core_identity.clone(),
        },
        relay.clone(),
        link_cancel.clone(),
    )
    .await?;
    let mut link_task = tokio::spawn(link);

    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("http_listen {}: binding", config.http_listen))?;
    let cert = ReloadingCert::load(&config.cert_file, &config.key_file, Some(&config.identity))
        .context("cert_file and key_file")?;
    let state = AppState {
        cert: Some(cert),
        relay,
        body_limit: config.body_limit,
        core_timeout: config.core_timeout,
        body_timeout: config.body_timeout,
        trusted_proxies: Arc::from(config.trusted_proxies.clone()),
        real_ip_header: HeaderName::from_bytes(config.real_ip_header.as_bytes())
            .context("real_ip_header")?,
    };
    let limits = HttpLimits {
        max_connections: config.max_connections,
        header_timeout: config.header_timeout,
    };
    let mut http_task = tokio::spawn(serve::serve(
        listener,
        http::router(state),
        limits,
        http_cancel.clone(),
    ));
    info!(http = %config.http_listen, link = %config.link_listen, "ready");
    service::ready(&format!(
        "serving HTTP on {}, Core's link on {}",
        config.http_listen, config.link_listen
    ));

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let failure = tokio::select! {
        _ = sigterm.recv() => { info!("SIGTERM: shutting down"); None }
        _ = sigint.recv() => { info!("SIGINT: shutting down"); None }
        joined = &mut http_task => Some(format!("the HTTP server stopped: {joined:?}")),
        joined = &mut link_task => Some(format!("the link server stopped: {joined:?}")),
    };
    service::stopping("finishing the requests in flight, then closing the link");
    http_cancel.cancel();
    if (!http_task.is_finished() || failure.is_none())
        && let Err(error) = http_task.await
    {
        error!(%error, "the HTTP server task panicked");
    }
    link_cancel.cancel();
    if !link_task.is_finished() || failure.is_none() {
        match link_task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => error!(error = %error_chain(&error), "the link server failed"),
            Err(error) => error!(%error, "the link server task panicked"),
        }
    }
    relay_task.await.context("the relay task panicked")?;
    match failure {
        Some(failure) => anyhow::bail!(failure),
        None => {
            info!("stopped");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        super::Args::command().debug_assert();
    }
}
