//! The XDP program: load, fill the service maps, attach (through a pinned
//! link that outlives the daemon), read counters, renew the VIP fence,
//! drive the director.
//!
//! [`Datapath`] owns the loaded object and its maps; one task owns the
//! `Datapath` (see [`crate::datapath`]) and everything else asks it.

pub mod continuity;
pub mod counters;
pub mod director;
pub mod kernel;
pub mod services;

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{
        Array, HashMap, MapData, MapError, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{
        ProgramError, TestRun as _, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, LinkError, PinnedLink},
        xdp::XdpLink,
    },
};
use serde::{Deserialize, Serialize};
use tidegate_common::{
    client::ClientKey,
    director::{
        BackendCounters, BackendTable, DEFAULT_MAX_SESSIONS, DEFAULT_TABLE_SIZE, Director,
        MaglevTable, Session,
    },
    fence::{Fence, HOLDS_VIPS, MAX_VIPS, Renewal},
    maps,
    service::{PortTable, ServiceAddrV6},
    shield::{SOURCE_GATEWAY, SOURCE_SEGMENT, Shield},
    stats::{CounterRows, Counters},
};
use tracing::{info, warn};

pub use self::{
    continuity::{ContinuityMaps, EgressStatus, Ownership},
    counters::{CounterSnapshot, PacketCount},
    director::{BackendStatus, DirectorStatus, SessionEntry},
    kernel::{EgressHook, Kernel, KernelError},
    services::{AdvertGate, ServiceError, ServiceTable, ShieldSettings},
};
use crate::director::maglev::MaglevError;

/// The XDP object, built by `cargo xtask build-ebpf`; empty in a build
/// without it (see [`object`]).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tidegate.bpf.o"));

/// An empty `XDP_PASS` program built the same way: the benchmark baseline.
pub static BASELINE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tidegate-baseline.bpf.o"));

/// The steering benchmark's programs (a miss-making wrapper, a bare bounce,
/// a sink), built the same way; never attached by the gateway.
pub static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tidegate-bench.bpf.o"));

/// Removes the pin of a `what` the daemon could not take over (why:
/// `error`), so that a new one can be pinned in its place.
fn remove_stale_pin(pin: &Path, what: &str, error: &XdpError) -> Result<(), XdpError> {
    warn!(
        pin = %pin.display(),
        error = %crate::error_chain(error),
        "the pinned {what} is stale; removing it"
    );
    std::fs::remove_file(pin).map_err(|source| XdpError::Pin {
        op: "removing",
        path: pin.to_owned(),
        source,
    })
}

