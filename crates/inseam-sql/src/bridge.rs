//! Between the store and a transport: the publisher that hands the outbox rows of groups
//! running in other processes to a broker, and the consumer that takes a group's messages from
//! a broker into this process's store.
//!
//! Outbound, a transport is one more relay group (`transport:<name>`): an event bound for
//! groups in other processes gets one delivery row for the transport, which the publisher
//! claims like any other, in key order, and deletes once the broker acknowledged the message.
//! The bytes published are the outbox row's envelope, unchanged. A broker that refuses or does
//! not answer leaves the row waiting (backing off up to two seconds); it is never
//! dead-lettered for that, so an outage only grows the lag.
//!
//! Inbound, a consumer stages what it fetches: in one transaction, each message becomes an
//! outbox row (the bytes as received) and a delivery row for its group, unless the group
//! already has it (pending, in its inbox, or dead-lettered); only after that commit are the
//! messages acknowledged. From there the relay delivers them with every local guarantee:
//! the inbox, retries with backoff, dead letters in this database, per-key order. A transport
//! hands out a key's next message only once the previous one is settled, and a batch is staged
//! in the order fetched, so the deliveries keep the broker's order per key. Bytes that are not
//! an envelope become a dead letter at once, with the reason (decision 0017), as does an
//! envelope whose `type` or key has a NUL character on PostgreSQL (its text columns refuse
//! one, and the whole batch with it, at every redelivery).

use std::time::Duration;

use inseam_core::transport::{Incoming, Outgoing, Subscription, Transport, TransportError};
use inseam_core::{App, Inbound, RawEnvelope};
use sqlx::AssertSqlSafe;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{Context as _, Result};
use crate::relay::{BatchOutcome, Failure, claim, key_heads, record_failure};
use crate::sql::Backend;
use crate::store::{SqlStore, micros};

/// How long a consumer waits for messages before looking again (and at shutdown).
const FETCH_WAIT: Duration = Duration::from_millis(500);

/// Waits after a transport or the database failed, doubling up to two seconds.
fn pause(failures: u32) -> Duration {
    Duration::from_millis(100u64 << failures.min(5)).min(Duration::from_secs(2))
}

/// Publishes the rows of outbox group `group` to `transport` until cancelled.
pub(crate) async fn publisher(
    store: SqlStore,
    app: App,
    group: &'static str,
    transport: std::sync::Arc<dyn Transport>,
    cancel: CancellationToken,
) {
    let channels = app.outbound_channels(transport.name());
    let mut failures = 0;
    while let Err(error) = transport.provision(&channels).await {
        tracing::warn!(
            target: "inseam::relay",
            group,
            error = &error as &dyn std::error::Error,
            "could not prepare the transport's channels; trying again"
        );
        failures += 1;
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(pause(failures)) => {}
        }
    }
    let (store, transport) = (&store, &*transport);
    crate::relay::run_batches(
        store,
        group,
        &cancel,
        "publishing to the transport",
        move || publish_batch(store, transport, group),
    )
    .await;
}

#[tracing::instrument(
    target = "inseam::relay",
    name = "relay_publish",
    skip_all,
    fields(group, claimed)
)]
pub(crate) async fn publish_batch(
    store: &SqlStore,
    transport: &dyn Transport,
    group: &'static str,
) -> Result<BatchOutcome> {
    let shared = &store.shared;
    let mut unit = store.begin_unit().await?;
    let now = micros(shared.now());
    let rows = claim(&mut unit, group, now, shared.options.batch_size).await?;
    let rows = key_heads(&mut unit, group, rows, now).await?;
    tracing::Span::current().record("claimed", rows.len());
    if rows.is_empty() {
        unit.commit_unit().await.context("end a claim")?;
        return Ok(BatchOutcome {
            claimed: 0,
            retry_at: None,
        });
    }
    // PostgreSQL keeps the claim (row locks) while the broker answers, so that other relays
    // pass these rows by. SQLite's claim is its one write lock: let it go meanwhile; this
    // process's single publisher is the only one that takes these rows.
    let unit = match shared.backend {
        Backend::Sqlite => {
            unit.commit_unit().await.context("end a claim")?;
            None
        }
        Backend::Postgres => Some(unit),
    };
    let outgoing: Vec<Outgoing> = rows
        .iter()
        .map(|row| Outgoing {
            channel: row.name.clone(),
            message_id: Uuid::parse_str(&row.message_id).unwrap_or_else(|_| Uuid::nil()),
            key: row.key.clone(),
            headers: vec![
                ("ce-id".to_owned(), row.message_id.clone()),
                ("ce-type".to_owned(), row.name.clone()),
            ],
            payload: bytes::Bytes::from(row.envelope.clone()),
        })
        .collect();
    let outcomes = transport.publish(&outgoing).await;
    let mut unit = match unit {
        Some(unit) => unit,
        None => store.begin_unit().await?,
    };
    let now = micros(shared.now());
    let mut sent = Vec::new();
    let mut retry_at: Option<i64> = None;
    for (index, row) in rows.iter().enumerate() {
        match outcomes.get(index) {
            Some(Ok(())) => sent.push(row.id),
            Some(Err(error)) => {
                let failure = Failure::transport(error);
                if let Some(at) = record_failure(&mut unit, group, row, &failure, now).await? {
                    retry_at = Some(retry_at.map_or(at, |r: i64| r.min(at)));
                }
            }
            None => {
                let missing = TransportError::transient(
                    transport.name(),
                    format!("publish `{}`", row.name),
                    "the transport returned no outcome for this message",
                );
                let failure = Failure::transport(&missing);
                if let Some(at) = record_failure(&mut unit, group, row, &failure, now).await? {
                    retry_at = Some(retry_at.map_or(at, |r: i64| r.min(at)));
                }
            }
        }
    }
    if !sent.is_empty() {
        let ids = serde_json::to_string(&sent).unwrap_or_default();
        sqlx::query(AssertSqlSafe(shared.sql.delete_deliveries.clone()))
            .bind(ids)
            .execute(&mut unit.tx)
            .await
            .context("delete published rows")?;
    }
    unit.commit_unit()
        .await
        .context("commit what was published")?;
    store.shared.stats.published(sent.len());
    Ok(BatchOutcome {
        claimed: rows.len(),
        retry_at,
    })
}

