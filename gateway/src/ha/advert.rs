//! HA adverts on the wire: a fixed header, the VIPs, and an HMAC-SHA256 over
//! all of it with the location's shared key. Decoding checks everything
//! before anything is believed; [`ReplayGuard`] then drops what is not newer
//! than the sender's last advert.
//!
//! ```text
//!  0  magic "TGHA"            20  epoch (u64)
//!  4  version (2)             28  sequence (u64)
//!  5  role                    36  health bits (u32)
//!  6  priority                40  handover target (u32, 0 = none)
//!  7  flags (bit 0: maint.,   44  sender's Ethernet address (6)
//!     1: draining, 2: preempt) 50 reserved (2, zero)
//!  8  location id (u32)       52  VIPs: count x (family 4|6, 16 address bytes)
//! 12  gateway id (u32)        ..  HMAC-SHA256 (32)
//! 16  interval ms (u16)
//! 18  VIP count (u8), 19 reserved (0)
//! ```
//! All integers are big-endian.
//!
//! Version 2 added the draining and preempt flags and the Ethernet address,
//! which the director needs. Version 1, the previous release's, is the same
//! header up to byte 44 with the VIPs right after it and the maintenance
//! flag alone. This code reads both and writes either: a gateway writes the
//! oldest version it hears from the gateways of its location
//! ([`Machine::version`](super::machine::Machine::version)), so a location
//! upgraded one gateway at a time understands itself throughout.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use super::machine::Role;

/// The first bytes of every advert.
pub const MAGIC: [u8; 4] = *b"TGHA";
/// The newest format, which this code writes unless a gateway of the
/// location speaks an older one.
pub const VERSION: u8 = 2;
/// The oldest format this code reads and writes: the previous release's.
pub const OLDEST_VERSION: u8 = 1;
/// The first version with the preempt flag: a backup asks a master for the
/// VIPs only when the whole location speaks it.
pub const PREEMPT_VERSION: u8 = 2;
/// Most VIPs one advert carries.
pub const MAX_VIPS: usize = 16;
/// The header's length in version 2; version 1's ends at [`MAC_AT`].
const HEADER_LEN: usize = 52;
const VIP_LEN: usize = 17;
const MAC_LEN: usize = 32;
/// Flag bit: the sender is in maintenance.
const FLAG_MAINTENANCE: u8 = 1;
/// Flag bit: the sender is draining (no new clients for it).
const FLAG_DRAINING: u8 = 2;
/// Flag bit: a backup that outranks the master asks it to hand over.
const FLAG_PREEMPT: u8 = 4;
/// Where the sender's Ethernet address sits.
const MAC_AT: usize = 44;
/// Health bit: the sender is healthy overall.
pub const HEALTH_OK: u32 = 1;

/// An advert that cannot be believed, by reason (each has its counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum AdvertError {
    #[error("truncated: {0} bytes")]
    Truncated(usize),
    #[error("not a Tidegate advert (bad magic)")]
    Magic,
    #[error("version {0}, which this release does not read")]
    Version(u8),
    #[error("length {len} does not match {vips} VIPs")]
    Length { len: usize, vips: usize },
    #[error("authentication failed (wrong key or altered)")]
    Mac,
    #[error("malformed: {0}")]
    Malformed(&'static str),
    #[error("from location {0}, not ours")]
    Location(u32),
    #[error("replayed or old: (epoch, sequence) not above the sender's last")]
    Replay,
}

impl AdvertError {
    /// A short name for counters.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Truncated(_) => "truncated",
            Self::Magic => "bad-magic",
            Self::Version(_) => "bad-version",
            Self::Length { .. } => "bad-length",
            Self::Mac => "bad-mac",
            Self::Malformed(_) => "malformed",
            Self::Location(_) => "wrong-location",
            Self::Replay => "replay",
        }
    }
}

