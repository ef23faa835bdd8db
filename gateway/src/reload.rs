//! Re-reading the config file, on SIGHUP or `tidectl reload`, and applying
//! what changed: the WireGuard settings and peers, the shield's services
//! and `[core] status_interval_ms`. [`plan`] (pure) compares the running
//! config with the file's and names every key that needs a restart; one
//! such key refuses the whole reload, and then nothing is applied. With
//! `[core]`, the TLS files are read again too: Core's next handshake uses
//! them (a new CA), the link that is up keeps going.
//! `tidectl reload --check` shows the plan without applying it.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, watch};

use tidegate_proto::tls::TlsAcceptor;

use crate::{
    config::{Config, ConfigError, Overrides},
    core_link::{CoreLinkError, server::load_pki},
    datapath::{DatapathError, DatapathHandle},
    ha::{agent::HaConfig, transport::Destination},
    wireguard::{ApplyReport, WireguardConfig, WireguardError, WireguardHandle},
};

/// Why a reload was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] Box<ConfigError>),
    #[error("{}: restart the daemon to apply {}", list(.0), if .0.len() == 1 { "it" } else { "them" })]
    NeedsRestart(Vec<Change>),
    #[error(transparent)]
    Wireguard(#[from] WireguardError),
    #[error("installing the services")]
    Datapath(#[source] DatapathError),
    #[error(transparent)]
    CoreTls(#[from] CoreLinkError),
}

fn list(changes: &[Change]) -> String {
    changes
        .iter()
        .map(Change::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// One key whose value differs between the running config and the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// The key as the file spells it: `[ha] priority`.
    pub key: String,
    pub from: String,
    pub to: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} changed from {} to {}", self.key, self.from, self.to)
    }
}

/// What a reload applies: every difference between the running config and
/// the file, none of which needs a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadPlan {
    pub services_added: Vec<SocketAddr>,
    pub services_removed: Vec<SocketAddr>,
    /// File peers, each as `name (key)` or the key.
    pub peers_added: Vec<String>,
    pub peers_changed: Vec<String>,
    pub peers_removed: Vec<String>,
    /// `[shield]`, `[wireguard]` and `[core]` keys applied live.
    pub settings: Vec<Change>,
    /// The rules of the new file that warn (the same as its `--check`).
    pub warnings: Vec<String>,
}

impl ReloadPlan {
    /// Whether the file changes nothing.
    pub fn is_empty(&self) -> bool {
        self.services_added.is_empty()
            && self.services_removed.is_empty()
            && self.peers_added.is_empty()
            && self.peers_changed.is_empty()
            && self.peers_removed.is_empty()
            && self.settings.is_empty()
    }
}

/// Keys compared one by one; every one that differs is named.
struct Diff {
    changes: Vec<Change>,
}

impl Diff {
    fn key<T: PartialEq + fmt::Debug>(&mut self, key: &str, from: &T, to: &T) {
        if from != to {
            self.changes.push(Change {
                key: key.to_owned(),
                from: format!("{from:?}"),
                to: format!("{to:?}"),
            });
        }
    }

    /// A key whose values are secret: named, never shown.
    fn secret<T: PartialEq>(&mut self, key: &str, from: &T, to: &T) {
        if from != to {
            self.changes.push(Change {
                key: key.to_owned(),
                from: "(secret)".into(),
                to: "(another secret)".into(),
            });
        }
    }

    /// A section present on one side only.
    fn section<T>(&mut self, key: &str, from: Option<&T>, to: Option<&T>) -> bool {
        let (from, to) = match (from, to) {
            (Some(_), Some(_)) => return true,
            (None, None) => return false,
            (Some(_), None) => ("present", "absent"),
            (None, Some(_)) => ("absent", "present"),
        };
        self.changes.push(Change {
            key: key.to_owned(),
            from: from.into(),
            to: to.into(),
        });
        false
    }
}

