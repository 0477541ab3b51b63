//! Kafka (tansu with its memory storage): the raw side is rdkafka alone, publishing to a topic of the
//! configuration the transport provisions (8 partitions), with the transport's producer
//! settings (idempotent, `acks=all`, `linger.ms=2`, the Java client's murmur2 of the key), the
//! same two headers the transport adds (channel and message id), every delivery report
//! awaited per batch. Kafka has no deduplication id: `ids` changes nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use inseam::kafka::{Kafka, KafkaOptions};
use inseam::transport::Transport;
use inseam_test_servers::Server;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use crate::{CHANNEL, Row};

const PARTITIONS: i32 = 8;

pub(crate) async fn transport(server: &Server, name: &str) -> Arc<dyn Transport> {
    let options = KafkaOptions::from_url(&server.url())
        .unwrap()
        .topic(name)
        .request_timeout(Duration::from_secs(30));
    Arc::new(Kafka::connect_with(options).unwrap())
}

/// Returns the time the publishing took, from the first publish to the last delivery report.
pub(crate) async fn publish(
    server: &Server,
    name: &str,
    rows: &[Row],
    batch: usize,
    _ids: bool,
) -> Duration {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", server.url())
        .create()
        .unwrap();
    // The topic the Kafka transport provisions.
    let created = admin
        .create_topics(
            [&NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1))],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    for result in created {
        result.unwrap();
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", server.url())
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("message.timeout.ms", "5000")
        .set("linger.ms", "2")
        .create()
        .unwrap();
    let start = Instant::now();
    for chunk in rows.chunks(batch) {
        let mut deliveries = Vec::with_capacity(chunk.len());
        for (id, key, payload) in chunk {
            let headers = OwnedHeaders::new_with_capacity(2)
                .insert(Header {
                    key: "inseam-channel",
                    value: Some(CHANNEL.as_bytes()),
                })
                .insert(Header {
                    key: "inseam-id",
                    value: Some(id.as_bytes()),
                });
            let record = FutureRecord::to(name)
                .key(key.as_bytes())
                .payload(&payload[..])
                .headers(headers);
            deliveries.push(producer.send_result(record).map_err(|(e, _)| e).unwrap());
        }
        for delivery in deliveries {
            delivery.await.unwrap().map_err(|(e, _)| e).unwrap();
        }
    }
    start.elapsed()
}

pub(crate) async fn messages(server: &Server, name: &str) -> u64 {
    let url = server.url();
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", url)
            .create()
            .unwrap();
        (0..PARTITIONS)
            .map(|partition| {
                let (low, high) = consumer
                    .fetch_watermarks(&name, partition, Duration::from_secs(10))
                    .unwrap();
                u64::try_from(high - low).unwrap()
            })
            .sum()
    })
    .await
    .unwrap()
}
