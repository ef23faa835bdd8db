//! Core started in-process on temporary files: the operator API over its
//! Unix socket, as `tidectl` uses it.

use std::{os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use tidegate_core::{
    config::{Config, Overrides},
    daemon::Core,
    keys::Key,
    pki::{self, PkiDir},
};
use tidegate_proto::admin::v1::{self as admin, admin_client::AdminClient};
use tonic::{Code, transport::Channel};

fn config(dir: &Path) -> Config {
    let pki = PkiDir::new(dir.join("pki"));
    if !pki.ca_cert().exists() {
        pki::init(&pki).unwrap();
    }
    let text = format!(
        "database = {:?}\nadmin_socket = {:?}\n[tls]\ndir = {:?}\n[links]\nreconnect_min_ms = 50\nreconnect_max_ms = 200\n",
        dir.join("db/core.db"),
        dir.join("run/core.sock"),
        pki.dir(),
    );
    Config::parse(&dir.join("core.toml"), &text, Overrides::default()).unwrap()
}

async fn client(config: &Config) -> AdminClient<Channel> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("unix:{}", config.admin_socket.display()))
            .unwrap()
            .connect()
            .await
            .unwrap();
    AdminClient::new(channel)
}

fn location(name: &str) -> admin::CreateLocationRequest {
    admin::CreateLocationRequest {
        name: name.into(),
        addresses: vec!["10.77.0.1/24".into()],
        vips: vec!["198.51.100.100".into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn objects_are_created_changed_listed_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let core = Core::start(config.clone()).await.unwrap();
    let mut api = client(&config).await;

    let loc = api
        .create_location(location("ams"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(loc.version, 1);
    let user = api
        .create_user(admin::CreateUserRequest {
            name: "alice".into(),
            enabled: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(user.totp_secret.len(), 32);
    let key = Key::generate_private().public();
    let device = api
        .create_device(admin::CreateDeviceRequest {
            name: "alice-laptop".into(),
            user: "alice".into(),
            location: "ams".into(),
            public_key: key.to_base64(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(device.addresses, ["10.77.0.2/32"]);
    assert_eq!(
        api.get_location(admin::GetLocationRequest { name: "ams".into() })
            .await
            .unwrap()
            .into_inner()
            .version,
        2
    );
    let token = api
        .create_download_token(admin::CreateDownloadTokenRequest {
            device: "alice-laptop".into(),
            ttl_s: Some(60),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(token.token.len(), 43);

    // Errors carry a gRPC code and a message naming the field.
    let err = api
        .create_location(admin::CreateLocationRequest {
            listen_port: Some(70000),
            ..location("fra")
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("listen_port: "), "{err}");
    let err = api.create_location(location("ams")).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = api
        .get_device(admin::GetDeviceRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = api
        .delete_location(admin::DeleteLocationRequest { name: "ams".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("1 devices"), "{err}");

    let changed = api
        .update_device(admin::UpdateDeviceRequest {
            name: "alice-laptop".into(),
            enabled: Some(false),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!changed.enabled);
    let devices = api
        .list_devices(admin::ListDevicesRequest {
            user: "alice".into(),
            location: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .devices;
    assert_eq!(devices.len(), 1);
    api.delete_device(admin::DeleteDeviceRequest {
        name: "alice-laptop".into(),
    })
    .await
    .unwrap();
    api.delete_user(admin::DeleteUserRequest {
        name: "alice".into(),
    })
    .await
    .unwrap();
    api.delete_location(admin::DeleteLocationRequest { name: "ams".into() })
        .await
        .unwrap();
    assert!(
        api.list_locations(admin::ListLocationsRequest {})
            .await
            .unwrap()
            .into_inner()
            .locations
            .is_empty()
    );
    core.stop().await.unwrap();
}

#[tokio::test]
async fn the_socket_is_private_and_the_store_outlives_core() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let core = Core::start(config.clone()).await.unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&config.admin_socket), 0o600);
    assert_eq!(mode(config.admin_socket.parent().unwrap()), 0o700);
    let tidegate_core::store::Database::Sqlite(database) = &config.database else {
        panic!("the test's config is on SQLite");
    };
    assert_eq!(mode(database), 0o600);
    // A second Core on the same files is refused.
    let err = Core::start(config.clone()).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("another tidegate-core"),
        "{err:#}"
    );
    let mut api = client(&config).await;
    api.create_location(location("ams")).await.unwrap();
    core.stop().await.unwrap();
    assert!(!config.admin_socket.exists());

    let core = Core::start(config.clone()).await.unwrap();
    let mut api = client(&config).await;
    let ams = api
        .get_location(admin::GetLocationRequest { name: "ams".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ams.addresses, ["10.77.0.1/24"]);
    core.stop().await.unwrap();
}

#[tokio::test]
async fn status_shows_unreachable_gateways_and_failover_needs_a_master() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let core = Core::start(config.clone()).await.unwrap();
    let mut api = client(&config).await;
    api.create_location(location("ams")).await.unwrap();
    // A port on loopback nothing listens on: refused at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = closed.local_addr().unwrap().to_string();
    drop(closed);
    api.create_gateway(admin::CreateGatewayRequest {
        name: "gw-a".into(),
        location: "ams".into(),
        address: address.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    api.create_gateway(admin::CreateGatewayRequest {
        name: "gw-b".into(),
        location: "ams".into(),
        address: "127.0.0.1:9".into(),
        enabled: Some(false),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut status = None;
    for _ in 0..100 {
        let s = api
            .location_status(admin::LocationStatusRequest { name: "ams".into() })
            .await
            .unwrap()
            .into_inner();
        if s.gateways[0].link_error.contains("connecting") {
            status = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = status.expect("the link error shows in the status");
    let (a, b) = (&status.gateways[0], &status.gateways[1]);
    assert_eq!(a.name, "gw-a");
    assert!(!a.connected);
    assert!(a.link_error.contains(&address), "{}", a.link_error);
    assert_eq!(b.link_error, "disabled");
    let err = api
        .failover(admin::FailoverRequest {
            location: "ams".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("gw-a not connected"), "{err}");
    let err = api
        .failover(admin::FailoverRequest {
            location: "nowhere".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    core.stop().await.unwrap();
}

#[tokio::test]
async fn a_device_config_for_stock_apps_holds_what_core_has_and_not_on_mfa() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let core = Core::start(config.clone()).await.unwrap();
    let mut api = client(&config).await;
    let loc = api
        .create_location(admin::CreateLocationRequest {
            dns: vec!["10.77.0.1".into()],
            mtu: 1380,
            ..location("ams")
        })
        .await
        .unwrap()
        .into_inner();
    api.create_location(admin::CreateLocationRequest {
        mfa: true,
        mfa_session_s: 3600,
        ..location("fra")
    })
    .await
    .unwrap();
    api.create_user(admin::CreateUserRequest {
        name: "alice".into(),
        enabled: None,
    })
    .await
    .unwrap();
    let device = |name: &str, location: &str, key: Option<Key>| admin::CreateDeviceRequest {
        name: name.into(),
        user: "alice".into(),
        location: location.into(),
        public_key: key.map(|k| k.to_base64()).unwrap_or_default(),
        ..Default::default()
    };
    let key = Key::generate_private().public();
    api.create_device(device("laptop", "ams", Some(key)))
        .await
        .unwrap();
    let got = api
        .get_device_config(admin::GetDeviceConfigRequest {
            name: "laptop".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.device, "laptop");
    assert_eq!(got.location, "ams");
    assert_eq!(got.addresses, ["10.77.0.2/32"]);
    assert_eq!(got.dns, ["10.77.0.1"]);
    assert_eq!(got.mtu, 1380);
    assert_eq!(got.server_public_key, loc.public_key);
    assert_eq!(Key::parse(&got.preshared_key).unwrap().as_bytes().len(), 32);
    assert_eq!(got.endpoint, "198.51.100.100:51820");
    assert_eq!(got.allowed_ips, ["10.77.0.0/24"]);
    assert_eq!(got.persistent_keepalive_s, 25);

    // A device awaiting enrolment shows so, and has no config yet.
    let waiting = api
        .create_device(device("phone", "ams", None))
        .await
        .unwrap()
        .into_inner();
    assert!(!waiting.enrolled && waiting.public_key.is_empty());
    let err = api
        .get_device_config(admin::GetDeviceConfigRequest {
            name: "phone".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("has no key yet"), "{err}");
    // An MFA location's devices cannot use a stock app.
    api.create_device(device(
        "tablet",
        "fra",
        Some(Key::generate_private().public()),
    ))
    .await
    .unwrap();
    let err = api
        .get_device_config(admin::GetDeviceConfigRequest {
            name: "tablet".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("uses MFA"), "{err}");
    let err = api
        .get_device_config(admin::GetDeviceConfigRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The session lifetime is shown, and refused out of range.
    let fra = api
        .get_location(admin::GetLocationRequest { name: "fra".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fra.mfa_session_s, 3600);
    let err = api
        .update_location(admin::UpdateLocationRequest {
            name: "fra".into(),
            mfa_session_s: Some(10),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("mfa_session_s: "), "{err}");
    core.stop().await.unwrap();
}
