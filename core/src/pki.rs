//! The certificate authority of a Tidegate installation: `tidegate-core
//! init` makes it and Core's certificate, `tidegate-core issue` signs a
//! certificate for a gateway or an Edge. A certificate's identity is a DNS
//! name in its subject alternative names (see `tidegate_proto::tls`).

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

/// Core's identity: the DNS name in its certificate, which gateways and
/// Edges require of their client.
pub const CORE_IDENTITY: &str = "core";
/// Validity of the CA's certificate.
pub const CA_DAYS: u32 = 3650;
/// Default validity of an issued certificate.
pub const DEFAULT_DAYS: u32 = 825;

/// Why the PKI could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} exists already; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("making a certificate")]
    Generate(#[source] rcgen::Error),
    #[error("{path} is not a usable CA {what}")]
    BadCa {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("certificate name")]
    Name(#[source] tidegate_proto::tls::TlsError),
    #[error("validity must be 1 to {CA_DAYS} days, got {0}")]
    Days(u32),
}

/// The files of a PKI directory.
#[derive(Debug, Clone)]
pub struct PkiDir(PathBuf);

impl PkiDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self(dir.into())
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.0.join("ca.pem")
    }

    pub fn ca_key(&self) -> PathBuf {
        self.0.join("ca.key")
    }

    /// The certificate of `name` (e.g. `core.pem`).
    pub fn cert(&self, name: &str) -> PathBuf {
        self.0.join(format!("{name}.pem"))
    }

    /// The private key of `name` (e.g. `core.key`).
    pub fn key(&self, name: &str) -> PathBuf {
        self.0.join(format!("{name}.key"))
    }
}

/// Files written for one certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// Makes a new CA in `dir` (created 0700 if missing) and Core's
/// certificate. Refuses to replace an existing CA.
pub fn init(dir: &PkiDir) -> Result<Issued, PkiError> {
    for path in [dir.ca_cert(), dir.ca_key()] {
        if path.exists() {
            return Err(PkiError::Exists { path });
        }
    }
    make_dir(dir.dir())?;
    let key = KeyPair::generate().map_err(PkiError::Generate)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "Tidegate CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, CA_DAYS)?;
    let cert = params.self_signed(&key).map_err(PkiError::Generate)?;
    write_new(&dir.ca_key(), key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&dir.ca_cert(), cert.pem().as_bytes(), 0o644)?;
    issue(dir, CORE_IDENTITY, dir.dir(), DEFAULT_DAYS)
}

/// Signs a certificate for `name` (a DNS name: the gateway's or Edge's
/// identity) with the CA in `dir`, writing `name.pem`, `name.key` (0600) and
/// a copy of `ca.pem` into `out`. Refuses to replace existing files.
pub fn issue(dir: &PkiDir, name: &str, out: &Path, days: u32) -> Result<Issued, PkiError> {
    tidegate_proto::tls::check_identity(name).map_err(PkiError::Name)?;
    let out_dir = PkiDir::new(out);
    let issued = Issued {
        cert: out_dir.cert(name),
        key: out_dir.key(name),
        ca: out_dir.ca_cert(),
    };
    for path in [&issued.cert, &issued.key] {
        if path.exists() {
            return Err(PkiError::Exists { path: path.clone() });
        }
    }
    let ca_pem = read(&dir.ca_cert())?;
    let ca_key_pem = read(&dir.ca_key())?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(|source| PkiError::BadCa {
        path: dir.ca_key(),
        what: "key",
        source,
    })?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|source| PkiError::BadCa {
        path: dir.ca_cert(),
        what: "certificate",
        source,
    })?;
    let key = KeyPair::generate().map_err(PkiError::Generate)?;
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(PkiError::Generate)?;
    params.distinguished_name.push(DnType::CommonName, name);
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every side is both: gateways and Edges serve, Core dials, and each
    // certificate may be either end of a link.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, days)?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(PkiError::Generate)?;
    make_dir(out)?;
    write_new(&issued.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&issued.cert, cert.pem().as_bytes(), 0o644)?;
    if issued.ca != dir.ca_cert() {
        write_replace(&issued.ca, ca_pem.as_bytes(), 0o644)?;
    }
    Ok(issued)
}

