//! The Edge's client API over HTTPS: enrolment, MFA logins, and every
//! refusal the Edge can answer, kept with its code and message.

use std::{fmt, path::Path, time::Duration};

use reqwest::{StatusCode, Url, header::RETRY_AFTER};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::retry::{self, Failure};

/// How long one request may take, the Edge's own wait for Core included
/// (its default is 15 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to the Edge may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A device's WireGuard config as the Edge answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    pub device: String,
    pub location: String,
    pub addresses: Vec<String>,
    #[serde(default)]
    pub dns: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    pub server_public_key: String,
    /// On an MFA location, only in a login's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preshared_key: Option<String>,
    pub endpoint: String,
    pub allowed_ips: Vec<String>,
    pub persistent_keepalive: u32,
    /// The location needs an MFA login for each session.
    #[serde(default)]
    pub mfa: bool,
    /// A login's answer on a location whose sessions end by age: seconds
    /// until Core ends this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_expires_in_s: Option<u32>,
}

/// An MFA login in progress.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Challenge {
    pub session: String,
    pub expires_in_s: u32,
}

/// What the Edge refused, as its body says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    /// The Edge's error code: `unauthorized`, `limited`, `expired`, ...
    pub code: String,
    pub message: String,
    /// 429: seconds until a new try may go ahead.
    pub retry_after_s: Option<u64>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({} {})", self.message, self.status, self.code)?;
        if let Some(s) = self.retry_after_s {
            write!(f, "; try again in {s} s")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}: not an http:// or https:// URL")]
    Url(String),
    #[error("reading the CA file {path}")]
    CaFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA file {0} holds no certificate")]
    NoCertificate(String),
    #[error("setting up TLS")]
    Tls(#[source] reqwest::Error),
    #[error("choosing TLS versions")]
    TlsVersions(#[source] rustls::Error),
    #[error("the Edge at {url} cannot be reached")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the Edge refused: {0}")]
    Refused(Refusal),
    #[error("the Edge answered {status} with a body that is not {what}: {body}")]
    Malformed {
        status: u16,
        what: &'static str,
        body: String,
    },
}

impl ApiError {
    /// What this failure means for another try (see [`retry::next`]).
    pub fn failure(&self) -> Failure {
        match self {
            Self::Unreachable { source, .. } if source.is_builder() || is_tls(source) => {
                Failure::Final
            }
            Self::Unreachable { .. } => Failure::Transport,
            Self::Refused(refusal) => Failure::Status {
                status: refusal.status,
                retry_after_s: refusal.retry_after_s,
            },
            Self::Url(_)
            | Self::CaFile { .. }
            | Self::NoCertificate(_)
            | Self::Tls(_)
            | Self::TlsVersions(_)
            | Self::Malformed { .. } => Failure::Final,
        }
    }
}

/// The error, or one of its causes, is TLS's (an untrusted or wrong
/// certificate): trying again would meet it again.
fn is_tls(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<rustls::Error>() {
            return true;
        }
        // io::Error's source skips the error it wraps: look inside.
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        cause = error.source();
    }
    false
}

/// One Edge (or nginx in front of several).
#[derive(Debug, Clone)]
pub struct Edge {
    base: Url,
    http: reqwest::Client,
}

