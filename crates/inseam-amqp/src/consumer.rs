//! A group's durable consumer: one AMQP channel and consumer per partition queue, each run by
//! a background task that hands its one unsettled message to [`AmqpConsumer::fetch`] and
//! settles it with the server.

use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use inseam_core::transport::{Acker, Consumer, Incoming, TransportError};
use lapin::Channel;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions,
    BasicQosOptions, BasicRejectOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::link::Link;
use crate::topology::Topology;
use crate::{NAME, TARGET, backfill, layout};

/// How often a waiting fetch looks at the connection.
const CONNECTION_CHECK: Duration = Duration::from_millis(200);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a consumer stays a partition's single active consumer before it steps back
/// behind the group's other consumers (if any), so that the group's processes share the
/// partitions.
pub(crate) const ROTATE_AFTER: Duration = Duration::from_millis(250);
/// The headers of a partition's nack record: the message's id and its nacks.
const NACKS_ID_HEADER: &str = "inseam-message-id";
const NACKS_HEADER: &str = "inseam-nacks";
/// How long after the end of a group's history its copied messages are looked for in the
/// group's queue, to be skipped there.
const SKIP_FOR: Duration = Duration::from_secs(10);

/// A message handed to the queue of `fetch`, with the flag its task sets once it gave the
/// message back (its ack wait passed).
struct Pulled {
    incoming: Incoming,
    given_back: Arc<AtomicBool>,
}

/// What the application asked for a message.
enum Settle {
    Ack,
    Nack(Duration),
}

type Settling = (Settle, oneshot::Sender<Result<(), TransportError>>);

/// The last failure of each partition's task, cleared when it consumes again.
struct Health {
    failures: Mutex<Vec<Option<String>>>,
}

impl Health {
    fn new(partitions: u16) -> Self {
        Health {
            failures: Mutex::new(vec![None; usize::from(partitions)]),
        }
    }

    /// Records the partition's state; returns whether it was failing before.
    fn set(&self, partition: u16, failure: Option<String>) -> bool {
        if let Ok(mut failures) = self.failures.lock()
            && let Some(slot) = failures.get_mut(usize::from(partition))
        {
            return std::mem::replace(slot, failure).is_some();
        }
        false
    }

    fn first(&self) -> Option<(usize, String)> {
        let failures = self.failures.lock().ok()?;
        failures
            .iter()
            .enumerate()
            .find_map(|(partition, failure)| failure.clone().map(|f| (partition, f)))
    }
}

/// A durable consumer of one group over RabbitMQ. Dropping it closes its connection: the
/// messages it held and had not settled go back to their queues at once, their delivery
/// count raised.
pub struct AmqpConsumer {
    group: String,
    link: Arc<Link>,
    queue: mpsc::Receiver<Pulled>,
    health: Arc<Health>,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for AmqpConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConsumer")
            .field("group", &self.group)
            .field("partitions", &self.tasks.len())
            .finish_non_exhaustive()
    }
}

impl Drop for AmqpConsumer {
    /// Closes the connection first, then stops the partition tasks. Closing the connection
    /// ends each channel with its consumer: the server gives back what the channel held and
    /// only then hands the queue to the group's next consumer, so those messages come first.
    /// A task stopped first would cancel its consumer before its channel closed, and the
    /// next consumer could read past the messages the channel still held.
    fn drop(&mut self) {
        let link = Arc::clone(&self.link);
        let tasks = std::mem::take(&mut self.tasks);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    link.close().await;
                    for task in tasks {
                        task.abort();
                    }
                });
            }
            Err(_) => {
                for task in tasks {
                    task.abort();
                }
            }
        }
    }
}

