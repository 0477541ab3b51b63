//! Request-reply over Kafka, as Spring's `ReplyingKafkaTemplate` does it (decision 0021):
//!
//! - every request goes to one requests topic (`<topic>.requests`, created explicitly with the
//!   transport's partition count), its channel in a header, on a partition picked from its
//!   correlation id; the servers of a channel are a consumer group
//!   (`<topic>.requests.<channel>`) that reads the topic and skips the other channels'
//!   requests, so each request goes to one server;
//! - each requesting transport has a reply topic of its own (`<topic>.replies.<uuid>`, one
//!   partition, created explicitly at its first request and read from its start, which is its
//!   end, by a consumer assigned to it, outside any group), named in the request's
//!   `inseam-reply-to` header; the server produces its answer there with the request's
//!   `inseam-correlation` header, which the requester matches to the request waiting for it;
//!   the topic is deleted when the transport is dropped (a process that dies leaves it);
//! - a request carries its deadline (`inseam-deadline`, Unix milliseconds): a server skips a
//!   request whose requester gave up, so that a group that joins late does not answer old
//!   requests. A request nobody answers (nobody serves the channel, or its server is gone or
//!   silent) fails as transient at its timeout.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use inseam_core::transport::{Request, Requests, Responder, TransportError};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, Rebalance};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::layout::CHANNEL_HEADER;
use crate::options::KafkaOptions;
use crate::{Kafka, Logs, NAME, TARGET};

/// The header that matches an answer to its request.
pub(crate) const CORRELATION_HEADER: &str = "inseam-correlation";
/// The header naming the requester's reply topic.
pub(crate) const REPLY_TO_HEADER: &str = "inseam-reply-to";
/// The header holding the time the requester stops waiting (Unix milliseconds).
pub(crate) const DEADLINE_HEADER: &str = "inseam-deadline";
/// How long a consumer thread waits for a record before it looks whether to stop.
const POLL: Duration = Duration::from_millis(100);
/// How many received requests wait for their server's task.
const QUEUE: usize = 64;

/// The topic every request goes to.
pub(crate) fn requests_topic(topic: &str) -> String {
    format!("{topic}.requests")
}

/// The consumer group of `channel`'s servers.
fn requests_group(topic: &str, channel: &str) -> String {
    format!("{topic}.requests.{channel}")
}

fn now_millis() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis())
}

fn header<'a>(
    headers: Option<&'a rdkafka::message::BorrowedHeaders>,
    name: &str,
) -> Option<&'a str> {
    headers?
        .iter()
        .find(|header| header.key == name)
        .and_then(|header| std::str::from_utf8(header.value?).ok())
}

/// Creates `name` with `partitions` partitions; one that exists already is fine.
pub(crate) async fn create_topic(
    admin: &AdminClient<Logs>,
    options: &KafkaOptions,
    name: &str,
    partitions: u16,
) -> Result<(), TransportError> {
    let operation = || format!("create topic `{name}`");
    let new = NewTopic::new(
        name,
        i32::from(partitions),
        TopicReplication::Fixed(i32::from(options.replication)),
    );
    let admin_options = AdminOptions::new()
        .request_timeout(Some(options.request_timeout))
        .operation_timeout(Some(options.request_timeout));
    let created = tokio::time::timeout(
        options.request_timeout + Duration::from_secs(1),
        admin.create_topics([&new], &admin_options),
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
            Ok(_) => tracing::debug!(target: TARGET, topic = %name, partitions, "topic created"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((_, code)) => {
                return Err(TransportError::transient(
                    NAME,
                    operation(),
                    rdkafka::error::KafkaError::AdminOp(code),
                ));
            }
        }
    }
    Ok(())
}

/// The requests waiting for their answers, shared with the reply topic's consumer thread.
#[derive(Default)]
struct Waiting {
    answers: Mutex<HashMap<String, oneshot::Sender<Bytes>>>,
    stop: AtomicBool,
}

