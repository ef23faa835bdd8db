//! When a certificate stops being valid: its notAfter and serial read from
//! the DER, a pure classification (valid, expiring soon, expired) given the
//! time now, and the log lines each daemon writes at start and then daily
//! about its own certificate and the CA's.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::{error, info, warn};

/// Warn this long before a certificate expires: time to renew it
/// (`tidegate-core issue --renew NAME`) before every link drops.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);

/// How often a daemon checks its certificates' expiry once running.
pub const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(24 * 3600);

const DAY_S: i64 = 24 * 3600;

/// Why a certificate could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ExpiryError {
    #[error("not an X.509 certificate: {0}")]
    Parse(String),
}

/// What a daemon shows about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The serial number, hex.
    pub serial: String,
    /// notBefore and notAfter, seconds since the Unix epoch.
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

impl CertInfo {
    /// Reads the serial and validity of a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, ExpiryError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| ExpiryError::Parse(e.to_string()))?;
        let serial = cert
            .tbs_certificate
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            serial,
            not_before_unix: cert.validity().not_before.timestamp(),
            not_after_unix: cert.validity().not_after.timestamp(),
        })
    }

    /// Where this certificate stands at `now_unix`.
    pub fn expiry(&self, now_unix: i64) -> Expiry {
        classify(self.not_after_unix, now_unix, EXPIRY_WARNING)
    }
}

/// A certificate as status output shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertStatus {
    pub path: String,
    pub serial: String,
    pub not_after_unix: i64,
    /// `valid`, `expires-soon` or `expired`.
    pub expiry: String,
    /// Whole days left (negative: days since it expired).
    pub days_left: i64,
}

impl CertStatus {
    pub fn new(path: &std::path::Path, info: &CertInfo, now_unix: i64) -> Self {
        let expiry = info.expiry(now_unix);
        Self {
            path: path.display().to_string(),
            serial: info.serial.clone(),
            not_after_unix: info.not_after_unix,
            expiry: expiry.word().to_owned(),
            days_left: match expiry {
                Expiry::Valid { days_left } | Expiry::ExpiresSoon { days_left } => days_left,
                Expiry::Expired { days_ago } => -days_ago,
            },
        }
    }

    /// One line: "serial 1a2b, expires in 812 days (valid), path".
    pub fn line(&self) -> String {
        let when = if self.days_left >= 0 {
            format!("expires in {} days", self.days_left)
        } else {
            format!("expired {} days ago", -self.days_left)
        };
        format!(
            "{when} ({}), serial {}, {}",
            self.expiry, self.serial, self.path
        )
    }
}

/// This side's certificate and the CA's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PkiStatus {
    pub own: CertStatus,
    pub ca: CertStatus,
}

/// Where a certificate stands against its notAfter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// More than the warning time left; whole days left.
    Valid { days_left: i64 },
    /// Less than the warning time left: renew it.
    ExpiresSoon { days_left: i64 },
    /// Past its notAfter: every peer refuses it.
    Expired { days_ago: i64 },
}

impl Expiry {
    /// One word for status output.
    pub fn word(self) -> &'static str {
        match self {
            Self::Valid { .. } => "valid",
            Self::ExpiresSoon { .. } => "expires-soon",
            Self::Expired { .. } => "expired",
        }
    }
}

/// Classifies a certificate with notAfter `not_after_unix` at `now_unix`:
/// expired once now is past notAfter, expiring soon within `warn_before`.
pub fn classify(not_after_unix: i64, now_unix: i64, warn_before: Duration) -> Expiry {
    let left = not_after_unix - now_unix;
    if left < 0 {
        return Expiry::Expired {
            days_ago: -left / DAY_S,
        };
    }
    let days_left = left / DAY_S;
    let warn_s = i64::try_from(warn_before.as_secs()).unwrap_or(i64::MAX);
    if left < warn_s {
        Expiry::ExpiresSoon { days_left }
    } else {
        Expiry::Valid { days_left }
    }
}

