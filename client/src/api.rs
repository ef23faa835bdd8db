//! The Edge's client API over HTTPS: enrolment, MFA logins, and every
//! refusal the Edge can answer, kept with its code and message.

use std::{fmt, path::Path, time::Duration};

use reqwest::{StatusCode, Url, header::RETRY_AFTER};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

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
    /// downloads its config.
    pub async fn enrol(&self, token: &str, public_key: &str) -> Result<DeviceConfig, ApiError> {
        let body = serde_json::json!({"token": token, "public_key": public_key});
        self.post("api/v1/enrol", &body, "a device config").await
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
