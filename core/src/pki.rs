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
/// Edges require of their client. Reserved: `issue` refuses it.
pub const CORE_IDENTITY: &str = tidegate_proto::tls::CORE_IDENTITY;
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
    #[error("{path} does not exist: nothing to renew (issue it without --renew)")]
    NothingToRenew { path: PathBuf },
    #[error("{path}: not a certificate for {name:?}, refusing to renew it as one")]
    NotTheIdentity { path: PathBuf, name: String },
    #[error("{path} is not a usable key")]
    BadKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
}

/// What `renew` does with the private key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewKey {
    /// Sign the existing key again: only the certificate file changes.
    Keep,
    /// Make a new key too (after a suspected compromise).
    New,
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

impl Issued {
    /// The files of `name` in `out`: `name.pem`, `name.key`, `ca.pem`.
    fn in_dir(out: &Path, name: &str) -> Self {
        let out = PkiDir::new(out);
        Self {
            cert: out.cert(name),
            key: out.key(name),
            ca: out.ca_cert(),
        }
    }
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
    issue_unchecked(dir, CORE_IDENTITY, dir.dir(), DEFAULT_DAYS)
}

/// Signs a certificate for `name` (the gateway's or Edge's identity: a
/// lowercase DNS name, never Core's) with the CA in `dir`, writing
/// `name.pem`, `name.key` (0600) and a copy of `ca.pem` into `out`. Refuses
/// to replace existing files.
pub fn issue(dir: &PkiDir, name: &str, out: &Path, days: u32) -> Result<Issued, PkiError> {
    tidegate_proto::tls::check_issuable_identity(name).map_err(PkiError::Name)?;
    issue_unchecked(dir, name, out, days)
}

fn issue_unchecked(dir: &PkiDir, name: &str, out: &Path, days: u32) -> Result<Issued, PkiError> {
    let issued = Issued::in_dir(out, name);
    for path in [&issued.cert, &issued.key] {
        if path.exists() {
            return Err(PkiError::Exists { path: path.clone() });
        }
    }
    let key = KeyPair::generate().map_err(PkiError::Generate)?;
    let cert = sign(dir, name, &key, days)?;
    make_dir(out)?;
    write_new(&issued.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&issued.cert, cert.as_bytes(), 0o644)?;
    copy_ca(dir, &issued.ca)?;
    Ok(issued)
}

/// Signs a new certificate for `name` whose files `name.pem` and
/// `name.key` are in `out` already (a gateway's, an Edge's, or Core's own),
/// valid for `days` from now, and puts it in place atomically (a new file
/// renamed over the old), so that a daemon reading it sees the old or the
/// new one, never half. With [`RenewKey::Keep`] the key file is untouched;
/// with [`RenewKey::New`] a new key replaces it first.
pub fn renew(
    dir: &PkiDir,
    name: &str,
    out: &Path,
    days: u32,
    key_choice: RenewKey,
) -> Result<Issued, PkiError> {
    if !tidegate_proto::tls::is_reserved(name) {
        tidegate_proto::tls::check_issuable_identity(name).map_err(PkiError::Name)?;
    }
    let issued = Issued::in_dir(out, name);
    for path in [&issued.cert, &issued.key] {
        if !path.exists() {
            return Err(PkiError::NothingToRenew { path: path.clone() });
        }
    }
    // Renew only what is already this identity's certificate.
    tidegate_proto::tls::check_own_identity(&issued.cert, name).map_err(|_| {
        PkiError::NotTheIdentity {
            path: issued.cert.clone(),
            name: name.to_owned(),
        }
    })?;
    let key = match key_choice {
        RenewKey::Keep => {
            KeyPair::from_pem(&read(&issued.key)?).map_err(|source| PkiError::BadKey {
                path: issued.key.clone(),
                source,
            })?
        }
        RenewKey::New => KeyPair::generate().map_err(PkiError::Generate)?,
    };
    let cert = sign(dir, name, &key, days)?;
    if key_choice == RenewKey::New {
        write_replace(&issued.key, key.serialize_pem().as_bytes(), 0o600)?;
    }
    write_replace(&issued.cert, cert.as_bytes(), 0o644)?;
    copy_ca(dir, &issued.ca)?;
    Ok(issued)
}

