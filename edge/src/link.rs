//! The gRPC server Core dials: mutual TLS with the installation's CA, only
//! Core's certificate accepted. Every Core sharing the database opens a
//! Link; one counts once its Core has sent Welcome on it, and a later
//! Welcome says the Core's role changed. The relay sends requests down the
//! leader's Link only and takes the replies ([`crate::leader`]).

use std::{
    path::PathBuf,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::Stream;
use tidegate_proto::{
    certs::ReloadingCert,
    edge::v1::{
        self as pb, core_message, edge_message,
        edge_server::{Edge, EdgeServer},
    },
    limits::MAX_EDGE_MESSAGE_BYTES,
    listen::{Acceptor, LINK_LIMITS},
    tls::{Pki, TlsAcceptor, TlsError, require_core, tls_incoming_live},
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status, Streaming, transport::Server};
use tracing::{info, warn};

use crate::{
    leader::Said,
    relay::{OUTBOUND_QUEUE, RelayHandle},
};

/// How long Core has to send Welcome on a new Link.
pub const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);

/// HTTP/2 pings on the link, so that a Core that vanished without closing
/// its connection is noticed and `/health` turns 503.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// Why the link server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("TLS files")]
    Tls(#[from] TlsError),
    #[error("link_listen {address}: binding")]
    Bind {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the gRPC server for Core")]
    Server(#[source] tonic::transport::Error),
}

/// The Link service.
#[derive(Debug, Clone)]
struct Service {
    relay: RelayHandle,
    /// The Edge's certificate, whose expiry each EdgeHello tells Core.
    cert: ReloadingCert,
    core_identity: String,
    sessions: TaskTracker,
    shutdown: CancellationToken,
    next_session: Arc<AtomicU64>,
}

type LinkStream = Pin<Box<dyn Stream<Item = Result<pb::EdgeMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Edge for Service {
    type LinkStream = LinkStream;

    async fn link(
        &self,
        request: Request<Streaming<pb::CoreMessage>>,
    ) -> Result<Response<LinkStream>, Status> {
        let remote = request.remote_addr();
        if let Err(refused) = require_core(&request, &self.core_identity) {
            warn!(
                ?remote,
                expected = %self.core_identity,
                "refused a Link: the client certificate is not Core's"
            );
            return Err(refused);
        }
        let session = self.next_session.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let hello = pb::EdgeHello {
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            cert_not_after_unix_s: self.cert.current().info.not_after_unix,
        };
        // The queue is new and empty: the first message always fits.
        let _ = tx.try_send(Ok(pb::EdgeMessage {
            msg: Some(edge_message::Msg::Hello(hello)),
        }));
        let relay = self.relay.clone();
        let cancel = self.shutdown.child_token();
        let serial = tidegate_proto::tls::peer_serial(request.peer_certs());
        let inbound = request.into_inner();
        info!(session, ?remote, core_serial = %serial, "Core opened a Link");
        self.sessions
            .spawn(run(session, relay, inbound, tx, cancel));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// One Link: Welcome first, then replies until the stream ends.
async fn run(
    session: u64,
    relay: RelayHandle,
    mut inbound: Streaming<pb::CoreMessage>,
    outbound: mpsc::Sender<Result<pb::EdgeMessage, Status>>,
    cancel: CancellationToken,
) {
    let first = tokio::select! {
        () = cancel.cancelled() => return,
        first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message()) => first,
    };
    let said = match first {
        Ok(Ok(Some(pb::CoreMessage {
            term,
            msg: Some(core_message::Msg::Welcome(welcome)),
        }))) => Said {
            core_id: welcome.core_id,
            term,
            leading: welcome.leading,
        },
        Ok(Ok(Some(_))) => {
            warn!(
                session,
                "Core's first message on a Link was not Welcome; closing it"
            );
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Err(status)) => {
            warn!(session, %status, "a Link failed before Welcome");
            return;
        }
        Err(_) => {
            warn!(session, timeout = ?WELCOME_TIMEOUT, "no Welcome on a Link; closing it");
            return;
        }
    };
    // The relay owns the stream towards Core from here on: when it lets go
    // (a newer Link of the same Core), the response stream ends.
    relay.attach(session, said, outbound, cancel.clone()).await;
    let reason = loop {
        let message = tokio::select! {
            () = cancel.cancelled() => break "replaced by a newer Link of the same Core, or the Edge is stopping".to_owned(),
            message = inbound.message() => message,
        };
        match message {
            Ok(Some(pb::CoreMessage {
                term,
                msg: Some(core_message::Msg::Reply(reply)),
            })) => relay.reply(session, term, reply).await,
            Ok(Some(pb::CoreMessage {
                term,
                msg: Some(core_message::Msg::Welcome(welcome)),
            })) => {
                let said = Said {
                    core_id: welcome.core_id,
                    term,
                    leading: welcome.leading,
                };
                relay.welcome(session, said).await;
            }
            Ok(Some(pb::CoreMessage { msg: None, .. })) => {
                warn!(session, "Core sent an empty message; ignored");
            }
            Ok(None) => break "Core closed the Link".to_owned(),
            Err(status) => break format!("the Link failed: {status}"),
        }
    };
    relay.detach(session, reason).await;
}

/// The link server's settings.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    pub listen: std::net::SocketAddr,
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub identity: String,
    pub core_identity: String,
}

/// Binds the link address and returns the server's future, which serves
/// until `cancel` fires and its sessions have ended. TLS and binding
/// errors come back at once.
pub async fn serve(
    settings: LinkSettings,
    relay: RelayHandle,
    cancel: CancellationToken,
) -> Result<impl Future<Output = Result<(), LinkError>>, LinkError> {
    serve_reloadable(settings, relay, cancel)
        .await
        .map(|(server, _)| server)
}

/// The TLS acceptor of the link server: [`reload_tls`] replaces it.
pub type TlsSender = watch::Sender<TlsAcceptor>;

/// Loads the link's TLS files (the CA, this Edge's certificate for its
/// identity) into an acceptor.
pub fn load_tls(settings: &LinkSettings) -> Result<(Pki, TlsAcceptor), LinkError> {
    let pki = Pki::load_as(
        &settings.ca_file,
        &settings.cert_file,
        &settings.key_file,
        Some(&settings.identity),
    )?;
    let acceptor = pki.server()?;
    Ok((pki, acceptor))
}

/// Re-reads the TLS files (a renewed CA or certificate) for the handshakes
/// to come; sessions that are up keep going. On an error the acceptor in
/// force stays.
pub fn reload_tls(settings: &LinkSettings, tls: &TlsSender) -> Result<(), LinkError> {
    let (_, acceptor) = load_tls(settings)?;
    tls.send_replace(acceptor);
    Ok(())
}

/// [`serve`], and the sender through which [`reload_tls`] gives the server
/// new TLS files.
pub async fn serve_reloadable(
    settings: LinkSettings,
    relay: RelayHandle,
    cancel: CancellationToken,
) -> Result<(impl Future<Output = Result<(), LinkError>>, TlsSender), LinkError> {
    let (pki, acceptor) = load_tls(&settings)?;
    let (tls, acceptor) = watch::channel(acceptor);
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| LinkError::Bind {
            address: settings.listen,
            source,
        })?;
    let mut server = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE));
    let sessions = TaskTracker::new();
    let service = Service {
        relay,
        cert: pki.own().clone(),
        core_identity: settings.core_identity.clone(),
        sessions: sessions.clone(),
        shutdown: cancel.clone(),
        next_session: Arc::new(AtomicU64::new(0)),
    };
    info!(listen = %settings.listen, core = %settings.core_identity, "waiting for Core");
    let router = server.add_service(
        EdgeServer::new(service)
            .max_decoding_message_size(MAX_EDGE_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_EDGE_MESSAGE_BYTES),
    );
    let server = async move {
        let serving = router.serve_with_incoming_shutdown(
            tls_incoming_live(acceptor, Acceptor::new(listener, LINK_LIMITS).into_stream()),
            cancel.cancelled_owned(),
        );
        // Warns at start and daily as the certificate nears its expiry.
        let expiry = tidegate_proto::expiry::watch(pki, "this Edge's certificate");
        let served = tokio::select! {
            served = serving => served.map_err(LinkError::Server),
            () = expiry => unreachable!("the expiry watch runs until dropped"),
        };
        sessions.close();
        sessions.wait().await;
        served
    };
    Ok((server, tls))
}
