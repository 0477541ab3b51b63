//! The transport seam: what a broker must do to carry a group's messages to another process.
//!
//! A [`Transport`] publishes envelopes, each in its CloudEvents JSON form unchanged, with its
//! key and headers, and says when the broker has them; and it consumes a group durably,
//! handing out [`Incoming`] messages that stay the broker's until they are acknowledged.
//! inseam acknowledges a message only once it is committed in the consuming process's
//! database, and asks for a redelivery after a delay otherwise; the attempt number travels
//! with each message.
//!
//! Channels are named from message contracts (an event's or a durable command's stable name,
//! such as `orders.order_placed`), never from Rust paths; a transport maps a channel to its
//! own naming (a NATS subject, a Kafka topic) and declares what it guarantees in its
//! [`Capabilities`], which the conformance suite pins.
//!
//! This module depends only on the envelope's types: a transport crate implements it without
//! knowing anything of the app, the store or the dispatcher.

use std::fmt;
use std::time::Duration;

/// The attribute the seam's traits are written with: a transport crate implements them with
/// `#[inseam::transport::async_trait]` (or `async_trait` of its own dependency).
pub use async_trait::async_trait;
use bytes::Bytes;
use uuid::Uuid;

use crate::error::BoxError;

pub mod config;
mod in_process;

pub use in_process::InProcess;

/// A message to publish: an envelope's wire bytes and what a broker needs to route it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// The channel, named from the message's contract (its stable name).
    pub channel: String,
    /// The message id, for the broker's deduplication where it has one.
    pub message_id: Uuid,
    /// The ordering key: messages with the same key reach a group in publish order, across
    /// channels (see [`KeyOrder`]).
    pub key: Option<String>,
    /// Broker headers (CloudEvents attributes, `traceparent`, ...), carried beside the bytes.
    pub headers: Vec<(String, String)>,
    /// The envelope in its CloudEvents JSON form, carried byte for byte.
    pub payload: Bytes,
}

/// A message a consumer received. It stays the broker's until [`ack`](Self::ack): a consumer
/// that goes away before that gets it again (as does another consumer of the group).
pub struct Incoming {
    /// The channel it was published to.
    pub channel: String,
    /// Its ordering key, as published.
    pub key: Option<String>,
    /// Its broker headers, as published.
    pub headers: Vec<(String, String)>,
    /// Its bytes, as published.
    pub payload: Bytes,
    /// Which delivery of this message to this group this is, from 1.
    pub attempt: u32,
    /// Settles the message with the broker.
    pub acker: Box<dyn Acker>,
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming")
            .field("channel", &self.channel)
            .field("key", &self.key)
            .field("attempt", &self.attempt)
            .field("bytes", &self.payload.len())
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// The value of broker header `name`, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Tells the broker the message is done with: it is not delivered to this group again.
    ///
    /// An error leaves the outcome unknown: the broker may have taken the acknowledgement
    /// after all (its reply was lost, or a client sent it once connected again), so the
    /// message may come again or not. inseam acknowledges only what the consuming process
    /// committed, and its inbox skips a message that comes again, so either is safe.
    pub async fn ack(&self) -> Result<(), TransportError> {
        self.acker.ack().await
    }

    /// Asks the broker to deliver the message to this group again, not before `delay`. As
    /// with [`ack`](Self::ack), an error leaves the outcome unknown.
    pub async fn nack(&self, delay: Duration) -> Result<(), TransportError> {
        self.acker.nack(delay).await
    }
}

/// Settles one received message with its broker.
#[async_trait]
pub trait Acker: Send + Sync {
    /// The message is done with.
    async fn ack(&self) -> Result<(), TransportError>;
    /// Deliver the message again, not before `delay`.
    async fn nack(&self, delay: Duration) -> Result<(), TransportError>;
}

/// What a durable consumer reads: one group's messages on some channels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The group: every group gets every message of its channels; the consumers of one group
    /// share them, each message going to one of them.
    pub group: String,
    /// The channels the group reads.
    pub channels: Vec<String>,
    /// Messages handed out and not yet settled, at most, per consumer.
    pub max_in_flight: usize,
    /// How long a handed-out message may stay unsettled before the broker gives it to a
    /// consumer again (a consumer that died without settling it).
    pub ack_wait: Duration,
}

