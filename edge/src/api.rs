//! The client API's JSON: the requests, checked before anything is relayed,
//! Core's replies as HTTP answers, and the errors. Pure: no I/O.

use axum::http::StatusCode;
use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tidegate_proto::edge::v1::{
    self as pb, error::Code, reply::Result as ReplyResult, request::Kind,
};

/// Longest token, session or location name accepted.
const MAX_TEXT: usize = 512;

/// `POST /api/v1/device-config`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigRequest {
    pub token: String,
}

/// `POST /api/v1/mfa/start`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MfaStartRequest {
    pub location: String,
    /// The device's WireGuard public key, base64.
    pub public_key: String,
}

/// `POST /api/v1/enrol`: a device awaiting its key brings the one its
/// client made, with the operator's one-time token.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrolRequest {
    pub token: String,
    /// The device's WireGuard public key, base64.
    pub public_key: String,
}

/// `POST /api/v1/mfa/finish`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MfaFinishRequest {
    pub session: String,
    /// The TOTP code: 6 to 8 digits.
    pub code: String,
}

/// An answer that is not a success: its HTTP status and a JSON body
/// `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// 429: seconds until the client may try again (`Retry-After`).
    pub retry_after_s: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after_s: None,
        }
    }

    /// A malformed or incomplete request: 400.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid", message)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code, "message": self.message}})
    }
}

/// Parses a JSON request body; the error says what is wrong with it.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid(
            "the request has no body; send a JSON object",
        ));
    }
    serde_json::from_slice(body).map_err(|error| {
        let what = if error.is_syntax() || error.is_eof() {
            "malformed JSON"
        } else {
            "invalid request"
        };
        ApiError::invalid(format!("{what}: {error}"))
    })
}

fn text(field: &str, value: &str) -> Result<String, ApiError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(ApiError::invalid(format!("{field}: empty")));
    }
    if value.len() > MAX_TEXT {
        return Err(ApiError::invalid(format!(
            "{field}: {} bytes; at most {MAX_TEXT}",
            value.len()
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(format!(
            "{field}: contains control characters"
        )));
    }
    Ok(value.to_owned())
}

impl ConfigRequest {
    /// The request for Core.
    pub fn into_kind(self) -> Result<Kind, ApiError> {
        Ok(Kind::Config(pb::ConfigDownload {
            token: text("token", &self.token)?,
        }))
    }
}

/// A WireGuard public key, in canonical base64.
fn public_key(text: &str) -> Result<String, ApiError> {
    let key = STANDARD.decode(text.trim()).map_err(|_| {
        ApiError::invalid(
            "public_key: not valid base64 (a WireGuard public key, as `wg pubkey` prints it)",
        )
    })?;
    if key.len() != 32 {
        return Err(ApiError::invalid(format!(
            "public_key: decodes to {} bytes; a WireGuard key is 32",
            key.len()
        )));
    }
    Ok(STANDARD.encode(key))
}

impl MfaStartRequest {
    /// The request for Core, with the key in canonical base64.
    pub fn into_kind(self) -> Result<Kind, ApiError> {
        let location = text("location", &self.location)?;
        Ok(Kind::MfaStart(pb::MfaStart {
            location,
            public_key: public_key(&self.public_key)?,
        }))
    }
}

impl EnrolRequest {
    /// The request for Core, with the key in canonical base64.
    pub fn into_kind(self) -> Result<Kind, ApiError> {
        Ok(Kind::Enrol(pb::Enrol {
            token: text("token", &self.token)?,
            public_key: public_key(&self.public_key)?,
        }))
    }
}

impl MfaFinishRequest {
    /// The request for Core.
    pub fn into_kind(self) -> Result<Kind, ApiError> {
        let session = text("session", &self.session)?;
        let code = self.code.trim();
        if !(6..=8).contains(&code.len()) || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ApiError::invalid(
                "code: give the 6 to 8 digits of the TOTP code",
            ));
        }
        Ok(Kind::MfaFinish(pb::MfaFinish {
            session,
            code: code.to_owned(),
        }))
    }
}

