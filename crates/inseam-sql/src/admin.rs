//! Operating the store: lag, retention and dead letters.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use inseam_core::Event as _;
use inseam_core::saga::{SagaTimeout, TIMEOUT_AFTER_COMPLETION};
use sqlx::{AssertSqlSafe, Row as _};
use uuid::Uuid;

use crate::error::{Context as _, Error, Result};
use crate::relay::RelayStats;
use crate::store::{SqlStore, from_micros, micros};

/// How far one group is behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLag {
    /// The group.
    pub group: String,
    /// Deliveries waiting (due, scheduled or retrying).
    pub pending: i64,
    /// How long the oldest waiting delivery has been waiting.
    pub oldest_age: Option<Duration>,
}

/// The store's backlog: per group, and the dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lag {
    /// Every group with waiting deliveries, sorted by name.
    pub groups: Vec<GroupLag>,
    /// Dead letters waiting to be inspected.
    pub dead_letters: i64,
}

/// What one retention pass deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pruned {
    /// Outbox rows delivered to every group and older than the retention.
    pub outbox: u64,
    /// Inbox rows older than the inbox retention.
    pub inbox: u64,
}

/// A message that could not be delivered to a group: what it was, why, and how often it was
/// tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The dead letter's id, for retry and discard.
    pub id: i64,
    /// The group it was bound for.
    pub group: String,
    /// The message id (as stored; a malformed envelope may hold a malformed id).
    pub message_id: String,
    /// The event's name.
    pub name: String,
    /// The event's version.
    pub version: i64,
    /// The ordering key.
    pub key: Option<String>,
    /// The envelope in its wire form (CloudEvents JSON).
    pub envelope: Vec<u8>,
    /// The error and its causes, outermost first, joined with `: `.
    pub error: String,
    /// Attempts made.
    pub attempts: i64,
    /// When the first attempt failed.
    pub first_failed_at: DateTime<Utc>,
    /// When the last attempt failed.
    pub last_failed_at: DateTime<Utc>,
}

impl DeadLetter {
    fn from_row(row: &sqlx::any::AnyRow) -> Result<Self, sqlx::Error> {
        Ok(DeadLetter {
            id: row.try_get(0)?,
            group: row.try_get(1)?,
            message_id: row.try_get(2)?,
            name: row.try_get(3)?,
            version: row.try_get(4)?,
            key: row.try_get(5)?,
            envelope: row.try_get(6)?,
            error: row.try_get(7)?,
            attempts: row.try_get(8)?,
            first_failed_at: from_micros(row.try_get(9)?),
            last_failed_at: from_micros(row.try_get(10)?),
        })
    }

    /// The message id as a UUID, when it is one.
    pub fn message_uuid(&self) -> Option<Uuid> {
        self.message_id.parse().ok()
    }
}

impl SqlStore {
    /// What the relay did since this store connected.
    pub fn relay_stats(&self) -> RelayStats {
        self.shared.stats.snapshot()
    }

