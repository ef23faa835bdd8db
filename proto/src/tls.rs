//! Mutual TLS for Core's links: loading the PEM files, the server and client
//! configs, and the check that a peer's certificate names the identity it
//! must have.
//!
//! One CA (made by `tidegate-core init`) issues every certificate. A
//! certificate's identity is a DNS name in its subject alternative names:
//! `core` for Core, the gateway's or Edge's name for them. The TLS handshake
//! proves the chain; [`peer_has_identity`] then proves the name, since every
//! certificate of the CA would pass the chain check.
//!
//! Core's identity is reserved ([`is_reserved`], ignoring case): no gateway
//! or Edge is issued it. This side's certificate is read through
//! [`ReloadingCert`], so a renewed file is presented on the next handshake
//! (servers) or dial (Core) without a restart.

use std::{fs, io, path::Path, path::PathBuf, sync::Arc, time::Duration};

use futures::{Stream, StreamExt as _};
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tokio::io::{AsyncRead, AsyncWrite};
/// The acceptor a link server runs its handshakes with.
pub use tokio_rustls::TlsAcceptor;
use tokio_rustls::{rustls, server::TlsStream};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::{
    certs::{CertError, ReloadingCert},
    expiry::{CertInfo, ExpiryError},
};

/// Why TLS material could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    NotPem { path: PathBuf, what: &'static str },
    #[error("{0:?} is not a valid DNS name for a certificate identity")]
    Identity(String),
    #[error(
        "{0:?} is not a valid identity: use lowercase letters, digits, '-' and '.' (a DNS name)"
    )]
    NotLowercase(String),
    #[error(
        "{0:?} is Core's identity (names compare ignoring case): no gateway or Edge may have it"
    )]
    Reserved(String),
    #[error("{path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("this side's certificate")]
    Own(#[from] CertError),
    #[error("{path}: the CA certificate")]
    Ca {
        path: PathBuf,
        #[source]
        source: ExpiryError,
    },
    #[error("building the TLS server config")]
    Server(#[source] rustls::Error),
    #[error("the CA certificate for client certificates")]
    ClientVerifier(#[source] rustls::server::VerifierBuilderError),
}

/// Core's identity: the DNS name in its certificate, which gateways and
/// Edges require of their client by default. Reserved: no gateway or Edge
/// may carry it, in any case.
pub const CORE_IDENTITY: &str = "core";

/// How long a link server waits for a connection's TLS handshake: a client
/// that opens a connection and says nothing holds it no longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes a link server runs at once: as many as the acceptor lets
/// connections be open, so that only its limits (per peer address and in
/// all) and [`HANDSHAKE_TIMEOUT`] hold strangers back, never a queue of
/// its own in front of Core's handshake.
const HANDSHAKE_QUEUE: usize = crate::listen::LINK_LIMITS.total;

/// A CA certificate and this side's certificate and key, all PEM; this
/// side's pair is reloaded when its files change (see [`ReloadingCert`]).
#[derive(Clone)]
pub struct Pki {
    ca: Certificate,
    ca_der: CertificateDer<'static>,
    ca_path: PathBuf,
    ca_info: CertInfo,
    own: ReloadingCert,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The identity holds the private key: never print it.
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

/// Each of `files` (the field that names it, its path) that cannot be
/// opened for reading, as `field path: reason`: what a config check
/// reports before it reads their contents.
pub fn unreadable(files: &[(&str, &Path)]) -> Vec<String> {
    files
        .iter()
        .filter_map(|(field, path)| {
            fs::File::open(path)
                .err()
                .map(|e| format!("{field} {}: {e}", path.display()))
        })
        .collect()
}

fn read_pem(path: &Path, what: &'static str, marker: &str) -> Result<Vec<u8>, TlsError> {
    let pem = fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })?;
    if !String::from_utf8_lossy(&pem).contains(marker) {
        return Err(TlsError::NotPem {
            path: path.to_owned(),
            what,
        });
    }
    Ok(pem)
}

impl Pki {
    /// Loads the CA certificate, this side's certificate (chain) and its
    /// private key from PEM files.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Self::load_as(ca, cert, key, None)
    }

    /// The same, requiring this side's certificate to carry `identity`
    /// (now and after every reload): a start-up check, so that a wrong file
    /// is named before any peer refuses it.
    pub fn load_as(
        ca: &Path,
        cert: &Path,
        key: &Path,
        identity: Option<&str>,
    ) -> Result<Self, TlsError> {
        let ca_pem = read_pem(ca, "certificate", "-----BEGIN CERTIFICATE-----")?;
        read_pem(cert, "certificate", "-----BEGIN CERTIFICATE-----")?;
        read_pem(key, "private key", "PRIVATE KEY-----")?;
        let ca_der = CertificateDer::from_pem_slice(&ca_pem).map_err(|e| TlsError::Cert {
            path: ca.to_owned(),
            reason: e.to_string(),
        })?;
        let ca_info = CertInfo::from_der(&ca_der).map_err(|source| TlsError::Ca {
            path: ca.to_owned(),
            source,
        })?;
        let own = ReloadingCert::load(cert, key, identity)?;
        Ok(Self {
            ca: Certificate::from_pem(&ca_pem),
            ca_der,
            ca_path: ca.to_owned(),
            ca_info,
            own,
        })
    }

    /// The CA certificate's serial and validity.
    pub fn ca_info(&self) -> &CertInfo {
        &self.ca_info
    }

    /// The CA certificate's file.
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// Where this side's certificate (as the files hold it now) and the
    /// CA's stand at `now_unix`.
    pub fn status(&self, now_unix: i64) -> crate::expiry::PkiStatus {
        let own = self.own.current();
        crate::expiry::PkiStatus {
            own: crate::expiry::CertStatus::new(self.own.cert_path(), &own.info, now_unix),
            ca: crate::expiry::CertStatus::new(&self.ca_path, &self.ca_info, now_unix),
        }
    }

    /// This side's certificate and key, reloaded when the files change.
    pub fn own(&self) -> &ReloadingCert {
        &self.own
    }

    /// A server config that requires a client certificate from the CA and
    /// presents this side's current certificate on every handshake. Check
    /// the client's identity per request with [`peer_has_identity`].
    pub fn server(&self) -> Result<TlsAcceptor, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).map_err(TlsError::Server)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
            .build()
            .map_err(TlsError::ClientVerifier)?;
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(self.own.clone()));
        config.alpn_protocols.push(b"h2".to_vec());
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// A client that presents its certificate (as the files hold it now)
    /// and accepts only a server certificate from the CA valid for
    /// `server_identity`.
    pub fn client(&self, server_identity: &str) -> ClientTlsConfig {
        let own = self.own.current();
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(Identity::from_pem(&own.cert_pem, &own.key_pem))
            .domain_name(server_identity)
    }
}

