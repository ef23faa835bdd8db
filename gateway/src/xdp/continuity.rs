//! Failover continuity in the data path: the egress guard (a TC program on
//! the public interface's egress), the clients this gateway owns, and the
//! handover window. See `tidegate_common::egress` and
//! `tidegate_common::handover`.
//!
//! The guard outlives the daemon and is taken over by the next one in place,
//! so nothing is unguarded at any moment. Where the kernel has tcx links
//! (Linux 6.6) it hangs on one pinned on the BPF filesystem, like the XDP
//! program; elsewhere it is a filter on the interface's clsact qdisc at a
//! fixed preference and handle, which the kernel keeps after the daemon is
//! gone and which the next daemon replaces over netlink (a filter's program
//! is swapped atomically).

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        Link as _, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
    },
};
use serde::{Deserialize, Serialize};
use tidegate_common::{
    client::ClientKey,
    egress::{
        Egress, EgressCounter, EgressCounters, MODE_ALLOW, MODE_DENY, MODE_GRACE, MODE_TABLE,
        OWNED_BY_USER, Owned,
    },
    handover::{Handover, NOTE_OWNERS, WINDOW},
    maps,
};
use tracing::{info, warn};

use super::{PacketCount, XdpError, kernel::EgressHook, take_map};

/// The clsact filter's preference: 1, the first filter of the egress, so
/// that no other filter's verdict lets a datagram past the guard.
pub const CLSACT_PRIORITY: u16 = 1;

/// The clsact filter's handle ("tg"), which names it among the filters at
/// its preference.
pub const CLSACT_HANDLE: u32 = 0x7467;

/// What the gateway may send to clients (the egress guard's mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ownership {
    /// Nothing: a backup, or a gateway not yet elected.
    None,
    /// Everything: the master of an active/standby location.
    All,
    /// Only the clients in the owned table (director mode).
    Table,
    /// Handshake responses and data, no new initiations: the old master
    /// right after a planned handover.
    Grace,
}

impl Ownership {
    fn mode(self) -> u32 {
        match self {
            Self::None => MODE_DENY,
            Self::All => MODE_ALLOW,
            Self::Table => MODE_TABLE,
            Self::Grace => MODE_GRACE,
        }
    }
}

/// The egress guard as `tidectl counters` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressStatus {
    pub interface: String,
    /// How it hangs on the interface.
    pub hook: EgressHook,
    pub listen_port: u16,
    pub ownership: Ownership,
    /// Per counter name ([`EgressCounter::name`]), summed over CPUs.
    pub counters: BTreeMap<String, PacketCount>,
}

/// Where the guard is attached.
#[derive(Debug)]
struct Attachment {
    interface: String,
    hook: Hook,
}

/// The daemon's hold on the guard's hook.
#[derive(Debug)]
enum Hook {
    // Held for its file descriptor: the pin keeps the link, this keeps the
    // daemon's handle on it.
    Tcx(#[expect(dead_code, reason = "held, never read")] FdLink),
    /// The kernel holds the filter; the daemon holds nothing.
    Clsact,
}

impl Hook {
    fn kind(&self) -> EgressHook {
        match self {
            Self::Tcx(_) => EgressHook::Tcx,
            Self::Clsact => EgressHook::Clsact,
        }
    }
}

/// The continuity maps and the egress program.
pub struct ContinuityMaps {
    egress: Array<MapData, Egress>,
    counters: PerCpuArray<MapData, EgressCounters>,
    owned: HashMap<MapData, ClientKey, Owned>,
    own_indices: HashMap<MapData, u32, u64>,
    handover: Array<MapData, Handover>,
    attachment: Option<Attachment>,
    setting: Egress,
}

impl std::fmt::Debug for ContinuityMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContinuityMaps")
            .field("attachment", &self.attachment)
            .field("setting", &self.setting)
            .finish_non_exhaustive()
    }
}

impl ContinuityMaps {
    /// Loads the egress program into the kernel (without attaching it) and
    /// takes the continuity maps out of `ebpf`.
    pub fn load(ebpf: &mut Ebpf) -> Result<Self, XdpError> {
        let name = maps::EGRESS_PROGRAM;
        classifier(ebpf)?
            .load()
            .map_err(|source| XdpError::Verify { name, source })?;
        Ok(Self {
            egress: take_map(ebpf, maps::EGRESS)?,
            counters: take_map(ebpf, maps::EGRESS_COUNTERS)?,
            owned: take_map(ebpf, maps::OWNED)?,
            own_indices: take_map(ebpf, maps::OWN_INDICES)?,
            handover: take_map(ebpf, maps::HANDOVER)?,
            attachment: None,
            setting: Egress::OFF,
        })
    }

