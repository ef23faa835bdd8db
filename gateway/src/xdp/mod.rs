//! The XDP program: load, fill the service maps, attach, read counters.
//!
//! [`Datapath`] owns the loaded object and its maps; one task owns the
//! `Datapath` (see [`crate::datapath`]) and everything else asks it.

pub mod counters;
pub mod services;

use std::fmt;

use aya::{
    Ebpf, EbpfError,
    maps::{Array, MapData, MapError, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use serde::{Deserialize, Serialize};
use tidegate_common::{
    maps,
    service::{PortTable, ServiceAddrV6},
    stats::{CounterRows, Counters},
};
use tracing::{info, warn};

pub use self::{
    counters::{CounterSnapshot, PacketCount},
    services::{ServiceError, ServiceTable},
};

/// The XDP object, built by `cargo xtask build-ebpf`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tidegate.bpf.o"));

/// An empty `XDP_PASS` program built the same way: the benchmark baseline.
pub static BASELINE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tidegate-baseline.bpf.o"));

/// Errors of the XDP data path, each naming the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
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

#[derive(Debug)]
struct Attachment {
    interface: String,
    mode: AttachMode,
    link: XdpLinkId,
}

/// The loaded XDP program and its maps.
pub struct Datapath {
    ebpf: Ebpf,
    /// The `SERVICE_PORTS` global's section: one entry, the whole table.
    service_ports: Array<MapData, PortTable>,
    service_v4: Array<MapData, u32>,
    service_v6: Array<MapData, ServiceAddrV6>,
    /// The `COUNTER_ROWS` global's section: one entry, a row per CPU.
    counter_rows: Array<MapData, CounterRows>,
    counters: PerCpuArray<MapData, Counters>,
    services: ServiceTable,
    attachment: Option<Attachment>,
}

impl Datapath {
    /// Loads the object and the program into the kernel, without attaching.
    pub fn load() -> Result<Self, XdpError> {
        let mut ebpf = Ebpf::load(OBJECT).map_err(XdpError::Load)?;
        program_mut(&mut ebpf)?
            .load()
            .map_err(|source| XdpError::Verify {
                name: maps::PROGRAM,
                source,
            })?;
        Ok(Self {
            service_ports: take_map(&mut ebpf, maps::SERVICE_PORTS)?,
            service_v4: take_map(&mut ebpf, maps::SERVICE_V4)?,
            service_v6: take_map(&mut ebpf, maps::SERVICE_V6)?,
            counter_rows: take_map(&mut ebpf, maps::COUNTER_ROWS)?,
            counters: take_map(&mut ebpf, maps::COUNTERS)?,
            ebpf,
            services: ServiceTable::default(),
            attachment: None,
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
        self.service_ports
            .set(0, table.port_table(), 0)
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

    /// The services installed.
    pub fn services(&self) -> &ServiceTable {
        &self.services
    }

    /// Attaches to `interface`. In [`XdpModeSetting::Auto`], driver mode is
    /// tried first and generic mode used, with a warning, if it fails.
    pub fn attach(
        &mut self,
        interface: &str,
        setting: XdpModeSetting,
    ) -> Result<AttachMode, XdpError> {
        let mode = match setting {
            XdpModeSetting::Driver => self.attach_in(interface, AttachMode::Driver)?,
            XdpModeSetting::Generic => self.attach_in(interface, AttachMode::Generic)?,
            XdpModeSetting::Auto => match self.attach_in(interface, AttachMode::Driver) {
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
                    self.attach_in(interface, AttachMode::Generic)?
                }
            },
        };
        info!(interface, %mode, "XDP shield attached");
        Ok(mode)
    }

    fn attach_in(&mut self, interface: &str, mode: AttachMode) -> Result<AttachMode, XdpError> {
        let link = program_mut(&mut self.ebpf)?
            .attach(interface, mode.aya())
            .map_err(|source| XdpError::Attach {
                interface: interface.to_owned(),
                mode,
                source,
            })?;
        self.attachment = Some(Attachment {
            interface: interface.to_owned(),
            mode,
            link,
        });
        Ok(mode)
    }

    /// Where the program is attached, if it is.
    pub fn attached(&self) -> Option<(&str, AttachMode)> {
        self.attachment
            .as_ref()
            .map(|a| (a.interface.as_str(), a.mode))
    }

    /// Detaches from the interface; a no-op when not attached.
    pub fn detach(&mut self) -> Result<(), XdpError> {
        let Some(attachment) = self.attachment.take() else {
            return Ok(());
        };
        program_mut(&mut self.ebpf)?
            .detach(attachment.link)
            .map_err(|source| XdpError::Detach {
                interface: attachment.interface.clone(),
                source,
            })?;
        info!(interface = attachment.interface, "XDP shield detached");
        Ok(())
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
}

impl fmt::Debug for Datapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Datapath")
            .field("services", &self.services)
            .field("attachment", &self.attachment)
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

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    let name = maps::PROGRAM;
    ebpf.program_mut(name)
        .ok_or(XdpError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| XdpError::NotXdp { name, source })
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