    /// The backlog per group and the dead letter depth.
    pub async fn lag(&self) -> Result<Lag> {
        let sql = &self.shared.sql;
        let now = micros(self.shared.now());
        let rows = sqlx::query(AssertSqlSafe(sql.lag.clone()))
            .fetch_all(&self.shared.pool)
            .await
            .context("read the lag")?;
        // Delivery rows, then what the groups reading by position have not read yet.
        let by_position = sqlx::query(AssertSqlSafe(sql.lag_by_position.clone()))
            .fetch_all(&self.shared.pool)
            .await
            .context("read the lag")?;
        let mut merged: std::collections::BTreeMap<String, (i64, Option<i64>)> =
            std::collections::BTreeMap::new();
        for row in rows.iter().chain(&by_position) {
            let group: String = row.try_get(0).context("read the lag")?;
            let pending: i64 = row.try_get(1).context("read the lag")?;
            let oldest: Option<i64> = row.try_get(2).context("read the lag")?;
            if pending == 0 {
                continue;
            }
            let entry = merged.entry(group).or_insert((0, None));
            entry.0 += pending;
            entry.1 = match (entry.1, oldest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let groups = merged
            .into_iter()
            .map(|(group, (pending, oldest))| GroupLag {
                group,
                pending,
                oldest_age: oldest
                    .map(|t| Duration::from_micros(u64::try_from(now - t).unwrap_or_default())),
            })
            .collect();
        let dead_letters = sqlx::query(AssertSqlSafe(sql.dead_letter_depth.clone()))
            .fetch_one(&self.shared.pool)
            .await
            .and_then(|r| r.try_get(0))
            .context("count the dead letters")?;
        Ok(Lag {
            groups,
            dead_letters,
        })
    }

    /// The dead letters waiting per group, sorted by group (groups without any are left out).
    pub async fn dead_letter_depths(&self) -> Result<Vec<(String, i64)>> {
        let sql = format!(
            "SELECT grp, COUNT(*) FROM {}dead_letters GROUP BY grp ORDER BY grp",
            self.shared.sql.prefix
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.shared.pool)
            .await
            .context("count the dead letters per group")?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .context("count the dead letters per group")
    }

    /// Samples the backlog into gauges of the [`metrics`](crate::metrics) facade, per group:
    /// `inseam_lag_messages` (deliveries waiting), `inseam_lag_oldest_seconds` (the oldest
    /// one's age) and `inseam_dead_letter_depth`. Every group of `app` gets all three, `0`
    /// when it has nothing waiting, so a gauge falls back once its backlog is gone. Call it
    /// when metrics are scraped, or from a periodic task.
    pub async fn record_gauges(&self, app: &inseam_core::App) -> Result<Lag> {
        let lag = self.lag().await?;
        let depths = self.dead_letter_depths().await?;
        let mut groups: Vec<String> = app.groups().iter().map(|g| (*g).to_owned()).collect();
        groups.extend(lag.groups.iter().map(|g| g.group.clone()));
        groups.extend(depths.iter().map(|(g, _)| g.clone()));
        groups.sort_unstable();
        groups.dedup();
        for group in groups {
            let waiting = lag.groups.iter().find(|g| g.group == group);
            let depth = depths
                .iter()
                .find(|(g, _)| *g == group)
                .map_or(0, |(_, n)| *n);
            crate::metrics::backlog(
                group,
                waiting.map_or(0, |g| g.pending),
                waiting.and_then(|g| g.oldest_age),
                depth,
            );
        }
        Ok(lag)
    }

    /// Deletes what the retention policy lets go: outbox rows delivered to every group and
    /// older than `outbox_retention`, inbox rows older than `inbox_retention`.
    pub async fn prune(&self) -> Result<Pruned> {
        let options = &self.shared.options;
        self.prune_older_than(options.outbox_retention, options.inbox_retention)
            .await
    }

    /// [`prune`](Self::prune) with other retentions than the store's options: outbox rows
    /// delivered to every group and older than `outbox`, inbox rows older than `inbox`. A
    /// stream's events are kept whatever `outbox` says; an inbox shorter than the time a
    /// message may be redelivered in lets that redelivery run again.
    pub async fn prune_older_than(&self, outbox: Duration, inbox: Duration) -> Result<Pruned> {
        let now = self.shared.now();
        let before =
            |keep: Duration| micros(now) - i64::try_from(keep.as_micros()).unwrap_or(i64::MAX / 2);
        let sql = &self.shared.sql;
        let outbox = sqlx::query(AssertSqlSafe(sql.prune_outbox.clone()))
            .bind(before(outbox))
            .execute(&self.shared.pool)
            .await
            .context("prune the outbox")?
            .rows_affected();
        let inbox = sqlx::query(AssertSqlSafe(sql.prune_inbox.clone()))
            .bind(before(inbox))
            .execute(&self.shared.pool)
            .await
            .context("prune the inbox")?
            .rows_affected();
        Ok(Pruned { outbox, inbox })
    }

    /// Dead letters in id order, after `after` (0 for the first page), at most `limit`.
    pub async fn dead_letters(&self, after: i64, limit: i64) -> Result<Vec<DeadLetter>> {
        let rows = sqlx::query(AssertSqlSafe(self.shared.sql.list_dead_letters.clone()))
            .bind(after)
            .bind(limit)
            .fetch_all(&self.shared.pool)
            .await
            .context("list dead letters")?;
        rows.iter()
            .map(DeadLetter::from_row)
            .collect::<Result<_, _>>()
            .context("read dead letters")
    }

    /// One dead letter.
    pub async fn dead_letter(&self, id: i64) -> Result<DeadLetter> {
        let row = sqlx::query(AssertSqlSafe(self.shared.sql.get_dead_letter.clone()))
            .bind(id)
            .fetch_optional(&self.shared.pool)
            .await
            .context("read a dead letter")?
            .ok_or(Error::DeadLetterNotFound { id })?;
        DeadLetter::from_row(&row).context("read a dead letter")
    }

    /// The dead letters of the message `message_id` (one per group that gave up on it).
    pub async fn dead_letters_of(&self, message_id: Uuid) -> Result<Vec<DeadLetter>> {
        let p = &self.shared.sql.prefix;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT id, grp, message_id, name, version, msg_key, envelope, error, attempts, first_failed_at, last_failed_at
             FROM {p}dead_letters WHERE message_id = $1 ORDER BY id"
        )))
        .bind(message_id.to_string())
        .fetch_all(&self.shared.pool)
        .await
        .context("find a message's dead letters")?;
        rows.iter()
            .map(DeadLetter::from_row)
            .collect::<Result<_, _>>()
            .context("read dead letters")
    }

    /// The correlation id of the flow the message `message_id` belongs to, when the outbox
    /// still holds the message (`None` when it never did or the retention pruned it).
    pub async fn correlation_of(&self, message_id: Uuid) -> Result<Option<Uuid>> {
        let p = &self.shared.sql.prefix;
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT correlation_id FROM {p}outbox WHERE message_id = $1"
        )))
        .bind(message_id.to_string())
        .fetch_optional(&self.shared.pool)
        .await
        .context("find a message")?;
        let Some(row) = row else {
            return Ok(None);
        };
        let correlation: Option<String> = row.try_get(0).context("find a message")?;
        Ok(correlation.and_then(|c| c.parse().ok()))
    }

    /// Puts a dead letter back in its group's queue, due now, with a fresh attempt count.
    ///
    /// The message is delivered as the dead letter holds it (as [`repair_dead_letter`]
    /// left it), not as the outbox row holds it: the new delivery carries its own copy of
    /// the envelope, and the outbox row, which other groups and the event store share, stays
    /// as it was written. It joins the end of its key's queue in the group. The group's inbox
    /// still guards against a second delivery of the message.
    ///
    /// Deleting the dead letter decides: of two concurrent retries (or a retry and a
    /// discard) of one id, exactly one succeeds and the other gets
    /// [`Error::DeadLetterNotFound`].
    ///
    /// [`repair_dead_letter`]: SqlStore::repair_dead_letter
    pub async fn retry_dead_letter(&self, id: i64) -> Result<()> {
        let shared = &self.shared;
        let (mut tx, _turn) = shared.begin().await?;
        let taken = sqlx::query(AssertSqlSafe(shared.sql.take_dead_letter.clone()))
            .bind(id)
            .fetch_all(&mut tx)
            .await
            .context("take a dead letter")?;
        let Some(row) = taken.first() else {
            tx.rollback().await.context("end a dead letter retry")?;
            return Err(Error::DeadLetterNotFound { id });
        };
        let letter = DeadLetter::from_row(row).context("read a dead letter")?;
        let now = micros(self.shared.now());
        // The flow the message belongs to, when its envelope can be read (a malformed one
        // is retried all the same, and fails again with the same error).
        let correlation = inseam_core::RawEnvelope::from_json(&letter.envelope)
            .ok()
            .map(|envelope| envelope.metadata.correlation_id.to_string());
        // The delivery joins its outbox row, which the retention may have pruned meanwhile.
        sqlx::query(AssertSqlSafe(shared.sql.restore_outbox.clone()))
            .bind(letter.message_id.clone())
            .bind(letter.name.clone())
            .bind(letter.version)
            .bind(letter.key.clone())
            .bind(letter.envelope.clone())
            .bind(now)
            .bind(correlation)
            .execute(&mut tx)
            .await
            .context("restore an outbox row")?;
        sqlx::query(AssertSqlSafe(shared.sql.requeue_delivery.clone()))
            .bind(letter.group.clone())
            .bind(letter.message_id.clone())
            .bind(letter.key.clone())
            .bind(now)
            .bind(now)
            .bind(letter.envelope)
            .execute(&mut tx)
            .await
            .context("requeue a dead letter")?;
        tx.commit().await.context("commit a dead letter retry")?;
        shared.wake();
        tracing::info!(target: "inseam::relay", id, group = %letter.group, message_id = %letter.message_id, "dead letter requeued");
        Ok(())
    }

    /// Deletes a dead letter for good. Fails with [`Error::DeadLetterNotFound`] when it is
    /// gone already (retried or discarded, perhaps concurrently).
    pub async fn discard_dead_letter(&self, id: i64) -> Result<()> {
        let done = sqlx::query(AssertSqlSafe(self.shared.sql.delete_dead_letter.clone()))
            .bind(id)
            .execute(&self.shared.pool)
            .await
            .context("discard a dead letter")?;
        if done.rows_affected() == 0 {
            return Err(Error::DeadLetterNotFound { id });
        }
        tracing::info!(target: "inseam::relay", id, "dead letter discarded");
        Ok(())
    }

    /// Replaces the payload of a dead letter, for a later [`retry_dead_letter`] to deliver.
    ///
    /// `payload` is encoded as the dead letter's envelope says (`content_type`; JSON for the
    /// default codec) and in the envelope's version: the message's name, version, ids and
    /// headers are kept. It is accepted only when `app` can deliver it to the dead letter's
    /// group, upcast to the current version and decoded exactly as the relay would
    /// ([`App::check_decodes`](inseam_core::App::check_decodes)); otherwise the dead letter
    /// is left unchanged and [`Error::RepairRefused`] says why, naming the field the decoder
    /// stumbled on. Returns the repaired dead letter. Of two concurrent repairs, the last
    /// one wins.
    ///
    /// ```no_run
    /// # async fn run(store: inseam_sql::SqlStore, app: inseam_core::App) -> Result<(), inseam_sql::Error> {
    /// let payload = br#"{"account": "acct-7", "amount": 10, "seq": 41}"#;
    /// store.repair_dead_letter(&app, 17, payload.to_vec()).await?;
    /// store.retry_dead_letter(17).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// [`retry_dead_letter`]: SqlStore::retry_dead_letter
    pub async fn repair_dead_letter(
        &self,
        app: &inseam_core::App,
        id: i64,
        payload: impl Into<Vec<u8>>,
    ) -> Result<DeadLetter> {
        self.replace_payload(Some(app), id, payload.into()).await
    }

    /// Replaces the payload of a dead letter without checking it against a decoder, for tools
    /// that run without the app's code (the `inseam` command on a database URL). The envelope
    /// must still be readable and `payload` is stored as given; a payload the group cannot
    /// decode fails again on retry and becomes a dead letter again. Prefer
    /// [`repair_dead_letter`](SqlStore::repair_dead_letter) wherever the app is at hand.
    pub async fn replace_dead_letter_payload(
        &self,
        id: i64,
        payload: impl Into<Vec<u8>>,
    ) -> Result<DeadLetter> {
        self.replace_payload(None, id, payload.into()).await
    }

    async fn replace_payload(
        &self,
        app: Option<&inseam_core::App>,
        id: i64,
        payload: Vec<u8>,
    ) -> Result<DeadLetter> {
        let letter = self.dead_letter(id).await?;
        let refused = |reason: String| Error::RepairRefused {
            id,
            group: letter.group.clone(),
            reason,
        };
        let mut envelope = inseam_core::RawEnvelope::from_json(&letter.envelope)
            .map_err(|error| refused(crate::error::chain(&error)))?;
        envelope.payload = payload;
        if let Some(app) = app {
            app.check_decodes(&letter.group, &envelope)
                .map_err(|failure| refused(crate::error::chain(&failure)))?;
        }
        let bytes = envelope
            .to_json()
            .map_err(|error| refused(crate::error::chain(&error)))?;
        let rows = sqlx::query(AssertSqlSafe(self.shared.sql.repair_dead_letter.clone()))
            .bind(id)
            .bind(bytes)
            .fetch_all(&self.shared.pool)
            .await
            .context("repair a dead letter")?;
        let row = rows.first().ok_or(Error::DeadLetterNotFound { id })?;
        let repaired = DeadLetter::from_row(row).context("read a repaired dead letter")?;
        tracing::info!(target: "inseam::relay", id, group = %repaired.group, message_id = %repaired.message_id, checked = app.is_some(), "dead letter repaired");
        Ok(repaired)
    }
}

