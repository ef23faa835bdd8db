//! A device's config for stock WireGuard apps (`tidectl device config`): a
//! wg-quick `.conf`, or the same as a QR code for a terminal; and the
//! device's key pair, made here or read from a file (Core never has the
//! private key). Pure: no I/O.

use std::path::{Path, PathBuf};

use qrcode::{QrCode, render::unicode::Dense1x2};
use tidegate_proto::admin::v1 as admin;
use tidegate_wireguard::{Key, KeyError};

/// Why a key or a QR code could not be made.
#[derive(Debug, thiserror::Error)]
pub enum WgQuickError {
    #[error("not a private key as `wg genkey` prints it")]
    Key(#[source] KeyError),
    #[error("the config does not fit in a QR code")]
    Qr(#[source] qrcode::types::QrError),
    #[error(
        "device {device} has no key yet: give it this one with \
         `tidectl device change {device} --public-key {public}`, or use --new-key"
    )]
    NoKeyYet { device: String, public: String },
    #[error(
        "the private key in {path} is not device {device}'s: its public key is {public}, \
         the device's is {held}"
    )]
    NotTheDevices {
        path: PathBuf,
        device: String,
        public: String,
        held: String,
    },
}

/// A WireGuard key pair, base64 (the private key clamped as `wg genkey`
/// makes it).
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    pub private: String,
    pub public: String,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// A new key pair.
    pub fn generate() -> Result<Self, WgQuickError> {
        Key::generate_private()
            .map(Self::of)
            .map_err(WgQuickError::Key)
    }

    /// The pair of a private key in base64 (white space around ignored).
    pub fn parse_private(text: &str) -> Result<Self, WgQuickError> {
        text.parse::<Key>().map(Self::of).map_err(WgQuickError::Key)
    }

    /// Checks that this is the key pair of `device`, whose public key Core
    /// holds as `held` (empty: none yet); `path` is where the private key
    /// was read.
    pub fn check_is(&self, device: &str, held: &str, path: &Path) -> Result<(), WgQuickError> {
        if held.is_empty() {
            return Err(WgQuickError::NoKeyYet {
                device: device.to_owned(),
                public: self.public.clone(),
            });
        }
        if self.public != held {
            return Err(WgQuickError::NotTheDevices {
                path: path.to_owned(),
                device: device.to_owned(),
                public: self.public.clone(),
                held: held.to_owned(),
            });
        }
        Ok(())
    }

    fn of(private: Key) -> Self {
        Self {
            private: private.to_base64(),
            public: private.public().to_base64(),
        }
    }
}

/// The wg-quick `.conf` of a device: its private key with what Core holds.
/// DNS, MTU, the preshared key and the keepalive are left out when unset.
pub fn render(config: &admin::DeviceConfig, private_key: &str) -> String {
    let mut out = String::from("[Interface]\n");
    out.push_str(&format!("PrivateKey = {private_key}\n"));
    out.push_str(&format!("Address = {}\n", config.addresses.join(", ")));
    if !config.dns.is_empty() {
        out.push_str(&format!("DNS = {}\n", config.dns.join(", ")));
    }
    if config.mtu != 0 {
        out.push_str(&format!("MTU = {}\n", config.mtu));
    }
    out.push_str("\n[Peer]\n");
    out.push_str(&format!("PublicKey = {}\n", config.server_public_key));
    if !config.preshared_key.is_empty() {
        out.push_str(&format!("PresharedKey = {}\n", config.preshared_key));
    }
    out.push_str(&format!("Endpoint = {}\n", config.endpoint));
    out.push_str(&format!("AllowedIPs = {}\n", config.allowed_ips.join(", ")));
    if config.persistent_keepalive_s != 0 {
        out.push_str(&format!(
            "PersistentKeepalive = {}\n",
            config.persistent_keepalive_s
        ));
    }
    out
}

