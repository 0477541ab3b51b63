//! A group's durable consumer: one JetStream pull consumer per partition, each pulled by a
//! background task into one queue that [`NatsConsumer::fetch`] reads.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{PullConsumer, pull};
use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use futures_util::StreamExt;
use inseam_core::transport::{Acker, Consumer, Incoming, TransportError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::layout;
use crate::{NAME, TARGET};

/// A pull request's lifetime; the client renews it when it ends.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
/// The server's heartbeat on an idle pull request; two missed ones restart the pull.
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);
/// How often a waiting fetch looks at the connection.
const CONNECTION_CHECK: Duration = Duration::from_millis(200);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// A message taken from a partition and not yet handed out.
struct Pulled {
    received: Instant,
    incoming: Incoming,
}

/// The last failure of each partition's task, cleared when it pulls again.
#[derive(Default)]
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

/// What a partition's task needs to (re)create its consumer and pull from it.
pub(crate) struct Partition {
    pub(crate) js: jetstream::Context,
    pub(crate) stream: String,
    pub(crate) config: pull::Config,
    pub(crate) partition: u16,
    pub(crate) group: String,
    pub(crate) prefix: String,
    /// The group's channels when the consumer's filter takes every channel of the partition
    /// (NATS 2.9): messages of other channels are acknowledged here and never handed out.
    pub(crate) only: Option<Arc<HashSet<String>>>,
}

/// A durable consumer of one group over NATS JetStream. Dropping it stops its pulls; what it
/// had received and not acknowledged is delivered again after the subscription's ack wait.
pub struct NatsConsumer {
    group: String,
    client: async_nats::Client,
    ack_wait: Duration,
    queue: mpsc::Receiver<Pulled>,
    health: Arc<Health>,
    tasks: Vec<JoinHandle<()>>,
}

impl fmt::Debug for NatsConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConsumer")
            .field("group", &self.group)
            .field("partitions", &self.tasks.len())
            .field("ack_wait", &self.ack_wait)
            .finish_non_exhaustive()
    }
}

