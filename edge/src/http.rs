//! The public HTTP API: routes, body limits, the client's address behind a
//! trusted proxy, and the wait for Core's reply. Each request is checked
//! here and relayed only when it is well formed.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{ConnectInfo, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use http_body_util::LengthLimitError;
use serde::de::DeserializeOwned;
use tidegate_proto::{
    certs::ReloadingCert,
    edge::v1::request::Kind,
    expiry::{self, CertStatus},
};
use tracing::{debug, info};

use crate::{
    api::{self, ApiError, ConfigRequest, EnrolRequest, Expect, MfaFinishRequest, MfaStartRequest},
    relay::{LinkState, RelayError, RelayHandle},
};

/// The settings each request reads as they are when it arrives: a reload
/// (SIGHUP) changes them for the requests to come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSettings {
    pub body_limit: usize,
    pub core_timeout: Duration,
    /// How long a request has to send its body before 408.
    pub body_timeout: Duration,
    pub trusted_proxies: Arc<[IpAddr]>,
    pub real_ip_header: HeaderName,
}

impl RequestSettings {
    /// The settings of a validated config.
    pub fn of(config: &crate::config::Config) -> Result<Self, header::InvalidHeaderName> {
        Ok(Self {
            body_limit: config.body_limit,
            core_timeout: config.core_timeout,
            body_timeout: config.body_timeout,
            trusted_proxies: Arc::from(config.trusted_proxies.clone()),
            real_ip_header: HeaderName::from_bytes(config.real_ip_header.as_bytes())?,
        })
    }
}

/// What every handler needs.
#[derive(Debug, Clone)]
pub struct AppState {
    pub relay: RelayHandle,
    /// The request settings in force.
    pub settings: tokio::sync::watch::Receiver<Arc<RequestSettings>>,
    /// The link certificate, whose expiry `/health` shows (none in tests
    /// of the API alone).
    pub cert: Option<ReloadingCert>,
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/api/v1/device-config", post(device_config))
        .route("/api/v1/enrol", post(enrol))
        .route("/api/v1/mfa/start", post(mfa_start))
        .route("/api/v1/mfa/finish", post(mfa_finish))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// A JSON answer nobody may cache (device configs carry keys).
fn json(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut response = (status, body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn error(error: &ApiError) -> Response {
    let mut response = json(error.status, &error.body());
    if let Some(seconds) = error.retry_after_s {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn health(State(state): State<AppState>) -> Response {
    let (status, mut body) = match state.relay.state() {
        LinkState::Up {
            core_id,
            since,
            leader,
            term,
        } => (
            StatusCode::OK,
            serde_json::json!({
                "status": "ok",
                "core": core_id,
                "since": unix_secs(since),
                "leader": leader,
                "term": term,
            }),
        ),
        LinkState::Down { reason, since } => (
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({
                "status": "unavailable",
                "error": format!("no link to Core: {reason}"),
                "since": unix_secs(since),
            }),
        ),
    };
    if let Some(cert) = &state.cert {
        let info = &cert.current().info;
        let expiry = CertStatus::new(cert.cert_path(), info, expiry::now_unix());
        // When, not where: the body may reach the public through nginx.
        body["certificate"] = serde_json::json!({
            "expiry": expiry.expiry,
            "days_left": expiry.days_left,
            "not_after": expiry.not_after_unix,
        });
    }
    json(status, &body)
}

async fn not_found() -> Response {
    error(&ApiError::new(
        StatusCode::NOT_FOUND,
        "not-found",
        "no such endpoint; see /health, /api/v1/device-config, /api/v1/enrol, /api/v1/mfa/start, /api/v1/mfa/finish",
    ))
}

async fn method_not_allowed() -> Response {
    error(&ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "method not allowed: the API takes POST with a JSON body, /health takes GET",
    ))
}

async fn device_config(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    relay(&state, peer, &headers, body, ConfigRequest::into_kind).await
}

async fn enrol(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    relay(&state, peer, &headers, body, EnrolRequest::into_kind).await
}

async fn mfa_start(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    relay(&state, peer, &headers, body, MfaStartRequest::into_kind).await
}

async fn mfa_finish(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    relay(&state, peer, &headers, body, MfaFinishRequest::into_kind).await
}

/// Reads and checks the body, relays it, and answers with Core's reply.
async fn relay<T: DeserializeOwned>(
    state: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: Body,
    into_kind: fn(T) -> Result<Kind, ApiError>,
) -> Response {
    let settings = Arc::clone(&state.settings.borrow());
    let client = client_addr(&settings, peer.ip(), headers);
    let kind = match read_body(settings.body_limit, settings.body_timeout, headers, body)
        .await
        .and_then(|bytes| api::parse::<T>(&bytes))
        .and_then(into_kind)
    {
        Ok(kind) => kind,
        Err(refused) => {
            debug!(%client, status = %refused.status, message = %refused.message, "request refused");
            return error(&refused);
        }
    };
    let expect = Expect::of(&kind);
    let waited = tokio::time::timeout(
        settings.core_timeout,
        state
            .relay
            .request(kind, client.to_string(), settings.core_timeout),
    )
    .await;
    let outcome = match waited {
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "Core did not answer within {} ms",
                settings.core_timeout.as_millis()
            ),
        )),
        Ok(Err(relay_error)) => Err(unavailable(&relay_error)),
        Ok(Ok(reply)) => api::answer(expect, reply),
    };
    match outcome {
        Ok(body) => {
            info!(%client, ?expect, "answered");
            json(StatusCode::OK, &body)
        }
        Err(refused) => {
            info!(%client, status = %refused.status, message = %refused.message, "refused");
            error(&refused)
        }
    }
}

/// A request Core did not answer: 503, and with no Core leading (a
/// takeover under way) a code of its own and `Retry-After: 1`.
fn unavailable(relay_error: &RelayError) -> ApiError {
    let code = match relay_error {
        RelayError::NoLeader => "no-leader",
        _ => "unavailable",
    };
    let mut error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        code,
        relay_error.to_string(),
    );
    if *relay_error == RelayError::NoLeader {
        error.retry_after_s = Some(1);
    }
    error
}

