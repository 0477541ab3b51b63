//! Kafka transport for inseam: a group's events consumed durably in another process, in
//! per-key order.
//!
//! [`Kafka`] implements inseam's [`Transport`] on `rdkafka` (librdkafka). Its layout
//! (decision 0021 in the repository's `docs/decisions/`):
//!
//! - one topic (`inseam` by default, 8 partitions, created explicitly by
//!   [`provision`](Transport::provision), never by auto-creation) carries every channel; a
//!   record's key is the message's key, its partition the Java client's murmur2 of the key
//!   (of the message id for a message without one), and its headers are the message's
//!   headers, byte for byte, followed by `inseam-channel` and `inseam-id`;
//! - the producer is idempotent with `acks=all`, and a publish counts only once the brokers
//!   confirmed it;
//! - an inseam group is a Kafka consumer group (`<topic>.<group>`) that reads the whole topic,
//!   settling at once the records of channels it does not read. A member hands out one
//!   message per partition at a time and commits a partition's offset (within 100 ms of an
//!   acknowledgement, not waited for by it) only past acknowledged messages, never past a
//!   message still in flight: since every channel shares the
//!   topic, a key's order holds across the channels a group reads, whichever member holds
//!   the partition. A nacked message is held back by the member for its delay, and the rest
//!   of its partition with it, which the transport declares as
//!   [`KeyOrder::PerKeyPartitioned`], with [`Transport::partition`] telling a key's
//!   partition;
//! - Kafka has no delivery count: the member counts, and records the count of the message it
//!   hands out in a companion consumer group (`<topic>.<group>.deliveries`), so the next
//!   member of the group counts on;
//! - request-reply works as Spring's `ReplyingKafkaTemplate`: requests go to a requests topic
//!   (`<topic>.requests`, the channel in a header) read by each channel's consumer group of
//!   servers (`<topic>.requests.<channel>`), answers to a reply topic of the requesting
//!   transport (`<topic>.replies.<uuid>`, one partition, deleted when the transport is
//!   dropped), matched by a correlation id header; a request nobody answers fails as
//!   transient at its timeout.
//!
//! ```no_run
//! use inseam_core::transport::{Consumer, Subscription, Transport};
//! use inseam_kafka::{Kafka, KafkaOptions};
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let kafka = Kafka::connect_with(KafkaOptions::from_env()?)?;
//! kafka.provision(&["orders.order_placed".to_owned()]).await?;
//! let mut consumer = kafka
//!     .subscribe(&Subscription::new("shipping", ["orders.order_placed"]))
//!     .await?;
//! for message in consumer.fetch(16, Duration::from_secs(1)).await? {
//!     // ... commit it with the group's inbox row, then:
//!     message.ack().await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! What a process needs to reach the brokers (URLs, SASL credentials, TLS) is in
//! [`KafkaOptions`], which also reads `INSEAM_KAFKA_*` environment variables.

#![warn(missing_docs)]

mod consumer;
mod error;
mod layout;
mod options;
mod rpc;

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use inseam_core::transport::{
    Capabilities, Consumer, KeyOrder, Outgoing, Requests, Subscription, Transport, TransportError,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::Consumer as _;
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
use tokio::time::Instant;
use tracing::Instrument;

pub use consumer::KafkaConsumer;
pub use error::{KafkaError, Result};
pub use options::{KafkaOptions, MAX_PARTITIONS};

/// The transport's name in errors and logs.
const NAME: &str = "kafka";
/// The `tracing` target of everything this crate logs.
const TARGET: &str = "inseam::kafka";
/// How long [`Transport::subscribe`] waits for the group to assign partitions to the member.
const JOIN_WAIT: Duration = Duration::from_secs(30);

/// Passes a librdkafka log line to `tracing`.
pub(crate) fn log_rdkafka(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::warn!(target: TARGET, facility, "librdkafka: {message}");
        }
        _ => tracing::debug!(target: TARGET, facility, "librdkafka: {message}"),
    }
}

/// The producer's and the admin client's callbacks: logs through `tracing`.
struct Logs;