/// Consumes `inbound`'s group from its transport into the store until cancelled.
pub(crate) async fn consumer(store: SqlStore, inbound: Inbound, cancel: CancellationToken) {
    let Inbound {
        group,
        channels,
        transport,
    } = inbound;
    let mut subscription = Subscription::new(group, channels.iter().cloned());
    subscription.ack_wait = store.shared.options.inbound_ack_wait;
    let mut failures = 0;
    let mut consumer = loop {
        let subscribed = async {
            transport.provision(&channels).await?;
            transport.subscribe(&subscription).await
        };
        match subscribed.await {
            Ok(consumer) => break consumer,
            Err(error) => {
                tracing::warn!(
                    target: "inseam::relay",
                    group,
                    transport = transport.name(),
                    error = &error as &dyn std::error::Error,
                    "could not subscribe to the transport; trying again"
                );
                failures += 1;
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(pause(failures)) => {}
                }
            }
        }
    };
    let batch_size = store.shared.options.batch_size.clamp(1, 256);
    failures = 0;
    loop {
        let fetched = tokio::select! {
            () = cancel.cancelled() => break,
            fetched = consumer.fetch(batch_size, FETCH_WAIT) => fetched,
        };
        let batch = match fetched {
            Ok(batch) if batch.is_empty() => continue,
            Ok(batch) => batch,
            Err(error) => {
                failures += 1;
                tracing::warn!(
                    target: "inseam::relay",
                    group,
                    transport = transport.name(),
                    error = &error as &dyn std::error::Error,
                    "fetching from the transport failed; trying again"
                );
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(pause(failures)) => {}
                }
                continue;
            }
        };
        match stage(&store, group, &batch).await {
            Ok(()) => {
                failures = 0;
                store.shared.wake();
                // Only now, with the messages committed here, does the broker let go of them.
                let acks = batch.iter().map(|message| message.ack());
                for (message, acked) in batch.iter().zip(futures_util::future::join_all(acks).await)
                {
                    if let Err(error) = acked {
                        // The broker hands it out again; the group has it already, and the
                        // staging skips it.
                        tracing::debug!(
                            target: "inseam::relay",
                            group,
                            channel = %message.channel,
                            error = &error as &dyn std::error::Error,
                            "an acknowledgement failed; the message will come again"
                        );
                    }
                }
            }
            Err(error) => {
                failures += 1;
                let delay = pause(failures);
                tracing::warn!(
                    target: "inseam::relay",
                    group,
                    transport = transport.name(),
                    messages = batch.len(),
                    error = &error as &dyn std::error::Error,
                    "could not keep received messages in the store; the broker will hand them out again"
                );
                let nacks = batch.iter().map(|message| message.nack(delay));
                futures_util::future::join_all(nacks).await;
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    tracing::debug!(target: "inseam::relay", group, "consumer stopped");
}

/// Writes `batch` into the store for `group`, in one transaction; see the module documentation.
async fn stage(store: &SqlStore, group: &'static str, batch: &[Incoming]) -> Result<()> {
    let shared = &store.shared;
    let mut unit = store.begin_unit().await?;
    let now = micros(shared.now());
    for message in batch {
        let read = RawEnvelope::from_json(&message.payload)
            .map_err(|error| crate::error::chain(&error))
            .and_then(|envelope| match unkeepable(shared.backend, &envelope) {
                Some(problem) => Err(problem),
                None => Ok(envelope),
            });
        match read {
            Ok(envelope) => {
                let message_id = envelope.metadata.message_id.to_string();
                sqlx::query(AssertSqlSafe(shared.sql.stage_outbox.clone()))
                    .bind(message_id.clone())
                    .bind(envelope.name.clone())
                    .bind(i64::from(envelope.version))
                    .bind(envelope.key.clone())
                    .bind(message.payload.to_vec())
                    .bind(now)
                    .bind(envelope.metadata.correlation_id.to_string())
                    .execute(&mut unit.tx)
                    .await
                    .context("keep a received message")?;
                sqlx::query(AssertSqlSafe(shared.sql.stage_delivery.clone()))
                    .bind(group.to_owned())
                    .bind(message_id)
                    .bind(envelope.key)
                    .bind(now)
                    .execute(&mut unit.tx)
                    .await
                    .context("queue a received message for its group")?;
            }
            Err(problem) => {
                // Not an envelope (or one the store cannot keep as received): nothing can
                // deliver it. Kept as a dead letter with the reason, where it can be inspected,
                // repaired and retried. Its text columns come from the broker: without NULs,
                // which PostgreSQL's text refuses (and the batch with it, at every redelivery).
                let message_id = message
                    .header("ce-id")
                    .and_then(|id| Uuid::parse_str(id).ok())
                    .unwrap_or_else(Uuid::now_v7)
                    .to_string();
                let name = message
                    .header("ce-type")
                    .unwrap_or(message.channel.as_str())
                    .replace('\0', "\u{fffd}");
                let key = message
                    .key
                    .as_ref()
                    .map(|key| key.replace('\0', "\u{fffd}"));
                let reason = format!(
                    "received from transport on `{}` (attempt {}): {problem}",
                    message.channel, message.attempt,
                )
                .replace('\0', "\u{fffd}");
                tracing::error!(
                    target: "inseam::relay",
                    group,
                    channel = %message.channel,
                    error = %reason,
                    "a received message is not an envelope; dead-lettered"
                );
                sqlx::query(AssertSqlSafe(shared.sql.insert_dead_letter.clone()))
                    .bind(group.to_owned())
                    .bind(message_id)
                    .bind(name)
                    .bind(0_i64)
                    .bind(key)
                    .bind(message.payload.to_vec())
                    .bind(reason)
                    .bind(i64::from(message.attempt))
                    .bind(now)
                    .bind(now)
                    .execute(&mut unit.tx)
                    .await
                    .context("dead-letter a received message")?;
            }
        }
    }
    unit.commit_unit()
        .await
        .context("commit received messages")?;
    Ok(())
}

/// Why the store cannot keep a received envelope as it is: on PostgreSQL, a NUL character in
/// its `type` or `partitionkey`, which go to text columns.
fn unkeepable(backend: Backend, envelope: &RawEnvelope) -> Option<String> {
    if backend != Backend::Postgres {
        return None;
    }
    let attribute = if envelope.name.contains('\0') {
        "type"
    } else if envelope
        .key
        .as_deref()
        .is_some_and(|key| key.contains('\0'))
    {
        "partitionkey"
    } else {
        return None;
    };
    Some(format!(
        "the envelope's `{attribute}` has a NUL character, which PostgreSQL cannot store in text"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(name: &str, key: Option<&str>) -> RawEnvelope {
        let wire = serde_json::json!({
            "specversion": "1.0",
            "id": "01937a5e-7c00-7000-8000-000000000001",
            "source": "test",
            "type": name,
            "typeversion": 1,
            "time": "2026-12-02T00:00:00Z",
            "partitionkey": key,
            "correlationid": "01937a5e-7c00-7000-8000-000000000001",
            "data": {"n": 1},
        });
        RawEnvelope::from_json(wire.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn nuls_in_text_columns_are_refused_on_postgres_only() {
        let fine = envelope("orders.placed", Some("k\n1"));
        assert_eq!(unkeepable(Backend::Postgres, &fine), None);
        assert_eq!(
            unkeepable(Backend::Postgres, &envelope("orders.placed", None)),
            None
        );

        let key = envelope("orders.placed", Some("a\0b"));
        let why = unkeepable(Backend::Postgres, &key).unwrap_or_default();
        assert!(why.contains("`partitionkey` has a NUL"), "{why}");
        let name = envelope("orders.\0placed", Some("k"));
        let why = unkeepable(Backend::Postgres, &name).unwrap_or_default();
        assert!(why.contains("`type` has a NUL"), "{why}");

        assert_eq!(unkeepable(Backend::Sqlite, &key), None);
        assert_eq!(unkeepable(Backend::Sqlite, &name), None);
    }
}
