//! This side's certificate and key as files that may be replaced under a
//! running daemon (`tidegate-core issue --renew`): each use checks the
//! files' metadata (a `stat` each, cheap next to a handshake) and loads a
//! changed pair; a pair that does not load, does not match or lacks the
//! identity is refused with a logged error and the previous one stays in
//! use. Link servers resolve their certificate through it on every TLS
//! handshake; Core builds each dial's client config from it.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio_rustls::rustls::{
    self, crypto::CryptoProvider, server::ClientHello, server::ResolvesServerCert,
    sign::CertifiedKey,
};
use tracing::{error, info};

use crate::expiry::{CertInfo, ExpiryError};

/// Why a certificate and key pair could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    #[error("{path}")]
    Info {
        path: PathBuf,
        #[source]
        source: ExpiryError,
    },
    #[error("{cert} and {key} do not make a usable pair")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{path}: the certificate is not issued for identity {identity:?}")]
    Identity { path: PathBuf, identity: String },
}

/// A certificate chain and its key, as loaded from the files.
#[derive(Debug)]
pub struct Loaded {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub certified: Arc<CertifiedKey>,
    /// The leaf certificate's serial and validity.
    pub info: CertInfo,
}

/// What identifies a file's content cheaply: replacing it by rename changes
/// the inode, rewriting it changes the size or the modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Stamp {
    fn of(path: &Path) -> Option<Self> {
        let meta = fs::metadata(path).ok()?;
        Some(Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        })
    }
}

#[derive(Debug)]
struct State {
    /// The stamps of the files `current` was loaded from.
    loaded: (Option<Stamp>, Option<Stamp>),
    /// The stamps of a pair that was refused, so it is logged once.
    refused: Option<(Option<Stamp>, Option<Stamp>)>,
    current: Arc<Loaded>,
}

/// This side's certificate and key files, reloaded when they change.
#[derive(Debug, Clone)]
pub struct ReloadingCert {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    cert: PathBuf,
    key: PathBuf,
    identity: Option<String>,
    state: Mutex<State>,
}

impl ReloadingCert {
    /// Loads the pair; with `identity`, the certificate must carry it (now
    /// and after every reload).
    pub fn load(cert: &Path, key: &Path, identity: Option<&str>) -> Result<Self, CertError> {
        let loaded = (Stamp::of(cert), Stamp::of(key));
        let current = Arc::new(load_pair(cert, key, identity)?);
        Ok(Self {
            inner: Arc::new(Inner {
                cert: cert.to_owned(),
                key: key.to_owned(),
                identity: identity.map(str::to_owned),
                state: Mutex::new(State {
                    loaded,
                    refused: None,
                    current,
                }),
            }),
        })
    }

    /// The certificate file's path.
    pub fn cert_path(&self) -> &Path {
        &self.inner.cert
    }

    /// The pair in use, first reloading the files if they changed since
    /// they were loaded (a changed pair that fails is logged, once, and the
    /// one in use kept).
    pub fn current(&self) -> Arc<Loaded> {
        let inner = &*self.inner;
        let stamps = (Stamp::of(&inner.cert), Stamp::of(&inner.key));
        let mut state = inner.state.lock().unwrap_or_else(PoisonError::into_inner);
        if stamps == state.loaded || state.refused == Some(stamps) {
            return state.current.clone();
        }
        match load_pair(&inner.cert, &inner.key, inner.identity.as_deref()) {
            Ok(loaded) => {
                info!(
                    cert = %inner.cert.display(),
                    serial = %loaded.info.serial,
                    not_after_unix = loaded.info.not_after_unix,
                    "loaded a new certificate; new connections present it"
                );
                crate::expiry::log_expiry(
                    "the new certificate",
                    &inner.cert,
                    &loaded.info,
                    crate::expiry::now_unix(),
                );
                state.current = Arc::new(loaded);
                state.loaded = stamps;
                state.refused = None;
            }
            Err(error) => {
                error!(
                    error = %crate::error_chain(&error),
                    serial = %state.current.info.serial,
                    "the certificate files changed but cannot be used; keeping the one in use"
                );
                state.refused = Some(stamps);
            }
        }
        state.current.clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current().certified.clone())
    }
}

fn provider() -> Arc<CryptoProvider> {
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Loads and checks a certificate chain and its key.
pub fn load_pair(cert: &Path, key: &Path, identity: Option<&str>) -> Result<Loaded, CertError> {
    let cert_pem = read(cert)?;
    let key_pem = read(key)?;
    let pem_err = |path: &Path, reason: String| CertError::Pem {
        path: path.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(cert, e.to_string()))?;
    let leaf = chain
        .first()
        .ok_or_else(|| pem_err(cert, "no certificate".into()))?;
    let info = CertInfo::from_der(leaf).map_err(|source| CertError::Info {
        path: cert.to_owned(),
        source,
    })?;
    if let Some(identity) = identity
        && !crate::tls::peer_has_identity(Some(Arc::new(vec![leaf.clone()])), identity)
    {
        return Err(CertError::Identity {
            path: cert.to_owned(),
            identity: identity.to_owned(),
        });
    }
    let private =
        PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_err(key, e.to_string()))?;
    let certified =
        CertifiedKey::from_der(chain, private, &provider()).map_err(|source| CertError::Pair {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        })?;
    Ok(Loaded {
        cert_pem,
        key_pem,
        certified: Arc::new(certified),
        info,
    })
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, KeyPair};

    use super::*;

    fn write_cert(dir: &Path, name: &str, key: &KeyPair, serial: u8) {
        let mut params = CertificateParams::new(vec![name.to_owned()]).unwrap();
        params.serial_number = Some(vec![serial].into());
        let cert = params.self_signed(key).unwrap();
        let tmp = dir.join("cert.tmp");
        fs::write(&tmp, cert.pem()).unwrap();
        fs::rename(&tmp, dir.join("cert.pem")).unwrap();
    }

    #[test]
    fn a_replaced_certificate_is_loaded_and_a_bad_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let key = KeyPair::generate().unwrap();
        fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        write_cert(dir.path(), "gw-a", &key, 1);
        let cert = dir.path().join("cert.pem");
        let reloading =
            ReloadingCert::load(&cert, &dir.path().join("key.pem"), Some("gw-a")).unwrap();
        assert_eq!(reloading.current().info.serial, "01");

        write_cert(dir.path(), "gw-a", &key, 2);
        assert_eq!(reloading.current().info.serial, "02");

        // Another identity: refused, the one in use stays.
        write_cert(dir.path(), "gw-b", &key, 3);
        assert_eq!(reloading.current().info.serial, "02");
        // Another key: refused.
        write_cert(dir.path(), "gw-a", &KeyPair::generate().unwrap(), 4);
        assert_eq!(reloading.current().info.serial, "02");
        // Junk: refused.
        fs::write(&cert, "junk").unwrap();
        assert_eq!(reloading.current().info.serial, "02");
        // A good one again.
        write_cert(dir.path(), "gw-a", &key, 5);
        assert_eq!(reloading.current().info.serial, "05");
    }
}