/// `bytes`, one of the embedded objects, or [`XdpError::NotBuilt`] when
/// this binary was built without the BPF objects.
pub fn object(bytes: &'static [u8]) -> Result<&'static [u8], XdpError> {
    if bytes.is_empty() {
        Err(XdpError::NotBuilt)
    } else {
        Ok(bytes)
    }
}

/// Errors of the XDP data path, each naming the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    #[error(
        "this binary was built without its BPF objects (a plain cargo build): build it with \
         `cargo xtask build`, which builds them first"
    )]
    NotBuilt,
    #[error("loading the BPF object")]
    Load(#[source] EbpfError),
    #[error("the BPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("program {name} is not an XDP program")]
    NotXdp {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("the kernel refused program {name} (verifier)")]
    Verify {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {name} has an unexpected type or layout")]
    MapType {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("{op} map {name}")]
    Map {
        op: &'static str,
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error("attaching XDP to {interface} in {mode} mode")]
    Attach {
        interface: String,
        mode: AttachMode,
        #[source]
        source: ProgramError,
    },
    #[error("detaching XDP from {interface}")]
    Detach {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("test run of program {name}")]
    TestRun {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(
        "{path} is not on a BPF filesystem: mount one (`mount -t bpf bpf /sys/fs/bpf`) or set bpf_pin_dir"
    )]
    NotBpffs { path: PathBuf },
    #[error("{op} {path}")]
    Pin {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pinning the XDP link at {path}")]
    Link {
        path: PathBuf,
        #[source]
        source: LinkError,
    },
    #[error("{count} {family} VIPs; the fence holds at most {MAX_VIPS}")]
    TooManyVips { family: &'static str, count: usize },
    #[error("the renew program refused the lease (returned {0})")]
    Renew(u32),
    #[error("attaching the egress guard to {interface}")]
    Egress {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("the director's program was not loaded: this gateway is not in director mode")]
    NoDirector,
    #[error("the VIP fence was never renewed: the kernel's clock is not known yet")]
    NoClock,
    #[error("building the director's Maglev table")]
    Maglev(#[from] MaglevError),
}

/// What the program is loaded with: capacities fixed for its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatapathOptions {
    /// Load the director's program too (director mode). It is the largest
    /// for the kernel's verifier to check: a gateway in active/standby mode
    /// starts without it.
    pub director: bool,
    /// Pins the director's session map holds.
    pub max_sessions: u32,
    /// Entries of the director's Maglev table (a prime, at most
    /// `tidegate_common::director::MAX_TABLE_SIZE`).
    pub table_size: u32,
}

impl Default for DatapathOptions {
    fn default() -> Self {
        Self {
            director: true,
            max_sessions: DEFAULT_MAX_SESSIONS,
            table_size: DEFAULT_TABLE_SIZE,
        }
    }
}

/// How to attach, as configured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum XdpModeSetting {
    /// Driver (native) mode, falling back to generic mode with a warning.
    #[default]
    Auto,
    /// Driver (native) mode only.
    Driver,
    /// Generic (skb) mode only: slower, works on any interface.
    Generic,
}

/// The mode the program is attached in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMode {
    Driver,
    Generic,
}

impl AttachMode {
    fn aya(self) -> XdpMode {
        match self {
            Self::Driver => XdpMode::Driver,
            Self::Generic => XdpMode::Skb,
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Driver => "driver",
            Self::Generic => "generic",
        })
    }
}

/// The pinned link that keeps the program on the interface.
#[derive(Debug)]
struct Attachment {
    interface: String,
    mode: AttachMode,
    link: FdLink,
    pin: PathBuf,
    /// The program in the link: [`maps::PROGRAM`] or
    /// [`maps::DIRECTOR_PROGRAM`].
    program: &'static str,
}

/// `statfs` magic of a BPF filesystem.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// HZ values Linux is built with; a measured rate snaps to the nearest.
const KNOWN_HZ: [u64; 4] = [100, 250, 300, 1000];

/// The fence as last renewed, for `tidectl status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceStatus {
    /// This gateway may answer for the VIPs (it is the master).
    pub holds_vips: bool,
    /// Milliseconds the lease has left; 0 once lapsed.
    pub lease_left_ms: u64,
}

/// The loaded XDP program and its maps.
pub struct Datapath {
    ebpf: Ebpf,
    /// The `SERVICE_PORTS` global's section: one entry, the whole table.
    service_ports: Array<MapData, PortTable>,
    service_v4: Array<MapData, u32>,
    service_v6: Array<MapData, ServiceAddrV6>,
    /// The `SHIELD` global's section: one entry.
    shield: Array<MapData, Shield>,
    advert_sources: LpmTrie<MapData, [u8; 4], u32>,
    /// The shield's settings and who may send to the advert port, as last
    /// written.
    shield_settings: ShieldSettings,
    advert_gate: Option<AdvertGate>,
    /// The `COUNTER_ROWS` global's section: one entry, a row per CPU.
    counter_rows: Array<MapData, CounterRows>,
    counters: PerCpuArray<MapData, Counters>,
    /// The `FENCE` global's section: one entry.
    fence: Array<MapData, Fence>,
    /// The `DIRECTOR` global's section: one entry.
    director: Array<MapData, Director>,
    /// The `BACKENDS` global's section: one entry, every slot.
    backends: Array<MapData, BackendTable>,
    /// The `MAGLEV` global's section: one entry, the whole table.
    maglev: Array<MapData, MaglevTable>,
    sessions: HashMap<MapData, ClientKey, Session>,
    backend_counters: PerCpuArray<MapData, BackendCounters>,
    options: DatapathOptions,
    /// What the director maps hold, as last written.
    steering: Option<director::Written>,
    /// The director's term: counted up each time steering turns on.
    generation: u32,
    services: ServiceTable,
    attachment: Option<Attachment>,
    /// The kernel's HZ, measured on first use of the fence.
    hz: Option<u64>,
    /// When the lease was last renewed, for how long, and with what flags.
    renewed: Option<(Instant, Duration, bool)>,
    /// `jiffies` at that renewal.
    renewed_jiffies: u64,
    /// The egress guard and the handover window.
    continuity: ContinuityMaps,
}