/// One message of a flow, as stored in the outbox, with where it went.
#[derive(Debug, Clone)]
pub struct FlowEntry {
    /// When it was written (committed with its unit of work).
    pub recorded_at: DateTime<Utc>,
    /// The message.
    pub envelope: inseam_core::RawEnvelope,
    /// Its delivery to each group it was routed to, by group name; none when no group
    /// subscribes to it.
    pub deliveries: Vec<FlowDelivery>,
}

/// A message's delivery to one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowDelivery {
    /// The group.
    pub group: String,
    /// Where it stands.
    pub state: DeliveryState,
}

/// Where a message's delivery to a group stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryState {
    /// The group handled it (its inbox holds it).
    Handled,
    /// Not handled yet: waiting, or to be retried after `attempts` failures.
    Pending {
        /// Failed attempts so far.
        attempts: u32,
        /// The last failure.
        last_error: Option<String>,
    },
    /// Not needed any more, and why: a saga's timeout once the saga completed (it was handled
    /// by being ignored, or it is still waiting and will be).
    NotNeeded {
        /// Why (`the saga completed`).
        reason: String,
    },
    /// Given up on: it is in the dead letters.
    DeadLettered {
        /// Attempts made.
        attempts: u32,
        /// Why.
        error: String,
    },
}

