//! The HTTP server: connections through an [`Acceptor`] (a cap on those
//! open, no spin when out of file descriptors), HTTP/1.1 with a deadline
//! for each request's head (which also ends a connection idle between
//! requests), and a graceful stop that lets requests in flight finish.

use std::{net::SocketAddr, time::Duration};

use axum::{Router, extract::ConnectInfo};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tidegate_proto::listen::{Acceptor, Limits};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;
use tracing::debug;

/// What a client may hold of the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once; more are closed as they come.
    pub max_connections: usize,
    /// How long a connection has to send a request's head, from when it
    /// opens or its last answer went out.
    pub header_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` fires, then waits for the
/// requests in flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) {
    // Behind nginx every connection comes from the proxy: no limit per peer.
    let mut acceptor = Acceptor::new(
        listener,
        Limits {
            total: limits.max_connections,
            per_peer: limits.max_connections,
        },
    );
    let graceful = GracefulShutdown::new();
    loop {
        let (connection, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = acceptor.accept() => accepted,
        };
        let router = router.clone();
        let service = TowerToHyperService::new(router.map_request(
            move |mut request: axum::http::Request<Incoming>| {
                request
                    .extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(peer));
                request
            },
        ));
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(connection), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                debug!(%peer, %error, "connection ended");
            }
        });
    }
    // No new connections; those open finish what they started.
    drop(acceptor);
    graceful.shutdown().await;
}
