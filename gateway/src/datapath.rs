//! The task that owns the XDP program and its maps. Everything else sends it
//! messages through a [`DatapathHandle`].

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use tidegate_common::client::ClientKey;

use serde::{Deserialize, Serialize};

use crate::{
    director::DirectorState,
    error_chain,
    xdp::{
        AttachMode, CounterSnapshot, Datapath, DirectorStatus, EgressStatus, Ownership,
        ServiceTable, SessionEntry, ShieldSettings, XdpError, director::SessionReader,
    },
};

/// The shield's and the egress guard's counters, and where the program
/// is attached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatapathCounters {
    /// The interface the XDP program is attached to.
    pub interface: String,
    /// The mode it is attached in.
    pub xdp_mode: AttachMode,
    #[serde(flatten)]
    pub snapshot: CounterSnapshot,
    /// The egress guard, when it is attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressStatus>,
}

/// Why a request to the datapath task failed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("the datapath task has stopped")]
    Stopped,
    #[error("the XDP program is not attached")]
    NotAttached,
    #[error(transparent)]
    Xdp(#[from] XdpError),
}

#[derive(Debug)]
enum Command {
    Counters {
        reply: oneshot::Sender<Result<DatapathCounters, DatapathError>>,
    },
    InstallServices {
        table: ServiceTable,
        settings: ShieldSettings,
        reply: oneshot::Sender<Result<(), DatapathError>>,
    },
    /// Answered once every lease renewal asked before it is applied.
    Applied { reply: oneshot::Sender<()> },
    /// Not answered: a failure is logged.
    AdmitAdvertSource { gateway: Ipv4Addr },
    SetOwnership {
        ownership: Ownership,
        reply: oneshot::Sender<Result<(), DatapathError>>,
    },
    OpenHandover {
        peer_mac: [u8; 6],
        own_mac: [u8; 6],
        window: Duration,
        reply: oneshot::Sender<Result<(), DatapathError>>,
    },
    CloseHandover {
        reply: oneshot::Sender<Result<(), DatapathError>>,
    },
    Own {
        clients: Vec<ClientKey>,
        reply: oneshot::Sender<Result<(), DatapathError>>,
    },
    SetListenPort {
        port: u16,
        reply: oneshot::Sender<Result<(), DatapathError>>,
    },
    SetDirector {
        desired: DirectorState,
        reply: oneshot::Sender<Result<(), DatapathError>>,
    },
    DirectorStatus {
        reply: oneshot::Sender<Result<DirectorStatus, DatapathError>>,
    },
    SessionReader {
        reply: oneshot::Sender<Result<SessionReader, DatapathError>>,
    },
}

/// A renewal of the fence's lease, as the HA agent asked for it.
#[derive(Debug, Clone, Copy)]
struct Renewal {
    asked: Instant,
    lease: Duration,
    holds_vips: bool,
}

/// A cheap, cloneable way to ask the datapath task.
#[derive(Debug, Clone)]
pub struct DatapathHandle {
    tx: mpsc::Sender<Command>,
    /// The latest renewal asked for: the task applies it first.
    lease: watch::Sender<Option<Renewal>>,
}

