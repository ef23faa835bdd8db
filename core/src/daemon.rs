//! `tidegate-core run`: the daemon's parts started in order and stopped
//! together: the state thread, the admin socket, the link supervisor.

use anyhow::{Context as _, Result};
use tidegate_proto::tls::Pki;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info};

use crate::{
    admin::{AdminService, socket::AdminSocket},
    config::Config,
    links::Supervisor,
    state,
    store::Store,
};

/// Runs Core until SIGTERM or SIGINT.
pub async fn run(config: Config) -> Result<()> {
    let pki = Pki::load(&config.tls.ca, &config.tls.cert, &config.tls.key)
        .context("loading Core's certificate (make one with `tidegate-core init`)")?;
    if let Some(dir) = config
        .database
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let store = Store::open(&config.database, config.mfa)?;
    let (state, state_thread) = state::spawn(store);
    let socket = AdminSocket::bind(&config.admin_socket)?;

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let directory = Supervisor::spawn(
        state.clone(),
        pki,
        config.links,
        config.core_id.clone(),
        &tracker,
        cancel.clone(),
    );
    let service = AdminService::new(state.clone(), directory);
    let admin_cancel = cancel.clone();
    let admin = tokio::spawn(async move { socket.serve(service, admin_cancel).await });
    info!(
        database = %config.database.display(),
        admin_socket = %config.admin_socket.display(),
        "ready"
    );

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut admin = admin;
    let failure = tokio::select! {
        _ = sigterm.recv() => { info!("SIGTERM: shutting down"); None }
        _ = sigint.recv() => { info!("SIGINT: shutting down"); None }
        result = &mut admin => Some(match result {
            Ok(Ok(())) => anyhow::anyhow!("the admin API stopped unexpectedly"),
            Ok(Err(e)) => anyhow::Error::new(e),
            Err(e) => anyhow::Error::new(e).context("the admin API panicked"),
        }),
    };
    cancel.cancel();
    tracker.close();
    tracker.wait().await;
    if failure.is_none() {
        match admin.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!(error = %crate::error_chain(&e), "admin API"),
            Err(e) => error!(error = %e, "the admin API panicked"),
        }
    }
    drop(state);
    tokio::task::spawn_blocking(move || state_thread.join())
        .await
        .context("waiting for the state thread")?
        .map_err(|_| anyhow::anyhow!("the state thread panicked"))?;
    match failure {
        Some(e) => Err(e),
        None => {
            info!("stopped");
            Ok(())
        }
    }
}
