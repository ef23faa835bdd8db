//! Client requests relayed by an Edge: config download with a one-time
//! token, enrolment (a token and the key the client made), MFA start and
//! finish. Each answer is a DeviceConfig, an
//! MfaChallenge or an Error with a code the Edge maps to an HTTP status.

use std::time::Duration;

use futures::future::join_all;
use tidegate_proto::edge::v1::{self as edge, reply, request};
use tracing::{info, warn};

use super::LinkContext;
use crate::{now_ms, store::ClientError};

/// Longest token, session or code a request may carry; anything longer is
/// malformed (and not worth looking up).
const FIELD_MAX: usize = 256;

/// Answers one request.
pub(crate) async fn handle(request: edge::Request, ctx: &LinkContext) -> edge::Reply {
    let id = request.id;
    let result = match request.kind {
        None => Err(ClientError::Invalid(
            "the request names nothing to do".into(),
        )),
        Some(kind) => {
            let wait = Duration::from_millis(u64::from(request.wait_ms));
            let login = matches!(kind, request::Kind::MfaFinish(_));
            let result = dispatch(kind, &request.client_addr, wait, ctx).await;
            if login {
                match &result {
                    Ok(_) => {
                        ctx.metrics.mfa_logins.inc();
                    }
                    Err(error) => ctx.metrics.mfa_failed(error),
                }
            }
            result
        }
    };
    let result = match result {
        Ok(result) => result,
        Err(error) => {
            let retry_after_s = match &error {
                ClientError::Limited { retry_after_s, .. } => *retry_after_s,
                _ => 0,
            };
            let code = match &error {
                ClientError::Invalid(_) => edge::error::Code::Invalid,
                ClientError::Unauthorized(_) => edge::error::Code::Unauthorized,
                ClientError::NotFound(_) => edge::error::Code::NotFound,
                ClientError::Expired(_) => edge::error::Code::Expired,
                ClientError::Conflict(_) => edge::error::Code::Conflict,
                ClientError::Unavailable(_) => edge::error::Code::Unavailable,
                ClientError::Limited { .. } => edge::error::Code::Limited,
                ClientError::Internal(e) => {
                    warn!(error = %crate::error_chain(e), "a client request failed inside Core");
                    edge::error::Code::Internal
                }
            };
            reply::Result::Error(edge::Error {
                code: code.into(),
                message: error.to_string(),
                retry_after_s,
            })
        }
    };
    edge::Reply {
        id,
        result: Some(result),
    }
}

fn check_len(field: &str, value: &str) -> Result<(), ClientError> {
    if value.len() > FIELD_MAX {
        return Err(ClientError::Invalid(format!(
            "{field}: {} bytes, at most {FIELD_MAX}",
            value.len()
        )));
    }
    Ok(())
}

fn gone<T>(_: T) -> ClientError {
    ClientError::Unavailable("Core is shutting down".into())
}

/// Time kept back from the Edge's wait, for the reply to reach it.
const REPLY_MARGIN: Duration = Duration::from_secs(1);
/// The shortest wait for gateways an Edge must allow an MFA login.
const MIN_APPLY_WAIT: Duration = Duration::from_secs(1);

/// How long an MFA login waits for its peer to be applied: Core's own
/// limit, cut to end a margin before the Edge stops waiting (`edge_wait`,
/// zero when it does not say). `None` when the Edge allows too little.
pub(crate) fn apply_wait(own: Duration, edge_wait: Duration) -> Option<Duration> {
    if edge_wait.is_zero() {
        return Some(own);
    }
    let wait = own.min(edge_wait.saturating_sub(REPLY_MARGIN));
    (wait >= MIN_APPLY_WAIT).then_some(wait)
}

/// How long an enrolment that made a peer waits for the gateways to apply
/// it: as a login, when a gateway of the location is `linked`; `None`:
/// answer at once (no gateway to wait for, or the Edge allows too little).
pub(crate) fn enrol_wait(linked: bool, own: Duration, edge_wait: Duration) -> Option<Duration> {
    if !linked {
        return None;
    }
    apply_wait(own, edge_wait)
}

