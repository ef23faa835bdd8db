//! `tidegate-client`: enrol a device, bring its tunnel up and keep its MFA
//! session, take it down, show its state. Exit codes say what went wrong
//! (see `Exit`).

use std::{
    io::{BufRead as _, IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use tidegate_client::{
    api::{self, ApiError, DeviceConfig, Edge},
    profile::{self, Profile},
    running::{DEFAULT_RUN_DIR, Running, SessionRecord},
    session::{Input, Session},
    tunnel::{self, TunnelSpec},
};
use tidegate_proto::error_chain;
use tidegate_wireguard::{BackendSetting, Key};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

/// How often the keeper checks the interface and refreshes its record.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How long `down` waits for the keeper to take the tunnel down.
const DOWN_WAIT: Duration = Duration::from_secs(15);
/// Tries of a code typed at the terminal before `up` gives up.
const PROMPT_TRIES: u32 = 3;

#[derive(Parser)]
#[command(
    version,
    about = "Tidegate's VPN client: enrol, log in with MFA, stay connected"
)]
struct Cli {
    /// Where enrolled devices (profiles) are kept.
    #[arg(long, env = "TIDEGATE_CLIENT_DIR", default_value = profile::DEFAULT_DIR, global = true)]
    dir: PathBuf,
    /// Where the records of tunnels that are up are kept.
    #[arg(long, env = "TIDEGATE_CLIENT_RUN_DIR", default_value = DEFAULT_RUN_DIR, global = true)]
    run_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make this device's key, register it with a one-time token, and keep
    /// the config the Edge answers.
    Enrol {
        /// The Edge's address, as the operator gave it (https://...).
        url: String,
        /// The one-time token the operator gave (it may begin with '-').
        #[arg(allow_hyphen_values = true)]
        token: String,
        /// The profile's and the interface's name (default: the location's).
        #[arg(long)]
        name: Option<String>,
        /// A CA certificate (PEM) the Edge's certificate chains to, when it
        /// is not one the system trusts.
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Bring the tunnel up, log in on an MFA location, and keep it up
    /// (renewing the session) until Ctrl-C, SIGTERM or `down`.
    Up {
        /// The profile (default: the only one).
        name: Option<String>,
        /// WireGuard's implementation.
        #[arg(long, value_enum, default_value_t = BackendSetting::Auto)]
        backend: BackendSetting,
        /// The TOTP code, for the first login only.
        #[arg(long, conflicts_with = "code_command")]
        code: Option<String>,
        /// A shell command printing a TOTP code, run for each login.
        #[arg(long)]
        code_command: Option<String>,
    },
    /// Take the tunnel down.
    Down {
        /// The profile (default: the only one).
        name: Option<String>,
    },
    /// Show the device, the tunnel and the session.
    Status {
        /// The profile (default: every one).
        name: Option<String>,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget an enrolled device (its private key goes with it).
    Remove { name: String },
}

/// Exit codes a script can act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Anything else: a local failure (permissions, WireGuard, a profile).
    Failure = 1,
    /// A wrong or used code, an unknown or used token, a disabled device.
    Unauthorized = 3,
    /// Too many wrong codes: held back or locked out for a while.
    Limited = 4,
    /// The token or the login expired.
    Expired = 5,
    /// No Edge answered, or no Core behind it: try again later.
    Unavailable = 6,
    /// No such device or location.
    NotFound = 7,
    /// The device has another key already.
    Conflict = 8,
    /// The Edge found the request malformed.
    Invalid = 9,
}

impl Exit {
    fn of(error: &anyhow::Error) -> Self {
        for cause in error.chain() {
            match cause.downcast_ref::<ApiError>() {
                Some(ApiError::Refused(refusal)) => {
                    return match refusal.code.as_str() {
                        "unauthorized" => Self::Unauthorized,
                        "limited" => Self::Limited,
                        "expired" => Self::Expired,
                        "unavailable" | "timeout" => Self::Unavailable,
                        "not-found" => Self::NotFound,
                        "conflict" => Self::Conflict,
                        "invalid" => Self::Invalid,
                        _ => Self::Failure,
                    };
                }
                Some(ApiError::Unreachable { .. }) => return Self::Unavailable,
                _ => {}
            }
        }
        Self::Failure
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("tidegate-client: starting: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("tidegate-client: {}", error_chain(error.as_ref()));
            ExitCode::from(Exit::of(&error) as u8)
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Enrol {
            url,
            token,
            name,
            ca_file,
        } => enrol(&cli.dir, &url, &token, name, ca_file.as_deref()).await,
        Command::Up {
            name,
            backend,
            code,
            code_command,
        } => {
            let codes = match (code, code_command) {
                (Some(code), _) => Codes::Once(Some(code)),
                (None, Some(command)) => Codes::Command(command),
                (None, None) => Codes::Prompt,
            };
            up(&cli.dir, &cli.run_dir, name.as_deref(), backend, codes).await
        }
        Command::Down { name } => down(&cli.dir, &cli.run_dir, name.as_deref()).await,
        Command::Status { name, json } => {
            status(&cli.dir, &cli.run_dir, name.as_deref(), json).await
        }
        Command::Remove { name } => {
            if Running::load(&cli.run_dir, &name)?.is_some() {
                bail!("{name} is up; take it down first (tidegate-client down {name})");
            }
            Profile::remove(&cli.dir, &name)?;
            println!("removed {name}");
            Ok(())
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn enrol(
    dir: &Path,
    url: &str,
    token: &str,
    name: Option<String>,
    ca_file: Option<&Path>,
) -> Result<()> {
    if let Some(name) = &name {
        profile::check_name(name)?;
        if Profile::load(dir, name).is_ok() {
            bail!(profile::ProfileError::Exists(name.clone()));
        }
    }
    let ca_pem = ca_file.map(api::read_ca).transpose()?;
    let edge = Edge::new(url, ca_pem.as_deref())?;
    let private_key = Key::generate_private()?;
    let mut retried = 0;
    let config = edge
        .enrol(
            token.trim(),
            &private_key.public().to_string(),
            |retrying| {
                retried += 1;
                eprintln!("tidegate-client: enrolling: {retrying}");
            },
        )
        .await
        .with_context(|| match retried {
            0 => "enrolling".to_owned(),
            n => format!("enrolling ({} tries)", n + 1),
        })?;
    let name = match name {
        Some(name) => name,
        None => free_name(dir, &config.location)?,
    };
    let profile = Profile {
        name: name.clone(),
        edge_url: url.trim().to_owned(),
        ca_pem,
        private_key,
        config,
    };
    profile.create(dir)?;
    println!(
        "enrolled device {} of location {} as {name}; bring it up with: tidegate-client up {name}",
        profile.config.device, profile.config.location
    );
    if profile.config.mfa {
        println!("the location asks for an MFA code at each login");
    }
    Ok(())
}

/// The location's name, or the first free `name-N`, for a new profile.
fn free_name(dir: &Path, location: &str) -> Result<String> {
    let base = profile::default_name(location).unwrap_or_else(|| "tidegate".into());
    let taken = Profile::names(dir)?;
    (1..100)
        .map(|n| match n {
            1 => base.clone(),
            n => {
                let suffix = format!("-{n}");
                format!("{}{suffix}", &base[..base.len().min(15 - suffix.len())])
            }
        })
        .find(|name| !taken.contains(name))
        .ok_or_else(|| anyhow!("no free profile name for location {location:?}; give --name"))
}

/// Where TOTP codes come from.
enum Codes {
    /// `--code`: the first login only.
    Once(Option<String>),
    /// `--code-command`: run for each login.
    Command(String),
    /// Asked at the terminal.
    Prompt,
}

impl Codes {
    async fn next(&mut self, config: &DeviceConfig) -> Result<String> {
        match self {
            Self::Once(code) => code.take().ok_or_else(|| {
                anyhow!(
                    "the code given with --code was used; give --code-command to renew the session"
                )
            }),
            Self::Command(command) => {
                let output = tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(&*command)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .await
                    .with_context(|| format!("running the code command {command:?}"))?;
                if !output.status.success() {
                    bail!(
                        "the code command {command:?} failed ({}): {}",
                        output.status,
                        String::from_utf8_lossy(&output.stderr).trim()
                    );
                }
                Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
            }
            Self::Prompt => {
                if !std::io::stdin().is_terminal() {
                    bail!(
                        "location {} needs an MFA code: give --code or --code-command, or run on a terminal",
                        config.location
                    );
                }
                let prompt = format!("MFA code for {} at {}: ", config.device, config.location);
                tokio::task::spawn_blocking(move || -> Result<String> {
                    eprint!("{prompt}");
                    std::io::stderr().flush().ok();
                    let mut line = String::new();
                    std::io::stdin().lock().read_line(&mut line)?;
                    Ok(line.trim().to_owned())
                })
                .await?
            }
        }
    }

    fn interactive(&self) -> bool {
        matches!(self, Self::Prompt)
    }
}

/// One MFA login: the config with the session's preshared key.
async fn login(edge: &Edge, profile: &Profile, codes: &mut Codes) -> Result<DeviceConfig> {
    let public = profile.private_key.public().to_string();
    let mut tries = 0;
    loop {
        tries += 1;
        let challenge = edge
            .mfa_start(&profile.config.location, &public)
            .await
            .context("starting the MFA login")?;
        let code = codes.next(&profile.config).await?;
        match edge.mfa_finish(&challenge.session, &code).await {
            Err(ApiError::Refused(refusal))
                if refusal.code == "unauthorized"
                    && codes.interactive()
                    && tries < PROMPT_TRIES =>
            {
                eprintln!("{}; try again", refusal.message);
            }
            other => return other.context("finishing the MFA login"),
        }
    }
}

fn preshared(config: &DeviceConfig) -> Result<Option<Key>> {
    config
        .preshared_key
        .as_deref()
        .map(|k| k.parse::<Key>().context("the config's preshared_key"))
        .transpose()
}

async fn up(
    dir: &Path,
    run_dir: &Path,
    name: Option<&str>,
    backend: BackendSetting,
    mut codes: Codes,
) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("up needs root: it creates an interface, routes and policy rules");
    }
    let mut profile = Profile::find(dir, name)?;
    let name = profile.name.clone();
    if let Some(running) = Running::load(run_dir, &name)?
        && running.keeper_alive()
    {
        bail!(
            "{name} is up already (kept by process {}); take it down with: tidegate-client down {name}",
            running.pid
        );
    }
    let edge = Edge::new(&profile.edge_url, profile.ca_pem.as_deref())?;
    let mut session = Session::default();
    // Log in before touching the host: a refused login leaves nothing.
    let config = if profile.config.mfa {
        let config = login(&edge, &profile, &mut codes).await?;
        session.step(
            Input::LoggedIn {
                expires_in_s: config.session_expires_in_s,
            },
            now_ms(),
        );
        config
    } else {
        profile.config.clone()
    };
    let endpoint = tunnel::resolve(&config.endpoint).await?;
    let spec = TunnelSpec::new(
        &name,
        profile.private_key,
        &config,
        preshared(&config)?,
        endpoint,
    )?;
    let log = run_dir.join(format!("{name}.wireguard-go.log"));
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let applied = tunnel::up(&spec, backend, log).await?;
    let mut record = Running {
        pid: std::process::id(),
        applied,
        endpoint: endpoint.to_string(),
        since_unix_ms: now_ms(),
        session: None,
    };
    let keep = async {
        if profile.config.mfa && config != profile.config {
            // Keep the location's latest settings, never the session's key.
            profile.config = DeviceConfig {
                preshared_key: None,
                session_expires_in_s: None,
                ..config.clone()
            };
            profile.save(dir)?;
        }
        record.session = profile.config.mfa.then(|| session_record(&session));
        record.save(run_dir, &name)?;
        println!(
            "{name} is up: {} through {} ({}){}",
            config.addresses.join(", "),
            endpoint,
            record.applied.backend,
            match session.expires_ms() {
                Some(_) if matches!(codes, Codes::Once(_)) => format!(
                    "; the MFA session ends in {} s and cannot be renewed without --code-command or a terminal",
                    config.session_expires_in_s.unwrap_or(0)
                ),
                Some(_) => format!(
                    "; the MFA session is renewed before it ends in {} s",
                    config.session_expires_in_s.unwrap_or(0)
                ),
                None => String::new(),
            }
        );
        keep_up(
            &edge,
            &profile,
            &spec,
            &mut codes,
            &mut session,
            &mut record,
            run_dir,
        )
        .await
    };
    let result = keep.await;
    tunnel::down(&record.applied).await;
    Running::remove(run_dir, &name)?;
    println!("{name} is down");
    result
}

fn session_record(session: &Session) -> SessionRecord {
    let now = now_ms();
    SessionRecord {
        state: session.state(now),
        logged_in_unix_ms: session.logged_in_ms(),
        expires_unix_ms: session.expires_ms(),
        next_login_unix_ms: session.next_ms(),
        last_error: session.last_error().map(str::to_owned),
    }
}

/// Keeps the tunnel until a signal: renews the session when due, and
/// notices the interface taken away.
async fn keep_up(
    edge: &Edge,
    profile: &Profile,
    spec: &TunnelSpec,
    codes: &mut Codes,
    session: &mut Session,
    record: &mut Running,
    run_dir: &Path,
) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        let now = now_ms();
        let wake = session.next_ms().map_or(CHECK_EVERY, |next| {
            Duration::from_millis(next.saturating_sub(now)).min(CHECK_EVERY)
        });
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => return Ok(()),
            () = tokio::time::sleep(wake) => {}
        }
        if session.due(now_ms()) {
            match login(edge, profile, codes).await {
                Ok(config) => {
                    let key = preshared(&config)?
                        .ok_or_else(|| anyhow!("the login's answer has no preshared key"))?;
                    tunnel::set_preshared_key(
                        &spec.interface,
                        record.applied.backend,
                        &spec.peer,
                        key,
                    )
                    .await?;
                    session.step(
                        Input::LoggedIn {
                            expires_in_s: config.session_expires_in_s,
                        },
                        now_ms(),
                    );
                    info!(expires_in_s = ?config.session_expires_in_s, "renewed the MFA session");
                    println!(
                        "renewed the MFA session{}",
                        config
                            .session_expires_in_s
                            .map(|s| format!("; it ends in {s} s"))
                            .unwrap_or_default()
                    );
                }
                Err(error) => {
                    let retry_after_s = error.chain().find_map(|c| match c.downcast_ref() {
                        Some(ApiError::Refused(r)) => r.retry_after_s,
                        _ => None,
                    });
                    let text = error_chain(error.as_ref());
                    warn!(error = %text, "renewing the MFA session failed");
                    eprintln!("tidegate-client: renewing the MFA session: {text}");
                    session.step(
                        Input::Failed {
                            error: text,
                            retry_after_s,
                        },
                        now_ms(),
                    );
                }
            }
        }
        if !interface_exists(&spec.interface)? {
            bail!("interface {} was taken away", spec.interface);
        }
        if profile.config.mfa {
            record.session = Some(session_record(session));
        }
        record.save(run_dir, &profile.name)?;
    }
}

