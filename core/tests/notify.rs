//! `tidegate-core run` under systemd (`Type=notify`): it says READY=1 with
//! a status line once its admin socket answers, and STOPPING=1 on SIGTERM.

use std::{
    os::unix::net::UnixDatagram,
    process::{Command, Stdio},
    time::Duration,
};

use tidegate_core::pki::{self, PkiDir};

/// The next notification, or a failure naming what was awaited.
fn next(socket: &UnixDatagram, awaited: &str) -> String {
    let mut buf = [0u8; 4096];
    let len = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification while awaiting {awaited}: {e}"));
    String::from_utf8(buf[..len].to_vec()).expect("a UTF-8 notification")
}

#[test]
fn ready_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = PkiDir::new(dir.path().join("pki"));
    pki::init(&pki_dir).unwrap();
    let admin_socket = dir.path().join("core.sock");
    std::fs::write(
        dir.path().join("core.toml"),
        format!(
            "database = {:?}\nadmin_socket = {:?}\n[tls]\ndir = {:?}\n",
            dir.path().join("core.db"),
            admin_socket,
            pki_dir.dir()
        ),
    )
    .unwrap();
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    let mut core = Command::new(env!("CARGO_BIN_EXE_tidegate-core"))
        .arg("run")
        .arg("--config")
        .arg(dir.path().join("core.toml"))
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting tidegate-core");

    let ready = next(&notify, "READY=1");
    let lines: Vec<&str> = ready.lines().collect();
    assert!(lines.contains(&"READY=1"), "{ready}");
    let status = lines
        .iter()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("no status line: {ready}"));
    assert!(
        status.contains(&admin_socket.display().to_string()),
        "{status}"
    );
    // Ready means the admin socket is there to connect to.
    std::os::unix::net::UnixStream::connect(&admin_socket).expect("the admin socket");

    // SAFETY: kill takes plain integers; the pid is our child's, not yet
    // waited for.
    assert_eq!(unsafe { libc::kill(core.id() as i32, libc::SIGTERM) }, 0);
    let stopping = next(&notify, "STOPPING=1");
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping}");
    let status = core.wait().unwrap();
    assert!(status.success(), "tidegate-core exited {status}");
}
