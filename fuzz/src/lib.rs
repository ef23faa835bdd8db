//! What the fuzz targets share.

use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use tidegate_gateway::ha::advert::AdvertKey;

/// The key every target authenticates with.
pub const KEY: &[u8] = b"tidegate-fuzz-location-key";

pub fn key() -> AdvertKey {
    AdvertKey::new(KEY.to_vec())
}

/// `body` with its HMAC-SHA256 under [`KEY`] appended, as a gateway of the
/// location sends it: what lets the fuzzer reach past authentication into
/// the fields.
pub fn signed(body: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY).expect("HMAC takes any key length");
    mac.update(body);
    let mut out = body.to_vec();
    out.extend_from_slice(&mac.finalize().into_bytes());
    out
}
