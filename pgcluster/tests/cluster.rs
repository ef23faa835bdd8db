//! A real PostgreSQL cluster (Debian's postgresql must be installed; root is
//! not needed): the `postgres` driver connects over the URLs it gives, across
//! a stop and a restart, and nothing is left after drop.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::Path,
    time::{Duration, Instant},
};

use tidegate_pgcluster::{Cluster, Options};

fn connect(url: &str) -> Result<postgres::Client, postgres::Error> {
    postgres::Client::connect(url, postgres::NoTls)
}

fn current_database(url: &str) -> String {
    let mut client = connect(url).unwrap_or_else(|error| panic!("connecting to {url}: {error}"));
    client
        .query_one("select current_database()", &[])
        .expect("select current_database()")
        .get(0)
}

/// The postmaster's pid, from the first line of `postmaster.pid`.
fn postmaster_pid(data: &Path) -> u32 {
    let text = std::fs::read_to_string(data.join("postmaster.pid")).expect("postmaster.pid");
    text.lines()
        .next()
        .and_then(|line| line.trim().parse().ok())
        .expect("a pid on postmaster.pid's first line")
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses.
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with(['Z', 'X']))
    })
}

#[test]
fn databases_stop_restart_and_drop() {
    let mut cluster = Cluster::start(Options::default()).expect("starting a cluster");
    let url = cluster.url("postgres");
    assert!(
        url.starts_with("postgresql://postgres@/postgres?host=/"),
        "{url}"
    );

    let first = cluster.create_database("store").expect("create_database");
    let second = cluster.create_database("store").expect("create_database");
    assert_ne!(first, second);
    assert!(first.starts_with("store_"), "{first}");
    for db in [&first, &second] {
        let url = cluster.url(db);
        assert_eq!(&current_database(&url), db);
        let mut client = connect(&url).expect("connecting");
        client
            .batch_execute("create table t (n int); insert into t values (7)")
            .expect("writing");
    }
    assert!(cluster.create_database("Bad-Name").is_err());

    cluster.stop().expect("stop");
    assert!(
        connect(&cluster.url(&first)).is_err(),
        "connected to a stopped cluster"
    );

    cluster.restart().expect("restart");
    let mut client = connect(&cluster.url(&first)).expect("connecting after the restart");
    let n: i32 = client
        .query_one("select n from t", &[])
        .expect("reading after the restart")
        .get(0);
    assert_eq!(n, 7, "the data stays across stop and restart");
    drop(client);

    let data = cluster.data_dir().to_path_buf();
    let dir = data
        .parent()
        .expect("the cluster's directory")
        .to_path_buf();
    let pid = postmaster_pid(&data);
    assert!(alive(pid), "the postmaster {pid} is not running");
    drop(cluster);
    assert!(!dir.exists(), "{} is left after drop", dir.display());
    // pg_ctl returns once postmaster.pid is gone, which the postmaster
    // removes just before it exits.
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(pid), "the postmaster {pid} runs after drop");
}

#[test]
fn listens_on_tcp() {
    let port = {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("binding port 0");
        listener.local_addr().expect("local_addr").port()
    };
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let cluster = Cluster::start(Options {
        listen: Some(listen),
        ..Options::default()
    })
    .expect("starting a cluster on TCP");
    let db = cluster.create_database("tcp").expect("create_database");
    let url = cluster.url(&db);
    assert_eq!(url, format!("postgresql://postgres@127.0.0.1:{port}/{db}"));
    assert_eq!(current_database(&url), db);
}

#[test]
fn durable_settings_without_fast() {
    let cluster = Cluster::start(Options {
        fast: false,
        ..Options::default()
    })
    .expect("starting a durable cluster");
    let mut client = connect(&cluster.url("postgres")).expect("connecting");
    for (setting, want) in [("fsync", "on"), ("synchronous_commit", "on")] {
        let row = client
            .query_one(&format!("show {setting}"), &[])
            .expect("show");
        assert_eq!(row.get::<_, String>(0), want, "{setting}");
    }
    drop(client);

    let fast = Cluster::start(Options::default()).expect("starting a fast cluster");
    let mut client = connect(&fast.url("postgres")).expect("connecting");
    let row = client.query_one("show fsync", &[]).expect("show");
    assert_eq!(row.get::<_, String>(0), "off");
}
