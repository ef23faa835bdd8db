//! The VIP fence: a lease that the HA agent renews while it runs. While the
//! lease holds, the program leaves VIP traffic alone; once it lapses (the
//! agent died or froze), the program drops ARP requests and neighbour
//! solicitations for the VIPs and WireGuard traffic to them, so a host whose
//! agent is gone stops serving them.
//!
//! Time is the kernel's `jiffies`, which the program reads with one inlined
//! load (`bpf_jiffies64`). User space never computes jiffies: it runs the
//! `tidegate_renew` program through `BPF_PROG_TEST_RUN` with a [`Renewal`]
//! as the packet, and that program stamps the lease with the kernel's clock.

/// VIPs the fence knows, per family.
pub const MAX_VIPS: usize = 16;

/// [`Fence::flags`]: this gateway holds the VIPs (it is the master), so its
/// kernel may answer ARP and neighbour solicitations for them.
pub const HOLDS_VIPS: u32 = 1;

/// The program's `FENCE` global (section `maps::FENCE`). User space writes
/// the VIPs; the renew program writes the lease fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The lease holds while `jiffies` is below this; 0: never granted.
    pub expires_jiffies: u64,
    /// `jiffies` at the last renewal (user space reads it to learn HZ).
    pub renewed_jiffies: u64,
    /// [`HOLDS_VIPS`] or 0.
    pub flags: u32,
    /// Entries of `vip_v4_be` in use; 0 with 0 `v6_count`: no fence at all.
    pub v4_count: u32,
    /// Entries of `vip_v6_be` in use.
    pub v6_count: u32,
    pub _pad: u32,
    /// IPv4 VIPs as the word in the IPv4 header.
    pub vip_v4_be: [u32; MAX_VIPS],
    /// IPv6 VIPs, words in network order.
    pub vip_v6_be: [[u32; 4]; MAX_VIPS],
}

const _: () = assert!(size_of::<Fence>() == 8 + 8 + 16 + 4 * MAX_VIPS + 16 * MAX_VIPS);

impl Fence {
    /// No VIPs, no lease.
    pub const EMPTY: Self = Self {
        expires_jiffies: 0,
        renewed_jiffies: 0,
        flags: 0,
        v4_count: 0,
        v6_count: 0,
        _pad: 0,
        vip_v4_be: [0; MAX_VIPS],
        vip_v6_be: [[0; 4]; MAX_VIPS],
    };
}

/// The packet user space hands the renew program: the lease from now on, in
/// jiffies, and the new flags.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Renewal {
    pub lease_jiffies: u64,
    pub flags: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<Renewal>() == 16);

// SAFETY: `Fence` is `repr(C)`, `Copy`, and has no padding (size asserted above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Fence {}