/// One advert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advert {
    /// The wire format, [`OLDEST_VERSION`] to [`VERSION`].
    pub version: u8,
    pub role: Role,
    pub priority: u8,
    pub maintenance: bool,
    pub location_id: u32,
    pub gateway_id: u32,
    pub interval: Duration,
    /// New at each daemon start, growing across restarts and clock steps
    /// ([`super::epoch`]).
    pub epoch: u64,
    /// Grows with each advert within an epoch.
    pub sequence: u64,
    pub health: u32,
    pub handover_to: Option<u32>,
    /// The sender takes no new clients (director mode).
    pub draining: bool,
    /// A backup that outranks the master asks it to hand over.
    pub preempt: bool,
    /// The sender's Ethernet address on the public segment, where a
    /// director sends the frames of the clients pinned to it (all zero in
    /// version 1, which does not carry it).
    pub mac: [u8; 6],
    pub vips: Vec<IpAddr>,
}

/// The shared key of a location.
#[derive(Clone, PartialEq, Eq)]
pub struct AdvertKey(Vec<u8>);

impl std::fmt::Debug for AdvertKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdvertKey(..)")
    }
}

impl AdvertKey {
    /// A key from its bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The key's bytes (for other messages authenticated with it).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC takes keys of any length.
        Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC accepts any key length")
    }
}

