//! Core's side of the gateway and Edge links, scripted by a test: a gRPC
//! client with a certificate of the test CA that opens the Link stream and
//! sends what the test says. It tests gateways and Edges on their own; the
//! real Core speaks the same protocol. A Link sends at the term the test
//! gives it (0 and no CoreHello: a Core from before terms), so one test can
//! play several Cores that share a database, leader and standbys.

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use tidegate_proto::edge::v1 as edge;
use tidegate_proto::gateway::v1 as gateway;
use tidegate_proto::tls::Pki;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use tonic::transport::{Channel, Endpoint};

use crate::netns::Netns;
use crate::pki::CertFiles;

/// A peer as Core sends it: a public key (base64) and one allowed IP.
///
/// # Panics
/// When `public` is not base64 (a test's own constant).
pub fn peer(public: &str, ip: &str) -> gateway::Peer {
    gateway::Peer {
        public_key: STANDARD.decode(public).expect("a base64 key"),
        preshared_key: Vec::new(),
        allowed_ips: vec![ip.to_owned()],
        persistent_keepalive_s: 0,
    }
}

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A TLS channel to `addr`, presenting `client` and expecting the server
/// to be `server_identity`. Connects at once, so a refused handshake is an
/// error here.
pub async fn channel(
    addr: SocketAddr,
    client: &CertFiles,
    server_identity: &str,
) -> Result<Channel> {
    let pki = Pki::load(&client.ca, &client.cert, &client.key)?;
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(pki.client(server_identity))?
        .connect_timeout(CONNECT_TIMEOUT);
    endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {addr} as {server_identity:?}'s client"))
}

/// An open gateway Link: what Core sends and what the gateway answers.
#[derive(Debug)]
pub struct GatewayLink {
    pub to_gateway: mpsc::Sender<gateway::CoreMessage>,
    pub from_gateway: Streaming<gateway::GatewayMessage>,
    /// The term every message goes out with (0: a Core from before terms).
    pub term: u64,
}

impl GatewayLink {
    /// Opens a Link on `channel`. A refused client gets the gateway's
    /// status here.
    pub async fn open(channel: Channel) -> std::result::Result<Self, tonic::Status> {
        let (to_gateway, rx) = mpsc::channel(64);
        let mut client = gateway::gateway_client::GatewayClient::new(channel);
        let from_gateway = client.link(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Self {
            to_gateway,
            from_gateway,
            term: 0,
        })
    }

    /// Opens a Link on `channel` as Core `core_id` and says, at `term`,
    /// whether it leads (a CoreHello).
    pub async fn open_as(
        channel: Channel,
        core_id: &str,
        term: u64,
        leading: bool,
    ) -> std::result::Result<Self, tonic::Status> {
        let mut link = Self::open(channel).await?;
        link.hello(core_id, term, leading)
            .await
            .map_err(|error| tonic::Status::internal(format!("{error:#}")))?;
        Ok(link)
    }

    /// Sends a CoreHello at `term`, which every later message carries too.
    pub async fn hello(&mut self, core_id: &str, term: u64, leading: bool) -> Result<()> {
        self.term = term;
        self.send(gateway::core_message::Msg::Hello(gateway::CoreHello {
            core_id: core_id.to_owned(),
            leading,
        }))
        .await
    }

    /// Sends one message at the Link's term.
    pub async fn send(&self, msg: gateway::core_message::Msg) -> Result<()> {
        self.send_at(self.term, msg).await
    }

    /// Sends one message at `term` (a deposed leader's late message, say).
    pub async fn send_at(&self, term: u64, msg: gateway::core_message::Msg) -> Result<()> {
        self.to_gateway
            .send(gateway::CoreMessage {
                term,
                msg: Some(msg),
            })
            .await
            .map_err(|_| anyhow!("the Link is closed"))
    }

    /// The next message, skipping status messages unless `want_status`,
    /// within `timeout`.
    pub async fn next(
        &mut self,
        want_status: bool,
        timeout: Duration,
    ) -> Result<gateway::gateway_message::Msg> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let message = tokio::time::timeout_at(deadline, self.from_gateway.message())
                .await
                .context("no message from the gateway in time")??
                .context("the gateway closed the Link")?;
            match message.msg {
                Some(gateway::gateway_message::Msg::Status(_)) if !want_status => continue,
                Some(msg) => return Ok(msg),
                None => continue,
            }
        }
    }

    /// The next Applied (statuses in between are skipped).
    pub async fn applied(&mut self, timeout: Duration) -> Result<gateway::Applied> {
        match self.next(false, timeout).await? {
            gateway::gateway_message::Msg::Applied(applied) => Ok(applied),
            other => Err(anyhow!("expected Applied, got {other:?}")),
        }
    }

    /// The next Status.
    pub async fn status(&mut self, timeout: Duration) -> Result<gateway::Status> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if let gateway::gateway_message::Msg::Status(status) = self.next(true, left).await? {
                return Ok(status);
            }
        }
    }
}

