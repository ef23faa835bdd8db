//! The director: on the gateway holding the VIPs, session-consistent
//! steering of WireGuard clients across the location's gateways.
//!
//! A client (its source address and port, a [`ClientKey`]) is pinned to a
//! backend gateway in the `SESSIONS` LRU map the first time it is seen; the
//! pin is picked from a Maglev table that user space builds from the
//! healthy, non-draining gateways. Backends are named by a small slot, which
//! is the gateway id (1 to [`MAX_BACKEND_ID`]); slot 0 means "no backend".
//! A frame for this gateway passes to the local stack; a frame for another
//! gateway on the same segment gets its Ethernet addresses rewritten and
//! goes back out (`XDP_TX`), and that gateway answers the client directly
//! from the VIP it holds on `lo`.

use crate::client::ClientKey;

/// Backend slots: one per gateway id, 0 unused.
pub const MAX_BACKENDS: usize = 256;
/// The highest gateway id that can be a backend.
pub const MAX_BACKEND_ID: u32 = MAX_BACKENDS as u32 - 1;
/// The largest Maglev table the program holds (a prime).
pub const MAX_TABLE_SIZE: usize = 65537;
/// The Maglev table's size unless configured otherwise.
pub const DEFAULT_TABLE_SIZE: u32 = MAX_TABLE_SIZE as u32;
/// Pins the session map holds unless configured otherwise; the least
/// recently used pin makes room for a new one when it is full.
pub const DEFAULT_MAX_SESSIONS: u32 = 262_144;

/// [`Director::flags`]: steer (this gateway is the master in director mode).
pub const DIRECTOR_ON: u32 = 1;

/// [`Backend::flags`]: the slot holds a gateway that takes traffic.
pub const BACKEND_PRESENT: u8 = 1;
/// [`Backend::flags`]: the backend is this gateway: its frames pass to the
/// local stack.
pub const BACKEND_LOCAL: u8 = 2;
/// [`Backend::flags`]: the backend keeps its pinned clients but gets no new
/// ones.
pub const BACKEND_DRAINING: u8 = 4;

/// The program's `DIRECTOR` global (section `maps::DIRECTOR`), written by
/// user space.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Director {
    /// This gateway's Ethernet address: the source of the frames it steers.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
    /// [`DIRECTOR_ON`] or 0.
    pub flags: u32,
    /// Entries of the Maglev table in use: a prime up to [`MAX_TABLE_SIZE`].
    pub table_size: u32,
    /// The director's term: user space counts it up each time steering
    /// turns on. A pin made in an earlier term is made again from the
    /// table, as a new master would make it.
    pub generation: u32,
    pub _pad2: u32,
}

const _: () = assert!(size_of::<Director>() == 24);

impl Director {
    /// Off, with no table.
    pub const OFF: Self = Self {
        mac: [0; 6],
        _pad: [0; 2],
        flags: 0,
        table_size: 0,
        generation: 0,
        _pad2: 0,
    };
}

/// One backend slot. Eight bytes, so the program reads the address and the
/// flags with one load.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// The gateway's Ethernet address on the segment.
    pub mac: [u8; 6],
    /// [`BACKEND_PRESENT`], [`BACKEND_LOCAL`], [`BACKEND_DRAINING`].
    pub flags: u8,
    pub _pad: u8,
}

const _: () = assert!(size_of::<Backend>() == 8);

impl Backend {
    /// An empty slot.
    pub const ABSENT: Self = Self {
        mac: [0; 6],
        flags: 0,
        _pad: 0,
    };
}

/// The program's `BACKENDS` global (section `maps::BACKENDS`): a slot per
/// gateway id.
pub type BackendTable = [Backend; MAX_BACKENDS];

/// The program's `MAGLEV` global (section `maps::MAGLEV`): the backend slot
/// of each Maglev table entry, 0 where none. Entries past the configured
/// size are unused.
pub type MaglevTable = [u8; MAX_TABLE_SIZE];

/// A pin: the value of the `SESSIONS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Session {
    /// The kernel's `jiffies` when the client was last seen.
    pub last_seen_jiffies: u64,
    /// The backend slot (gateway id) the client is pinned to.
    pub backend: u32,
    /// The director's term ([`Director::generation`]) the pin was made in.
    pub generation: u32,
}

const _: () = assert!(size_of::<Session>() == 16);

/// Per-backend counters, per CPU (the `BACKEND_COUNTERS` map, indexed by
/// backend slot). Slot 0 counts the frames the director passed to the local
/// stack without a pin because no backend could be picked.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendCounters {
    /// Frames steered to the backend (or passed locally, for this gateway).
    pub packets: u64,
    /// Their bytes, from the Ethernet header on.
    pub bytes: u64,
    /// Clients pinned to the backend: new ones, and re-pins of clients whose
    /// backend had gone.
    pub new_pins: u64,
}

const _: () = assert!(size_of::<BackendCounters>() == 24);

/// The Maglev table entry of a client whose key hashes to `hash`, in a
/// table of `size` entries: `hash * size / 2^32`, a uniform map of the hash
/// onto the table that needs no division.
#[inline(always)]
pub const fn table_index(hash: u32, size: u32) -> u32 {
    ((hash as u64 * size as u64) >> 32) as u32
}

/// The hash of a client that picks its Maglev table entry: MurmurHash3
/// (x86, 32-bit) of the key's 20 bytes with seed 0, the words read
/// little-endian. Every director computes the same value for a client.
#[inline(always)]
pub const fn client_hash(key: &ClientKey) -> u32 {
    const C1: u32 = 0xcc9e_2d51;
    const C2: u32 = 0x1b87_3593;
    let a = &key.addr_be;
    let port = key.port_be.to_ne_bytes();
    let words = [
        u32::from_le_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_le_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_le_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_le_bytes([a[12], a[13], a[14], a[15]]),
        u32::from_le_bytes([port[0], port[1], 0, 0]),
    ];
    let mut h: u32 = 0;
    let mut i = 0;
    while i < words.len() {
        let mut k = words[i].wrapping_mul(C1);
        k = k.rotate_left(15).wrapping_mul(C2);
        h ^= k;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
        i += 1;
    }
    h ^= size_of::<ClientKey>() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

// SAFETY: `repr(C)`, `Copy`, no padding (sizes asserted above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Director {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Backend {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for Session {}
// SAFETY: as above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for BackendCounters {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_hash_is_murmur3_of_the_key_bytes() {
        // Reference values from the `mmh3` Python package
        // (`mmh3.hash(key_bytes, 0, signed=False)`).
        assert_eq!(client_hash(&ClientKey::default()), 0xee9d_294a);
        let a = client_hash(&ClientKey::v4([198, 51, 100, 7], 51820u16.to_be()));
        assert_eq!(a, 0xe34f_cefc);
        let b = client_hash(&ClientKey::v4([198, 51, 100, 7], 51821u16.to_be()));
        let c = client_hash(&ClientKey::v4([198, 51, 100, 8], 51820u16.to_be()));
        assert!(a != b && a != c && b != c);
    }

    #[test]
    fn table_indexes_cover_the_table_and_stay_inside_it() {
        assert_eq!(table_index(0, 65537), 0);
        assert_eq!(table_index(u32::MAX, 65537), 65536);
        assert_eq!(table_index(u32::MAX, 7), 6);
        assert_eq!(table_index(1 << 31, 7), 3);
    }
}
