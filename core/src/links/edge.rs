//! One Edge link: Core sends Welcome, then answers each relayed client
//! request with a Reply of the same id. Requests are handled concurrently;
//! the link task owns the stream both ways.

use std::sync::Arc;

use tidegate_proto::edge::v1::{
    CoreMessage, Welcome, core_message, edge_client::EdgeClient, edge_message,
};
use tidegate_proto::limits::MAX_EDGE_MESSAGE_BYTES;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{LinkContext, LinkError, Reconnect, connect, ended, requests, status::EdgeState};
use crate::{
    leader::Leadership,
    now_ms,
    store::{EdgeTarget, EventKind},
};

/// The Welcome that says what this Core is, at its term.
fn welcome(ctx: &LinkContext, lead: &Leadership) -> CoreMessage {
    CoreMessage {
        term: lead.term,
        msg: Some(core_message::Msg::Welcome(Welcome {
            core_id: ctx.core_id.clone(),
            leading: lead.leading,
        })),
    }
}

/// Requests of one Edge handled at once; more wait their turn.
const CONCURRENT_REQUESTS: usize = 256;

/// The link task of one Edge, until `cancel`.
pub(super) async fn run(
    target: EdgeTarget,
    ctx: LinkContext,
    status: watch::Sender<EdgeState>,
    cancel: CancellationToken,
) {
    let mut reconnect = Reconnect::new(&ctx.settings());
    loop {
        reconnect.attempt();
        let result = session(&target, &ctx, &status, &cancel).await;
        let was_up = status.borrow().connected;
        let why = ended(&result);
        status.send_modify(|s| {
            if s.connected {
                s.since_ms = now_ms();
            }
            s.connected = false;
            s.link_error = why.clone();
        });
        if was_up {
            warn!(edge = %target.name, error = %why, "Edge link down");
            log(&ctx, EventKind::EdgeDisconnected, &target, why).await;
        } else {
            debug!(edge = %target.name, error = %why, "Edge not reached");
        }
        if result.is_ok() || !reconnect.pause(was_up, &cancel).await {
            return;
        }
    }
}

async fn log(ctx: &LinkContext, kind: EventKind, target: &EdgeTarget, message: String) {
    if !ctx.leadership.borrow().leading {
        // A standby writes nothing to the shared database.
        debug!(edge = %target.name, kind = kind.as_str(), %message, "a standby's event: not logged");
        return;
    }
    let subject = target.name.clone();
    if let Ok(Err(e)) = ctx
        .state
        .call(move |s| s.log_event(kind, "", &subject, &message, now_ms()))
        .await
    {
        warn!(error = %crate::error_chain(&e), "logging an event");
    }
}

async fn session(
    target: &EdgeTarget,
    ctx: &LinkContext,
    status: &watch::Sender<EdgeState>,
    cancel: &CancellationToken,
) -> Result<(), LinkError> {
    let channel = tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        channel = connect(&target.address, &target.identity, ctx) => channel?,
    };
    let mut client = EdgeClient::new(channel)
        .max_decoding_message_size(MAX_EDGE_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_EDGE_MESSAGE_BYTES);
    let (out, out_rx) = mpsc::channel::<CoreMessage>(CONCURRENT_REQUESTS);
    let Some((mut leadership, mut lead)) = super::with_a_term(ctx, cancel).await else {
        return Ok(());
    };
    out.send(welcome(ctx, &lead))
        .await
        .map_err(|_| LinkError::Closed)?;
    let timeout = ctx.settings().connect_timeout;
    let mut inbound = tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        response = tokio::time::timeout(timeout, client.link(ReceiverStream::new(out_rx))) => response
            .map_err(|_| LinkError::Timeout(format!("the Edge did not open the link within {timeout:?}")))?
            .map_err(LinkError::from)?
            .into_inner(),
    };
    let now = now_ms();
    status.send_modify(|s| {
        s.connected = true;
        s.since_ms = now;
        s.link_error.clear();
        s.requests = 0;
    });
    info!(edge = %target.name, "Edge link up");
    log(ctx, EventKind::EdgeConnected, target, "Welcome sent".into()).await;
    let permits = Arc::new(Semaphore::new(CONCURRENT_REQUESTS));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            Ok(()) = leadership.changed() => {
                lead = leadership.borrow_and_update().clone();
                out.send(welcome(ctx, &lead)).await.map_err(|_| LinkError::Closed)?;
            }
            message = inbound.message() => {
                let message = message.map_err(LinkError::from)?.ok_or(LinkError::Closed)?;
                let request = match message.msg {
                    Some(edge_message::Msg::Request(request)) => request,
                    Some(edge_message::Msg::Hello(hello)) => {
                        super::certificate_expiry("Edge", &target.name, hello.cert_not_after_unix_s);
                        status.send_modify(|s| s.cert_not_after_unix_s = hello.cert_not_after_unix_s);
                        continue;
                    }
                    None => continue,
                };
                let permit = tokio::select! {
                    () = cancel.cancelled() => return Ok(()),
                    permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                };
                let (out, ctx, status, term) = (out.clone(), ctx.clone(), status.clone(), lead.term);
                ctx.tracker.clone().spawn(async move {
                    let reply = requests::handle(request, &ctx).await;
                    status.send_modify(|s| s.requests += 1);
                    // A link that went down meanwhile loses this reply; the
                    // Edge answers its client with an error.
                    let _ = out
                        .send(CoreMessage {
                            term,
                            msg: Some(core_message::Msg::Reply(reply)),
                        })
                        .await;
                    drop(permit);
                });
            }
        }
    }
}