async fn dispatch(
    kind: request::Kind,
    client: &str,
    edge_wait: Duration,
    ctx: &LinkContext,
) -> Result<reply::Result, ClientError> {
    match kind {
        request::Kind::Config(download) => {
            check_len("token", &download.token)?;
            let config = ctx
                .state
                .call(move |s| s.redeem_token(&download.token, now_ms()))
                .await
                .map_err(gone)??;
            info!(device = %config.device, client, "device config downloaded");
            Ok(reply::Result::Config(config))
        }
        request::Kind::Enrol(enrol) => {
            check_len("token", &enrol.token)?;
            check_len("public_key", &enrol.public_key)?;
            let enrolled = ctx
                .state
                .call(move |s| s.enrol(&enrol.token, &enrol.public_key, now_ms()))
                .await
                .map_err(gone)??;
            // The client's first handshake works once the gateways have
            // the peer; without them (none linked, too slow) the config is
            // answered still: the peer reaches them when they link.
            let location = enrolled.location_id;
            let linked = ctx.directory.borrow().any_connected(location);
            if let Some(version) = enrolled.peer_version
                && let Some(wait) = enrol_wait(linked, ctx.settings().mfa_apply_timeout, edge_wait)
                && let Err(error) = wait_applied(ctx, location, version, wait).await
            {
                warn!(
                    device = %enrolled.config.device,
                    %error,
                    "enrolled; the gateways have not applied the peer yet"
                );
            }
            if enrolled.new_key {
                info!(device = %enrolled.config.device, client, "device enrolled");
            } else if enrolled.retry {
                info!(device = %enrolled.config.device, client, "device config answered again (an enrolment retried with its key)");
            } else {
                info!(device = %enrolled.config.device, client, "device config downloaded (enrolled with this key already)");
            }
            Ok(reply::Result::Config(enrolled.config))
        }
        request::Kind::MfaStart(start) => {
            check_len("location", &start.location)?;
            check_len("public_key", &start.public_key)?;
            let from = client.to_owned();
            let challenge = ctx
                .state
                .call(move |s| s.mfa_start(&start.location, &start.public_key, &from, now_ms()))
                .await
                .map_err(gone)??;
            Ok(reply::Result::Challenge(challenge))
        }
        request::Kind::MfaFinish(finish) => {
            check_len("session", &finish.session)?;
            check_len("code", &finish.code)?;
            // Refused before the code is used when the Edge would give up
            // before the gateways could apply the login.
            let wait =
                apply_wait(ctx.settings().mfa_apply_timeout, edge_wait).ok_or_else(|| {
                    ClientError::Unavailable(format!(
                        "the Edge waits {} ms for Core, too little for an MFA login; \
                     raise its core_timeout_ms",
                        edge_wait.as_millis()
                    ))
                })?;
            let session = finish.session.clone();
            let location = ctx
                .state
                .call(move |s| s.mfa_location(&session, now_ms()))
                .await
                .map_err(gone)??;
            // Refuse before the code is used when no gateway can take the
            // peer: the client may try again with the same code.
            if !ctx.directory.borrow().any_connected(location) {
                return Err(ClientError::Unavailable(
                    "no gateway of the location is reachable; try again shortly".into(),
                ));
            }
            let from = client.to_owned();
            let login = ctx
                .state
                .call(move |s| s.mfa_finish(&finish.session, &finish.code, &from, now_ms()))
                .await
                .map_err(gone)??;
            wait_applied(ctx, login.location_id, login.version, wait).await?;
            info!(device = %login.config.device, client, "MFA login");
            Ok(reply::Result::Config(login.config))
        }
    }
}

/// Waits until every connected gateway of the location has applied
/// `version` (a gateway whose link drops meanwhile is not waited for; it
/// gets the config when it is back). At least one must apply it.
async fn wait_applied(
    ctx: &LinkContext,
    location_id: u32,
    version: u64,
    timeout: Duration,
) -> Result<(), ClientError> {
    let gateways: Vec<_> = ctx
        .directory
        .borrow()
        .location(location_id)
        .map(|g| (g.target.name.clone(), g.state.clone()))
        .collect();
    let waits = gateways.into_iter().map(|(name, mut state)| async move {
        loop {
            {
                let s = state.borrow_and_update();
                if !s.connected {
                    return Ok(false);
                }
                if s.has_applied(version) {
                    return Ok(true);
                }
                if let Some(error) = s.refused_since(version) {
                    return Err(format!("gateway {name} refused the peer: {error}"));
                }
            }
            if state.changed().await.is_err() {
                return Ok(false);
            }
        }
    });
    let results = tokio::time::timeout(timeout, join_all(waits))
        .await
        .map_err(|_| {
            ClientError::Unavailable(format!(
                "the location's gateways did not apply the login within {timeout:?}; try again"
            ))
        })?;
    let mut applied = 0;
    for result in results {
        match result {
            Ok(true) => applied += 1,
            Ok(false) => {}
            Err(error) => return Err(ClientError::Unavailable(error)),
        }
    }
    if applied == 0 {
        return Err(ClientError::Unavailable(
            "no gateway of the location is reachable; try again shortly".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_mfa_login_waits_for_gateways_less_than_the_edge_waits_for_core() {
        let s = Duration::from_secs;
        for (own, edge, want) in [
            (s(10), Duration::ZERO, Some(s(10))),
            (s(10), s(15), Some(s(10))),
            // Core would wait as long as the Edge: it answers a second
            // before.
            (s(10), s(10), Some(s(9))),
            (s(10), s(3), Some(s(2))),
            (s(10), Duration::from_millis(1_999), None),
            (s(10), s(1), None),
        ] {
            assert_eq!(apply_wait(own, edge), want, "own {own:?}, edge {edge:?}");
        }
    }

    #[test]
    fn an_enrolment_waits_for_linked_gateways_only_and_never_fails_for_them() {
        let s = Duration::from_secs;
        for (linked, edge, want) in [
            (true, Duration::ZERO, Some(s(10))),
            (true, s(5), Some(s(4))),
            // The Edge allows too little: answer at once, not refuse.
            (true, s(1), None),
            (false, Duration::ZERO, None),
            (false, s(30), None),
        ] {
            assert_eq!(
                enrol_wait(linked, s(10), edge),
                want,
                "linked {linked}, edge {edge:?}"
            );
        }
    }
}
