//! What the running kernel offers the programs, probed once at start.
//!
//! Every feature the programs or the daemon cannot do without is asked of
//! the kernel itself (a program type, a map type, a helper, global data);
//! one that is missing stops the daemon with one message naming it and the
//! Linux version that brought it. The one feature with a fallback, tcx links
//! for the egress guard (Linux 6.6), is reported as on or off: where it is
//! off the guard attaches as a TC clsact filter instead, with the same
//! guarantees (see [`super::continuity`]).

use std::fmt;

use aya::{
    maps::MapType,
    programs::{ProgramError, ProgramType, SchedClassifier, TcAttachType},
    sys::{BpfHelper, SyscallError, is_helper_supported, is_map_supported, is_program_supported},
    util::KernelVersion,
};
use serde::{Deserialize, Serialize};

/// The oldest Linux the gateway is tested on and supported on.
pub const MINIMUM: &str = "6.1";

/// What the kernel was asked, for one required feature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Probe {
    /// A BPF program type can be loaded.
    Program(ProgramType),
    /// A BPF map type can be created.
    Map(MapType),
    /// A helper can be called from every one of these program types.
    Helper(BpfHelper, &'static [ProgramType]),
    /// Programs can have global variables (array maps read in place).
    GlobalData,
    /// XDP programs attach through BPF links, which can be pinned and
    /// updated in place. No probe leaves the kernel untouched, so the
    /// kernel's version is read (aya attaches XDP the same way).
    XdpLinks,
}

/// A feature the gateway cannot run without.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Requirement {
    /// What it is, as the error names it.
    pub feature: &'static str,
    /// The Linux version that brought it.
    pub since: &'static str,
    pub probe: Probe,
}

const TC: &[ProgramType] = &[ProgramType::SchedClassifier];
const BOTH: &[ProgramType] = &[ProgramType::Xdp, ProgramType::SchedClassifier];

/// Everything the programs and the daemon need, oldest first. The helpers
/// are every helper the BPF object calls (a test reads the object and
/// fails on one missing here).
pub const REQUIRED: &[Requirement] = &[
    Requirement {
        feature: "TC classifier programs",
        since: "4.1",
        probe: Probe::Program(ProgramType::SchedClassifier),
    },
    Requirement {
        feature: "XDP programs",
        since: "4.8",
        probe: Probe::Program(ProgramType::Xdp),
    },
    Requirement {
        feature: "BPF array maps",
        since: "3.19",
        probe: Probe::Map(MapType::Array),
    },
    Requirement {
        feature: "per-CPU BPF array maps",
        since: "4.6",
        probe: Probe::Map(MapType::PerCpuArray),
    },
    Requirement {
        feature: "LRU BPF hash maps",
        since: "4.10",
        probe: Probe::Map(MapType::LruHash),
    },
    Requirement {
        feature: "LPM trie BPF maps (the advert port's sources)",
        since: "4.11",
        probe: Probe::Map(MapType::LpmTrie),
    },
    Requirement {
        feature: "the bpf_map_lookup_elem helper",
        since: "3.19",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_map_lookup_elem, BOTH),
    },
    Requirement {
        feature: "the bpf_map_update_elem helper",
        since: "3.19",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_map_update_elem, BOTH),
    },
    Requirement {
        feature: "the bpf_get_smp_processor_id helper",
        since: "4.1",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_get_smp_processor_id, BOTH),
    },
    Requirement {
        feature: "the bpf_ktime_get_ns helper (the strangers' budget at the advert port)",
        since: "4.1",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_ktime_get_ns, BOTH),
    },
    Requirement {
        feature: "the bpf_skb_store_bytes helper",
        since: "4.1",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_skb_store_bytes, TC),
    },
    Requirement {
        feature: "the bpf_l3_csum_replace helper",
        since: "4.1",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_l3_csum_replace, TC),
    },
    Requirement {
        feature: "the bpf_l4_csum_replace helper",
        since: "4.1",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_l4_csum_replace, TC),
    },
    Requirement {
        feature: "the bpf_skb_load_bytes helper",
        since: "4.5",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_skb_load_bytes, TC),
    },
    Requirement {
        feature: "the bpf_csum_diff helper",
        since: "4.6",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_csum_diff, TC),
    },
    Requirement {
        feature: "the bpf_skb_pull_data helper",
        since: "4.9",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_skb_pull_data, TC),
    },
    Requirement {
        feature: "BPF global data",
        since: "5.2",
        probe: Probe::GlobalData,
    },
    Requirement {
        feature: "the bpf_jiffies64 helper (the VIP fence's clock)",
        since: "5.5",
        probe: Probe::Helper(BpfHelper::BPF_FUNC_jiffies64, BOTH),
    },
    Requirement {
        feature: "BPF links for XDP",
        since: "5.9",
        probe: Probe::XdpLinks,
    },
];