/// What reloading `current` to `new` would do, or every key that needs a
/// restart.
pub fn plan(current: &Config, new: &Config) -> Result<ReloadPlan, ReloadError> {
    let mut restart = Diff {
        changes: Vec::new(),
    };
    let mut live = Diff {
        changes: Vec::new(),
    };
    restart.key("interface", &current.interface, &new.interface);
    restart.key("xdp_mode", &current.xdp_mode, &new.xdp_mode);
    restart.key(
        "control_socket",
        &current.control_socket,
        &new.control_socket,
    );
    restart.key("state_dir", &current.state_dir, &new.state_dir);
    restart.key("bpf_pin_dir", &current.bpf_pin_dir, &new.bpf_pin_dir);
    if restart.section("[ha]", current.ha.as_ref(), new.ha.as_ref())
        && let (Some(from), Some(to)) = (&current.ha, &new.ha)
    {
        ha_keys(&mut restart, from, to);
    }
    live.key(
        "[shield] drop_fragments",
        &current.shield.drop_fragments,
        &new.shield.drop_fragments,
    );
    let mut plan = ReloadPlan::default();
    if restart.section(
        "[wireguard]",
        current.wireguard.as_ref(),
        new.wireguard.as_ref(),
    ) && let (Some(from), Some(to)) = (&current.wireguard, &new.wireguard)
    {
        wireguard_keys(&mut restart, &mut live, from, to);
        peers(&mut plan, from, to);
    }
    if restart.section("[core]", current.core.as_ref(), new.core.as_ref())
        && let (Some(from), Some(to)) = (&current.core, &new.core)
    {
        restart.key("[core] listen", &from.listen, &to.listen);
        restart.key("[core] ca_file", &from.ca_file, &to.ca_file);
        restart.key("[core] cert_file", &from.cert_file, &to.cert_file);
        restart.key("[core] key_file", &from.key_file, &to.key_file);
        restart.key("[core] identity", &from.identity, &to.identity);
        restart.key(
            "[core] core_identity",
            &from.core_identity,
            &to.core_identity,
        );
        restart.key("[core] gateway_id", &from.gateway_id, &to.gateway_id);
        live.key(
            "[core] status_interval_ms",
            &millis(from.status_interval),
            &millis(to.status_interval),
        );
    }
    // The hooks task runs what it was started with.
    let hooks = |c: &Config| -> Vec<String> {
        c.hooks
            .iter()
            .map(|h| {
                let on: Vec<&str> = h.on.iter().map(|e| e.name()).collect();
                format!(
                    "{} on {on:?}: {:?}, {} ms",
                    h.name,
                    h.command,
                    h.timeout.as_millis()
                )
            })
            .collect()
    };
    restart.key("[[hooks]]", &hooks(current), &hooks(new));
    if !restart.changes.is_empty() {
        return Err(ReloadError::NeedsRestart(restart.changes));
    }
    let old = current.services.services();
    let fresh = new.services.services();
    plan.services_added = fresh.iter().filter(|s| !old.contains(s)).copied().collect();
    plan.services_removed = old.iter().filter(|s| !fresh.contains(s)).copied().collect();
    plan.settings = live.changes;
    Ok(plan)
}

fn millis(duration: Duration) -> u128 {
    duration.as_millis()
}

fn ha_keys(diff: &mut Diff, from: &HaConfig, to: &HaConfig) {
    diff.key("[ha] location_id", &from.location_id, &to.location_id);
    let (a, b) = (&from.election, &to.election);
    diff.key("[ha] gateway_id", &a.gateway_id, &b.gateway_id);
    diff.key("[ha] priority", &a.priority, &b.priority);
    diff.key(
        "[ha] advert_interval_ms",
        &millis(a.interval),
        &millis(b.interval),
    );
    diff.key("[ha] preempt", &a.preempt, &b.preempt);
    diff.key(
        "[ha] preempt_delay_ms",
        &millis(a.preempt_delay),
        &millis(b.preempt_delay),
    );
    diff.secret("[ha] key", &from.key, &to.key);
    diff.key("[ha] vips", &from.vips, &to.vips);
    diff.key("[ha] port", &from.port, &to.port);
    let group = |d: &Destination| match d {
        Destination::Multicast(group) => Some(*group),
        Destination::Unicast(_) => None,
    };
    let unicast = |d: &Destination| match d {
        Destination::Multicast(_) => Vec::new(),
        Destination::Unicast(peers) => peers.clone(),
    };
    diff.key(
        "[ha] multicast_group",
        &group(&from.destination),
        &group(&to.destination),
    );
    diff.key(
        "[ha] peers",
        &unicast(&from.destination),
        &unicast(&to.destination),
    );
    diff.key("[ha] track", &from.track, &to.track);
    let (a, b) = (&from.continuity, &to.continuity);
    diff.key("[ha] kick_rate", &a.kick_rate, &b.kick_rate);
    diff.key(
        "[ha] kick_window_secs",
        &a.kick_window.as_secs(),
        &b.kick_window.as_secs(),
    );
    diff.key(
        "[ha] handover_window_ms",
        &millis(a.handover_window),
        &millis(b.handover_window),
    );
    diff.key(
        "[ha] endpoint_refresh_secs",
        &a.endpoint_refresh.as_secs(),
        &b.endpoint_refresh.as_secs(),
    );
    diff.key(
        "[ha] endpoint_max_age_secs",
        &a.endpoint_max_age.as_secs(),
        &b.endpoint_max_age.as_secs(),
    );
    let mode = |h: &HaConfig| {
        if h.director.is_some() {
            "director"
        } else {
            "active-standby"
        }
    };
    diff.key("[ha] mode", &mode(from), &mode(to));
    if let (Some(a), Some(b)) = (&from.director, &to.director) {
        diff.key("[ha] director_table_size", &a.table_size, &b.table_size);
        diff.key(
            "[ha] director_max_sessions",
            &a.max_sessions,
            &b.max_sessions,
        );
    }
}

