//! The conformance suite against the Redis transport. Each case gets a `redis-server` of its
//! own (`inseam_test_servers::redis`: a free port of 127.0.0.1, an append-only file with
//! `appendfsync always` in a temporary directory, killed when the case ends), since the outage
//! case stops its broker; the server is started again on the same port and data.

use std::sync::{Arc, Mutex, PoisonError};

use inseam_conformance::{BoxError, Harness, async_trait};
use inseam_core::transport::{Capabilities, KeyOrder, Transport};
use inseam_redis::{Redis, RedisOptions};

use inseam_test_servers::{Server as RedisServer, redis as redis_server};

/// The transport's default partition count, which the harness leaves as it is.
const PARTITIONS: u16 = 8;

struct RedisHarness {
    /// Shared with the blocking tasks that stop and start it.
    server: Arc<Mutex<RedisServer>>,
    url: String,
}

impl RedisHarness {
    /// Runs `action` on the server on a blocking thread (stopping and starting wait for the
    /// process), turning a panic in it into an error.
    async fn with_server<T: Send + 'static>(
        &self,
        action: impl FnOnce(&mut RedisServer) -> T + Send + 'static,
    ) -> Result<T, BoxError> {
        let server = Arc::clone(&self.server);
        tokio::task::spawn_blocking(move || {
            let mut server = server.lock().unwrap_or_else(PoisonError::into_inner);
            action(&mut server)
        })
        .await
        .map_err(|err| format!("the Redis server's process could not be handled: {err}").into())
    }
}

#[async_trait]
impl Harness for RedisHarness {
    async fn transport(&self) -> Arc<dyn Transport> {
        let options = RedisOptions::from_url(&self.url)
            .unwrap_or_else(|err| panic!("`{}` is not a Redis URL: {err}", self.url));
        match Redis::connect_with(options).await {
            Ok(redis) => Arc::new(redis),
            Err(err) => panic!("could not connect to the case's Redis server: {err}"),
        }
    }

    fn expected_capabilities(&self) -> Capabilities {
        Capabilities {
            ordering: KeyOrder::PerKeyPartitioned {
                partitions: PARTITIONS,
            },
            delayed_redelivery: true,
            native_delayed_delivery: false,
            native_dead_letters: false,
            deduplicates: true,
            request_reply: true,
            // The case's server runs with `appendonly yes` and `appendfsync always`, which the
            // transport reads at connect time.
            acks_survive_restart: true,
        }
    }

    async fn stop_broker(&self) -> Result<(), BoxError> {
        self.with_server(RedisServer::stop)
            .await?
            .map_err(Into::into)
    }

    async fn start_broker(&self) -> Result<(), BoxError> {
        self.with_server(RedisServer::start_again).await
    }
}

async fn harness() -> RedisHarness {
    let server = tokio::task::spawn_blocking(redis_server::start)
        .await
        .unwrap_or_else(|err| panic!("the case's Redis server did not start: {err}"));
    RedisHarness {
        url: server.url(),
        server: Arc::new(Mutex::new(server)),
    }
}

inseam_conformance::suite!(harness);