impl Datapath {
    /// Loads the object and the program into the kernel, without attaching,
    /// with the default capacities.
    pub fn load() -> Result<Self, XdpError> {
        Self::load_with(DatapathOptions::default())
    }

    /// Loads the object and the program into the kernel, without attaching.
    pub fn load_with(options: DatapathOptions) -> Result<Self, XdpError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::SESSIONS, options.max_sessions)
            .load(object(OBJECT)?)
            .map_err(XdpError::Load)?;
        let programs = [maps::PROGRAM, maps::RENEW_PROGRAM]
            .into_iter()
            .chain(options.director.then_some(maps::DIRECTOR_PROGRAM));
        for name in programs {
            program_mut(&mut ebpf, name)?
                .load()
                .map_err(|source| XdpError::Verify { name, source })?;
        }
        let continuity = ContinuityMaps::load(&mut ebpf)?;
        Ok(Self {
            service_ports: take_map(&mut ebpf, maps::SERVICE_PORTS)?,
            service_v4: take_map(&mut ebpf, maps::SERVICE_V4)?,
            service_v6: take_map(&mut ebpf, maps::SERVICE_V6)?,
            shield: take_map(&mut ebpf, maps::SHIELD)?,
            advert_sources: take_map(&mut ebpf, maps::ADVERT_SOURCES)?,
            shield_settings: ShieldSettings::default(),
            advert_gate: None,
            counter_rows: take_map(&mut ebpf, maps::COUNTER_ROWS)?,
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            fence: take_map(&mut ebpf, maps::FENCE)?,
            director: take_map(&mut ebpf, maps::DIRECTOR)?,
            backends: take_map(&mut ebpf, maps::BACKENDS)?,
            maglev: take_map(&mut ebpf, maps::MAGLEV)?,
            sessions: take_map(&mut ebpf, maps::SESSIONS)?,
            backend_counters: take_map(&mut ebpf, maps::BACKEND_COUNTERS)?,
            options,
            steering: None,
            generation: 0,
            ebpf,
            services: ServiceTable::default(),
            attachment: None,
            hz: None,
            renewed: None,
            renewed_jiffies: 0,
            continuity,
        })
    }

    /// Makes `table` the set of services the shield checks.
    ///
    /// New addresses are written before the port masks that refer to them,
    /// and retired slots are cleared last, so no mask ever points at a slot
    /// that is not yet filled. The port table is written whole, in one
    /// update: entries that do not change are rewritten with the same bytes.
    pub fn install_services(&mut self, table: ServiceTable) -> Result<(), XdpError> {
        let write = |name| {
            move |source| XdpError::Map {
                op: "writing",
                name,
                source,
            }
        };
        for (slot, addr) in table.v4_slots() {
            self.service_v4
                .set(slot, addr, 0)
                .map_err(write(maps::SERVICE_V4))?;
        }
        for (slot, addr) in table.v6_slots() {
            self.service_v6
                .set(slot, addr, 0)
                .map_err(write(maps::SERVICE_V6))?;
        }
        let advert_port = self.advert_gate.as_ref().map(|gate| gate.port);
        self.service_ports
            .set(0, table.port_table(advert_port), 0)
            .map_err(write(maps::SERVICE_PORTS))?;
        let (v4_used, v6_used) = table.slot_counts();
        let (v4_old, v6_old) = self.services.slot_counts();
        for slot in v4_used..v4_old {
            self.service_v4
                .set(slot, 0, 0)
                .map_err(write(maps::SERVICE_V4))?;
        }
        for slot in v6_used..v6_old {
            self.service_v6
                .set(slot, ServiceAddrV6::default(), 0)
                .map_err(write(maps::SERVICE_V6))?;
        }
        self.services = table;
        Ok(())
    }

    /// Sets what the shield does with frames to a service address that it
    /// cannot check.
    pub fn set_shield(&mut self, settings: ShieldSettings) -> Result<(), XdpError> {
        let global = settings.global(self.advert_gate.as_ref());
        self.shield
            .set(0, global, 0)
            .map_err(|source| XdpError::Map {
                op: "writing",
                name: maps::SHIELD,
                source,
            })?;
        self.shield_settings = settings;
        Ok(())
    }

    /// Gates the HA advert port: from now on only `gate`'s sources reach
    /// it. Sources first, then the budget, then the port's flag, so that
    /// nothing is gated before its sources are known.
    pub fn gate_adverts(&mut self, gate: AdvertGate) -> Result<(), XdpError> {
        for prefix in &gate.segment {
            self.insert_advert_source(prefix.addr(), prefix.prefix_len(), SOURCE_SEGMENT)?;
        }
        for gateway in &gate.gateways {
            self.insert_advert_source(*gateway, 32, SOURCE_GATEWAY)?;
        }
        self.advert_gate = Some(gate);
        self.set_shield(self.shield_settings)?;
        self.install_services(self.services.clone())
    }

    /// A gateway of the location heard in an authenticated advert: it may
    /// send to the advert port without a budget.
    pub fn admit_advert_source(&mut self, gateway: Ipv4Addr) -> Result<(), XdpError> {
        self.insert_advert_source(gateway, 32, SOURCE_GATEWAY)
    }

    fn insert_advert_source(
        &mut self,
        addr: Ipv4Addr,
        prefix_len: u8,
        kind: u32,
    ) -> Result<(), XdpError> {
        self.advert_sources
            .insert(&Key::new(u32::from(prefix_len), addr.octets()), kind, 0)
            .map_err(|source| XdpError::Map {
                op: "writing",
                name: maps::ADVERT_SOURCES,
                source,
            })
    }

    /// The services installed.
    pub fn services(&self) -> &ServiceTable {
        &self.services
    }

    /// Attaches to `interface` through a link pinned in `pin_dir` (on a
    /// BPF filesystem), so that the program stays attached, and the fence
    /// keeps working, if the daemon dies. A link pinned by an earlier run is
    /// taken over: this program replaces the old one in it atomically. In
    /// [`XdpModeSetting::Auto`], driver mode is tried first and generic mode
    /// used, with a warning, if it fails.
    pub fn attach(
        &mut self,
        interface: &str,
        setting: XdpModeSetting,
        pin_dir: &Path,
    ) -> Result<AttachMode, XdpError> {
        require_bpffs(pin_dir)?;
        for mode in [AttachMode::Driver, AttachMode::Generic] {
            let Some(pin) = pin_path(pin_dir, interface, mode) else {
                break;
            };
            if pin.exists() {
                match self.adopt(interface, mode, &pin) {
                    Ok(()) => {
                        info!(interface, %mode, pin = %pin.display(), "XDP shield replaced in the pinned link");
                        return Ok(mode);
                    }
                    Err(error) => remove_stale_pin(&pin, "XDP link", &error)?,
                }
            }
        }
        let mode = match setting {
            XdpModeSetting::Driver => self.attach_in(interface, AttachMode::Driver, pin_dir)?,
            XdpModeSetting::Generic => self.attach_in(interface, AttachMode::Generic, pin_dir)?,
            XdpModeSetting::Auto => match self.attach_in(interface, AttachMode::Driver, pin_dir) {
                Ok(mode) => mode,
                // No interface, no fallback: generic mode would fail the same way.
                Err(
                    error @ XdpError::Attach {
                        source: ProgramError::UnknownInterface { .. },
                        ..
                    },
                ) => return Err(error),
                Err(error) => {
                    warn!(
                        interface,
                        error = %crate::error_chain(&error),
                        "driver-mode XDP failed; falling back to generic mode"
                    );
                    self.attach_in(interface, AttachMode::Generic, pin_dir)?
                }
            },
        };
        info!(interface, %mode, "XDP shield attached");
        Ok(mode)
    }

    fn attach_in(
        &mut self,
        interface: &str,
        mode: AttachMode,
        pin_dir: &Path,
    ) -> Result<AttachMode, XdpError> {
        let attach_err = |source| XdpError::Attach {
            interface: interface.to_owned(),
            mode,
            source,
        };
        let program = program_mut(&mut self.ebpf, maps::PROGRAM)?;
        let id = program.attach(interface, mode.aya()).map_err(attach_err)?;
        let link = program.take_link(id).map_err(attach_err)?;
        // The interface exists: the attach just found it.
        let pin = pin_path(pin_dir, interface, mode).ok_or_else(|| {
            attach_err(ProgramError::UnknownInterface {
                name: interface.to_owned(),
            })
        })?;
        let link_err = |source| XdpError::Link {
            path: pin.clone(),
            source,
        };
        let link = FdLink::try_from(link).map_err(link_err)?;
        let pinned = link.pin(&pin).map_err(|e| XdpError::Pin {
            op: "pinning the XDP link at",
            path: pin.clone(),
            source: io::Error::other(e),
        })?;
        let link = FdLink::from(pinned);
        self.attachment = Some(Attachment {
            interface: interface.to_owned(),
            mode,
            link,
            pin,
            program: maps::PROGRAM,
        });
        Ok(mode)
    }

    /// Puts this program into the link pinned at `pin`.
    fn adopt(&mut self, interface: &str, mode: AttachMode, pin: &Path) -> Result<(), XdpError> {
        let attach_err = |source| XdpError::Attach {
            interface: interface.to_owned(),
            mode,
            source,
        };
        let link_err = |source| XdpError::Link {
            path: pin.to_owned(),
            source,
        };
        let pinned = PinnedLink::from_pin(pin).map_err(link_err)?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(link_err)?;
        let program = program_mut(&mut self.ebpf, maps::PROGRAM)?;
        let id = program.attach_to_link(link).map_err(attach_err)?;
        let link =
            FdLink::try_from(program.take_link(id).map_err(attach_err)?).map_err(link_err)?;
        self.attachment = Some(Attachment {
            interface: interface.to_owned(),
            mode,
            link,
            pin: pin.to_owned(),
            program: maps::PROGRAM,
        });
        Ok(())
    }

    /// Puts program `name` into the attached link in place of the one
    /// there, atomically (`BPF_LINK_UPDATE`): frames see either. A no-op
    /// when not attached or when `name` is already there. Should the update
    /// fail, the link is opened again from its pin, still running the old
    /// program.
    fn switch_program(&mut self, name: &'static str) -> Result<(), XdpError> {
        let Some(attachment) = self.attachment.take() else {
            return Ok(());
        };
        if attachment.program == name {
            self.attachment = Some(attachment);
            return Ok(());
        }
        let Attachment {
            interface,
            mode,
            link,
            pin,
            program: old,
        } = attachment;
        let link_err = |source| XdpError::Link {
            path: pin.clone(),
            source,
        };
        let switched = (|| {
            let link = XdpLink::try_from(link).map_err(link_err)?;
            let program = program_mut(&mut self.ebpf, name)?;
            let id = program
                .attach_to_link(link)
                .map_err(|source| XdpError::Attach {
                    interface: interface.clone(),
                    mode,
                    source,
                })?;
            let taken = program.take_link(id).map_err(|source| XdpError::Attach {
                interface: interface.clone(),
                mode,
                source,
            })?;
            FdLink::try_from(taken).map_err(link_err)
        })();
        match switched {
            Ok(link) => {
                info!(
                    interface,
                    program = name,
                    "XDP program switched in the pinned link"
                );
                self.attachment = Some(Attachment {
                    interface,
                    mode,
                    link,
                    pin,
                    program: name,
                });
                Ok(())
            }
            Err(error) => {
                let link = FdLink::from(PinnedLink::from_pin(&pin).map_err(link_err)?);
                self.attachment = Some(Attachment {
                    interface,
                    mode,
                    link,
                    pin,
                    program: old,
                });
                Err(error)
            }
        }
    }

    /// Where the program is attached, if it is.
    pub fn attached(&self) -> Option<(&str, AttachMode)> {
        self.attachment
            .as_ref()
            .map(|a| (a.interface.as_str(), a.mode))
    }

    /// Detaches from the interface: removes the pin and closes the link.
    /// A no-op when not attached. (A daemon that dies without this leaves
    /// the program attached, which is the point of the pin.)
    pub fn detach(&mut self) -> Result<(), XdpError> {
        let Some(attachment) = self.attachment.take() else {
            return Ok(());
        };
        std::fs::remove_file(&attachment.pin).map_err(|source| XdpError::Pin {
            op: "removing",
            path: attachment.pin.clone(),
            source,
        })?;
        drop(attachment.link);
        info!(interface = attachment.interface, "XDP shield detached");
        if self.continuity.attached() {
            // The guard stays (pinned): a gateway without its daemon owns
            // no client.
            self.continuity.set_ownership(Ownership::None)?;
            self.continuity.close_handover()?;
            info!("egress guard left in place, owning no client");
        }
        Ok(())
    }

    /// Makes `vips` the addresses the fence guards. Until the first
    /// [`Datapath::renew_lease`], the lease is lapsed: traffic to them is
    /// fenced.
    pub fn set_vips(&mut self, vips: &[IpAddr]) -> Result<(), XdpError> {
        let mut fence = self.read_fence()?;
        let v4: Vec<u32> = vips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(u32::from_ne_bytes(v4.octets())),
                IpAddr::V6(_) => None,
            })
            .collect();
        let v6: Vec<[u32; 4]> = vips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V6(v6) => Some(ServiceAddrV6::from_octets(v6.octets()).addr_be),
                IpAddr::V4(_) => None,
            })
            .collect();
        for (family, count) in [("IPv4", v4.len()), ("IPv6", v6.len())] {
            if count > MAX_VIPS {
                return Err(XdpError::TooManyVips { family, count });
            }
        }
        fence.vip_v4_be = [0; MAX_VIPS];
        fence.vip_v6_be = [[0; 4]; MAX_VIPS];
        fence.vip_v4_be[..v4.len()].copy_from_slice(&v4);
        fence.vip_v6_be[..v6.len()].copy_from_slice(&v6);
        fence.v4_count = v4.len() as u32;
        fence.v6_count = v6.len() as u32;
        self.fence.set(0, fence, 0).map_err(|source| XdpError::Map {
            op: "writing",
            name: maps::FENCE,
            source,
        })
    }

    /// Grants the fence's lease for `lease` from now; `holds_vips` lets this
    /// gateway's kernel answer ARP and neighbour solicitations for the VIPs.
    /// The first call measures the kernel's HZ, which takes 200 ms.
    pub fn renew_lease(&mut self, lease: Duration, holds_vips: bool) -> Result<(), XdpError> {
        let hz = match self.hz {
            Some(hz) => hz,
            None => {
                let hz = self.measure_hz()?;
                info!(hz, "kernel tick rate measured for the VIP fence");
                self.hz = Some(hz);
                hz
            }
        };
        // Rounded up, plus one: a lease never ends before it was asked to.
        let lease_jiffies = (lease.as_nanos() as u64 * hz).div_ceil(1_000_000_000) + 1;
        let flags = if holds_vips { HOLDS_VIPS } else { 0 };
        self.run_renew(lease_jiffies, flags)?;
        self.renewed = Some((Instant::now(), lease, holds_vips));
        self.renewed_jiffies = self.read_fence()?.renewed_jiffies;
        Ok(())
    }

    /// The kernel's `jiffies` `span` from now, estimated from the last
    /// renewal of the fence (within a tick).
    pub fn jiffies_in(&self, span: Duration) -> Result<u64, XdpError> {
        let (Some(hz), Some((at, _, _))) = (self.hz, self.renewed) else {
            return Err(XdpError::NoClock);
        };
        Ok(self.renewed_jiffies + continuity::jiffies_for(at.elapsed() + span, hz))
    }

    /// Attaches the egress guard to `interface` for WireGuard from
    /// `listen_port`, through `hook` (see [`ContinuityMaps::attach`]).
    pub fn attach_egress(
        &mut self,
        interface: &str,
        listen_port: u16,
        pin_dir: &Path,
        hook: EgressHook,
    ) -> Result<(), XdpError> {
        require_bpffs(pin_dir)?;
        self.continuity
            .attach(&mut self.ebpf, interface, listen_port, pin_dir, hook)
    }

    /// Removes an egress guard that an earlier run with failover
    /// continuity pinned on `interface`: without it configured now, the
    /// guard would keep this gateway's WireGuard silent.
    pub fn remove_stale_egress(&mut self, interface: &str, pin_dir: &Path) -> Result<(), XdpError> {
        continuity::remove_stale(interface, pin_dir)
    }

    /// The egress guard and the handover window.
    pub fn continuity(&self) -> &ContinuityMaps {
        &self.continuity
    }

    /// The egress guard and the handover window, to change them.
    pub fn continuity_mut(&mut self) -> &mut ContinuityMaps {
        &mut self.continuity
    }

    /// The fence as last renewed; `None` before the first renewal.
    pub fn fence_status(&self) -> Option<FenceStatus> {
        self.renewed.map(|(at, lease, holds_vips)| FenceStatus {
            holds_vips,
            lease_left_ms: lease.saturating_sub(at.elapsed()).as_millis() as u64,
        })
    }

    /// Runs the renew program twice, 200 ms apart, with a lapsed lease, and
    /// snaps the jiffies per second to the nearest HZ Linux is built with.
    fn measure_hz(&mut self) -> Result<u64, XdpError> {
        const SPAN: Duration = Duration::from_millis(200);
        self.run_renew(0, 0)?;
        let (first, started) = (self.read_fence()?.renewed_jiffies, Instant::now());
        std::thread::sleep(SPAN);
        self.run_renew(0, 0)?;
        let (second, elapsed) = (self.read_fence()?.renewed_jiffies, started.elapsed());
        let rate = (second - first) as f64 / elapsed.as_secs_f64();
        Ok(snap_hz(rate))
    }

    fn run_renew(&mut self, lease_jiffies: u64, flags: u32) -> Result<(), XdpError> {
        let renewal = Renewal {
            lease_jiffies,
            flags,
            _pad: 0,
        };
        let mut packet = [0u8; size_of::<Renewal>()];
        packet[..8].copy_from_slice(&renewal.lease_jiffies.to_ne_bytes());
        packet[8..12].copy_from_slice(&renewal.flags.to_ne_bytes());
        let name = maps::RENEW_PROGRAM;
        let result = program(&self.ebpf, name)?
            .test_run(TestRunOptions {
                data_in: Some(&packet),
                ..TestRunOptions::default()
            })
            .map_err(|source| XdpError::TestRun { name, source })?;
        const XDP_PASS: u32 = 2;
        if result.return_value != XDP_PASS {
            return Err(XdpError::Renew(result.return_value));
        }
        Ok(())
    }

    fn read_fence(&self) -> Result<Fence, XdpError> {
        self.fence.get(&0, 0).map_err(|source| XdpError::Map {
            op: "reading",
            name: maps::FENCE,
            source,
        })
    }

    /// Every counter, summed over CPUs: the rows, then the per-CPU entries
    /// of CPUs past the rows (zero on CPUs that have a row).
    pub fn counters(&self) -> Result<CounterSnapshot, XdpError> {
        let read = |name| {
            move |source| XdpError::Map {
                op: "reading",
                name,
                source,
            }
        };
        let rows = self
            .counter_rows
            .get(&0, 0)
            .map_err(read(maps::COUNTER_ROWS))?;
        let per_cpu = self.counters.get(&0, 0).map_err(read(maps::COUNTERS))?;
        Ok(CounterSnapshot::from_cpus(
            rows.iter().map(|row| &row.counters).chain(per_cpu.iter()),
        ))
    }

    /// The loaded program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&self) -> Result<&Xdp, XdpError> {
        program(&self.ebpf, maps::PROGRAM)
    }

    /// The loaded egress program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn egress_program(&self) -> Result<&aya::programs::SchedClassifier, XdpError> {
        continuity::classifier_ref(&self.ebpf)
    }

    /// The program that steers, attached in director mode on the master.
    pub fn director_program(&self) -> Result<&Xdp, XdpError> {
        program(&self.ebpf, maps::DIRECTOR_PROGRAM)
    }
}