/// Seconds since the Unix epoch now.
pub fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Logs where a certificate stands: info while valid, a warning once it
/// expires within [`EXPIRY_WARNING`], an error once expired. `what` names
/// it ("this gateway's certificate", "the CA").
pub fn log_expiry(what: &str, path: &std::path::Path, info: &CertInfo, now_unix: i64) {
    let path = path.display();
    let serial = &info.serial;
    match info.expiry(now_unix) {
        Expiry::Valid { days_left } => {
            info!(%path, %serial, days_left, "{what} is valid");
        }
        Expiry::ExpiresSoon { days_left } => warn!(
            %path,
            %serial,
            days_left,
            "{what} expires in {days_left} days: renew it (tidegate-core issue --renew NAME) before every link using it drops"
        ),
        Expiry::Expired { days_ago } => error!(
            %path,
            %serial,
            days_ago,
            "{what} has expired: peers refuse it; renew it (tidegate-core issue --renew NAME)"
        ),
    }
}

/// Logs where this side's certificate and the CA's stand now, then again
/// every [`EXPIRY_CHECK_INTERVAL`] (each check also picks up a renewed
/// certificate). Runs until dropped.
pub async fn watch(pki: crate::tls::Pki, what: &'static str) {
    let mut tick = tokio::time::interval(EXPIRY_CHECK_INTERVAL);
    loop {
        tick.tick().await;
        let now = now_unix();
        let own = pki.own().current();
        log_expiry(what, pki.own().cert_path(), &own.info, now);
        log_expiry("the CA certificate", pki.ca_path(), pki.ca_info(), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        const WARN: Duration = EXPIRY_WARNING;
        let day = DAY_S;
        struct Case {
            name: &'static str,
            not_after: i64,
            now: i64,
            expect: Expiry,
        }
        let cases = [
            Case {
                name: "a year left",
                not_after: 1_000 * day,
                now: 635 * day,
                expect: Expiry::Valid { days_left: 365 },
            },
            Case {
                name: "exactly the warning time left",
                not_after: 1_000 * day,
                now: 970 * day,
                expect: Expiry::Valid { days_left: 30 },
            },
            Case {
                name: "a second inside the warning time",
                not_after: 1_000 * day,
                now: 970 * day + 1,
                expect: Expiry::ExpiresSoon { days_left: 29 },
            },
            Case {
                name: "the last second",
                not_after: 1_000 * day,
                now: 1_000 * day,
                expect: Expiry::ExpiresSoon { days_left: 0 },
            },
            Case {
                name: "a second past",
                not_after: 1_000 * day,
                now: 1_000 * day + 1,
                expect: Expiry::Expired { days_ago: 0 },
            },
            Case {
                name: "two days past",
                not_after: 1_000 * day,
                now: 1_002 * day + 5,
                expect: Expiry::Expired { days_ago: 2 },
            },
        ];
        for case in cases {
            assert_eq!(
                classify(case.not_after, case.now, WARN),
                case.expect,
                "{}",
                case.name
            );
        }
    }

    #[test]
    fn status_lines_say_when_and_what_to_do() {
        let info = CertInfo {
            serial: "0a".into(),
            not_before_unix: 0,
            not_after_unix: 100 * DAY_S,
        };
        let path = std::path::Path::new("/pki/gw-a.pem");
        let soon = CertStatus::new(path, &info, 80 * DAY_S);
        assert_eq!(
            soon.line(),
            "expires in 20 days (expires-soon), serial 0a, /pki/gw-a.pem"
        );
        let gone = CertStatus::new(path, &info, 103 * DAY_S);
        assert_eq!(gone.days_left, -3);
        assert_eq!(gone.expiry, "expired");
        assert!(gone.line().starts_with("expired 3 days ago"));
        assert_eq!(CertStatus::new(path, &info, 0).expiry, "valid");
    }

    #[test]
    fn reads_serial_and_validity() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["gw-a".to_owned()]).unwrap();
        params.serial_number = Some(rcgen::SerialNumber::from(vec![0x12, 0x34]));
        params.not_before = time::OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(2_000_000_000).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let info = CertInfo::from_der(cert.der()).unwrap();
        assert_eq!(info.serial, "1234");
        assert_eq!(info.not_before_unix, 1_000_000);
        assert_eq!(info.not_after_unix, 2_000_000_000);
        assert!(CertInfo::from_der(b"junk").is_err());
    }
}
