//! Between the store and a transport: the publisher that hands the outbox rows of groups
//! running in other processes to a broker, and the consumer that takes a group's messages from
//! a broker into this process's store.
//!
//! Outbound, a transport is one more relay group (`transport:<name>`). Its publisher reads the
//! outbox by position like the local groups (decision 0024; decision 0026 for what differs):
//! a batch of the rows that list the transport, published, and the cursor moved past it once
//! the broker acknowledged what it took. What the broker did not take becomes a delivery row,
//! as does every later message of its key, and the publisher claims those rows like any other
//! relay group, in key order, deleting each once the broker acknowledged it (scheduled
//! messages, and every message when the store does not read by position, are rows from the
//! start). The bytes published are the outbox row's envelope, unchanged. A broker that
//! refuses or does not answer leaves the row waiting (backing off up to two seconds); it is
//! never dead-lettered for that, so an outage only grows the lag.
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

use std::collections::HashSet;
use std::time::{Duration, Instant};

use inseam_core::transport::{Incoming, Outgoing, Subscription, Transport, TransportError};
use inseam_core::{App, Inbound, RawEnvelope};
use sqlx::AssertSqlSafe;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{Context as _, Result};
use crate::relay::{BatchOutcome, Claimed, Failure, claim, key_heads, record_failure};
use crate::sql::Backend;
use crate::store::{SqlStore, SqlUnitOfWork, micros};

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
    let publisher = tokio::sync::Mutex::new(Publisher::new(&store, &*transport, group));
    crate::relay::run_batches(
        &store,
        group,
        &cancel,
        "publishing to the transport",
        || async { publisher.lock().await.step().await },
    )
    .await;
    if let Err(error) = publisher.into_inner().flush().await {
        tracing::warn!(
            target: "inseam::relay",
            group,
            error = &error as &dyn std::error::Error,
            "could not record the last batch published; its rows will be published again"
        );
    }
}

/// How long a SQLite publisher claims past its rows in flight before it claims from the
/// start of the group again, to take rows below them that came due (a retry).
const FROM_THE_START: Duration = Duration::from_secs(1);

/// Publishes a relay group's rows to a transport, batch after batch, claiming the next
/// batch and recording the previous one while the broker takes the current one.
///
/// A step publishes one batch (N). Meanwhile it writes down what became of batch N-1
/// (deletes the rows the broker took, schedules retries of the others) and, when N was
/// full, claims batch N+1. So the broker is always busy and the SQL runs beside it, not
/// between publishes.
///
/// Per-key order holds as with one batch at a time: batches are published one after the
/// other, each in id order; N+1 is claimed past N's rows (SQLite: above N's last id, since
/// its claim marks nothing and this process's publisher is the only one; PostgreSQL: N's rows
/// are locked by its claim, and count as this relay's own in the per-key check), and once N's
/// outcomes are known, N+1 drops the rows of every key the broker failed to take in N, which
/// wait behind that failure as they would have been held back by the claim.
pub(crate) struct Publisher<'a> {
    store: &'a SqlStore,
    transport: &'a dyn Transport,
    group: &'static str,
    /// Claimed while the previous batch was being published: the next to publish.
    claimed: Option<Batch>,
    /// Published, its outcomes not yet recorded.
    published: Option<Published>,
    /// When this publisher last claimed from the start of the group (SQLite).
    from_start_at: Instant,
    /// Reads past a PostgreSQL window held back by a running transaction at once.
    eager: bool,
}

/// Claimed rows and, on PostgreSQL, the transaction holding their locks.
struct Batch {
    rows: Vec<Claimed>,
    unit: Option<SqlUnitOfWork>,
}

/// A batch the transport answered for, one outcome per row.
struct Published {
    batch: Batch,
    outcomes: Vec<std::result::Result<(), TransportError>>,
}

impl<'a> Publisher<'a> {
    pub(crate) fn new(
        store: &'a SqlStore,
        transport: &'a dyn Transport,
        group: &'static str,
    ) -> Self {
        Publisher {
            store,
            transport,
            group,
            claimed: None,
            published: None,
            from_start_at: Instant::now(),
            eager: false,
        }
    }

