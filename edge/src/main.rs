//! `tidegate-edge`: the public HTTP API for clients, relaying to Core over
//! the link Core dials. `--check` validates the config and its files;
//! SIGHUP reloads them without dropping the link.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context as _, Result};
use clap::Parser;
use tidegate_edge::{
    config::{self, Config, Overrides},
    error_chain,
    http::{self, AppState, RequestSettings},
    link::{self, LinkSettings},
    metrics::{self, EdgeMetrics, Scraper},
    relay,
    serve::{self, HttpLimits},
};
use tidegate_proto::{
    certs::ReloadingCert,
    logs::{self, LogArgs},
    metrics::MetricsServer,
    service,
    tls::Pki,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
};
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
    /// Check the config and the TLS files it names, print what would run,
    /// and exit (0: it would start) without binding anything.
    #[arg(long)]
    check: bool,
}

fn overrides(args: &Args) -> Overrides {
    Overrides {
        http_listen: args.http_listen,
        link_listen: args.link_listen,
    }
}

fn link_settings(config: &Config) -> LinkSettings {
    LinkSettings {
        listen: config.link_listen,
        ca_file: config.ca_file.clone(),
        cert_file: config.cert_file.clone(),
        key_file: config.key_file.clone(),
        identity: config.identity.clone(),
        core_identity: config.core_identity.clone(),
    }
}

/// The config and the files it names, loaded: what the start and
/// `--check` share. Every problem is named with the file and the field.
fn preflight(path: &Path, overrides: Overrides) -> Result<(Config, RequestSettings, Pki)> {
    let config = Config::load(path, overrides)?;
    let file = path.display();
    let unreadable = tidegate_proto::tls::unreadable(&[
        ("ca_file", &config.ca_file),
        ("cert_file", &config.cert_file),
        ("key_file", &config.key_file),
    ]);
    if !unreadable.is_empty() {
        anyhow::bail!("config {file}: {}", unreadable.join("; "));
    }
    let (pki, _) = link::load_tls(&link_settings(&config))
        .with_context(|| format!("config {file}: ca_file, cert_file, key_file"))?;
    let settings =
        RequestSettings::of(&config).with_context(|| format!("config {file}: real_ip_header"))?;
    Ok((config, settings, pki))
}

/// `--check`: the start's own validation, and nothing else.
fn check(args: &Args) -> std::process::ExitCode {
    let file = args.config.display();
    match preflight(&args.config, overrides(args)) {
        Ok((config, _, pki)) => {
            println!(
                "{file}: ok (http on {}, link for Core on {} as {}, Core as {}, certificate serial {}, \
                 {} trusted proxies)",
                config.http_listen,
                config.link_listen,
                config.identity,
                config.core_identity,
                pki.own().current().info.serial,
                config.trusted_proxies.len(),
            );
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{}", error_chain(error.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
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
    if args.check {
        return check(&args);
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
    let overrides = overrides(&args);
    let (config, request_settings, _) = preflight(&args.config, overrides.clone())?;
    info!(config = %args.config.display(), identity = %config.identity, "starting");

    // HTTP stops first (in-flight requests still get Core's answers), then
    // the link and the relay.
    let http_cancel = CancellationToken::new();
    let link_cancel = CancellationToken::new();
    let (relay, relay_task) = relay::spawn(link_cancel.clone());
    let relay_task = tokio::spawn(relay_task);
    let (link, tls) =
        link::serve_reloadable(link_settings(&config), relay.clone(), link_cancel.clone()).await?;
    let mut link_task = tokio::spawn(link);

    let metrics_server = match config.metrics_listen {
        Some(address) => Some(MetricsServer::bind(address, "metrics_listen").await?),
        None => None,
    };
    let edge_metrics = Arc::new(EdgeMetrics::new());
    let listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("http_listen {}: binding", config.http_listen))?;
    let cert = ReloadingCert::load(&config.cert_file, &config.key_file, Some(&config.identity))
        .context("cert_file and key_file")?;
    let (settings_tx, settings) = watch::channel(Arc::new(request_settings));
    let metrics_task = metrics_server.map(|server| {
        let scraper = Scraper {
            metrics: edge_metrics.clone(),
            relay: relay.clone(),
        };
        let cancel = link_cancel.clone();
        tokio::spawn(async move {
            let shutdown = async move { cancel.cancelled().await };
            if let Err(error) = server.serve(scraper, shutdown).await {
                error!(%error, "the metrics endpoint failed");
            }
        })
    });
    let state = AppState {
        cert: Some(cert),
        relay,
        settings,
    };
    let limits = HttpLimits {
        max_connections: config.max_connections,
        header_timeout: config.header_timeout,
    };
    let mut http_task = tokio::spawn(serve::serve(
        listener,
        http::router(state).layer(axum::middleware::from_fn_with_state(
            edge_metrics,
            metrics::count,
        )),
        limits,
        http_cancel.clone(),
    ));
    info!(http = %config.http_listen, link = %config.link_listen, "ready");
    // The handlers are in before READY=1: systemd may stop the daemon at
    // once, and a SIGTERM before them would end it without its shutdown.
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    service::ready(&format!(
        "serving HTTP on {}, Core's link on {}",
        config.http_listen, config.link_listen
    ));

    let mut running = config;
    let failure = loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break None }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break None }
            _ = sighup.recv() => {
                info!(config = %args.config.display(), "SIGHUP: reloading");
                match reload(&args.config, &overrides, &running, &tls, &settings_tx) {
                    Ok(new) => running = new,
                    Err(e) => error!(
                        error = %error_chain(e.as_ref()),
                        "reload refused; the running config is unchanged"
                    ),
                }
            }
            joined = &mut http_task => break Some(format!("the HTTP server stopped: {joined:?}")),
            joined = &mut link_task => break Some(format!("the link server stopped: {joined:?}")),
        }
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
    if let Some(task) = metrics_task {
        task.await.context("the metrics endpoint panicked")?;
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

/// Re-reads the config and the TLS files: the request settings apply to
/// the requests that arrive after, the TLS files (a renewed certificate or
/// CA) to the link's next handshakes; the link that is up keeps going. A
/// key that needs a restart refuses the whole reload, naming the key.
fn reload(
    path: &Path,
    overrides: &Overrides,
    running: &Config,
    tls: &link::TlsSender,
    settings: &watch::Sender<Arc<RequestSettings>>,
) -> Result<Config> {
    let (new, request_settings, _) = preflight(path, overrides.clone())?;
    let changes = config::changes(running, &new);
    if !changes.restart.is_empty() {
        let keys: Vec<_> = changes.restart.iter().map(ToString::to_string).collect();
        anyhow::bail!("{}: restart the Edge to apply", keys.join("; "));
    }
    link::reload_tls(&link_settings(&new), tls).context("the link's TLS files")?;
    settings.send_replace(Arc::new(request_settings));
    for change in &changes.live {
        info!(key = change.key, "{change}");
    }
    info!(
        changed = changes.live.len(),
        "reload applied: the link's next handshakes use the TLS files as they are now"
    );
    Ok(new)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        super::Args::command().debug_assert();
    }
}