impl std::fmt::Display for FlowDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = &self.group;
        match &self.state {
            DeliveryState::Handled => write!(f, "{group}: handled"),
            DeliveryState::Pending {
                attempts: 0,
                last_error: _,
            } => write!(f, "{group}: pending"),
            DeliveryState::Pending {
                attempts,
                last_error,
            } => write!(
                f,
                "{group}: failed {attempts} time(s), to retry: {}",
                last_error.as_deref().unwrap_or("?")
            ),
            DeliveryState::NotNeeded { reason } => write!(f, "{group}: not needed ({reason})"),
            DeliveryState::DeadLettered { attempts, error } => {
                write!(
                    f,
                    "{group}: dead letter after {attempts} attempt(s): {error}"
                )
            }
        }
    }
}

impl FlowEntry {
    /// `command` (a durable command of `app`), `timer` (inseam's own scheduled messages, such
    /// as saga timeouts) or `event`.
    pub fn kind(&self, app: &inseam_core::App) -> &'static str {
        let name = &self.envelope.name;
        if app.is_durable_command(name) {
            "command"
        } else if name.starts_with("inseam.") {
            "timer"
        } else {
            "event"
        }
    }

    /// The payload as compact JSON (or `<not JSON>`).
    pub fn data(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.envelope.payload)
            .map(|v| v.to_string())
            .unwrap_or_else(|_| "<not JSON>".to_owned())
    }
}

