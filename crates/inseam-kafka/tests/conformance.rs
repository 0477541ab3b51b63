//! The conformance suite against the Kafka transport. Each case gets a `tansu` broker of its
//! own (a free port of 127.0.0.1, S3 storage in a `moto_server` of its own, both killed when
//! the case ends), since the outage case stops its broker; the broker is started again on the
//! same port and storage.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use inseam_conformance::{BoxError, Harness, async_trait};
use inseam_core::transport::{Capabilities, KeyOrder, Transport};
use inseam_kafka::{Kafka, KafkaOptions};

use inseam_test_servers::{Server as KafkaServer, kafka as kafka_server};

/// The transport's default partition count, which the harness leaves as it is.
const PARTITIONS: u16 = 8;

struct KafkaHarness {
    /// Shared with the blocking tasks that stop and start it.
    server: Arc<Mutex<KafkaServer>>,
    url: String,
}

impl KafkaHarness {
    /// Runs `action` on the server on a blocking thread (stopping and starting wait for the
    /// process), turning a panic in it into an error.
    async fn with_server<T: Send + 'static>(
        &self,
        action: impl FnOnce(&mut KafkaServer) -> T + Send + 'static,
    ) -> Result<T, BoxError> {
        let server = Arc::clone(&self.server);
        tokio::task::spawn_blocking(move || {
            let mut server = server.lock().unwrap_or_else(PoisonError::into_inner);
            action(&mut server)
        })
        .await
        .map_err(|err| format!("the broker's process could not be handled: {err}").into())
    }
}

#[async_trait]
impl Harness for KafkaHarness {
    async fn transport(&self) -> Arc<dyn Transport> {
        // tansu on S3 in moto answers an offset commit in about 100 ms, and in seconds when
        // members of a group commit at once (each commit rewrites the group's object in S3
        // with a conditional put, retried on conflict): reads of committed offsets get 30 s, not 5.
        let options = KafkaOptions::from_url(&self.url)
            .unwrap_or_else(|err| panic!("`{}` is not a Kafka URL: {err}", self.url))
            .request_timeout(Duration::from_secs(30));
        match Kafka::connect_with(options) {
            Ok(kafka) => Arc::new(kafka),
            Err(err) => panic!("could not set up the Kafka transport: {err}"),
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
            deduplicates: false,
            request_reply: true,
            acks_survive_restart: false,
        }
    }

    async fn stop_broker(&self) -> Result<(), BoxError> {
        self.with_server(KafkaServer::stop)
            .await?
            .map_err(Into::into)
    }

    async fn start_broker(&self) -> Result<(), BoxError> {
        self.with_server(KafkaServer::start_again).await
    }
}

async fn harness() -> KafkaHarness {
    // `RUST_LOG=inseam::kafka=debug` shows the transport's and librdkafka's logs.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let server = tokio::task::spawn_blocking(kafka_server::start)
        .await
        .unwrap_or_else(|err| panic!("the case's Kafka broker did not start: {err}"));
    KafkaHarness {
        url: server.url(),
        server: Arc::new(Mutex::new(server)),
    }
}

inseam_conformance::suite!(harness);
