//! Declaring the exchange and a group's queues and bindings (decision 0020). Every
//! declaration is idempotent: declaring what exists with the same arguments changes nothing.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Channel, ExchangeKind};

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

/// What a group reads and where: its queues, one per partition, and their bindings.
#[derive(Debug)]
pub(crate) struct Topology {
    pub(crate) exchange: String,
    pub(crate) prefix: String,
    pub(crate) group: String,
    pub(crate) channels: Vec<String>,
    pub(crate) partitions: u16,
    pub(crate) quorum: bool,
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
        }
    }

    /// The group's queue of `partition`.
    pub(crate) fn queue(&self, partition: u16) -> String {
        layout::queue_name(&self.prefix, &self.group, partition)
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