impl AmqpConsumer {
    /// Starts one task per partition of `topology`, on `link`'s connection.
    pub(crate) fn start(
        link: Arc<Link>,
        topology: Arc<Topology>,
        group: String,
        ack_wait: Duration,
    ) -> Self {
        let partitions = topology.partitions;
        let (tx, queue) = mpsc::channel(usize::from(partitions).max(1));
        let health = Arc::new(Health::new(partitions));
        let tasks = (0..partitions)
            .map(|partition| {
                let task = PartitionTask {
                    link: Arc::clone(&link),
                    topology: Arc::clone(&topology),
                    partition,
                    ack_wait,
                };
                tokio::spawn(task.run(tx.clone(), Arc::clone(&health)))
            })
            .collect();
        AmqpConsumer {
            group,
            link,
            queue,
            health,
            tasks,
        }
    }

    /// Moves what is queued into `out`, up to `max`, dropping messages whose ack wait passed
    /// while they were queued: their partition's task gave them back to the server.
    fn drain(&mut self, first: Option<Pulled>, out: &mut Vec<Incoming>, max: usize) {
        let mut next = first;
        loop {
            let incoming = match next.take() {
                Some(incoming) => incoming,
                None if out.len() < max => match self.queue.try_recv() {
                    Ok(incoming) => incoming,
                    Err(_) => return,
                },
                None => return,
            };
            let Pulled {
                incoming,
                given_back,
            } = incoming;
            if given_back.load(Ordering::SeqCst) {
                tracing::debug!(
                    target: TARGET,
                    group = %self.group,
                    channel = %incoming.channel,
                    "dropped a message held past its ack wait; it is delivered again"
                );
                continue;
            }
            out.push(incoming);
        }
    }

    fn not_connected(&self) -> TransportError {
        TransportError::transient(
            NAME,
            format!("fetch for group `{}`", self.group),
            "not connected to a RabbitMQ server",
        )
    }
}

#[async_trait]
impl Consumer for AmqpConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Incoming>, TransportError> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        self.drain(None, &mut out, max);
        if !out.is_empty() {
            return Ok(out);
        }
        let deadline = Instant::now() + wait;
        loop {
            let check = (Instant::now() + CONNECTION_CHECK).min(deadline);
            match tokio::time::timeout_at(check, self.queue.recv()).await {
                Ok(Some(incoming)) => {
                    self.drain(Some(incoming), &mut out, max);
                    if !out.is_empty() {
                        return Ok(out);
                    }
                }
                Ok(None) => {
                    return Err(TransportError::permanent(
                        NAME,
                        format!("fetch for group `{}`", self.group),
                        "every partition's task stopped",
                    ));
                }
                Err(_) if Instant::now() >= deadline => break,
                Err(_) => {}
            }
        }
        if let Some((partition, failure)) = self.health.first() {
            if !self.link.connected() {
                return Err(self.not_connected());
            }
            return Err(TransportError::transient(
                NAME,
                format!("fetch for group `{}` (partition {partition})", self.group),
                failure,
            ));
        }
        Ok(out)
    }
}

/// Consumes one partition queue of a group.
struct PartitionTask {
    link: Arc<Link>,
    topology: Arc<Topology>,
    partition: u16,
    ack_wait: Duration,
}

