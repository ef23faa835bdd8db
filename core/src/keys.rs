//! WireGuard keys as Core keeps them: 32 bytes, base64 for people.

use std::fmt;

use base64::{Engine as _, engine::general_purpose::STANDARD};

/// Why a string is not a WireGuard key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not valid base64")]
    NotBase64(#[source] base64::DecodeError),
    #[error("decodes to {0} bytes, a WireGuard key is 32")]
    WrongLength(usize),
}

/// A public, private or preshared key. `Debug` shows only a prefix, so a
/// private key in a log line or a panic does not leak.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key([u8; 32]);

impl Key {
    pub const fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A new private key, clamped as X25519 uses it (as `wg genkey` does).
    pub fn generate_private() -> Self {
        let mut bytes = crate::random::<32>();
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Self(bytes)
    }

    /// A new preshared key.
    pub fn generate_preshared() -> Self {
        Self(crate::random())
    }

    /// The public key of this private key.
    pub fn public(&self) -> Self {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        Self(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }

    /// Parses base64 (surrounding white space ignored).
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let bytes = STANDARD.decode(text.trim()).map_err(KeyError::NotBase64)?;
        Self::from_slice(&bytes)
    }

    /// From raw bytes, which must be 32.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        bytes
            .try_into()
            .map(Self)
            .map_err(|_| KeyError::WrongLength(bytes.len()))
    }

    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_matches_wireguard() {
        // From `wg genkey | tee priv | wg pubkey`.
        let private = Key::parse("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").unwrap();
        assert_eq!(
            private.public().to_base64(),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
    }

    #[test]
    fn generated_keys_are_clamped_and_differ() {
        let a = Key::generate_private();
        let b = Key::generate_private();
        assert_ne!(a, b);
        assert_eq!(a.as_bytes()[0] & 7, 0);
        assert_eq!(a.as_bytes()[31] & 0xc0, 0x40);
        assert_eq!(Key::parse(&a.to_base64()).unwrap(), a);
    }

    #[test]
    fn bad_keys_say_why() {
        assert!(matches!(
            Key::parse("not base64!"),
            Err(KeyError::NotBase64(_))
        ));
        assert_eq!(Key::parse("AAAA"), Err(KeyError::WrongLength(3)));
        let key = Key::new([7; 32]);
        assert!(!format!("{key:?}").contains(&key.to_base64()));
    }
}