impl Edge {
    /// The Edge at `url`, trusting the system's CAs and `ca_pem` (for a
    /// private CA). `http://` is taken only as written.
    pub fn new(url: &str, ca_pem: Option<&str>) -> Result<Self, ApiError> {
        let base = parse_url(url)?;
        let mut roots = rustls::RootCertStore::empty();
        // A system without a CA bundle still works with ca_pem alone.
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        if let Some(pem) = ca_pem {
            let certs = pem_certificates(pem);
            if certs.is_empty() {
                return Err(ApiError::NoCertificate("given".into()));
            }
            roots.add_parsable_certificates(certs);
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ApiError::TlsVersions)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("tidegate-client/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ApiError::Tls)?;
        Ok(Self { base, http })
    }

    /// The URL the Edge is reached at.
    pub fn url(&self) -> &str {
        self.base.as_str()
    }

    /// Registers `public_key` for the device the token stands for, and
    /// downloads its config. A transient failure (the connection, a 502,
    /// 503 or 504) is tried again on [`retry::next`]'s schedule, with the
    /// same key: Core answers a retried enrolment again (its answer may
    /// have been lost with an Edge). `on_retry` hears of each retry (the
    /// try that failed, the wait, the failure); the error is the last
    /// try's.
    pub async fn enrol(
        &self,
        token: &str,
        public_key: &str,
        mut on_retry: impl FnMut(&Retrying<'_>),
    ) -> Result<DeviceConfig, ApiError> {
        let body = serde_json::json!({"token": token, "public_key": public_key});
        let mut tried = 0;
        loop {
            tried += 1;
            let error = match self.post("api/v1/enrol", &body, "a device config").await {
                Ok(config) => return Ok(config),
                Err(error) => error,
            };
            let failure = error.failure();
            let retry::Next::Retry(wait) = retry::next(tried, failure) else {
                return Err(error);
            };
            on_retry(&Retrying {
                tried,
                wait,
                reason: failure.transient_reason().unwrap_or("a transient failure"),
                error: &error,
            });
            tokio::time::sleep(wait).await;
        }
    }

    /// Starts an MFA login of the device with `public_key`.
    pub async fn mfa_start(&self, location: &str, public_key: &str) -> Result<Challenge, ApiError> {
        let body = serde_json::json!({"location": location, "public_key": public_key});
        self.post("api/v1/mfa/start", &body, "an MFA challenge")
            .await
    }

    /// Finishes an MFA login with the code: the config with the session's
    /// preshared key.
    pub async fn mfa_finish(&self, session: &str, code: &str) -> Result<DeviceConfig, ApiError> {
        let body = serde_json::json!({"session": session, "code": code});
        self.post("api/v1/mfa/finish", &body, "a device config")
            .await
    }

    async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
        what: &'static str,
    ) -> Result<T, ApiError> {
        let url = self
            .base
            .join(path)
            .map_err(|_| ApiError::Url(path.into()))?;
        let unreachable = |source| ApiError::Unreachable {
            url: url.to_string(),
            source,
        };
        let answer = self
            .http
            .post(url.clone())
            .json(body)
            .send()
            .await
            .map_err(unreachable)?;
        let status = answer.status();
        let retry_after_s = answer
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let bytes = answer.bytes().await.map_err(unreachable)?;
        read_answer(status, retry_after_s, &bytes, what)
    }
}

/// A failed try about to be made again.
#[derive(Debug)]
pub struct Retrying<'a> {
    /// The try that failed (1-based).
    pub tried: u32,
    /// The wait before the next.
    pub wait: Duration,
    /// Why another may work.
    pub reason: &'static str,
    pub error: &'a ApiError,
}

impl fmt::Display for Retrying<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "try {} of {} failed ({}): {}; trying again in {:.1} s",
            self.tried,
            retry::TRIES,
            self.reason,
            tidegate_proto::error_chain(self.error),
            self.wait.as_secs_f64()
        )
    }
}

/// The base URL, with a trailing slash so paths join under it.
fn parse_url(url: &str) -> Result<Url, ApiError> {
    let mut parsed = Url::parse(url.trim()).map_err(|_| ApiError::Url(url.into()))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(ApiError::Url(url.into()));
    }
    if !parsed.path().ends_with('/') {
        let path = format!("{}/", parsed.path());
        parsed.set_path(&path);
    }
    Ok(parsed)
}

/// The certificates of a PEM text.
fn pem_certificates(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .filter_map(Result::ok)
        .collect()
}

/// Reads a CA file, checking it holds a certificate.
pub fn read_ca(path: &Path) -> Result<String, ApiError> {
    let text = std::fs::read_to_string(path).map_err(|source| ApiError::CaFile {
        path: path.display().to_string(),
        source,
    })?;
    if pem_certificates(&text).is_empty() {
        return Err(ApiError::NoCertificate(path.display().to_string()));
    }
    Ok(text)
}

