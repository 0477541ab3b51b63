//! RabbitMQ (AMQP 0.9.1) transport for inseam: a group's events consumed durably in another
//! process, in per-key order.
//!
//! [`Amqp`] implements inseam's [`Transport`] on the `lapin` client. Its layout (decision 0020
//! in the repository's `docs/decisions/`):
//!
//! - one durable topic exchange (`inseam` by default); a message goes out with routing key
//!   `<partition>.<channel>`, its partition a stable hash (FNV-1a) of its key, or of its id
//!   when it has none, modulo the partition count (8 by default); a publish counts only once
//!   the server confirmed it (publisher confirms), persistent;
//! - a group is one durable quorum queue per partition, `<prefix>.<group>.<partition>`, bound
//!   to `<partition>.<channel>` for each channel it reads, with a single active consumer:
//!   whichever process of the group consumes it, the queue hands out one message at a time
//!   (prefetch 1), so a message is not handed out while an earlier one of its partition (so of
//!   its key) is unsettled, and one a crashed process held goes back first. Since the queue
//!   gets every channel of its partition in publish order, a key's order holds across the
//!   channels a group reads. A message waiting for its redelivery holds back every key of
//!   its partition, which the transport declares as [`KeyOrder::PerKeyPartitioned`], with
//!   [`Transport::partition`] telling a key's partition;
//! - a nacked message stays unacknowledged (a quorum queue would put a message given back
//!   behind the others): the consumer holds it for the delay, its partition with it, and hands
//!   it out again with its attempt raised; each such nack is recorded on the server first, so
//!   that a message left by a consumer that died comes to the next one with the right attempt
//!   (`x-delivery-count`, plus the recorded nacks). A message not settled within the
//!   subscription's ack wait is handed out again the same way;
//! - a group new to the server first gets what was published before, copied from a history
//!   stream that keeps every message for 7 days ([`AmqpOptions::history`]);
//! - request-reply goes through a queue per request channel, answers through direct reply-to.
//!
//! ```no_run
//! use inseam_core::transport::{Consumer, Subscription, Transport};
//! use inseam_amqp::{Amqp, AmqpOptions};
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let amqp = Amqp::connect_with(AmqpOptions::from_env()?).await?;
//! amqp.provision(&["orders.order_placed".to_owned()]).await?;
//! let mut consumer = amqp
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
//! What a process needs to reach the servers (URLs, credentials, TLS) is in [`AmqpOptions`],
//! which also reads `INSEAM_AMQP_*` environment variables.

#![warn(missing_docs)]

mod backfill;
mod consumer;
mod error;
mod layout;
mod link;
mod options;
mod rpc;
mod topology;

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use inseam_core::transport::{
    Capabilities, Consumer, KeyOrder, Outgoing, Subscription, Transport, TransportError,
};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::time::Instant;
use tracing::Instrument;

pub use consumer::AmqpConsumer;
pub use error::{AmqpError, Result};
pub use options::{AmqpOptions, MAX_PARTITIONS};

use link::Link;
use topology::Topology;

/// The transport's name in errors and logs.
const NAME: &str = "amqp";
/// The `tracing` target of everything this crate logs.
const TARGET: &str = "inseam::amqp";

/// The RabbitMQ transport. Cloning it shares the publishing connection; each consumer has a
/// connection of its own.
#[derive(Clone)]
pub struct Amqp {
    inner: Arc<Inner>,
}

struct Inner {
    options: Arc<AmqpOptions>,
    /// Publishing and provisioning.
    link: Link,
    /// The publishing channel, in confirm mode; `None` until first used and after it failed.
    publishing: tokio::sync::Mutex<Option<Channel>>,
}

impl fmt::Debug for Amqp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options = &self.inner.options;
        f.debug_struct("Amqp")
            .field("servers", &options.servers)
            .field("exchange", &options.exchange)
            .field("prefix", &options.prefix)
            .field("partitions", &options.partitions)
            .field("connected", &self.inner.link.connected())
            .finish_non_exhaustive()
    }
}

