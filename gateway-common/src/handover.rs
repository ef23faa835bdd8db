//! The second chance during a planned handover.
//!
//! A client keeps sending with its old session until the new master's
//! handshake is confirmed, and once the VIP has moved that traffic reaches
//! the new master, which cannot decrypt it. For a short window after a
//! handover both gateways therefore look at the receiver index of every
//! WireGuard handshake response, cookie reply and data message (types 2, 3
//! and 4) they receive: an index this gateway handed out (its egress
//! program recorded it in `OWN_INDICES`) is served here; any other goes to
//! the other gateway of the handover, Ethernet addresses rewritten and sent
//! back out (`XDP_TX`). A frame that comes from the other gateway is never
//! sent back, so nothing loops.

/// The program's `HANDOVER` global (section [`crate::maps::HANDOVER`]),
/// written by user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handover {
    /// The window is open while the kernel's `jiffies` is below this; 0:
    /// closed.
    pub until_jiffies: u64,
    /// The other gateway's MAC address: where frames of sessions this
    /// gateway did not make go.
    pub peer_mac: [u8; 6],
    /// This gateway's MAC address on the public interface: the source of
    /// the frames it hands on.
    pub own_mac: [u8; 6],
    /// [`WINDOW`] and [`NOTE_OWNERS`]: what the XDP program must look at
    /// WireGuard frames for; 0 on the fast path's one load.
    pub flags: u32,
}

/// [`Handover::flags`]: the second-chance window may be open (the program
/// then checks `until_jiffies`).
pub const WINDOW: u32 = 1;
/// [`Handover::flags`]: director mode; the XDP program adds the source of
/// every handshake message it passes to this gateway to `OWNED`.
pub const NOTE_OWNERS: u32 = 2;

const _: () = assert!(size_of::<Handover>() == 24);

impl Handover {
    /// Closed.
    pub const CLOSED: Self = Self {
        until_jiffies: 0,
        peer_mac: [0; 6],
        own_mac: [0; 6],
        flags: 0,
    };
}

/// Entries of `OWN_INDICES`: sender indices of handshake messages this
/// gateway sent, least recently used first out. WireGuard makes a new
/// index with every handshake (at least every two minutes per busy peer)
/// and a session lasts three minutes at most, so this holds every live
/// session of about 20,000 peers.
pub const OWN_INDICES_LEN: u32 = 65_536;

// SAFETY: `repr(C)`, `Copy`, no padding (size asserted above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Handover {}