fn validity(params: &mut CertificateParams, days: u32) -> Result<(), PkiError> {
    if days == 0 || days > CA_DAYS {
        return Err(PkiError::Days(days));
    }
    let now = OffsetDateTime::now_utc();
    // A little slack for clocks that are slightly behind.
    params.not_before = now - Duration::hours(1);
    params.not_after = now + Duration::days(i64::from(days));
    Ok(())
}

fn read(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Io {
        op: "reading",
        path: path.to_owned(),
        source,
    })
}

fn make_dir(dir: &Path) -> Result<(), PkiError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| PkiError::Io {
            op: "creating the directory",
            path: dir.to_owned(),
            source,
        })
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => PkiError::Exists {
                path: path.to_owned(),
            },
            _ => PkiError::Io {
                op: "creating",
                path: path.to_owned(),
                source,
            },
        })?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|source| PkiError::Io {
            op: "writing",
            path: path.to_owned(),
            source,
        })
}

fn write_replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension("pem.tmp");
    let _ = fs::remove_file(&tmp);
    write_new(&tmp, bytes, mode)?;
    fs::rename(&tmp, path).map_err(|source| PkiError::Io {
        op: "renaming into place",
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_makes_a_ca_and_cores_certificate_with_private_keys() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = PkiDir::new(tmp.path().join("pki"));
        let core = init(&dir).unwrap();
        assert_eq!(core.cert, dir.cert("core"));
        assert_eq!(mode(dir.dir()), 0o700);
        assert_eq!(mode(&dir.ca_key()), 0o600);
        assert_eq!(mode(&dir.key("core")), 0o600);
        assert_eq!(mode(&dir.ca_cert()), 0o644);
        // A second init would replace the CA: refused.
        assert!(matches!(init(&dir), Err(PkiError::Exists { .. })));
        tidegate_proto::tls::Pki::load(&dir.ca_cert(), &core.cert, &core.key).unwrap();
    }

    #[test]
    fn issued_certificates_carry_their_name_and_are_not_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = PkiDir::new(tmp.path().join("pki"));
        init(&dir).unwrap();
        let out = tmp.path().join("gw-a");
        let issued = issue(&dir, "gw-a", &out, 30).unwrap();
        assert_eq!(mode(&issued.key), 0o600);
        assert_eq!(
            fs::read(&issued.ca).unwrap(),
            fs::read(dir.ca_cert()).unwrap()
        );
        let pem = fs::read_to_string(&issued.cert).unwrap();
        let der = pem_to_der(&pem);
        let certs = Some(std::sync::Arc::new(vec![der]));
        assert!(tidegate_proto::tls::peer_has_identity(
            certs.clone(),
            "gw-a"
        ));
        assert!(!tidegate_proto::tls::peer_has_identity(certs, "core"));
        assert!(matches!(
            issue(&dir, "gw-a", &out, 30),
            Err(PkiError::Exists { .. })
        ));
        assert!(matches!(
            issue(&dir, "not a name", &out, 30),
            Err(PkiError::Name(_))
        ));
        assert!(matches!(
            issue(&dir, "gw-b", &out, 0),
            Err(PkiError::Days(0))
        ));
        let missing = PkiDir::new(tmp.path().join("none"));
        let err = issue(&missing, "gw-b", &out, 30).unwrap_err();
        assert!(crate::error_chain(&err).contains("none/ca.pem"), "{err}");
    }

    fn pem_to_der(pem: &str) -> tonic::transport::CertificateDer<'static> {
        use base64::{Engine as _, engine::general_purpose::STANDARD};
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        STANDARD.decode(body).unwrap().into()
    }
}
