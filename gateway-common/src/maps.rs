//! Names and capacities of the maps in the BPF object, in one place.
//!
//! The XDP program declares each map under exactly these names; user space
//! looks them up by the same constants, and a test checks each one resolves.

/// Name of the XDP program in the BPF object.
pub const PROGRAM: &str = "tidegate";

/// Name of the program attached in its place while the gateway is the
/// master in director mode: the same checks, and the director.
pub const DIRECTOR_PROGRAM: &str = "tidegate_director";

/// Name of the program that renews the fence's lease (run through
/// `BPF_PROG_TEST_RUN`, never attached).
pub const RENEW_PROGRAM: &str = "tidegate_renew";

/// The VIP fence: the program's `FENCE` global, a [`crate::fence::Fence`],
/// alone in this section (a one-entry array map, as [`SERVICE_PORTS`]).
pub const FENCE: &str = ".bss.fence";

/// Per-port service addresses: the program's `SERVICE_PORTS` global, a
/// [`crate::service::PortTable`], alone in this section. The loader makes the
/// section a one-entry array map of this name, whose one value is the table.
pub const SERVICE_PORTS: &str = ".bss.ports";

/// The shield's settings: the program's `SHIELD` global, a
/// [`crate::shield::Shield`], alone in this section (a one-entry array map).
pub const SHIELD: &str = ".bss.shield";

/// Who may send to the HA advert port: an LPM trie from an IPv4 prefix
/// (address bytes in network order) to `SOURCE_GATEWAY` or
/// `SOURCE_SEGMENT` (see [`crate::shield`]).
pub const ADVERT_SOURCES: &str = "ADVERT_SOURCES";

/// Per CPU, the budget of datagrams from strangers on the segment: one
/// [`crate::shield::StrangerBudget`].
pub const STRANGER_BUDGET: &str = "STRANGER_BUDGET";

/// IPv4 service addresses, indexed by slot.
pub const SERVICE_V4: &str = "SERVICE_V4";
/// IPv6 service addresses, indexed by slot.
pub const SERVICE_V6: &str = "SERVICE_V6";
/// Entries in [`SERVICE_V4`] and [`SERVICE_V6`]: one per bit of a mask.
/// They hold every service address; a port's first ones are also inline in
/// its [`SERVICE_PORTS`] entry.
pub const SERVICE_ADDRS_LEN: u32 = crate::service::MAX_SERVICE_ADDRS;

/// Packet and byte counters of CPUs below [`crate::stats::COUNTER_ROWS`]:
/// the program's `COUNTER_ROWS` global, a [`crate::stats::CounterRows`],
/// alone in this section (a one-entry array map, as [`SERVICE_PORTS`]).
pub const COUNTER_ROWS: &str = ".bss.counters";

/// Per-CPU packet and byte counters of any further CPU: one
/// [`crate::stats::Counters`] entry.
pub const COUNTERS: &str = "COUNTERS";
/// Entries in [`COUNTERS`].
pub const COUNTERS_LEN: u32 = 1;

/// Name of the TC program on the public interface's egress (the egress
/// guard, see [`crate::egress`]).
pub const EGRESS_PROGRAM: &str = "tidegate_egress";

/// The egress guard's settings: the program's `EGRESS` global, a
/// [`crate::egress::Egress`], alone in this section (a one-entry array map).
pub const EGRESS: &str = ".bss.egress";

/// Per-CPU egress counters: one [`crate::egress::EgressCounters`] entry.
pub const EGRESS_COUNTERS: &str = "EGRESS_COUNTERS";

/// Clients this gateway owns in director mode: an LRU hash map from
/// [`crate::client::ClientKey`] to [`crate::egress::Owned`].
pub const OWNED: &str = "OWNED";
/// Entries in [`OWNED`].
pub const OWNED_LEN: u32 = 131_072;

/// Sender indices of the handshake messages this gateway sent: an LRU hash
/// map from the index (as on the wire, read as a native `u32`) to the
/// `jiffies` it was seen at.
pub const OWN_INDICES: &str = "OWN_INDICES";

/// The second-chance window of a planned handover: the program's
/// `HANDOVER` global, a [`crate::handover::Handover`], alone in this
/// section (a one-entry array map).
pub const HANDOVER: &str = ".bss.handover";
/// The director's settings: the program's `DIRECTOR` global, a
/// [`crate::director::Director`], alone in this section (a one-entry array
/// map, as [`SERVICE_PORTS`]).
pub const DIRECTOR: &str = ".bss.director";

/// The director's backends: the program's `BACKENDS` global, a
/// [`crate::director::BackendTable`], alone in this section.
pub const BACKENDS: &str = ".bss.backends";

/// The director's Maglev table: the program's `MAGLEV` global, a
/// [`crate::director::MaglevTable`], alone in this section.
pub const MAGLEV: &str = ".bss.maglev";

/// The director's pins: an LRU hash map from
/// [`crate::client::ClientKey`] to [`crate::director::Session`]. Its size
/// is set at load time (default [`crate::director::DEFAULT_MAX_SESSIONS`]).
pub const SESSIONS: &str = "SESSIONS";

/// Per-CPU [`crate::director::BackendCounters`], indexed by backend slot.
pub const BACKEND_COUNTERS: &str = "BACKEND_COUNTERS";
/// Entries in [`BACKEND_COUNTERS`]: one per backend slot.
pub const BACKEND_COUNTERS_LEN: u32 = crate::director::MAX_BACKENDS as u32;

/// Every map the object must define, for checks in user space.
pub const ALL: [&str; 16] = [
    FENCE,
    SERVICE_PORTS,
    SERVICE_V4,
    SERVICE_V6,
    COUNTER_ROWS,
    COUNTERS,
    EGRESS,
    EGRESS_COUNTERS,
    OWNED,
    OWN_INDICES,
    HANDOVER,
    DIRECTOR,
    BACKENDS,
    MAGLEV,
    SESSIONS,
    BACKEND_COUNTERS,
];
