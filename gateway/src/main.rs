//! `tidegate-gateway`: the per-host daemon. It loads the XDP WireGuard shield
//! (and, in director mode, the director) onto the public interface, runs the
//! location's WireGuard interface and peers and the HA agent, answers
//! `tidectl` on its control socket, and, with a `[core]` section, serves the
//! link Core dials.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use clap::Parser;
use tidegate_gateway::{
    config::{self, Config, Overrides},
    control::server::{ControlSocket, Handles},
    core_link, datapath, error_chain,
    ha::{
        agent, epoch, health,
        machine::Role,
        sharing::{self, SharingConfig},
        status::HaSummary,
        thread::AgentThread,
    },
    hooks,
    metrics::{GatewayMetrics, Scraper},
    preflight::{self, PreflightError},
    reload::{self, Reloader},
    wireguard::{
        LocalPeers,
        owner::{self, Owner},
    },
    xdp::{Datapath, DatapathOptions, Kernel, XdpModeSetting, kernel::TCX_SINCE},
};
use tidegate_proto::{
    logs::{self, LogArgs},
    metrics::MetricsServer,
    service,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    task::JoinSet,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

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
    /// Check the config and the files it names, print what would run, and
    /// exit (0: it would start) without touching anything.
    #[arg(long)]
    check: bool,
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

fn overrides(args: &Args) -> Overrides {
    Overrides {
        interface: args.interface.clone(),
        xdp_mode: args.xdp_mode,
        control_socket: args.control_socket.clone(),
    }
}

/// `--check`: the start's own validation, and nothing else.
fn check(args: &Args) -> std::process::ExitCode {
    let file = args.config.display();
    match preflight::check(&args.config, overrides(args)) {
        Ok(checked) => {
            for warning in &checked.warnings {
                println!("{file}: warning: {warning}");
            }
            println!("{file}: ok ({})", preflight::summary(&checked.config));
            std::process::ExitCode::SUCCESS
        }
        Err(errors) => {
            for line in PreflightError::lines(&errors) {
                eprintln!("{line}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let overrides = overrides(&args);
    let checked = match preflight::check(&args.config, overrides.clone()) {
        Ok(checked) => checked,
        Err(errors) => anyhow::bail!(PreflightError::lines(&errors).join("; ")),
    };
    let config = checked.config;
    info!(config = %args.config.display(), services = ?config.services.services(), "starting");
    for warning in &checked.warnings {
        warn!(rule = warning.rule, "{warning}");
    }

    // Before anything is touched: a start whose epoch cannot be kept does
    // not take part in the election (the peers could refuse its adverts,
    // or accept a replay of its old ones).
    let epoch = match &config.ha {
        Some(_) => Some(ha_epoch(&config.state_dir)?),
        None => None,
    };

    let kernel = Kernel::probe()?;
    if kernel.tcx {
        info!(
            release = kernel.release,
            "kernel has every feature the gateway uses"
        );
    } else {
        info!(
            release = kernel.release,
            "kernel has no tcx links (Linux {TCX_SINCE}): the egress guard attaches as a TC clsact filter"
        );
    }

    let mut options = DatapathOptions {
        director: false,
        ..DatapathOptions::default()
    };
    if let Some(director) = config.ha.as_ref().and_then(|ha| ha.director) {
        options.director = true;
        options.max_sessions = director.max_sessions;
        options.table_size = director.table_size;
    }
    let mut datapath = Datapath::load_with(options)?;
    datapath.set_shield(config.shield)?;
    datapath.install_services(config.services.clone())?;
    if let Some(ha) = &config.ha {
        // Before the program is attached: no junk reaches the advert socket.
        let gate = ha
            .destination
            .gate(ha.port, &ha.interface)
            .context("gating the advert port")?;
        info!(?gate, "advert port gated");
        datapath.gate_adverts(gate)?;
    }
    let control = ControlSocket::bind(&config.control_socket)?;
    let metrics_server = match config.metrics {
        Some(address) => Some(MetricsServer::bind(address, "[metrics] listen").await?),
        None => None,
    };
    let metrics = Arc::new(GatewayMetrics::new());
    datapath.attach(&config.interface, config.xdp_mode, &config.bpf_pin_dir)?;
    let mut wireguard = match &config.wireguard {
        Some(wireguard) => Some(Owner::start(wireguard.clone()).await?),
        None => None,
    };
    if let Some(wireguard) = wireguard.as_mut() {
        wireguard.set_metrics(metrics.clone());
    }
    let local_peers = wireguard.as_ref().map(Owner::local_peers);
    // Failover continuity needs both: the election and the WireGuard it
    // keeps on the VIP and to the clients this gateway owns. The guard
    // follows the listen port in force (from the file, or from Core).
    match (&wireguard, &config.ha) {
        (Some(wireguard), Some(_)) => datapath.attach_egress(
            &config.interface,
            wireguard.listen_port().unwrap_or(0),
            &config.bpf_pin_dir,
            kernel.egress_hook(),
        )?,
        _ => datapath.remove_stale_egress(&config.interface, &config.bpf_pin_dir)?,
    }
    if let Some(ha) = &config.ha {
        // Fenced until the agent's first advert renews the lease. The first
        // renewal measures the kernel's tick rate (200 ms), here rather than
        // in the agent's first round.
        datapath.set_vips(&ha.vips)?;
        datapath.renew_lease(Duration::ZERO, false)?;
    }

    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    // With HA, the datapath task runs on the agent's thread: the lease
    // renewals it applies keep the adverts' times.
    let agent_thread = match &config.ha {
        Some(_) => Some(AgentThread::start().context("starting the HA agent's thread")?),
        None => None,
    };
    let (datapath_handle, datapath_task) = datapath::spawn(datapath, cancel.clone());
    match &agent_thread {
        Some(thread) => {
            let task = thread.run(datapath_task);
            tasks.spawn(async move {
                task.await
                    .context("datapath task")?
                    .context("datapath task")
            });
        }
        None => {
            tasks.spawn(async move { datapath_task.await.context("datapath task") });
        }
    }
    let wireguard_handle = wireguard.map(|wireguard| {
        let (handle, task) = owner::spawn(wireguard, cancel.clone());
        tasks.spawn(async move {
            task.await;
            Ok(())
        });
        handle
    });
    // The HA agent stops first, handing over while the rest still serves.
    let ha_cancel = CancellationToken::new();
    let mut ha_task = None;
    let mut ha = match (&config.ha, &agent_thread, epoch) {
        (Some(ha), Some(thread), Some(epoch)) => Some(
            thread
                .start_agent(ha.clone(), datapath_handle.clone(), epoch)
                .await?,
        ),
        _ => None,
    };
    if let Some(agent) = ha.as_mut() {
        agent.set_metrics(metrics.clone());
    }
    if let (Some(agent), Some(ha_config), Some(wireguard), Some(local)) = (
        ha.as_mut(),
        &config.ha,
        &wireguard_handle,
        local_peers.clone(),
    ) {
        let datapath = datapath_handle.clone();
        let follow = local.clone();
        let follow_cancel = cancel.clone();
        tasks.spawn(async move {
            follow_listen_port(follow, datapath, follow_cancel).await;
            Ok(())
        });
        let sharing_config = SharingConfig {
            location_id: ha_config.location_id,
            gateway_id: ha_config.election.gateway_id,
            key: ha_config.key.clone(),
            mac: agent.mac(),
            refresh: ha_config.continuity.endpoint_refresh,
            max_age: ha_config.continuity.endpoint_max_age,
            epoch: agent.epoch(),
        };
        // Stops with the data path, after the agent (which reads its table
        // for the peers to kick while it hands over).
        let (sharing, task) = sharing::spawn(
            sharing_config,
            agent.transport(),
            local,
            wireguard.clone(),
            cancel.clone(),
        );
        tasks.spawn(async move {
            task.await;
            Ok(())
        });
        agent.connect(sharing, wireguard.clone());
    }
    let ha_handle = ha.zip(agent_thread.as_ref()).map(|(ha, thread)| {
        let (handle, health_tx, task) = agent::spawn(ha, ha_cancel.clone());
        let task = thread.run(task);
        ha_task = Some(
            tasks
                .spawn(async move {
                    task.await.context("the HA agent")?;
                    Ok(())
                })
                .id(),
        );
        let watched = health::Watched {
            public: config.interface.clone(),
            wireguard: config.wireguard.as_ref().map(|w| w.interface.clone()),
            tracked: config
                .ha
                .as_ref()
                .map(|ha| ha.track.clone())
                .unwrap_or_default(),
        };
        let health_cancel = ha_cancel.clone();
        tasks.spawn(async move {
            health::watch(watched, health_tx, health_cancel)
                .await
                .context("health watch")
        });
        if !config.hooks.is_empty() {
            let hooks = config.hooks.clone();
            let ha = handle.clone();
            let hooks_cancel = cancel.clone();
            tasks.spawn(async move {
                hooks::run(hooks, ha, hooks_cancel).await;
                Ok(())
            });
        }
        handle
    });
    let mut pki = None;
    let mut status_interval = None;
    let mut core_tls = None;
    let mut core_links = None;
    if let (Some(core), Some(loaded)) = (&config.core, checked.pki) {
        let watched = loaded.clone();
        let expiry_cancel = cancel.clone();
        tasks.spawn(async move {
            tokio::select! {
                () = expiry_cancel.cancelled() => {}
                () = tidegate_proto::expiry::watch(watched, "this gateway's certificate for Core's link") => {}
            }
            Ok(())
        });
        pki = Some(loaded.clone());
        let (interval_tx, interval) = tokio::sync::watch::channel(core.status_interval);
        status_interval = Some(interval_tx);
        let parts = core_link::Parts {
            wireguard: wireguard_handle.clone(),
            ha: ha_handle.clone(),
            gateway_id: core.gateway_id,
            status_interval: interval,
            links: core_link::CoreLinks::default(),
        };
        core_links = Some(parts.links.clone());
        let (tls_tx, tls) = tokio::sync::watch::channel(
            loaded
                .server()
                .context("[core] TLS files: the server config")?,
        );
        core_tls = Some(reload::CoreTls(tls_tx));
        let server =
            core_link::serve_with(core.clone(), loaded, tls, parts, cancel.clone()).await?;
        tasks.spawn(async move { server.await.context("the server for Core") });
    }
    if let Some(server) = metrics_server {
        let scraper = Scraper {
            metrics,
            datapath: datapath_handle.clone(),
            ha: ha_handle.clone(),
            peers: local_peers,
            director: config.ha.as_ref().is_some_and(|ha| ha.director.is_some()),
        };
        let metrics_cancel = cancel.clone();
        tasks.spawn(async move {
            server
                .serve(scraper, async move { metrics_cancel.cancelled().await })
                .await
                .context("the metrics endpoint")
        });
    }
    let reloader = Reloader::new(
        args.config.clone(),
        overrides,
        config.clone(),
        reload::Targets {
            datapath: datapath_handle.clone(),
            wireguard: wireguard_handle.clone(),
            status_interval,
            core_tls,
        },
    );
    let handles = Handles {
        datapath: datapath_handle,
        wireguard: wireguard_handle,
        ha: ha_handle.clone(),
        director_mode: config.ha.as_ref().is_some_and(|ha| ha.director.is_some()),
        reloader: reloader.clone(),
        pki,
        core_links,
    };
    let control_cancel = cancel.clone();
    tasks.spawn(async move {
        control.serve(handles, control_cancel).await;
        Ok(())
    });
    // The handlers are in before READY=1: systemd may stop the daemon at
    // once, and a SIGTERM before them would end it without its shutdown.
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    // Ready for systemd once the program is attached, the WireGuard
    // interface reconciled (Owner::start) and the election has taken its
    // first step.
    if let Some(ha) = &ha_handle {
        ha.first_step()
            .await
            .context("the HA agent stopped before its first step")?;
    }
    info!(socket = %config.control_socket.display(), "ready");
    let role = ha_handle.as_ref().map(|ha| ha.subscribe().borrow().role);
    service::ready(&status_line(&config, role));
    if let Some(ha) = &ha_handle {
        // systemctl status shows the role as it changes.
        let summary = ha.subscribe();
        let config = config.clone();
        let status_cancel = cancel.clone();
        tasks.spawn(async move {
            follow_role(summary, &config, status_cancel).await;
            Ok(())
        });
    }

    let mut failure = None;
    loop {
        tokio::select! {
            _ = sigterm.recv() => {
                info!("SIGTERM: shutting down");
                break;
            }
            _ = sigint.recv() => {
                info!("SIGINT: shutting down");
                break;
            }
            _ = sighup.recv() => {
                info!("SIGHUP: reloading {}", args.config.display());
                let reloader = reloader.clone();
                tokio::spawn(async move {
                    match reloader.reload().await {
                        Ok(report) => info!(?report, "reload applied"),
                        Err(e) => error!(error = %error_chain(&e), "reload refused; the running config is unchanged"),
                    }
                });
            }
            Some(joined) = tasks.join_next() => {
                failure = Some(task_failure(joined));
                break;
            }
        }
    }
    service::stopping(if ha_task.is_some() {
        "handing over or resigning, then stopping"
    } else {
        "stopping; the XDP program and WireGuard stay"
    });
    ha_cancel.cancel();
    if let Some(ha_task) = ha_task {
        while let Some(joined) = tasks.join_next_with_id().await {
            let (id, result) = match joined {
                Ok((id, result)) => (id, Ok(result)),
                Err(error) => (error.id(), Err(error)),
            };
            if let Err(error) = flatten(result) {
                failure.get_or_insert(Err(error));
            }
            if id == ha_task {
                break;
            }
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

/// The status line systemd shows: the interfaces served and the HA role.
fn status_line(config: &Config, role: Option<Role>) -> String {
    let mut line = format!("shield on {}", config.interface);
    if let Some(wireguard) = &config.wireguard {
        line.push_str(&format!(", WireGuard {}", wireguard.interface));
    }
    if let Some(role) = role {
        line.push_str(&format!(", HA {role}"));
    }
    line
}

/// Keeps systemd's status line on the HA role in force.
async fn follow_role(
    mut summary: tokio::sync::watch::Receiver<HaSummary>,
    config: &Config,
    cancel: CancellationToken,
) {
    let mut shown = summary.borrow_and_update().role;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = summary.changed() => if changed.is_err() {
                // The agent is gone: the daemon is stopping.
                cancel.cancelled().await;
                return;
            },
        }
        let role = summary.borrow_and_update().role;
        if role != shown {
            service::status(&status_line(config, Some(role)));
            shown = role;
        }
    }
}

/// This start's HA epoch, chosen from the wall clock and the epoch file
/// in `state_dir` and on disk before it is returned.
fn ha_epoch(state_dir: &std::path::Path) -> Result<u64> {
    let advanced = epoch::advance(state_dir, std::time::SystemTime::now())
        .context("choosing this start's HA epoch")?;
    let path = epoch::path_in(state_dir);
    match advanced.last {
        None => warn!(
            epoch = advanced.epoch,
            path = %path.display(),
            "no HA epoch file (first start, or the state directory was lost): the epoch is \
             the wall clock, and the other gateways refuse this gateway's adverts until it \
             is above the epoch they last heard from it"
        ),
        Some(last) if advanced.epoch != advanced.clock_ms => warn!(
            epoch = advanced.epoch,
            last,
            path = %path.display(),
            "the wall clock is at or behind the last start's HA epoch: the epoch is the last one plus one"
        ),
        Some(last) => info!(epoch = advanced.epoch, last, path = %path.display(), "HA epoch"),
    }
    Ok(advanced.epoch)
}

/// Keeps the egress guard on the WireGuard listen port in force: a reload or
/// Core may change it.
async fn follow_listen_port(
    mut local: tokio::sync::watch::Receiver<LocalPeers>,
    datapath: datapath::DatapathHandle,
    cancel: CancellationToken,
) {
    let mut guarded = local.borrow_and_update().listen_port;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = local.changed() => if changed.is_err() {
                // The WireGuard task is gone: the daemon is stopping.
                cancel.cancelled().await;
                return;
            },
        }
        let port = local.borrow_and_update().listen_port;
        if port == guarded || port == 0 {
            continue;
        }
        match datapath.set_listen_port(port).await {
            Ok(()) => {
                info!(
                    listen_port = port,
                    "the egress guard follows the new listen port"
                );
                guarded = port;
            }
            Err(e) => error!(
                error = %error_chain(&e),
                "moving the egress guard to the new listen port failed"
            ),
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
