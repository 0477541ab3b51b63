//! The conformance suite against the RabbitMQ transport.
//!
//! Starting a RabbitMQ node takes seconds, so the cases share one node that the test process
//! starts (on free ports of 127.0.0.1, its database in a temporary directory; never the
//! machine's broker), each case in a virtual host of its own. The outage case, which stops
//! its broker, gets a node of its own, started again on the same ports and database.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use inseam_amqp::{Amqp, AmqpOptions};
use inseam_conformance::{BoxError, Harness, async_trait};
use inseam_core::transport::{Capabilities, KeyOrder, Transport};

use inseam_test_servers::{Server as RabbitNode, amqp as rabbit};

/// The transport's default partition count, which the harness leaves as it is.
const PARTITIONS: u16 = 8;

/// The node the cases share, started by the first case that needs it.
static SHARED: OnceLock<RabbitNode> = OnceLock::new();

enum Node {
    /// The shared node: it cannot be stopped for one case.
    Shared,
    /// A node of the case's own, shared with the blocking tasks that stop and start it.
    Own(Arc<Mutex<RabbitNode>>),
}

struct AmqpHarness {
    url: String,
    node: Node,
}

impl AmqpHarness {
    /// Runs `action` on the case's own node on a blocking thread (stopping and starting wait
    /// for processes), turning a panic in it into an error.
    async fn with_node<T: Send + 'static>(
        &self,
        action: impl FnOnce(&mut RabbitNode) -> T + Send + 'static,
    ) -> Result<T, BoxError> {
        let Node::Own(node) = &self.node else {
            return Err("this case runs on the shared RabbitMQ node, which it cannot stop".into());
        };
        let node = Arc::clone(node);
        tokio::task::spawn_blocking(move || {
            let mut node = node.lock().unwrap_or_else(PoisonError::into_inner);
            action(&mut node)
        })
        .await
        .map_err(|err| format!("the RabbitMQ node's process could not be handled: {err}").into())
    }
}

#[async_trait]
impl Harness for AmqpHarness {
    async fn transport(&self) -> Arc<dyn Transport> {
        let options = AmqpOptions::from_url(&self.url)
            .unwrap_or_else(|err| panic!("`{}` is not an AMQP URL: {err}", self.url));
        match Amqp::connect_with(options).await {
            Ok(amqp) => Arc::new(amqp),
            Err(err) => panic!("could not connect to the case's RabbitMQ node: {err}"),
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
            acks_survive_restart: true,
        }
    }

    async fn stop_broker(&self) -> Result<(), BoxError> {
        self.with_node(RabbitNode::stop).await?.map_err(Into::into)
    }

    async fn start_broker(&self) -> Result<(), BoxError> {
        self.with_node(RabbitNode::start_again).await
    }
}

/// A virtual host of its own on the shared node.
async fn shared_harness() -> AmqpHarness {
    tokio::task::spawn_blocking(|| {
        let node = SHARED.get_or_init(|| {
            let node = rabbit::start();
            node.stop_when_gone();
            node
        });
        let vhost = format!("case-{}", uuid::Uuid::now_v7().simple());
        rabbit::add_vhost(node, &vhost)
            .unwrap_or_else(|err| panic!("could not add the case's virtual host: {err}"));
        AmqpHarness {
            url: rabbit::vhost_url(node, &vhost),
            node: Node::Shared,
        }
    })
    .await
    .unwrap_or_else(|err| panic!("the shared RabbitMQ node did not start: {err}"))
}

/// A node of the case's own.
async fn own_harness() -> AmqpHarness {
    let node = tokio::task::spawn_blocking(rabbit::start)
        .await
        .unwrap_or_else(|err| panic!("the case's RabbitMQ node did not start: {err}"));
    AmqpHarness {
        url: node.url(),
        node: Node::Own(Arc::new(Mutex::new(node))),
    }
}

// The suite's cases, unchanged, split over the two harnesses: every case but the outage one
// on the shared node.
inseam_conformance::suite!(@cases shared_harness;
    capabilities,
    message_is_preserved,
    every_group_gets_every_message,
    consumers_of_a_group_share_its_messages,
    same_key_in_publish_order,
    same_key_in_publish_order_across_channels,
    nack_redelivers_after_delay,
    unsettled_message_comes_again,
    poison_message_blocks_only_its_key_or_partition,
    consumer_restart_resumes_where_acked,
    duplicate_publish_is_dropped,
    requests_are_answered_once,
);
inseam_conformance::suite!(@cases own_harness; broker_restart_loses_nothing);
