//! NATS JetStream transport for inseam: a group's events consumed durably in another process,
//! in per-key order.
//!
//! [`Nats`] implements inseam's [`Transport`] on the official `async-nats` client. Its layout
//! (decision 0016 in the repository's `docs/decisions/`):
//!
//! - one stream (`INSEAM` by default, file storage) captures `<prefix>.>`; a message goes to
//!   `<prefix>.<partition>.<channel>`, its partition a stable hash (FNV-1a) of its key, or of
//!   its id when it has none, modulo the partition count (8 by default);
//! - the stream drops a second publish of a message id within its duplicate window
//!   (`Nats-Msg-Id`), and a publish counts only once the server stored it;
//! - a group is one durable pull consumer per partition with `max_ack_pending = 1`: a message
//!   is not handed out while an earlier one of its partition (so of its key) is unsettled,
//!   whichever process of the group holds it, and a message that a crashed process held comes
//!   back after the subscription's ack wait, before anything after it. Since the consumer
//!   reads every channel of its partition in stream order, a key's order holds across the
//!   channels a group reads. A message waiting for its redelivery holds back every key of its
//!   partition, which the transport declares as [`KeyOrder::PerKeyPartitioned`], with
//!   [`Transport::partition`] telling a key's partition.
//!
//! ```no_run
//! use inseam_core::transport::{Consumer, Subscription, Transport};
//! use inseam_nats::{Nats, NatsOptions};
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let nats = Nats::connect_with(NatsOptions::from_env()?).await?;
//! nats.provision(&["orders.order_placed".to_owned()]).await?;
//! let mut consumer = nats
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
//! What a process needs to reach the servers (URLs, credentials, TLS) is in [`NatsOptions`],
//! which also reads `INSEAM_NATS_*` environment variables.

#![warn(missing_docs)]

mod consumer;
mod error;
mod layout;
mod options;

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, ReplayPolicy, pull};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::{ConnectOptions, ServerAddr};
use async_trait::async_trait;
use futures_util::future::try_join_all;
use inseam_core::transport::{
    Capabilities, Consumer, KeyOrder, Outgoing, Subscription, Transport, TransportError,
};
use tokio::time::Instant;
use tracing::Instrument;

pub use consumer::NatsConsumer;
pub use error::{NatsError, Result};
pub use options::{MAX_PARTITIONS, NatsOptions};

use layout::ServerVersion;

/// What the transport reads of a received message and writes on a published one, for the
/// fuzz targets of the repository's `fuzz/` directory. Not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use async_nats::HeaderMap;
    use uuid::Uuid;

    /// A received message's channel (`None` when `subject` is not under `prefix`), key and
    /// application headers, decoded as the consumer does before handing the message out.
    pub fn read_received(
        prefix: &str,
        subject: &str,
        headers: Option<&HeaderMap>,
    ) -> (Option<String>, Option<String>, Vec<(String, String)>) {
        let channel = crate::layout::channel_of(prefix, subject).map(str::to_owned);
        let (key, headers) = crate::layout::decode_headers(headers);
        (channel, key, headers)
    }

    /// The NATS headers of a published message, or why it cannot be published.
    pub fn encode_headers(
        message_id: Uuid,
        key: Option<&str>,
        headers: &[(String, String)],
    ) -> Result<HeaderMap, String> {
        crate::layout::encode_headers(message_id, key, headers)
    }
}

/// The transport's name in errors and logs.
const NAME: &str = "nats";
/// The `tracing` target of everything this crate logs.
const TARGET: &str = "inseam::nats";

/// The NATS JetStream transport. Cloning it shares the connection.
#[derive(Clone)]
pub struct Nats {
    inner: Arc<Inner>,
}

struct Inner {
    client: async_nats::Client,
    /// API requests and acknowledgements, bounded by the request timeout.
    js: async_nats::jetstream::Context,
    /// Publishes, bounded by the publish timeout.
    publisher: async_nats::jetstream::Context,
    options: NatsOptions,
}

impl fmt::Debug for Nats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options = &self.inner.options;
        f.debug_struct("Nats")
            .field("servers", &options.servers)
            .field("stream", &options.stream)
            .field("prefix", &options.prefix)
            .field("partitions", &options.partitions)
            .field("state", &self.inner.client.connection_state())
            .finish_non_exhaustive()
    }
}