fn interface_exists(name: &str) -> Result<bool> {
    Ok(Path::new("/sys/class/net").join(name).exists())
}

async fn down(dir: &Path, run_dir: &Path, name: Option<&str>) -> Result<()> {
    let name = match name {
        Some(name) => name.to_owned(),
        None => Profile::find(dir, None)?.name,
    };
    let Some(running) = Running::load(run_dir, &name)? else {
        bail!("{name} is not up");
    };
    if running.keeper_alive() {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(running.pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .with_context(|| format!("signalling process {}", running.pid))?;
        let deadline = tokio::time::Instant::now() + DOWN_WAIT;
        while running.keeper_alive() && Running::load(run_dir, &name)?.is_some() {
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "process {} did not take {name} down within {DOWN_WAIT:?}",
                    running.pid
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The keeper died without cleaning up (or just did): undo the record.
    if Running::load(run_dir, &name)?.is_some() {
        tunnel::down(&running.applied).await;
        Running::remove(run_dir, &name)?;
    }
    println!("{name} is down");
    Ok(())
}

async fn status(dir: &Path, run_dir: &Path, name: Option<&str>, json: bool) -> Result<()> {
    let names = match name {
        Some(name) => vec![Profile::load(dir, name)?.name],
        None => Profile::names(dir)?,
    };
    let now = now_ms();
    let mut all = Vec::new();
    for name in names {
        let profile = Profile::load(dir, &name)?;
        let running = Running::load(run_dir, &name)?.filter(Running::keeper_alive);
        let peer = match &running {
            Some(r) => tunnel::peer_stats(&r.applied.interface, r.applied.backend)
                .await
                .ok()
                .flatten(),
            None => None,
        };
        let handshake_age_s = peer
            .and_then(|(h, _, _)| h)
            .and_then(|h| SystemTime::now().duration_since(h).ok())
            .map(|d| d.as_secs());
        let session = running.as_ref().and_then(|r| r.session.clone());
        let value = serde_json::json!({
            "name": name,
            "device": profile.config.device,
            "location": profile.config.location,
            "edge": profile.edge_url,
            "mfa": profile.config.mfa,
            "up": running.is_some(),
            "pid": running.as_ref().map(|r| r.pid),
            "backend": running.as_ref().map(|r| r.applied.backend.to_string()),
            "endpoint": running.as_ref().map(|r| r.endpoint.clone()),
            "last_handshake_age_s": handshake_age_s,
            "rx_bytes": peer.map(|(_, rx, _)| rx),
            "tx_bytes": peer.map(|(_, _, tx)| tx),
            "session": session.as_ref().map(|s| serde_json::json!({
                "state": s.state,
                "expires_in_s": s.expires_unix_ms.map(|e| e.saturating_sub(now) / 1000),
                "next_login_in_s": s.next_login_unix_ms.map(|e| e.saturating_sub(now) / 1000),
                "logged_in_unix_ms": s.logged_in_unix_ms,
                "last_error": s.last_error,
            })),
        });
        if !json {
            print_status(&value);
        }
        all.push(value);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else if all.is_empty() {
        println!("no device enrolled in {}", dir.display());
    }
    Ok(())
}

fn print_status(v: &serde_json::Value) {
    let text = |key: &str| v[key].as_str().unwrap_or("-").to_owned();
    println!(
        "{}: device {} at {} ({}), {}",
        text("name"),
        text("device"),
        text("location"),
        text("edge"),
        if v["up"].as_bool() == Some(true) {
            "up"
        } else {
            "down"
        }
    );
    if v["up"].as_bool() != Some(true) {
        return;
    }
    println!(
        "  tunnel: {} through {}, kept by process {}",
        text("backend"),
        text("endpoint"),
        v["pid"]
    );
    match v["last_handshake_age_s"].as_u64() {
        Some(age) => println!(
            "  last handshake {age} s ago; received {} B, sent {} B",
            v["rx_bytes"], v["tx_bytes"]
        ),
        None => println!("  no handshake yet"),
    }
    if let Some(session) = v["session"].as_object() {
        let state = session["state"].as_str().unwrap_or("-");
        match session["expires_in_s"].as_u64() {
            Some(left) => println!(
                "  MFA session: {state}, {left} s left, next login in {} s",
                session["next_login_in_s"]
            ),
            None => println!("  MFA session: {state}, lasts while the tunnel is in use"),
        }
        if let Some(error) = session["last_error"].as_str() {
            println!("  last login failed: {error}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_may_begin_with_a_hyphen() {
        let cli = Cli::try_parse_from([
            "tidegate-client",
            "enrol",
            "https://vpn.example.com",
            "-YnJA4hWK_f6ueCrxICBoIEijmxAXum4erR20NfHGsk",
            "--name",
            "lab",
        ])
        .unwrap();
        let Command::Enrol { token, name, .. } = cli.command else {
            panic!("not enrol");
        };
        assert_eq!(token, "-YnJA4hWK_f6ueCrxICBoIEijmxAXum4erR20NfHGsk");
        assert_eq!(name.as_deref(), Some("lab"));
    }

    #[test]
    fn every_refusal_has_its_exit_code() {
        let refused = |code: &str| {
            anyhow::Error::new(ApiError::Refused(api::Refusal {
                status: 400,
                code: code.into(),
                message: "m".into(),
                retry_after_s: None,
            }))
            .context("finishing the MFA login")
        };
        for (code, exit) in [
            ("unauthorized", Exit::Unauthorized),
            ("limited", Exit::Limited),
            ("expired", Exit::Expired),
            ("unavailable", Exit::Unavailable),
            ("timeout", Exit::Unavailable),
            ("not-found", Exit::NotFound),
            ("conflict", Exit::Conflict),
            ("invalid", Exit::Invalid),
            ("internal", Exit::Failure),
        ] {
            assert_eq!(Exit::of(&refused(code)), exit, "{code}");
        }
        assert_eq!(Exit::of(&anyhow!("no root")), Exit::Failure);
    }
}
