//! Mutual TLS for Core's links: loading the PEM files, the server and client
//! configs, and the check that a peer's certificate names the identity it
//! must have.
//!
//! One CA (made by `tidegate-core init`) issues every certificate. A
//! certificate's identity is a DNS name in its subject alternative names:
//! `core` for Core, the gateway's or Edge's name for them. The TLS handshake
//! proves the chain; [`peer_has_identity`] then proves the name, since every
//! certificate of the CA would pass the chain check.

use std::{fs, io, path::Path, path::PathBuf, sync::Arc, time::Duration};

use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

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
    #[error("{path}: {reason}")]
    Cert { path: PathBuf, reason: String },
}

/// How long a link server waits for a connection's TLS handshake: a client
/// that opens a connection and says nothing holds it no longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A CA certificate and this side's certificate and key, all PEM.
#[derive(Clone)]
pub struct Pki {
    ca: Certificate,
    identity: Identity,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The identity holds the private key: never print it.
        f.debug_struct("Pki").finish_non_exhaustive()
    }
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
        let ca = read_pem(ca, "certificate", "-----BEGIN CERTIFICATE-----")?;
        let cert = read_pem(cert, "certificate", "-----BEGIN CERTIFICATE-----")?;
        let key = read_pem(key, "private key", "PRIVATE KEY-----")?;
        Ok(Self::from_pem(&ca, &cert, &key))
    }

    /// The same from PEM bytes already in memory.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Self {
        Self {
            ca: Certificate::from_pem(ca),
            identity: Identity::from_pem(cert, key),
        }
    }

    /// A server that requires a client certificate from the CA, within
    /// [`HANDSHAKE_TIMEOUT`] of the connection. Check the client's identity
    /// per request with [`peer_has_identity`].
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity.clone())
            .client_ca_root(self.ca.clone())
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// A client that presents its certificate and accepts only a server
    /// certificate from the CA valid for `server_identity`.
    pub fn client(&self, server_identity: &str) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(server_identity)
    }
}

/// Checks that an identity is a name a certificate can carry.
pub fn check_identity(identity: &str) -> Result<(), TlsError> {
    ServerName::try_from(identity)
        .map(|_| ())
        .map_err(|_| TlsError::Identity(identity.to_owned()))
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
    fn identities_must_be_dns_names() {
        check_identity("gw-a.example").unwrap();
        assert!(check_identity("not a name").is_err());
    }
}
