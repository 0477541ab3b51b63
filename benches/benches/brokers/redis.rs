//! Redis Streams: the raw side is the `redis` crate alone on one multiplexed connection,
//! appending to the partition streams the transport uses (decision 0019), one pipeline per
//! batch, every reply awaited. With `ids`, each message goes through a Lua script that drops
//! it when its id's key exists and otherwise runs `XADD` and sets that key with the 2 min
//! window (the deduplication the transport does: Redis has none of its own), loaded once and
//! called by its digest (`EVALSHA`); without, a bare `XADD`. The entries have the transport's
//! fields (channel, id, key, payload); "as the transport" adds its headers field too (the
//! CloudEvents id and type the relay sends), for the same entries as the relay's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use inseam::redis::{Redis, RedisOptions};
use inseam::transport::Transport;
use inseam_test_servers::Server;
use redis::Value;

use crate::{CHANNEL, Row};

/// The transport's partition count (its default).
const PARTITIONS: u64 = 8;

/// What the transport's publish script does, without its `MAXLEN` option.
const PUBLISH: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
return 1
";

/// The transport's partition of a key (decision 0019, as 0016).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub(crate) async fn transport(server: &Server, name: &str) -> Arc<dyn Transport> {
    let options = RedisOptions::from_url(&server.url()).unwrap().prefix(name);
    Arc::new(Redis::connect_with(options).await.unwrap())
}

async fn connection(server: &Server) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Returns the time the publishing took, from the first command sent to the last reply.
pub(crate) async fn publish(
    server: &Server,
    name: &str,
    rows: &[Row],
    batch: usize,
    ids: bool,
) -> Duration {
    publish_with(server, name, rows, batch, ids, false).await
}

/// Publishes `rows` as [`publish`] does with ids, with the headers field the transport adds
/// (the CloudEvents id and type the relay sends, in the transport's length-prefixed form): the
/// same entries, byte for byte, as the relay's.
pub(crate) async fn publish_as_transport(
    server: &Server,
    name: &str,
    rows: &[Row],
    batch: usize,
) -> Duration {
    publish_with(server, name, rows, batch, true, true).await
}

/// The transport's headers field: each name and value as a 4-byte big-endian length and its
/// bytes.
fn headers_field(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in headers {
        for part in [name, value] {
            out.extend_from_slice(&(part.len() as u32).to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
    }
    out
}

async fn publish_with(
    server: &Server,
    name: &str,
    rows: &[Row],
    batch: usize,
    ids: bool,
    headers: bool,
) -> Duration {
    let mut conn = connection(server).await;
    let digest: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(PUBLISH)
        .query_async(&mut conn)
        .await
        .unwrap();
    let start = Instant::now();
    for chunk in rows.chunks(batch) {
        let mut pipe = redis::pipe();
        for (id, key, payload) in chunk {
            let stream = format!("{name}:stream:{}", fnv1a(key.as_bytes()) % PARTITIONS);
            let command = if ids {
                pipe.cmd("EVALSHA")
                    .arg(&digest)
                    .arg(2)
                    .arg(stream)
                    .arg(format!("{name}:id:{id}"))
                    .arg(120_000)
            } else {
                pipe.cmd("XADD").arg(stream).arg("*")
            };
            command
                .arg("c")
                .arg(CHANNEL)
                .arg("i")
                .arg(id)
                .arg("k")
                .arg(key);
            if headers {
                command
                    .arg("h")
                    .arg(headers_field(&[("ce-id", id), ("ce-type", CHANNEL)]));
            }
            command.arg("p").arg(payload.as_ref());
        }
        let replies: Vec<Value> = pipe.query_async(&mut conn).await.unwrap();
        assert_eq!(replies.len(), chunk.len());
    }
    start.elapsed()
}

pub(crate) async fn messages(server: &Server, name: &str) -> u64 {
    let mut conn = connection(server).await;
    let mut total = 0;
    for partition in 0..PARTITIONS {
        let len: u64 = redis::cmd("XLEN")
            .arg(format!("{name}:stream:{partition}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        total += len;
    }
    total
}