/// What a request expects back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Config,
    Challenge,
}

impl Expect {
    /// What `kind` expects: a config for a download, an enrolment and an
    /// MFA finish, a challenge for an MFA start.
    pub fn of(kind: &Kind) -> Self {
        match kind {
            Kind::Config(_) | Kind::Enrol(_) | Kind::MfaFinish(_) => Self::Config,
            Kind::MfaStart(_) => Self::Challenge,
        }
    }
}

/// A device config as the client gets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    pub device: String,
    pub location: String,
    pub addresses: Vec<String>,
    pub dns: Vec<String>,
    /// Absent: the client's default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    pub server_public_key: String,
    /// Absent: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preshared_key: Option<String>,
    pub endpoint: String,
    pub allowed_ips: Vec<String>,
    pub persistent_keepalive: u32,
    /// The location needs an MFA login (mfa/start, mfa/finish) for the
    /// preshared key.
    pub mfa: bool,
    /// On an MFA finish: seconds until Core ends the session by its age.
    /// Absent: no such end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_expires_in_s: Option<u32>,
}

/// An MFA challenge as the client gets it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    pub session: String,
    pub expires_in_s: u32,
}

/// The HTTP status of Core's error code.
pub fn status_of(code: Code) -> (StatusCode, &'static str) {
    match code {
        Code::Invalid => (StatusCode::BAD_REQUEST, "invalid"),
        Code::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
        Code::NotFound => (StatusCode::NOT_FOUND, "not-found"),
        Code::Expired => (StatusCode::GONE, "expired"),
        Code::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        Code::Limited => (StatusCode::TOO_MANY_REQUESTS, "limited"),
        Code::Conflict => (StatusCode::CONFLICT, "conflict"),
        Code::Internal | Code::Unspecified => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

/// Core's reply as an HTTP status and JSON body.
pub fn answer(expect: Expect, reply: pb::Reply) -> Result<serde_json::Value, ApiError> {
    let unexpected = |what: &str| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "bad-gateway",
            format!("Core answered with {what}, not what the request asks for"),
        )
    };
    match (expect, reply.result) {
        (Expect::Config, Some(ReplyResult::Config(config))) => {
            Ok(serde_json::to_value(DeviceConfig {
                device: config.device,
                location: config.location,
                addresses: config.addresses,
                dns: config.dns,
                mtu: Some(config.mtu).filter(|&m| m != 0),
                server_public_key: config.server_public_key,
                preshared_key: Some(config.preshared_key).filter(|p| !p.is_empty()),
                endpoint: config.endpoint,
                allowed_ips: config.allowed_ips,
                persistent_keepalive: config.persistent_keepalive_s,
                mfa: config.mfa,
                session_expires_in_s: Some(config.session_expires_in_s).filter(|&s| s != 0),
            })
            .unwrap_or_default())
        }
        (Expect::Challenge, Some(ReplyResult::Challenge(challenge))) => {
            Ok(serde_json::to_value(Challenge {
                session: challenge.session,
                expires_in_s: challenge.expires_in_s,
            })
            .unwrap_or_default())
        }
        (_, Some(ReplyResult::Error(error))) => {
            let code = Code::try_from(error.code).unwrap_or(Code::Unspecified);
            let (status, name) = status_of(code);
            let message = if error.message.is_empty() {
                status.canonical_reason().unwrap_or("error").to_owned()
            } else {
                error.message
            };
            let mut refused = ApiError::new(status, name, message);
            if code == Code::Limited {
                refused.retry_after_s = Some(error.retry_after_s.max(1));
            }
            Err(refused)
        }
        (_, Some(ReplyResult::Config(_))) => Err(unexpected("a device config")),
        (_, Some(ReplyResult::Challenge(_))) => Err(unexpected("an MFA challenge")),
        (_, None) => Err(unexpected("an empty reply")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        STANDARD.encode([7u8; 32])
    }

    #[test]
    fn bodies_are_parsed_with_clear_errors() {
        let ok: ConfigRequest = parse(br#"{"token":"abc"}"#).unwrap();
        assert_eq!(ok.token, "abc");
        let cases: [(&[u8], &str); 5] = [
            (b"", "no body"),
            (b"{\"token\":", "malformed JSON"),
            (b"[1,2]", "invalid request"),
            (b"{}", "missing field `token`"),
            (b"{\"token\":\"a\",\"x\":1}", "unknown field `x`"),
        ];
        for (body, expected) in cases {
            let error = parse::<ConfigRequest>(body).unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
            assert!(
                error.message.contains(expected),
                "{expected}: {}",
                error.message
            );
        }
    }

    #[test]
    fn fields_are_checked_before_relaying() {
        let start = |location: &str, key: &str| {
            MfaStartRequest {
                location: location.into(),
                public_key: key.into(),
            }
            .into_kind()
        };
        let Kind::MfaStart(ok) = start(" lab ", &format!(" {} ", key())).unwrap() else {
            panic!("not an MFA start");
        };
        assert_eq!((ok.location.as_str(), ok.public_key), ("lab", key()));
        for (location, key, expected) in [
            ("", key(), "location: empty"),
            ("lab", "not base64!".into(), "public_key: not valid base64"),
            (
                "lab",
                STANDARD.encode([1u8; 16]),
                "public_key: decodes to 16 bytes",
            ),
            (&"x".repeat(600), key(), "location: 600 bytes"),
            ("la\u{7}b", key(), "location: contains control"),
        ] {
            let error = start(location, &key).unwrap_err();
            assert!(
                error.message.starts_with(expected),
                "{expected}: {}",
                error.message
            );
        }
        let finish = |code: &str| {
            MfaFinishRequest {
                session: "s".into(),
                code: code.into(),
            }
            .into_kind()
        };
        assert!(finish("123456").is_ok() && finish("12345678").is_ok());
        for code in ["12345", "123456789", "12a456", ""] {
            let error = finish(code).unwrap_err();
            assert!(
                error.message.starts_with("code:"),
                "{code}: {}",
                error.message
            );
        }
        let error = ConfigRequest { token: "  ".into() }
            .into_kind()
            .unwrap_err();
        assert_eq!(error.message, "token: empty");
    }

    #[test]
    fn an_enrolment_is_checked_like_a_start_and_expects_a_config() {
        let enrol: EnrolRequest =
            parse(format!(r#"{{"token":" t ","public_key":" {} "}}"#, key()).as_bytes()).unwrap();
        let kind = enrol.into_kind().unwrap();
        assert_eq!(Expect::of(&kind), Expect::Config);
        let Kind::Enrol(ok) = kind else {
            panic!("not an enrolment");
        };
        assert_eq!((ok.token.as_str(), ok.public_key), ("t", key()));
        for (body, expected) in [
            (r#"{"token":"t"}"#.to_owned(), "missing field `public_key`"),
            (
                format!(r#"{{"public_key":"{}"}}"#, key()),
                "missing field `token`",
            ),
            (
                format!(r#"{{"token":"t","public_key":"{}","x":1}}"#, key()),
                "unknown field `x`",
            ),
        ] {
            let error = parse::<EnrolRequest>(body.as_bytes()).unwrap_err();
            assert!(
                error.message.contains(expected),
                "{expected}: {}",
                error.message
            );
        }
        for (token, public_key, expected) in [
            ("", key(), "token: empty"),
            (
                "t",
                "not base64!".to_owned(),
                "public_key: not valid base64",
            ),
            (
                "t",
                STANDARD.encode([1u8; 31]),
                "public_key: decodes to 31 bytes",
            ),
            ("t", String::new(), "public_key: decodes to 0 bytes"),
        ] {
            let error = EnrolRequest {
                token: token.into(),
                public_key,
            }
            .into_kind()
            .unwrap_err();
            assert_eq!(error.status, StatusCode::BAD_REQUEST);
            assert_eq!(error.code, "invalid");
            assert!(
                error.message.starts_with(expected),
                "{expected}: {}",
                error.message
            );
        }
    }

    fn error_reply(code: Code) -> pb::Reply {
        pb::Reply {
            id: 1,
            result: Some(ReplyResult::Error(pb::Error {
                code: code as i32,
                message: "why".into(),
                retry_after_s: 7,
            })),
        }
    }

    #[test]
    fn core_errors_map_to_http_statuses() {
        let cases = [
            (Code::Invalid, 400),
            (Code::Unauthorized, 401),
            (Code::NotFound, 404),
            (Code::Expired, 410),
            (Code::Unavailable, 503),
            (Code::Limited, 429),
            (Code::Conflict, 409),
            (Code::Internal, 500),
            (Code::Unspecified, 500),
        ];
        for (code, status) in cases {
            let error = answer(Expect::Config, error_reply(code)).unwrap_err();
            assert_eq!(error.status.as_u16(), status, "{code:?}");
            assert_eq!(error.message, "why");
            // Only a limit says when to try again.
            assert_eq!(
                error.retry_after_s,
                (status == 429).then_some(7),
                "{code:?}"
            );
        }
        let unknown = pb::Reply {
            id: 1,
            result: Some(ReplyResult::Error(pb::Error {
                code: 99,
                message: String::new(),
                retry_after_s: 0,
            })),
        };
        let error = answer(Expect::Config, unknown).unwrap_err();
        assert_eq!(error.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(error.message, "Internal Server Error");
    }

    #[test]
    fn replies_become_json_or_a_bad_gateway() {
        let config = pb::Reply {
            id: 1,
            result: Some(ReplyResult::Config(pb::DeviceConfig {
                device: "laptop".into(),
                location: "lab".into(),
                addresses: vec!["10.8.0.2/32".into()],
                dns: vec![],
                mtu: 0,
                server_public_key: key(),
                preshared_key: String::new(),
                endpoint: "198.51.100.100:51820".into(),
                allowed_ips: vec!["10.8.0.0/24".into()],
                persistent_keepalive_s: 25,
                mfa: false,
                session_expires_in_s: 0,
            })),
        };
        let json = answer(Expect::Config, config.clone()).unwrap();
        assert_eq!(json["device"], "laptop");
        assert_eq!(json["persistent_keepalive"], 25);
        assert_eq!(json["mfa"], false);
        assert!(json.get("mtu").is_none() && json.get("preshared_key").is_none());
        assert!(json.get("session_expires_in_s").is_none());
        let mut login = config.clone();
        if let Some(ReplyResult::Config(c)) = &mut login.result {
            c.mfa = true;
            c.session_expires_in_s = 3600;
        }
        let json = answer(Expect::Config, login).unwrap();
        assert_eq!(json["mfa"], true);
        assert_eq!(json["session_expires_in_s"], 3600);
        let error = answer(Expect::Challenge, config).unwrap_err();
        assert_eq!(error.status, StatusCode::BAD_GATEWAY);
        let challenge = pb::Reply {
            id: 2,
            result: Some(ReplyResult::Challenge(pb::MfaChallenge {
                session: "s1".into(),
                expires_in_s: 120,
            })),
        };
        let json = answer(Expect::Challenge, challenge).unwrap();
        assert_eq!(
            (json["session"].as_str(), json["expires_in_s"].as_u64()),
            (Some("s1"), Some(120))
        );
        let empty = pb::Reply {
            id: 3,
            result: None,
        };
        assert_eq!(
            answer(Expect::Config, empty).unwrap_err().status,
            StatusCode::BAD_GATEWAY
        );
    }
}