impl ClientContext for Logs {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        log_rdkafka(level, fac, log_message);
    }

    fn error(&self, error: RdKafkaError, reason: &str) {
        // Lost connections are reported here too; publishes and fetches say what failed.
        tracing::debug!(target: TARGET, error = %error, reason, "Kafka client error");
    }
}

impl rdkafka::consumer::ConsumerContext for Logs {}

/// The Kafka transport. Cloning it shares the producer.
#[derive(Clone)]
pub struct Kafka {
    inner: Arc<Inner>,
}

struct Inner {
    /// Replaced when librdkafka declares it failed for good (an idempotence fatal error).
    producer: RwLock<Arc<FutureProducer<Logs>>>,
    admin: AdminClient<Logs>,
    options: KafkaOptions,
    /// The reply topic and its reader, from the first request on.
    replies: tokio::sync::OnceCell<rpc::Replies>,
}

impl fmt::Debug for Kafka {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options = &self.inner.options;
        f.debug_struct("Kafka")
            .field("brokers", &options.brokers)
            .field("topic", &options.topic)
            .field("partitions", &options.partitions)
            .finish_non_exhaustive()
    }
}

impl Kafka {
    /// Sets up the transport for the brokers of `urls` (comma-separated) with the default
    /// options; see [`KafkaOptions::from_url`].
    pub fn connect(urls: &str) -> Result<Self> {
        Kafka::connect_with(KafkaOptions::from_url(urls)?)
    }

    /// Sets up the transport with `options`. librdkafka connects in the background and
    /// reconnects by itself: an unreachable broker makes publishes, provisioning and
    /// subscriptions fail with transient errors, not this call.
    pub fn connect_with(options: KafkaOptions) -> Result<Self> {
        options.validate()?;
        let producer = Kafka::new_producer(&options)?;
        let admin = options
            .client_config()
            .create_with_context(Logs)
            .map_err(|source| client_error(&options, source))?;
        Ok(Kafka {
            inner: Arc::new(Inner {
                producer: RwLock::new(Arc::new(producer)),
                admin,
                options,
                replies: tokio::sync::OnceCell::new(),
            }),
        })
    }

    fn new_producer(options: &KafkaOptions) -> Result<FutureProducer<Logs>> {
        let mut config = options.client_config();
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set(
                "message.timeout.ms",
                options::millis(options.publish_timeout),
            )
            .set("linger.ms", "2");
        config
            .create_with_context(Logs)
            .map_err(|source| client_error(options, source))
    }

    /// The options it was set up with.
    pub fn options(&self) -> &KafkaOptions {
        &self.inner.options
    }

    fn producer(&self) -> Arc<FutureProducer<Logs>> {
        let producer = self
            .inner
            .producer
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Arc::clone(&producer)
    }

    /// Replaces a producer that librdkafka declared failed for good, or that the brokers
    /// fenced (`fenced`): its idempotence state is no longer accepted, so only a new producer
    /// (a new producer id) can publish again.
    fn renew_producer_if_failed(&self, producer: &Arc<FutureProducer<Logs>>, fenced: bool) {
        let reason = match producer.client().fatal_error() {
            Some((code, reason)) => format!("{code:?}: {reason}"),
            None if fenced => "the brokers fenced its producer id".to_owned(),
            None => return,
        };
        tracing::warn!(target: TARGET, reason = %reason, "the Kafka producer cannot publish any more; creating a new one");
        match Kafka::new_producer(&self.inner.options) {
            Ok(fresh) => {
                let mut current = self
                    .inner
                    .producer
                    .write()
                    .unwrap_or_else(PoisonError::into_inner);
                if Arc::ptr_eq(&current, producer) {
                    *current = Arc::new(fresh);
                }
            }
            Err(error) => {
                tracing::warn!(target: TARGET, error = %error, "could not create a new Kafka producer");
            }
        }
    }

