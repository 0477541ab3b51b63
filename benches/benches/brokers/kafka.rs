//! Kafka (tansu with its memory storage): the raw side is rdkafka alone, publishing to a topic of the
//! configuration the transport provisions (8 partitions), with the transport's producer
//! settings (idempotent, `acks=all`, `linger.ms=2`, the Java client's murmur2 of the key), the
//! same two headers the transport adds (channel and message id), every delivery report
//! awaited per batch. Kafka has no deduplication id: `ids` changes nothing.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use inseam::kafka::{Kafka, KafkaOptions};
use inseam::transport::Transport;
use inseam_test_servers::Server;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{Header, Headers as _, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use crate::{CHANNEL, Row};

const PARTITIONS: i32 = 8;

pub(crate) async fn transport(server: &Server, name: &str) -> Arc<dyn Transport> {
    let options = KafkaOptions::from_url(&server.url())
        .unwrap()
        .topic(name)
        .request_timeout(Duration::from_secs(30))
        // tansu answers a consumer's fetch only when this wait (500 ms by default) is over,
        // even when records arrive during it; Apache Kafka answers once there is data.
        .fetch_wait(Duration::from_millis(10));
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

/// How many records the topic holds, read back from the first offset of each partition until
/// nothing more comes for 3 s. Not the watermarks: tansu's high watermark, asked right after
/// the last delivery report, was below the records it then let a consumer read (19,008 against
/// 20,000 in one run).
pub(crate) async fn messages(server: &Server, name: &str) -> u64 {
    let url = server.url();
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", url)
            .set("group.id", format!("{name}.count"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut list = TopicPartitionList::new();
        for partition in 0..PARTITIONS {
            list.add_partition_offset(&name, partition, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&list).unwrap();
        let mut ids = HashSet::new();
        let mut last = Instant::now();
        while last.elapsed() < Duration::from_secs(3) {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(message)) => {
                    last = Instant::now();
                    let id = message.headers().and_then(|headers| {
                        headers
                            .iter()
                            .find(|h| h.key == "inseam-id")
                            .and_then(|h| h.value.map(<[u8]>::to_vec))
                    });
                    ids.insert(id.unwrap_or_else(|| message.offset().to_le_bytes().to_vec()));
                }
                Some(Err(error)) => panic!("reading the topic back: {error}"),
                None => {}
            }
        }
        ids.len() as u64
    })
    .await
    .unwrap()
}
