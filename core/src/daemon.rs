//! The daemon: the state thread, the admin socket and the link supervisor,
//! started in order and stopped together.

use std::{sync::Arc, thread};

use anyhow::{Context as _, Result};
use tidegate_proto::tls::Pki;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
    task::JoinHandle,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info};

use crate::{
    admin::{
        AdminService,
        socket::{AdminSocket, SocketError},
    },
    config::Config,
    links::{Directory, Supervisor},
    state::{self, StateHandle},
    store::Store,
};

/// A running Core.
#[derive(Debug)]
pub struct Core {
    cancel: CancellationToken,
    tracker: TaskTracker,
    admin: JoinHandle<Result<(), SocketError>>,
    state: StateHandle,
    state_thread: thread::JoinHandle<()>,
    directory: watch::Receiver<Arc<Directory>>,
}

impl Core {
    /// Opens the store, binds the admin socket and starts dialling.
    pub async fn start(config: Config) -> Result<Self> {
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
        let socket = AdminSocket::bind(&config.admin_socket)?;
        let (state, state_thread) = state::spawn(store);
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let watched = pki.clone();
        let admin_pki = pki.clone();
        let expiry_cancel = cancel.clone();
        tracker.spawn(async move {
            tokio::select! {
                () = expiry_cancel.cancelled() => {}
                () = tidegate_proto::expiry::watch(watched, "Core's certificate") => {}
            }
        });
        let directory = Supervisor::spawn(
            state.clone(),
            pki,
            config.links,
            config.core_id.clone(),
            &tracker,
            cancel.clone(),
        );
        let service = AdminService::new(state.clone(), directory.clone(), admin_pki);
        let admin_cancel = cancel.clone();
        let admin = tokio::spawn(async move { socket.serve(service, admin_cancel).await });
        info!(
            database = %config.database.display(),
            admin_socket = %config.admin_socket.display(),
            "ready"
        );
        Ok(Self {
            cancel,
            tracker,
            admin,
            state,
            state_thread,
            directory,
        })
    }

    /// The state thread's handle.
    pub fn state(&self) -> &StateHandle {
        &self.state
    }

    /// The links running now.
    pub fn directory(&self) -> &watch::Receiver<Arc<Directory>> {
        &self.directory
    }

    /// Waits until the admin API fails (it does not stop on its own).
    pub async fn failed(&mut self) -> anyhow::Error {
        match (&mut self.admin).await {
            Ok(Ok(())) => anyhow::anyhow!("the admin API stopped unexpectedly"),
            Ok(Err(e)) => anyhow::Error::new(e),
            Err(e) => anyhow::Error::new(e).context("the admin API panicked"),
        }
    }

    /// Closes every link and the admin socket, and waits for the state
    /// thread to finish its last job.
    pub async fn stop(self) -> Result<()> {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        if !self.admin.is_finished() {
            match self.admin.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %crate::error_chain(&e), "admin API"),
                Err(e) => error!(error = %e, "the admin API panicked"),
            }
        }
        drop(self.state);
        drop(self.directory);
        let thread = self.state_thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .context("waiting for the state thread")?
            .map_err(|_| anyhow::anyhow!("the state thread panicked"))
    }
}

/// Runs Core until SIGTERM or SIGINT, telling systemd once it is ready
/// (the admin socket bound, the links started) and when it stops.
pub async fn run(config: Config) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let serving = format!(
        "serving the admin socket {}, database {}",
        config.admin_socket.display(),
        config.database.display()
    );
    let mut core = Core::start(config).await?;
    tidegate_proto::service::ready(&serving);
    let failure = tokio::select! {
        _ = sigterm.recv() => { info!("SIGTERM: shutting down"); None }
        _ = sigint.recv() => { info!("SIGINT: shutting down"); None }
        error = core.failed() => Some(error),
    };
    tidegate_proto::service::stopping("closing the links and the admin socket");
    core.stop().await?;
    match failure {
        Some(e) => Err(e),
        None => {
            info!("stopped");
            Ok(())
        }
    }
}