impl Advert {
    /// The advert on the wire in its `version`, authenticated with `key`.
    /// Flags and the address a version does not carry are left out.
    ///
    /// # Panics
    /// With more than [`MAX_VIPS`] VIPs, which config validation prevents,
    /// or a version outside [`OLDEST_VERSION`]..=[`VERSION`].
    pub fn encode(&self, key: &AdvertKey) -> Vec<u8> {
        assert!(self.vips.len() <= MAX_VIPS, "too many VIPs for an advert");
        let format = Format::of(self.version).expect("a version this code writes");
        let mut out = Vec::with_capacity(format.header_len + self.vips.len() * VIP_LEN + MAC_LEN);
        out.extend_from_slice(&MAGIC);
        out.push(self.version);
        out.push(self.role.code());
        out.push(self.priority);
        let mut flags = 0;
        if self.maintenance {
            flags |= FLAG_MAINTENANCE;
        }
        if self.draining {
            flags |= FLAG_DRAINING;
        }
        if self.preempt {
            flags |= FLAG_PREEMPT;
        }
        out.push(flags & format.flags);
        out.extend_from_slice(&self.location_id.to_be_bytes());
        out.extend_from_slice(&self.gateway_id.to_be_bytes());
        let interval_ms = u16::try_from(self.interval.as_millis()).unwrap_or(u16::MAX);
        out.extend_from_slice(&interval_ms.to_be_bytes());
        out.push(self.vips.len() as u8);
        out.push(0);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.health.to_be_bytes());
        out.extend_from_slice(&self.handover_to.unwrap_or(0).to_be_bytes());
        if format.carries_mac {
            out.extend_from_slice(&self.mac);
            out.extend_from_slice(&[0, 0]);
        }
        for vip in &self.vips {
            let mut addr = [0u8; 16];
            match vip {
                IpAddr::V4(v4) => {
                    out.push(4);
                    addr[..4].copy_from_slice(&v4.octets());
                }
                IpAddr::V6(v6) => {
                    out.push(6);
                    addr = v6.octets();
                }
            }
            out.extend_from_slice(&addr);
        }
        let mut mac = key.mac();
        mac.update(&out);
        out.extend_from_slice(&mac.finalize().into_bytes());
        out
    }

    /// Parses and authenticates `bytes`. Nothing is read from an advert
    /// whose HMAC does not match.
    pub fn decode(bytes: &[u8], key: &AdvertKey) -> Result<Self, AdvertError> {
        // The shortest header of any version, then the one of this version.
        if bytes.len() < MAC_AT + MAC_LEN {
            return Err(AdvertError::Truncated(bytes.len()));
        }
        if bytes[..4] != MAGIC {
            return Err(AdvertError::Magic);
        }
        let version = bytes[4];
        let format = Format::of(version).ok_or(AdvertError::Version(version))?;
        let header_len = format.header_len;
        if bytes.len() < header_len + MAC_LEN {
            return Err(AdvertError::Truncated(bytes.len()));
        }
        let vips = usize::from(bytes[18]);
        if bytes.len() != header_len + vips * VIP_LEN + MAC_LEN {
            return Err(AdvertError::Length {
                len: bytes.len(),
                vips,
            });
        }
        let (body, tag) = bytes.split_at(bytes.len() - MAC_LEN);
        let mut mac = key.mac();
        mac.update(body);
        mac.verify_slice(tag).map_err(|_| AdvertError::Mac)?;

        let u16_at = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
        let u32_at = |at: usize| u32::from_be_bytes(body[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        let role = Role::from_code(body[5]).ok_or(AdvertError::Malformed("unknown role"))?;
        // Version 2's two bytes after the address are reserved too.
        let reserved = body.get(MAC_AT + 6..header_len).unwrap_or_default();
        if body[7] & !format.flags != 0 || body[19] != 0 || reserved.iter().any(|&b| b != 0) {
            return Err(AdvertError::Malformed("reserved bits set"));
        }
        if vips > MAX_VIPS {
            return Err(AdvertError::Malformed("too many VIPs"));
        }
        let interval = Duration::from_millis(u64::from(u16_at(16)));
        if interval.is_zero() {
            return Err(AdvertError::Malformed("zero interval"));
        }
        let gateway_id = u32_at(12);
        if gateway_id == 0 {
            return Err(AdvertError::Malformed("gateway id 0"));
        }
        let vips = body[header_len..]
            .chunks_exact(VIP_LEN)
            .map(|vip| {
                let addr: [u8; 16] = vip[1..].try_into().expect("16 bytes");
                match vip[0] {
                    4 if addr[4..].iter().all(|&b| b == 0) => Ok(IpAddr::V4(Ipv4Addr::new(
                        addr[0], addr[1], addr[2], addr[3],
                    ))),
                    6 => Ok(IpAddr::V6(Ipv6Addr::from(addr))),
                    _ => Err(AdvertError::Malformed("bad VIP")),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut mac = [0; 6];
        if format.carries_mac {
            mac.copy_from_slice(&body[MAC_AT..MAC_AT + 6]);
        }
        Ok(Self {
            version,
            role,
            priority: body[6],
            maintenance: body[7] & FLAG_MAINTENANCE != 0,
            location_id: u32_at(8),
            gateway_id,
            interval,
            epoch: u64_at(20),
            sequence: u64_at(28),
            health: u32_at(36),
            handover_to: Some(u32_at(40)).filter(|&id| id != 0),
            draining: body[7] & FLAG_DRAINING != 0,
            preempt: body[7] & FLAG_PREEMPT != 0,
            mac,
            vips,
        })
    }
}

/// Whether adverts of `version` carry the sender's Ethernet address (a
/// director steers clients only to gateways whose address it knows).
pub fn carries_mac(version: u8) -> bool {
    Format::of(version).is_some_and(|format| format.carries_mac)
}

/// What one version of the format holds.
#[derive(Debug, Clone, Copy)]
struct Format {
    header_len: usize,
    /// The flag bits it defines; the others are reserved (zero).
    flags: u8,
    /// Whether the header carries the sender's Ethernet address (and two
    /// reserved bytes after it).
    carries_mac: bool,
}

impl Format {
    fn of(version: u8) -> Option<Self> {
        match version {
            1 => Some(Self {
                header_len: MAC_AT,
                flags: FLAG_MAINTENANCE,
                carries_mac: false,
            }),
            2 => Some(Self {
                header_len: HEADER_LEN,
                flags: FLAG_MAINTENANCE | FLAG_DRAINING | FLAG_PREEMPT,
                carries_mac: true,
            }),
            _ => None,
        }
    }
}

/// Drops adverts whose (epoch, sequence) is not above the last one accepted
/// from the same sender. Bounded by the number of gateways that passed
/// authentication.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    last: HashMap<u32, (u64, u64)>,
}

impl ReplayGuard {
    /// Accepts `advert` if it is newer than the sender's last.
    pub fn check(&mut self, advert: &Advert) -> Result<(), AdvertError> {
        let stamp = (advert.epoch, advert.sequence);
        match self.last.get(&advert.gateway_id) {
            Some(&last) if stamp <= last => Err(AdvertError::Replay),
            _ => {
                self.last.insert(advert.gateway_id, stamp);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AdvertKey {
        AdvertKey::new(b"location shared key".to_vec())
    }

    fn sample() -> Advert {
        Advert {
            version: VERSION,
            role: Role::Master,
            priority: 150,
            maintenance: true,
            location_id: 7,
            gateway_id: 2,
            interval: Duration::from_millis(100),
            epoch: 1_700_000_000_000,
            sequence: 42,
            health: HEALTH_OK,
            handover_to: Some(3),
            draining: true,
            preempt: true,
            mac: [0x02, 0, 0, 0, 0x0a, 0x01],
            vips: vec![
                "198.51.100.100".parse().unwrap(),
                "2001:db8::100".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn round_trips() {
        let bytes = sample().encode(&key());
        assert_eq!(bytes.len(), HEADER_LEN + 2 * VIP_LEN + MAC_LEN);
        assert_eq!(&bytes[..4], b"TGHA");
        assert_eq!(Advert::decode(&bytes, &key()).unwrap(), sample());
    }

    #[test]
    fn a_wrong_key_or_any_flipped_bit_fails_authentication() {
        let bytes = sample().encode(&key());
        assert_eq!(
            Advert::decode(&bytes, &AdvertKey::new(b"other".to_vec())),
            Err(AdvertError::Mac)
        );
        // Past the fields checked before the MAC (magic, version, count).
        for i in (5..18).chain(19..bytes.len()) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert_eq!(
                Advert::decode(&bad, &key()),
                Err(AdvertError::Mac),
                "byte {i}"
            );
        }
    }

    #[test]
    fn framing_errors_are_named() {
        let bytes = sample().encode(&key());
        for len in [0, 10, HEADER_LEN + MAC_LEN - 1] {
            assert_eq!(
                Advert::decode(&bytes[..len], &key()),
                Err(AdvertError::Truncated(len))
            );
        }
        assert_eq!(
            Advert::decode(&bytes[..bytes.len() - 1], &key()),
            Err(AdvertError::Length {
                len: bytes.len() - 1,
                vips: 2
            })
        );
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert_eq!(Advert::decode(&bad, &key()), Err(AdvertError::Magic));
        for version in [0, 3, 9] {
            let mut bad = bytes.clone();
            bad[4] = version;
            assert_eq!(
                Advert::decode(&bad, &key()),
                Err(AdvertError::Version(version))
            );
        }
        // Version 2's bytes labelled version 1 are 8 bytes too long for it.
        let mut relabelled = bytes.clone();
        relabelled[4] = 1;
        assert_eq!(
            Advert::decode(&relabelled, &key()),
            Err(AdvertError::Length {
                len: bytes.len(),
                vips: 2
            })
        );
        let mut old = sample();
        old.version = 1;
        let old = old.encode(&key());
        assert_eq!(
            Advert::decode(&old[..MAC_AT + MAC_LEN - 1], &key()),
            Err(AdvertError::Truncated(MAC_AT + MAC_LEN - 1))
        );
    }

    /// A version 1 advert as the previous release sends it, byte by byte:
    /// the header ends at the handover target, the VIPs follow.
    fn previous_release_advert() -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(b"TGHA");
        body.extend_from_slice(&[1, 2, 150, 1]); // version, MASTER, priority, maintenance
        body.extend_from_slice(&7u32.to_be_bytes()); // location
        body.extend_from_slice(&2u32.to_be_bytes()); // gateway
        body.extend_from_slice(&100u16.to_be_bytes()); // interval ms
        body.extend_from_slice(&[2, 0]); // VIP count, reserved
        body.extend_from_slice(&1_700_000_000_000u64.to_be_bytes());
        body.extend_from_slice(&42u64.to_be_bytes());
        body.extend_from_slice(&HEALTH_OK.to_be_bytes());
        body.extend_from_slice(&3u32.to_be_bytes()); // handover target
        body.push(4);
        body.extend_from_slice(&[198, 51, 100, 100]);
        body.extend_from_slice(&[0; 12]);
        body.push(6);
        body.extend_from_slice(&"2001:db8::100".parse::<Ipv6Addr>().unwrap().octets());
        let mut mac = key().mac();
        mac.update(&body);
        body.extend_from_slice(&mac.finalize().into_bytes());
        body
    }

    #[test]
    fn the_previous_release_s_adverts_are_read_and_written() {
        let bytes = previous_release_advert();
        let expected = Advert {
            version: 1,
            draining: false,
            preempt: false,
            mac: [0; 6],
            ..sample()
        };
        assert_eq!(Advert::decode(&bytes, &key()).unwrap(), expected);
        // Written in version 1, the flags and the address version 1 lacks
        // are left out: the previous release reads exactly its own format.
        let mut advert = sample();
        advert.version = 1;
        assert_eq!(advert.encode(&key()), bytes);
        // Its reserved flag bits include version 2's.
        for flag in [FLAG_DRAINING, FLAG_PREEMPT] {
            let mut body = bytes[..bytes.len() - MAC_LEN].to_vec();
            body[7] |= flag;
            let mut mac = key().mac();
            mac.update(&body);
            body.extend_from_slice(&mac.finalize().into_bytes());
            assert_eq!(
                Advert::decode(&body, &key()),
                Err(AdvertError::Malformed("reserved bits set")),
                "flag {flag}"
            );
        }
    }

    #[test]
    fn each_flag_and_the_address_are_carried_and_reserved_bits_refused() {
        for flag in 0..3 {
            let mut advert = sample();
            advert.maintenance = flag == 0;
            advert.draining = flag == 1;
            advert.preempt = flag == 2;
            let decoded = Advert::decode(&advert.encode(&key()), &key()).unwrap();
            assert_eq!(decoded, advert, "flag {flag}");
        }
        assert_eq!(sample().mac, [0x02, 0, 0, 0, 0x0a, 0x01]);
        for (at, value) in [(7, 8u8), (7, 0x80), (50, 1), (51, 0x80)] {
            let mut body = sample().encode(&key());
            body.truncate(body.len() - MAC_LEN);
            body[at] |= value;
            let mut mac = key().mac();
            mac.update(&body);
            body.extend_from_slice(&mac.finalize().into_bytes());
            assert_eq!(
                Advert::decode(&body, &key()),
                Err(AdvertError::Malformed("reserved bits set")),
                "byte {at}"
            );
        }
    }

    #[test]
    fn authenticated_nonsense_is_still_refused() {
        type Change = fn(&mut Advert);
        let cases: [(Change, &str); 3] = [
            (|a| a.gateway_id = 0, "gateway id 0"),
            (|a| a.interval = Duration::ZERO, "zero interval"),
            (|a| a.vips.clear(), ""),
        ];
        for (change, expected) in cases {
            let mut advert = sample();
            change(&mut advert);
            let result = Advert::decode(&advert.encode(&key()), &key());
            if expected.is_empty() {
                assert!(result.is_ok());
            } else {
                assert_eq!(result, Err(AdvertError::Malformed(expected)));
            }
        }
        // A role code nobody sends, with a valid MAC.
        let mut body = sample().encode(&key());
        body.truncate(body.len() - MAC_LEN);
        body[5] = 9;
        let mut mac = key().mac();
        mac.update(&body);
        body.extend_from_slice(&mac.finalize().into_bytes());
        assert_eq!(
            Advert::decode(&body, &key()),
            Err(AdvertError::Malformed("unknown role"))
        );
    }

    #[test]
    fn replays_are_dropped_and_a_restarted_sender_is_heard() {
        let mut guard = ReplayGuard::default();
        let mut advert = sample();
        guard.check(&advert).unwrap();
        assert_eq!(guard.check(&advert), Err(AdvertError::Replay));
        advert.sequence = 41;
        assert_eq!(guard.check(&advert), Err(AdvertError::Replay));
        advert.sequence = 43;
        guard.check(&advert).unwrap();
        // Restarted: a later epoch, the sequence starts again.
        advert.epoch += 5_000;
        advert.sequence = 0;
        guard.check(&advert).unwrap();
        // Another sender has its own sequence.
        advert.gateway_id = 9;
        advert.sequence = 0;
        guard.check(&advert).unwrap();
    }
}