impl DatapathHandle {
    /// The shield's counters and where it is attached.
    pub async fn counters(&self) -> Result<DatapathCounters, DatapathError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Counters { reply })
            .await
            .map_err(|_| DatapathError::Stopped)?;
        rx.await.map_err(|_| DatapathError::Stopped)?
    }

    /// Renews the VIP fence's lease for `lease` from now. Never waits:
    /// the task applies the latest renewal asked for before anything
    /// else, counting the lease from the moment it was asked.
    pub fn renew_lease(&self, lease: Duration, holds_vips: bool) {
        self.lease.send_replace(Some(Renewal {
            asked: Instant::now(),
            lease,
            holds_vips,
        }));
    }

    /// A gateway of the location was heard in an authenticated advert: the
    /// shield lets it send to the advert port without a budget. Asked
    /// without waiting; false when the task's queue is full (ask again
    /// later).
    pub fn admit_advert_source(&self, gateway: Ipv4Addr) -> bool {
        self.tx
            .try_send(Command::AdmitAdvertSource { gateway })
            .is_ok()
    }

    /// Waits until the task has applied every renewal asked for before.
    pub async fn lease_applied(&self) -> Result<(), DatapathError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Applied { reply })
            .await
            .map_err(|_| DatapathError::Stopped)?;
        rx.await.map_err(|_| DatapathError::Stopped)
    }

    /// Makes the director steer (or not) across `desired`'s backends.
    pub async fn set_director(&self, desired: DirectorState) -> Result<(), DatapathError> {
        self.ask(|reply| Command::SetDirector { desired, reply })
            .await
    }

    /// Sets what the egress guard lets this gateway send to clients.
    pub async fn set_ownership(&self, ownership: Ownership) -> Result<(), DatapathError> {
        self.ask(|reply| Command::SetOwnership { ownership, reply })
            .await
    }

    /// Opens the handover window for `window` from now: frames of sessions
    /// this gateway did not make go to `peer_mac`, sent from `own_mac`.
    pub async fn open_handover(
        &self,
        peer_mac: [u8; 6],
        own_mac: [u8; 6],
        window: Duration,
    ) -> Result<(), DatapathError> {
        self.ask(|reply| Command::OpenHandover {
            peer_mac,
            own_mac,
            window,
            reply,
        })
        .await
    }

    /// Closes the handover window.
    pub async fn close_handover(&self) -> Result<(), DatapathError> {
        self.ask(|reply| Command::CloseHandover { reply }).await
    }

    /// Moves the egress guard to WireGuard `port`, keeping its mode.
    pub async fn set_listen_port(&self, port: u16) -> Result<(), DatapathError> {
        self.ask(|reply| Command::SetListenPort { port, reply })
            .await
    }

    /// Adds clients to the owned table (director mode), before kicks.
    pub async fn own(&self, clients: Vec<ClientKey>) -> Result<(), DatapathError> {
        self.ask(|reply| Command::Own { clients, reply }).await
    }

    async fn ask(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<(), DatapathError>>) -> Command,
    ) -> Result<(), DatapathError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(command(reply))
            .await
            .map_err(|_| DatapathError::Stopped)?;
        rx.await.map_err(|_| DatapathError::Stopped)?
    }

    /// The director's state and per-backend counters.
    pub async fn director_status(&self) -> Result<DirectorStatus, DatapathError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::DirectorStatus { reply })
            .await
            .map_err(|_| DatapathError::Stopped)?;
        rx.await.map_err(|_| DatapathError::Stopped)?
    }

    /// The director's pins. The owner hands out a reader, and the map is
    /// read on a blocking thread, so that a long listing holds up nothing
    /// else (lease renewals least of all).
    pub async fn sessions(&self) -> Result<Vec<SessionEntry>, DatapathError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::SessionReader { reply })
            .await
            .map_err(|_| DatapathError::Stopped)?;
        let reader = rx.await.map_err(|_| DatapathError::Stopped)??;
        tokio::task::spawn_blocking(move || reader.sessions())
            .await
            .map_err(|_| DatapathError::Stopped)?
            .map_err(Into::into)
    }

    /// Replaces the services the shield protects and its settings.
    pub async fn install_services(
        &self,
        table: ServiceTable,
        settings: ShieldSettings,
    ) -> Result<(), DatapathError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::InstallServices {
                table,
                settings,
                reply,
            })
            .await
            .map_err(|_| DatapathError::Stopped)?;
        rx.await.map_err(|_| DatapathError::Stopped)?
    }
}