fn copy_ca(dir: &PkiDir, to: &Path) -> Result<(), PkiError> {
    if to != dir.ca_cert() {
        write_replace(to, read(&dir.ca_cert())?.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// A certificate (PEM) for `name` and `key`, signed by the CA in `dir`.
fn sign(dir: &PkiDir, name: &str, key: &KeyPair, days: u32) -> Result<String, PkiError> {
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
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(PkiError::Generate)?;
    params.distinguished_name.push(DnType::CommonName, name);
    // A random serial: without one rcgen derives it from the key, and a
    // renewal that keeps the key would repeat it.
    let mut serial = [0u8; 16];
    getrandom::getrandom(&mut serial).map_err(|e| PkiError::Io {
        op: "drawing a serial number for",
        path: dir.ca_cert(),
        source: io::Error::other(e.to_string()),
    })?;
    serial[0] &= 0x7f;
    params.serial_number = Some(serial.to_vec().into());
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    // Every side is both: gateways and Edges serve, Core dials, and each
    // certificate may be either end of a link.
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, days)?;
    let cert = params.signed_by(key, &issuer).map_err(PkiError::Generate)?;
    Ok(cert.pem())
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
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
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

    #[test]
    fn cores_identity_and_names_not_in_lowercase_are_not_issued() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = PkiDir::new(tmp.path().join("pki"));
        init(&dir).unwrap();
        let out = tmp.path().join("out");
        for name in ["core", "Core", "CORE", "core.", "GW-A", "gw_a"] {
            let err = issue(&dir, name, &out, 30).unwrap_err();
            assert!(matches!(err, PkiError::Name(_)), "{name}: {err}");
        }
        let err = issue(&dir, "Core", &out, 30).unwrap_err();
        assert!(crate::error_chain(&err).contains("lowercase"), "{err}");
        let err = issue(&dir, "core", &out, 30).unwrap_err();
        assert!(
            crate::error_chain(&err).contains("Core's identity"),
            "{err}"
        );
        assert!(!out.join("core.pem").exists());
    }

    fn info(path: &Path) -> tidegate_proto::expiry::CertInfo {
        let pem = fs::read_to_string(path).unwrap();
        tidegate_proto::expiry::CertInfo::from_der(&pem_to_der(&pem)).unwrap()
    }

    #[test]
    fn renewal_re_signs_in_place_keeping_or_replacing_the_key() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = PkiDir::new(tmp.path().join("pki"));
        init(&dir).unwrap();
        let out = tmp.path().join("gw-a");
        assert!(matches!(
            renew(&dir, "gw-a", &out, 30, RenewKey::Keep),
            Err(PkiError::NothingToRenew { .. })
        ));
        let issued = issue(&dir, "gw-a", &out, 30).unwrap();
        let before = info(&issued.cert);
        let key_before = fs::read(&issued.key).unwrap();
        let renewed = renew(&dir, "gw-a", &out, 90, RenewKey::Keep).unwrap();
        assert_eq!(renewed, issued);
        let after = info(&issued.cert);
        assert_ne!(after.serial, before.serial);
        assert!(after.not_after_unix > before.not_after_unix + 59 * 24 * 3600);
        assert_eq!(fs::read(&issued.key).unwrap(), key_before);
        tidegate_proto::tls::Pki::load_as(&issued.ca, &issued.cert, &issued.key, Some("gw-a"))
            .unwrap();
        renew(&dir, "gw-a", &out, 90, RenewKey::New).unwrap();
        assert_ne!(fs::read(&issued.key).unwrap(), key_before);
        assert_eq!(mode(&issued.key), 0o600);
        tidegate_proto::tls::Pki::load_as(&issued.ca, &issued.cert, &issued.key, Some("gw-a"))
            .unwrap();
        // Core's own certificate is renewed in place too.
        renew(&dir, "core", dir.dir(), 90, RenewKey::Keep).unwrap();
        // A file that is another identity's is not renewed as this one.
        fs::copy(&issued.cert, out.join("gw-b.pem")).unwrap();
        fs::copy(&issued.key, out.join("gw-b.key")).unwrap();
        assert!(matches!(
            renew(&dir, "gw-b", &out, 90, RenewKey::Keep),
            Err(PkiError::NotTheIdentity { .. })
        ));
    }

    fn pem_to_der(pem: &str) -> tonic::transport::CertificateDer<'static> {
        use base64::{Engine as _, engine::general_purpose::STANDARD};
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        STANDARD.decode(body).unwrap().into()
    }
}