impl PartitionTask {
    async fn run(self, tx: mpsc::Sender<Pulled>, health: Arc<Health>) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let failure = match self.link.channel().await {
                Ok(channel) => {
                    let outcome = self.consume(&channel, &tx, &health, &mut backoff).await;
                    // Closing the channel gives back what it held unsettled.
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        channel.close(200, "inseam: consumer stopping".into()),
                    )
                    .await;
                    match outcome {
                        Ok(()) => return,
                        Err(failure) => failure,
                    }
                }
                Err(err) => format!("could not open a channel: {err}"),
            };
            self.failed(&health, failure);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Declares the partition's queue, consumes it and hands its messages out one at a time
    /// until the channel fails (an error saying why) or the consumer is dropped (`Ok`).
    async fn consume(
        &self,
        channel: &Channel,
        tx: &mpsc::Sender<Pulled>,
        health: &Health,
        backoff: &mut Duration,
    ) -> Result<(), String> {
        let topology = &self.topology;
        let queue = topology.queue(self.partition);
        channel
            .basic_qos(1, BasicQosOptions::default())
            .await
            .map_err(|err| format!("could not set the prefetch: {err}"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|err| format!("could not confirm publishes: {err}"))?;
        topology
            .declare_partition(channel, self.partition)
            .await
            .map_err(|err| format!("could not declare queue `{queue}`: {err}"))?;
        let history = topology.history_queue(self.partition);
        let mut in_history = backfill::queue_exists(&self.link, &history)
            .await
            .map_err(|_| format!("could not look for queue `{history}`"))?;
        let mut tag = consumer_tag();
        let mut consumer = self
            .basic_consume(channel, if in_history { &history } else { &queue }, &tag)
            .await?;
        self.recovered(health);
        *backoff = BACKOFF_MIN;
        let mut active_since: Option<Instant> = None;
        // Ids of copied messages that may be in the group's queue too, and until when they
        // are looked for there.
        let mut skip: HashSet<String> = HashSet::new();
        let mut skip_until: Option<Instant> = None;
        loop {
            let delivery = match consumer.next().await {
                Some(Ok(delivery)) => delivery,
                Some(Err(err)) => return Err(format!("consuming failed: {err}")),
                None if in_history => {
                    // The history queue is gone: another consumer of the group went through it.
                    in_history = false;
                    tag = consumer_tag();
                    consumer = self.basic_consume(channel, &queue, &tag).await?;
                    continue;
                }
                None => return Err("the server cancelled the consumer".to_owned()),
            };
            let received = Instant::now();
            let delivery_tag = delivery.delivery_tag;
            let table = delivery.properties.headers().as_ref();
            let has = |name: &str| table.is_some_and(|t| t.inner().contains_key(name));
            if in_history && has(backfill::END_HEADER) && self.ends_early(channel, &history).await?
            {
                // Messages came back to the history behind its end marker (given back by a
                // consumer of the group that went away): the marker goes behind them again.
                self.end_again(channel, &history).await?;
                channel
                    .basic_ack(delivery_tag, BasicAckOptions::default())
                    .await
                    .map_err(|err| format!("acknowledging failed: {err}"))?;
                continue;
            }
            if in_history && has(backfill::END_HEADER) {
                // The end of the history: consume the group's queue (first in line, since the
                // other processes still wait on the history queue), then remove the history
                // with its marker, which is not acknowledged (it goes with the queue): a
                // process that dies before the deletion leaves the marker to the next
                // consumer, never an empty history queue that would hold its partition
                // forever.
                let next_tag = consumer_tag();
                let next = self.basic_consume(channel, &queue, &next_tag).await?;
                // (Quorum queues refuse `if-empty`: `ends_early` looked just before.)
                if let Err(err) = channel
                    .queue_delete(history.as_str().into(), QueueDeleteOptions::default())
                    .await
                {
                    return Err(format!("could not delete queue `{history}`: {err}"));
                }
                in_history = false;
                tag = next_tag;
                consumer = next;
                skip_until = Some(Instant::now() + SKIP_FOR);
                continue;
            }
            let message_id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.as_str().to_owned());
            if in_history && has(backfill::MAYBE_QUEUED_HEADER) {
                skip.extend(message_id.clone());
            } else if !in_history
                && let Some(id) = &message_id
                && skip.remove(id)
            {
                // Handed out from the history already.
                channel
                    .basic_ack(delivery_tag, BasicAckOptions::default())
                    .await
                    .map_err(|err| format!("acknowledging failed: {err}"))?;
                continue;
            }
            if skip_until.is_some_and(|until| received >= until) {
                skip.clear();
                skip_until = None;
            }
            let since = *active_since.get_or_insert(received);
            let copied_channel = table
                .and_then(|t| t.inner().get(backfill::CHANNEL_HEADER))
                .and_then(|value| match value {
                    AMQPValue::LongString(s) => {
                        Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                    }
                    _ => None,
                });
            let routing_key = delivery.routing_key.as_str();
            let channel_name = copied_channel
                .or_else(|| layout::channel_of(routing_key).map(str::to_owned))
                .filter(|name| topology.channels.iter().any(|c| c == name));
            let Some(channel_name) = channel_name else {
                // Bound for an earlier subscription of the group that read other channels.
                tracing::debug!(
                    target: TARGET,
                    queue = %queue,
                    routing_key = %routing_key,
                    "acknowledged a message of a channel the group no longer reads"
                );
                channel
                    .basic_ack(delivery_tag, BasicAckOptions::default())
                    .await
                    .map_err(|err| format!("acknowledging failed: {err}"))?;
                continue;
            };
            let (key, app_headers) = layout::decode_headers(table);
            let first_attempt = layout::attempt(table, delivery.redelivered);
            // A message that came before may have been nacked (and held here) by a consumer
            // that went away: its record says how many times.
            let mut nacks = match (&message_id, first_attempt > 1) {
                (Some(id), true) => self.recorded_nacks(channel, id).await?,
                _ => 0,
            };
            let payload: bytes::Bytes = delivery.data.into();
            let mut handed_at = received;
            loop {
                let (settle_tx, settle_rx) = oneshot::channel::<Settling>();
                let incoming = Incoming {
                    channel: channel_name.clone(),
                    key: key.clone(),
                    headers: app_headers.clone(),
                    payload: payload.clone(),
                    attempt: first_attempt.saturating_add(nacks),
                    acker: Box::new(AmqpAcker {
                        settle: Mutex::new(Some(settle_tx)),
                        channel: channel_name.clone(),
                    }),
                };
                let given_back = Arc::new(AtomicBool::new(false));
                let pulled = Pulled {
                    incoming,
                    given_back: Arc::clone(&given_back),
                };
                if tx.send(pulled).await.is_err() {
                    // The consumer was dropped; closing the channel gives the message back.
                    // Closed here, before the consumer (whose drop would cancel it first).
                    let _ = tokio::time::timeout(
                        Duration::from_secs(1),
                        channel.close(200, "inseam: consumer stopping".into()),
                    )
                    .await;
                    return Ok(());
                }
                let deadline = handed_at + self.ack_wait;
                let delay = match tokio::time::timeout_at(deadline, settle_rx).await {
                    Ok(Ok((Settle::Ack, reply))) => {
                        // Not while reading the history, nor while copied messages may still
                        // come from the queue (another process would not skip them).
                        let rotate = !in_history
                            && (skip.is_empty() || skip_until.is_none())
                            && since.elapsed() >= ROTATE_AFTER;
                        let acked = if rotate {
                            active_since = None;
                            self.ack_and_step_back(
                                channel,
                                &queue,
                                &mut tag,
                                &mut consumer,
                                delivery_tag,
                            )
                            .await
                        } else {
                            channel
                                .basic_ack(delivery_tag, BasicAckOptions::default())
                                .await
                                .map_err(|err| format!("acknowledging failed: {err}"))
                        };
                        match acked {
                            Ok(()) => {
                                let _ = reply.send(Ok(()));
                                break;
                            }
                            Err(failure) => {
                                let _ = reply.send(Err(TransportError::transient(
                                    NAME,
                                    format!("acknowledge a message of `{queue}`"),
                                    failure.clone(),
                                )));
                                return Err(failure);
                            }
                        }
                    }
                    Ok(Ok((Settle::Nack(delay), reply))) => {
                        // Held here for the delay, its partition with it, then handed out
                        // again: a message given back to a quorum queue goes behind the
                        // others. The nack counts once its record is on the server.
                        nacks = nacks.saturating_add(1);
                        let recorded = self
                            .record_nacks(channel, message_id.as_deref(), nacks)
                            .await;
                        match recorded {
                            Ok(()) => {
                                let _ = reply.send(Ok(()));
                            }
                            Err(failure) => {
                                let _ = reply.send(Err(TransportError::transient(
                                    NAME,
                                    format!("ask again for a message of `{queue}`"),
                                    failure.clone(),
                                )));
                                return Err(failure);
                            }
                        }
                        delay
                    }
                    Ok(Err(_)) => {
                        // Dropped unsettled: it comes again after its ack wait, as it would
                        // had its process died.
                        tokio::time::sleep_until(deadline).await;
                        given_back.store(true, Ordering::SeqCst);
                        nacks = nacks.saturating_add(1);
                        self.record_nacks(channel, message_id.as_deref(), nacks)
                            .await?;
                        Duration::ZERO
                    }
                    Err(_) => {
                        tracing::debug!(
                            target: TARGET,
                            queue = %queue,
                            ack_wait = ?self.ack_wait,
                            "a message was not settled within its ack wait; it is handed out again"
                        );
                        given_back.store(true, Ordering::SeqCst);
                        nacks = nacks.saturating_add(1);
                        self.record_nacks(channel, message_id.as_deref(), nacks)
                            .await?;
                        Duration::ZERO
                    }
                };
                tokio::time::sleep(delay).await;
                handed_at = Instant::now();
            }
        }
    }

    /// Whether the history queue still holds messages ready behind its end marker.
    async fn ends_early(&self, channel: &Channel, history: &str) -> Result<bool, String> {
        let queue = channel
            .queue_declare(
                history.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|err| format!("could not look at queue `{history}`: {err}"))?;
        Ok(queue.message_count() > 0)
    }

    /// Publishes a new end marker to the back of the history queue.
    async fn end_again(&self, channel: &Channel, history: &str) -> Result<(), String> {
        let mut headers = FieldTable::default();
        headers.insert(backfill::END_HEADER.into(), AMQPValue::Boolean(true));
        to_queue_confirmed(channel, history, headers)
            .await
            .map_err(|err| format!("could not move the end of queue `{history}`: {err}"))
    }

    /// Records on the server that the message was nacked (or not settled in time) `nacks`
    /// times while this consumer held it: the partition's nack record keeps the latest.
    async fn record_nacks(
        &self,
        channel: &Channel,
        message_id: Option<&str>,
        nacks: u32,
    ) -> Result<(), String> {
        let Some(message_id) = message_id else {
            return Ok(());
        };
        let mut headers = FieldTable::default();
        headers.insert(
            NACKS_ID_HEADER.into(),
            AMQPValue::LongString(message_id.into()),
        );
        headers.insert(NACKS_HEADER.into(), AMQPValue::LongUInt(nacks));
        let record = self.topology.nack_record(self.partition);
        to_queue_confirmed(channel, &record, headers)
            .await
            .map_err(|err| format!("could not record a nack: {err}"))
    }

    /// How many times the message was nacked by consumers of the group before, from the
    /// partition's nack record (0 when the record is of another message).
    async fn recorded_nacks(&self, channel: &Channel, message_id: &str) -> Result<u32, String> {
        let record = self.topology.nack_record(self.partition);
        let got = channel
            .basic_get(record.as_str().into(), BasicGetOptions { no_ack: false })
            .await
            .map_err(|err| format!("could not read the nack record: {err}"))?;
        let Some(got) = got else {
            return Ok(0);
        };
        let table = got.delivery.properties.headers().as_ref();
        let field = |name: &str| table.and_then(|t| t.inner().get(name)).cloned();
        let nacks = match (field(NACKS_ID_HEADER), field(NACKS_HEADER)) {
            (Some(AMQPValue::LongString(id)), Some(AMQPValue::LongUInt(nacks)))
                if id.as_bytes() == message_id.as_bytes() =>
            {
                nacks
            }
            _ => 0,
        };
        // The record stays for the next reader.
        channel
            .basic_reject(
                got.delivery.delivery_tag,
                BasicRejectOptions { requeue: true },
            )
            .await
            .map_err(|err| format!("could not keep the nack record: {err}"))?;
        Ok(nacks)
    }

    async fn basic_consume(
        &self,
        channel: &Channel,
        queue: &str,
        tag: &str,
    ) -> Result<lapin::Consumer, String> {
        channel
            .basic_consume(
                queue.into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|err| format!("could not consume queue `{queue}`: {err}"))
    }

    /// Acknowledges a message and steps back behind the queue's other consumers: cancels the
    /// consumer while the message is still unsettled (so that nothing else is delivered to
    /// it), acknowledges, and consumes again. A waiting consumer of the group (another
    /// process) becomes the queue's single active consumer; without one, this one does again.
    async fn ack_and_step_back(
        &self,
        channel: &Channel,
        queue: &str,
        tag: &mut String,
        consumer: &mut lapin::Consumer,
        delivery_tag: u64,
    ) -> Result<(), String> {
        channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await
            .map_err(|err| format!("could not cancel the consumer: {err}"))?;
        channel
            .basic_ack(delivery_tag, BasicAckOptions::default())
            .await
            .map_err(|err| format!("acknowledging failed: {err}"))?;
        *tag = consumer_tag();
        *consumer = self.basic_consume(channel, queue, tag).await?;
        Ok(())
    }

    /// Records a failure: a warning when the partition was healthy, then quieter while it
    /// keeps failing (an outage would otherwise warn for every partition at every retry).
    fn failed(&self, health: &Health, failure: String) {
        let group = &self.topology.group;
        if health.set(self.partition, Some(failure.clone())) {
            tracing::debug!(
                target: TARGET,
                group = %group,
                partition = self.partition,
                failure = %failure,
                "RabbitMQ partition consumer still failing; retrying"
            );
        } else {
            tracing::warn!(
                target: TARGET,
                group = %group,
                partition = self.partition,
                failure = %failure,
                "RabbitMQ partition consumer failed; retrying"
            );
        }
    }

    fn recovered(&self, health: &Health) {
        if health.set(self.partition, None) {
            tracing::info!(
                target: TARGET,
                group = %self.topology.group,
                partition = self.partition,
                "RabbitMQ partition consumer consumes again"
            );
        }
    }
}