    /// Creates the topic with the configured partition count, or checks that the existing
    /// one has that count.
    async fn ensure_topic(&self) -> std::result::Result<(), TransportError> {
        let options = &self.inner.options;
        let topic = &options.topic;
        let operation = || format!("create topic `{topic}`");
        let new = NewTopic::new(
            topic,
            i32::from(options.partitions),
            TopicReplication::Fixed(i32::from(options.replication)),
        );
        let admin_options = AdminOptions::new()
            .request_timeout(Some(options.request_timeout))
            .operation_timeout(Some(options.request_timeout));
        let created = tokio::time::timeout(
            options.request_timeout + Duration::from_secs(1),
            self.inner.admin.create_topics([&new], &admin_options),
        )
        .await
        .map_err(|_| {
            TransportError::transient(
                NAME,
                operation(),
                format!("no answer within {:?}", options.request_timeout),
            )
        })?
        .map_err(|error| TransportError::transient(NAME, operation(), error))?;
        for result in created {
            match result {
                Ok(_) => {
                    tracing::info!(target: TARGET, topic = %topic, partitions = options.partitions, "topic created");
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => self.check_topic().await?,
                Err((_, code)) => {
                    let error = RdKafkaError::AdminOp(code);
                    return Err(match code {
                        RDKafkaErrorCode::InvalidPartitions
                        | RDKafkaErrorCode::InvalidReplicationFactor
                        | RDKafkaErrorCode::InvalidTopic
                        | RDKafkaErrorCode::PolicyViolation
                        | RDKafkaErrorCode::InvalidConfig
                        | RDKafkaErrorCode::TopicAuthorizationFailed
                        | RDKafkaErrorCode::ClusterAuthorizationFailed => {
                            TransportError::permanent(NAME, operation(), error)
                        }
                        _ => TransportError::transient(NAME, operation(), error),
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks that the existing topic has the configured partition count.
    async fn check_topic(&self) -> std::result::Result<(), TransportError> {
        let options = self.inner.options.clone();
        let producer = self.producer();
        let operation = format!("check topic `{}`", options.topic);
        let read = tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(Some(&options.topic), options.request_timeout)?;
            Ok::<_, RdKafkaError>(
                metadata
                    .topics()
                    .iter()
                    .find(|t| t.name() == options.topic)
                    .map(|t| t.partitions().len()),
            )
        })
        .await
        .map_err(|error| TransportError::transient(NAME, operation.clone(), error))?
        .map_err(|error| TransportError::transient(NAME, operation.clone(), error))?;
        let expected = usize::from(self.inner.options.partitions);
        match read {
            Some(found) if found == expected => Ok(()),
            Some(found) => Err(TransportError::permanent(
                NAME,
                operation,
                format!(
                    "the topic has {found} partitions, the options say {expected}: every \
                     publisher and consumer must use the topic's partition count"
                ),
            )),
            None => Err(TransportError::transient(
                NAME,
                operation,
                "the brokers do not list the topic yet",
            )),
        }
    }

    async fn publish_batch(
        &self,
        batch: &[Outgoing],
    ) -> Vec<std::result::Result<(), TransportError>> {
        let options = &self.inner.options;
        let producer = self.producer();
        // librdkafka fails a queued message after `message.timeout.ms`; a little more here.
        let deadline = Instant::now() + options.publish_timeout + Duration::from_secs(1);
        let mut outcomes: Vec<Option<std::result::Result<(), TransportError>>> =
            batch.iter().map(|_| None).collect();
        // Partitions with a message that could not be queued: later messages of the
        // partition stay back, so that a retry cannot land behind them.
        let mut failed: HashSet<u16> = HashSet::new();
        let mut pending = Vec::with_capacity(batch.len());
        for (index, message) in batch.iter().enumerate() {
            let operation = || format!("publish to `{}`", message.channel);
            let partition = layout::partition(
                message.key.as_deref(),
                message.message_id,
                options.partitions,
            );
            // A message refused for what it is fails as permanent, wherever it is.
            let prepared = match layout::channel_problem(&message.channel) {
                Some(problem) => Err(format!(
                    "channel `{}` cannot be carried: {problem}",
                    message.channel
                )),
                None => {
                    layout::encode_headers(&message.channel, message.message_id, &message.headers)
                }
            };
            let headers = match prepared {
                Ok(headers) => headers,
                Err(problem) => {
                    outcomes[index] =
                        Some(Err(TransportError::permanent(NAME, operation(), problem)));
                    failed.insert(partition);
                    continue;
                }
            };
            if failed.contains(&partition) {
                outcomes[index] = Some(Err(TransportError::transient(
                    NAME,
                    operation(),
                    "an earlier message of its partition in this batch was not published",
                )));
                continue;
            }
            let record = FutureRecord::<[u8], [u8]>::to(&options.topic)
                .partition(i32::from(partition))
                .payload(&message.payload[..])
                .headers(headers);
            let record = match &message.key {
                Some(key) => record.key(key.as_bytes()),
                None => record,
            };
            match producer.send_result(record) {
                Ok(delivery) => pending.push((index, delivery)),
                Err((error, _)) => {
                    outcomes[index] = Some(Err(produce_error(operation(), error)));
                    failed.insert(partition);
                }
            }
        }
        let mut fenced = false;
        for (index, delivery) in pending {
            let operation = || format!("publish to `{}`", batch[index].channel);
            outcomes[index] = Some(match tokio::time::timeout_at(deadline, delivery).await {
                Ok(Ok(Ok(_))) => Ok(()),
                Ok(Ok(Err((error, _)))) => {
                    fenced |= matches!(
                        error.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::ProducerFenced
                                | RDKafkaErrorCode::InvalidProducerEpoch
                                | RDKafkaErrorCode::UnknownProducerId
                                | RDKafkaErrorCode::OutOfOrderSequenceNumber
                                | RDKafkaErrorCode::Fatal
                        )
                    );
                    Err(produce_error(operation(), error))
                }
                Ok(Err(_)) => Err(TransportError::transient(
                    NAME,
                    operation(),
                    "the producer dropped the message",
                )),
                Err(_) => Err(TransportError::transient(
                    NAME,
                    operation(),
                    format!(
                        "the brokers did not confirm within the publish timeout ({:?})",
                        options.publish_timeout
                    ),
                )),
            });
        }
        self.renew_producer_if_failed(&producer, fenced);
        outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| {
                    Err(TransportError::transient(
                        NAME,
                        "publish",
                        "the message was not sent",
                    ))
                })
            })
            .collect()
    }
}

fn client_error(options: &KafkaOptions, source: RdKafkaError) -> KafkaError {
    KafkaError::Client {
        brokers: options.brokers.join(","),
        source,
    }
}

/// A failed produce: permanent when the message or the configuration is refused for what it
/// is, transient otherwise (brokers down or slow, a topic not provisioned yet).
fn produce_error(operation: String, error: RdKafkaError) -> TransportError {
    let permanent = matches!(
        error.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessageSize
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
                | RDKafkaErrorCode::InvalidTopic
                | RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed
                | RDKafkaErrorCode::InvalidArgument
        )
    );
    if permanent {
        TransportError::permanent(NAME, operation, error)
    } else {
        TransportError::transient(NAME, operation, error)
    }
}

