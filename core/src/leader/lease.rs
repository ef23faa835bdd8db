//! The lease task: runs the [`Machine`] against the `core_leader` row,
//! over a PostgreSQL connection of its own (never the store's, whose jobs
//! it must not wait behind), and publishes the [`Leadership`].
//!
//! The database decides with its own clock (`clock_timestamp()`): the
//! lease is granted only once it has expired, or to the Core that holds it
//! already, and every grant raises the term. A query that does not answer
//! within the lease is abandoned with its connection; the next one
//! connects afresh.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use tokio::{sync::watch, time::Instant};
use tokio_postgres::{Client, NoTls};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use super::{
    Leadership,
    machine::{Answer, Effect, Input, Machine, Timing},
};

/// Grants the lease when it has expired, or to its holder; either way
/// says who holds it now and at which term.
const ACQUIRE: &str = "
    WITH taken AS (
        UPDATE core_leader SET term = term + 1, holder = $1,
            expires_at = clock_timestamp() + $2::bigint * interval '1 millisecond'
        WHERE id = 1 AND (expires_at <= clock_timestamp() OR holder = $1)
        RETURNING term, holder)
    SELECT term, holder FROM taken
    UNION ALL
    SELECT term, holder FROM core_leader WHERE id = 1 AND NOT EXISTS (SELECT 1 FROM taken)";

/// Extends the lease of its holder at its term; says who holds it if
/// that is no longer this Core.
const RENEW: &str = "
    WITH renewed AS (
        UPDATE core_leader
        SET expires_at = clock_timestamp() + $3::bigint * interval '1 millisecond'
        WHERE id = 1 AND holder = $1 AND term = $2
        RETURNING term, holder)
    SELECT term, holder FROM renewed
    UNION ALL
    SELECT term, holder FROM core_leader WHERE id = 1 AND NOT EXISTS (SELECT 1 FROM renewed)";

/// Gives the lease up (a clean shutdown): a standby takes it at its next
/// poll instead of waiting for it to expire.
const RELEASE: &str = "
    UPDATE core_leader SET expires_at = '-infinity' WHERE id = 1 AND holder = $1 AND term = $2";

/// How long a clean shutdown waits for the release.
const RELEASE_TIMEOUT: Duration = Duration::from_millis(500);

type Query = Pin<Box<dyn Future<Output = (Answer, Option<Arc<Client>>)> + Send>>;

/// Starts the lease task; its leadership is in the returned receiver. On
/// `cancel` it stops leading (published first) and releases the lease.
pub fn spawn(
    url: String,
    core_id: String,
    timing: Timing,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) -> watch::Receiver<Leadership> {
    let (tx, rx) = watch::channel(Leadership::starting());
    tracker.spawn(run(url, core_id, timing, tx, cancel));
    rx
}

async fn run(
    url: String,
    core_id: String,
    timing: Timing,
    tx: watch::Sender<Leadership>,
    cancel: CancellationToken,
) {
    let mut machine = Machine::new(&core_id, timing, Instant::now().into_std());
    let mut client: Option<Arc<Client>> = None;
    let mut query: Option<(Query, std::time::Instant)> = None;
    let mut input = Input::Tick;
    loop {
        let now = std::time::Instant::now();
        for effect in machine.step(std::mem::replace(&mut input, Input::Tick), now) {
            match effect {
                Effect::Query { renew } => {
                    let connection = client.clone();
                    query = Some((
                        Box::pin(ask(
                            connection,
                            url.clone(),
                            core_id.clone(),
                            renew,
                            timing.lease,
                        )),
                        now,
                    ));
                }
                Effect::Publish(leadership) => publish(&tx, leadership),
            }
        }
        let wake = machine.next_wake().map(Instant::from_std);
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            (answer, connection) = async { (&mut query.as_mut().expect("guarded").0).await }, if query.is_some() => {
                let (_, sent) = query.take().expect("guarded");
                client = connection;
                input = Input::Answered { answer, sent };
            }
            () = sleep_until(wake) => {}
        }
    }
    let lead = tx.borrow().clone();
    if lead.leading {
        publish(
            &tx,
            Leadership {
                leading: false,
                leader: None,
                problem: "this Core is shutting down".into(),
                ..lead.clone()
            },
        );
        if let Some(client) = client {
            let released = tokio::time::timeout(
                RELEASE_TIMEOUT,
                client.execute(RELEASE, &[&core_id, &(lead.term as i64)]),
            )
            .await;
            match released {
                Ok(Ok(_)) => info!(term = lead.term, "released the lease"),
                Ok(Err(e)) => warn!(error = %e, "releasing the lease"),
                Err(_) => warn!("releasing the lease: no answer within {RELEASE_TIMEOUT:?}"),
            }
        }
    }
}

fn publish(tx: &watch::Sender<Leadership>, leadership: Leadership) {
    let before = tx.borrow().clone();
    match (before.leading, leadership.leading) {
        (false, true) => info!(term = leadership.term, "leading"),
        (true, false) => warn!(
            term = leadership.term,
            leader = ?leadership.leader,
            problem = %leadership.problem,
            "no longer leading"
        ),
        _ if leadership.problem != before.problem && !leadership.problem.is_empty() => {
            warn!(problem = %leadership.problem, "the lease");
        }
        _ if leadership.leader != before.leader => {
            info!(leader = ?leadership.leader, term = leadership.term, "the lease is held by another Core");
        }
        _ => debug!(?leadership, "leadership"),
    }
    tx.send_replace(leadership);
}

async fn sleep_until(wake: Option<Instant>) {
    match wake {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// One lease query, connecting first if there is no connection. Gives
/// back the connection to keep (none after a failure: the next query
/// connects afresh).
async fn ask(
    client: Option<Arc<Client>>,
    url: String,
    core_id: String,
    renew: Option<u64>,
    lease: Duration,
) -> (Answer, Option<Arc<Client>>) {
    let work = async {
        let client = match client.filter(|c| !c.is_closed()) {
            Some(client) => client,
            None => connect(&url).await?,
        };
        let lease_ms = lease.as_millis() as i64;
        let row = match renew {
            None => client.query_one(ACQUIRE, &[&core_id, &lease_ms]).await,
            Some(term) => {
                client
                    .query_one(RENEW, &[&core_id, &(term as i64), &lease_ms])
                    .await
            }
        }
        .map_err(|e| format!("the lease query: {}", crate::error_chain(&e)))?;
        let term: i64 = row.get(0);
        let holder: String = row.get(1);
        let term = term as u64;
        let answer = if holder == core_id && renew.is_none_or(|asked| asked == term) {
            Answer::Held { term }
        } else {
            Answer::Other { holder, term }
        };
        Ok::<_, String>((answer, client))
    };
    match tokio::time::timeout(lease, work).await {
        Ok(Ok((answer, client))) => (answer, Some(client)),
        Ok(Err(problem)) => (Answer::Failed(problem), None),
        Err(_) => (
            Answer::Failed(format!("the database did not answer within {lease:?}")),
            None,
        ),
    }
}

async fn connect(url: &str) -> Result<Arc<Client>, String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| format!("connecting to the database: {}", crate::error_chain(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "the lease's database connection ended");
        }
    });
    Ok(Arc::new(client))
}