/// Publishes an empty persistent message with `headers` straight to `queue` and waits for the
/// server's confirm (the channel is in confirm mode).
async fn to_queue_confirmed(
    channel: &Channel,
    queue: &str,
    headers: FieldTable,
) -> Result<(), String> {
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &[],
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_headers(headers),
        )
        .await
        .map_err(|err| err.to_string())?
        .await
        .map_err(|err| err.to_string())?;
    match confirm {
        Confirmation::Ack(_) => Ok(()),
        _ => Err("the server did not confirm it".to_owned()),
    }
}

fn consumer_tag() -> String {
    format!("inseam-{}", uuid::Uuid::now_v7().simple())
}

/// Settles one message through its partition's task, which holds the AMQP delivery.
pub(crate) struct AmqpAcker {
    settle: Mutex<Option<oneshot::Sender<Settling>>>,
    channel: String,
}

impl AmqpAcker {
    async fn settle(&self, settle: Settle, what: &str) -> Result<(), TransportError> {
        let operation = || format!("{what} a message of `{}`", self.channel);
        let sender = self.settle.lock().ok().and_then(|mut slot| slot.take());
        let Some(sender) = sender else {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                "the message was settled already",
            ));
        };
        let (reply, outcome) = oneshot::channel();
        if sender.send((settle, reply)).is_err() {
            return Err(TransportError::transient(
                NAME,
                operation(),
                "its ack wait passed or its consumer stopped: it is delivered again",
            ));
        }
        outcome.await.unwrap_or_else(|_| {
            Err(TransportError::transient(
                NAME,
                operation(),
                "its consumer stopped before settling it: it is delivered again",
            ))
        })
    }
}

#[async_trait]
impl Acker for AmqpAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        self.settle(Settle::Ack, "acknowledge").await
    }

    async fn nack(&self, delay: Duration) -> Result<(), TransportError> {
        self.settle(Settle::Nack(delay), "ask again for").await
    }
}