    /// Attaches the guard to the egress of `interface` for WireGuard from
    /// `listen_port`, through `hook`, so that it keeps guarding when the
    /// daemon stops or dies: a gateway without its daemon owns no client.
    /// A guard an earlier run left is taken over: this program replaces the
    /// old one in place, atomically. Nothing leaves until
    /// [`Self::set_ownership`] says so.
    pub fn attach(
        &mut self,
        ebpf: &mut Ebpf,
        interface: &str,
        listen_port: u16,
        pin_dir: &Path,
        hook: EgressHook,
    ) -> Result<(), XdpError> {
        self.set_listen_port(listen_port)?;
        let program = classifier(ebpf)?;
        let hook = match hook {
            EgressHook::Tcx => Hook::Tcx(attach_tcx(program, interface, pin_dir)?),
            EgressHook::Clsact => {
                attach_clsact(program, interface)?;
                Hook::Clsact
            }
        };
        info!(interface, listen_port, hook = %hook.kind(), "egress guard in place");
        self.attachment = Some(Attachment {
            interface: interface.to_owned(),
            hook,
        });
        Ok(())
    }

    /// Guards WireGuard from `listen_port` (0: the guard is off and passes
    /// everything, as before the first call), in the mode in force (owning
    /// no client at first).
    pub fn set_listen_port(&mut self, listen_port: u16) -> Result<(), XdpError> {
        self.set(Egress {
            listen_port_be: listen_port.to_be(),
            ..self.setting
        })
    }

    /// Whether this gateway sent a handshake message with sender index
    /// `index` (as on the wire, read natively) since the program was loaded.
    pub fn own_index(&self, index: u32) -> bool {
        self.own_indices.get(&index, 0).is_ok()
    }

    /// Whether `client` is in the owned table.
    pub fn owns(&self, client: &ClientKey) -> bool {
        self.owned.get(client, 0).is_ok()
    }

    /// Whether the guard is attached.
    pub fn attached(&self) -> bool {
        self.attachment.is_some()
    }

    /// Sets what the gateway may send. Director mode ([`Ownership::Table`])
    /// also makes the XDP program note the clients it passes handshakes
    /// of.
    pub fn set_ownership(&mut self, ownership: Ownership) -> Result<(), XdpError> {
        self.set(Egress {
            mode: ownership.mode(),
            ..self.setting
        })?;
        let mut handover = self.read_handover()?;
        if ownership == Ownership::Table {
            handover.flags |= NOTE_OWNERS;
        } else {
            handover.flags &= !NOTE_OWNERS;
        }
        self.write_handover(handover)
    }

    /// The ownership in force.
    pub fn ownership(&self) -> Ownership {
        match self.setting.mode {
            MODE_ALLOW => Ownership::All,
            MODE_TABLE => Ownership::Table,
            MODE_GRACE => Ownership::Grace,
            _ => Ownership::None,
        }
    }

    /// Adds `clients` to the owned table (director mode), before a kick.
    pub fn own(&mut self, clients: &[ClientKey]) -> Result<(), XdpError> {
        let owned = Owned {
            source: OWNED_BY_USER,
            _pad: 0,
        };
        for client in clients {
            self.owned
                .insert(client, owned, 0)
                .map_err(|source| XdpError::Map {
                    op: "writing",
                    name: maps::OWNED,
                    source,
                })?;
        }
        Ok(())
    }

    /// Opens the second-chance window until `until_jiffies`: frames of
    /// sessions this gateway did not make go to `peer_mac`, from `own_mac`.
    pub fn open_handover(
        &mut self,
        peer_mac: [u8; 6],
        own_mac: [u8; 6],
        until_jiffies: u64,
    ) -> Result<(), XdpError> {
        let flags = self.read_handover()?.flags | WINDOW;
        self.write_handover(Handover {
            until_jiffies,
            peer_mac,
            own_mac,
            flags,
        })
    }

    /// Closes the second-chance window.
    pub fn close_handover(&mut self) -> Result<(), XdpError> {
        let handover = self.read_handover()?;
        self.write_handover(Handover {
            until_jiffies: 0,
            flags: handover.flags & !WINDOW,
            ..handover
        })
    }