    /// Reads past a PostgreSQL window held back by a running transaction at once (what
    /// `deliver_due` wants), rather than after a moment.
    pub(crate) fn eager(mut self) -> Self {
        self.eager = true;
        self
    }

    /// Publishes the next batch read by position (decision 0026), then the next batch of
    /// delivery rows: the messages the broker did not take at once, those of the keys waiting
    /// behind them, and scheduled messages. Both kinds are read whatever
    /// [`RelayOptions::read_by_position`](crate::RelayOptions::read_by_position) says, since the
    /// rows written before a change of the setting are of the other kind.
    pub(crate) async fn step(&mut self) -> Result<BatchOutcome> {
        let read =
            crate::position::publish_batch(self.store, self.transport, self.group, self.eager)
                .await?;
        let rows = self.step_rows().await?;
        Ok(read.and(rows))
    }

    /// Publishes the next batch of rows; see the type. `claimed` is the size of that batch, and
    /// `retry_at` the earliest retry scheduled by the batch recorded meanwhile.
    #[tracing::instrument(
        target = "inseam::relay",
        name = "relay_publish",
        skip_all,
        fields(group = self.group, claimed)
    )]
    async fn step_rows(&mut self) -> Result<BatchOutcome> {
        let mut retry_at = None;
        let batch = match self.claimed.take() {
            Some(batch) if !batch.rows.is_empty() => batch,
            ahead => {
                if let Some(empty) = ahead {
                    empty.end().await?;
                }
                retry_at = self.flush().await?;
                let batch = self.claim_from_start().await?;
                if batch.rows.is_empty() {
                    batch.end().await?;
                    return Ok(BatchOutcome {
                        claimed: 0,
                        full: false,
                        retry_at,
                        held_back: None,
                    });
                }
                batch
            }
        };
        let claimed = batch.rows.len();
        tracing::Span::current().record("claimed", claimed);
        // Claim ahead only behind a full batch: a short one means the group is drained, and
        // its rows are recorded at once rather than left waiting for a next step.
        let ahead = claimed >= self.store.shared.options.batch_size;
        let messages = outgoing(&batch.rows);
        let previous = self.published.take();
        let (outcomes, meanwhile) = tokio::join!(self.transport.publish(&messages), async {
            let retry_at = match previous {
                Some(previous) => self.record(previous).await?,
                None => None,
            };
            let next = if ahead {
                self.claim_ahead(&batch.rows).await?
            } else {
                None
            };
            Ok::<_, crate::error::Error>((retry_at, next))
        });
        let (recorded_retry, next) = meanwhile?;
        retry_at = earliest(retry_at, recorded_retry);
        let published = Published { batch, outcomes };
        match next {
            Some(mut next) => {
                published.hold_back_failed_keys(&mut next.rows);
                self.claimed = Some(next);
                self.published = Some(published);
            }
            None => retry_at = earliest(retry_at, self.record(published).await?),
        }
        Ok(BatchOutcome {
            claimed,
            full: false,
            retry_at,
            held_back: None,
        })
    }

    /// Records the batch published last, if any; returns the earliest retry it scheduled.
    /// A batch claimed ahead is let go (its rows stay pending).
    pub(crate) async fn flush(&mut self) -> Result<Option<i64>> {
        if let Some(ahead) = self.claimed.take() {
            ahead.end().await?;
        }
        match self.published.take() {
            Some(published) => self.record(published).await,
            None => Ok(None),
        }
    }

    async fn claim_from_start(&mut self) -> Result<Batch> {
        self.from_start_at = Instant::now();
        self.claim(None).await
    }

    /// Claims the batch after `in_flight`, the one being published; `None` on SQLite once
    /// [`FROM_THE_START`] passed since the last claim from the start, so that rows below the
    /// ones in flight that came due since (a retry) are not passed by for long.
    async fn claim_ahead(&self, in_flight: &[Claimed]) -> Result<Option<Batch>> {
        if self.store.shared.backend == Backend::Sqlite
            && self.from_start_at.elapsed() >= FROM_THE_START
        {
            return Ok(None);
        }
        self.claim(Some(in_flight)).await.map(Some)
    }

    /// Claims a batch: from the start of the group, or past `in_flight`.
    async fn claim(&self, in_flight: Option<&[Claimed]>) -> Result<Batch> {
        let shared = &self.store.shared;
        let mut unit = self.store.begin_unit().await?;
        let now = micros(shared.now());
        let ours: Vec<i64> = in_flight.unwrap_or_default().iter().map(|r| r.id).collect();
        // SQLite's claim marks nothing: it starts past the rows in flight. PostgreSQL's
        // skips them, locked by their claim.
        let after = match shared.backend {
            Backend::Sqlite => ours.iter().copied().max().unwrap_or(0),
            Backend::Postgres => 0,
        };
        let rows = claim(&mut unit, self.group, now, shared.options.batch_size, after).await?;
        let rows = key_heads(&mut unit, self.group, rows, &ours, now).await?;
        // PostgreSQL keeps the claim (row locks) while the broker answers, so that other
        // relays pass these rows by. SQLite's claim is its one write lock: let it go
        // meanwhile; this process's single publisher is the only one that takes these rows.
        let unit = match shared.backend {
            Backend::Sqlite => {
                unit.commit_unit().await.context("end a claim")?;
                None
            }
            Backend::Postgres => Some(unit),
        };
        Ok(Batch { rows, unit })
    }

    /// Writes down what the broker did with a batch: deletes the rows it took, schedules a
    /// retry of the others (never a dead letter for a broker that did not answer). Returns
    /// the earliest retry.
    async fn record(&self, published: Published) -> Result<Option<i64>> {
        let Published { batch, outcomes } = published;
        let store = self.store;
        let shared = &store.shared;
        let mut unit = match batch.unit {
            Some(unit) => unit,
            None => store.begin_unit().await?,
        };
        let now = micros(shared.now());
        let mut sent = Vec::new();
        let mut retry_at: Option<i64> = None;
        for (index, row) in batch.rows.iter().enumerate() {
            let missing;
            let error = match outcomes.get(index) {
                Some(Ok(())) => {
                    sent.push(row.id);
                    continue;
                }
                Some(Err(error)) => error,
                None => {
                    missing = TransportError::transient(
                        self.transport.name(),
                        format!("publish `{}`", row.name),
                        "the transport returned no outcome for this message",
                    );
                    &missing
                }
            };
            let failure = Failure::transport(error);
            let at = record_failure(&mut unit, self.group, row, &failure, now).await?;
            retry_at = earliest(retry_at, at);
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
        shared.stats.published(sent.len());
        crate::metrics::published(self.transport.name(), sent.len());
        Ok(retry_at)
    }
}

