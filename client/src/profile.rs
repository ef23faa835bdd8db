//! A device as the client keeps it after enrolment: its private key, the
//! Edge it talks to, and its config, in one file readable by its owner only.

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tidegate_wireguard::Key;

use crate::api::DeviceConfig;

/// Where profiles live unless `--dir` says otherwise.
pub const DEFAULT_DIR: &str = "/etc/tidegate-client";
/// The longest interface name Linux takes (IFNAMSIZ - 1).
const MAX_NAME: usize = 15;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(
        "{0:?}: a profile name is also the interface's: 1 to {MAX_NAME} of a-z, 0-9, '-', '_', '.'; give one with --name"
    )]
    BadName(String),
    #[error(
        "no profile {name:?} in {dir}; enrol the device first (tidegate-client enrol URL TOKEN)"
    )]
    Missing { name: String, dir: PathBuf },
    #[error(
        "profile {0:?} exists already; remove it (tidegate-client remove) or choose another --name"
    )]
    Exists(String),
    #[error("no profile in {0}; enrol a device first (tidegate-client enrol URL TOKEN)")]
    None(PathBuf),
    #[error("several profiles in {dir} ({names}); name the one to use")]
    Several { dir: PathBuf, names: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not a profile")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// An enrolled device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The profile's and the interface's name.
    pub name: String,
    /// The Edge (or the nginx in front of the Edges) the device enrolled at.
    pub edge_url: String,
    /// A private CA the Edge's certificate chains to, PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// Made on this host at enrolment; it never leaves it.
    pub private_key: Key,
    /// The last config the Edge gave (an MFA login's preshared key is
    /// never stored: a session lives as long as the tunnel).
    pub config: DeviceConfig,
}

/// Checks a profile name: it names the interface too.
pub fn check_name(name: &str) -> Result<(), ProfileError> {
    let ok = (1..=MAX_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(ProfileError::BadName(name.into()))
    }
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> ProfileError + '_ {
    move |source| ProfileError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Profile {
    fn path(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}.json"))
    }

    /// Reads profile `name`.
    pub fn load(dir: &Path, name: &str) -> Result<Self, ProfileError> {
        check_name(name)?;
        let path = Self::path(dir, name);
        let text = match fs::read(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(ProfileError::Missing {
                    name: name.into(),
                    dir: dir.to_owned(),
                });
            }
            other => other.map_err(io_error(&path))?,
        };
        serde_json::from_slice(&text).map_err(|source| ProfileError::Parse { path, source })
    }

    /// Profile `name`, or the only one there is when no name is given.
    pub fn find(dir: &Path, name: Option<&str>) -> Result<Self, ProfileError> {
        if let Some(name) = name {
            return Self::load(dir, name);
        }
        let names = Self::names(dir)?;
        match names.as_slice() {
            [] => Err(ProfileError::None(dir.to_owned())),
            [one] => Self::load(dir, one),
            many => Err(ProfileError::Several {
                dir: dir.to_owned(),
                names: many.join(", "),
            }),
        }
    }

    /// The names of the profiles in `dir`, sorted.
    pub fn names(dir: &Path) -> Result<Vec<String>, ProfileError> {
        let entries = match fs::read_dir(dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            other => other.map_err(io_error(dir))?,
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error(dir))?;
            let file = entry.file_name();
            let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".json")) else {
                continue;
            };
            if check_name(name).is_ok() {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Writes a new profile: the directory 0700, the file 0600, whole or
    /// not at all. Refuses to replace one.
    pub fn create(&self, dir: &Path) -> Result<(), ProfileError> {
        check_name(&self.name)?;
        if Self::path(dir, &self.name).exists() {
            return Err(ProfileError::Exists(self.name.clone()));
        }
        self.save(dir)
    }

    /// Writes the profile over the one before, atomically.
    pub fn save(&self, dir: &Path) -> Result<(), ProfileError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_error(dir))?;
        let path = Self::path(dir, &self.name);
        let temp = dir.join(format!(".{}.json.new", self.name));
        let text = serde_json::to_vec_pretty(self).map_err(|source| ProfileError::Parse {
            path: path.clone(),
            source,
        })?;
        let write = || -> io::Result<()> {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)?;
            file.write_all(&text)?;
            file.sync_all()?;
            fs::rename(&temp, &path)?;
            fs::File::open(dir)?.sync_all()
        };
        write().map_err(io_error(&path))
    }

    /// Deletes profile `name`.
    pub fn remove(dir: &Path, name: &str) -> Result<(), ProfileError> {
        check_name(name)?;
        let path = Self::path(dir, name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(ProfileError::Missing {
                name: name.into(),
                dir: dir.to_owned(),
            }),
            other => other.map_err(io_error(&path)),
        }
    }
}

/// The profile name for a location: the location's name when it can name
/// an interface.
pub fn default_name(location: &str) -> Option<String> {
    let name = location.to_ascii_lowercase();
    check_name(&name).is_ok().then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    fn profile(name: &str) -> Profile {
        Profile {
            name: name.into(),
            edge_url: "https://vpn.example.com".into(),
            ca_pem: None,
            private_key: Key::new([9; 32]),
            config: DeviceConfig {
                device: "laptop".into(),
                location: "lab".into(),
                addresses: vec!["10.8.0.2/32".into()],
                dns: vec![],
                mtu: None,
                server_public_key: Key::new([1; 32]).to_string(),
                preshared_key: None,
                endpoint: "198.51.100.100:51820".into(),
                allowed_ips: vec!["10.8.0.0/24".into()],
                persistent_keepalive: 25,
                mfa: true,
                session_expires_in_s: None,
            },
        }
    }

    #[test]
    fn names_are_interface_names() {
        for good in ["lab", "tg-office.2", "a", "abcdefghijklmno"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Lab", "a/b", "..", "abcdefghijklmnop", "a b"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(default_name("Lab").as_deref(), Some("lab"));
        assert_eq!(default_name("Main office"), None);
    }

    #[test]
    fn a_profile_is_stored_for_its_owner_only_and_found_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("profiles");
        assert!(matches!(
            Profile::find(&store, None),
            Err(ProfileError::None(_))
        ));
        profile("lab").create(&store).unwrap();
        let meta = fs::metadata(store.join("lab.json")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&store).unwrap().mode() & 0o777, 0o700);
        assert!(matches!(
            profile("lab").create(&store),
            Err(ProfileError::Exists(_))
        ));
        assert_eq!(Profile::find(&store, None).unwrap(), profile("lab"));
        profile("office").create(&store).unwrap();
        let several = Profile::find(&store, None).unwrap_err().to_string();
        assert!(several.contains("(lab, office)"), "{several}");
        assert_eq!(
            Profile::find(&store, Some("office")).unwrap().name,
            "office"
        );
        assert!(matches!(
            Profile::load(&store, "home"),
            Err(ProfileError::Missing { .. })
        ));
        Profile::remove(&store, "office").unwrap();
        assert_eq!(Profile::names(&store).unwrap(), ["lab"]);
        fs::write(store.join("bad.json"), "{").unwrap();
        assert!(matches!(
            Profile::load(&store, "bad"),
            Err(ProfileError::Parse { .. })
        ));
    }
}