fn wireguard_keys(
    restart: &mut Diff,
    live: &mut Diff,
    from: &WireguardConfig,
    to: &WireguardConfig,
) {
    restart.key("[wireguard] interface", &from.interface, &to.interface);
    restart.key("[wireguard] backend", &from.backend, &to.backend);
    live.secret(
        "[wireguard] private_key",
        &from.private_key,
        &to.private_key,
    );
    live.key(
        "[wireguard] listen_port",
        &from.listen_port,
        &to.listen_port,
    );
    let nets = |w: &WireguardConfig| {
        w.addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    };
    live.key("[wireguard] addresses", &nets(from), &nets(to));
    live.key("[wireguard] mtu", &from.mtu, &to.mtu);
    live.key(
        "[wireguard] stats_interval_ms",
        &millis(from.stats_interval),
        &millis(to.stats_interval),
    );
    live.key(
        "[wireguard] mfa",
        &from.mfa_threshold.is_some(),
        &to.mfa_threshold.is_some(),
    );
    if let (Some(a), Some(b)) = (from.mfa_threshold, to.mfa_threshold) {
        live.key(
            "[wireguard] peer_disconnect_threshold_secs",
            &a.as_secs(),
            &b.as_secs(),
        );
    }
}

fn peers(plan: &mut ReloadPlan, from: &WireguardConfig, to: &WireguardConfig) {
    let label = |p: &crate::wireguard::spec::PeerSpec| match &p.name {
        Some(name) => format!("{name} ({})", p.public_key),
        None => p.public_key.to_string(),
    };
    fn by_key(w: &WireguardConfig) -> BTreeMap<String, &crate::wireguard::spec::PeerSpec> {
        w.peers
            .iter()
            .map(|p| (p.public_key.to_string(), p))
            .collect()
    }
    let (old, new) = (by_key(from), by_key(to));
    for (key, peer) in &new {
        match old.get(key) {
            None => plan.peers_added.push(label(peer)),
            Some(was) if was != peer => plan.peers_changed.push(label(peer)),
            Some(_) => {}
        }
    }
    for (key, peer) in &old {
        if !new.contains_key(key) {
            plan.peers_removed.push(label(peer));
        }
    }
}

/// Reloads the config; clones share one lock, so reloads never overlap.
#[derive(Debug, Clone)]
pub struct Reloader {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    overrides: Overrides,
    current: Config,
    datapath: DatapathHandle,
    wireguard: Option<WireguardHandle>,
    status_interval: Option<watch::Sender<Duration>>,
    core_tls: Option<CoreTls>,
}

/// Where Core's link server takes its TLS acceptor from.
pub struct CoreTls(pub watch::Sender<TlsAcceptor>);

impl fmt::Debug for CoreTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoreTls").finish_non_exhaustive()
    }
}

