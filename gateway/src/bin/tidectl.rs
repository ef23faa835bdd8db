//! `tidectl`: the operator's command line for a Tidegate gateway (through
//! its local control socket) and for Core (through Core's admin socket).

#[path = "tidectl/core_api.rs"]
mod core_api;
#[path = "tidectl/wg_quick.rs"]
mod wg_quick;

use std::{
    io::Read as _,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use tidegate_common::stats::Counter;
use tidegate_gateway::core_link::CoreLinksStatus;
use tidegate_gateway::{
    config::DEFAULT_CONTROL_SOCKET,
    control::{DatapathCounters, client::Client},
    error_chain,
    ha::{advert, agent::HaMode, status::HaStatus},
    reload::ReloadPlan,
    wireguard::{ApplyReport, PeerEntry, PeersReply, state::Removal},
    xdp::{DirectorStatus, PacketCount, SessionEntry},
};
use tidegate_proto::expiry::PkiStatus;

/// Operate a Tidegate gateway through its local control socket, and Core
/// through its admin socket (both root only).
#[derive(Debug, Parser)]
#[command(name = "tidectl", version, about)]
struct Cli {
    /// The gateway daemon's control socket.
    #[arg(long, env = "TIDEGATE_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
    socket: PathBuf,
    /// Core's admin socket (location, gateway, user, device, edge, events,
    /// failover --location).
    #[arg(long, env = "TIDEGATE_CORE_SOCKET", default_value = core_api::DEFAULT_CORE_SOCKET)]
    core_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The XDP shield's packet counters, by verdict and reason.
    Counters {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The WireGuard peers: endpoint, last handshake, bytes.
    Peers {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add, change or remove a peer at run time.
    #[command(subcommand)]
    Peer(PeerCommand),
    /// Re-read the config file and apply what changed (like SIGHUP, but
    /// with the outcome printed).
    Reload {
        /// Only say what a reload would change (or which keys it refuses),
        /// applying nothing.
        #[arg(long)]
        check: bool,
    },
    /// Peers an MFA location removed for inactivity, oldest first.
    Removals {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The HA election: role, priority, master, VIPs, recent transitions;
    /// then the certificate of Core's link and the CA's, with their expiry.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The certificate this gateway presents to Core and the CA's: serial,
    /// expiry (a warning within 30 days, renew with `tidegate-core issue
    /// --renew NAME`).
    Certificates {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Planned failover: this master hands the VIPs to its best backup; with
    /// --location, Core asks that location's master.
    Failover {
        /// Ask Core for a handover at this location instead.
        #[arg(long)]
        location: Option<String>,
    },
    /// Maintenance mode: the gateway stays BACKUP (a master hands over first).
    Maintenance {
        #[arg(value_enum)]
        mode: OnOff,
    },
    /// Core: locations, and each gateway's link and role (`location status`).
    #[command(subcommand)]
    Location(core_api::LocationCommand),
    /// Core: the gateways it dials.
    #[command(subcommand)]
    Gateway(core_api::GatewayCommand),
    /// Core: users and their TOTP secrets.
    #[command(subcommand)]
    User(core_api::UserCommand),
    /// Core: devices, and one-time config download tokens.
    #[command(subcommand)]
    Device(core_api::DeviceCommand),
    /// Core: the Edges it dials.
    #[command(subcommand)]
    Edge(core_api::EdgeCommand),
    /// Core: the event log, newest first.
    Events {
        /// Only this location's.
        #[arg(long)]
        location: Option<String>,
        /// How many (at most 10000).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Core: its own certificate and the CA's, serial and expiry (renew
    /// with `tidegate-core issue --renew core`).
    CoreCertificates {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Core: whether it leads and at which term, who leads, its database,
    /// and every Core sharing the database with its links up.
    CoreStatus {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Director mode: this gateway keeps the clients pinned to it and gets
    /// no new ones (it tells the others in its adverts).
    Drain,
    /// Director mode: this gateway takes new clients again.
    Undrain,
    /// Director mode: the director's pins, client by client (on the master;
    /// a backup lists the pins of its last term as master).
    Sessions {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Director mode: steering on or off, the backends, and per backend the
    /// frames, bytes and new pins the director sent it.
    Director {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write tidectl's manual pages and shell completions under DIR (what
    /// `cargo xtask package` ships).
    #[command(hide = true)]
    GenerateManual { dir: PathBuf },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Debug, Subcommand)]
enum PeerCommand {
    /// Add a new peer.
    Add(PeerArgs),
    /// Replace the settings of a peer added with `peer add`.
    Change(PeerArgs),
    /// Remove a peer added with `peer add`.
    Remove {
        /// The peer's public key (base64).
        public_key: String,
    },
}

#[derive(Debug, Args)]
struct PeerArgs {
    /// The peer's public key (base64).
    #[arg(long)]
    public_key: String,
    /// Tunnel networks routed to the peer (repeat, or separate with commas).
    #[arg(long, value_delimiter = ',')]
    allowed_ips: Vec<String>,
    /// A label for logs and errors.
    #[arg(long)]
    name: Option<String>,
    /// File holding the preshared key in base64 (`-` for standard input).
    #[arg(long)]
    preshared_key_file: Option<PathBuf>,
    /// Keepalive interval in seconds.
    #[arg(long)]
    keepalive: Option<u16>,
    /// Where to reach the peer before it speaks (address:port).
    #[arg(long)]
    endpoint: Option<String>,
}

impl PeerArgs {
    fn entry(self) -> Result<PeerEntry> {
        let preshared_key = match &self.preshared_key_file {
            None => None,
            Some(path) if path.as_os_str() == "-" => {
                let mut text = String::new();
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("reading the preshared key from standard input")?;
                Some(text.trim().to_owned())
            }
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the preshared key from {}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
        };
        Ok(PeerEntry {
            name: self.name,
            public_key: self.public_key,
            allowed_ips: self.allowed_ips,
            preshared_key,
            persistent_keepalive: self.keepalive,
            endpoint: self.endpoint,
        })
    }
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tidectl: {}", error_chain(error.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Command::GenerateManual { dir } = &cli.command {
        use clap::CommandFactory as _;
        tidegate_proto::manual::write(Cli::command(), dir)
            .with_context(|| format!("writing the manual to {}", dir.display()))?;
        return Ok(());
    }
    let gateway = Client::new(cli.socket);
    let core = |command| core_api::run(&cli.core_socket, command);
    match cli.command {
        Command::Location(command) => core(core_api::CoreCommand::Location(command))?,
        Command::Gateway(command) => core(core_api::CoreCommand::Gateway(command))?,
        Command::User(command) => core(core_api::CoreCommand::User(command))?,
        Command::Device(command) => core(core_api::CoreCommand::Device(command))?,
        Command::Edge(command) => core(core_api::CoreCommand::Edge(command))?,
        Command::Events {
            location,
            limit,
            json,
        } => core(core_api::CoreCommand::Events {
            location,
            limit,
            json,
        })?,
        Command::Failover {
            location: Some(location),
        } => core(core_api::CoreCommand::Failover { location })?,
        Command::CoreCertificates { json } => {
            core(core_api::CoreCommand::Certificates { json })?;
        }
        Command::CoreStatus { json } => {
            core(core_api::CoreCommand::Status { json })?;
        }
        Command::Counters { json } => {
            let reply = gateway.counters()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
            } else {
                print!("{}", counters_table(&reply));
            }
        }
        Command::Peers { json } => {
            let reply = gateway.peers()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
            } else {
                print!("{}", peers_table(&reply, SystemTime::now()));
            }
        }
        Command::Peer(command) => {
            let report = match command {
                PeerCommand::Add(args) => gateway.add_peer(args.entry()?)?,
                PeerCommand::Change(args) => gateway.change_peer(args.entry()?)?,
                PeerCommand::Remove { public_key } => gateway.remove_peer(public_key)?,
            };
            applied(report);
        }
        Command::Reload { check: false } => applied(gateway.reload()?),
        Command::Reload { check: true } => print!("{}", plan_text(&gateway.reload_check()?)),
        Command::Removals { json } => {
            let removals = gateway.removals()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&removals)?);
            } else {
                print!("{}", removals_table(&removals));
            }
        }
        Command::Status { json } => {
            let status = gateway.status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status_text(&status, SystemTime::now()));
                // A daemon without the request (older) has nothing to add.
                if let Ok(Some(pki)) = gateway.certificates() {
                    print!("{}", certificates_text(&pki));
                }
            }
        }
        Command::Certificates { json } => {
            let pki = gateway.certificates()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&pki)?);
            } else if let Some(pki) = pki {
                print!("{}", certificates_text(&pki));
            } else {
                println!("no [core] section: no certificate in use");
            }
        }
        Command::Failover { location: None } => {
            let to = gateway.failover()?;
            println!("handing over to gateway {to}");
        }
        Command::Maintenance { mode } => {
            let on = gateway.maintenance(matches!(mode, OnOff::On))?;
            println!("maintenance {}", if on { "on" } else { "off" });
        }
        Command::Drain => drained(gateway.drain(true)?),
        Command::Undrain => drained(gateway.drain(false)?),
        Command::Sessions { json } => {
            let sessions = gateway.sessions()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sessions)?);
            } else {
                print!("{}", sessions_table(&sessions));
            }
        }
        Command::Director { json } => {
            let status = gateway.director()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", director_table(&status));
            }
        }
        Command::GenerateManual { .. } => unreachable!("handled above"),
    }
    Ok(())
}