impl SqlStore {
    /// Every message of the flow with `correlation_id` still in the outbox (events, durable
    /// commands and saga timeouts; delivered messages stay for the outbox retention, a
    /// stream's events for good), oldest first. An event no group subscribes to is stored, and
    /// so shown, only when it is of a stream or the app keeps such events
    /// (`AppBuilder::keep_unsubscribed_events`). A saga's timeout that fired or waits after
    /// its saga completed is [`NotNeeded`](DeliveryState::NotNeeded).
    pub async fn flow(&self, correlation_id: Uuid) -> Result<Vec<FlowEntry>> {
        let rows = sqlx::query(AssertSqlSafe(self.shared.sql.flow.clone()))
            .bind(correlation_id.to_string())
            .fetch_all(&self.shared.pool)
            .await
            .context("read a flow")?;
        let mut entries = rows
            .iter()
            .map(|row| {
                let bytes: Vec<u8> = row.try_get(0)?;
                let envelope = inseam_core::RawEnvelope::from_json(&bytes)
                    .map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
                Ok(FlowEntry {
                    recorded_at: from_micros(row.try_get(1)?),
                    envelope,
                    deliveries: Vec::new(),
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .context("read a flow")?;
        let rows = sqlx::query(AssertSqlSafe(self.shared.sql.flow_deliveries.clone()))
            .bind(correlation_id.to_string())
            .fetch_all(&self.shared.pool)
            .await
            .context("read a flow's deliveries")?;
        let mut by_message: HashMap<String, Vec<FlowDelivery>> = HashMap::new();
        for row in &rows {
            let message_id: String = row.try_get(0).context("read a flow's deliveries")?;
            let group: String = row.try_get(1).context("read a flow's deliveries")?;
            let state: String = row.try_get(2).context("read a flow's deliveries")?;
            let attempts: i64 = row.try_get(3).context("read a flow's deliveries")?;
            let error: Option<String> = row.try_get(4).context("read a flow's deliveries")?;
            let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
            let state = match state.as_str() {
                "handled" => match error {
                    Some(reason) => DeliveryState::NotNeeded { reason },
                    None => DeliveryState::Handled,
                },
                "dead" => DeliveryState::DeadLettered {
                    attempts,
                    error: error.unwrap_or_default(),
                },
                _ => DeliveryState::Pending {
                    attempts,
                    last_error: error,
                },
            };
            by_message
                .entry(message_id)
                .or_default()
                .push(FlowDelivery { group, state });
        }
        for entry in &mut entries {
            if let Some(mut deliveries) =
                by_message.remove(&entry.envelope.metadata.message_id.to_string())
            {
                deliveries.sort_by(|a, b| a.group.cmp(&b.group));
                entry.deliveries = deliveries;
            }
            self.waiting_timeout_not_needed(entry).await?;
        }
        Ok(entries)
    }

    /// A saga's timeout still waiting for its time while the saga already completed will be
    /// ignored when it fires: it is shown as not needed now.
    async fn waiting_timeout_not_needed(&self, entry: &mut FlowEntry) -> Result<()> {
        if entry.envelope.name != SagaTimeout::NAME {
            return Ok(());
        }
        let Ok(timeout) = serde_json::from_slice::<SagaTimeout>(&entry.envelope.payload) else {
            return Ok(());
        };
        let Some(delivery) = entry
            .deliveries
            .iter_mut()
            .find(|d| d.group == timeout.saga && matches!(d.state, DeliveryState::Pending { .. }))
        else {
            return Ok(());
        };
        let row = sqlx::query(AssertSqlSafe(self.shared.sql.load_process.clone()))
            .bind(timeout.saga.clone())
            .bind(timeout.id.clone())
            .fetch_optional(&self.shared.pool)
            .await
            .context("read a saga's state")?;
        let done: i64 = match row {
            Some(row) => row.try_get(1).context("read a saga's state")?,
            None => 0,
        };
        if done != 0 {
            delivery.state = DeliveryState::NotNeeded {
                reason: TIMEOUT_AFTER_COMPLETION.to_owned(),
            };
        }
        Ok(())
    }
}

/// The flow `entries` as text, one line per message (`command`, `event` or `timer`, its name and
/// its payload), each followed by one indented line per group it was routed to (see
/// [`FlowDelivery`]'s `Display`), or `(no group subscribes)`. Without `app`, whether a message
/// is a durable command or an event is unknown: it is shown as `message`.
pub fn flow_lines(entries: &[FlowEntry], app: Option<&inseam_core::App>) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in entries {
        let kind = match app {
            Some(app) => entry.kind(app),
            None if entry.envelope.name.starts_with("inseam.") => "timer",
            None => "message",
        };
        lines.push(format!("{kind} {} {}", entry.envelope.name, entry.data()));
        if entry.deliveries.is_empty() {
            lines.push("  (no group subscribes)".to_owned());
        }
        lines.extend(entry.deliveries.iter().map(|d| format!("  -> {d}")));
    }
    lines
}

/// One group's state, as [`SqlStore::status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStatus {
    /// The group.
    pub group: String,
    /// Deliveries waiting (due, scheduled or retrying).
    pub pending: i64,
    /// How long the oldest waiting delivery has been waiting.
    pub oldest_age: Option<Duration>,
    /// Messages the group handled in the last [`Status::window`].
    pub handled_recently: i64,
    /// Its dead letters.
    pub dead_letters: i64,
    /// Why and since when it is paused, when it is.
    pub paused: Option<crate::Paused>,
}

/// The store at a glance: every group the database knows of, and the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Every group with waiting deliveries, dead letters, a pause or recent work, and every
    /// group in `known` (see [`SqlStore::status`]), sorted by name.
    pub groups: Vec<GroupStatus>,
    /// The window of [`GroupStatus::handled_recently`].
    pub window: Duration,
    /// Rows in the outbox (kept until delivered to every group and older than the retention;
    /// a stream's events for good).
    pub outbox_rows: i64,
    /// Dead letters in all.
    pub dead_letters: i64,
    /// The outbox retention of this store's options.
    pub outbox_retention: Duration,
    /// The inbox retention of this store's options.
    pub inbox_retention: Duration,
}

/// The newest schema version this build of the store knows.
fn schema_version(backend: crate::Backend, prefix: &str) -> i64 {
    crate::sql::migrations(backend, prefix)
        .last()
        .map_or(0, |m| m.version)
}

impl SqlStore {
    /// Opens the store on an existing inseam database without creating or migrating anything:
    /// what tools that operate an app's database use. A SQLite file must exist. Fails with
    /// [`Error::NoSchema`] when the database has no inseam tables, [`Error::SchemaTooNew`]
    /// when a newer inseam migrated it, [`Error::SchemaTooOld`] when its app has not migrated
    /// it to this version yet.
    pub async fn open(url: &str) -> Result<Self> {
        Self::open_with(url, crate::SqlStoreOptions::default()).await
    }