impl Amqp {
    /// Connects to the servers of `urls` (comma-separated) with the default options; see
    /// [`AmqpOptions::from_url`].
    pub async fn connect(urls: &str) -> Result<Self> {
        Amqp::connect_with(AmqpOptions::from_url(urls)?).await
    }

    /// Connects with `options`, trying the servers in order. After a lost connection, the
    /// transport connects again when next used (publishing, or each consumer by itself);
    /// meanwhile publishes and fetches fail with transient errors.
    pub async fn connect_with(options: AmqpOptions) -> Result<Self> {
        options.validate()?;
        let options = Arc::new(options);
        let link = Link::new(Arc::clone(&options), "publisher")?;
        link.connect_now().await?;
        Ok(Amqp {
            inner: Arc::new(Inner {
                options,
                link,
                publishing: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// The options it was connected with.
    pub fn options(&self) -> &AmqpOptions {
        &self.inner.options
    }

    /// The publishing channel, opened (in confirm mode) when there is none or it failed.
    async fn publishing_channel(
        &self,
        slot: &mut Option<Channel>,
    ) -> std::result::Result<Channel, TransportError> {
        if let Some(channel) = slot.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        slot.take();
        let operation = || "open a publishing channel".to_owned();
        let channel = self
            .inner
            .link
            .channel()
            .await
            .map_err(|err| TransportError::transient(NAME, operation(), err))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|err| lapin_error(operation(), err))?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    async fn publish_batch(
        &self,
        batch: &[Outgoing],
    ) -> Vec<std::result::Result<(), TransportError>> {
        let options = &self.inner.options;
        let deadline = Instant::now() + options.publish_timeout;
        let mut outcomes: Vec<Option<std::result::Result<(), TransportError>>> =
            batch.iter().map(|_| None).collect();
        // One batch at a time on the channel: its messages go out in order, and a confirm
        // belongs to one batch.
        let mut slot = match tokio::time::timeout_at(deadline, self.inner.publishing.lock()).await {
            Ok(slot) => slot,
            Err(_) => {
                return batch
                    .iter()
                    .map(|message| Err(timed_out(publish_operation(message), options)))
                    .collect();
            }
        };
        let channel =
            match tokio::time::timeout_at(deadline, self.publishing_channel(&mut slot)).await {
                Ok(Ok(channel)) => channel,
                Ok(Err(error)) => {
                    let transient = error.transient;
                    let reason = error_text(&error);
                    return batch
                        .iter()
                        .map(|message| {
                            let operation = publish_operation(message);
                            Err(if transient {
                                TransportError::transient(NAME, operation, reason.clone())
                            } else {
                                TransportError::permanent(NAME, operation, reason.clone())
                            })
                        })
                        .collect();
                }
                Err(_) => {
                    return batch
                        .iter()
                        .map(|message| Err(timed_out(publish_operation(message), options)))
                        .collect();
                }
            };

        // Keys with a message that failed before it was sent: later messages of the key stay
        // back so that a retry cannot land behind them.
        let mut failed_keys: HashSet<&str> = HashSet::new();
        // Once the channel failed, nothing more is sent on it.
        let mut broken = false;
        let mut pending = Vec::with_capacity(batch.len());
        for (index, message) in batch.iter().enumerate() {
            let operation = || publish_operation(message);
            let key = message.key.as_deref();
            if broken {
                outcomes[index] = Some(Err(TransportError::transient(
                    NAME,
                    operation(),
                    "the publishing channel failed on an earlier message of this batch",
                )));
                continue;
            }
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
            let (routing_key, properties) = match prepare(options, message) {
                Ok(prepared) => prepared,
                Err(problem) => {
                    outcomes[index] =
                        Some(Err(TransportError::permanent(NAME, operation(), problem)));
                    failed_keys.extend(key);
                    continue;
                }
            };
            let sent = tokio::time::timeout_at(
                deadline,
                channel.basic_publish(
                    options.exchange.as_str().into(),
                    routing_key,
                    BasicPublishOptions::default(),
                    &message.payload,
                    properties,
                ),
            )
            .await;
            match sent {
                Ok(Ok(confirm)) => pending.push((index, confirm)),
                Ok(Err(err)) => {
                    outcomes[index] = Some(Err(lapin_error(operation(), err)));
                    failed_keys.extend(key);
                    broken = true;
                }
                Err(_) => {
                    outcomes[index] = Some(Err(timed_out(operation(), options)));
                    failed_keys.extend(key);
                    broken = true;
                }
            }
        }

        for (index, confirm) in pending {
            let operation = || publish_operation(&batch[index]);
            outcomes[index] = Some(match tokio::time::timeout_at(deadline, confirm).await {
                Ok(Ok(Confirmation::Ack(returned))) => {
                    if returned.is_some() {
                        tracing::debug!(
                            target: TARGET,
                            message_id = %batch[index].message_id,
                            "no queue is bound for this message's channel and partition yet"
                        );
                    }
                    Ok(())
                }
                Ok(Ok(Confirmation::Nack(_))) => Err(TransportError::transient(
                    NAME,
                    operation(),
                    "the server refused the message (a negative confirm)",
                )),
                Ok(Ok(Confirmation::NotRequested)) => {
                    broken = true;
                    Err(TransportError::transient(
                        NAME,
                        operation(),
                        "the channel was not in confirm mode",
                    ))
                }
                Ok(Err(err)) => {
                    broken = true;
                    Err(lapin_error(operation(), err))
                }
                Err(_) => {
                    broken = true;
                    Err(timed_out(operation(), options))
                }
            });
        }
        if broken && let Some(channel) = slot.take() {
            // A new channel for the next batch: confirms still owed on this one must not be
            // taken for the next batch's.
            tokio::spawn(async move {
                let _ = channel.close(200, "inseam: publishing failed".into()).await;
            });
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

fn publish_operation(message: &Outgoing) -> String {
    format!("publish to `{}`", message.channel)
}

/// The error's own text and its sources', for reporting it again under another operation.
fn error_text(error: &TransportError) -> String {
    let mut text = String::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(err) = source {
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}

/// The routing key and properties of a message, or why it cannot be published.
fn prepare(
    options: &AmqpOptions,
    message: &Outgoing,
) -> std::result::Result<(ShortString, BasicProperties), String> {
    if let Some(problem) = layout::channel_problem(&message.channel) {
        return Err(format!(
            "channel `{}` cannot be carried in a routing key: {problem}",
            message.channel
        ));
    }
    let partition = layout::partition(
        message.key.as_deref(),
        message.message_id,
        options.partitions,
    );
    let routing_key = ShortString::try_new(layout::routing_key(partition, &message.channel))
        .map_err(|err| format!("the routing key is too long: {err}"))?;
    let properties = BasicProperties::default()
        // Persistent: a quorum queue stores every message anyway; a classic one needs it.
        .with_delivery_mode(2)
        .with_message_id(message.message_id.to_string().into())
        .with_headers(layout::encode_headers(
            message.key.as_deref(),
            &message.headers,
        ));
    Ok((routing_key, properties))
}

fn timed_out(operation: String, options: &AmqpOptions) -> TransportError {
    TransportError::transient(
        NAME,
        operation,
        format!(
            "the server did not confirm within the publish timeout ({:?})",
            options.publish_timeout
        ),
    )
}

/// A failed AMQP operation: permanent when the server refused it for what it is (access,
/// arguments that contradict an existing queue, a message too large, a protocol misuse),
/// transient when the server or the connection could not serve it.
fn lapin_error(operation: String, err: lapin::Error) -> TransportError {
    let permanent = match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(
                AMQPSoftError::ACCESSREFUSED
                    | AMQPSoftError::PRECONDITIONFAILED
                    | AMQPSoftError::CONTENTTOOLARGE
            ) | AMQPErrorKind::Hard(
                AMQPHardError::NOTALLOWED
                    | AMQPHardError::SYNTAXERROR
                    | AMQPHardError::COMMANDINVALID
                    | AMQPHardError::NOTIMPLEMENTED
                    | AMQPHardError::FRAMEERROR
            )
        ),
        lapin::ErrorKind::InvalidProtocolVersion(_) | lapin::ErrorKind::SerialisationError(_) => {
            true
        }
        _ => false,
    };
    if permanent {
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
        if let Some(problem) = layout::channel_problem(channel) {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                format!("channel `{channel}` cannot be carried in a routing key: {problem}"),
            ));
        }
    }
    Ok(())
}

#[async_trait]
impl Transport for Amqp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // One queue per group and partition, one message in flight: a message waiting
            // for its redelivery holds back its whole partition, not only its key.
            ordering: KeyOrder::PerKeyPartitioned {
                partitions: self.inner.options.partitions,
            },
            delayed_redelivery: true,
            native_delayed_delivery: false,
            native_dead_letters: false,
            deduplicates: false,
            request_reply: true,
            // A quorum queue commits an acknowledgement to its log before it forgets the
            // message; an acknowledged message is gone after a restart.
            acks_survive_restart: true,
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
        let exchange = &self.inner.options.exchange;
        let operation = || format!("declare exchange `{exchange}`");
        check_channels(operation, channels)?;
        let timeout = self.inner.options.request_timeout;
        let declared = tokio::time::timeout(timeout, async {
            let channel = self
                .inner
                .link
                .channel()
                .await
                .map_err(|err| TransportError::transient(NAME, operation(), err))?;
            let mut declared = topology::declare_exchange(&channel, exchange)
                .await
                .map_err(|err| lapin_error(operation(), err));
            if let (Ok(()), Some(max_age)) = (&declared, self.inner.options.history) {
                let prefix = &self.inner.options.prefix;
                declared = topology::declare_history(&channel, exchange, prefix, max_age)
                    .await
                    .map_err(|err| {
                        lapin_error(
                            format!("declare stream `{}`", topology::history_stream(prefix)),
                            err,
                        )
                    });
            }
            let _ = channel.close(200, "inseam: provisioned".into()).await;
            declared
        })
        .await
        .unwrap_or_else(|_| {
            Err(TransportError::transient(
                NAME,
                operation(),
                format!("the server did not answer within {timeout:?}"),
            ))
        });
        declared?;
        tracing::debug!(target: TARGET, exchange = %exchange, "exchange provisioned");
        Ok(())
    }

    async fn publish(&self, batch: &[Outgoing]) -> Vec<std::result::Result<(), TransportError>> {
        let span = tracing::debug_span!(
            target: TARGET,
            "publish",
            exchange = %self.inner.options.exchange,
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
        let queue = rpc::request_queue(&self.inner.options.prefix, channel, operation)?;
        rpc::request(&self.inner.link, &queue, payload, timeout, operation).await
    }

    async fn serve(
        &self,
        channel: &str,
    ) -> std::result::Result<Box<dyn inseam_core::transport::Requests>, TransportError> {
        let operation = || format!("serve requests on `{channel}`");
        let queue = rpc::request_queue(&self.inner.options.prefix, channel, operation)?;
        let timeout = self.inner.options.request_timeout;
        tokio::time::timeout(timeout, rpc::serve(&self.inner.link, &queue, operation))
            .await
            .unwrap_or_else(|_| {
                Err(TransportError::transient(
                    NAME,
                    operation(),
                    format!("the server did not answer within {timeout:?}"),
                ))
            })
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
        let topology = Arc::new(Topology::new(options, group, &subscription.channels));
        // A connection of the consumer's own: dropping the consumer closes it, which gives
        // back at once what it held.
        let link = Arc::new(
            Link::new(Arc::clone(options), "consumer")
                .map_err(|err| TransportError::permanent(NAME, operation(), err))?,
        );
        // The queues and bindings exist once this returns: messages published from now on
        // reach the group, even before its consumer takes them; and a group new to the
        // server has its history to read first.
        if let Err(error) = backfill::set_up(&link, &topology, options.request_timeout).await {
            link.close().await;
            return Err(error);
        }
        tracing::debug!(target: TARGET, group = %group, "subscribing");
        Ok(Box::new(AmqpConsumer::start(
            link,
            topology,
            group.clone(),
            subscription.ack_wait,
        )))
    }
}
