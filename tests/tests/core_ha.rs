//! Several Cores on one PostgreSQL database, in namespaces with real
//! gateways: one leads; when it is killed, paused past its lease, cut off
//! from the database, or the database itself stops, another leads (or none,
//! and the gateways run on), every change `tidectl` saw succeed reaches
//! every gateway, and a deposed leader changes nothing.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tidegate_core::keys::Key;
use tidegate_tests::control::{ControlLab, ControlOptions, DB_ADDR, LOCATION};
use tidegate_tests::{Probe, poll_until, require_root};

/// How long a new leader may take, from the old one's end: the lease
/// (600 ms), a poll (100 ms), and slack for a loaded machine.
const TAKEOVER: Duration = Duration::from_secs(5);
/// How long every gateway may take to run a change.
const APPLIED: Duration = Duration::from_secs(20);

/// One lab at a time: each runs three Cores' worth of processes.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn narrate(line: &str) {
    println!("  {line}");
}

/// A location with two gateways and `cores` Cores; a user to give devices.
fn lab(cores: usize) -> Result<ControlLab> {
    let lab = ControlLab::build(&ControlOptions {
        gateways: 2,
        edges: 0,
        cores,
        ..ControlOptions::default()
    })?;
    let (leader, term) = lab.wait_leader(&[1], TAKEOVER)?;
    narrate(&format!(
        "{cores} Cores on PostgreSQL; core-{leader} leads at term {term}"
    ));
    lab.core_k(leader)?
        .tidectl_ok(&["user", "create", "alice"])?;
    Ok(lab)
}

/// Device `n`'s public key.
fn key(n: u8) -> String {
    Key::new([n; 32]).to_base64()
}

/// `tidectl device create dev-<n>` on Core `k`: `Ok(true)` when it says
/// done, or that the device exists already (a retry of a change the dead
/// leader committed); `Ok(false)` when that Core cannot take it now.
fn create_device(lab: &ControlLab, k: usize, n: u8) -> Result<bool> {
    let out = lab.core_k(k)?.tidectl(&[
        "device",
        "create",
        &format!("dev-{n}"),
        "--user",
        "alice",
        "--location",
        LOCATION,
        "--public-key",
        &key(n),
    ])?;
    Ok(out.status.success() || out.stderr.contains("exists already"))
}

/// Waits until every gateway's WireGuard has every key of `keys`.
fn wait_on_every_gateway(lab: &mut ControlLab, keys: &BTreeSet<String>) -> Result<()> {
    for gateway in lab.gateways_mut() {
        let name = gateway.name.clone();
        poll_until(
            &format!("{name} to run every acknowledged device"),
            APPLIED,
            Duration::from_millis(100),
            || {
                let peers: BTreeSet<String> = gateway
                    .daemon
                    .peers()?
                    .peers
                    .iter()
                    .map(|p| p.public_key.clone())
                    .collect();
                let missing: Vec<&String> = keys.difference(&peers).collect();
                Ok(if missing.is_empty() {
                    Probe::Ready(())
                } else {
                    Probe::NotYet(format!("{} missing: {missing:?}", missing.len()))
                })
            },
        )?;
    }
    Ok(())
}

