//! `tidectl` against Core: locations, gateways, users, devices, Edges, the
//! event log, location status and a location's planned failover, through
//! Core's local admin socket (root only).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use tidegate_proto::{
    admin::v1::{self as admin, admin_client::AdminClient},
    limits::MAX_ADMIN_MESSAGE_BYTES,
};
use tonic::transport::{Channel, Endpoint};

use super::{OnOff, wg_quick};

/// Core's admin socket when none is given.
pub const DEFAULT_CORE_SOCKET: &str = "/run/tidegate/core.sock";

#[derive(Debug, Subcommand)]
pub enum LocationCommand {
    /// Every location.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One location's settings.
    Show {
        /// Its name.
        name: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Each gateway of the location: connected, role, priority, health,
    /// last seen, peers with a recent handshake.
    Status {
        /// Its name.
        name: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create a location.
    Create(LocationCreate),
    /// Change a location (only the options given).
    Change(LocationChange),
    /// Delete a location without gateways or devices.
    Delete {
        /// Its name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct LocationCreate {
    /// Its name.
    name: String,
    /// Tunnel addresses of the gateway side, address/prefix (repeat, or
    /// separate with commas): one IPv4, one IPv6.
    #[arg(long = "address", value_delimiter = ',', required = true)]
    addresses: Vec<String>,
    /// WireGuard listen port [default: 51820].
    #[arg(long)]
    port: Option<u32>,
    /// The floating addresses clients connect to.
    #[arg(long = "vip", value_delimiter = ',')]
    vips: Vec<String>,
    /// "host" or "host:port" clients dial instead of the first VIP.
    #[arg(long, default_value = "")]
    endpoint: String,
    /// What clients route into the tunnel [default: the address networks].
    #[arg(long = "allowed-ip", value_delimiter = ',')]
    allowed_ips: Vec<String>,
    /// DNS servers for clients.
    #[arg(long, value_delimiter = ',')]
    dns: Vec<String>,
    /// Interface MTU [default: the gateway's].
    #[arg(long, default_value_t = 0)]
    mtu: u32,
    /// MFA: peers only after a TOTP login, removed when inactive.
    #[arg(long)]
    mfa: bool,
    /// MFA: seconds of inactivity before a peer is removed [default: 300].
    #[arg(long)]
    threshold: Option<u32>,
    /// Keepalive seconds in device configs, 0 for none [default: 25].
    #[arg(long)]
    keepalive: Option<u32>,
    /// MFA: a session ends this many seconds after its login (60 to
    /// 2592000); 0: only when the device is idle.
    #[arg(long, default_value_t = 0)]
    mfa_session_s: u32,
    /// File with the location's WireGuard private key (base64) [default:
    /// Core makes one].
    #[arg(long)]
    private_key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct LocationChange {
    /// Its name.
    name: String,
    /// A new name.
    #[arg(long)]
    rename: Option<String>,
    /// Replaces the addresses.
    #[arg(long = "address", value_delimiter = ',')]
    addresses: Option<Vec<String>>,
    /// WireGuard listen port.
    #[arg(long)]
    port: Option<u32>,
    /// Replaces the VIPs ('' for none).
    #[arg(long = "vip", value_delimiter = ',')]
    vips: Option<Vec<String>>,
    /// '' for the first VIP.
    #[arg(long)]
    endpoint: Option<String>,
    /// Replaces the allowed IPs ('' for the address networks).
    #[arg(long = "allowed-ip", value_delimiter = ',')]
    allowed_ips: Option<Vec<String>>,
    /// Replaces the DNS servers ('' for none).
    #[arg(long, value_delimiter = ',')]
    dns: Option<Vec<String>>,
    /// 0 for the gateway's default.
    #[arg(long)]
    mtu: Option<u32>,
    /// MFA on or off (off ends every session and makes every device a peer).
    #[arg(long, value_enum)]
    mfa: Option<OnOff>,
    /// MFA: seconds of inactivity before a peer is removed.
    #[arg(long)]
    threshold: Option<u32>,
    /// Keepalive seconds in device configs, 0 for none.
    #[arg(long)]
    keepalive: Option<u32>,
    /// MFA: a session ends this many seconds after its login (60 to
    /// 2592000); 0: only when the device is idle.
    #[arg(long)]
    mfa_session_s: Option<u32>,
    /// Use the private key in this file (every device then needs its config
    /// again).
    #[arg(long, conflicts_with = "rotate_key")]
    private_key_file: Option<PathBuf>,
    /// Make a new private key (every device then needs its config again).
    #[arg(long)]
    rotate_key: bool,
}

#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Gateways, of one location or all.
    List {
        /// Only this location's.
        #[arg(long)]
        location: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One object, in full.
    Show {
        /// Its name.
        name: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add a gateway; Core dials it at once.
    Create {
        /// Its name.
        name: String,
        /// The location it belongs to.
        #[arg(long)]
        location: String,
        /// host:port of the gateway's link server.
        #[arg(long)]
        address: String,
        /// The DNS name in its certificate [default: the name].
        #[arg(long, default_value = "")]
        identity: String,
        /// Keep it out of the location until enabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Change only the options given.
    Change {
        /// Its name.
        name: String,
        /// A new name.
        #[arg(long)]
        rename: Option<String>,
        /// Move it to this location.
        #[arg(long)]
        location: Option<String>,
        /// host:port of its link server.
        #[arg(long)]
        address: Option<String>,
        /// The DNS name its certificate must carry.
        #[arg(long)]
        identity: Option<String>,
        /// Enable or disable it (a disabled gateway is not dialled).
        #[arg(long, value_enum)]
        enabled: Option<OnOff>,
    },
    /// Delete it.
    Delete {
        /// Its name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One object, in full.
    Show {
        /// Its name.
        name: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Create a user; prints the TOTP secret for their authenticator app.
    Create {
        /// Its name.
        name: String,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Change only the options given.
    Change {
        /// Its name.
        name: String,
        /// A new name.
        #[arg(long)]
        rename: Option<String>,
        /// A disabled user's devices stop being peers and cannot log in.
        #[arg(long, value_enum)]
        enabled: Option<OnOff>,
        /// Issue a new TOTP secret (printed); the old one stops working.
        #[arg(long)]
        reset_totp: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete a user without devices.
    Delete {
        /// Its name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// Devices, filtered by user or location.
    List {
        /// Only this user's.
        #[arg(long)]
        user: Option<String>,
        /// Only this location's.
        #[arg(long)]
        location: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One object, in full.
    Show {
        /// Its name.
        name: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add many devices at once, all or none: a file of one JSON object
    /// per line, `{"name", "user", "location"}` and optionally
    /// `"public_key"` (absent: the device awaits enrolment), `"addresses"`
    /// (a list) and `"enabled"`.
    Import {
        /// The file ('-' for standard input).
        file: PathBuf,
    },
    /// Add a device: with its public key (the private key stays on the
    /// device), or without one, awaiting enrolment (`tidectl device token`,
    /// then `tidegate-client enrol` on the device brings its key).
    Create {
        /// Its name.
        name: String,
        /// The owner.
        #[arg(long)]
        user: String,
        /// The location it belongs to.
        #[arg(long)]
        location: String,
        /// Its WireGuard public key (base64) [default: none, the device
        /// awaits enrolment].
        #[arg(long)]
        public_key: Option<String>,
        /// Tunnel addresses [default: the next free of each network].
        #[arg(long = "address", value_delimiter = ',')]
        addresses: Vec<String>,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Change only the options given.
    Change {
        /// Its name.
        name: String,
        /// A new name.
        #[arg(long)]
        rename: Option<String>,
        /// A new owner.
        #[arg(long)]
        user: Option<String>,
        /// A new WireGuard public key (base64); ends its MFA session.
        #[arg(long)]
        public_key: Option<String>,
        /// Replaces the addresses ('' for the next free ones).
        #[arg(long = "address", value_delimiter = ',')]
        addresses: Option<Vec<String>>,
        /// A disabled device is no peer and cannot log in.
        #[arg(long, value_enum)]
        enabled: Option<OnOff>,
        /// Forget its wrong MFA codes, lifting a backoff or lockout.
        #[arg(long)]
        mfa_unlock: bool,
    },
    /// Delete it.
    Delete {
        /// Its name.
        name: String,
    },
    /// The device's config for a stock WireGuard app (locations without
    /// MFA), as a wg-quick file or a QR code, with its private key: made
    /// now (--new-key, which replaces the device's key) or read from a file.
    #[command(group(clap::ArgGroup::new("key").required(true).args(["new_key", "private_key_file"])))]
    Config {
        /// Its name.
        name: String,
        /// Print a wg-quick `.conf` (the default).
        #[arg(long, conflicts_with = "qr")]
        wg_quick: bool,
        /// Print the config as a QR code for a phone's WireGuard app.
        #[arg(long)]
        qr: bool,
        /// Make a new key pair, set its public key as the device's (the old
        /// key, if any, stops working) and print the private key in the
        /// config, once.
        #[arg(long)]
        new_key: bool,
        /// The device's existing private key (base64, as `wg genkey` writes
        /// it).
        #[arg(long)]
        private_key_file: Option<PathBuf>,
    },
    /// A one-time token to download the device's config through an Edge,
    /// or to enrol a device awaiting its key.
    Token {
        /// Its name.
        name: String,
        /// Seconds it stays valid [default: 86400].
        #[arg(long)]
        ttl: Option<u32>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EdgeCommand {
    /// Every Edge and its link.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One object, in full.
    Show {
        /// Its name.
        name: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Add an Edge; Core dials it at once.
    Create {
        /// Its name.
        name: String,
        /// host:port of the Edge's link server.
        #[arg(long)]
        address: String,
        #[arg(long, default_value = "")]
        identity: String,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Change only the options given.
    Change {
        /// Its name.
        name: String,
        /// A new name.
        #[arg(long)]
        rename: Option<String>,
        /// host:port of its link server.
        #[arg(long)]
        address: Option<String>,
        /// The DNS name its certificate must carry.
        #[arg(long)]
        identity: Option<String>,
        /// Enable or disable it (a disabled Edge is not dialled).
        #[arg(long, value_enum)]
        enabled: Option<OnOff>,
    },
    /// Delete it.
    Delete {
        /// Its name.
        name: String,
    },
}

/// A command for Core.
#[derive(Debug)]
pub enum CoreCommand {
    Location(LocationCommand),
    Gateway(GatewayCommand),
    User(UserCommand),
    Device(DeviceCommand),
    Edge(EdgeCommand),
    Events {
        location: Option<String>,
        limit: u32,
        /// Print JSON instead of a table.
        json: bool,
    },
    Failover {
        /// The location whose master hands over.
        location: String,
    },
    Certificates {
        /// Print JSON instead of text.
        json: bool,
    },
    Status {
        /// Print JSON instead of text.
        json: bool,
    },
}

/// `tidectl core-status` as text: this Core, its lease, and every Core
/// sharing the database.
fn core_status_text(reply: &admin::CoreStatusResponse) -> String {
    let mut out = format!(
        "core {}: {} at term {}{}\ndatabase: {} ({})\n",
        reply.core_id,
        if reply.leading { "leading" } else { "standby" },
        reply.term,
        match (reply.leading, reply.leader.as_str()) {
            (true, _) => String::new(),
            (false, "") => ", no leader known".into(),
            (false, leader) => format!(", {leader} leads"),
        },
        reply.database,
        reply.backend,
    );
    if !reply.problem.is_empty() {
        out.push_str(&format!("problem: {}\n", reply.problem));
    }
    out.push_str(&format!(
        "{:<20} {:<8} {:>6} {:>10} {:>8}\n",
        "CORE", "ROLE", "TERM", "GATEWAYS", "EDGES"
    ));
    for core in &reply.cores {
        out.push_str(&format!(
            "{:<20} {:<8} {:>6} {:>10} {:>8}\n",
            core.core_id,
            if core.leading { "leader" } else { "standby" },
            core.term,
            format!("{}/{}", core.gateways_connected, core.gateways),
            format!("{}/{}", core.edges_connected, core.edges),
        ));
    }
    out
}

fn core_certificates_text(reply: &admin::CoreCertificatesResponse) -> String {
    let line = |cert: &Option<admin::Certificate>| {
        cert.as_ref().map_or_else(
            || "unknown".to_owned(),
            |cert| {
                let when = if cert.days_left >= 0 {
                    format!("expires in {} days", cert.days_left)
                } else {
                    format!("expired {} days ago", -cert.days_left)
                };
                format!(
                    "{when} ({}), serial {}, {}",
                    cert.expiry, cert.serial, cert.path
                )
            },
        )
    };
    format!(
        "Core's certificate: {}\nCA: {}\n",
        line(&reply.certificate),
        line(&reply.ca)
    )
}

/// Connects to Core's admin socket.
async fn connect(socket: &Path) -> Result<AdminClient<Channel>> {
    let channel = Endpoint::from_shared(format!("unix:{}", socket.display()))
        .context("the admin socket path")?
        .timeout(CALL_TIMEOUT)
        .connect()
        .await
        .with_context(|| {
            format!(
                "cannot reach Core at {} (is tidegate-core running, and are you root?)",
                socket.display()
            )
        })?;
    Ok(AdminClient::new(channel)
        .max_decoding_message_size(MAX_ADMIN_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_ADMIN_MESSAGE_BYTES))
}

/// Core's answer, or its error message.
fn answer<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Result<T> {
    result
        .map(tonic::Response::into_inner)
        .map_err(|status| anyhow::anyhow!("{}", status.message()))
}

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn read_key(path: &Path) -> Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading the private key from {}", path.display()))?
        .trim()
        .to_owned())
}

/// A list option: absent leaves the field, `''` empties it.
fn list(values: Option<Vec<String>>) -> Option<admin::StringList> {
    values.map(|values| admin::StringList {
        values: values.into_iter().filter(|v| !v.is_empty()).collect(),
    })
}

fn on(value: Option<OnOff>) -> Option<bool> {
    value.map(|v| matches!(v, OnOff::On))
}

/// Runs a command against Core.
pub fn run(socket: &Path, command: CoreCommand) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(async {
            let mut core = connect(socket).await?;
            dispatch(&mut core, command).await
        })
}

async fn dispatch(core: &mut AdminClient<Channel>, command: CoreCommand) -> Result<()> {
    let now = SystemTime::now();
    match command {
        CoreCommand::Location(command) => location(core, command, now).await,
        CoreCommand::Gateway(command) => gateway(core, command).await,
        CoreCommand::User(command) => user(core, command).await,
        CoreCommand::Device(command) => device(core, command, now).await,
        CoreCommand::Edge(command) => edge(core, command, now).await,
        CoreCommand::Events {
            location,
            limit,
            json,
        } => {
            let events = answer(
                core.list_events(admin::ListEventsRequest {
                    location: location.unwrap_or_default(),
                    limit,
                })
                .await,
            )?;
            if json {
                print_json(&events)
            } else {
                print!("{}", events_table(&events.events));
                Ok(())
            }
        }
        CoreCommand::Failover { location } => {
            let reply = answer(core.failover(admin::FailoverRequest { location }).await)?;
            println!("{} is handing over to its best backup", reply.gateway);
            Ok(())
        }
        CoreCommand::Certificates { json } => {
            let reply = answer(
                core.core_certificates(admin::CoreCertificatesRequest {})
                    .await,
            )?;
            if json {
                print_json(&reply)
            } else {
                print!("{}", core_certificates_text(&reply));
                Ok(())
            }
        }
        CoreCommand::Status { json } => {
            let reply = answer(core.core_status(admin::CoreStatusRequest {}).await)?;
            if json {
                print_json(&reply)
            } else {
                print!("{}", core_status_text(&reply));
                Ok(())
            }
        }
    }
}

async fn location(
    core: &mut AdminClient<Channel>,
    command: LocationCommand,
    now: SystemTime,
) -> Result<()> {
    match command {
        LocationCommand::List { json } => {
            let reply = answer(core.list_locations(admin::ListLocationsRequest {}).await)?;
            if json {
                return print_json(&reply);
            }
            print!("{}", locations_table(&reply.locations));
        }
        LocationCommand::Show { name, json } => {
            let location = answer(core.get_location(admin::GetLocationRequest { name }).await)?;
            if json {
                return print_json(&location);
            }
            print!("{}", location_text(&location));
        }
        LocationCommand::Status { name, json } => {
            let status = answer(
                core.location_status(admin::LocationStatusRequest { name })
                    .await,
            )?;
            if json {
                return print_json(&status);
            }
            print!("{}", status_text(&status, now));
        }
        LocationCommand::Create(args) => {
            let private_key = match &args.private_key_file {
                Some(path) => read_key(path)?,
                None => String::new(),
            };
            let location = answer(
                core.create_location(admin::CreateLocationRequest {
                    name: args.name,
                    addresses: args.addresses,
                    listen_port: args.port,
                    vips: args.vips,
                    endpoint: args.endpoint,
                    allowed_ips: args.allowed_ips,
                    dns: args.dns,
                    mtu: args.mtu,
                    mfa: args.mfa,
                    peer_disconnect_threshold_s: args.threshold,
                    persistent_keepalive_s: args.keepalive,
                    private_key,
                    mfa_session_s: args.mfa_session_s,
                })
                .await,
            )?;
            print!("{}", location_text(&location));
        }
        LocationCommand::Change(args) => {
            let private_key = args.private_key_file.as_deref().map(read_key).transpose()?;
            let location = answer(
                core.update_location(admin::UpdateLocationRequest {
                    name: args.name,
                    rename: args.rename,
                    addresses: list(args.addresses),
                    listen_port: args.port,
                    vips: list(args.vips),
                    endpoint: args.endpoint,
                    allowed_ips: list(args.allowed_ips),
                    dns: list(args.dns),
                    mtu: args.mtu,
                    mfa: on(args.mfa),
                    peer_disconnect_threshold_s: args.threshold,
                    persistent_keepalive_s: args.keepalive,
                    private_key,
                    rotate_key: args.rotate_key,
                    mfa_session_s: args.mfa_session_s,
                })
                .await,
            )?;
            print!("{}", location_text(&location));
        }
        LocationCommand::Delete { name } => {
            let deleted = answer(
                core.delete_location(admin::DeleteLocationRequest { name })
                    .await,
            )?;
            println!("deleted location {}", deleted.name);
        }
    }
    Ok(())
}

async fn gateway(core: &mut AdminClient<Channel>, command: GatewayCommand) -> Result<()> {
    let gateway = match command {
        GatewayCommand::List { location, json } => {
            let reply = answer(
                core.list_gateways(admin::ListGatewaysRequest {
                    location: location.unwrap_or_default(),
                })
                .await,
            )?;
            if json {
                return print_json(&reply);
            }
            print!("{}", gateways_table(&reply.gateways));
            return Ok(());
        }
        GatewayCommand::Show { name, json } => {
            let gateway = answer(core.get_gateway(admin::GetGatewayRequest { name }).await)?;
            if json {
                return print_json(&gateway);
            }
            gateway
        }
        GatewayCommand::Create {
            name,
            location,
            address,
            identity,
            disabled,
        } => answer(
            core.create_gateway(admin::CreateGatewayRequest {
                name,
                location,
                address,
                identity,
                enabled: Some(!disabled),
            })
            .await,
        )?,
        GatewayCommand::Change {
            name,
            rename,
            location,
            address,
            identity,
            enabled,
        } => answer(
            core.update_gateway(admin::UpdateGatewayRequest {
                name,
                rename,
                location,
                address,
                identity,
                enabled: on(enabled),
            })
            .await,
        )?,
        GatewayCommand::Delete { name } => {
            let deleted = answer(
                core.delete_gateway(admin::DeleteGatewayRequest { name })
                    .await,
            )?;
            println!("deleted gateway {}", deleted.name);
            return Ok(());
        }
    };
    print!("{}", gateways_table(std::slice::from_ref(&gateway)));
    Ok(())
}

async fn user(core: &mut AdminClient<Channel>, command: UserCommand) -> Result<()> {
    let (reply, json) = match command {
        UserCommand::List { json } => {
            let reply = answer(core.list_users(admin::ListUsersRequest {}).await)?;
            if json {
                return print_json(&reply);
            }
            print!("{}", users_table(&reply.users));
            return Ok(());
        }
        UserCommand::Show { name, json } => {
            let user = answer(core.get_user(admin::GetUserRequest { name }).await)?;
            if json {
                return print_json(&user);
            }
            print!("{}", users_table(std::slice::from_ref(&user)));
            return Ok(());
        }
        UserCommand::Create {
            name,
            disabled,
            json,
        } => (
            answer(
                core.create_user(admin::CreateUserRequest {
                    name,
                    enabled: Some(!disabled),
                })
                .await,
            )?,
            json,
        ),
        UserCommand::Change {
            name,
            rename,
            enabled,
            reset_totp,
            json,
        } => (
            answer(
                core.update_user(admin::UpdateUserRequest {
                    name,
                    rename,
                    enabled: on(enabled),
                    reset_totp,
                })
                .await,
            )?,
            json,
        ),
        UserCommand::Delete { name } => {
            let deleted = answer(core.delete_user(admin::DeleteUserRequest { name }).await)?;
            println!("deleted user {}", deleted.name);
            return Ok(());
        }
    };
    if json {
        return print_json(&reply);
    }
    if let Some(user) = &reply.user {
        print!("{}", users_table(std::slice::from_ref(user)));
    }
    if !reply.totp_secret.is_empty() {
        println!("\nTOTP secret (shown this once): {}", reply.totp_secret);
        println!("for an authenticator app: {}", reply.totp_uri);
    }
    Ok(())
}

async fn device(
    core: &mut AdminClient<Channel>,
    command: DeviceCommand,
    now: SystemTime,
) -> Result<()> {
    let device = match command {
        DeviceCommand::List {
            user,
            location,
            json,
        } => {
            let reply = answer(
                core.list_devices(admin::ListDevicesRequest {
                    user: user.unwrap_or_default(),
                    location: location.unwrap_or_default(),
                })
                .await,
            )?;
            if json {
                return print_json(&reply);
            }
            print!("{}", devices_table(&reply.devices, now));
            return Ok(());
        }
        DeviceCommand::Show { name, json } => {
            let device = answer(core.get_device(admin::GetDeviceRequest { name }).await)?;
            if json {
                return print_json(&device);
            }
            device
        }
        DeviceCommand::Import { file } => {
            let devices = read_import(&file)?;
            let count = devices.len();
            let created = answer(
                core.create_devices(admin::CreateDevicesRequest { devices })
                    .await,
            )?;
            println!("added {} of {count} devices", created.created);
            return Ok(());
        }
        DeviceCommand::Create {
            name,
            user,
            location,
            public_key,
            addresses,
            disabled,
        } => answer(
            core.create_device(admin::CreateDeviceRequest {
                name,
                user,
                location,
                public_key: public_key.unwrap_or_default(),
                addresses,
                enabled: Some(!disabled),
            })
            .await,
        )?,
        DeviceCommand::Change {
            name,
            rename,
            user,
            public_key,
            addresses,
            enabled,
            mfa_unlock,
        } => answer(
            core.update_device(admin::UpdateDeviceRequest {
                name,
                rename,
                user,
                public_key,
                addresses: list(addresses),
                enabled: on(enabled),
                mfa_unlock,
            })
            .await,
        )?,
        DeviceCommand::Delete { name } => {
            let deleted = answer(
                core.delete_device(admin::DeleteDeviceRequest { name })
                    .await,
            )?;
            println!("deleted device {}", deleted.name);
            return Ok(());
        }
        DeviceCommand::Config {
            name,
            wg_quick: _,
            qr,
            new_key,
            private_key_file,
        } => {
            let key = match private_key_file {
                Some(path) => KeySource::File(path),
                None if new_key => KeySource::New,
                None => anyhow::bail!("give --new-key or --private-key-file"),
            };
            let conf = device_config(core, &name, key).await?;
            if qr {
                print!("{}", wg_quick::qr(&conf)?);
            } else {
                print!("{conf}");
            }
            return Ok(());
        }
        DeviceCommand::Token { name, ttl, json } => {
            let token = answer(
                core.create_download_token(admin::CreateDownloadTokenRequest {
                    device: name,
                    ttl_s: ttl,
                })
                .await,
            )?;
            if json {
                return print_json(&token);
            }
            println!(
                "{}\n(one use, for device {}, valid until {})",
                token.token,
                token.device,
                ago(token.expires_unix_ms, now)
            );
            return Ok(());
        }
    };
    print!("{}", devices_table(std::slice::from_ref(&device), now));
    Ok(())
}

/// Where `tidectl device config` gets the device's private key.
enum KeySource {
    /// A new pair, whose public key becomes the device's.
    New,
    /// The device's existing private key, in this file.
    File(PathBuf),
}

/// The device's wg-quick config with its private key.
async fn device_config(
    core: &mut AdminClient<Channel>,
    name: &str,
    key: KeySource,
) -> Result<String> {
    let device = answer(
        core.get_device(admin::GetDeviceRequest {
            name: name.to_owned(),
        })
        .await,
    )?;
    let location = answer(
        core.get_location(admin::GetLocationRequest {
            name: device.location.clone(),
        })
        .await,
    )?;
    if location.mfa {
        anyhow::bail!(
            "location {:?} uses MFA: a stock WireGuard app cannot log in; \
             use tidegate-client (tidectl device token {name}, then tidegate-client enrol)",
            location.name
        );
    }
    let pair = match key {
        KeySource::New => {
            let pair = wg_quick::KeyPair::generate()?;
            answer(
                core.update_device(admin::UpdateDeviceRequest {
                    name: name.to_owned(),
                    public_key: Some(pair.public.clone()),
                    ..Default::default()
                })
                .await,
            )?;
            eprintln!(
                "device {name} now has a new key; its private key is in this config only \
                 (the old key, if any, no longer works)"
            );
            pair
        }
        KeySource::File(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            let pair = wg_quick::KeyPair::parse_private(&text)
                .with_context(|| format!("the private key in {}", path.display()))?;
            pair.check_is(name, &device.public_key, &path)?;
            pair
        }
    };
    let config = answer(
        core.get_device_config(admin::GetDeviceConfigRequest {
            name: name.to_owned(),
        })
        .await,
    )?;
    Ok(wg_quick::render(&config, &pair.private))
}

async fn edge(
    core: &mut AdminClient<Channel>,
    command: EdgeCommand,
    now: SystemTime,
) -> Result<()> {
    let edge = match command {
        EdgeCommand::List { json } => {
            let reply = answer(core.list_edges(admin::ListEdgesRequest {}).await)?;
            if json {
                return print_json(&reply);
            }
            print!("{}", edges_table(&reply.edges, now));
            return Ok(());
        }
        EdgeCommand::Show { name, json } => {
            let edge = answer(core.get_edge(admin::GetEdgeRequest { name }).await)?;
            if json {
                return print_json(&edge);
            }
            edge
        }
        EdgeCommand::Create {
            name,
            address,
            identity,
            disabled,
        } => answer(
            core.create_edge(admin::CreateEdgeRequest {
                name,
                address,
                identity,
                enabled: Some(!disabled),
            })
            .await,
        )?,
        EdgeCommand::Change {
            name,
            rename,
            address,
            identity,
            enabled,
        } => answer(
            core.update_edge(admin::UpdateEdgeRequest {
                name,
                rename,
                address,
                identity,
                enabled: on(enabled),
            })
            .await,
        )?,
        EdgeCommand::Delete { name } => {
            let deleted = answer(core.delete_edge(admin::DeleteEdgeRequest { name }).await)?;
            println!("deleted Edge {}", deleted.name);
            return Ok(());
        }
    };
    print!("{}", edges_table(std::slice::from_ref(&edge), now));
    Ok(())
}

/// "12s ago", "in 3m", "never" for a Unix time in ms (0: never).
fn ago(at_ms: i64, now: SystemTime) -> String {
    if at_ms <= 0 {
        return "never".into();
    }
    let now_ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let span = |ms: i64| {
        let secs = ms / 1000;
        match secs {
            0..60 => format!("{secs}s"),
            60..3600 => format!("{}m{}s", secs / 60, secs % 60),
            3600..86400 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
            _ => format!("{}d{}h", secs / 86400, secs % 86400 / 3600),
        }
    };
    if at_ms > now_ms {
        format!("in {}", span(at_ms - now_ms))
    } else {
        format!("{} ago", span(now_ms - at_ms))
    }
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

fn joined(list: &[String]) -> String {
    if list.is_empty() {
        "-".into()
    } else {
        list.join(",")
    }
}

fn yes(value: bool) -> &'static str {
    if value { "yes" } else { "no" }
}

fn locations_table(locations: &[admin::Location]) -> String {
    let mut out = format!(
        "{:<16} {:>4} {:<32} {:>6} {:<4} {:>8} {:>7} {:>8}\n",
        "NAME", "ID", "ADDRESSES", "PORT", "MFA", "GATEWAYS", "DEVICES", "VERSION"
    );
    for l in locations {
        let _ = writeln!(
            out,
            "{:<16} {:>4} {:<32} {:>6} {:<4} {:>8} {:>7} {:>8}",
            l.name,
            l.id,
            joined(&l.addresses),
            l.listen_port,
            yes(l.mfa),
            l.gateways,
            l.devices,
            l.version
        );
    }
    out
}

fn location_text(l: &admin::Location) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: String| {
        let _ = writeln!(out, "{key:<28} {value}");
    };
    line("name", format!("{} (id {})", l.name, l.id));
    line("addresses", joined(&l.addresses));
    line("listen port", l.listen_port.to_string());
    line("VIPs", joined(&l.vips));
    line("endpoint", or_dash(&l.endpoint).to_owned());
    line("allowed IPs", joined(&l.allowed_ips));
    line("DNS", joined(&l.dns));
    line(
        "MTU",
        if l.mtu == 0 {
            "gateway default".into()
        } else {
            l.mtu.to_string()
        },
    );
    line(
        "MFA",
        if l.mfa {
            format!(
                "on, peers removed after {}s inactive",
                l.peer_disconnect_threshold_s
            )
        } else {
            "off".into()
        },
    );
    if l.mfa {
        line(
            "MFA session",
            if l.mfa_session_s == 0 {
                "until the device is idle".into()
            } else {
                format!("ends {}s after its login", l.mfa_session_s)
            },
        );
    }
    line(
        "keepalive (devices)",
        format!("{}s", l.persistent_keepalive_s),
    );
    line("public key", l.public_key.clone());
    line("config version", l.version.to_string());
    line(
        "gateways / devices",
        format!("{} / {}", l.gateways, l.devices),
    );
    out
}

fn status_text(status: &admin::LocationStatusResponse, now: SystemTime) -> String {
    let mut out = String::new();
    if let Some(l) = &status.location {
        let _ = write!(
            out,
            "location {} (id {}): config version {}, {} devices",
            l.name, l.id, l.version, l.devices
        );
        if l.mfa {
            let _ = write!(out, ", {} MFA sessions", status.mfa_sessions);
        }
        out.push_str("\n\n");
    }
    let _ = writeln!(
        out,
        "{:<14} {:<10} {:<8} {:>8} {:<8} {:>10} {:>6} {:>7} {:>8}  NOTES",
        "GATEWAY", "LINK", "ROLE", "PRIORITY", "HEALTHY", "LAST SEEN", "PEERS", "RECENT", "APPLIED"
    );
    for g in &status.gateways {
        let link = if !g.enabled {
            "disabled"
        } else if g.connected {
            "up"
        } else {
            "down"
        };
        let (role, priority, healthy) = if !g.connected {
            ("-".to_owned(), "-".to_owned(), "-")
        } else if g.ha {
            let priority = if g.effective_priority == g.priority {
                g.priority.to_string()
            } else {
                format!("{}/{}", g.effective_priority, g.priority)
            };
            (g.role.to_uppercase(), priority, yes(g.healthy))
        } else {
            ("no HA".to_owned(), "-".to_owned(), "-")
        };
        let mut notes = Vec::new();
        if !g.connected && !g.link_error.is_empty() {
            if g.since_unix_ms > 0 {
                notes.push(format!(
                    "down {}: {}",
                    ago(g.since_unix_ms, now),
                    g.link_error
                ));
            } else {
                notes.push(g.link_error.clone());
            }
        }
        if g.maintenance {
            notes.push("maintenance".into());
        }
        if !g.faults.is_empty() {
            notes.push(format!("faults: {}", g.faults.join("; ")));
        }
        if let Some(note) = cert_note(g.cert_not_after_unix_s, now) {
            notes.push(note);
        }
        if !g.apply_error.is_empty() {
            notes.push(format!("refused {}", g.apply_error));
        }
        let _ = writeln!(
            out,
            "{:<14} {:<10} {:<8} {:>8} {:<8} {:>10} {:>6} {:>7} {:>8}  {}",
            g.name,
            link,
            role,
            priority,
            healthy,
            ago(g.last_seen_unix_ms, now),
            g.peers,
            g.peers_recent_handshake,
            g.applied_version,
            notes.join(", ")
        );
    }
    out
}

fn gateways_table(gateways: &[admin::Gateway]) -> String {
    let mut out = format!(
        "{:<16} {:<16} {:<28} {:<24} {:<7}\n",
        "NAME", "LOCATION", "ADDRESS", "IDENTITY", "ENABLED"
    );
    for g in gateways {
        let _ = writeln!(
            out,
            "{:<16} {:<16} {:<28} {:<24} {:<7}",
            g.name,
            g.location,
            g.address,
            g.identity,
            yes(g.enabled)
        );
    }
    out
}

fn users_table(users: &[admin::User]) -> String {
    let mut out = format!("{:<32} {:<7} {:>7}\n", "NAME", "ENABLED", "DEVICES");
    for u in users {
        let _ = writeln!(out, "{:<32} {:<7} {:>7}", u.name, yes(u.enabled), u.devices);
    }
    out
}

/// One line of a device import file.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportedDevice {
    name: String,
    user: String,
    location: String,
    /// Absent or empty: the device awaits enrolment.
    #[serde(default)]
    public_key: String,
    #[serde(default)]
    addresses: Vec<String>,
    enabled: Option<bool>,
}

/// The devices of an import file, or the first bad line.
fn read_import(path: &Path) -> Result<Vec<admin::CreateDeviceRequest>> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    parse_import(&text).with_context(|| format!("in {}", path.display()))
}

fn parse_import(text: &str) -> Result<Vec<admin::CreateDeviceRequest>> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| {
            let device: ImportedDevice =
                serde_json::from_str(line).with_context(|| format!("line {}", n + 1))?;
            Ok(admin::CreateDeviceRequest {
                name: device.name,
                user: device.user,
                location: device.location,
                public_key: device.public_key,
                addresses: device.addresses,
                enabled: device.enabled,
            })
        })
        .collect()
}

fn devices_table(devices: &[admin::Device], now: SystemTime) -> String {
    let mut out = format!(
        "{:<20} {:<16} {:<12} {:<44}  {:<36} {:<7} {}\n",
        "NAME", "USER", "LOCATION", "PUBLIC KEY", "ADDRESSES", "ENABLED", "MFA SESSION"
    );
    for d in devices {
        let mut session = if d.mfa_session {
            format!("since {}", ago(d.mfa_session_since_unix_ms, now))
        } else {
            "-".into()
        };
        if d.mfa_blocked_until_unix_ms > 0 {
            let block = if d.mfa_locked_out {
                "locked out"
            } else {
                "backing off"
            };
            let _ = write!(
                session,
                " ({block} after {} wrong codes, until {})",
                d.mfa_failures,
                ago(d.mfa_blocked_until_unix_ms, now)
            );
        }
        let _ = writeln!(
            out,
            "{:<20} {:<16} {:<12} {:<44}  {:<36} {:<7} {}",
            d.name,
            d.user,
            d.location,
            if d.enrolled {
                d.public_key.as_str()
            } else {
                "(awaiting enrolment)"
            },
            joined(&d.addresses),
            yes(d.enabled),
            session
        );
    }
    out
}

/// A note on a link certificate that expires within 30 days or has
/// expired (none while it has longer, or when its expiry is not known).
fn cert_note(not_after_unix_s: i64, now: SystemTime) -> Option<String> {
    use tidegate_proto::expiry::{EXPIRY_WARNING, Expiry, classify};
    if not_after_unix_s == 0 {
        return None;
    }
    let now_s = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    match classify(not_after_unix_s, now_s, EXPIRY_WARNING) {
        Expiry::Valid { .. } => None,
        Expiry::ExpiresSoon { days_left } => {
            Some(format!("certificate expires in {days_left} days: renew it"))
        }
        Expiry::Expired { days_ago } => Some(format!("certificate expired {days_ago} days ago")),
    }
}

fn edges_table(edges: &[admin::Edge], now: SystemTime) -> String {
    let mut out = format!(
        "{:<16} {:<28} {:<24} {:<8} {:>12} {:>9}  {}\n",
        "NAME", "ADDRESS", "IDENTITY", "LINK", "SINCE", "REQUESTS", "NOTES"
    );
    for e in edges {
        let link = if !e.enabled {
            "disabled"
        } else if e.connected {
            "up"
        } else {
            "down"
        };
        let _ = writeln!(
            out,
            "{:<16} {:<28} {:<24} {:<8} {:>12} {:>9}  {}",
            e.name,
            e.address,
            e.identity,
            link,
            ago(e.since_unix_ms, now),
            e.requests,
            if e.connected {
                cert_note(e.cert_not_after_unix_s, now).unwrap_or_default()
            } else {
                e.link_error.clone()
            }
        );
    }
    out
}

fn events_table(events: &[admin::Event]) -> String {
    let mut out = format!(
        "{:<24} {:<21} {:<12} {:<16} {}\n",
        "TIME (UTC)", "KIND", "LOCATION", "SUBJECT", "MESSAGE"
    );
    for e in events {
        let _ = writeln!(
            out,
            "{:<24} {:<21} {:<12} {:<16} {}",
            utc(e.at_unix_ms),
            e.kind,
            or_dash(&e.location),
            or_dash(&e.subject),
            e.message
        );
    }
    out
}

/// "2026-11-24 10:31:07.250" for a Unix time in ms.
fn utc(at_ms: i64) -> String {
    let secs = at_ms.div_euclid(1000);
    let ms = at_ms.rem_euclid(1000);
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{ms:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// How long `tidectl` waits for Core on any one call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_import_file_is_one_device_per_line_and_a_bad_line_is_named() {
        let text = "{\"name\":\"a\",\"user\":\"u\",\"location\":\"l\",\"public_key\":\"k\"}\n\n\
                    {\"name\":\"b\",\"user\":\"u\",\"location\":\"l\",\"public_key\":\"k2\",\
                    \"addresses\":[\"10.8.0.9/32\"],\"enabled\":false}\n";
        let devices = parse_import(text).unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[1].addresses, ["10.8.0.9/32"]);
        assert_eq!(devices[1].enabled, Some(false));
        assert_eq!(devices[0].enabled, None);
        for (bad, want) in [
            ("{\"name\":\"a\"}", "line 1"),
            (
                "\n{\"name\":\"a\",\"user\":\"u\",\"location\":\"l\",\"public_key\":\"k\",\"x\":1}",
                "line 2",
            ),
        ] {
            let err = format!("{:#}", parse_import(bad).unwrap_err());
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn times_read_naturally() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(100_000);
        assert_eq!(ago(0, now), "never");
        assert_eq!(ago(99_990_000, now), "10s ago");
        assert_eq!(ago(100_180_000, now), "in 3m0s");
        assert_eq!(ago(10_000_000, now), "1d1h ago");
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_795_519_867_250), "2026-11-24 11:31:07.250");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000");
    }

    #[test]
    fn a_certificate_near_or_past_its_expiry_is_a_note() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let day = 86_400;
        for (not_after, want) in [
            (0, None),
            (1_000_000_000 + 90 * day, None),
            (
                1_000_000_000 + 12 * day,
                Some("certificate expires in 12 days: renew it"),
            ),
            (
                1_000_000_000 - 3 * day,
                Some("certificate expired 3 days ago"),
            ),
        ] {
            assert_eq!(cert_note(not_after, now).as_deref(), want, "{not_after}");
        }
    }

    #[test]
    fn status_shows_each_gateway() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let status = admin::LocationStatusResponse {
            location: Some(admin::Location {
                name: "ams".into(),
                id: 1,
                version: 7,
                devices: 3,
                mfa: true,
                ..Default::default()
            }),
            gateways: vec![
                admin::GatewayStatus {
                    name: "gw-a".into(),
                    enabled: true,
                    connected: true,
                    ha: true,
                    role: "master".into(),
                    priority: 200,
                    effective_priority: 150,
                    healthy: true,
                    last_seen_unix_ms: 998_000,
                    peers: 3,
                    peers_recent_handshake: 2,
                    applied_version: 7,
                    ..Default::default()
                },
                admin::GatewayStatus {
                    name: "gw-b".into(),
                    enabled: true,
                    connected: false,
                    link_error: "connecting to 198.51.100.3:50051".into(),
                    since_unix_ms: 990_000,
                    ..Default::default()
                },
            ],
            mfa_sessions: 2,
        };
        let text = status_text(&status, now);
        assert!(
            text.starts_with("location ams (id 1): config version 7, 3 devices, 2 MFA sessions\n"),
            "{text}"
        );
        let rows: Vec<Vec<&str>> = text
            .lines()
            .skip(3)
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rows[0],
            [
                "gw-a", "up", "MASTER", "150/200", "yes", "2s", "ago", "3", "2", "7"
            ]
        );
        assert_eq!(&rows[1][..4], ["gw-b", "down", "-", "-"]);
        assert!(
            text.contains("down 10s ago: connecting to 198.51.100.3:50051"),
            "{text}"
        );
    }
}