/// Prints whether the gateway is now draining.
fn drained(on: bool) {
    println!(
        "{}",
        if on {
            "draining: no new clients for this gateway; pinned clients stay"
        } else {
            "not draining: this gateway takes new clients"
        }
    );
}

fn sessions_table(sessions: &[SessionEntry]) -> String {
    use std::fmt::Write as _;

    let mut out = format!("{} sessions\n\n", sessions.len());
    let _ = writeln!(out, "{:<46} {:>8} {:>14}", "CLIENT", "GATEWAY", "LAST SEEN");
    for session in sessions {
        let seen = session.last_seen_ms.map_or_else(
            || "-".to_owned(),
            |ms| format!("{:.1}s ago", ms as f64 / 1000.0),
        );
        let _ = writeln!(
            out,
            "{:<46} {:>8} {:>14}",
            session.client.to_string(),
            session.gateway_id,
            seen
        );
    }
    out
}

fn director_table(status: &DirectorStatus) -> String {
    use std::fmt::Write as _;

    let mut out = format!(
        "director {}: Maglev table of {} entries, up to {} sessions\n\n",
        if status.on {
            "on (this gateway is the master)"
        } else {
            "off (this gateway is not the master)"
        },
        status.table_size,
        status.max_sessions
    );
    let _ = writeln!(
        out,
        "{:<8} {:<17} {:<22} {:>7} {:>12} {:>14} {:>10}",
        "GATEWAY", "MAC", "STATE", "TABLE%", "PACKETS", "BYTES", "NEW PINS"
    );
    for backend in &status.backends {
        let mut state = Vec::new();
        if backend.local {
            state.push("local");
        }
        state.push(if !backend.present {
            "gone"
        } else if backend.draining {
            "draining"
        } else {
            "active"
        });
        let share = 100.0 * f64::from(backend.table_entries) / f64::from(status.table_size.max(1));
        let _ = writeln!(
            out,
            "{:<8} {:<17} {:<22} {:>7.2} {:>12} {:>14} {:>10}",
            backend.gateway_id,
            if backend.mac.is_empty() {
                "-"
            } else {
                &backend.mac
            },
            state.join(", "),
            share,
            backend.packets,
            backend.bytes,
            backend.new_pins
        );
    }
    let _ = writeln!(
        out,
        "\nunpinned (no backend to pick, passed locally): {} packets, {} bytes",
        status.unpinned.packets, status.unpinned.bytes
    );
    out
}

