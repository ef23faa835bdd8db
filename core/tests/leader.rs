//! The leader lease against a real PostgreSQL server (the one
//! `TIDEGATE_TEST_POSTGRES` names; `cargo xtask test` starts it): one Core
//! leads, a standby takes over when the leader stops or dies, the term
//! grows, and a Core that lost the lease can write nothing even while it
//! still believes it leads.

use std::time::{Duration, Instant};

use tidegate_core::{
    leader::{Leadership, lease, machine::Timing},
    store::{Database, MfaSettings, Store, StoreError, db::Fence},
};
use tidegate_proto::admin::v1 as admin;
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// A new, empty database on the test server.
fn database() -> Database {
    let server = std::env::var("TIDEGATE_TEST_POSTGRES")
        .expect("TIDEGATE_TEST_POSTGRES names no PostgreSQL server: `cargo xtask test` starts one");
    let name = format!("lease_{}", std::process::id());
    let mut client = postgres::Client::connect(&server, postgres::NoTls).unwrap();
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let (scheme, rest) = server.split_once("://").unwrap();
    let start = rest.find('/').unwrap_or(rest.len());
    let end = rest.find('?').unwrap_or(rest.len()).max(start);
    Database::Postgres(format!(
        "{scheme}://{}/{name}{}",
        &rest[..start],
        &rest[end..]
    ))
}

/// Waits until `leadership` satisfies `want`, for at most `within`.
async fn wait_for(
    leadership: &mut watch::Receiver<Leadership>,
    within: Duration,
    want: impl Fn(&Leadership) -> bool,
) -> Leadership {
    let waited = tokio::time::timeout(within, async {
        leadership.wait_for(|l| want(l)).await.map(|l| l.clone())
    })
    .await;
    match waited {
        Ok(leadership) => leadership.unwrap(),
        Err(_) => panic!("not within {within:?}: {:?}", *leadership.borrow()),
    }
}

/// A store of Core `core_id`, fenced by its leadership.
fn store(database: &Database, core_id: &str, leadership: &watch::Receiver<Leadership>) -> Store {
    let mut store = Store::open(database, MfaSettings::default()).unwrap();
    store.fence(Fence {
        core_id: core_id.into(),
        leadership: leadership.clone(),
    });
    store
}

fn location(name: &str) -> admin::CreateLocationRequest {
    admin::CreateLocationRequest {
        name: name.into(),
        addresses: vec!["10.8.0.1/24".into()],
        endpoint: "vpn.example.org".into(),
        ..Default::default()
    }
}

#[test]
#[ignore = "needs PostgreSQL: `cargo xtask test` runs it on its cluster"]
fn one_core_leads_a_standby_takes_over_and_a_deposed_leader_writes_nothing() {
    let database = database();
    let Database::Postgres(url) = &database else {
        unreachable!()
    };
    // The schema first, as Core opens its store before the lease.
    drop(Store::open(&database, MfaSettings::default()).unwrap());
    let timing = Timing::default();

    // Core a on a runtime of its own, so that it can die without a word;
    // Core b on another.
    let runtime_a = tokio::runtime::Runtime::new().unwrap();
    let runtime_b = tokio::runtime::Runtime::new().unwrap();
    let (tracker, cancel_b) = (TaskTracker::new(), CancellationToken::new());
    let mut lead_a = runtime_a.block_on(async {
        lease::spawn(
            url.clone(),
            "core-a".into(),
            timing,
            &TaskTracker::new(),
            CancellationToken::new(),
        )
    });
    let a = runtime_a.block_on(wait_for(&mut lead_a, Duration::from_secs(5), |l| l.leading));
    let mut lead_b = runtime_b.block_on(async {
        lease::spawn(
            url.clone(),
            "core-b".into(),
            timing,
            &tracker,
            cancel_b.clone(),
        )
    });
    let b = runtime_b.block_on(wait_for(&mut lead_b, Duration::from_secs(5), |l| {
        l.leader.is_some()
    }));
    assert!(!b.leading, "{b:?}");
    assert_eq!(b.leader.as_deref(), Some("core-a"));
    assert_eq!(b.term, a.term);

    // Only the leader writes; the standby is told who leads.
    let mut store_a = store(&database, "core-a", &lead_a);
    let mut store_b = store(&database, "core-b", &lead_b);
    store_a.create_location(location("ams"), 0).unwrap();
    let refused = store_b.create_location(location("fra"), 0).unwrap_err();
    assert!(matches!(refused, StoreError::NotLeader(_)), "{refused}");
    let says = refused.to_string();
    assert!(
        says.contains("core-b") && says.contains("core-a leads"),
        "{says}"
    );
    assert!(!store_a.may_write() || !store_b.may_write());

    // Core a dies without releasing the lease: b leads once it expires,
    // at the next term.
    let died = Instant::now();
    runtime_a.shutdown_background();
    let b = runtime_b.block_on(wait_for(&mut lead_b, Duration::from_secs(3), |l| l.leading));
    let took = died.elapsed();
    assert_eq!(b.term, a.term + 1, "{b:?}");
    assert!(
        took <= timing.lease + timing.poll + Duration::from_millis(300),
        "b took over after {took:?}"
    );

    // a's last word was that it leads (it died leading): its store still
    // believes it, and the database refuses it all the same.
    assert!(lead_a.borrow().leading);
    let refused = store_a.create_location(location("fra"), 0).unwrap_err();
    assert!(matches!(refused, StoreError::NotLeader(_)), "{refused}");
    assert!(
        refused.to_string().contains("no longer holds the lease"),
        "{refused}"
    );
    store_b.create_location(location("fra"), 0).unwrap();
    assert_eq!(store_b.list_locations().unwrap().len(), 2);

    // A clean stop hands over at once: a new Core a takes the lease at the
    // standby's next poll, not after the lease.
    let runtime_c = tokio::runtime::Runtime::new().unwrap();
    let (tracker_c, cancel_c) = (TaskTracker::new(), CancellationToken::new());
    let mut lead_c = runtime_c.block_on(async {
        lease::spawn(
            url.clone(),
            "core-a".into(),
            timing,
            &tracker_c,
            cancel_c.clone(),
        )
    });
    runtime_c.block_on(wait_for(&mut lead_c, Duration::from_secs(3), |l| {
        l.leader.as_deref() == Some("core-b")
    }));
    let stopped = Instant::now();
    cancel_b.cancel();
    runtime_b.block_on(async {
        tracker.close();
        tracker.wait().await;
    });
    assert!(
        !lead_b.borrow().leading,
        "a stopped Core says it no longer leads"
    );
    let c = runtime_c.block_on(wait_for(&mut lead_c, Duration::from_secs(3), |l| l.leading));
    let took = stopped.elapsed();
    assert_eq!(c.term, b.term + 1, "{c:?}");
    assert!(
        took < timing.lease,
        "a released lease was taken after {took:?}"
    );
    cancel_c.cancel();
    runtime_c.block_on(async {
        tracker_c.close();
        tracker_c.wait().await;
    });
}