fn check_channels<'a>(
    operation: impl Fn() -> String,
    channels: impl IntoIterator<Item = &'a String>,
) -> std::result::Result<(), TransportError> {
    for channel in channels {
        if let Some(problem) = layout::channel_problem(channel) {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                format!("channel `{channel}` cannot be carried: {problem}"),
            ));
        }
    }
    Ok(())
}

#[async_trait]
impl Transport for Kafka {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // One message in flight per group and partition: a message waiting for its
            // redelivery holds back its whole partition, not only its key.
            ordering: KeyOrder::PerKeyPartitioned {
                partitions: self.inner.options.partitions,
            },
            // The member holds a nacked message back for its delay.
            delayed_redelivery: true,
            native_delayed_delivery: false,
            native_dead_letters: false,
            // The idempotent producer drops only its own retries, not a second publish of
            // a message id by the relay.
            deduplicates: false,
            // Requests through a requests topic, answers through the requester's reply
            // topic (see `rpc`).
            request_reply: true,
            // An acknowledgement settles the message and its offset is committed within
            // 100 ms, not before the acknowledgement returns: a broker restart in between
            // delivers it again (the inbox skips it).
            acks_survive_restart: false,
        }
    }

    fn partition(&self, key: &str) -> Option<u16> {
        // The message id decides only for a message without a key.
        Some(layout::partition(
            Some(key),
            uuid::Uuid::nil(),
            self.inner.options.partitions,
        ))
    }

    async fn provision(&self, channels: &[String]) -> std::result::Result<(), TransportError> {
        let topic = &self.inner.options.topic;
        check_channels(|| format!("provision topic `{topic}`"), channels)?;
        self.ensure_topic().await?;
        tracing::debug!(target: TARGET, topic = %topic, "topic provisioned");
        Ok(())
    }

    async fn publish(&self, batch: &[Outgoing]) -> Vec<std::result::Result<(), TransportError>> {
        let span = tracing::debug_span!(
            target: TARGET,
            "publish",
            topic = %self.inner.options.topic,
            messages = batch.len(),
        );
        self.publish_batch(batch).instrument(span).await
    }

    async fn request(
        &self,
        channel: &str,
        payload: bytes::Bytes,
        timeout: Duration,
    ) -> std::result::Result<bytes::Bytes, TransportError> {
        let span = tracing::debug_span!(target: TARGET, "request", channel = %channel);
        self.send_request(channel, payload, timeout)
            .instrument(span)
            .await
    }

    async fn serve(&self, channel: &str) -> std::result::Result<Box<dyn Requests>, TransportError> {
        self.serve_requests(channel).await
    }

    async fn subscribe(
        &self,
        subscription: &Subscription,
    ) -> std::result::Result<Box<dyn Consumer>, TransportError> {
        let options = &self.inner.options;
        let group = &subscription.group;
        let operation = || format!("subscribe group `{group}`");
        if group.is_empty() {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                "the group name is empty",
            ));
        }
        if subscription.channels.is_empty() {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                "the subscription names no channel",
            ));
        }
        check_channels(operation, &subscription.channels)?;
        if subscription.ack_wait.is_zero() {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                "the ack wait is zero",
            ));
        }
        // A consuming process may start before any publisher provisioned the topic.
        self.ensure_topic().await?;

        let core = Arc::new(consumer::Core::new(
            group.clone(),
            options.topic.clone(),
            subscription.channels.iter().cloned().collect(),
            subscription.ack_wait,
            options.request_timeout,
        ));
        let mut config = options.member_config(&format!("{}.{group}", options.topic));
        config
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        let kafka_consumer: rdkafka::consumer::BaseConsumer<consumer::Context> = config
            .create_with_context(consumer::Context {
                core: Arc::clone(&core),
            })
            .map_err(|error| TransportError::permanent(NAME, operation(), error))?;
        kafka_consumer
            .subscribe(&[options.topic.as_str()])
            .map_err(|error| TransportError::transient(NAME, operation(), error))?;
        let mut companion = options.client_config();
        companion
            .set("group.id", format!("{}.{group}.deliveries", options.topic))
            .set("enable.auto.commit", "false");
        let deliveries: rdkafka::consumer::BaseConsumer<Logs> = companion
            .create_with_context(Logs)
            .map_err(|error| TransportError::permanent(NAME, operation(), error))?;
        let shared = Arc::new(consumer::Shared {
            core,
            consumer: kafka_consumer,
            deliveries,
        });
        let running = Arc::clone(&shared);
        std::thread::Builder::new()
            .name(format!("inseam-kafka-{group}"))
            .spawn(move || running.run())
            .map_err(|error| TransportError::transient(NAME, operation(), error))?;
        let consumer = KafkaConsumer::new(shared);
        if !consumer.wait_assigned(JOIN_WAIT).await {
            return Err(TransportError::transient(
                NAME,
                operation(),
                format!("the consumer group did not take the member in within {JOIN_WAIT:?}"),
            ));
        }
        tracing::debug!(target: TARGET, group = %group, "subscribed");
        Ok(Box::new(consumer))
    }
}