    /// Whether the window is open (as far as user space set it).
    pub fn handover_open(&self) -> Result<bool, XdpError> {
        Ok(self.read_handover()?.flags & WINDOW != 0)
    }

    /// The guard as `tidectl counters` shows it; `None` when it is not
    /// attached.
    pub fn status(&self) -> Result<Option<EgressStatus>, XdpError> {
        let Some(attachment) = &self.attachment else {
            return Ok(None);
        };
        Ok(Some(EgressStatus {
            interface: attachment.interface.clone(),
            hook: attachment.hook.kind(),
            listen_port: u16::from_be(self.setting.listen_port_be),
            ownership: self.ownership(),
            counters: self.counters()?,
        }))
    }

    /// The guard's counters by name, summed over CPUs.
    pub fn counters(&self) -> Result<BTreeMap<String, PacketCount>, XdpError> {
        let per_cpu = self.counters.get(&0, 0).map_err(|source| XdpError::Map {
            op: "reading",
            name: maps::EGRESS_COUNTERS,
            source,
        })?;
        let mut sums = [PacketCount::default(); EgressCounter::ALL.len()];
        for cpu in per_cpu.iter() {
            for (sum, value) in sums.iter_mut().zip(&cpu.by_counter) {
                sum.packets += value.packets;
                sum.bytes += value.bytes;
            }
        }
        Ok(EgressCounter::ALL
            .iter()
            .zip(sums)
            .map(|(c, n)| (c.name().to_owned(), n))
            .collect())
    }

    fn set(&mut self, egress: Egress) -> Result<(), XdpError> {
        self.egress
            .set(0, egress, 0)
            .map_err(|source| XdpError::Map {
                op: "writing",
                name: maps::EGRESS,
                source,
            })?;
        self.setting = egress;
        Ok(())
    }

    fn read_handover(&self) -> Result<Handover, XdpError> {
        self.handover.get(&0, 0).map_err(|source| XdpError::Map {
            op: "reading",
            name: maps::HANDOVER,
            source,
        })
    }

    fn write_handover(&mut self, handover: Handover) -> Result<(), XdpError> {
        self.handover
            .set(0, handover, 0)
            .map_err(|source| XdpError::Map {
                op: "writing",
                name: maps::HANDOVER,
                source,
            })
    }
}

/// The egress program.
pub fn classifier(ebpf: &mut Ebpf) -> Result<&mut SchedClassifier, XdpError> {
    let name = maps::EGRESS_PROGRAM;
    ebpf.program_mut(name)
        .ok_or(XdpError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| XdpError::NotXdp { name, source })
}

/// The egress program, for `BPF_PROG_TEST_RUN`.
pub fn classifier_ref(ebpf: &Ebpf) -> Result<&SchedClassifier, XdpError> {
    let name = maps::EGRESS_PROGRAM;
    ebpf.program(name)
        .ok_or(XdpError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| XdpError::NotXdp { name, source })
}

