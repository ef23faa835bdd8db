//! WireGuard keys: 32 bytes, written as base64 the way `wg` prints them.

use std::{fmt, str::FromStr};

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a WireGuard key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not valid base64")]
    NotBase64(#[source] base64::DecodeError),
    #[error("decodes to {0} bytes, a WireGuard key is 32")]
    WrongLength(usize),
    #[error("the operating system's random source failed: {0}")]
    Random(getrandom::Error),
}

fn random() -> Result<[u8; 32], KeyError> {
    let mut bytes = [0; 32];
    getrandom::getrandom(&mut bytes).map_err(KeyError::Random)?;
    Ok(bytes)
}

/// A public, private or preshared key.
///
/// `Debug` prints only a short prefix, so a private key in a log line or a
/// panic message does not leak.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key([u8; 32]);

impl Key {
    /// The key's bytes.
    pub const fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key's bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The all-zero key, which WireGuard uses for "no preshared key".
    pub const fn is_zero(&self) -> bool {
        let mut i = 0;
        while i < 32 {
            if self.0[i] != 0 {
                return false;
            }
            i += 1;
        }
        true
    }

    /// The private key as X25519 uses it (RFC 7748 clamping), which is
    /// also how WireGuard stores and reports it. Keys from `wg genkey` are
    /// clamped already.
    pub const fn clamped(self) -> Self {
        let mut bytes = self.0;
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Self(bytes)
    }

    /// A new private key from the operating system's random source,
    /// clamped as `wg genkey` makes them.
    pub fn generate_private() -> Result<Self, KeyError> {
        Ok(Self(random()?).clamped())
    }

    /// A new preshared key (`wg genpsk`).
    pub fn generate_preshared() -> Result<Self, KeyError> {
        random().map(Self)
    }

    /// The public key of this private key.
    pub fn public(&self) -> Self {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        Self(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    /// The key as base64.
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
    }
}

impl FromStr for Key {
    type Err = KeyError;

    fn from_str(s: &str) -> Result<Self, KeyError> {
        let bytes = STANDARD.decode(s.trim()).map_err(KeyError::NotBase64)?;
        let bytes: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::WrongLength(bytes.len()))?;
        Ok(Self(bytes))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({}…)", &self.to_base64()[..8])
    }
}

impl Serialize for Key {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_base64())
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_base64() {
        let text = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
        let key: Key = text.parse().unwrap();
        assert_eq!(key.to_string(), text);
        assert!(!key.is_zero());
        assert!(Key::new([0; 32]).is_zero());
        assert_eq!(format!("{key:?}"), "Key(yAnz5TF+…)");
    }

    #[test]
    fn clamping_matches_x25519() {
        let key = Key::new([0xff; 32]).clamped();
        assert_eq!(key.as_bytes()[0], 0xf8);
        assert_eq!(key.as_bytes()[31], 0x7f);
        assert_eq!(key.as_bytes()[1..31], [0xff; 30]);
        assert_eq!(Key::new([0; 32]).clamped().as_bytes()[31], 0x40);
        assert_eq!(key.clamped(), key);
    }

    #[test]
    fn the_public_key_is_x25519s() {
        // RFC 7748, section 6.1: Alice's key pair.
        let hex = |s: &str| -> [u8; 32] {
            std::array::from_fn(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
        };
        let private = Key::new(hex(
            "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
        ));
        let public = hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(private.public().as_bytes(), &public);
        let made = Key::generate_private().unwrap();
        assert_eq!(made.clamped(), made);
        assert_ne!(made, Key::generate_private().unwrap());
    }

    #[test]
    fn rejects_what_is_not_a_key() {
        assert!(matches!(
            "not base64!".parse::<Key>(),
            Err(KeyError::NotBase64(_))
        ));
        assert_eq!("AAAA".parse::<Key>().unwrap_err(), KeyError::WrongLength(3));
        let long = STANDARD.encode([1u8; 33]);
        assert_eq!(long.parse::<Key>().unwrap_err(), KeyError::WrongLength(33));
    }
}