impl Drop for NatsConsumer {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl NatsConsumer {
    /// Starts one task per partition; `first` are the consumers `subscribe` created, used for
    /// the first pull.
    pub(crate) fn start(
        client: async_nats::Client,
        group: String,
        ack_wait: Duration,
        partitions: Vec<(Partition, PullConsumer)>,
    ) -> Self {
        let count = u16::try_from(partitions.len()).unwrap_or(u16::MAX);
        let (tx, queue) = mpsc::channel(partitions.len().max(1));
        let health = Arc::new(Health::new(count));
        let tasks = partitions
            .into_iter()
            .map(|(partition, first)| {
                let tx = tx.clone();
                let health = Arc::clone(&health);
                tokio::spawn(partition.run(first, tx, health))
            })
            .collect();
        NatsConsumer {
            group,
            client,
            ack_wait,
            queue,
            health,
            tasks,
        }
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Moves what is queued into `out`, up to `max`, dropping messages held longer than the ack
    /// wait: the server has handed those to a consumer again.
    fn drain(&mut self, first: Option<Pulled>, out: &mut Vec<Incoming>, max: usize) {
        let mut next = first;
        loop {
            let pulled = match next.take() {
                Some(pulled) => pulled,
                None if out.len() < max => match self.queue.try_recv() {
                    Ok(pulled) => pulled,
                    Err(_) => return,
                },
                None => return,
            };
            if pulled.received.elapsed() >= self.ack_wait {
                tracing::debug!(
                    target: TARGET,
                    group = %self.group,
                    channel = %pulled.incoming.channel,
                    "dropped a message held past its ack wait; the server delivers it again"
                );
                continue;
            }
            out.push(pulled.incoming);
        }
    }

    fn not_connected(&self) -> TransportError {
        TransportError::transient(
            NAME,
            format!("fetch for group `{}`", self.group),
            "not connected to a NATS server",
        )
    }
}

#[async_trait]
impl Consumer for NatsConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Incoming>, TransportError> {
        let mut out = Vec::new();
        if max == 0 {
            return Ok(out);
        }
        // What was pulled before an outage stays queued: its acknowledgement could not reach
        // the server, so it is handed out once the connection is back (or dropped if the
        // server gave it to another consumer meanwhile).
        if !self.connected() {
            return Err(self.not_connected());
        }
        self.drain(None, &mut out, max);
        if !out.is_empty() {
            return Ok(out);
        }
        let deadline = Instant::now() + wait;
        loop {
            let check = (Instant::now() + CONNECTION_CHECK).min(deadline);
            match tokio::time::timeout_at(check, self.queue.recv()).await {
                Ok(Some(pulled)) => {
                    self.drain(Some(pulled), &mut out, max);
                    if !out.is_empty() {
                        return Ok(out);
                    }
                }
                Ok(None) => {
                    return Err(TransportError::permanent(
                        NAME,
                        format!("fetch for group `{}`", self.group),
                        "every partition's pull task stopped",
                    ));
                }
                Err(_) if !self.connected() => return Err(self.not_connected()),
                Err(_) if Instant::now() >= deadline => break,
                Err(_) => {}
            }
        }
        if let Some((partition, failure)) = self.health.first() {
            return Err(TransportError::transient(
                NAME,
                format!("fetch for group `{}` (partition {partition})", self.group),
                failure,
            ));
        }
        Ok(out)
    }
}

impl Partition {
    async fn run(self, first: PullConsumer, tx: mpsc::Sender<Pulled>, health: Arc<Health>) {
        let mut consumer = Some(first);
        let mut backoff = BACKOFF_MIN;
        loop {
            let current = match consumer.take() {
                Some(consumer) => consumer,
                None => match self
                    .js
                    .create_consumer_on_stream(self.config.clone(), self.stream.as_str())
                    .await
                {
                    Ok(consumer) => consumer,
                    Err(err) => {
                        self.failed(&health, format!("could not create its consumer: {err}"));
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                },
            };
            let messages = current
                .stream()
                .max_messages_per_batch(1)
                .expires(PULL_EXPIRES)
                .heartbeat(PULL_HEARTBEAT)
                .messages()
                .await;
            let mut messages = match messages {
                Ok(messages) => messages,
                Err(err) => {
                    self.failed(&health, format!("could not pull: {err}"));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            self.recovered(&health);
            let failure = loop {
                match messages.next().await {
                    Some(Ok(message)) => {
                        backoff = BACKOFF_MIN;
                        self.recovered(&health);
                        if self.hand_over(message, &tx).await.is_err() {
                            // The consumer was dropped.
                            return;
                        }
                    }
                    Some(Err(err)) => break format!("pulling failed: {err}"),
                    None => break "its pull ended".to_owned(),
                }
            };
            // A fresh consumer handle and pull: the old one may wait on a request the server
            // forgot (a restart) or on a consumer that is gone.
            self.failed(&health, failure);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Records a failure: a warning when the partition was healthy, then quieter while it
    /// keeps failing (an outage would otherwise warn for every partition at every retry).
    fn failed(&self, health: &Health, failure: String) {
        if health.set(self.partition, Some(failure.clone())) {
            tracing::debug!(
                target: TARGET,
                group = %self.group,
                partition = self.partition,
                failure = %failure,
                "NATS partition consumer still failing; retrying"
            );
        } else {
            tracing::warn!(
                target: TARGET,
                group = %self.group,
                partition = self.partition,
                failure = %failure,
                "NATS partition consumer failed; retrying"
            );
        }
    }

    fn recovered(&self, health: &Health) {
        if health.set(self.partition, None) {
            tracing::info!(
                target: TARGET,
                group = %self.group,
                partition = self.partition,
                "NATS partition consumer pulls again"
            );
        }
    }

    /// Queues a message for `fetch`, or settles it here when the group does not read its
    /// channel. Fails only when the queue's reader is gone.
    async fn hand_over(
        &self,
        message: jetstream::Message,
        tx: &mpsc::Sender<Pulled>,
    ) -> Result<(), ()> {
        let received = Instant::now();
        let channel = layout::channel_of(&self.prefix, message.subject.as_str()).map(str::to_owned);
        let read = match (&channel, &self.only) {
            (None, _) => false,
            (Some(channel), Some(only)) => only.contains(channel),
            (Some(_), None) => true,
        };
        let (message, acker) = match channel {
            Some(channel) if read => {
                let attempt = message
                    .info()
                    .map(|info| u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX))
                    .unwrap_or(1);
                let (key, headers) = layout::decode_headers(message.headers.as_ref());
                let (message, acker) = message.split();
                let incoming = Incoming {
                    channel,
                    key,
                    headers,
                    payload: message.payload,
                    attempt,
                    acker: Box::new(NatsAcker {
                        acker,
                        subject: message.subject.to_string(),
                    }),
                };
                return tx.send(Pulled { received, incoming }).await.map_err(|_| ());
            }
            _ => message.split(),
        };
        // Not for this group: with `max_ack_pending = 1` the partition waits for this ack.
        if let Err(err) = acker.double_ack().await {
            tracing::debug!(
                target: TARGET,
                group = %self.group,
                subject = %message.subject,
                error = %err,
                "could not acknowledge a message of a channel the group does not read"
            );
        }
        Ok(())
    }
}

/// Settles one JetStream message, waiting for the server to confirm.
struct NatsAcker {
    acker: jetstream::message::Acker,
    subject: String,
}

impl NatsAcker {
    async fn settle(&self, kind: AckKind, what: &str) -> Result<(), TransportError> {
        self.acker.double_ack_with(kind).await.map_err(|err| {
            TransportError::transient(NAME, format!("{what} a message of `{}`", self.subject), err)
        })
    }
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        self.settle(AckKind::Ack, "acknowledge").await
    }

    async fn nack(&self, delay: Duration) -> Result<(), TransportError> {
        let delay = (!delay.is_zero()).then_some(delay);
        self.settle(AckKind::Nak(delay), "ask again for").await
    }
}
