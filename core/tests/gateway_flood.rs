//! A gateway that floods Core: a role change in every status and more MFA
//! removals than a status may carry. Core (in-process) links to a scripted
//! gateway over real mutual TLS on loopback; what the gateway sends costs
//! the state thread a bounded number of event writes.

use std::{
    net::SocketAddr,
    path::Path,
    pin::Pin,
    time::{Duration, Instant},
};

use futures::Stream;
use tidegate_core::{
    config::{Config, Overrides},
    daemon::Core,
    links::budget,
    pki::{self, PkiDir},
};
use tidegate_proto::{
    admin::v1::{self as admin, admin_client::AdminClient},
    gateway::v1::{self as pb, gateway_message::Msg, gateway_server},
    limits,
    tls::{Pki, tls_incoming},
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming, transport::Channel};

/// Statuses the gateway sends, each flipping its role.
const FLIPS: usize = 300;

fn config(dir: &Path) -> Config {
    let pki = PkiDir::new(dir.join("pki"));
    pki::init(&pki).unwrap();
    let text = format!(
        "database = {:?}\nadmin_socket = {:?}\n[tls]\ndir = {:?}\n[links]\nreconnect_min_ms = 50\nreconnect_max_ms = 200\n",
        dir.join("db/core.db"),
        dir.join("run/core.sock"),
        pki.dir(),
    );
    Config::parse(&dir.join("core.toml"), &text, Overrides::default()).unwrap()
}

/// A gateway that answers Hello and Applied, then sends `FLIPS` statuses,
/// each with another role and a full share of made-up MFA removals.
struct Flooding {
    done: mpsc::Sender<u64>,
}

type Out = Pin<Box<dyn Stream<Item = Result<pb::GatewayMessage, Status>> + Send>>;

#[tonic::async_trait]
impl gateway_server::Gateway for Flooding {
    type LinkStream = Out;

    async fn link(
        &self,
        request: Request<Streaming<pb::CoreMessage>>,
    ) -> Result<Response<Out>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let done = self.done.clone();
        tokio::spawn(async move {
            let send = |msg| tx.send(Ok(pb::GatewayMessage { msg: Some(msg) }));
            let _ = send(Msg::Hello(pb::Hello {
                gateway_id: 1,
                ..Default::default()
            }))
            .await;
            let Some(Ok(first)) = inbound.next().await else {
                return;
            };
            if let Some(pb::core_message::Msg::Config(config)) = first.msg {
                let _ = send(Msg::Applied(pb::Applied {
                    version: config.version,
                    error: String::new(),
                }))
                .await;
            }
            let removals: Vec<pb::MfaRemoval> = (1..=limits::MAX_REMOVALS_PER_STATUS as u64 * 4)
                .map(|seq| pb::MfaRemoval {
                    public_key: vec![7; 32],
                    at_unix_ms: 1,
                    reason: "inactive".into(),
                    seq,
                })
                .collect();
            for n in 0..FLIPS {
                let role = if n % 2 == 0 { "backup" } else { "master" };
                let status = pb::Status {
                    ha: Some(pb::HaStatus {
                        role: role.into(),
                        ..Default::default()
                    }),
                    removals: removals.clone(),
                    at_unix_ms: 1,
                    ..Default::default()
                };
                if send(Msg::Status(status)).await.is_err() {
                    return;
                }
            }
            // Core's acknowledgements: the last says how far it got.
            let mut acked = 0;
            while let Ok(Some(Ok(message))) =
                tokio::time::timeout(Duration::from_secs(2), inbound.next()).await
            {
                if let Some(pb::core_message::Msg::RemovalsAcked(ack)) = message.msg {
                    acked = acked.max(ack.through_seq);
                }
            }
            let _ = done.send(acked).await;
            // Hold the link open until Core closes it.
            let _ = inbound.next().await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

async fn admin_client(config: &Config) -> AdminClient<Channel> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("unix:{}", config.admin_socket.display()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    AdminClient::new(channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_flipping_its_role_in_every_status_writes_a_bounded_number_of_events() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let pki_dir = PkiDir::new(dir.path().join("pki"));
    let issued = pki::issue(&pki_dir, "gw-a", &dir.path().join("gw-a"), 30).unwrap();
    let pki = Pki::load_as(&pki_dir.ca_cert(), &issued.cert, &issued.key, Some("gw-a")).unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    let (done, mut finished) = mpsc::channel(4);
    let incoming = tls_incoming(
        pki.server().unwrap(),
        tokio_stream::wrappers::TcpListenerStream::new(listener),
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                gateway_server::GatewayServer::new(Flooding { done })
                    .max_decoding_message_size(limits::MAX_CONFIG_BYTES),
            )
            .serve_with_incoming(incoming),
    );

    let core = Core::start(config.clone()).await.unwrap();
    let started = Instant::now();
    let mut api = admin_client(&config).await;
    api.create_location(admin::CreateLocationRequest {
        name: "ams".into(),
        addresses: vec!["10.77.0.1/24".into()],
        vips: vec!["198.51.100.100".into()],
        mfa: true,
        ..Default::default()
    })
    .await
    .unwrap();
    api.create_gateway(admin::CreateGatewayRequest {
        name: "gw-a".into(),
        location: "ams".into(),
        address: addr.to_string(),
        ..Default::default()
    })
    .await
    .unwrap();

    let acked = tokio::time::timeout(Duration::from_secs(60), finished.recv())
        .await
        .expect("the flood did not end within 60 s")
        .unwrap();
    let events = api
        .list_events(admin::ListEventsRequest {
            location: "ams".into(),
            limit: 10_000,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    // The burst, and one more event for each refill period the flood took
    // (a slow machine takes longer than one).
    let refills = started.elapsed().as_millis() / budget::REFILL_MS as u128;
    let allowed = budget::BURST as usize + refills as usize;
    let of_gateway = events.iter().filter(|e| e.subject == "gw-a").count();
    let flips = events.iter().filter(|e| e.kind == "role-change").count();
    assert!(
        of_gateway <= allowed && flips > 0,
        "{FLIPS} role flips wrote {flips} role-change events, {of_gateway} of the gateway in all \
         (at most {allowed} allowed)"
    );
    // Every removal handled a status at most its share: the flood's
    // statuses each carried four shares, Core acknowledged one per status.
    assert!(
        acked >= limits::MAX_REMOVALS_PER_STATUS as u64
            && acked <= limits::MAX_REMOVALS_PER_STATUS as u64 * 4,
        "acknowledged through {acked}"
    );
    core.stop().await.unwrap();
}