/// The parts of the daemon a reload changes.
#[derive(Debug)]
pub struct Targets {
    pub datapath: DatapathHandle,
    pub wireguard: Option<WireguardHandle>,
    /// The status interval Core's link sessions follow (with `[core]`).
    pub status_interval: Option<watch::Sender<Duration>>,
    /// The TLS acceptor of Core's link (with `[core]`): a reload re-reads
    /// the files, so a new CA takes effect on Core's next handshake.
    pub core_tls: Option<CoreTls>,
}

impl Reloader {
    /// A reloader for the daemon started with `current`, read from `path`.
    pub fn new(path: PathBuf, overrides: Overrides, current: Config, targets: Targets) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                path,
                overrides,
                current,
                datapath: targets.datapath,
                wireguard: targets.wireguard,
                status_interval: targets.status_interval,
                core_tls: targets.core_tls,
            })),
        }
    }

    /// Re-reads the file and says what a reload would change, applying
    /// nothing.
    pub async fn check(&self) -> Result<ReloadPlan, ReloadError> {
        let inner = self.inner.lock().await;
        inner.read().map(|(_, plan, _)| plan)
    }

    /// Re-reads the file and applies it.
    pub async fn reload(&self) -> Result<ApplyReport, ReloadError> {
        let mut inner = self.inner.lock().await;
        let (new, plan, acceptor) = inner.read()?;
        // WireGuard first: it is the part that can fail (a port in use).
        let report = match (&inner.wireguard, &new.wireguard) {
            (Some(handle), Some(config)) => handle.reload(config.clone()).await?,
            _ => ApplyReport::default(),
        };
        if new.services != inner.current.services || new.shield != inner.current.shield {
            inner
                .datapath
                .install_services(new.services.clone(), new.shield)
                .await
                .map_err(ReloadError::Datapath)?;
        }
        if let (Some(tx), Some(core)) = (&inner.status_interval, &new.core) {
            tx.send_if_modified(|interval| {
                let changed = *interval != core.status_interval;
                *interval = core.status_interval;
                changed
            });
        }
        if let (Some(tx), Some(acceptor)) = (&inner.core_tls, acceptor) {
            tx.0.send_replace(acceptor);
        }
        for warning in &plan.warnings {
            tracing::warn!("{warning}");
        }
        inner.current = new;
        Ok(report)
    }
}