/// An answer: the value on 200, else the Edge's refusal. Pure.
fn read_answer<T: DeserializeOwned>(
    status: StatusCode,
    retry_after_s: Option<u64>,
    body: &[u8],
    what: &'static str,
) -> Result<T, ApiError> {
    let text = || String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    if status == StatusCode::OK {
        return serde_json::from_slice(body).map_err(|_| ApiError::Malformed {
            status: status.as_u16(),
            what,
            body: text(),
        });
    }
    #[derive(Deserialize)]
    struct ErrorBody {
        error: ErrorFields,
    }
    #[derive(Deserialize)]
    struct ErrorFields {
        code: String,
        message: String,
    }
    let refusal = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => Refusal {
            status: status.as_u16(),
            code: error.code,
            message: error.message,
            retry_after_s,
        },
        // nginx's own pages (502, 504 with no Edge up) are HTML.
        Err(_) => Refusal {
            status: status.as_u16(),
            code: match status.as_u16() {
                502..=504 => "unavailable".into(),
                _ => "http".into(),
            },
            message: format!(
                "{} from the server in front of the Edges",
                status.canonical_reason().unwrap_or("an error")
            ),
            retry_after_s,
        },
    };
    Err(ApiError::Refused(refusal))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A server on the loopback that answers each connection's request
    /// with the next of `answers` (status, body), and hands back the
    /// requests' bodies once it answered them all.
    async fn scripted(
        answers: Vec<(u16, &'static str)>,
    ) -> (String, tokio::task::JoinHandle<Vec<String>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut bodies = Vec::new();
            for (status, body) in answers {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                let body_start = loop {
                    let n = conn.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the request ended early");
                    request.extend_from_slice(&buf[..n]);
                    if let Some(at) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                        break at + 4;
                    }
                };
                let head = String::from_utf8_lossy(&request[..body_start]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                while request.len() < body_start + length {
                    let n = conn.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the body ended early");
                    request.extend_from_slice(&buf[..n]);
                }
                bodies.push(String::from_utf8_lossy(&request[body_start..]).into_owned());
                let answer = format!(
                    "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(answer.as_bytes()).await.unwrap();
                conn.shutdown().await.unwrap();
            }
            bodies
        });
        (url, server)
    }

    const CONFIG: &str = r#"{"device":"laptop","location":"lab","addresses":["10.8.0.2/32"],
        "server_public_key":"k","endpoint":"198.51.100.100:51820","allowed_ips":["10.8.0.0/24"],
        "persistent_keepalive":25}"#;

    #[tokio::test]
    async fn an_enrolment_is_tried_again_with_the_same_key_after_transient_failures() {
        let (url, server) = scripted(vec![
            (502, "<html>Bad Gateway</html>"),
            (
                503,
                r#"{"error":{"code":"unavailable","message":"no Core"}}"#,
            ),
            (200, CONFIG),
        ])
        .await;
        let edge = Edge::new(&url, None).unwrap();
        let mut heard = Vec::new();
        let config = edge
            .enrol("token", "key", |r| heard.push((r.tried, r.wait, r.reason)))
            .await
            .unwrap();
        assert_eq!(config.device, "laptop");
        assert_eq!(
            heard,
            [
                (1, Duration::from_millis(500), "bad gateway (502)"),
                (2, Duration::from_millis(1000), "unavailable (503)"),
            ]
        );
        let bodies = server.await.unwrap();
        let first: serde_json::Value = serde_json::from_str(&bodies[0]).unwrap();
        assert_eq!(first["public_key"], "key");
        assert!(bodies.iter().all(|b| *b == bodies[0]), "{bodies:?}");
    }

    #[tokio::test]
    async fn a_refused_enrolment_is_not_tried_again() {
        let (url, server) = scripted(vec![(
            401,
            r#"{"error":{"code":"unauthorized","message":"token: used already"}}"#,
        )])
        .await;
        let edge = Edge::new(&url, None).unwrap();
        let mut retries = 0;
        let error = edge
            .enrol("token", "key", |_| retries += 1)
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ApiError::Refused(r) if r.code == "unauthorized"),
            "{error:?}"
        );
        assert_eq!(retries, 0);
        assert_eq!(server.await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn what_a_failure_means_for_another_try() {
        // A port nothing listens on: the connection is refused.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let refused = Edge::new(&url, None)
            .unwrap()
            .post::<DeviceConfig>("api/v1/enrol", &serde_json::json!({}), "x")
            .await
            .unwrap_err();
        assert!(
            matches!(refused, ApiError::Unreachable { .. }),
            "{refused:?}"
        );
        let refusal = |status, retry_after_s| {
            ApiError::Refused(Refusal {
                status,
                code: "x".into(),
                message: "x".into(),
                retry_after_s,
            })
        };
        let cases = [
            ("a refused connection", refused, Failure::Transport),
            (
                "an answer",
                refusal(503, Some(2)),
                Failure::Status {
                    status: 503,
                    retry_after_s: Some(2),
                },
            ),
            (
                "a malformed answer",
                ApiError::Malformed {
                    status: 200,
                    what: "x",
                    body: String::new(),
                },
                Failure::Final,
            ),
            ("a bad URL", ApiError::Url("x".into()), Failure::Final),
        ];
        for (name, error, want) in cases {
            assert_eq!(error.failure(), want, "{name}");
        }
        // An untrusted certificate, however deep in the causes.
        #[derive(Debug, thiserror::Error)]
        #[error("connecting")]
        struct Wrapper(#[source] std::io::Error);
        let bad_cert = Wrapper(std::io::Error::other(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        )));
        assert!(is_tls(&bad_cert));
        assert!(!is_tls(&Wrapper(std::io::Error::other("reset"))));
    }

    #[test]
    fn urls_join_under_the_base() {
        for (given, joined) in [
            (
                "https://vpn.example.com",
                "https://vpn.example.com/api/v1/enrol",
            ),
            (
                "https://vpn.example.com/",
                "https://vpn.example.com/api/v1/enrol",
            ),
            (
                "https://203.0.113.5:8443/tidegate",
                "https://203.0.113.5:8443/tidegate/api/v1/enrol",
            ),
            (
                "http://198.51.100.60:8080",
                "http://198.51.100.60:8080/api/v1/enrol",
            ),
        ] {
            let base = parse_url(given).unwrap();
            assert_eq!(
                base.join("api/v1/enrol").unwrap().as_str(),
                joined,
                "{given}"
            );
        }
        for bad in ["vpn.example.com", "ftp://vpn.example.com", "https://", ""] {
            assert!(matches!(parse_url(bad), Err(ApiError::Url(_))), "{bad}");
        }
    }

    #[test]
    fn every_answer_becomes_a_value_or_a_refusal() {
        let config = br#"{"device":"laptop","location":"lab","addresses":["10.8.0.2/32"],"dns":[],
            "server_public_key":"k","endpoint":"198.51.100.100:51820","allowed_ips":["10.8.0.0/24"],
            "persistent_keepalive":25,"mfa":true,"session_expires_in_s":3600,"preshared_key":"p"}"#;
        let ok: DeviceConfig =
            read_answer(StatusCode::OK, None, config, "a device config").unwrap();
        assert_eq!(
            (ok.mfa, ok.session_expires_in_s, ok.mtu),
            (true, Some(3600), None)
        );
        let refused = |status: u16, retry: Option<u64>, body: &[u8]| match read_answer::<DeviceConfig>(
            StatusCode::from_u16(status).unwrap(),
            retry,
            body,
            "x",
        ) {
            Err(ApiError::Refused(r)) => r,
            other => panic!("{status}: {other:?}"),
        };
        let limited = refused(
            429,
            Some(60),
            br#"{"error":{"code":"limited","message":"too many wrong codes"}}"#,
        );
        assert_eq!(
            (limited.code.as_str(), limited.retry_after_s),
            ("limited", Some(60))
        );
        assert_eq!(
            limited.to_string(),
            "too many wrong codes (429 limited); try again in 60 s"
        );
        let nginx = refused(502, None, b"<html>Bad Gateway</html>");
        assert_eq!(nginx.code, "unavailable");
        let teapot = refused(418, None, b"");
        assert_eq!(teapot.code, "http");
        assert!(matches!(
            read_answer::<DeviceConfig>(StatusCode::OK, None, b"{}", "a device config"),
            Err(ApiError::Malformed {
                what: "a device config",
                ..
            })
        ));
    }
}