impl Subscription {
    /// A subscription of `group` to `channels`, with defaults of 256 messages in flight and a
    /// 30 s acknowledgement wait.
    pub fn new(
        group: impl Into<String>,
        channels: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        Subscription {
            group: group.into(),
            channels: channels.into_iter().map(Into::into).collect(),
            max_in_flight: 256,
            ack_wait: Duration::from_secs(30),
        }
    }
}

/// A durable consumer of one group.
#[async_trait]
pub trait Consumer: Send {
    /// Waits up to `wait` for messages and returns at most `max` of them (none when none came).
    ///
    /// Where the transport's [`Capabilities::ordering`] keeps key order
    /// ([`KeyOrder::keeps_key_order`]), messages with the same key come in publish order across
    /// every channel the group reads: a message is not handed out while an earlier one of its
    /// key to this group, on any of the group's channels, is unsettled (a nacked one included,
    /// until it is redelivered and acknowledged). With [`KeyOrder::PerKeyPartitioned`] the same
    /// holds for an earlier message of its partition, whatever that message's key.
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Incoming>, TransportError>;
}

/// What order a transport keeps.
///
/// Publish order is the order in which the broker took the messages: for one publisher, the
/// order of its [`Transport::publish`] calls and, within a batch, the batch's order. Key order
/// is kept per group across every channel the group reads, since a group's handlers see one
/// key's events of several types (an `orders.order_placed`, then an `orders.order_confirmed`
/// of one order) and must see them in that order. A transport that can keep order only
/// within each channel keeps neither [`PerKey`](Self::PerKey) nor
/// [`PerKeyPartitioned`](Self::PerKeyPartitioned): it would need a variant of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyOrder {
    /// Messages with the same key reach a group in publish order, one at a time, across every
    /// channel the group reads: a message is not handed out while an earlier one of its key to
    /// that group is unsettled. Different keys proceed in parallel: an unsettled message holds
    /// back only the later messages of its own key.
    PerKey,
    /// Same-key order as [`PerKey`](Self::PerKey); an unsettled message also holds back the
    /// other keys of its partition.
    ///
    /// The transport spreads messages over `partitions` partitions by key
    /// ([`Transport::partition`] says which; a message without a key goes to some partition
    /// too) and hands out a partition's messages to a group in publish order, one at a time:
    /// a message is not handed out while an earlier message of its partition to that group is
    /// unsettled, whatever its key. So a message waiting for its redelivery (nacked, or taken
    /// by a consumer that went away) holds back every key of its partition until it is
    /// acknowledged, and a group has at most `partitions` messages in flight. Keys of other
    /// partitions proceed in parallel.
    PerKeyPartitioned {
        /// How many partitions keys are spread over, at least 1.
        partitions: u16,
    },
    /// No order is kept.
    None,
}

impl KeyOrder {
    /// Whether messages with the same key reach a group in publish order:
    /// [`PerKey`](Self::PerKey) and [`PerKeyPartitioned`](Self::PerKeyPartitioned).
    pub const fn keeps_key_order(self) -> bool {
        match self {
            KeyOrder::PerKey | KeyOrder::PerKeyPartitioned { .. } => true,
            KeyOrder::None => false,
        }
    }
}

/// What a transport guarantees and offers, declared by it and pinned by the conformance suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// The order it keeps.
    pub ordering: KeyOrder,
    /// Whether it delays a redelivery asked with [`Incoming::nack`] by the delay asked.
    pub delayed_redelivery: bool,
    /// Whether it can hold a published message until a given time (inseam keeps scheduled
    /// messages in the outbox until due either way).
    pub native_delayed_delivery: bool,
    /// Whether it moves messages that keep failing aside by itself (inseam's dead letters are
    /// in the consuming process's database either way).
    pub native_dead_letters: bool,
    /// Whether it drops a second publish of a message id (within some window).
    pub deduplicates: bool,
    /// Whether it answers [`Transport::request`] through [`Transport::serve`], which commands
    /// and queries answered by another process need.
    pub request_reply: bool,
    /// Whether a message acknowledged before the broker stops is never delivered again after
    /// it starts again. Without it, a restart may deliver acknowledged messages again (a
    /// broker that writes its consumers' progress to disk some time after confirming an
    /// acknowledgement, or that can lose that progress): delivery stays at least once, and
    /// inseam's inbox skips a message it already has.
    pub acks_survive_restart: bool,
}