    /// [`open`](Self::open) with `options` (the table prefix, most often).
    pub async fn open_with(url: &str, options: crate::SqlStoreOptions) -> Result<Self> {
        let store = Self::connect_only(url, options, false).await?;
        store.check_schema().await?;
        Ok(store)
    }

    /// Checks that the database holds this build's schema, as [`open`](Self::open) does.
    pub async fn check_schema(&self) -> Result<()> {
        let shared = &self.shared;
        let prefix = shared.sql.prefix.to_string();
        let table = format!("{prefix}migrations");
        let exists = match shared.backend {
            crate::Backend::Sqlite => {
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = $1"
            }
            crate::Backend::Postgres => {
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = $1"
            }
        };
        let found: i64 = sqlx::query(exists)
            .bind(table)
            .fetch_one(&shared.pool)
            .await
            .and_then(|row| row.try_get(0))
            .context("look for the inseam tables")?;
        if found == 0 {
            return Err(Error::NoSchema { prefix });
        }
        let version: Option<i64> = sqlx::query(AssertSqlSafe(format!(
            "SELECT MAX(version) FROM {prefix}migrations"
        )))
        .fetch_one(&shared.pool)
        .await
        .and_then(|row| row.try_get(0))
        .context("read the schema version")?;
        let supported = schema_version(shared.backend, &prefix);
        match version {
            None => Err(Error::NoSchema { prefix }),
            Some(found) if found > supported => Err(Error::SchemaTooNew { found, supported }),
            Some(found) if found < supported => Err(Error::SchemaTooOld { found, supported }),
            Some(_) => Ok(()),
        }
    }

