//! The gRPC server Core dials: mutual TLS with the location's CA, Core's
//! identity checked on every Link, and one session per Core at a time (a
//! new Link of the same Core replaces its previous one; see
//! [`super::links`]).

use std::{pin::Pin, time::Duration};

use futures::Stream;
use tidegate_proto::{
    certs::ReloadingCert,
    gateway::v1::{
        self as pb,
        gateway_server::{Gateway, GatewayServer},
    },
    limits,
    listen::{Acceptor, LINK_LIMITS},
    tls::{Pki, TlsAcceptor, TlsError, require_core, tls_incoming_live},
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status, Streaming, transport::Server};
use tracing::{info, warn};

use super::{CoreLinkConfig, session};

/// HTTP/2 pings on an idle link, so that a Core that vanished without
/// closing its connection is noticed.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// Messages queued towards Core before the session waits.
const OUTBOUND_QUEUE: usize = 64;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum CoreLinkError {
    #[error("[core] TLS files")]
    Tls(#[from] TlsError),
    #[error("[core] listen {address}: binding")]
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
    parts: session::Parts,
    /// This gateway's certificate, whose expiry each Hello tells Core.
    cert: ReloadingCert,
    core_identity: String,
    /// Sessions end with the server.
    shutdown: CancellationToken,
    sessions: TaskTracker,
}

type LinkStream = Pin<Box<dyn Stream<Item = Result<pb::GatewayMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Gateway for Service {
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
        let serial = tidegate_proto::tls::peer_serial(request.peer_certs());
        let cancel = self.shutdown.child_token();
        let links = self.parts.links.clone();
        let number = links.open(cancel.clone());
        info!(session = number, ?remote, core_serial = %serial, "Core opened a Link");
        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let parts = self.parts.clone();
        let inbound = request.into_inner();
        let cert_not_after = self.cert.current().info.not_after_unix;
        self.sessions.spawn(async move {
            session::run(parts, number, cert_not_after, inbound, tx, cancel).await;
            links.close(number);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Loads the TLS files and checks this gateway's certificate carries its
/// identity, so that a mix-up shows at start, not when Core first dials.
pub fn load_pki(config: &CoreLinkConfig) -> Result<Pki, CoreLinkError> {
    Ok(Pki::load_as(
        &config.ca_file,
        &config.cert_file,
        &config.key_file,
        Some(&config.identity),
    )?)
}

/// Binds `config.listen` and serves Core until `cancel` fires; sessions
/// end then too. Binding and TLS errors come back before anything is
/// served. Every handshake presents the certificate the files hold then
/// (a renewed one without a restart).
pub async fn serve(
    config: CoreLinkConfig,
    parts: session::Parts,
    cancel: CancellationToken,
) -> Result<impl Future<Output = Result<(), CoreLinkError>>, CoreLinkError> {
    let pki = load_pki(&config)?;
    let (_, tls) = watch::channel(pki.server()?);
    serve_with(config, pki, tls, parts, cancel).await
}

/// [`serve`] with the TLS files already loaded (by [`load_pki`]); each
/// handshake runs with the acceptor `tls` holds then (a reload sends one
/// made from the files as they are then: a new CA).
pub async fn serve_with(
    config: CoreLinkConfig,
    pki: Pki,
    tls: watch::Receiver<TlsAcceptor>,
    parts: session::Parts,
    cancel: CancellationToken,
) -> Result<impl Future<Output = Result<(), CoreLinkError>>, CoreLinkError> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| CoreLinkError::Bind {
            address: config.listen,
            source,
        })?;
    let server = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE));
    let sessions = TaskTracker::new();
    let service = Service {
        parts,
        cert: pki.own().clone(),
        core_identity: config.core_identity.clone(),
        shutdown: cancel.clone(),
        sessions: sessions.clone(),
    };
    info!(listen = %config.listen, core = %config.core_identity, "waiting for Core");
    let mut server = server;
    let router = server.add_service(
        GatewayServer::new(service)
            .max_decoding_message_size(limits::MAX_CONFIG_BYTES)
            .max_encoding_message_size(limits::MAX_STATUS_BYTES),
    );
    Ok(async move {
        let served = router
            .serve_with_incoming_shutdown(
                tls_incoming_live(tls, Acceptor::new(listener, LINK_LIMITS).into_stream()),
                cancel.cancelled_owned(),
            )
            .await
            .map_err(CoreLinkError::Server);
        sessions.close();
        sessions.wait().await;
        served
    })
}