/// Connections that have completed the TLS handshake with `acceptor`,
/// within [`HANDSHAKE_TIMEOUT`] each and several at once, for a tonic
/// server's `serve_with_incoming`. Failed handshakes are logged at debug
/// level and dropped.
pub fn tls_incoming<S, IO>(
    acceptor: TlsAcceptor,
    connections: S,
) -> impl Stream<Item = io::Result<TlsStream<IO>>> + Send + 'static
where
    S: Stream<Item = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tls_incoming_live(tokio::sync::watch::channel(acceptor).1, connections)
}

/// [`tls_incoming`] with the acceptor in force when each connection
/// arrives: a reload that sends a new one (a new CA) changes the
/// handshakes to come, never the sessions already up.
pub fn tls_incoming_live<S, IO>(
    acceptor: tokio::sync::watch::Receiver<TlsAcceptor>,
    connections: S,
) -> impl Stream<Item = io::Result<TlsStream<IO>>> + Send + 'static
where
    S: Stream<Item = io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    connections
        .filter_map(|connection| async move { connection.ok() })
        .map(move |io| {
            let acceptor = acceptor.borrow().clone();
            async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                    Ok(Ok(tls)) => Some(Ok(tls)),
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "a TLS handshake failed");
                        None
                    }
                    Err(_) => {
                        tracing::debug!("a TLS handshake timed out");
                        None
                    }
                }
            }
        })
        .buffer_unordered(HANDSHAKE_QUEUE)
        .filter_map(|result| async move { result })
}

/// Checks that an identity is a name a certificate can carry.
pub fn check_identity(identity: &str) -> Result<(), TlsError> {
    ServerName::try_from(identity)
        .map(|_| ())
        .map_err(|_| TlsError::Identity(identity.to_owned()))
}

/// Checks that `name` may be issued a certificate as a gateway's or an
/// Edge's identity: a DNS name in lowercase (so that one identity has one
/// spelling) and not Core's, in any case.
pub fn check_issuable_identity(name: &str) -> Result<(), TlsError> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        || name.parse::<std::net::IpAddr>().is_ok()
    {
        return Err(TlsError::NotLowercase(name.to_owned()));
    }
    check_identity(name)?;
    if is_reserved(name) {
        return Err(TlsError::Reserved(name.to_owned()));
    }
    Ok(())
}

/// Whether `identity` is Core's, compared as DNS names are: ignoring case.
/// A trailing dot (an absolute DNS name) matches the same certificate.
pub fn is_reserved(identity: &str) -> bool {
    identity
        .strip_suffix('.')
        .unwrap_or(identity)
        .eq_ignore_ascii_case(CORE_IDENTITY)
}

/// Whether the peer's leaf certificate (already verified against the CA by
/// the TLS handshake) is valid for `identity`. False without TLS or without
/// a client certificate.
pub fn peer_has_identity(certs: Option<Arc<Vec<CertificateDer<'static>>>>, identity: &str) -> bool {
    let Some(leaf) = certs.as_deref().and_then(|certs| certs.first()) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(identity) else {
        return false;
    };
    webpki::EndEntityCert::try_from(leaf)
        .and_then(|cert| cert.verify_is_valid_for_subject_name(&name))
        .is_ok()
}