/// Starts owning `datapath`: returns the handle and the task's future, which
/// serves requests until `cancel` fires and then detaches the program.
pub fn spawn(
    mut datapath: Datapath,
    cancel: CancellationToken,
) -> (DatapathHandle, impl Future<Output = Result<(), XdpError>>) {
    let (tx, mut rx) = mpsc::channel(16);
    let lease = watch::Sender::new(None);
    let mut renewals = lease.subscribe();
    let task = async move {
        loop {
            // Renewals first: a command answered after a renewal was asked
            // sees it applied.
            let command = tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                Ok(()) = renewals.changed() => {
                    let renewal = *renewals.borrow_and_update();
                    if let Some(renewal) = renewal {
                        renew(&mut datapath, renewal);
                    }
                    continue;
                }
                command = rx.recv() => match command {
                    Some(command) => command,
                    None => break,
                },
            };
            match command {
                Command::Counters { reply } => {
                    let _ = reply.send(counters(&datapath));
                }
                Command::InstallServices {
                    table,
                    settings,
                    reply,
                } => {
                    let result = datapath
                        .set_shield(settings)
                        .and_then(|()| datapath.install_services(table));
                    let _ = reply.send(result.map_err(Into::into));
                }
                Command::Applied { reply } => {
                    let _ = reply.send(());
                }
                Command::AdmitAdvertSource { gateway } => {
                    if let Err(error) = datapath.admit_advert_source(gateway) {
                        warn!(%gateway, error = %error_chain(&error), "admitting a gateway to the advert port failed");
                    }
                }
                Command::SetOwnership { ownership, reply } => {
                    let result = datapath.continuity_mut().set_ownership(ownership);
                    let _ = reply.send(result.map_err(Into::into));
                }
                Command::OpenHandover {
                    peer_mac,
                    own_mac,
                    window,
                    reply,
                } => {
                    let result = datapath.jiffies_in(window).and_then(|until| {
                        datapath
                            .continuity_mut()
                            .open_handover(peer_mac, own_mac, until)
                    });
                    let _ = reply.send(result.map_err(Into::into));
                }
                Command::CloseHandover { reply } => {
                    let result = datapath.continuity_mut().close_handover();
                    let _ = reply.send(result.map_err(Into::into));
                }
                Command::SetListenPort { port, reply } => {
                    let result = datapath.continuity_mut().set_listen_port(port);
                    let _ = reply.send(result.map_err(Into::into));
                }
                Command::Own { clients, reply } => {
                    let result = datapath.continuity_mut().own(&clients);
                    let _ = reply.send(result.map_err(Into::into));
                }
                Command::SetDirector { desired, reply } => {
                    let _ = reply.send(datapath.set_director(&desired).map_err(Into::into));
                }
                Command::DirectorStatus { reply } => {
                    let _ = reply.send(datapath.director_status().map_err(Into::into));
                }
                Command::SessionReader { reply } => {
                    let _ = reply.send(datapath.session_reader().map_err(Into::into));
                }
            }
        }
        datapath.detach().inspect_err(|e| {
            error!(error = %error_chain(e), "detaching XDP failed");
        })
    };
    (DatapathHandle { tx, lease }, task)
}

/// Applies `renewal`: the lease runs from when it was asked for, however
/// late the task gets to it.
fn renew(datapath: &mut Datapath, renewal: Renewal) {
    let left = renewal.lease.saturating_sub(renewal.asked.elapsed());
    if let Err(error) = datapath.renew_lease(left, renewal.holds_vips) {
        error!(error = %error_chain(&error), "renewing the VIP fence's lease failed");
    }
}

fn counters(datapath: &Datapath) -> Result<DatapathCounters, DatapathError> {
    let (interface, xdp_mode) = datapath.attached().ok_or(DatapathError::NotAttached)?;
    Ok(DatapathCounters {
        interface: interface.to_owned(),
        xdp_mode,
        snapshot: datapath.counters()?,
        egress: datapath.continuity().status()?,
    })
}