/// Hangs `program` on a tcx link pinned in `pin_dir`, in place of the
/// program in the link an earlier run pinned, if there is one.
fn attach_tcx(
    program: &mut SchedClassifier,
    interface: &str,
    pin_dir: &Path,
) -> Result<FdLink, XdpError> {
    let attach_err = |source| XdpError::Egress {
        interface: interface.to_owned(),
        source,
    };
    let pin = pin_path(pin_dir, interface).ok_or_else(|| {
        attach_err(ProgramError::UnknownInterface {
            name: interface.to_owned(),
        })
    })?;
    let link_err = |source| XdpError::Link {
        path: pin.clone(),
        source,
    };
    if pin.exists() {
        let adopt = PinnedLink::from_pin(&pin)
            .map_err(link_err)
            .and_then(|pinned| {
                SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(link_err)
            })
            .and_then(|link| program.attach_to_link(link).map_err(attach_err));
        match adopt {
            Ok(id) => {
                let link = program.take_link(id).map_err(attach_err)?;
                info!(interface, pin = %pin.display(), "egress guard replaced in the pinned tcx link");
                return FdLink::try_from(link).map_err(link_err);
            }
            Err(error) => super::remove_stale_pin(&pin, "egress link", &error)?,
        }
    }
    let id = program
        .attach_with_options(
            interface,
            TcAttachType::Egress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(attach_err)?;
    let link = FdLink::try_from(program.take_link(id).map_err(attach_err)?).map_err(link_err)?;
    let pinned = link.pin(&pin).map_err(|e| XdpError::Pin {
        op: "pinning the egress link at",
        path: pin.clone(),
        source: io::Error::other(e),
    })?;
    Ok(FdLink::from(pinned))
}

/// Hangs `program` on the clsact qdisc of `interface` (added if missing) as
/// the filter at [`CLSACT_PRIORITY`] and [`CLSACT_HANDLE`]: in place of the
/// program of that filter when an earlier run left it, else as a new one.
fn attach_clsact(program: &mut SchedClassifier, interface: &str) -> Result<(), XdpError> {
    let attach_err = |source| XdpError::Egress {
        interface: interface.to_owned(),
        source,
    };
    match tc::qdisc_add_clsact(interface) {
        Ok(()) => {}
        Err(error) if tc_errno(&error) == Some(libc::EEXIST) => {}
        Err(error) => return Err(attach_err(error.into())),
    }
    let handle = TcHandle::from(CLSACT_HANDLE);
    let existing = SchedClassifierLink::attached(
        interface,
        TcAttachType::Egress,
        CLSACT_PRIORITY,
        handle,
        None,
    )
    .map_err(|e| attach_err(TcError::IoError(e).into()))?;
    let id = match program.attach_to_link(existing) {
        Ok(id) => {
            info!(interface, "egress guard replaced in its clsact filter");
            id
        }
        Err(ProgramError::TcError(error)) if tc_errno(&error) == Some(libc::ENOENT) => program
            .attach_with_options(
                interface,
                TcAttachType::Egress,
                TcAttachOptions::Netlink(NlOptions {
                    priority: CLSACT_PRIORITY,
                    handle,
                    classid: None,
                }),
            )
            .map_err(attach_err)?,
        Err(error) => return Err(attach_err(error)),
    };
    let link = program.take_link(id).map_err(attach_err)?;
    // The filter must outlive the daemon, and dropping aya's handle on it
    // would delete it: the handle is a few integers, so nothing leaks.
    std::mem::forget(link);
    Ok(())
}

/// The errno behind a netlink refusal.
fn tc_errno(error: &TcError) -> Option<i32> {
    match error {
        TcError::NetlinkError(error) => error.raw_os_error(),
        TcError::IoError(error) => error.raw_os_error(),
        _ => None,
    }
}

/// The pin of the egress link on `interface`, named like the XDP link's
/// (network namespace and interface index).
fn pin_path(dir: &Path, interface: &str) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;

    let netns = std::fs::metadata("/proc/self/ns/net").ok()?.ino();
    let index = nix::net::if_::if_nametoindex(interface).ok()?;
    Some(dir.join(format!("tc-egress-{netns}-{index}")))
}

/// Removes the guard an earlier run left on `interface`, if there is one:
/// the tcx link pinned in `pin_dir`, or the clsact filter.
pub fn remove_stale(interface: &str, pin_dir: &Path) -> Result<(), XdpError> {
    if let Some(pin) = pin_path(pin_dir, interface)
        && pin.exists()
    {
        std::fs::remove_file(&pin).map_err(|source| XdpError::Pin {
            op: "removing",
            path: pin.clone(),
            source,
        })?;
        warn!(
            interface,
            pin = %pin.display(),
            "removed the egress guard an earlier run left: failover continuity is not configured"
        );
    }
    if remove_clsact(interface)? {
        warn!(
            interface,
            "removed the egress guard's clsact filter an earlier run left: failover continuity is not configured"
        );
    }
    Ok(())
}

/// Deletes the guard's clsact filter from `interface`; whether there was
/// one. An interface without a clsact qdisc has none.
pub fn remove_clsact(interface: &str) -> Result<bool, XdpError> {
    let link = SchedClassifierLink::attached(
        interface,
        TcAttachType::Egress,
        CLSACT_PRIORITY,
        TcHandle::from(CLSACT_HANDLE),
        None,
    )
    .map_err(|e| XdpError::Egress {
        interface: interface.to_owned(),
        source: TcError::IoError(e).into(),
    })?;
    match link.detach() {
        Ok(()) => Ok(true),
        Err(ProgramError::NetlinkError(error))
            if matches!(error.raw_os_error(), Some(libc::ENOENT | libc::EINVAL)) =>
        {
            Ok(false)
        }
        Err(source) => Err(XdpError::Egress {
            interface: interface.to_owned(),
            source,
        }),
    }
}

/// How long a jiffies deadline `span` from now is, given the kernel's `hz`.
pub fn jiffies_for(span: Duration, hz: u64) -> u64 {
    (span.as_nanos() as u64 * hz).div_ceil(1_000_000_000)
}