fn certificates_text(pki: &PkiStatus) -> String {
    format!("certificate: {}\nCA: {}\n", pki.own.line(), pki.ca.line())
}

/// Core's Links: the fence's highest term and leader, then one line per
/// Link.
fn core_links_text(core: &CoreLinksStatus, now_s: u64) -> String {
    use std::fmt::Write as _;

    let mut out = format!(
        "Core links: highest term {}, {}\n",
        core.highest_term,
        core.leader.as_deref().map_or_else(
            || "no Core leads at it".to_owned(),
            |leader| if leader.is_empty() {
                "led by a Core from before terms".to_owned()
            } else {
                format!("led by {leader}")
            }
        )
    );
    if core.links.is_empty() {
        out.push_str("    none open\n");
    }
    let width = core
        .links
        .iter()
        .map(|l| l.core_id.len())
        .max()
        .unwrap_or(0)
        .max(6);
    for link in &core.links {
        let name = if link.core_id.is_empty() {
            "(unnamed)"
        } else {
            &link.core_id
        };
        let _ = writeln!(
            out,
            "    {name:<width$}  term {:<2} {:<9} since {} s",
            link.term,
            if link.leading { "LEADING" } else { "standby" },
            now_s.saturating_sub(link.since_unix_s),
        );
    }
    out
}

