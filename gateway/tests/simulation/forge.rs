//! Forged adverts: what an attacker on the segment, or a gateway of
//! another location, can put before a gateway. Each is dropped by the real
//! receive path (decode, location, replay guard) before the election sees
//! it.
//!
//! | forgery | made from | dropped as |
//! |---|---|---|
//! | `WrongKey` | a MASTER advert of priority 255 handing over to the target, epoch u64::MAX, another key | `Mac` |
//! | `OtherLocation` | the same, with the location's key but another location id | `Location` |
//! | `Tampered` | an advert seen on the segment, one bit flipped after the version | `Mac`, `Length` |
//! | `BadMagic` | an advert seen on the segment, its magic altered | `Magic` |
//! | `NewerVersion` | an advert seen on the segment, labelled a version this release does not read | `Version` |
//! | `Truncated` | an advert seen on the segment, cut short | `Truncated`, `Length` |
//! | `Replayed` | an advert the target already accepted | `Replay` |
//!
//! An epoch of u64::MAX would shut its claimed sender out for good if the
//! replay guard saw it before the location check or the HMAC: the order of
//! the checks is tested too.

use std::time::Duration;

use tidegate_gateway::ha::{
    advert::{Advert, AdvertKey, HEALTH_OK, VERSION},
    machine::Role,
};

use crate::host::{LOCATION_ID, VIPS, key, mac_of};

/// A kind of forged advert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgery {
    WrongKey,
    OtherLocation,
    Tampered,
    BadMagic,
    NewerVersion,
    Truncated,
    Replayed,
}

impl Forgery {
    /// Every kind, for the generator to pick from.
    pub const ALL: [Self; 7] = [
        Self::WrongKey,
        Self::OtherLocation,
        Self::Tampered,
        Self::BadMagic,
        Self::NewerVersion,
        Self::Truncated,
        Self::Replayed,
    ];

    /// The forged bytes for gateway `target`, claiming to come from
    /// `claimed`: from `seen`, an advert the segment carried lately, and
    /// `accepted`, one the target accepted. `None` when there is nothing
    /// to make it from yet.
    pub fn make(
        self,
        rng: &mut fastrand::Rng,
        target: u32,
        claimed: u32,
        seen: Option<&[u8]>,
        accepted: Option<&[u8]>,
    ) -> Option<Vec<u8>> {
        let invented = |location_id| Advert {
            version: VERSION,
            role: Role::Master,
            priority: 255,
            maintenance: false,
            location_id,
            gateway_id: claimed,
            interval: Duration::from_millis(100),
            epoch: u64::MAX,
            sequence: u64::MAX,
            health: HEALTH_OK,
            handover_to: Some(target),
            draining: false,
            preempt: false,
            mac: mac_of(claimed),
            vips: VIPS.to_vec(),
        };
        let mut bytes = match self {
            Self::WrongKey => {
                let other = AdvertKey::new(b"not the location's key".to_vec());
                return Some(invented(LOCATION_ID).encode(&other));
            }
            Self::OtherLocation => return Some(invented(LOCATION_ID + 1).encode(&key())),
            Self::Replayed => return accepted.map(<[u8]>::to_vec),
            _ => seen?.to_vec(),
        };
        match self {
            Self::Tampered => {
                let at = rng.usize(5..bytes.len());
                bytes[at] ^= 1 << rng.u8(0..8);
            }
            Self::BadMagic => bytes[rng.usize(0..4)] ^= 0x20,
            Self::NewerVersion => bytes[4] = VERSION + 1,
            Self::Truncated => bytes.truncate(rng.usize(0..bytes.len())),
            Self::WrongKey | Self::OtherLocation | Self::Replayed => {}
        }
        Some(bytes)
    }
}
