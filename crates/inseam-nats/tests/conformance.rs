//! The conformance suite against the NATS transport. Each case gets a `nats-server -js` of
//! its own (a free port of 127.0.0.1, a store in a temporary directory, killed when the case
//! ends), since the outage case stops its broker; the server is started again on the same
//! port and store.

use std::sync::{Arc, Mutex, PoisonError};

use inseam_conformance::{BoxError, Harness, async_trait};
use inseam_core::transport::{Capabilities, KeyOrder, Transport};
use inseam_nats::{Nats, NatsOptions};

use inseam_test_servers::{Server as NatsServer, nats as nats_server};

/// The transport's default partition count, which the harness leaves as it is.
const PARTITIONS: u16 = 8;

struct NatsHarness {
    /// Shared with the blocking tasks that stop and start it.
    server: Arc<Mutex<NatsServer>>,
    url: String,
}

impl NatsHarness {
    /// Runs `action` on the server on a blocking thread (stopping and starting wait for the
    /// process), turning a panic in it into an error.
    async fn with_server<T: Send + 'static>(
        &self,
        action: impl FnOnce(&mut NatsServer) -> T + Send + 'static,
    ) -> Result<T, BoxError> {
        let server = Arc::clone(&self.server);
        tokio::task::spawn_blocking(move || {
            let mut server = server.lock().unwrap_or_else(PoisonError::into_inner);
            action(&mut server)
        })
        .await
        .map_err(|err| format!("the NATS server's process could not be handled: {err}").into())
    }
}

#[async_trait]
impl Harness for NatsHarness {
    async fn transport(&self) -> Arc<dyn Transport> {
        let options = NatsOptions::from_url(&self.url)
            .unwrap_or_else(|err| panic!("`{}` is not a NATS URL: {err}", self.url));
        match Nats::connect_with(options).await {
            Ok(nats) => Arc::new(nats),
            Err(err) => panic!("could not connect to the case's NATS server: {err}"),
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
            acks_survive_restart: false,
        }
    }

    async fn stop_broker(&self) -> Result<(), BoxError> {
        // A clean stop, as an operator's restart is: see `inseam_test_servers::nats` for what
        // a kill would change. The transport does not declare `acks_survive_restart` either
        // way, since even a clean stop can lose a consumer's progress.
        self.with_server(NatsServer::stop)
            .await?
            .map_err(Into::into)
    }

    async fn start_broker(&self) -> Result<(), BoxError> {
        self.with_server(NatsServer::start_again).await
    }
}

async fn harness() -> NatsHarness {
    let server = tokio::task::spawn_blocking(nats_server::start)
        .await
        .unwrap_or_else(|err| panic!("the case's NATS server did not start: {err}"));
    NatsHarness {
        url: server.url(),
        server: Arc::new(Mutex::new(server)),
    }
}

inseam_conformance::suite!(harness);