fn status_text(status: &HaStatus, now: SystemTime) -> String {
    use std::fmt::Write as _;

    let now_ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64;
    let ips = |ips: &[std::net::IpAddr]| {
        if ips.is_empty() {
            "none".to_owned()
        } else {
            ips.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let mut out = format!(
        "gateway {} of location {}: {}, priority {}{}{}\n",
        status.gateway_id,
        status.location_id,
        serde_json::to_value(status.role)
            .ok()
            .and_then(|v| v.as_str().map(str::to_uppercase))
            .unwrap_or_default(),
        status.priority,
        if status.maintenance {
            ", maintenance"
        } else {
            ""
        },
        if status.draining { ", draining" } else { "" },
    );
    if let Some(error) = &status.state_unsaved {
        let _ = writeln!(
            out,
            "state-unsaved: {error} (removals are applied; the file catches up once it can be written)"
        );
    }
    let _ = writeln!(
        out,
        "mode: {}",
        match status.mode {
            HaMode::ActiveStandby => "active/standby (the master serves every client)",
            HaMode::Director => "director (the master steers clients across the healthy gateways)",
        }
    );
    let _ = writeln!(
        out,
        "master: {}",
        status
            .master
            .map_or_else(|| "none heard".to_owned(), |id| format!("gateway {id}"))
    );
    let _ = writeln!(
        out,
        "VIPs: {} (on the public interface now: {})",
        ips(&status.vips),
        ips(&status.vips_held)
    );
    let _ = writeln!(
        out,
        "adverts every {} ms, version {}{}",
        status.advert_interval_ms,
        advert::VERSION,
        if status.advert_version < advert::VERSION {
            format!(
                " and {} (a gateway of the previous release is heard: nobody preempts \
                 until all run this one)",
                status.advert_version
            )
        } else {
            String::new()
        }
    );
    if let Some(core) = &status.core_links {
        out.push_str(&core_links_text(core, now_ms / 1000));
    }
    if !status.peers.is_empty() {
        out.push_str(
            "\nPEER  ROLE     PRIORITY  HEALTHY  MAINTENANCE  DRAINING  MAC                VERSION  LAST ADVERT\n",
        );
        for peer in &status.peers {
            let _ = writeln!(
                out,
                "{:<5} {:<8} {:>8}  {:<7}  {:<11}  {:<8}  {:<17}  {:<7}  {} ms ago",
                peer.gateway_id,
                peer.role.to_string(),
                peer.priority,
                if peer.healthy { "yes" } else { "no" },
                if peer.maintenance { "yes" } else { "no" },
                if peer.draining { "yes" } else { "no" },
                peer.mac,
                peer.advert_version,
                peer.last_seen_ms
            );
        }
    }
    if !status.dropped.is_empty() {
        let dropped: Vec<String> = status
            .dropped
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        let _ = writeln!(out, "\nadverts dropped: {}", dropped.join(", "));
    }
    if let Some(endpoints) = &status.endpoints {
        let by_gateway: Vec<String> = endpoints
            .by_gateway
            .iter()
            .map(|(id, n)| format!("{n} from gateway {id}"))
            .collect();
        let _ = writeln!(
            out,
            "\nendpoint table: {} peers{}",
            endpoints.entries,
            if by_gateway.is_empty() {
                String::new()
            } else {
                format!(" ({})", by_gateway.join(", "))
            }
        );
        let heard: Vec<String> = endpoints
            .gateways
            .iter()
            .map(|g| {
                format!(
                    "gateway {} {} {} ms ago",
                    g.gateway_id, g.mac, g.last_heard_ms
                )
            })
            .collect();
        if !heard.is_empty() {
            let _ = writeln!(out, "endpoint messages from: {}", heard.join("; "));
        }
        if !endpoints.dropped.is_empty() {
            let dropped: Vec<String> = endpoints
                .dropped
                .iter()
                .map(|(reason, n)| format!("{reason} {n}"))
                .collect();
            let _ = writeln!(out, "endpoint messages dropped: {}", dropped.join(", "));
        }
    }
    if !status.failovers.is_empty() {
        out.push_str(
            "\nFAILOVERS TO THIS GATEWAY     DETECTION  VIP MOVE  ACTIVE  KICKED  COMPLETED  95% BACK\n",
        );
        for f in &status.failovers {
            let ago = Duration::from_millis(now_ms.saturating_sub(sync_ms(f.meta.at)));
            let ms = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v} ms"));
            let _ = writeln!(
                out,
                "{:>10.1?} ago {:<16} {:>9}  {:>5} ms  {:>6}  {:>6}  {:>9}  {:>8}{}",
                ago,
                if f.meta.planned {
                    "(handover)"
                } else {
                    "(takeover)"
                },
                ms(f.meta.detection_ms),
                f.meta.vip_move_ms,
                f.recently_active,
                f.kicked,
                f.completed,
                ms(f.fresh_95_ms),
                if f.finished { "" } else { "  (following)" },
            );
            let _ = writeln!(out, "    {}", f.meta.cause);
        }
    }
    if !status.transitions.is_empty() {
        out.push_str("\nRECENT TRANSITIONS\n");
        for t in &status.transitions {
            let ago = Duration::from_millis(now_ms.saturating_sub(t.at_ms));
            let _ = writeln!(
                out,
                "{:>10.1?} ago  {} -> {}  {}",
                ago, t.from, t.to, t.reason
            );
        }
    }
    out
}

/// Unix milliseconds of `at`.
fn sync_ms(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// Prints what a change did to the WireGuard device.
fn applied(report: ApplyReport) {
    let ApplyReport {
        added,
        updated,
        removed,
        device,
        requests,
    } = report;
    println!(
        "applied: {added} added, {updated} changed, {removed} removed, {device} device settings ({requests} WireGuard requests)"
    );
}

/// What `tidectl reload --check` prints: one line per difference.
fn plan_text(plan: &ReloadPlan) -> String {
    let mut out = String::new();
    if plan.is_empty() {
        out += "no change: the running config is the file's\n";
    }
    let mut lines = |what: &str, items: Vec<String>| {
        for item in items {
            out += &format!("{what} {item}\n");
        }
    };
    lines(
        "service added",
        plan.services_added
            .iter()
            .map(ToString::to_string)
            .collect(),
    );
    lines(
        "service removed",
        plan.services_removed
            .iter()
            .map(ToString::to_string)
            .collect(),
    );
    lines("peer added", plan.peers_added.clone());
    lines("peer changed", plan.peers_changed.clone());
    lines("peer removed", plan.peers_removed.clone());
    lines(
        "setting",
        plan.settings.iter().map(ToString::to_string).collect(),
    );
    lines("warning", plan.warnings.clone());
    out
}

/// "12s ago", "never".
fn ago(at: Option<u64>, now: SystemTime) -> String {
    let Some(at) = at else {
        return "never".into();
    };
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let secs = now.saturating_sub(at);
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m{}s ago", secs / 60, secs % 60),
        _ => format!("{}h{}m ago", secs / 3600, secs % 3600 / 60),
    }
}

fn peers_table(reply: &PeersReply, now: SystemTime) -> String {
    use std::fmt::Write as _;

    let mut out = format!("WireGuard {} ({}", reply.interface, reply.backend);
    if let Some(pid) = reply.backend_pid {
        let _ = write!(out, ", pid {pid}");
    }
    let _ = write!(
        out,
        "), listen port {}, {} peers, polled {}",
        reply.listen_port,
        reply.peers.len(),
        ago(Some(reply.polled_at), now)
    );
    match reply.mfa_threshold_secs {
        Some(secs) => {
            let _ = writeln!(
                out,
                "\nMFA: peers inactive for more than {:?} are removed",
                Duration::from_secs(secs)
            );
        }
        None => out.push('\n'),
    }
    if let Some(error) = &reply.state_unsaved {
        let _ = writeln!(out, "state-unsaved: {error}");
    }
    let _ = writeln!(
        out,
        "\n{:<44}  {:<12} {:<8} {:<24} {:<20} {:>10} {:>10} {:>12} {:>12}",
        "PUBLIC KEY",
        "NAME",
        "SOURCE",
        "ENDPOINT",
        "ALLOWED IPS",
        "HANDSHAKE",
        "ACTIVE",
        "RX BYTES",
        "TX BYTES"
    );
    for peer in &reply.peers {
        let ips: Vec<String> = peer.allowed_ips.iter().map(ToString::to_string).collect();
        let source = serde_json::to_value(peer.source)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<44}  {:<12} {:<8} {:<24} {:<20} {:>10} {:>10} {:>12} {:>12}",
            peer.public_key.to_string(),
            peer.name.as_deref().unwrap_or("-"),
            source,
            peer.endpoint.as_deref().unwrap_or("-"),
            if ips.is_empty() {
                "-".into()
            } else {
                ips.join(",")
            },
            ago(peer.last_handshake, now),
            ago(peer.last_active, now),
            peer.rx_bytes,
            peer.tx_bytes,
        );
    }
    out
}