/// An open Edge Link with Welcome sent.
#[derive(Debug)]
pub struct EdgeLink {
    pub to_edge: mpsc::Sender<edge::CoreMessage>,
    pub from_edge: Streaming<edge::EdgeMessage>,
    /// The term replies go out with.
    pub term: u64,
}

/// A Welcome from Core `core_id` at `term`.
pub fn edge_welcome(core_id: &str, term: u64, leading: bool) -> edge::CoreMessage {
    edge::CoreMessage {
        term,
        msg: Some(edge::core_message::Msg::Welcome(edge::Welcome {
            core_id: core_id.to_owned(),
            leading,
        })),
    }
}

impl EdgeLink {
    /// Opens a Link on `channel` and sends Welcome as `core_id`, as a Core
    /// from before terms (term 0, taken as leading).
    pub async fn open(channel: Channel, core_id: &str) -> std::result::Result<Self, tonic::Status> {
        Self::open_at(channel, core_id, 0, false).await
    }

    /// Opens a Link on `channel` as Core `core_id` at `term`, leading or a
    /// standby.
    pub async fn open_at(
        channel: Channel,
        core_id: &str,
        term: u64,
        leading: bool,
    ) -> std::result::Result<Self, tonic::Status> {
        let (to_edge, rx) = mpsc::channel(64);
        to_edge
            .send(edge_welcome(core_id, term, leading))
            .await
            .map_err(|_| tonic::Status::internal("queue closed"))?;
        let mut client = edge::edge_client::EdgeClient::new(channel);
        let from_edge = client.link(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Self {
            to_edge,
            from_edge,
            term,
        })
    }

    /// Answers every request with `answer` until the Edge closes the Link
    /// or `stop` fires.
    pub async fn serve(
        mut self,
        answer: fn(&edge::Request) -> edge::reply::Result,
        stop: CancellationToken,
    ) -> Result<()> {
        loop {
            let message = tokio::select! {
                () = stop.cancelled() => return Ok(()),
                message = self.from_edge.message() => message,
            };
            let Some(message) = message? else {
                return Ok(());
            };
            let Some(edge::edge_message::Msg::Request(request)) = message.msg else {
                continue;
            };
            let reply = edge::Reply {
                id: request.id,
                result: Some(answer(&request)),
            };
            self.to_edge
                .send(edge::CoreMessage {
                    term: self.term,
                    msg: Some(edge::core_message::Msg::Reply(reply)),
                })
                .await
                .map_err(|_| anyhow!("the Link is closed"))?;
        }
    }
}

/// A scripted Core linked to one Edge, answering on a thread of its own
/// (inside `netns` when given) until stopped or dropped.
#[derive(Debug)]
pub struct ScriptedEdgeCore {
    stop: CancellationToken,
    thread: Option<JoinHandle<Result<()>>>,
}

impl ScriptedEdgeCore {
    /// Dials the Edge at `addr` (identity `edge_identity`) as `client`,
    /// sends Welcome, and answers each request with `answer`. Returns once
    /// the Link is open.
    pub fn start(
        netns: Option<&Netns>,
        addr: SocketAddr,
        client: &CertFiles,
        edge_identity: &str,
        answer: fn(&edge::Request) -> edge::reply::Result,
    ) -> Result<Self> {
        let stop = CancellationToken::new();
        let (opened_tx, opened_rx) = std::sync::mpsc::channel::<Result<()>>();
        let client = client.clone();
        let edge_identity = edge_identity.to_owned();
        let netns = netns.cloned();
        let thread_stop = stop.clone();
        let body = move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let opened = async {
                    let channel = channel(addr, &client, &edge_identity).await?;
                    EdgeLink::open(channel, "core")
                        .await
                        .map_err(|status| anyhow!("opening the Link: {status}"))
                }
                .await;
                match opened {
                    Ok(link) => {
                        let _ = opened_tx.send(Ok(()));
                        link.serve(answer, thread_stop).await
                    }
                    Err(error) => {
                        let message = format!("{error:#}");
                        let _ = opened_tx.send(Err(error));
                        Err(anyhow!(message))
                    }
                }
            })
        };
        let thread = std::thread::Builder::new()
            .name("scripted core".into())
            .spawn(move || match netns {
                Some(netns) => netns.run(body)?,
                None => body(),
            })
            .context("spawning the scripted Core's thread")?;
        let opened = opened_rx
            .recv_timeout(CONNECT_TIMEOUT * 2)
            .context("the scripted Core did not report its Link")?;
        let mut core = Self {
            stop,
            thread: Some(thread),
        };
        if let Err(error) = opened {
            core.stop();
            return Err(error);
        }
        Ok(core)
    }

    /// Closes the Link and waits for the thread.
    pub fn stop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for ScriptedEdgeCore {
    fn drop(&mut self) {
        self.stop();
    }
}