/// The Linux version that brought tcx links.
pub const TCX_SINCE: &str = "6.6";

/// Why the kernel cannot run the gateway.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "this kernel ({release}) lacks {}; Tidegate needs Linux {MINIMUM} or later",
        missing_list(.missing)
    )]
    Missing {
        release: String,
        missing: Vec<Requirement>,
    },
    #[error("asking the kernel whether it has {feature}")]
    Probe {
        feature: &'static str,
        #[source]
        source: ProgramError,
    },
}

fn missing_list(missing: &[Requirement]) -> String {
    missing
        .iter()
        .map(|r| format!("{} (Linux {})", r.feature, r.since))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How the egress guard hooks into the interface's egress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EgressHook {
    /// A tcx link pinned on the BPF filesystem (Linux 6.6).
    Tcx,
    /// A filter on the interface's clsact qdisc, over netlink.
    Clsact,
}

impl fmt::Display for EgressHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcx => "tcx link",
            Self::Clsact => "TC clsact filter",
        })
    }
}

/// The running kernel, as the gateway uses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kernel {
    /// `uname -r`.
    pub release: String,
    /// Whether tcx links exist; without them the egress guard is a clsact
    /// filter.
    pub tcx: bool,
}

impl Kernel {
    /// Probes every [`REQUIRED`] feature, and tcx links.
    pub fn probe() -> Result<Self, KernelError> {
        let release = release();
        let mut results = Vec::with_capacity(REQUIRED.len());
        for requirement in REQUIRED {
            let present = probe(requirement.probe).map_err(|source| KernelError::Probe {
                feature: requirement.feature,
                source,
            })?;
            results.push((*requirement, present));
        }
        check(&release, &results)?;
        Ok(Self {
            tcx: probe_tcx().map_err(|source| KernelError::Probe {
                feature: "tcx links",
                source,
            })?,
            release,
        })
    }

    /// How the egress guard attaches on this kernel.
    pub fn egress_hook(&self) -> EgressHook {
        if self.tcx {
            EgressHook::Tcx
        } else {
            EgressHook::Clsact
        }
    }
}

/// The verdict on probe results: every requirement present, or one error
/// naming all that are missing.
pub fn check(release: &str, results: &[(Requirement, bool)]) -> Result<(), KernelError> {
    let missing: Vec<Requirement> = results
        .iter()
        .filter(|(_, present)| !present)
        .map(|(requirement, _)| *requirement)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KernelError::Missing {
            release: release.to_owned(),
            missing,
        })
    }
}

