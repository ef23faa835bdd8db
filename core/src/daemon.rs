//! The daemon: the state thread, the admin socket and the link supervisor,
//! started in order and stopped together; SIGHUP reloads the config file
//! and the TLS files under running links.

use std::{path::Path, sync::Arc, thread};

use anyhow::{Context as _, Result};
use tidegate_proto::{
    metrics::MetricsServer,
    tls::{Pki, TlsError},
};
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
    config::{self, Change, Config, ConfigError, Overrides},
    leader::{Leadership, lease, roster},
    links::{Directory, Live, Supervisor},
    metrics::{CoreMetrics, Scraper},
    state::{self, StateHandle},
    store::{Database, Store, db::Fence},
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
    /// The config in force.
    config: Config,
    /// What a reload changes under running links.
    live: watch::Sender<Live>,
    /// A Core alone on SQLite leads for as long as it runs: the sender
    /// of its one leadership.
    _sole: Option<watch::Sender<Leadership>>,
}

/// Why a reload was refused; the running config stays whole.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{}: restart Core to apply {}", list(.0), if .0.len() == 1 { "it" } else { "them" })]
    NeedsRestart(Vec<Change>),
    #[error("the TLS files (tls.ca, tls.cert, tls.key)")]
    Tls(#[from] TlsError),
}

fn list(changes: &[Change]) -> String {
    changes
        .iter()
        .map(Change::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// The TLS files of `config`, each unreadable one named by its key, then
/// loaded: what the start, `tidegate-core check` and a reload share.
pub fn load_pki(config: &Config) -> Result<Pki> {
    let unreadable = tidegate_proto::tls::unreadable(&[
        ("tls.ca", &config.tls.ca),
        ("tls.cert", &config.tls.cert),
        ("tls.key", &config.tls.key),
    ]);
    if !unreadable.is_empty() {
        anyhow::bail!(
            "{} (make them with `tidegate-core init`)",
            unreadable.join("; ")
        );
    }
    Pki::load(&config.tls.ca, &config.tls.cert, &config.tls.key)
        .context("loading Core's certificate (make one with `tidegate-core init`)")
}

impl Core {
    /// Opens the store, binds the admin socket and starts dialling.
    pub async fn start(config: Config) -> Result<Self> {
        let pki = load_pki(&config)?;
        if let Some(dir) = match &config.database {
            Database::Sqlite(path) => path.parent().filter(|d| !d.as_os_str().is_empty()),
            Database::Postgres(_) => None,
        } {
            use std::os::unix::fs::DirBuilderExt as _;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .with_context(|| format!("creating {}", dir.display()))?;
        }
        // The PostgreSQL client blocks (it runs its own runtime): not on a
        // runtime thread.
        let (database, mfa) = (config.database.clone(), config.mfa);
        let mut store = tokio::task::spawn_blocking(move || Store::open(&database, mfa))
            .await
            .context("opening the store")??;
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (leadership, sole) = match &config.database {
            Database::Sqlite(_) => {
                let (tx, rx) = watch::channel(Leadership::sole(&config.core_id));
                (rx, Some(tx))
            }
            Database::Postgres(url) => {
                let leadership = lease::spawn(
                    url.clone(),
                    config.core_id.clone(),
                    config.lease,
                    &tracker,
                    cancel.clone(),
                );
                (leadership, None)
            }
        };
        store.fence(Fence {
            core_id: config.core_id.clone(),
            leadership: leadership.clone(),
        });
        let socket = AdminSocket::bind(&config.admin_socket)?;
        let metrics_server = match config.metrics {
            Some(address) => Some(MetricsServer::bind(address, "[metrics] listen").await?),
            None => None,
        };
        let metrics = Arc::new(CoreMetrics::new());
        let (state, state_thread) = state::spawn(store);
        let watched = pki.clone();
        let (live_tx, live) = watch::channel(Live {
            pki,
            settings: config.links,
        });
        let expiry_cancel = cancel.clone();
        tracker.spawn(async move {
            tokio::select! {
                () = expiry_cancel.cancelled() => {}
                () = tidegate_proto::expiry::watch(watched, "Core's certificate") => {}
            }
        });
        let directory = Supervisor::spawn(
            state.clone(),
            live.clone(),
            config.core_id.clone(),
            leadership.clone(),
            metrics.clone(),
            &tracker,
            cancel.clone(),
        );
        if let Some(server) = metrics_server {
            let scraper = Scraper {
                metrics,
                directory: directory.clone(),
                state: state.clone(),
            };
            let metrics_cancel = cancel.clone();
            tracker.spawn(async move {
                let shutdown = async move { metrics_cancel.cancelled().await };
                if let Err(e) = server.serve(scraper, shutdown).await {
                    error!(error = %e, "the metrics endpoint failed");
                }
            });
        }
        if let Database::Postgres(url) = &config.database {
            roster::spawn(
                url.clone(),
                config.core_id.clone(),
                leadership.clone(),
                directory.clone(),
                &tracker,
                cancel.clone(),
            );
        }
        let service = AdminService::new(
            state.clone(),
            directory.clone(),
            live,
            config.core_id.clone(),
            leadership,
        );
        let admin_cancel = cancel.clone();
        let admin = tokio::spawn(async move { socket.serve(service, admin_cancel).await });
        info!(
            database = %config.database,
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
            config,
            live: live_tx,
            _sole: sole,
        })
    }

    /// Applies `new` (read from the file again): the `[links]` timings and
    /// the TLS files' contents (a renewed certificate or CA) are used from
    /// the next dial on; links that are up keep their sessions. A key that
    /// needs a restart refuses the whole reload, and nothing changes.
    pub fn reload(&mut self, new: Config) -> Result<Vec<Change>, ReloadError> {
        let changes = config::changes(&self.config, &new);
        if !changes.restart.is_empty() {
            return Err(ReloadError::NeedsRestart(changes.restart));
        }
        let pki = Pki::load(&new.tls.ca, &new.tls.cert, &new.tls.key)?;
        self.live.send_replace(Live {
            pki,
            settings: new.links,
        });
        self.config = new;
        Ok(changes.live)
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
/// (the admin socket bound, the links started) and when it stops; SIGHUP
/// re-reads `path` (with `overrides`) and the TLS files.
pub async fn run(config: Config, path: &Path, overrides: Overrides) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let serving = format!(
        "serving the admin socket {}, database {}",
        config.admin_socket.display(),
        config.database
    );
    let mut core = Core::start(config).await?;
    tidegate_proto::service::ready(&serving);
    let failure = loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break None }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break None }
            _ = sighup.recv() => {
                info!(config = %path.display(), "SIGHUP: reloading");
                let reloaded = Config::load(path, overrides.clone())
                    .map_err(ReloadError::from)
                    .and_then(|new| core.reload(new));
                match reloaded {
                    Ok(changes) => {
                        for change in &changes {
                            info!(key = change.key, "{change}");
                        }
                        info!(changed = changes.len(), "reload applied: new dials use the TLS files as they are now");
                    }
                    Err(e) => error!(
                        error = %crate::error_chain(&e),
                        "reload refused; the running config is unchanged"
                    ),
                }
            }
            error = core.failed() => break Some(error),
        }
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