    /// Every group's backlog, recent work, dead letters and pause, and the outbox's size: the
    /// store at a glance. `known` adds groups that have nothing to report (the app's
    /// [`groups`](inseam_core::App::groups)); `window` is how far back
    /// [`GroupStatus::handled_recently`] counts.
    pub async fn status(&self, known: &[&str], window: Duration) -> Result<Status> {
        let shared = &self.shared;
        let p = shared.sql.prefix.clone();
        let lag = self.lag().await?;
        let paused = self.paused().await?;
        let since =
            micros(shared.now()) - i64::try_from(window.as_micros()).unwrap_or(i64::MAX / 2);
        let recent = sqlx::query(AssertSqlSafe(format!(
            "SELECT grp, COUNT(*) FROM {p}inbox WHERE handled_at >= $1 GROUP BY grp"
        )))
        .bind(since)
        .fetch_all(&shared.pool)
        .await
        .context("count recent deliveries")?;
        let letters = sqlx::query(AssertSqlSafe(format!(
            "SELECT grp, COUNT(*) FROM {p}dead_letters GROUP BY grp"
        )))
        .fetch_all(&shared.pool)
        .await
        .context("count dead letters per group")?;
        let outbox_rows: i64 =
            sqlx::query(AssertSqlSafe(format!("SELECT COUNT(*) FROM {p}outbox")))
                .fetch_one(&shared.pool)
                .await
                .and_then(|row| row.try_get(0))
                .context("count the outbox rows")?;
        let mut groups: std::collections::BTreeMap<String, GroupStatus> = Default::default();
        let entry = |groups: &mut std::collections::BTreeMap<String, GroupStatus>, group: &str| {
            groups
                .entry(group.to_owned())
                .or_insert_with(|| GroupStatus {
                    group: group.to_owned(),
                    pending: 0,
                    oldest_age: None,
                    handled_recently: 0,
                    dead_letters: 0,
                    paused: None,
                })
                .group
                .clone()
        };
        for group in known {
            entry(&mut groups, group);
        }
        for lagging in lag.groups {
            let key = entry(&mut groups, &lagging.group);
            if let Some(g) = groups.get_mut(&key) {
                g.pending = lagging.pending;
                g.oldest_age = lagging.oldest_age;
            }
        }
        for row in &recent {
            let group: String = row.try_get(0).context("count recent deliveries")?;
            let count: i64 = row.try_get(1).context("count recent deliveries")?;
            // A projection's rebuild writes under `rebuild:<group>`: not a group of its own.
            if group.starts_with("rebuild:") {
                continue;
            }
            let key = entry(&mut groups, &group);
            if let Some(g) = groups.get_mut(&key) {
                g.handled_recently = count;
            }
        }
        for row in &letters {
            let group: String = row.try_get(0).context("count dead letters per group")?;
            let count: i64 = row.try_get(1).context("count dead letters per group")?;
            let key = entry(&mut groups, &group);
            if let Some(g) = groups.get_mut(&key) {
                g.dead_letters = count;
            }
        }
        for pause in paused {
            let key = entry(&mut groups, &pause.group);
            if let Some(g) = groups.get_mut(&key) {
                g.paused = Some(pause);
            }
        }
        Ok(Status {
            groups: groups.into_values().collect(),
            window,
            outbox_rows,
            dead_letters: lag.dead_letters,
            outbox_retention: shared.options.outbox_retention,
            inbox_retention: shared.options.inbox_retention,
        })
    }
}
