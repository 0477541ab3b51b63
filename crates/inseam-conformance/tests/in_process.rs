//! The conformance suite against the in-process reference transport.

use std::sync::Arc;

use inseam_conformance::{BoxError, Harness, async_trait};
use inseam_core::transport::{Capabilities, InProcess, KeyOrder, Transport};

/// One in-memory broker per case; its outage switch stands in for stopping a server.
struct InProcessHarness {
    broker: InProcess,
}

#[async_trait]
impl Harness for InProcessHarness {
    async fn transport(&self) -> Arc<dyn Transport> {
        Arc::new(self.broker.clone())
    }

    fn expected_capabilities(&self) -> Capabilities {
        Capabilities {
            ordering: KeyOrder::PerKey,
            delayed_redelivery: true,
            native_delayed_delivery: false,
            native_dead_letters: false,
            deduplicates: true,
            request_reply: true,
            acks_survive_restart: true,
        }
    }

    async fn stop_broker(&self) -> Result<(), BoxError> {
        self.broker.set_available(false);
        Ok(())
    }

    async fn start_broker(&self) -> Result<(), BoxError> {
        self.broker.set_available(true);
        Ok(())
    }
}

async fn harness() -> InProcessHarness {
    InProcessHarness {
        broker: InProcess::new(),
    }
}

inseam_conformance::suite!(harness);
