//! Endpoint sharing on the wire: each gateway tells the others, over the HA
//! transport (the advert socket and destinations, a message type of its
//! own), which clients it has sessions with: each peer's public key, the
//! endpoint it last saw it at, and the time of its last handshake. A
//! gateway that becomes master then knows where to kick a handshake to.
//!
//! Messages are authenticated with HMAC-SHA256 and the location's HA key,
//! and carry an (epoch, sequence) pair per sender, checked by
//! [`ReplayWindow`]. A burst of datagrams may arrive out of order, so the
//! window accepts a sequence it has not seen within the last
//! [`REPLAY_WINDOW`] of the highest.
//!
//! ```text
//!  0  magic "TGEP"            16  epoch (u64)
//!  4  version (1)             24  sequence (u64)
//!  5  kind (0 changes,        32  sender's MAC address (6)
//!        1 full refresh)      38  part (u16): this datagram's place in a refresh
//!  6  entry count (u16)       40  parts (u16): datagrams in the refresh
//!  8  location id (u32)       42  reserved (u16, 0)
//! 12  gateway id (u32)        44  entries, 60 bytes each:
//!                                   0  public key (32)
//!                                  32  last handshake, Unix ms (u64)
//!                                  40  family (4|6), flags, port (u16)
//!                                  44  address (16; IPv4 in the first 4)
//!                             ..  HMAC-SHA256 (32)
//! ```
//! All integers are big-endian.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, SystemTime},
};

use hmac::{Hmac, Mac as _};
use sha2::Sha256;

use crate::ha::advert::AdvertKey;
use crate::wireguard::{Key, PeerEndpoint};

/// The first bytes of every endpoint message.
pub const MAGIC: [u8; 4] = *b"TGEP";
/// The format this code reads and writes.
pub const VERSION: u8 = 1;
/// The longest datagram sent: fits any path MTU of 1280 or more.
pub const MAX_DATAGRAM: usize = 1200;
const HEADER_LEN: usize = 44;
const ENTRY_LEN: usize = 60;
const MAC_LEN: usize = 32;
/// Entries in one datagram.
pub const ENTRIES_PER_DATAGRAM: usize = (MAX_DATAGRAM - HEADER_LEN - MAC_LEN) / ENTRY_LEN;
/// How far below the highest sequence seen a late datagram is still taken.
pub const REPLAY_WINDOW: u64 = 64;

/// What a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The entries that changed since the sender's last message.
    Changes,
    /// Part of the sender's whole table.
    Refresh,
}

/// Entry flag: the handshake was one the gateway kicked after a failover,
/// not one the client started; it says where the client is, but not that
/// its user was active (MFA timers do not count it).
const FLAG_KICKED: u8 = 1;

/// One endpoint message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    pub location_id: u32,
    pub gateway_id: u32,
    /// New at each daemon start, growing (start time in ms).
    pub epoch: u64,
    /// Grows with each message within an epoch.
    pub sequence: u64,
    /// The sender's public interface MAC address (where a handover sends
    /// the frames of its sessions).
    pub mac: [u8; 6],
    /// This datagram's place in a refresh (0 for changes).
    pub part: u16,
    /// Datagrams in the refresh (1 for changes).
    pub parts: u16,
    pub entries: Vec<PeerEndpoint>,
}

/// A message that cannot be believed, by reason (each has its counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("truncated: {0} bytes")]
    Truncated(usize),
    #[error("not an endpoint message (bad magic)")]
    Magic,
    #[error("version {0}, expected {VERSION}")]
    Version(u8),
    #[error("length {len} does not match {entries} entries")]
    Length { len: usize, entries: usize },
    #[error("authentication failed (wrong key or altered)")]
    Mac,
    #[error("malformed: {0}")]
    Malformed(&'static str),
    #[error("from location {0}, not ours")]
    Location(u32),
    #[error("replayed or old: (epoch, sequence) already seen or too old")]
    Replay,
}