impl Nats {
    /// Connects to the servers of `urls` (comma-separated) with the default options; see
    /// [`NatsOptions::from_url`].
    pub async fn connect(urls: &str) -> Result<Self> {
        Nats::connect_with(NatsOptions::from_url(urls)?).await
    }

    /// Connects with `options`. The client reconnects by itself after a lost connection;
    /// meanwhile publishes and fetches fail with transient errors.
    pub async fn connect_with(options: NatsOptions) -> Result<Self> {
        options.validate()?;
        let mut connect = ConnectOptions::new()
            .connection_timeout(options.connection_timeout)
            .ping_interval(options.ping_interval)
            .request_timeout(Some(options.request_timeout))
            .require_tls(options.require_tls)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!(target: TARGET, "connected to a NATS server");
                    }
                    async_nats::Event::Disconnected => {
                        tracing::warn!(target: TARGET, "disconnected from NATS; reconnecting");
                    }
                    // The end of a client the app let go of (its last handle dropped): nothing
                    // is wrong.
                    async_nats::Event::Draining | async_nats::Event::Closed => {
                        tracing::debug!(target: TARGET, event = %event, "NATS client closing");
                    }
                    other => tracing::warn!(target: TARGET, event = %other, "NATS client event"),
                }
            });
        if let Some(name) = &options.client_name {
            connect = connect.name(name);
        }
        if let (Some(user), Some(password)) = (&options.user, &options.password) {
            connect = connect.user_and_password(user.clone(), password.expose().to_owned());
        }
        if let Some(token) = &options.token {
            connect = connect.token(token.expose().to_owned());
        }
        if let Some(path) = &options.credentials {
            connect =
                connect
                    .credentials_file(path)
                    .await
                    .map_err(|source| NatsError::Credentials {
                        path: path.clone(),
                        source,
                    })?;
        }
        if let Some(ca) = &options.tls_ca {
            connect = connect.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &options.tls_client {
            connect = connect.add_client_certificate(cert.clone(), key.clone());
        }
        if options.retry_on_initial_connect {
            connect = connect.retry_on_initial_connect();
        }
        let servers = options
            .servers
            .iter()
            .map(|url| {
                url.parse::<ServerAddr>().map_err(|err| {
                    NatsError::config("servers", format!("`{url}` is not a server URL: {err}"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let client = connect
            .connect(servers)
            .await
            .map_err(|source| NatsError::Connect {
                servers: options.servers.join(","),
                source,
            })?;
        let js = async_nats::jetstream::ContextBuilder::new()
            .timeout(options.request_timeout)
            .build(client.clone());
        let publisher = async_nats::jetstream::ContextBuilder::new()
            .timeout(options.publish_timeout)
            .build(client.clone());
        Ok(Nats {
            inner: Arc::new(Inner {
                client,
                js,
                publisher,
                options,
            }),
        })
    }

    /// The underlying client, for what inseam does not cover (health checks, statistics).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// The options it was connected with.
    pub fn options(&self) -> &NatsOptions {
        &self.inner.options
    }

    fn stream_config(&self) -> stream::Config {
        let options = &self.inner.options;
        stream::Config {
            name: options.stream.clone(),
            description: Some("inseam: messages for groups consumed over NATS".to_owned()),
            subjects: vec![format!("{}.>", options.prefix)],
            storage: StorageType::File,
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::Old,
            duplicate_window: options.duplicate_window,
            max_age: options.max_age.unwrap_or_default(),
            num_replicas: options.replicas,
            ..Default::default()
        }
    }

    /// The consumer of `subscription`'s group on `partition`.
    fn consumer_config(
        &self,
        subscription: &Subscription,
        partition: u16,
        filter_subjects: bool,
    ) -> pull::Config {
        let options = &self.inner.options;
        let name = layout::consumer_name(&subscription.group, partition);
        let (filter_subject, filter_subjects) = if filter_subjects {
            let mut subjects: Vec<String> = subscription
                .channels
                .iter()
                .map(|channel| layout::subject(&options.prefix, partition, channel))
                .collect();
            subjects.sort();
            subjects.dedup();
            (String::new(), subjects)
        } else {
            (format!("{}.{partition}.>", options.prefix), Vec::new())
        };
        pull::Config {
            durable_name: Some(name),
            description: Some(format!(
                "inseam group `{}`, partition {partition}",
                subscription.group
            )),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: subscription.ack_wait,
            // Unlimited: a message that keeps failing becomes a dead letter in the consuming
            // process's database, where it can be repaired and retried.
            max_deliver: -1,
            // One unsettled message per partition keeps per-key order across processes and
            // crashes.
            max_ack_pending: 1,
            replay_policy: ReplayPolicy::Instant,
            filter_subject,
            filter_subjects,
            ..Default::default()
        }
    }

    fn server_version(&self) -> Option<ServerVersion> {
        ServerVersion::parse(&self.inner.client.server_info().version)
    }

    async fn publish_batch(&self, batch: &[Outgoing]) -> Vec<Result<(), TransportError>> {
        let options = &self.inner.options;
        let deadline = Instant::now() + options.publish_timeout;
        let mut outcomes: Vec<Option<Result<(), TransportError>>> =
            batch.iter().map(|_| None).collect();
        // Keys with a message that failed before it was sent: later messages of the key stay
        // back so that a retry cannot land behind them.
        let mut failed_keys: HashSet<&str> = HashSet::new();
        let mut pending = Vec::with_capacity(batch.len());

        for (index, message) in batch.iter().enumerate() {
            let operation = || format!("publish to `{}`", message.channel);
            let key = message.key.as_deref();
            if let Some(key) = key
                && failed_keys.contains(key)
            {
                outcomes[index] = Some(Err(TransportError::transient(
                    NAME,
                    operation(),
                    format!("an earlier message with key `{key}` in this batch was not published"),
                )));
                continue;
            }
            let prepared = prepare(options, message);
            let (subject, headers) = match prepared {
                Ok(prepared) => prepared,
                Err(problem) => {
                    outcomes[index] =
                        Some(Err(TransportError::permanent(NAME, operation(), problem)));
                    failed_keys.extend(key);
                    continue;
                }
            };
            let publish = PublishMessage::build()
                .payload(message.payload.clone())
                .headers(headers);
            let sent = tokio::time::timeout_at(
                deadline,
                self.inner.publisher.send_publish(subject, publish),
            )
            .await;
            match sent {
                Ok(Ok(ack)) => pending.push((index, ack)),
                Ok(Err(err)) => {
                    outcomes[index] = Some(Err(publish_error(operation(), err)));
                    failed_keys.extend(key);
                }
                Err(_) => {
                    outcomes[index] = Some(Err(timed_out(operation(), options)));
                    failed_keys.extend(key);
                }
            }
        }

        // One deadline for every acknowledgement, rather than a timer each: what is unanswered
        // when it passes timed out.
        let mut pending = pending.into_iter();
        let mut waiting = None;
        let answered = tokio::time::timeout_at(deadline, async {
            for (index, ack) in pending.by_ref() {
                waiting = Some(index);
                let answer = ack.await;
                let operation = || format!("publish to `{}`", batch[index].channel);
                outcomes[index] = Some(match answer {
                    Ok(ack) => {
                        if ack.duplicate {
                            tracing::debug!(
                                target: TARGET,
                                message_id = %batch[index].message_id,
                                "the stream already had this message id"
                            );
                        }
                        Ok(())
                    }
                    Err(err) => Err(publish_error(operation(), err)),
                });
            }
            waiting = None;
        })
        .await;
        if answered.is_err() {
            for index in waiting.into_iter().chain(pending.map(|(index, _)| index)) {
                let operation = format!("publish to `{}`", batch[index].channel);
                outcomes[index] = Some(Err(timed_out(operation, options)));
            }
        }

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

/// The subject and headers of a message, or why it cannot be published.
fn prepare(
    options: &NatsOptions,
    message: &Outgoing,
) -> std::result::Result<(String, async_nats::HeaderMap), String> {
    if let Some(problem) = layout::subject_problem(&message.channel) {
        return Err(format!(
            "channel `{}` is not a valid NATS subject: {problem}",
            message.channel
        ));
    }
    let partition = layout::partition(
        message.key.as_deref(),
        message.message_id,
        options.partitions,
    );
    let headers =
        layout::encode_headers(message.message_id, message.key.as_deref(), &message.headers)?;
    Ok((
        layout::subject(&options.prefix, partition, &message.channel),
        headers,
    ))
}

fn timed_out(operation: String, options: &NatsOptions) -> TransportError {
    TransportError::transient(
        NAME,
        operation,
        format!(
            "the server did not confirm within the publish timeout ({:?})",
            options.publish_timeout
        ),
    )
}

fn publish_error(
    operation: String,
    err: async_nats::jetstream::context::PublishError,
) -> TransportError {
    match err.kind() {
        // Refused by the client or the server for what the message is: trying again cannot help.
        PublishErrorKind::MaxPayloadExceeded
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence => TransportError::permanent(NAME, operation, err),
        PublishErrorKind::Other if api_code(&err).is_some_and(|code| code < 500) => {
            TransportError::permanent(NAME, operation, err)
        }
        // Down, slow, or no stream yet (not provisioned, or JetStream still starting).
        _ => TransportError::transient(NAME, operation, err),
    }
}

/// The JetStream API status code behind an error, if the server answered with one.
fn api_code(err: &(dyn std::error::Error + 'static)) -> Option<usize> {
    let mut source = Some(err);
    while let Some(err) = source {
        if let Some(api) = err.downcast_ref::<async_nats::jetstream::Error>() {
            return Some(api.code());
        }
        source = err.source();
    }
    None
}

/// A failed API request: permanent when the server refused it (a 4xx code), transient when
/// it could not be made or the server could not serve it.
fn api_error(
    operation: String,
    err: impl std::error::Error + Send + Sync + 'static,
) -> TransportError {
    if api_code(&err).is_some_and(|code| code < 500) {
        TransportError::permanent(NAME, operation, err)
    } else {
        TransportError::transient(NAME, operation, err)
    }
}

fn check_channels<'a>(
    operation: impl Fn() -> String,
    channels: impl IntoIterator<Item = &'a String>,
) -> std::result::Result<(), TransportError> {
    for channel in channels {
        if let Some(problem) = layout::subject_problem(channel) {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                format!("channel `{channel}` is not a valid NATS subject: {problem}"),
            ));
        }
    }
    Ok(())
}

impl Nats {
    /// The core NATS subject of `channel`'s requests: outside the stream's subjects, so that
    /// requests are neither stored nor answered by JetStream.
    fn request_subject(
        &self,
        channel: &str,
        operation: impl Fn() -> String,
    ) -> std::result::Result<String, TransportError> {
        let subject = format!("{}_rpc.{channel}", self.inner.options.prefix);
        match layout::subject_problem(&subject) {
            Some(problem) => Err(TransportError::permanent(
                NAME,
                operation(),
                format!("channel `{channel}` is not a valid subject: {problem}"),
            )),
            None => Ok(subject),
        }
    }
}

/// The requests of one channel, from a queue subscription.
struct NatsRequests {
    subscriber: async_nats::Subscriber,
    client: async_nats::Client,
}

#[async_trait]
impl inseam_core::transport::Requests for NatsRequests {
    async fn next(&mut self) -> Option<inseam_core::transport::Request> {
        use futures_util::StreamExt as _;
        loop {
            let message = self.subscriber.next().await?;
            // A message without a reply subject is no request: nobody waits for an answer.
            let Some(reply) = message.reply else { continue };
            return Some(inseam_core::transport::Request {
                payload: message.payload,
                responder: Box::new(NatsResponder {
                    client: self.client.clone(),
                    reply,
                }),
            });
        }
    }
}

/// Publishes the answer to the request's reply subject.
struct NatsResponder {
    client: async_nats::Client,
    reply: async_nats::Subject,
}

#[async_trait]
impl inseam_core::transport::Responder for NatsResponder {
    async fn respond(
        self: Box<Self>,
        payload: bytes::Bytes,
    ) -> std::result::Result<(), TransportError> {
        self.client
            .publish(self.reply, payload)
            .await
            .map_err(|error| TransportError::transient(NAME, "answer a request", error))
    }
}

#[async_trait]
impl Transport for Nats {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // One consumer per group and partition, with one message in flight: a message
            // waiting for its redelivery holds back its whole partition, not only its key.
            ordering: KeyOrder::PerKeyPartitioned {
                partitions: self.inner.options.partitions,
            },
            delayed_redelivery: true,
            native_delayed_delivery: false,
            native_dead_letters: false,
            deduplicates: true,
            request_reply: true,
            // nats-server writes a consumer's progress to its store some time after
            // confirming an acknowledgement, and before 2.14 by truncating the file first: a
            // server that stops (even cleanly) while it writes can restart a consumer from the
            // beginning of its partition, delivering acknowledged messages again with attempt
            // 1 (decision 0016).
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
        let stream = &self.inner.options.stream;
        check_channels(|| format!("provision stream `{stream}`"), channels)?;
        self.inner
            .js
            .create_or_update_stream(self.stream_config())
            .await
            .map_err(|err| api_error(format!("create or update stream `{stream}`"), err))?;
        tracing::debug!(target: TARGET, stream = %stream, "stream provisioned");
        Ok(())
    }

    async fn publish(&self, batch: &[Outgoing]) -> Vec<std::result::Result<(), TransportError>> {
        let span = tracing::debug_span!(
            target: TARGET,
            "publish",
            stream = %self.inner.options.stream,
            messages = batch.len(),
        );
        self.publish_batch(batch).instrument(span).await
    }

    async fn request(
        &self,
        channel: &str,
        payload: bytes::Bytes,
        timeout: std::time::Duration,
    ) -> std::result::Result<bytes::Bytes, TransportError> {
        let operation = || format!("send a request on `{channel}`");
        let subject = self.request_subject(channel, operation)?;
        match tokio::time::timeout(timeout, self.inner.client.request(subject, payload)).await {
            Ok(Ok(message)) => Ok(message.payload),
            Ok(Err(error)) => Err(TransportError::transient(NAME, operation(), error)),
            Err(_) => Err(TransportError::transient(
                NAME,
                operation(),
                format!("no answer within {timeout:?}"),
            )),
        }
    }

    async fn serve(
        &self,
        channel: &str,
    ) -> std::result::Result<Box<dyn inseam_core::transport::Requests>, TransportError> {
        let operation = || format!("serve requests on `{channel}`");
        let subject = self.request_subject(channel, operation)?;
        // One queue group: each request goes to one server, in whichever process.
        let subscriber = self
            .inner
            .client
            .queue_subscribe(subject, "inseam".to_owned())
            .await
            .map_err(|error| TransportError::transient(NAME, operation(), error))?;
        Ok(Box::new(NatsRequests {
            subscriber,
            client: self.inner.client.clone(),
        }))
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

        // A consuming process may start before any publisher provisioned the stream.
        self.inner
            .js
            .get_or_create_stream(self.stream_config())
            .await
            .map_err(|err| api_error(format!("get or create stream `{}`", options.stream), err))?;

        let version = self.server_version();
        let filter_subjects = version.is_some_and(ServerVersion::has_filter_subjects);
        tracing::debug!(
            target: TARGET,
            group = %group,
            server = %self.inner.client.server_info().version,
            filter_subjects,
            "subscribing"
        );
        let only = (!filter_subjects).then(|| {
            Arc::new(
                subscription
                    .channels
                    .iter()
                    .cloned()
                    .collect::<HashSet<_>>(),
            )
        });
        let partitions: Vec<consumer::Partition> = (0..options.partitions)
            .map(|partition| consumer::Partition {
                js: self.inner.js.clone(),
                stream: options.stream.clone(),
                config: self.consumer_config(subscription, partition, filter_subjects),
                partition,
                group: group.clone(),
                prefix: options.prefix.clone(),
                only: only.clone(),
            })
            .collect();
        let created = try_join_all(partitions.iter().map(|partition| {
            self.inner
                .js
                .create_consumer_on_stream(partition.config.clone(), options.stream.as_str())
        }))
        .await
        .map_err(|err| api_error(operation(), err))?;

        Ok(Box::new(NatsConsumer::start(
            self.inner.client.clone(),
            group.clone(),
            subscription.ack_wait,
            partitions.into_iter().zip(created).collect(),
        )))
    }
}