impl Batch {
    /// Lets the claim go without publishing (PostgreSQL: ends its transaction).
    async fn end(self) -> Result<()> {
        match self.unit {
            Some(unit) => unit.commit_unit().await.context("end a claim"),
            None => Ok(()),
        }
    }
}

impl Published {
    /// Drops from `rows`, claimed after this batch, those of every key of which the broker
    /// did not take a message here: they must not overtake it.
    fn hold_back_failed_keys(&self, rows: &mut Vec<Claimed>) {
        let failed: HashSet<&str> = self
            .batch
            .rows
            .iter()
            .enumerate()
            .filter(|(index, _)| !matches!(self.outcomes.get(*index), Some(Ok(()))))
            .filter_map(|(_, row)| row.key.as_deref())
            .collect();
        if !failed.is_empty() {
            rows.retain(|row| row.key.as_deref().is_none_or(|key| !failed.contains(key)));
        }
    }
}

/// The messages of claimed rows: each row's envelope bytes, unchanged.
pub(crate) fn outgoing<'r>(rows: impl IntoIterator<Item = &'r Claimed>) -> Vec<Outgoing> {
    rows.into_iter()
        .map(|row| Outgoing {
            channel: row.name.clone(),
            message_id: Uuid::parse_str(&row.message_id).unwrap_or_else(|_| Uuid::nil()),
            key: row.key.clone(),
            headers: vec![
                ("ce-id".to_owned(), row.message_id.clone()),
                ("ce-type".to_owned(), row.name.clone()),
            ],
            payload: row.envelope.clone(),
        })
        .collect()
}

fn earliest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
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
                crate::metrics::consumed(transport.name(), group, batch.len());
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