fn removals_table(removals: &[Removal]) -> String {
    use std::fmt::Write as _;

    let mut out = format!(
        "{:<44}  {:<12} {:<13} {:>12} {:>12}\n",
        "PUBLIC KEY", "NAME", "REASON", "REMOVED AT", "LAST ACTIVE"
    );
    for removal in removals {
        let _ = writeln!(
            out,
            "{:<44}  {:<12} {:<13} {:>12} {:>12}",
            removal.public_key.to_string(),
            removal.name.as_deref().unwrap_or("-"),
            removal.reason,
            removal.removed_at,
            removal
                .last_active
                .map_or_else(|| "-".into(), |t| t.to_string()),
        );
    }
    out
}

fn counters_table(reply: &DatapathCounters) -> String {
    use std::fmt::Write as _;

    let mut out = format!(
        "XDP shield on {} ({} mode)\n\n",
        reply.interface, reply.xdp_mode
    );
    let row = |out: &mut String, verdict: &str, name: &str, count: PacketCount| {
        let _ = writeln!(
            out,
            "{verdict:<8} {name:<16} {:>14} {:>16}",
            count.packets, count.bytes
        );
    };
    let _ = writeln!(
        out,
        "{:<8} {:<16} {:>14} {:>16}",
        "VERDICT", "COUNTER", "PACKETS", "BYTES"
    );
    for counter in Counter::ALL {
        let verdict = counter.verdict().name();
        row(
            &mut out,
            verdict,
            counter.name(),
            reply.snapshot.get(counter),
        );
    }
    out.push('\n');
    let totals = &reply.snapshot.totals;
    row(&mut out, "total", "pass", totals.pass);
    row(&mut out, "total", "drop", totals.drop);
    row(&mut out, "total", "aborted", totals.aborted);
    row(&mut out, "total", "tx", totals.tx);
    row(&mut out, "total", "wireguard", totals.wireguard);
    if let Some(egress) = &reply.egress {
        let _ = writeln!(
            out,
            "\negress guard on {} ({}): WireGuard from port {}, owning {}\n",
            egress.interface,
            egress.hook,
            egress.listen_port,
            match egress.ownership {
                tidegate_gateway::xdp::Ownership::None => "no client",
                tidegate_gateway::xdp::Ownership::All => "every client",
                tidegate_gateway::xdp::Ownership::Table => "the clients in its table",
                tidegate_gateway::xdp::Ownership::Grace => "its sessions (handover grace)",
            }
        );
        for (name, count) in &egress.counters {
            row(&mut out, "egress", name, *count);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;
    use tidegate_gateway::xdp::{AttachMode, CounterSnapshot};

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn peers_table_shows_each_peer() {
        use tidegate_gateway::wireguard::{BackendKind, Key, PeerSource, PeerStatus};

        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let reply = PeersReply {
            interface: "wg0".into(),
            backend: BackendKind::Userspace,
            backend_pid: Some(42),
            listen_port: 51820,
            polled_at: 999_998,
            mfa_threshold_secs: Some(300),
            state_unsaved: None,
            peers: vec![PeerStatus {
                public_key: Key::new([1; 32]),
                name: Some("alice".into()),
                source: PeerSource::Dynamic,
                endpoint: Some("198.51.100.2:40000".into()),
                allowed_ips: vec!["10.77.0.2/32".parse().unwrap()],
                last_handshake: Some(999_990),
                last_active: None,
                rx_bytes: 1234,
                tx_bytes: 5678,
                persistent_keepalive: None,
                preshared_key: true,
            }],
        };
        let table = peers_table(&reply, now);
        assert!(
            table.starts_with("WireGuard wg0 (wireguard-go, pid 42), listen port 51820, 1 peers, polled 2s ago\nMFA:"),
            "{table}"
        );
        let row = table.lines().last().unwrap();
        assert_eq!(
            row.split_whitespace().collect::<Vec<_>>(),
            [
                &Key::new([1; 32]).to_string()[..],
                "alice",
                "dynamic",
                "198.51.100.2:40000",
                "10.77.0.2/32",
                "10s",
                "ago",
                "never",
                "1234",
                "5678"
            ]
        );
    }

    #[test]
    fn status_shows_the_endpoint_table_and_each_failover() {
        use std::collections::BTreeMap;
        use tidegate_gateway::{
            ha::{
                agent::HaMode,
                machine::Role,
                sharing::table::Merged,
                sharing::{SharingPeer, SharingStatus},
            },
            wireguard::kick::{FailoverMeta, FailoverReport},
        };

        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let report = |planned, fresh_95_ms, finished| FailoverReport {
            meta: FailoverMeta {
                at: now - Duration::from_secs(30),
                cause: if planned {
                    "handover from gateway 2".into()
                } else {
                    "master 2 down".into()
                },
                planned,
                detection_ms: (!planned).then_some(362),
                vip_move_ms: 2,
            },
            recently_active: 20,
            kicked: 20,
            completed: 19,
            fresh: 19,
            skipped: 0,
            fresh_95_ms,
            last_kick_ms: Some(1),
            finished,
            interrupted: false,
        };
        let status = HaStatus {
            location_id: 7,
            gateway_id: 1,
            role: Role::Master,
            priority: 100,
            advert_interval_ms: 100,
            advert_version: 1,
            master: Some(1),
            maintenance: false,
            mode: HaMode::ActiveStandby,
            draining: false,
            vips: vec!["198.51.100.100".parse().unwrap()],
            vips_held: vec!["198.51.100.100".parse().unwrap()],
            peers: Vec::new(),
            transitions: Vec::new(),
            dropped: BTreeMap::new(),
            fence: None,
            failovers: vec![report(false, Some(22), true), report(true, None, false)],
            state_unsaved: Some("writing state file /s/wg.json: No space left on device".into()),
            core_links: Some(CoreLinksStatus {
                highest_term: 5,
                leader: Some("core-b".into()),
                links: vec![
                    tidegate_gateway::core_link::CoreLinkStatus {
                        core_id: "core-a".into(),
                        term: 4,
                        leading: false,
                        since_unix_s: 999_900,
                    },
                    tidegate_gateway::core_link::CoreLinkStatus {
                        core_id: "core-b".into(),
                        term: 5,
                        leading: true,
                        since_unix_s: 999_990,
                    },
                ],
            }),
            endpoints: Some(SharingStatus {
                entries: 20,
                by_gateway: BTreeMap::from([(1, 5), (2, 15)]),
                merged: Merged::default(),
                messages_sent: 3,
                datagrams_sent: 4,
                datagrams_received: 9,
                dropped: BTreeMap::from([("replay".to_owned(), 1)]),
                gateways: vec![SharingPeer {
                    gateway_id: 2,
                    mac: "02:00:00:00:00:02".into(),
                    address: "198.51.100.2".into(),
                    last_heard_ms: 120,
                }],
            }),
        };
        let text = status_text(&status, now);
        for expected in [
            "state-unsaved: writing state file /s/wg.json: No space left on device",
            "Core links: highest term 5, led by core-b",
            "    core-a  term 4  standby   since 100 s",
            "    core-b  term 5  LEADING   since 10 s",
            "endpoint table: 20 peers (5 from gateway 1, 15 from gateway 2)",
            "endpoint messages from: gateway 2 02:00:00:00:00:02 120 ms ago",
            "endpoint messages dropped: replay 1",
            "adverts every 100 ms, version 2 and 1 (a gateway of the previous release is heard",
            "FAILOVERS TO THIS GATEWAY",
            "    master 2 down",
            "    handover from gateway 2",
        ] {
            assert!(text.contains(expected), "{expected:?} not in\n{text}");
        }
        let rows: Vec<Vec<&str>> = text
            .lines()
            .filter(|l| l.contains("(takeover)") || l.contains("(handover)"))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[0][2..],
            [
                "(takeover)",
                "362",
                "ms",
                "2",
                "ms",
                "20",
                "20",
                "19",
                "22",
                "ms"
            ]
        );
        assert_eq!(
            rows[1][2..],
            [
                "(handover)",
                "-",
                "2",
                "ms",
                "20",
                "20",
                "19",
                "-",
                "(following)"
            ]
        );
    }

    #[test]
    fn director_and_sessions_tables_show_every_backend_and_pin() {
        use tidegate_gateway::xdp::BackendStatus;

        let status = DirectorStatus {
            on: true,
            table_size: 65537,
            max_sessions: 262_144,
            backends: vec![
                BackendStatus {
                    gateway_id: 1,
                    mac: "02:00:00:00:00:01".into(),
                    local: false,
                    present: true,
                    draining: true,
                    table_entries: 0,
                    packets: 10,
                    bytes: 1000,
                    new_pins: 2,
                },
                BackendStatus {
                    gateway_id: 3,
                    mac: "02:00:00:00:00:03".into(),
                    local: true,
                    present: true,
                    draining: false,
                    table_entries: 65537,
                    packets: 5,
                    bytes: 500,
                    new_pins: 1,
                },
            ],
            unpinned: PacketCount {
                packets: 4,
                bytes: 400,
            },
        };
        let table = director_table(&status);
        assert!(table.starts_with("director on"), "{table}");
        let row = |id: &str| {
            table
                .lines()
                .find(|l| l.starts_with(id))
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(
            row("1 "),
            [
                "1",
                "02:00:00:00:00:01",
                "draining",
                "0.00",
                "10",
                "1000",
                "2"
            ]
        );
        assert_eq!(
            row("3 "),
            [
                "3",
                "02:00:00:00:00:03",
                "local,",
                "active",
                "100.00",
                "5",
                "500",
                "1"
            ]
        );
        assert!(table.contains("4 packets, 400 bytes"), "{table}");
        let sessions = sessions_table(&[SessionEntry {
            client: "198.51.100.7:40000".parse().unwrap(),
            gateway_id: 2,
            last_seen_ms: Some(1500),
        }]);
        assert_eq!(
            sessions
                .lines()
                .last()
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["198.51.100.7:40000", "2", "1.5s", "ago"]
        );
    }

    #[test]
    fn ages_read_naturally() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(ago(None, now), "never");
        assert_eq!(ago(Some(9_990), now), "10s ago");
        assert_eq!(ago(Some(9_000), now), "16m40s ago");
        assert_eq!(ago(Some(2_000), now), "2h13m ago");
    }

    #[test]
    fn table_lists_every_counter_and_the_totals() {
        let snapshot = CounterSnapshot::from_values(Counter::ALL.iter().map(|&c| {
            let n = c as u64 + 1;
            (
                c,
                PacketCount {
                    packets: n,
                    bytes: n * 100,
                },
            )
        }));
        let table = counters_table(&DatapathCounters {
            interface: "eth0".into(),
            xdp_mode: AttachMode::Driver,
            snapshot,
            egress: None,
        });
        assert!(table.starts_with("XDP shield on eth0 (driver mode)"));
        for counter in Counter::ALL {
            assert!(table.contains(counter.name()), "{table}");
        }
        let bad_type = table.lines().find(|l| l.contains("bad-type")).unwrap();
        assert_eq!(
            bad_type.split_whitespace().collect::<Vec<_>>(),
            ["drop", "bad-type", "9", "900"]
        );
    }
}