impl fmt::Debug for Datapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Datapath")
            .field("services", &self.services)
            .field("attachment", &self.attachment)
            .field("hz", &self.hz)
            .finish_non_exhaustive()
    }
}

/// Looks up an XDP program by name.
pub fn program<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a Xdp, XdpError> {
    ebpf.program(name)
        .ok_or(XdpError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| XdpError::NotXdp { name, source })
}

fn program_mut<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, XdpError> {
    ebpf.program_mut(name)
        .ok_or(XdpError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| XdpError::NotXdp { name, source })
}

/// The pin of the link on `interface`: named by the network namespace and
/// the interface's index in it (a BPF filesystem refuses names with dots,
/// which interface names may have; and namespaces sharing one BPF
/// filesystem must not share pins), and by the mode, so that a restarted
/// daemon knows the mode of the link it takes over. An unknown interface
/// has no pin.
fn pin_path(dir: &Path, interface: &str, mode: AttachMode) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt as _;

    let netns = std::fs::metadata("/proc/self/ns/net").ok()?.ino();
    let index = nix::net::if_::if_nametoindex(interface).ok()?;
    Some(dir.join(format!("xdp-link-{netns}-{index}-{mode}")))
}

/// Creates `dir` if needed and checks it is on a BPF filesystem: a pin
/// anywhere else fails, and one on a bpffs mounted only in the daemon's own
/// mount namespace would vanish with the daemon.
fn require_bpffs(dir: &Path) -> Result<(), XdpError> {
    std::fs::create_dir_all(dir).map_err(|source| XdpError::Pin {
        op: "creating",
        path: dir.to_owned(),
        source,
    })?;
    let stat = nix::sys::statfs::statfs(dir).map_err(|e| XdpError::Pin {
        op: "checking the filesystem of",
        path: dir.to_owned(),
        source: e.into(),
    })?;
    if stat.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(XdpError::NotBpffs {
            path: dir.to_owned(),
        });
    }
    Ok(())
}

/// The nearest of [`KNOWN_HZ`] to a measured tick rate.
fn snap_hz(rate: f64) -> u64 {
    KNOWN_HZ
        .into_iter()
        .min_by(|a, b| {
            let da = (*a as f64 - rate).abs();
            let db = (*b as f64 - rate).abs();
            da.total_cmp(&db)
        })
        .unwrap_or(250)
}

fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, XdpError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(XdpError::Missing { kind: "map", name })?;
    M::try_from(map).map_err(|source| XdpError::MapType { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_without_the_objects_says_how_to_build_them() {
        let error = object(&[]).unwrap_err();
        assert!(error.to_string().contains("cargo xtask build"), "{error}");
        assert_eq!(object(b"\x7fELF").unwrap(), b"\x7fELF");
    }

    #[test]
    fn measured_tick_rates_snap_to_a_real_hz() {
        assert_eq!(snap_hz(248.7), 250);
        assert_eq!(snap_hz(99.0), 100);
        assert_eq!(snap_hz(290.0), 300);
        assert_eq!(snap_hz(990.0), 1000);
    }
}
