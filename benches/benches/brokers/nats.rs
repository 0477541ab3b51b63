//! NATS JetStream: the raw side is async-nats alone, publishing to a stream of the
//! configuration the transport provisions, pipelined per batch, every acknowledgement awaited,
//! with `Nats-Msg-Id` (the deduplication the transport asks for) when `ids`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use inseam::nats::{Nats, NatsOptions};
use inseam::transport::Transport;
use inseam_test_servers::Server;

use crate::{CHANNEL, Row};

/// The transport's partition of a key (decision 0016).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub(crate) async fn transport(server: &Server, name: &str) -> Arc<dyn Transport> {
    let options = NatsOptions::from_url(&server.url())
        .unwrap()
        .stream(name.to_uppercase())
        .prefix(name);
    Arc::new(Nats::connect_with(options).await.unwrap())
}

/// The stream the NATS transport provisions for namespace `name`.
async fn create_stream(js: &jetstream::Context, name: &str) {
    js.create_stream(stream::Config {
        name: name.to_uppercase(),
        subjects: vec![format!("{name}.>")],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: Duration::from_secs(120),
        num_replicas: 1,
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Returns the time the publishing took, from the first publish to the last acknowledgement.
pub(crate) async fn publish(
    server: &Server,
    name: &str,
    rows: &[Row],
    batch: usize,
    ids: bool,
) -> Duration {
    publish_with(server, name, rows, batch, |id, _| {
        ids.then(|| {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id);
            headers
        })
    })
    .await
}

/// Publishes `rows` as [`publish`] does with ids, with the headers the transport sends besides
/// `Nats-Msg-Id` (the CloudEvents id and type the relay adds, the key, and the order of the
/// application's headers): the same bytes on the wire as the relay's. Returns the time taken.
pub(crate) async fn publish_as_transport(
    server: &Server,
    name: &str,
    rows: &[Row],
    batch: usize,
) -> Duration {
    publish_with(server, name, rows, batch, |id, key| {
        let mut headers = async_nats::HeaderMap::new();
        headers.append("ce-id", id);
        headers.append("ce-type", CHANNEL);
        headers.insert("Nats-Msg-Id", id);
        headers.insert("Inseam-Key", key);
        headers.insert("Inseam-Headers", "ce-id ce-type");
        Some(headers)
    })
    .await
}

/// Publishes `rows` to the transport's stream, each with the headers `headers` gives for its
/// id and key, pipelined per batch, every acknowledgement awaited. Returns the time taken.
async fn publish_with(
    server: &Server,
    name: &str,
    rows: &[Row],
    batch: usize,
    headers: impl Fn(&str, &str) -> Option<async_nats::HeaderMap>,
) -> Duration {
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    create_stream(&js, name).await;
    let start = Instant::now();
    for chunk in rows.chunks(batch) {
        let mut acks = Vec::with_capacity(chunk.len());
        for (id, key, payload) in chunk {
            let subject = format!("{name}.{}.{CHANNEL}", fnv1a(key.as_bytes()) % 8);
            let ack = match headers(id, key) {
                Some(headers) => {
                    js.publish_with_headers(subject, headers, payload.clone())
                        .await
                }
                None => js.publish(subject, payload.clone()).await,
            };
            acks.push(ack.unwrap());
        }
        for ack in acks {
            ack.await.unwrap();
        }
    }
    start.elapsed()
}

pub(crate) async fn messages(server: &Server, name: &str) -> u64 {
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let mut stream = js.get_stream(name.to_uppercase()).await.unwrap();
    stream.info().await.unwrap().state.messages
}