impl WireError {
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

/// Whether `bytes` claim to be an endpoint message (before any check).
pub fn is_endpoint_message(bytes: &[u8]) -> bool {
    bytes.len() >= 4 && bytes[..4] == MAGIC
}

impl Message {
    /// The message on the wire, authenticated with `key`.
    ///
    /// # Panics
    /// With more than [`ENTRIES_PER_DATAGRAM`] entries: [`split`] makes
    /// messages that fit.
    pub fn encode(&self, key: &AdvertKey) -> Vec<u8> {
        assert!(
            self.entries.len() <= ENTRIES_PER_DATAGRAM,
            "too many entries for one datagram"
        );
        let mut out = Vec::with_capacity(HEADER_LEN + self.entries.len() * ENTRY_LEN + MAC_LEN);
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(match self.kind {
            Kind::Changes => 0,
            Kind::Refresh => 1,
        });
        out.extend_from_slice(&(self.entries.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.location_id.to_be_bytes());
        out.extend_from_slice(&self.gateway_id.to_be_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.sequence.to_be_bytes());
        out.extend_from_slice(&self.mac);
        out.extend_from_slice(&self.part.to_be_bytes());
        out.extend_from_slice(&self.parts.to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        for entry in &self.entries {
            out.extend_from_slice(entry.key.as_bytes());
            out.extend_from_slice(&unix_ms(entry.last_handshake).to_be_bytes());
            let mut addr = [0u8; 16];
            let family = match entry.endpoint.ip() {
                IpAddr::V4(v4) => {
                    addr[..4].copy_from_slice(&v4.octets());
                    4
                }
                IpAddr::V6(v6) => {
                    addr = v6.octets();
                    6
                }
            };
            out.extend_from_slice(&[family, if entry.kicked { FLAG_KICKED } else { 0 }]);
            out.extend_from_slice(&entry.endpoint.port().to_be_bytes());
            out.extend_from_slice(&addr);
        }
        let mut mac = mac(key);
        mac.update(&out);
        out.extend_from_slice(&mac.finalize().into_bytes());
        out
    }

    /// Parses and authenticates `bytes`. Nothing is read from a message
    /// whose HMAC does not match.
    pub fn decode(bytes: &[u8], key: &AdvertKey) -> Result<Self, WireError> {
        if bytes.len() < HEADER_LEN + MAC_LEN {
            return Err(WireError::Truncated(bytes.len()));
        }
        if bytes[..4] != MAGIC {
            return Err(WireError::Magic);
        }
        if bytes[4] != VERSION {
            return Err(WireError::Version(bytes[4]));
        }
        let count = usize::from(u16::from_be_bytes([bytes[6], bytes[7]]));
        if bytes.len() != HEADER_LEN + count * ENTRY_LEN + MAC_LEN {
            return Err(WireError::Length {
                len: bytes.len(),
                entries: count,
            });
        }
        let (body, tag) = bytes.split_at(bytes.len() - MAC_LEN);
        let mut mac = mac(key);
        mac.update(body);
        mac.verify_slice(tag).map_err(|_| WireError::Mac)?;

        let u16_at = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
        let u32_at = |at: usize| u32::from_be_bytes(body[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().expect("8 bytes"));
        let kind = match body[5] {
            0 => Kind::Changes,
            1 => Kind::Refresh,
            _ => return Err(WireError::Malformed("unknown kind")),
        };
        if body[42..44] != [0, 0] {
            return Err(WireError::Malformed("reserved bytes set"));
        }
        let gateway_id = u32_at(12);
        if gateway_id == 0 {
            return Err(WireError::Malformed("gateway id 0"));
        }
        let (part, parts) = (u16_at(38), u16_at(40));
        if parts == 0 || part >= parts {
            return Err(WireError::Malformed("part outside the refresh"));
        }
        let entries = body[HEADER_LEN..]
            .chunks_exact(ENTRY_LEN)
            .map(|raw| {
                let key = Key::new(raw[..32].try_into().expect("32 bytes"));
                let ms = u64::from_be_bytes(raw[32..40].try_into().expect("8 bytes"));
                let port = u16::from_be_bytes([raw[42], raw[43]]);
                let addr: [u8; 16] = raw[44..60].try_into().expect("16 bytes");
                let ip = match raw[40] {
                    4 if addr[4..].iter().all(|&b| b == 0) => {
                        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
                    }
                    6 => IpAddr::V6(Ipv6Addr::from(addr)),
                    _ => return Err(WireError::Malformed("bad address")),
                };
                if raw[41] & !FLAG_KICKED != 0 || port == 0 || ip.is_unspecified() || key.is_zero()
                {
                    return Err(WireError::Malformed("bad entry"));
                }
                Ok(PeerEndpoint {
                    key,
                    endpoint: SocketAddr::new(ip, port),
                    last_handshake: SystemTime::UNIX_EPOCH + Duration::from_millis(ms),
                    kicked: raw[41] & FLAG_KICKED != 0,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut mac_addr = [0u8; 6];
        mac_addr.copy_from_slice(&body[32..38]);
        Ok(Self {
            kind,
            location_id: u32_at(8),
            gateway_id,
            epoch: u64_at(16),
            sequence: u64_at(24),
            mac: mac_addr,
            part,
            parts,
            entries,
        })
    }
}

/// `entries` as messages of at most [`ENTRIES_PER_DATAGRAM`] entries each,
/// numbered as parts of one `kind` message; `template` gives the header
/// (its sequence is the first message's, the rest follow). At least one
/// message, empty if there are no entries: an empty refresh still tells
/// the others this gateway's MAC and that it is there.
pub fn split(template: &Message, kind: Kind, entries: &[PeerEndpoint]) -> Vec<Message> {
    let chunks: Vec<&[PeerEndpoint]> = if entries.is_empty() {
        vec![&[]]
    } else {
        entries.chunks(ENTRIES_PER_DATAGRAM).collect()
    };
    // A refresh of more than 65,535 datagrams (over a million entries)
    // cannot be numbered; the table is capped far below that.
    let parts = u16::try_from(chunks.len()).unwrap_or(u16::MAX);
    let numbered = kind == Kind::Refresh;
    chunks
        .into_iter()
        .take(usize::from(parts))
        .enumerate()
        .map(|(i, chunk)| Message {
            kind,
            sequence: template.sequence + i as u64,
            part: if numbered { i as u16 } else { 0 },
            parts: if numbered { parts } else { 1 },
            entries: chunk.to_vec(),
            ..template.clone()
        })
        .collect()
}

fn mac(key: &AdvertKey) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC accepts any key length")
}

/// Unix milliseconds of `time` (0 before the epoch).
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Per sender: the highest (epoch, sequence) seen and which of the
/// [`REPLAY_WINDOW`] sequences below it were seen too. Bounded by the
/// number of gateways that passed authentication.
#[derive(Debug, Default)]
pub struct ReplayWindow {
    senders: HashMap<u32, Seen>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    epoch: u64,
    highest: u64,
    /// Bit `i`: sequence `highest - i` was seen.
    bits: u64,
}

impl ReplayWindow {
    /// Accepts a message from `gateway_id` with `(epoch, sequence)` if it
    /// was not seen before and is not too old.
    pub fn check(&mut self, gateway_id: u32, epoch: u64, sequence: u64) -> Result<(), WireError> {
        let fresh = Seen {
            epoch,
            highest: sequence,
            bits: 1,
        };
        let Some(seen) = self.senders.get_mut(&gateway_id) else {
            self.senders.insert(gateway_id, fresh);
            return Ok(());
        };
        if epoch < seen.epoch {
            return Err(WireError::Replay);
        }
        if epoch > seen.epoch {
            *seen = fresh;
            return Ok(());
        }
        if sequence > seen.highest {
            let shift = sequence - seen.highest;
            seen.bits = if shift >= 64 { 0 } else { seen.bits << shift } | 1;
            seen.highest = sequence;
            return Ok(());
        }
        let age = seen.highest - sequence;
        if age >= REPLAY_WINDOW || seen.bits & (1 << age) != 0 {
            return Err(WireError::Replay);
        }
        seen.bits |= 1 << age;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> AdvertKey {
        AdvertKey::new(b"location shared key".to_vec())
    }

    fn entry(n: u8, endpoint: &str, ms: u64) -> PeerEndpoint {
        PeerEndpoint {
            key: Key::new([n; 32]),
            endpoint: endpoint.parse().unwrap(),
            last_handshake: SystemTime::UNIX_EPOCH + Duration::from_millis(ms),
            kicked: n.is_multiple_of(2),
        }
    }

    fn sample() -> Message {
        Message {
            kind: Kind::Refresh,
            location_id: 7,
            gateway_id: 2,
            epoch: 1_700_000_000_000,
            sequence: 42,
            mac: [2, 0, 0, 0, 0, 9],
            part: 1,
            parts: 3,
            entries: vec![
                entry(1, "198.51.100.7:40000", 1_700_000_001_234),
                entry(2, "[2001:db8::7]:51820", 1_700_000_002_000),
            ],
        }
    }

    #[test]
    fn round_trips() {
        let bytes = sample().encode(&key());
        assert_eq!(bytes.len(), HEADER_LEN + 2 * ENTRY_LEN + MAC_LEN);
        assert!(is_endpoint_message(&bytes));
        assert_eq!(Message::decode(&bytes, &key()).unwrap(), sample());
        assert_eq!(ENTRIES_PER_DATAGRAM, 18);
        let full = Message {
            entries: (0..ENTRIES_PER_DATAGRAM as u8)
                .map(|n| entry(n + 1, "203.0.113.9:1", 1))
                .collect(),
            ..sample()
        };
        let bytes = full.encode(&key());
        assert!(bytes.len() <= MAX_DATAGRAM, "{}", bytes.len());
        assert_eq!(Message::decode(&bytes, &key()).unwrap(), full);
    }

    #[test]
    fn a_wrong_key_or_any_flipped_bit_fails_authentication() {
        let bytes = sample().encode(&key());
        assert_eq!(
            Message::decode(&bytes, &AdvertKey::new(b"other".to_vec())),
            Err(WireError::Mac)
        );
        // Past the fields checked before the MAC (magic, version, count).
        for i in (5..6).chain(8..bytes.len()) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            assert_eq!(
                Message::decode(&bad, &key()),
                Err(WireError::Mac),
                "byte {i}"
            );
        }
    }

    #[test]
    fn framing_errors_are_named() {
        let bytes = sample().encode(&key());
        assert_eq!(
            Message::decode(&bytes[..20], &key()),
            Err(WireError::Truncated(20))
        );
        assert_eq!(
            Message::decode(&bytes[..bytes.len() - 1], &key()),
            Err(WireError::Length {
                len: bytes.len() - 1,
                entries: 2
            })
        );
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(!is_endpoint_message(&bad));
        assert_eq!(Message::decode(&bad, &key()), Err(WireError::Magic));
        let mut bad = bytes;
        bad[4] = 2;
        assert_eq!(Message::decode(&bad, &key()), Err(WireError::Version(2)));
        // An advert is not an endpoint message.
        assert!(!is_endpoint_message(b"TGHA\x01"));
    }

    #[test]
    fn authenticated_nonsense_is_still_refused() {
        type Change = fn(&mut Message);
        let cases: [(Change, &str); 4] = [
            (|m| m.gateway_id = 0, "gateway id 0"),
            (|m| m.part = 3, "part outside the refresh"),
            (|m| m.entries[0].endpoint.set_port(0), "bad entry"),
            (|m| m.entries[1].key = Key::new([0; 32]), "bad entry"),
        ];
        for (change, expected) in cases {
            let mut message = sample();
            change(&mut message);
            assert_eq!(
                Message::decode(&message.encode(&key()), &key()),
                Err(WireError::Malformed(expected))
            );
        }
        // A family nobody sends, with a valid MAC.
        let mut body = sample().encode(&key());
        body.truncate(body.len() - MAC_LEN);
        body[HEADER_LEN + 40] = 5;
        let mut tag = mac(&key());
        tag.update(&body);
        body.extend_from_slice(&tag.finalize().into_bytes());
        assert_eq!(
            Message::decode(&body, &key()),
            Err(WireError::Malformed("bad address"))
        );
    }

    #[test]
    fn a_table_is_split_into_numbered_datagrams() {
        let entries: Vec<PeerEndpoint> = (0..40u8)
            .map(|n| entry(n + 1, "198.51.100.9:1000", u64::from(n)))
            .collect();
        let parts = split(&sample(), Kind::Refresh, &entries);
        assert_eq!(parts.len(), 3);
        assert_eq!(
            parts.iter().map(|m| m.entries.len()).collect::<Vec<_>>(),
            [18, 18, 4]
        );
        for (i, part) in parts.iter().enumerate() {
            assert_eq!((part.part, part.parts), (i as u16, 3));
            assert_eq!(part.sequence, 42 + i as u64);
            let bytes = part.encode(&key());
            assert!(bytes.len() <= MAX_DATAGRAM);
            assert_eq!(&Message::decode(&bytes, &key()).unwrap(), part);
        }
        let all: Vec<PeerEndpoint> = parts.into_iter().flat_map(|m| m.entries).collect();
        assert_eq!(all, entries);
        // Changes are never numbered; nothing still makes one message.
        let changes = split(&sample(), Kind::Changes, &entries[..20]);
        assert!(changes.iter().all(|m| (m.part, m.parts) == (0, 1)));
        let empty = split(&sample(), Kind::Refresh, &[]);
        assert_eq!(empty.len(), 1);
        assert!(empty[0].entries.is_empty());
        assert_eq!((empty[0].part, empty[0].parts), (0, 1));
    }

    #[test]
    fn the_replay_window_takes_late_datagrams_once() {
        let mut window = ReplayWindow::default();
        window.check(2, 10, 100).unwrap();
        assert_eq!(window.check(2, 10, 100), Err(WireError::Replay));
        // Out of order within a burst: taken once each.
        window.check(2, 10, 103).unwrap();
        window.check(2, 10, 101).unwrap();
        window.check(2, 10, 102).unwrap();
        assert_eq!(window.check(2, 10, 101), Err(WireError::Replay));
        // Too far behind the highest.
        window.check(2, 10, 200).unwrap();
        assert_eq!(
            window.check(2, 10, 200 - REPLAY_WINDOW),
            Err(WireError::Replay)
        );
        window.check(2, 10, 200 - REPLAY_WINDOW + 1).unwrap();
        // A jump past the window forgets what it saw.
        window.check(2, 10, 1000).unwrap();
        window.check(2, 10, 999).unwrap();
        // A restarted sender: a later epoch starts again; an older one is
        // refused.
        window.check(2, 11, 0).unwrap();
        assert_eq!(window.check(2, 10, 5000), Err(WireError::Replay));
        // Senders are apart.
        window.check(3, 1, 0).unwrap();
    }
}