impl Waiting {
    fn answers(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Bytes>>> {
        self.answers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A transport's reply topic and the consumer reading it; the topic is deleted once this is
/// dropped.
pub(crate) struct Replies {
    pub(crate) topic: String,
    waiting: Arc<Waiting>,
}

impl Replies {
    /// Creates the transport's reply topic and starts reading it.
    pub(crate) async fn start(
        options: &KafkaOptions,
        admin: &AdminClient<Logs>,
    ) -> Result<Replies, TransportError> {
        let topic = format!(
            "{}.replies.{}",
            options.topic,
            uuid::Uuid::now_v7().simple()
        );
        let operation = || format!("read replies from topic `{topic}`");
        create_topic(admin, options, &topic, 1).await?;
        let mut config = options.consumer_config();
        config
            .set("group.id", &topic)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        let consumer: BaseConsumer<Logs> = config
            .create_with_context(Logs)
            .map_err(|error| TransportError::permanent(NAME, operation(), error))?;
        let mut assignment = TopicPartitionList::new();
        // The topic is new: its start is its end.
        assignment
            .add_partition_offset(&topic, 0, Offset::Beginning)
            .map_err(|error| TransportError::permanent(NAME, operation(), error))?;
        consumer
            .assign(&assignment)
            .map_err(|error| TransportError::transient(NAME, operation(), error))?;
        // Deletes the topic once the transport is dropped.
        let deleter: AdminClient<Logs> = options
            .client_config()
            .create_with_context(Logs)
            .map_err(|error| TransportError::permanent(NAME, operation(), error))?;
        let waiting = Arc::new(Waiting::default());
        let running = Arc::clone(&waiting);
        let read = topic.clone();
        let request_timeout = options.request_timeout;
        std::thread::Builder::new()
            .name("inseam-kafka-replies".to_owned())
            .spawn(move || {
                read_replies(&consumer, &running);
                drop(consumer);
                delete_topic(&deleter, &read, request_timeout);
            })
            .map_err(|error| TransportError::transient(NAME, operation(), error))?;
        tracing::debug!(target: TARGET, topic = %topic, "reply topic created");
        Ok(Replies { topic, waiting })
    }

    fn expect(&self, correlation: &str) -> oneshot::Receiver<Bytes> {
        let (sender, receiver) = oneshot::channel();
        self.waiting
            .answers()
            .insert(correlation.to_owned(), sender);
        receiver
    }

    fn forget(&self, correlation: &str) {
        self.waiting.answers().remove(correlation);
    }
}

impl Drop for Replies {
    fn drop(&mut self) {
        self.waiting.stop.store(true, Ordering::SeqCst);
    }
}

/// The reply topic's consumer thread: hands each answer to the request waiting for it.
fn read_replies(consumer: &BaseConsumer<Logs>, waiting: &Waiting) {
    while !waiting.stop.load(Ordering::SeqCst) {
        match consumer.poll(POLL) {
            Some(Ok(message)) => {
                let Some(correlation) = header(message.headers(), CORRELATION_HEADER) else {
                    continue;
                };
                let sender = waiting.answers().remove(correlation);
                match sender {
                    Some(sender) => {
                        let answer = Bytes::copy_from_slice(message.payload().unwrap_or_default());
                        let _ = sender.send(answer);
                    }
                    None => {
                        tracing::debug!(target: TARGET, correlation, "an answer came after its request gave up");
                    }
                }
            }
            Some(Err(error)) => {
                tracing::debug!(target: TARGET, error = %error, "reading replies failed");
            }
            None => {}
        }
    }
}

/// Deletes the reply topic of a dropped transport, when the brokers answer in time.
fn delete_topic(admin: &AdminClient<Logs>, topic: &str, timeout: Duration) {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    let admin_options = AdminOptions::new().operation_timeout(Some(timeout));
    let deleted = runtime.block_on(async {
        tokio::time::timeout(timeout, admin.delete_topics(&[topic], &admin_options)).await
    });
    match deleted {
        Ok(Ok(results)) if results.iter().all(Result::is_ok) => {
            tracing::debug!(target: TARGET, topic, "reply topic deleted");
        }
        other => {
            tracing::debug!(target: TARGET, topic, outcome = ?other.map(|r| r.map(|_| ())), "the reply topic was not deleted");
        }
    }
}

impl Kafka {
    /// The transport's reply topic, created at the first request.
    async fn replies(&self) -> Result<&Replies, TransportError> {
        let inner = &self.inner;
        inner
            .replies
            .get_or_try_init(|| async {
                create_topic(
                    &inner.admin,
                    &inner.options,
                    &requests_topic(&inner.options.topic),
                    inner.options.partitions,
                )
                .await?;
                Replies::start(&inner.options, &inner.admin).await
            })
            .await
    }

    pub(crate) async fn send_request(
        &self,
        channel: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let operation = || format!("send a request on `{channel}`");
        if let Some(problem) = crate::layout::channel_problem(channel) {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                format!("channel `{channel}` cannot be carried: {problem}"),
            ));
        }
        let deadline = Instant::now() + timeout;
        let gave_up = || {
            TransportError::transient(NAME, operation(), format!("no answer within {timeout:?}"))
        };
        let replies = tokio::time::timeout_at(deadline, self.replies())
            .await
            .map_err(|_| gave_up())??;
        let correlation = uuid::Uuid::now_v7();
        let id = correlation.to_string();
        let answer = replies.expect(&id);
        let deadline_millis = (now_millis() + timeout.as_millis()).to_string();
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: CHANNEL_HEADER,
                value: Some(channel.as_bytes()),
            })
            .insert(Header {
                key: CORRELATION_HEADER,
                value: Some(id.as_bytes()),
            })
            .insert(Header {
                key: REPLY_TO_HEADER,
                value: Some(replies.topic.as_bytes()),
            })
            .insert(Header {
                key: DEADLINE_HEADER,
                value: Some(deadline_millis.as_bytes()),
            });
        let options = &self.inner.options;
        let topic = requests_topic(&options.topic);
        // The correlation id (its random low bits) spreads the requests over the partitions,
        // and so over the servers.
        let partitions = u128::from(options.partitions.max(1));
        let partition = i32::try_from(correlation.as_u128() % partitions).unwrap_or(0);
        let record = FutureRecord::<[u8], [u8]>::to(&topic)
            .partition(partition)
            .payload(&payload[..])
            .headers(headers);
        let producer = self.producer();
        let sent = match producer.send_result(record) {
            Ok(delivery) => match tokio::time::timeout_at(deadline, delivery).await {
                Ok(Ok(Ok(_))) => Ok(()),
                Ok(Ok(Err((error, _)))) => Err(TransportError::transient(NAME, operation(), error)),
                Ok(Err(_)) => Err(TransportError::transient(
                    NAME,
                    operation(),
                    "the producer dropped the request",
                )),
                Err(_) => Err(gave_up()),
            },
            Err((error, _)) => Err(TransportError::transient(NAME, operation(), error)),
        };
        if let Err(error) = sent {
            replies.forget(&id);
            return Err(error);
        }
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(answer)) => Ok(answer),
            _ => {
                replies.forget(&id);
                Err(gave_up())
            }
        }
    }

    pub(crate) async fn serve_requests(
        &self,
        channel: &str,
    ) -> Result<Box<dyn Requests>, TransportError> {
        let operation = || format!("serve requests on `{channel}`");
        if let Some(problem) = crate::layout::channel_problem(channel) {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                format!("channel `{channel}` cannot be carried: {problem}"),
            ));
        }
        let options = &self.inner.options;
        let topic = requests_topic(&options.topic);
        create_topic(&self.inner.admin, options, &topic, options.partitions).await?;
        let assigned = Arc::new(AtomicBool::new(false));
        let mut config = options.member_config(&requests_group(&options.topic, channel));
        config
            // A request is answered at most once: read is done, whether answered or not
            // (its requester gives up at its timeout).
            .set("enable.auto.commit", "true")
            // A new group reads the requests still waiting; older ones are past their
            // deadline and skipped.
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false");
        let consumer: BaseConsumer<ServeContext> = config
            .create_with_context(ServeContext {
                assigned: Arc::clone(&assigned),
            })
            .map_err(|error| TransportError::permanent(NAME, operation(), error))?;
        consumer
            .subscribe(&[topic.as_str()])
            .map_err(|error| TransportError::transient(NAME, operation(), error))?;
        let (sender, receiver) = mpsc::channel(QUEUE);
        let kafka = self.clone();
        let served = channel.to_owned();
        std::thread::Builder::new()
            .name(format!("inseam-kafka-serve-{channel}"))
            .spawn(move || read_requests(&consumer, &kafka, &served, &sender))
            .map_err(|error| TransportError::transient(NAME, operation(), error))?;
        let waited = Instant::now() + crate::JOIN_WAIT;
        while !assigned.load(Ordering::SeqCst) {
            if Instant::now() > waited {
                return Err(TransportError::transient(
                    NAME,
                    operation(),
                    format!(
                        "the consumer group did not take the server in within {:?}",
                        crate::JOIN_WAIT
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::debug!(target: TARGET, channel, "serving requests");
        Ok(Box::new(KafkaRequests { receiver }))
    }
}

/// A server's consumer callbacks: logs, and whether the group assigned it partitions.
struct ServeContext {
    assigned: Arc<AtomicBool>,
}

impl ClientContext for ServeContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::log_rdkafka(level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        // Lost connections are reported here too; librdkafka reconnects by itself.
        tracing::debug!(target: TARGET, error = %error, reason, "Kafka client error");
    }
}

impl ConsumerContext for ServeContext {
    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = rebalance {
            self.assigned.store(true, Ordering::SeqCst);
        }
    }
}

/// A server's consumer thread: hands the channel's live requests to its task until the
/// task drops its [`KafkaRequests`].
fn read_requests(
    consumer: &BaseConsumer<ServeContext>,
    kafka: &Kafka,
    channel: &str,
    sender: &mpsc::Sender<Request>,
) {
    while !sender.is_closed() {
        let message = match consumer.poll(POLL) {
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                tracing::debug!(target: TARGET, channel, error = %error, "reading requests failed");
                continue;
            }
            None => continue,
        };
        let headers = message.headers();
        if header(headers, CHANNEL_HEADER) != Some(channel) {
            continue;
        }
        let (Some(correlation), Some(reply_to)) = (
            header(headers, CORRELATION_HEADER),
            header(headers, REPLY_TO_HEADER),
        ) else {
            continue;
        };
        let expired = header(headers, DEADLINE_HEADER)
            .and_then(|deadline| deadline.parse::<u128>().ok())
            .is_some_and(|deadline| deadline <= now_millis());
        if expired {
            tracing::debug!(target: TARGET, channel, correlation, "skipping a request whose requester gave up");
            continue;
        }
        let request = Request {
            payload: Bytes::copy_from_slice(message.payload().unwrap_or_default()),
            responder: Box::new(KafkaResponder {
                kafka: kafka.clone(),
                reply_to: reply_to.to_owned(),
                correlation: correlation.to_owned(),
            }),
        };
        if sender.blocking_send(request).is_err() {
            break;
        }
    }
    tracing::debug!(target: TARGET, channel, "no longer serving requests");
}

