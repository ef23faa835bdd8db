//! A certificate authority for a test run: a CA and certificates it issues
//! for Core, gateways and Edges (the identity is the certificate's DNS
//! name), written as PEM files the daemons read. A second `TestPki` is a
//! foreign CA, for tests of refused certificates.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The PEM files of one identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The CA certificate that issued `cert`.
    pub ca: PathBuf,
    /// The certificate.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// A CA whose files live in a directory of the run.
#[derive(Debug)]
pub struct TestPki {
    dir: PathBuf,
    ca_file: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl TestPki {
    /// Creates a CA named `name` in `dir/<name>/` (`ca.pem`).
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Tidegate test CA {name}"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let ca_file = dir.join("ca.pem");
        write(&ca_file, &issuer.pem())?;
        Ok(Self {
            dir,
            ca_file,
            issuer,
        })
    }

    /// The CA certificate's file.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// Issues a certificate for `identity` (client and server use), written
    /// to `<identity>.pem` and `<identity>.key`.
    pub fn issue(&self, identity: &str) -> Result<CertFiles> {
        let mut params = CertificateParams::new(vec![identity.to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, identity.to_owned());
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let files = CertFiles {
            ca: self.ca_file.clone(),
            cert: self.dir.join(format!("{identity}.pem")),
            key: self.dir.join(format!("{identity}.key")),
        };
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }
}

/// The certificate a TLS server at `address` presents to a client with
/// `client`'s certificate, checked against `client.ca` for
/// `server_identity`: its serial and validity.
pub fn served_certificate(
    address: std::net::SocketAddr,
    server_identity: &str,
    client: &CertFiles,
) -> Result<tidegate_proto::expiry::CertInfo> {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};

    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(&client.ca).context("reading the CA")?)?;
    let chain = CertificateDer::pem_file_iter(&client.cert)
        .context("reading the client certificate")?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(&client.key).context("reading the client key")?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let name = ServerName::try_from(server_identity.to_owned())?;
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut tcp = std::net::TcpStream::connect_timeout(&address, std::time::Duration::from_secs(5))
        .with_context(|| format!("connecting to {address}"))?;
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    tcp.set_write_timeout(Some(std::time::Duration::from_secs(5)))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp)
            .with_context(|| format!("TLS handshake with {address}"))?;
    }
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .context("the server presented no certificate")?;
    Ok(tidegate_proto::expiry::CertInfo::from_der(leaf)?)
}

/// The serial and validity of the first certificate in a PEM file.
pub fn certificate_info(path: &Path) -> Result<tidegate_proto::expiry::CertInfo> {
    use rustls::pki_types::{CertificateDer, pem::PemObject as _};
    let der = CertificateDer::from_pem_file(path)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(tidegate_proto::expiry::CertInfo::from_der(&der)?)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_pem_files_under_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::new(dir.path(), "ca1").unwrap();
        let files = pki.issue("gw-a").unwrap();
        assert_eq!(files.ca, pki.ca_file());
        let cert = std::fs::read_to_string(&files.cert).unwrap();
        let key = std::fs::read_to_string(&files.key).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"), "{cert}");
        assert!(key.contains("PRIVATE KEY-----"), "{key}");
        tidegate_proto::tls::Pki::load(&files.ca, &files.cert, &files.key).unwrap();
    }
}