/// The body, at most `limit` bytes (413 beyond), within `timeout` (408
/// after).
async fn read_body(
    limit: usize,
    timeout: Duration,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!("the request body is larger than {limit} bytes"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    let read = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!(
                    "the request body did not arrive within {} ms",
                    timeout.as_millis()
                ),
            )
        })?;
    read.map_err(|e| {
        let inner = e.into_inner();
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(inner.as_ref());
        while let Some(error) = source {
            if error.is::<LengthLimitError>() {
                return too_large();
            }
            source = error.source();
        }
        ApiError::invalid(format!("reading the request body: {inner}"))
    })
}

/// The client's address: the peer's, or, when the peer is a trusted proxy
/// that names the client in the real-IP header, that one.
pub fn client_addr(settings: &RequestSettings, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let peer = peer.to_canonical();
    if !settings.trusted_proxies.contains(&peer) {
        return peer;
    }
    headers
        .get(&settings.real_ip_header)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse::<IpAddr>().ok())
        .unwrap_or(peer)
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::relay;

    fn state(trusted: &[&str]) -> AppState {
        let (relay, _task) = relay::spawn(CancellationToken::new());
        let settings = RequestSettings {
            body_limit: 1024,
            core_timeout: Duration::from_secs(1),
            body_timeout: Duration::from_secs(1),
            trusted_proxies: trusted.iter().map(|a| a.parse().unwrap()).collect(),
            real_ip_header: HeaderName::from_static("x-real-ip"),
        };
        AppState {
            relay,
            settings: tokio::sync::watch::channel(Arc::new(settings)).1,
            cert: None,
        }
    }

    #[tokio::test]
    async fn the_real_ip_header_counts_only_from_a_trusted_proxy() {
        let state = Arc::clone(&state(&["127.0.0.1"]).settings.borrow());
        let mut headers = HeaderMap::new();
        headers.insert("x-real-ip", HeaderValue::from_static("198.51.100.7"));
        let proxy: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            client_addr(&state, proxy, &headers),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_addr(&state, other, &headers), other);
        // An IPv4-mapped proxy address is the same proxy.
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(
            client_addr(&state, mapped, &headers),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        headers.insert("x-real-ip", HeaderValue::from_static("not an address"));
        assert_eq!(client_addr(&state, proxy, &headers), proxy);
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn no_leader_is_a_clear_503_to_retry() {
        let error = unavailable(&RelayError::NoLeader);
        assert_eq!(
            (error.status, error.code, error.retry_after_s),
            (StatusCode::SERVICE_UNAVAILABLE, "no-leader", Some(1))
        );
        assert_eq!(
            error.body()["error"]["message"],
            "No Core leads right now (a takeover is under way); try again in a second."
        );
        let response = super::error(&error);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let lost = unavailable(&RelayError::LinkLost);
        assert_eq!(
            (lost.status, lost.code),
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        );
    }

    #[tokio::test]
    async fn a_body_that_does_not_come_is_408() {
        use futures::StreamExt as _;
        // Part of a body, then nothing.
        let part = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(b"{\"tok"))]);
        let body = Body::from_stream(part.chain(futures::stream::pending()));
        let error = read_body(1024, Duration::from_millis(50), &HeaderMap::new(), body)
            .await
            .unwrap_err();
        assert_eq!(error.status, StatusCode::REQUEST_TIMEOUT);
        assert_eq!(error.body()["error"]["code"], "timeout");
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_413() {
        let headers = HeaderMap::new();
        let error = read_body(16, SECOND, &headers, Body::from(vec![b'x'; 17]))
            .await
            .unwrap_err();
        assert_eq!(error.status, StatusCode::PAYLOAD_TOO_LARGE);
        let mut declared = HeaderMap::new();
        declared.insert(header::CONTENT_LENGTH, HeaderValue::from_static("1000"));
        let error = read_body(16, SECOND, &declared, Body::from("{}"))
            .await
            .unwrap_err();
        assert_eq!(error.status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(
            read_body(16, SECOND, &headers, Body::from("{}"))
                .await
                .unwrap(),
            "{}"
        );
    }
}