/// A transport failed.
#[derive(Debug, thiserror::Error)]
#[error("{transport}: could not {operation}")]
pub struct TransportError {
    /// The transport's name.
    pub transport: &'static str,
    /// What it was doing ("publish to `orders.order_placed`").
    pub operation: String,
    /// Whether trying again later may succeed (the broker is unreachable, a timeout).
    pub transient: bool,
    /// Why.
    #[source]
    pub source: Option<BoxError>,
}

impl TransportError {
    /// A failure that may pass: the broker is down or slow.
    pub fn transient(
        transport: &'static str,
        operation: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        TransportError {
            transport,
            operation: operation.into(),
            transient: true,
            source: Some(source.into()),
        }
    }

    /// A failure that will not pass by trying again (a refused configuration, a bad name).
    pub fn permanent(
        transport: &'static str,
        operation: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        TransportError {
            transport,
            operation: operation.into(),
            transient: false,
            source: Some(source.into()),
        }
    }
}

/// A message broker that carries groups' messages between processes. See the module
/// documentation.
#[async_trait]
pub trait Transport: Send + Sync + fmt::Debug + 'static {
    /// A short name for logs and errors (`nats`).
    fn name(&self) -> &'static str;

    /// What it guarantees.
    fn capabilities(&self) -> Capabilities;

    /// The partition that messages with `key` go to (below the `partitions` it declares), for
    /// a transport whose [`Capabilities::ordering`] is [`KeyOrder::PerKeyPartitioned`]: which
    /// keys an unsettled message holds back. `None` for every other transport (the default).
    /// Every connection to one broker with one configuration answers alike.
    fn partition(&self, key: &str) -> Option<u16> {
        let _ = key;
        None
    }

    /// Makes sure `channels` exist and can be published to and subscribed to (a stream,
    /// topics); idempotent.
    async fn provision(&self, channels: &[String]) -> Result<(), TransportError>;

    /// Publishes `batch`, in order, and returns once the broker has each message or failed
    /// to take it: one outcome per message, in the batch's order. A message counts as sent
    /// only when its outcome is `Ok`.
    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), TransportError>>;

    /// Sends `payload` to one server of `channel` ([`serve`](Self::serve)) and waits up to
    /// `timeout` for its answer. A transport without request-reply refuses (the default).
    async fn request(
        &self,
        channel: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Bytes, TransportError> {
        let _ = (payload, timeout);
        Err(TransportError::permanent(
            self.name(),
            format!("send a request on `{channel}`"),
            "this transport has no request-reply",
        ))
    }

    /// Serves the requests of `channel`: each goes to one of its servers (in any process).
    /// A transport without request-reply refuses (the default).
    async fn serve(&self, channel: &str) -> Result<Box<dyn Requests>, TransportError> {
        Err(TransportError::permanent(
            self.name(),
            format!("serve requests on `{channel}`"),
            "this transport has no request-reply",
        ))
    }

    /// A durable consumer of `subscription`'s group: what the group did not acknowledge,
    /// from any consumer, is handed out again.
    ///
    /// A group the broker has not seen before starts at the beginning of its channels: it gets
    /// the messages published before its first subscription too, since the publishing process
    /// may well have started (and committed events) before the consuming one.
    async fn subscribe(
        &self,
        subscription: &Subscription,
    ) -> Result<Box<dyn Consumer>, TransportError>;
}

/// A request received by a server, with the way back to its sender.
pub struct Request {
    /// The request's bytes, as sent.
    pub payload: Bytes,
    /// Sends the answer.
    pub responder: Box<dyn Responder>,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("bytes", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// Answers one request.
#[async_trait]
pub trait Responder: Send {
    /// Sends `payload` back to the request's sender.
    async fn respond(self: Box<Self>, payload: Bytes) -> Result<(), TransportError>;
}

/// The requests of one channel, as a server receives them.
#[async_trait]
pub trait Requests: Send {
    /// The next request; `None` once the transport stopped serving this channel.
    async fn next(&mut self) -> Option<Request>;
}
