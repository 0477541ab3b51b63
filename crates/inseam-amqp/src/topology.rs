//! Declaring the exchange and a group's queues and bindings (decision 0020). Every
//! declaration is idempotent: declaring what exists with the same arguments changes nothing.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};
use std::time::Duration;

use crate::layout;
use crate::options::AmqpOptions;

/// Declares the topic exchange, durable.
pub(crate) async fn declare_exchange(
    channel: &Channel,
    exchange: &str,
) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// The history stream: every message published to the exchange, kept for `max_age`, from
/// which a group new to the server gets what was published before it first subscribed.
pub(crate) fn history_stream(prefix: &str) -> String {
    format!("{prefix}.history")
}

/// Declares the history stream and binds it to every routing key of the exchange.
pub(crate) async fn declare_history(
    channel: &Channel,
    exchange: &str,
    prefix: &str,
    max_age: Duration,
) -> Result<(), lapin::Error> {
    let stream = history_stream(prefix);
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("stream")),
    );
    arguments.insert(
        "x-max-age".into(),
        AMQPValue::LongString(LongString::from(format!("{}s", max_age.as_secs().max(1)))),
    );
    channel
        .queue_declare(
            stream.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            arguments,
        )
        .await?;
    channel
        .queue_bind(
            stream.as_str().into(),
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// What a group reads and where: its queues, one per partition, and their bindings.
#[derive(Debug)]
pub(crate) struct Topology {
    pub(crate) exchange: String,
    pub(crate) prefix: String,
    pub(crate) group: String,
    pub(crate) channels: Vec<String>,
    pub(crate) partitions: u16,
    pub(crate) quorum: bool,
    pub(crate) history: Option<Duration>,
}

impl Topology {
    pub(crate) fn new(options: &AmqpOptions, group: &str, channels: &[String]) -> Self {
        let mut channels = channels.to_vec();
        channels.sort();
        channels.dedup();
        Topology {
            exchange: options.exchange.clone(),
            prefix: options.prefix.clone(),
            group: group.to_owned(),
            channels,
            partitions: options.partitions,
            quorum: options.quorum,
            history: options.history,
        }
    }

    /// The group's queue of `partition`.
    pub(crate) fn queue(&self, partition: u16) -> String {
        layout::queue_name(&self.prefix, &self.group, partition)
    }

    /// The queue that holds, for a group new to the server, what was published to
    /// `partition` before its first subscription; it goes once the group went through it.
    pub(crate) fn history_queue(&self, partition: u16) -> String {
        format!("{}.history", self.queue(partition))
    }

    /// The partition's nack record: a queue of one message, the latest record of how many
    /// times the partition's message in flight was nacked (decision 0020).
    pub(crate) fn nack_record(&self, partition: u16) -> String {
        format!("{}.nacks", self.queue(partition))
    }

    /// The queue whose exclusive declaration stands for "this connection is setting up the
    /// group": one process at a time.
    pub(crate) fn setup_lock(&self) -> String {
        format!("{}.setup", layout::queue_name(&self.prefix, &self.group, 0))
    }

    /// The queue whose existence stands for "a setup of the group began copying its history
    /// and has not finished": declared before the copy starts, deleted once every history
    /// queue has its end marker. A setup that finds it redoes the copy (its process died).
    pub(crate) fn copying_marker(&self) -> String {
        format!(
            "{}.copying",
            layout::queue_name(&self.prefix, &self.group, 0)
        )
    }

    /// Declares the group's history queue of `partition`.
    pub(crate) async fn declare_history_queue(
        &self,
        channel: &Channel,
        partition: u16,
    ) -> Result<(), lapin::Error> {
        channel
            .queue_declare(
                self.history_queue(partition).into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                self.queue_arguments(),
            )
            .await
            .map(|_| ())
    }

    /// The arguments of a group's queue: a quorum queue (or a classic one) with a single
    /// active consumer, and no delivery limit (a message that keeps failing becomes a dead
    /// letter in the consuming process's database, never on the server).
    fn queue_arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        arguments.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        if self.quorum {
            arguments.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("quorum")),
            );
        }
        arguments
    }

    /// Declares the exchange, the partition's queue and its bindings, one per channel:
    /// `<partition>.<channel>`.
    pub(crate) async fn declare_partition(
        &self,
        channel: &Channel,
        partition: u16,
    ) -> Result<(), lapin::Error> {
        declare_exchange(channel, &self.exchange).await?;
        let queue = self.queue(partition);
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                self.queue_arguments(),
            )
            .await?;
        let mut record = FieldTable::default();
        record.insert("x-max-length".into(), AMQPValue::LongInt(1));
        channel
            .queue_declare(
                self.nack_record(partition).into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                record,
            )
            .await?;
        for name in &self.channels {
            channel
                .queue_bind(
                    queue.as_str().into(),
                    self.exchange.as_str().into(),
                    layout::routing_key(partition, name).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
        }
        Ok(())
    }
}