/// `text` as a QR code drawn with Unicode half blocks (two rows a line),
/// light on dark as terminals show it, with its quiet zone.
pub fn qr(text: &str) -> Result<String, WgQuickError> {
    let code = QrCode::new(text.as_bytes()).map_err(WgQuickError::Qr)?;
    Ok(code
        .render::<Dense1x2>()
        .dark_color(Dense1x2::Light)
        .light_color(Dense1x2::Dark)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> admin::DeviceConfig {
        admin::DeviceConfig {
            device: "laptop".into(),
            location: "ams".into(),
            addresses: vec!["10.8.0.2/32".into()],
            dns: vec![],
            mtu: 0,
            server_public_key: "U0VSVkVS".into(),
            preshared_key: "UFNL".into(),
            endpoint: "198.51.100.100:51820".into(),
            allowed_ips: vec!["10.8.0.0/24".into()],
            persistent_keepalive_s: 25,
        }
    }

    #[test]
    fn a_conf_has_what_is_set_and_nothing_else() {
        let ipv6 = admin::DeviceConfig {
            addresses: vec!["10.8.0.2/32".into(), "fd00:8::2/128".into()],
            allowed_ips: vec!["10.8.0.0/24".into(), "fd00:8::/64".into()],
            endpoint: "[2001:db8::1]:51820".into(),
            ..config()
        };
        let cases = [
            (
                "plain IPv4, no DNS or MTU",
                config(),
                "[Interface]\nPrivateKey = PRIV\nAddress = 10.8.0.2/32\n\n\
                 [Peer]\nPublicKey = U0VSVkVS\nPresharedKey = UFNL\n\
                 Endpoint = 198.51.100.100:51820\nAllowedIPs = 10.8.0.0/24\n\
                 PersistentKeepalive = 25\n",
            ),
            (
                "DNS and MTU",
                admin::DeviceConfig {
                    dns: vec!["10.8.0.1".into(), "fd00:8::1".into()],
                    mtu: 1380,
                    ..config()
                },
                "[Interface]\nPrivateKey = PRIV\nAddress = 10.8.0.2/32\n\
                 DNS = 10.8.0.1, fd00:8::1\nMTU = 1380\n\n\
                 [Peer]\nPublicKey = U0VSVkVS\nPresharedKey = UFNL\n\
                 Endpoint = 198.51.100.100:51820\nAllowedIPs = 10.8.0.0/24\n\
                 PersistentKeepalive = 25\n",
            ),
            (
                "IPv6 too",
                ipv6,
                "[Interface]\nPrivateKey = PRIV\nAddress = 10.8.0.2/32, fd00:8::2/128\n\n\
                 [Peer]\nPublicKey = U0VSVkVS\nPresharedKey = UFNL\n\
                 Endpoint = [2001:db8::1]:51820\nAllowedIPs = 10.8.0.0/24, fd00:8::/64\n\
                 PersistentKeepalive = 25\n",
            ),
            (
                "no preshared key, no keepalive",
                admin::DeviceConfig {
                    preshared_key: String::new(),
                    persistent_keepalive_s: 0,
                    ..config()
                },
                "[Interface]\nPrivateKey = PRIV\nAddress = 10.8.0.2/32\n\n\
                 [Peer]\nPublicKey = U0VSVkVS\n\
                 Endpoint = 198.51.100.100:51820\nAllowedIPs = 10.8.0.0/24\n",
            ),
        ];
        for (name, config, want) in cases {
            assert_eq!(render(&config, "PRIV"), want, "{name}");
        }
    }

    #[test]
    fn key_pairs_match_wireguard_and_bad_keys_say_why() {
        // From `wg genkey | tee priv | wg pubkey`.
        let pair =
            KeyPair::parse_private(" yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk= \n").unwrap();
        assert_eq!(pair.public, "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=");
        assert_eq!(pair.private, "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=");
        let new = KeyPair::generate().unwrap();
        assert_eq!(KeyPair::parse_private(&new.private).unwrap(), new);
        assert_ne!(KeyPair::generate().unwrap(), new);
        assert!(!format!("{new:?}").contains(&new.private));
        assert!(matches!(
            KeyPair::parse_private("nope!"),
            Err(WgQuickError::Key(KeyError::NotBase64(_)))
        ));
        assert!(matches!(
            KeyPair::parse_private("AQEBAQEBAQEBAQEBAQEBAQ=="),
            Err(WgQuickError::Key(KeyError::WrongLength(16)))
        ));
    }

    #[test]
    fn a_key_file_must_hold_the_devices_key() {
        let pair = KeyPair::parse_private("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").unwrap();
        let path = Path::new("/etc/wireguard/laptop.key");
        pair.check_is("laptop", &pair.public, path).unwrap();
        let other = KeyPair::generate().unwrap();
        let err = pair.check_is("laptop", &other.public, path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the private key in /etc/wireguard/laptop.key is not device laptop's: \
                 its public key is {}, the device's is {}",
                pair.public, other.public
            )
        );
        let err = pair.check_is("laptop", "", path).unwrap_err();
        assert!(matches!(err, WgQuickError::NoKeyYet { .. }), "{err}");
        assert!(err.to_string().contains("has no key yet"), "{err}");
    }

    #[test]
    fn a_qr_code_is_drawn_in_half_blocks() {
        let drawn = qr(&render(&config(), "PRIV")).unwrap();
        let lines: Vec<&str> = drawn.lines().collect();
        // Square: two modules a character row, quiet zone included.
        let width = lines[0].chars().count();
        assert!(width > 21, "{width}");
        assert_eq!(lines.len(), width.div_ceil(2));
        assert!(
            drawn
                .chars()
                .all(|c| matches!(c, '\n' | ' ' | '█' | '▀' | '▄'))
        );
    }
}