#[test]
fn the_leader_killed_while_changes_stream_another_leads_and_every_acknowledged_change_is_everywhere()
-> Result<()> {
    require_root();
    let _serial = serial();
    let mut lab = lab(2)?;
    let pid = lab.core_k(1)?.process().pid();
    // The kill comes from another thread, whatever tidectl is doing then.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(800));
        let at = Instant::now();
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).map(|()| at)
    });
    let mut acked = BTreeSet::new();
    let mut target = 1;
    let mut first_on_new: Option<Instant> = None;
    let started = Instant::now();
    for n in 1..=60u8 {
        let deadline = Instant::now() + TAKEOVER * 2;
        loop {
            if create_device(&lab, target, n)? {
                acked.insert(key(n));
                if target == 2 && first_on_new.is_none() {
                    first_on_new = Some(Instant::now());
                }
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "device {n}: no Core took it within {:?}",
                TAKEOVER * 2
            );
            // The leader is gone or is not the leader: ask the other.
            target = if target == 1 { 2 } else { 1 };
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let killed_at = killer.join().expect("the killer thread")?;
    let first_on_new = first_on_new.context("core-2 never took a change")?;
    ensure!(killed_at > started, "core-1 died before the stream began");
    narrate(&format!(
        "core-1 SIGKILLed mid-stream; core-2 took its first change {} ms later; {} changes acknowledged",
        first_on_new
            .saturating_duration_since(killed_at)
            .as_millis(),
        acked.len()
    ));
    ensure!(acked.len() == 60, "{} of 60 acknowledged", acked.len());
    let (leader, term) = lab.wait_leader(&[2], TAKEOVER)?;
    ensure!(leader == 2 && term >= 2, "core-{leader} at term {term}");
    wait_on_every_gateway(&mut lab, &acked)?;
    narrate("every acknowledged device is on both gateways");
    Ok(())
}

#[test]
fn a_leader_paused_past_its_lease_is_replaced_and_once_resumed_changes_nothing_and_steps_down()
-> Result<()> {
    require_root();
    let _serial = serial();
    let mut lab = lab(2)?;
    let (_, old_term) = lab.wait_leader(&[1], TAKEOVER)?;
    ensure!(create_device(&lab, 1, 1)?, "core-1 took no change");
    lab.core_k_mut(1)?.signal(Signal::SIGSTOP)?;
    let paused = Instant::now();
    let (leader, term) = lab.wait_leader(&[2], TAKEOVER)?;
    narrate(&format!(
        "core-1 SIGSTOPped; core-2 leads at term {term} after {} ms",
        paused.elapsed().as_millis()
    ));
    ensure!(
        leader == 2 && term > old_term,
        "term {term} after {old_term}"
    );
    ensure!(create_device(&lab, 2, 2)?, "core-2 took no change");
    let keys: BTreeSet<String> = [key(1), key(2)].into();
    wait_on_every_gateway(&mut lab, &keys)?;

    lab.core_k_mut(1)?.signal(Signal::SIGCONT)?;
    let lease = poll_until(
        "core-1 to say it is a standby",
        TAKEOVER,
        Duration::from_millis(50),
        || {
            let lease = lab.core_k(1)?.lease()?;
            Ok(if !lease.leading && lease.leader == "core-2" {
                Probe::Ready(lease)
            } else {
                Probe::NotYet(format!("{lease:?}"))
            })
        },
    )?;
    narrate(&format!("core-1 resumed: {lease:?}"));
    ensure!(lease.term >= term, "{lease:?}");
    // It refuses changes, naming the leader; the gateways run core-2's
    // config still, the device made through it included.
    let out = lab.core_k(1)?.tidectl(&[
        "device",
        "create",
        "dev-3",
        "--user",
        "alice",
        "--location",
        LOCATION,
        "--public-key",
        &key(3),
    ])?;
    ensure!(
        !out.status.success() && out.stderr.contains("standby") && out.stderr.contains("core-2"),
        "core-1 answered {out:?}"
    );
    std::thread::sleep(Duration::from_secs(1));
    wait_on_every_gateway(&mut lab, &keys)?;
    ensure!(
        create_device(&lab, 2, 4)?,
        "core-2 took no change after core-1 resumed"
    );
    wait_on_every_gateway(&mut lab, &[key(1), key(2), key(4)].into())?;
    Ok(())
}

#[test]
fn a_leader_cut_off_from_the_database_steps_down_and_another_leads() -> Result<()> {
    require_root();
    let _serial = serial();
    let mut lab = lab(2)?;
    let (_, old_term) = lab.wait_leader(&[1], TAKEOVER)?;
    // core-1's packets to the database go nowhere; its gateway links stay.
    let route = format!("{}/32", DB_ADDR.ip());
    let netns = lab.core_k(1)?.netns().clone();
    netns.exec_ok("ip", &["route", "add", "blackhole", &route])?;
    let cut = Instant::now();
    let (leader, term) = lab.wait_leader(&[2], TAKEOVER)?;
    narrate(&format!(
        "core-1 cut off from PostgreSQL; core-2 leads at term {term} after {} ms",
        cut.elapsed().as_millis()
    ));
    ensure!(leader == 2 && term > old_term);
    let lease = lab.core_k(1)?.lease()?;
    ensure!(
        !lease.leading && !lease.problem.is_empty(),
        "core-1 says {lease:?}"
    );
    narrate(&format!("core-1 says: {}", lease.problem));
    ensure!(create_device(&lab, 2, 1)?, "core-2 took no change");
    wait_on_every_gateway(&mut lab, &[key(1)].into())?;

    netns.exec_ok("ip", &["route", "del", "blackhole", &route])?;
    poll_until(
        "core-1 to see core-2 lead",
        TAKEOVER * 2,
        Duration::from_millis(100),
        || {
            let lease = lab.core_k(1)?.lease()?;
            Ok(
                if lease.leader == "core-2" && !lease.leading && lease.problem.is_empty() {
                    Probe::Ready(())
                } else {
                    Probe::NotYet(format!("{lease:?}"))
                },
            )
        },
    )?;
    Ok(())
}

#[test]
fn with_the_database_stopped_the_gateways_run_on_and_the_cores_recover_when_it_returns()
-> Result<()> {
    require_root();
    let _serial = serial();
    let mut lab = lab(2)?;
    ensure!(create_device(&lab, 1, 1)?, "core-1 took no change");
    wait_on_every_gateway(&mut lab, &[key(1)].into())?;
    lab.postgres_mut()?.stop()?;
    narrate("PostgreSQL stopped");
    // No Core leads, and each says why.
    poll_until(
        "every Core to say it does not lead",
        TAKEOVER,
        Duration::from_millis(100),
        || {
            let mut leading = Vec::new();
            for k in 1..=2 {
                let lease = lab.core_k(k)?.lease()?;
                if lease.leading || lease.problem.is_empty() {
                    leading.push(format!("core-{k}: {lease:?}"));
                }
            }
            Ok(if leading.is_empty() {
                Probe::Ready(())
            } else {
                Probe::NotYet(leading.join("; "))
            })
        },
    )?;
    let lease = lab.core_k(1)?.lease()?;
    narrate(&format!("core-1 says: {}", lease.problem));
    let out = lab.core_k(1)?.tidectl(&[
        "device",
        "create",
        "dev-2",
        "--user",
        "alice",
        "--location",
        LOCATION,
        "--public-key",
        &key(2),
    ])?;
    ensure!(!out.status.success(), "a change with no database: {out:?}");
    // The gateways keep the config they run, master and all.
    std::thread::sleep(Duration::from_secs(2));
    wait_on_every_gateway(&mut lab, &[key(1)].into())?;
    lab.wait_master(Duration::from_secs(5))?;

    lab.postgres_mut()?.restart()?;
    let back = Instant::now();
    let (leader, term) = lab.wait_leader(&[1, 2], Duration::from_secs(15))?;
    narrate(&format!(
        "PostgreSQL back; core-{leader} leads at term {term} after {} ms",
        back.elapsed().as_millis()
    ));
    ensure!(
        create_device(&lab, leader, 3)?,
        "core-{leader} took no change"
    );
    wait_on_every_gateway(&mut lab, &[key(1), key(3)].into())?;
    // Each Core writes its line again: the roster lists both.
    poll_until(
        "the roster to list both Cores",
        TAKEOVER,
        Duration::from_millis(200),
        || {
            let lease = lab.core_k(leader)?.lease()?;
            Ok(if lease.cores == 2 {
                Probe::Ready(())
            } else {
                Probe::NotYet(format!("{lease:?}"))
            })
        },
    )?;
    Ok(())
}

/// The code of the current TOTP step.
fn code(secret: &[u8]) -> String {
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    tidegate_core::totp::code_at(secret, tidegate_core::totp::step_at(now_s))
}

/// One MFA login of device `n` through nginx: `Ok(None)` when served,
/// `Ok(Some(status))` when refused with 503 and a clear body; anything
/// else is an error.
fn login(lab: &ControlLab, n: u8, secret: &[u8]) -> Result<Option<u16>> {
    let unavailable = |answer: &tidegate_tests::http::HttpAnswer| -> Result<Option<u16>> {
        let body = answer.json()?;
        ensure!(
            answer.status == 503
                && body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
            "an MFA login answered {} {}",
            answer.status,
            answer.body
        );
        Ok(Some(answer.status))
    };
    let start = lab.post(
        "/api/v1/mfa/start",
        &serde_json::json!({"location": LOCATION, "public_key": key(n)}),
    )?;
    if start.status != 200 {
        return unavailable(&start);
    }
    let session = start.json()?["session"]
        .as_str()
        .context("no session in the MFA challenge")?
        .to_owned();
    let finish = lab.post(
        "/api/v1/mfa/finish",
        &serde_json::json!({"session": session, "code": code(secret)}),
    )?;
    match finish.status {
        200 => Ok(None),
        _ => unavailable(&finish),
    }
}

#[test]
fn mfa_logins_through_the_edges_go_on_across_a_takeover_but_for_its_window() -> Result<()> {
    require_root();
    let _serial = serial();
    let lab = ControlLab::build(&ControlOptions {
        gateways: 2,
        edges: 1,
        cores: 2,
        mfa_threshold_s: Some(300),
        ..ControlOptions::default()
    })?;
    lab.wait_leader(&[1], TAKEOVER)?;
    // A user per device: a TOTP code is good once per user and step.
    let users = 40u8;
    let mut secrets = Vec::new();
    for n in 1..=users {
        let core = lab.core_k(1)?;
        let user = core.tidectl_json(&["user", "create", &format!("user-{n}")])?;
        let secret = user["totp_secret"].as_str().context("no TOTP secret")?;
        secrets.push(tidegate_core::totp::secret_from_base32(secret).context("a TOTP secret")?);
        core.tidectl_ok(&[
            "device",
            "create",
            &format!("dev-{n}"),
            "--user",
            &format!("user-{n}"),
            "--location",
            LOCATION,
            "--public-key",
            &key(n),
        ])?;
    }
    ensure!(
        login(&lab, 1, &secrets[0])?.is_none(),
        "the first login was refused"
    );

    let pid = lab.core_k(1)?.process().pid();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL)?;
    let killed = Instant::now();
    let mut refused = 0;
    let mut served_at = None;
    for n in 2..=users {
        let deadline = Instant::now() + TAKEOVER * 2;
        loop {
            match login(&lab, n, &secrets[usize::from(n) - 1])? {
                None => break,
                Some(_) if served_at.is_none() && Instant::now() < deadline => {
                    refused += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Some(status) => bail!(
                    "login {n} refused ({status}) {} ms after the kill, after a login was served",
                    killed.elapsed().as_millis()
                ),
            }
        }
        served_at.get_or_insert_with(Instant::now);
    }
    let window = served_at.context("no login served")? - killed;
    narrate(&format!(
        "core-1 SIGKILLed: {refused} logins answered 503 in the takeover window, the first \
         served {} ms after the kill, then {} served in a row",
        window.as_millis(),
        users - 1
    ));
    ensure!(window < TAKEOVER, "the takeover window was {window:?}");
    Ok(())
}