impl Inner {
    /// The file, what it would change, and Core's link's TLS files as
    /// they are now (with `[core]`), all loaded before anything applies.
    fn read(&self) -> Result<(Config, ReloadPlan, Option<TlsAcceptor>), ReloadError> {
        let (new, warnings) =
            Config::load_checked(&self.path, self.overrides.clone()).map_err(Box::new)?;
        let mut plan = plan(&self.current, &new)?;
        plan.warnings = warnings.iter().map(ToString::to_string).collect();
        let acceptor = match &new.core {
            Some(core) => Some(load_pki(core)?.server().map_err(CoreLinkError::from)?),
            None => None,
        };
        Ok((new, plan, acceptor))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::wireguard::key::Key;

    fn config(text: &str) -> Config {
        Config::parse(Path::new("gw.toml"), text, Overrides::default())
            .unwrap_or_else(|e| panic!("{}", crate::error_chain(&e)))
    }

    fn peer(n: u8) -> String {
        format!(
            "[[peer]]\nname = \"p{n}\"\npublic_key = \"{}\"\nallowed_ips = [\"10.77.0.{n}/32\"]\n",
            Key::new([n; 32])
        )
    }

    /// A file: `top` at the top level, then `[wireguard]` with `wg`,
    /// `[ha]` with `ha`, `[core]` with `core` and `peers` after.
    fn file(services: &[&str], wg: &str, ha: &str, core: &str, peers: &str) -> String {
        let mut text = String::from("interface = \"eth0\"\n");
        for s in services {
            text += &format!("[[service]]\naddress = \"198.51.100.100\"\nport = {s}\n");
        }
        text += &format!(
            "[wireguard]\ninterface = \"wg0\"\nprivate_key = \"{}\"\nlisten_port = 51820\n{wg}",
            Key::new([1; 32])
        );
        text += &format!(
            "[ha]\nlocation_id = 1\ngateway_id = 2\nkey = \"a-shared-key-of-16+\"\nvips = [\"198.51.100.100\"]\n{ha}"
        );
        text += &format!(
            "[core]\nlisten = \"198.51.100.2:7443\"\nca_file = \"/ca\"\ncert_file = \"/c\"\nkey_file = \"/k\"\nidentity = \"gw-a\"\n{core}"
        );
        text + peers
    }

    #[test]
    fn live_changes_are_planned() {
        let base = config(&file(&["51820"], "", "", "", &(peer(2) + &peer(3))));
        let changed = config(&file(
            &["51820", "443"],
            "mtu = 1400\n",
            "",
            "status_interval_ms = 1000\n",
            &(peer(3).replace("10.77.0.3/32", "10.77.0.33/32") + &peer(4)),
        ));
        let planned = plan(&base, &changed).unwrap();
        let plan_of_base = plan(&base, &base).unwrap();
        let plan = planned;
        assert_eq!(plan.services_added, ["198.51.100.100:443".parse().unwrap()]);
        assert!(plan.services_removed.is_empty());
        let names = |list: &[String]| -> Vec<String> {
            list.iter()
                .map(|s| s.split(' ').next().unwrap().to_owned())
                .collect()
        };
        assert_eq!(names(&plan.peers_added), ["p4"]);
        assert_eq!(names(&plan.peers_changed), ["p3"]);
        assert_eq!(names(&plan.peers_removed), ["p2"]);
        let keys: Vec<_> = plan.settings.iter().map(|c| c.key.as_str()).collect();
        assert_eq!(keys, ["[wireguard] mtu", "[core] status_interval_ms"]);
        assert_eq!(plan.settings[1].from, "5000");
        assert_eq!(plan.settings[1].to, "1000");
        assert!(plan_of_base.is_empty());
    }

    #[test]
    fn every_key_that_needs_a_restart_is_named() {
        let base = config(&file(&["51820"], "", "", "", ""));
        let cases = [
            (
                file(&["51820"], "", "priority = 7\n", "", ""),
                vec!["[ha] priority"],
            ),
            (
                file(&["51820"], "", "", "", "")
                    .replace("a-shared-key-of-16+", "another-key-of-16+"),
                vec!["[ha] key"],
            ),
            (
                file(&["51820"], "", "", "", "").replace(
                    "key = \"a-shared-key-of-16+\"\n",
                    "key = \"another-shared-key\"\nadvert_interval_ms = 200\n",
                ),
                vec!["[ha] advert_interval_ms", "[ha] key"],
            ),
            (
                file(&["51820"], "", "peers = [\"198.51.100.3\"]\n", "", ""),
                vec!["[ha] multicast_group", "[ha] peers"],
            ),
            (
                file(&["51820"], "", "mode = \"director\"\n", "", ""),
                vec!["[ha] mode"],
            ),
            (
                file(&["51820"], "", "", "", "").replace("198.51.100.2:7443", "198.51.100.2:7444"),
                vec!["[core] listen"],
            ),
            (
                file(&["51820"], "", "", "", "").replace("\"/ca\"", "\"/ca2\""),
                vec!["[core] ca_file"],
            ),
            (
                file(&["51820"], "", "", "core_identity = \"core-2\"\n", ""),
                vec!["[core] core_identity"],
            ),
            (
                file(&["51820"], "backend = \"userspace\"\n", "", "", ""),
                vec!["[wireguard] backend"],
            ),
            (
                file(&["51820"], "", "", "", "")
                    .replace("interface = \"eth0\"", "interface = \"eth1\""),
                vec!["interface"],
            ),
        ];
        for (text, expected) in cases {
            let error = plan(&base, &config(&text)).unwrap_err();
            let ReloadError::NeedsRestart(changes) = &error else {
                panic!("{error}");
            };
            let keys: Vec<_> = changes.iter().map(|c| c.key.as_str()).collect();
            assert_eq!(keys, expected, "{error}");
            assert!(error.to_string().contains("restart the daemon"), "{error}");
            assert!(!error.to_string().contains("a-shared-key"), "{error}");
        }
        // A section that comes or goes is named too.
        let without_core = file(&["51820"], "", "", "", "");
        let without_core = &without_core[..without_core.find("[core]").unwrap()];
        let error = plan(&base, &config(without_core)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "[core] changed from present to absent: restart the daemon to apply it"
        );
    }
}
