//! RabbitMQ: the raw side is lapin alone, publishing to a topic exchange bound to a history
//! stream as the transport provisions them (decision 0020), on one channel in confirm mode,
//! persistent, pipelined per batch, every confirm awaited; with the message id and the key
//! header the transport sets when `ids`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use inseam::amqp::{Amqp, AmqpOptions};
use inseam::transport::Transport;
use inseam_test_servers::Server;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

use crate::{CHANNEL, Row};

/// The transport's partition of a key (decision 0020: FNV-1a, as NATS's).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub(crate) async fn transport(server: &Server, name: &str) -> Arc<dyn Transport> {
    let options = AmqpOptions::from_url(&server.url())
        .unwrap()
        .exchange(name)
        .prefix(name);
    Arc::new(Amqp::connect_with(options).await.unwrap())
}

async fn connect(server: &Server) -> Connection {
    Connection::connect(&server.url(), ConnectionProperties::default())
        .await
        .unwrap()
}

/// Returns the time the publishing took, from the first publish to the last confirm.
pub(crate) async fn publish(
    server: &Server,
    name: &str,
    rows: &[Row],
    batch: usize,
    ids: bool,
) -> Duration {
    let connection = connect(server).await;
    let channel = connection.create_channel().await.unwrap();
    // The exchange and the history stream the RabbitMQ transport provisions.
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let stream = format!("{name}.history");
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("stream")),
    );
    arguments.insert(
        "x-max-age".into(),
        AMQPValue::LongString(LongString::from(format!("{}s", 7 * 24 * 3600))),
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
        .await
        .unwrap();
    channel
        .queue_bind(
            stream.as_str().into(),
            name.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();

    let start = Instant::now();
    for chunk in rows.chunks(batch) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for (id, key, payload) in chunk {
            let routing_key = format!("{}.{CHANNEL}", fnv1a(key.as_bytes()) % 8);
            let mut properties = BasicProperties::default().with_delivery_mode(2);
            if ids {
                let mut headers = FieldTable::default();
                headers.insert(
                    "inseam-key".into(),
                    AMQPValue::LongString(LongString::from(key.as_bytes())),
                );
                properties = properties
                    .with_message_id(id.as_str().into())
                    .with_headers(headers);
            }
            let confirm = channel
                .basic_publish(
                    name.into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions::default(),
                    payload,
                    properties,
                )
                .await
                .unwrap();
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert!(confirm.await.unwrap().is_ack(), "a negative confirm");
        }
    }
    let elapsed = start.elapsed();
    let _ = connection.close(200, "bench: published".into()).await;
    elapsed
}

/// The messages in the history stream of namespace `name`, which gets every message
/// published to its exchange. A stream counts its messages in its statistics, updated every
/// few seconds (a count seen twice may still be one update behind): this waits until the count
/// reaches `expected`, then a second more for any excess to show, and gives the count it has
/// after 30 seconds otherwise.
pub(crate) async fn messages(server: &Server, name: &str, expected: u64) -> u64 {
    let stream = format!("{name}.history");
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        let count = queue_messages(server, &stream).await;
        if count >= expected || Instant::now() > give_up {
            tokio::time::sleep(Duration::from_secs(1)).await;
            return queue_messages(server, &stream).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn queue_messages(server: &Server, queue: &str) -> u64 {
    let connection = connect(server).await;
    let channel = connection.create_channel().await.unwrap();
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "bench: counted".into()).await;
    u64::from(declared.message_count())
}
