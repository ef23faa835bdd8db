//! The egress guard: a TC program on the public interface's egress that
//! sees every WireGuard datagram the gateway sends (UDP from the listen
//! port). It enforces two rules of a location:
//!
//! * every such datagram leaves from a VIP: a source that is not one is
//!   rewritten to the family's first VIP (checksums fixed), so a client
//!   never learns a host address by WireGuard roaming;
//! * a gateway sends nothing to a client it does not own: the [`Egress`]
//!   global's `mode` says whether it owns every client (the master), none
//!   (a backup), those in the `OWNED` map (director mode), or, right after
//!   a planned handover, none for new handshakes (`MODE_GRACE`: responses
//!   and data still go out, handshake initiations do not). A gateway whose
//!   VIP fence has lapsed sends nothing, whatever the mode.
//!
//! The program also records the sender index of every handshake message it
//! lets out (`OWN_INDICES`): the receiver index of the replies and data that
//! belong to this gateway's sessions (see [`crate::handover`]).

/// Nothing goes out: a backup, or a gateway not yet elected.
pub const MODE_DENY: u32 = 0;
/// Everything goes out: the master of an active/standby location.
pub const MODE_ALLOW: u32 = 1;
/// Only datagrams to clients in the `OWNED` map go out (director mode).
pub const MODE_TABLE: u32 = 2;
/// After a planned handover: handshake responses, cookie replies and data
/// go out, so sessions of this gateway still in use finish their work;
/// handshake initiations do not, so its rekey timers steal no client back.
pub const MODE_GRACE: u32 = 3;

/// The program's `EGRESS` global (section [`crate::maps::EGRESS`]),
/// written by user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Egress {
    /// One of the `MODE_*` constants.
    pub mode: u32,
    /// The WireGuard listen port in network order; 0: the guard is off and
    /// passes everything.
    pub listen_port_be: u16,
    pub _pad: u16,
}

const _: () = assert!(size_of::<Egress>() == 8);

impl Egress {
    /// Off: no listen port, nothing owned.
    pub const OFF: Self = Self {
        mode: MODE_DENY,
        listen_port_be: 0,
        _pad: 0,
    };
}

/// A client the gateway owns (value of the `OWNED` map, keyed by
/// [`crate::client::ClientKey`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owned {
    /// Who added it: [`OWNED_BY_XDP`] or [`OWNED_BY_USER`].
    pub source: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<Owned>() == 8);

/// `Owned::source`: the XDP program passed a handshake message from the
/// client to this gateway's WireGuard.
pub const OWNED_BY_XDP: u32 = 1;
/// `Owned::source`: user space, before it kicks a handshake to the client.
pub const OWNED_BY_USER: u32 = 2;

/// What the egress program did with one datagram (index of its counters).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EgressCounter {
    /// Not UDP from the WireGuard listen port (or the guard is off).
    Other = 0,
    /// Let out unchanged: its source is a VIP already.
    Allowed = 1,
    /// Let out with its source rewritten to a VIP.
    Rewritten = 2,
    /// Dropped: this gateway owns no client (a backup).
    DeniedBackup = 3,
    /// Dropped: director mode, and the client is not in `OWNED`.
    DeniedNotOwned = 4,
    /// Dropped: a handshake initiation during the grace after a handover.
    DeniedGrace = 5,
    /// Dropped: the VIP fence's lease has lapsed.
    DeniedFenced = 6,
    /// Dropped: a rewrite helper failed (the source could not be fixed).
    Failed = 7,
}

impl EgressCounter {
    /// Every counter, in index order.
    pub const ALL: [Self; 8] = [
        Self::Other,
        Self::Allowed,
        Self::Rewritten,
        Self::DeniedBackup,
        Self::DeniedNotOwned,
        Self::DeniedGrace,
        Self::DeniedFenced,
        Self::Failed,
    ];

    /// Whether the datagram was dropped.
    pub const fn dropped(self) -> bool {
        matches!(
            self,
            Self::DeniedBackup
                | Self::DeniedNotOwned
                | Self::DeniedGrace
                | Self::DeniedFenced
                | Self::Failed
        )
    }

    /// The counter's name, as `tidectl counters` shows it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Other => "egress-other",
            Self::Allowed => "egress-allowed",
            Self::Rewritten => "egress-rewritten",
            Self::DeniedBackup => "egress-denied-backup",
            Self::DeniedNotOwned => "egress-denied-not-owned",
            Self::DeniedGrace => "egress-denied-grace",
            Self::DeniedFenced => "egress-denied-fenced",
            Self::Failed => "egress-failed",
        }
    }
}

/// One CPU's egress counters (the one entry of the per-CPU
/// `EGRESS_COUNTERS` map), indexed by [`EgressCounter`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgressCounters {
    pub by_counter: [crate::stats::CounterValue; EgressCounter::ALL.len()],
}

const _: () = assert!(size_of::<EgressCounters>() == 16 * EgressCounter::ALL.len());

// SAFETY: `repr(C)`, `Copy`, no padding (size asserted above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Egress {}

// SAFETY: `repr(C)`, `Copy`, no padding (size asserted above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Owned {}

// SAFETY: `repr(C)`, `Copy`, no padding (size asserted above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for EgressCounters {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_lists_every_counter_at_its_index() {
        for (index, counter) in EgressCounter::ALL.iter().enumerate() {
            assert_eq!(*counter as usize, index, "{counter:?}");
        }
    }
}
