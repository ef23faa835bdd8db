//! Accepting connections without being run over: at most a set number open
//! at once, and per peer address (a connection past either is closed as
//! soon as it is accepted), and a pause after an accept error such as
//! `EMFILE` instead of a spin. The link servers and the Edge's HTTP server
//! accept through it.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::warn;

/// The link servers' limits: Core needs one connection; anyone else waits
/// out the TLS handshake's timeout, and a stranger holding connections open
/// from one address leaves room for Core's.
pub const LINK_LIMITS: Limits = Limits {
    total: 64,
    per_peer: 8,
};

/// How long accepting pauses after an error: out of file descriptors or
/// memory, the next accept would fail the same way at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How many connections may be open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub total: usize,
    pub per_peer: usize,
}

/// A listener that keeps its connections within [`Limits`].
#[derive(Debug)]
pub struct Acceptor {
    listener: TcpListener,
    limits: Limits,
    open: Arc<Mutex<Open>>,
    /// Connections closed because a limit was reached, since the start.
    refused: u64,
}

/// The connections open, in all and per peer address.
#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// An accepted connection; its place is free again when it is dropped.
#[derive(Debug)]
pub struct Limited {
    stream: TcpStream,
    peer: IpAddr,
    open: Arc<Mutex<Open>>,
}

impl Acceptor {
    pub fn new(listener: TcpListener, limits: Limits) -> Self {
        Self {
            listener,
            limits,
            open: Arc::default(),
            refused: 0,
        }
    }

    /// The next connection within the limits, and its peer. Connections
    /// past them are closed; accept errors pause accepting.
    pub async fn accept(&mut self) -> (Limited, SocketAddr) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "accepting a connection failed; pausing");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            if !self.admit(peer.ip()) {
                self.refused += 1;
                if self.refused.is_power_of_two() {
                    warn!(%peer, limits = ?self.limits, refused = self.refused, "connection limit reached: closing new connections");
                }
                continue;
            }
            // Small messages go at once (what tonic's own listener does).
            if let Err(error) = stream.set_nodelay(true) {
                warn!(%error, %peer, "setting TCP_NODELAY failed");
            }
            let connection = Limited {
                stream,
                peer: peer.ip(),
                open: self.open.clone(),
            };
            return (connection, peer);
        }
    }

    /// Counts a connection from `peer` in, if the limits allow.
    fn admit(&self, peer: IpAddr) -> bool {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let from_peer = open.per_peer.get(&peer).copied().unwrap_or(0);
        if open.total >= self.limits.total || from_peer >= self.limits.per_peer {
            return false;
        }
        open.total += 1;
        open.per_peer.insert(peer, from_peer + 1);
        true
    }

    /// The connections as a stream, for a tonic server.
    pub fn into_stream(self) -> impl Stream<Item = io::Result<Limited>> {
        futures::stream::unfold(self, |mut acceptor| async move {
            let (connection, _) = acceptor.accept().await;
            Some((Ok(connection), acceptor))
        })
    }
}

impl Drop for Limited {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if let Some(count) = open.per_peer.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                open.per_peer.remove(&self.peer);
            }
        }
    }
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Limited {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;

    use super::*;

    async fn closed(stream: &mut TcpStream) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await,
            Ok(Ok(0))
        )
    }

    async fn connect(from: &str, to: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        socket.connect(to).await.unwrap()
    }

    #[tokio::test]
    async fn past_a_limit_connections_are_closed_and_a_freed_place_is_reused() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let limits = Limits {
            total: 3,
            per_peer: 2,
        };
        let mut acceptor = Acceptor::new(listener, limits);
        let _a1 = connect("127.0.0.2", address).await;
        let _a2 = connect("127.0.0.2", address).await;
        let mut a3 = connect("127.0.0.2", address).await;
        let _b1 = connect("127.0.0.3", address).await;
        let (first, _) = acceptor.accept().await;
        let (_second, _) = acceptor.accept().await;
        // The third from one peer is closed; another peer's is taken.
        let (_third, peer) = acceptor.accept().await;
        assert_eq!(peer.ip().to_string(), "127.0.0.3");
        assert!(closed(&mut a3).await, "the third connection of one peer");
        // Now three are open: the next is closed, whoever sends it, and the
        // accept goes on waiting; a freed place takes the one after.
        let mut c1 = connect("127.0.0.4", address).await;
        let next = tokio::spawn(async move {
            let accepted = acceptor.accept().await;
            (accepted, acceptor.refused)
        });
        assert!(closed(&mut c1).await, "a connection past the total");
        drop(first);
        let c2 = connect("127.0.0.4", address).await;
        let ((_, peer), refused) = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("accepted")
            .unwrap();
        assert_eq!(peer, c2.local_addr().unwrap());
        assert_eq!(refused, 2);
    }
}
