//! Each Core's line in the roster: every second it writes its leadership
//! and how many of its links are up to `core_roster`, over a connection of
//! its own, so that any Core can list every Core sharing the database.
//! Standbys write here too: the roster is not Core's configuration, and
//! the lease fences only that.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::debug;

use super::Leadership;
use crate::links::Directory;

/// How often a Core writes its line.
pub const EVERY: Duration = Duration::from_secs(1);
/// A line older than this is a Core that is gone.
pub const STALE: Duration = Duration::from_secs(10);

const UPSERT: &str = "
    INSERT INTO core_roster (core_id, seen_at, term, leads, gateways_connected, gateways,
        edges_connected, edges)
    VALUES ($1, clock_timestamp(), $2, $3, $4, $5, $6, $7)
    ON CONFLICT (core_id) DO UPDATE SET seen_at = excluded.seen_at, term = excluded.term,
        leads = excluded.leads, gateways_connected = excluded.gateways_connected,
        gateways = excluded.gateways, edges_connected = excluded.edges_connected,
        edges = excluded.edges";

/// A stopped Core leaves the roster.
const LEAVE: &str = "DELETE FROM core_roster WHERE core_id = $1";

/// Starts the roster task; it stops (leaving the roster) on `cancel`.
pub fn spawn(
    url: String,
    core_id: String,
    leadership: watch::Receiver<Leadership>,
    directory: watch::Receiver<Arc<Directory>>,
    tracker: &TaskTracker,
    cancel: CancellationToken,
) {
    tracker.spawn(async move {
        let mut client: Option<Client> = None;
        let mut every = tokio::time::interval(EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = every.tick() => {}
            }
            let lead = leadership.borrow().clone();
            if lead.term == 0 {
                // Nothing to say before the lease has been read.
                continue;
            }
            let (gw_up, gw, edge_up, edge) = directory.borrow().counts();
            let line = async {
                if client.as_ref().is_none_or(Client::is_closed) {
                    client = Some(connect(&url).await?);
                }
                let c = client.as_ref().expect("connected above");
                let n = i64::from;
                c.execute(
                    UPSERT,
                    &[
                        &core_id,
                        &(lead.term as i64),
                        &lead.leading,
                        &n(gw_up),
                        &n(gw),
                        &n(edge_up),
                        &n(edge),
                    ],
                )
                .await
                .map_err(|e| crate::error_chain(&e))
            };
            match tokio::time::timeout(EVERY, line).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    debug!(error = %e, "writing this Core's roster line");
                    client = None;
                }
                Err(_) => {
                    debug!("writing this Core's roster line: no answer within {EVERY:?}");
                    client = None;
                }
            }
        }
        if let Some(client) = client {
            let _ = tokio::time::timeout(EVERY, client.execute(LEAVE, &[&core_id])).await;
        }
    });
}

async fn connect(url: &str) -> Result<Client, String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| crate::error_chain(&e))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}