/// The serial (hex) of the peer's leaf certificate, for logs: which of
/// the certificates issued for an identity (renewed ones share it) the
/// peer presented. Empty without one.
pub fn peer_serial(certs: Option<Arc<Vec<CertificateDer<'static>>>>) -> String {
    certs
        .as_deref()
        .and_then(|certs| certs.first())
        .and_then(|leaf| CertInfo::from_der(leaf).ok())
        .map(|info| info.serial)
        .unwrap_or_default()
}

/// Fails unless the first certificate in `path` (this side's own) is valid
/// for `identity`: a start-up check, so that a wrong file is named before
/// any peer refuses it.
pub fn check_own_identity(path: &Path, identity: &str) -> Result<(), TlsError> {
    let cert_err = |reason: String| TlsError::Cert {
        path: path.to_owned(),
        reason,
    };
    let leaf = CertificateDer::pem_file_iter(path)
        .map_err(|e| cert_err(e.to_string()))?
        .next()
        .ok_or_else(|| cert_err("no certificate".into()))?
        .map_err(|e| cert_err(e.to_string()))?;
    if !peer_has_identity(Some(Arc::new(vec![leaf])), identity) {
        return Err(cert_err(format!(
            "the certificate is not issued for identity {identity:?}"
        )));
    }
    Ok(())
}

/// Refuses a Link unless the client's certificate is valid for
/// `core_identity`: only Core opens Links.
pub fn require_core<T>(
    request: &tonic::Request<T>,
    core_identity: &str,
) -> Result<(), tonic::Status> {
    if peer_has_identity(request.peer_certs(), core_identity) {
        return Ok(());
    }
    Err(tonic::Status::permission_denied(format!(
        "only Core ({core_identity}) may open a Link"
    )))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rcgen::{CertificateParams, KeyPair};
    use rustls_pki_types::CertificateDer;

    use super::*;

    fn leaf(name: &str) -> CertificateDer<'static> {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn identity_is_the_leaf_certificates_dns_name() {
        let certs = Some(Arc::new(vec![leaf("core")]));
        assert!(peer_has_identity(certs.clone(), "core"));
        assert!(!peer_has_identity(certs, "gw-a"));
        assert!(!peer_has_identity(
            Some(Arc::new(vec![leaf("gw-a")])),
            "core"
        ));
    }

    #[test]
    fn no_certificate_has_no_identity() {
        assert!(!peer_has_identity(None, "core"));
        assert!(!peer_has_identity(Some(Arc::new(Vec::new())), "core"));
    }

    #[test]
    fn files_that_are_not_pem_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("ca.pem");
        fs::write(&bad, "not a certificate").unwrap();
        let err = Pki::load(&bad, &bad, &bad).unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = Pki::load(&missing, &bad, &bad).unwrap_err();
        assert!(err.to_string().contains("missing.pem"), "{err}");
    }

    #[test]
    fn own_certificate_must_carry_the_configured_identity() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["gw-a".to_owned()]).unwrap();
        let cert = dir.path().join("cert.pem");
        fs::write(&cert, params.self_signed(&key).unwrap().pem()).unwrap();
        check_own_identity(&cert, "gw-a").unwrap();
        let err = check_own_identity(&cert, "gw-b").unwrap_err();
        assert!(
            err.to_string().contains("cert.pem") && err.to_string().contains("\"gw-b\""),
            "{err}"
        );
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "").unwrap();
        let err = check_own_identity(&empty, "gw-a").unwrap_err();
        assert!(err.to_string().contains("no certificate"), "{err}");
    }

    #[test]
    fn issuable_identities_are_lowercase_dns_names_other_than_cores() {
        let cases: &[(&str, bool)] = &[
            ("gw-a", true),
            ("edge-1.example", true),
            ("core-a", true),
            ("gw-a.core", true),
            ("core", false),
            ("Core", false),
            ("CORE", false),
            ("core.", false),
            ("cOrE.", false),
            ("GW-A", false),
            ("gw_a", false),
            ("", false),
            ("not a name", false),
            ("192.0.2.1", false),
            ("-gw", false),
        ];
        for (name, ok) in cases {
            let result = check_issuable_identity(name);
            assert_eq!(result.is_ok(), *ok, "{name:?}: {result:?}");
        }
        let err = check_issuable_identity("Core").unwrap_err();
        assert!(matches!(err, TlsError::NotLowercase(_)), "{err}");
        let err = check_issuable_identity("core").unwrap_err();
        assert!(err.to_string().contains("Core's identity"), "{err}");
        assert!(is_reserved("CoRe") && is_reserved("core.") && !is_reserved("core-a"));
    }

    #[test]
    fn identities_must_be_dns_names() {
        check_identity("gw-a.example").unwrap();
        assert!(check_identity("not a name").is_err());
    }
}
