//! Which Core leads. Cores that share a PostgreSQL database elect one
//! leader through a lease row whose term only grows (see [`machine`] and
//! [`lease`]); a Core on SQLite is alone and leads at [`SOLE_TERM`].
//!
//! The lease task owns the leadership and publishes it as a
//! [`Leadership`] snapshot; links, the admin API and the state thread read
//! it. Every message a Core sends to gateways and Edges carries its term.

pub mod lease;
pub mod machine;
pub mod roster;

/// The term of a Core that is alone on its database (SQLite).
pub const SOLE_TERM: u64 = 1;

/// What this Core is now, as its lease says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// The highest term this Core knows of: its own while it leads.
    pub term: u64,
    /// Whether this Core leads at `term`.
    pub leading: bool,
    /// The Core that holds the lease, if known (this one while leading).
    pub leader: Option<String>,
    /// Why this Core does not lead, or what is wrong with the lease, in
    /// words (empty while leading and well).
    pub problem: String,
}

impl Leadership {
    /// A Core alone on its database: it leads, always.
    pub fn sole(core_id: &str) -> Self {
        Self {
            term: SOLE_TERM,
            leading: true,
            leader: Some(core_id.to_owned()),
            problem: String::new(),
        }
    }

    /// A Core that has not yet heard from the lease.
    pub fn starting() -> Self {
        Self {
            term: 0,
            leading: false,
            leader: None,
            problem: "the lease has not been read yet".into(),
        }
    }
}