fn probe(probe: Probe) -> Result<bool, ProgramError> {
    match probe {
        Probe::Program(kind) => is_program_supported(kind),
        Probe::Map(kind) => is_map_supported(kind).map_err(ProgramError::from),
        Probe::Helper(helper, kinds) => {
            for kind in kinds {
                if !is_helper_supported(*kind, helper)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        Probe::GlobalData => Ok(aya::features().bpf_global_data()),
        Probe::XdpLinks => KernelVersion::current()
            .map(|version| version >= KernelVersion::new(5, 9, 0))
            .map_err(|e| ProgramError::IOError(std::io::Error::other(e.to_string()))),
    }
}

/// Whether the kernel has tcx links: it answers a query for the tcx egress
/// programs of `lo`, which every network namespace has (none attached is an
/// answer too); a kernel without tcx refuses the attach type (EINVAL).
fn probe_tcx() -> Result<bool, ProgramError> {
    match SchedClassifier::query_tcx("lo", TcAttachType::Egress) {
        Ok(_) => Ok(true),
        Err(ProgramError::SyscallError(SyscallError { io_error, .. }))
            if io_error.raw_os_error() == Some(libc::EINVAL) =>
        {
            Ok(false)
        }
        Err(error) => Err(error),
    }
}

/// `uname -r`.
fn release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requirement(feature: &'static str, since: &'static str) -> Requirement {
        Requirement {
            feature,
            since,
            probe: Probe::GlobalData,
        }
    }

    #[test]
    fn every_feature_present_passes() {
        let results: Vec<_> = REQUIRED.iter().map(|r| (*r, true)).collect();
        assert!(check("6.1.0-57-amd64", &results).is_ok());
    }

    #[test]
    fn missing_features_are_named_with_their_version_in_one_message() {
        /// (feature, since, present) for each probe, and the error expected.
        type Case<'a> = (&'a [(&'a str, &'a str, bool)], Option<&'a str>);
        let cases: &[Case<'_>] = &[
            (&[("a", "5.2", true)], None),
            (
                &[
                    ("global data", "5.2", true),
                    ("bpf_jiffies64", "5.5", false),
                ],
                Some(
                    "this kernel (5.4.0-1) lacks bpf_jiffies64 (Linux 5.5); \
                     Tidegate needs Linux 6.1 or later",
                ),
            ),
            (
                &[("jiffies", "5.5", false), ("XDP links", "5.9", false)],
                Some(
                    "this kernel (5.4.0-1) lacks jiffies (Linux 5.5), XDP links (Linux 5.9); \
                     Tidegate needs Linux 6.1 or later",
                ),
            ),
        ];
        for (results, expected) in cases {
            let results: Vec<_> = results
                .iter()
                .map(|(feature, since, present)| (requirement(feature, since), *present))
                .collect();
            let got = check("5.4.0-1", &results).err().map(|e| e.to_string());
            assert_eq!(got.as_deref(), *expected, "{results:?}");
        }
    }

    #[test]
    fn no_requirement_is_newer_than_the_minimum() {
        let version = |v: &str| -> (u32, u32) {
            let (major, minor) = v.split_once('.').expect("major.minor");
            (major.parse().unwrap(), minor.parse().unwrap())
        };
        let minimum = version(MINIMUM);
        for r in REQUIRED {
            assert!(
                version(r.since) <= minimum,
                "{} needs {}",
                r.feature,
                r.since
            );
        }
        assert!(
            version(TCX_SINCE) > minimum,
            "tcx would not need a fallback"
        );
    }

    /// The helpers each section of the BPF object calls: `call` instructions
    /// (`BPF_JMP | BPF_CALL`) with source register 0 name a helper by id;
    /// the others call a function of the object.
    fn helper_calls(section: &[u8]) -> Vec<u32> {
        const BPF_CALL: u8 = 0x85;
        section
            .chunks_exact(8)
            .filter(|insn| insn[0] == BPF_CALL && insn[1] >> 4 == 0)
            .map(|insn| u32::from_le_bytes([insn[4], insn[5], insn[6], insn[7]]))
            .collect()
    }

    #[test]
    #[cfg_attr(tidegate_no_bpf, ignore = "reads the BPF object: cargo xtask test")]
    fn every_helper_the_programs_call_is_probed_for_their_program_type() {
        use object::{Object as _, ObjectSection as _};

        let file = object::File::parse(super::super::OBJECT).expect("an ELF object");
        let probed = |helper: u32, kind: ProgramType| {
            REQUIRED.iter().any(|r| match r.probe {
                Probe::Helper(h, kinds) => h as u32 == helper && kinds.contains(&kind),
                _ => false,
            })
        };
        let mut seen = 0;
        let mut unprobed = Vec::new();
        for section in file.sections() {
            // Functions in .text are called from programs of both types.
            let kinds: &[ProgramType] = match section.name().unwrap_or_default() {
                "xdp" => &[ProgramType::Xdp],
                "classifier" => &[ProgramType::SchedClassifier],
                ".text" => BOTH,
                _ => continue,
            };
            for helper in helper_calls(section.data().expect("section data")) {
                seen += 1;
                for kind in kinds {
                    if !probed(helper, *kind) {
                        unprobed.push((
                            section.name().unwrap_or_default().to_owned(),
                            helper,
                            *kind,
                        ));
                    }
                }
            }
        }
        assert!(seen > 0, "no helper call found: the decoder is wrong");
        unprobed.sort_by_key(|(section, helper, _)| (section.clone(), *helper));
        unprobed.dedup_by_key(|(section, helper, _)| (section.clone(), *helper));
        assert!(
            unprobed.is_empty(),
            "helpers called but not probed: {unprobed:?}"
        );
    }

    #[test]
    fn the_egress_hook_follows_tcx() {
        let kernel = |tcx| Kernel {
            release: "x".into(),
            tcx,
        };
        assert_eq!(kernel(true).egress_hook(), EgressHook::Tcx);
        assert_eq!(kernel(false).egress_hook(), EgressHook::Clsact);
    }
}