/// The requests of one channel, as a server receives them.
struct KafkaRequests {
    receiver: mpsc::Receiver<Request>,
}

#[async_trait]
impl Requests for KafkaRequests {
    async fn next(&mut self) -> Option<Request> {
        self.receiver.recv().await
    }
}

/// Answers one request on its requester's reply topic.
struct KafkaResponder {
    kafka: Kafka,
    reply_to: String,
    correlation: String,
}

#[async_trait]
impl Responder for KafkaResponder {
    async fn respond(self: Box<Self>, payload: Bytes) -> Result<(), TransportError> {
        let operation = || format!("answer on topic `{}`", self.reply_to);
        let headers = OwnedHeaders::new_with_capacity(1).insert(Header {
            key: CORRELATION_HEADER,
            value: Some(self.correlation.as_bytes()),
        });
        let record = FutureRecord::<[u8], [u8]>::to(&self.reply_to)
            .partition(0)
            .payload(&payload[..])
            .headers(headers);
        let timeout = self.kafka.inner.options.publish_timeout + Duration::from_secs(1);
        let producer = self.kafka.producer();
        let delivery = producer
            .send_result(record)
            .map_err(|(error, _)| TransportError::transient(NAME, operation(), error))?;
        match tokio::time::timeout(timeout, delivery).await {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err((error, _)))) => Err(TransportError::transient(NAME, operation(), error)),
            Ok(Err(_)) => Err(TransportError::transient(
                NAME,
                operation(),
                "the producer dropped the answer",
            )),
            Err(_) => Err(TransportError::transient(
                NAME,
                operation(),
                format!("the brokers did not confirm within {timeout:?}"),
            )),
        }
    }
}
