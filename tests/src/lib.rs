//! Network-namespace harness shared by the integration tests and the lab.
//!
//! Everything here builds real topologies: network namespaces, veth pairs, a
//! bridge, WireGuard interfaces (kernel module or `wireguard-go`) and our own
//! daemons, all named uniquely per run and torn down on drop, including when a
//! test panics. Processes are owned by guards that hold a handle on their
//! namespace, so a namespace is deleted only after every process in it has
//! been stopped.
//!
//! The HA location ([`ha`]) runs several gateways with an echo service on
//! the VIP and a prober on the client ([`probe`]), which learns from every
//! answer which gateway holds the VIP. The same segment runs with
//! keepalived instead ([`keepalived`]) for the failover benchmark, which
//! times both with [`failover`]. The director's location ([`director`])
//! puts real WireGuard clients in front of three gateways in director
//! mode; the steering benchmark's lab ([`steer_lab`]) pits the director
//! against a bare bounce and NGINX's UDP stream proxy ([`nginx_stream`]).
//!
//! The control plane's pieces: a test CA ([`pki`]) issuing certificates for
//! Core, gateways and Edges; gateways with a `[core]` section
//! ([`gateway::CoreSection`]); Edge daemons ([`edge`]) behind a real nginx
//! ([`nginx`]); and a small HTTP client ([`http`]) to talk to them from
//! inside their namespace. [`scripted_core`] plays Core's side of the
//! links for tests of gateways and Edges on their own. The real Core
//! ([`core_daemon`]) runs with a PKI of its own making; [`control`] puts it
//! in an intranet namespace with gateways, Edges behind nginx and a client.
//! The users' `tidegate-client` runs through [`user_client`]; in the
//! kernel suite's VMs [`resolvconf`] gives it Debian's resolvconf.

pub mod adverts;
pub mod bins;
pub mod capture;
pub mod clock;
pub mod cmd;
pub mod continuity;
pub mod control;
pub mod core_daemon;
pub mod director;
pub mod edge;
pub mod failover;
pub mod flood;
pub mod gateway;
pub mod ha;
pub mod handshakes;
pub mod http;
pub mod keepalived;
pub mod lab_report;
pub mod location;
pub mod metrics;
pub mod netns;
pub mod nginx;
pub mod nginx_stream;
pub mod pace;
pub mod packets;
pub mod pki;
pub mod probe;
pub mod process;
pub mod resolvconf;
pub mod run;
pub mod scripted_core;
pub mod shield;
pub mod steer_lab;
pub mod stop;
pub mod tmpfs;
pub mod user_client;
pub mod wait;
pub mod wireguard;
pub mod xdp;
pub mod xdp_pass;

pub use bins::{BIN_DIR_ENV, bin_dir, binary};
pub use cmd::{CmdOutput, run_bounded, run_ok, run_with_input};
pub use control::{ControlLab, ControlOptions};
pub use core_daemon::{CoreConfig, CoreDaemon, CorePki};
pub use edge::{EdgeConfig, EdgeDaemon};
pub use gateway::{
    CoreSection, Counter, Counters, GatewayConfig, GatewayDaemon, HaSection, PeerEntry, PeerStatus,
    PeersReply, Removal, WireguardSection, XdpMode,
};
pub use ha::{HaLocation, HaOptions, HaStatus, Prober};
pub use location::{Client, Location, LocationOptions};
pub use netns::{BackgroundPing, Netns, PingReport, bridge, veth};
pub use nginx::Nginx;
pub use pki::{CertFiles, TestPki};
pub use probe::ProbeSummary;
pub use process::Process;
pub use run::Run;
pub use shield::{Shield, ShieldOptions, Tunnel, Underlay};
pub use wait::{Probe, poll_until};
pub use wireguard::{
    DetachedWireguardGo, KeyPair, PeerStats, WgBackend, WgInterface, WgPeer, dump_config,
};
pub use xdp::{XdpAttachMode, XdpAttachment, xdp_attachment};

/// Panics unless the process runs as root.
///
/// The namespace tests cannot do anything useful without root, and a test
/// that silently skips would look like a pass.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the namespace tests need root: run `cargo xtask test` as root"
    );
}
