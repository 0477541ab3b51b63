//! The brokers the cross-process tests run over, each a server of the test's own
//! ([`inseam_test_servers`]), with the transport connected to it and what the tests ask of
//! it besides. A test over every broker loops over [`Broker::ALL`] or has one test per
//! broker calling a function that takes a [`Broker`].

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use inseam::BoxError;
use inseam::transport::Transport;
use inseam_test_servers::Server;

/// How long a Kafka group waits for a silent member (a killed process) before it hands its
/// partitions to the others.
const KAFKA_SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// Held by a test that loads the machine with a broker and processes of its own (the outage,
/// crash and split tests), so that those of one test binary run one at a time: run together on
/// two cores, their processes starve each other's timings.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits until no other such test of this binary runs; the guard lets the next one go.
pub async fn alone() -> tokio::sync::MutexGuard<'static, ()> {
    ALONE.lock().await
}

/// A broker inseam has a transport for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broker {
    /// NATS JetStream (`inseam::nats`).
    Nats,
    /// Redis Streams (`inseam::redis`).
    Redis,
    /// RabbitMQ (`inseam::amqp`).
    Amqp,
    /// Kafka (`inseam::kafka`), on a tansu broker storing in S3.
    Kafka,
}

impl Broker {
    /// Every broker.
    pub const ALL: &[Broker] = &[Broker::Nats, Broker::Redis, Broker::Amqp, Broker::Kafka];

    /// The transport's name, which a routing file names.
    pub fn name(self) -> &'static str {
        match self {
            Broker::Nats => "nats",
            Broker::Redis => "redis",
            Broker::Amqp => "amqp",
            Broker::Kafka => "kafka",
        }
    }

    /// The broker whose transport is named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Broker::ALL.iter().copied().find(|b| b.name() == name)
    }

    /// The environment variable the transport's options read the broker's URL from.
    pub fn url_env(self) -> &'static str {
        match self {
            Broker::Nats => "INSEAM_NATS_URL",
            Broker::Redis => "INSEAM_REDIS_URL",
            Broker::Amqp => "INSEAM_AMQP_URL",
            Broker::Kafka => "INSEAM_KAFKA_URL",
        }
    }

    /// How long a process that replaces a killed member of a group (under the same name, see
    /// [`transport_as`](Self::transport_as)) may wait before it gets the group's messages:
    /// nothing for most brokers; for Kafka on tansu, up to the session timeout and the join
    /// that follows (about half the session timeout). Measured on tansu 0.6 with a 6 s
    /// session: a replacement killed 3–5.5 s after it started had recorded nothing in 20 of
    /// 20 rounds, one killed 9.5–11.5 s after in 6 of 6.
    pub fn takeover(self) -> Duration {
        match self {
            Broker::Kafka => KAFKA_SESSION_TIMEOUT + KAFKA_SESSION_TIMEOUT / 2,
            _ => Duration::ZERO,
        }
    }

    /// What a process of the test's own configured from the environment sets besides
    /// [`url_env`](Self::url_env), as [`transport`](Self::transport) does in the test's
    /// process: Kafka's session timeout, which on tansu is also how long a new group waits.
    pub fn process_env(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Broker::Kafka => &[("INSEAM_KAFKA_SESSION_TIMEOUT", "6s")],
            _ => &[],
        }
    }

    /// Starts a server of the test's own, which the test does not stop (tansu keeps its data
    /// in memory: see [`start_restartable`](Self::start_restartable)).
    ///
    /// # Panics
    /// When its binary is missing (the message says how to install it) or it does not start.
    pub fn start(self) -> Server {
        match self {
            Broker::Kafka => inseam_test_servers::kafka::start_in_memory(),
            _ => self.start_restartable(),
        }
    }

    /// Starts a server of the test's own that keeps its data across a stop and a start
    /// (tansu in S3, its offset commits 15–150 ms where its memory storage answers in about
    /// a millisecond).
    ///
    /// # Panics
    /// As [`start`](Self::start).
    pub fn start_restartable(self) -> Server {
        match self {
            Broker::Nats => inseam_test_servers::nats::start(),
            Broker::Redis => inseam_test_servers::redis::start(),
            Broker::Amqp => inseam_test_servers::amqp::start(),
            Broker::Kafka => inseam_test_servers::kafka::start(),
        }
    }

    /// The transport connected to the server at `url`, with timeouts short enough for tests.
    pub async fn transport(self, url: &str) -> Result<Arc<dyn Transport>, BoxError> {
        self.transport_as(url, None).await
    }

    /// [`transport`](Self::transport) for a process that comes back under the same name
    /// `member` after it was killed: over Kafka, a static member of its groups, which gets
    /// its partitions back at once.
    pub async fn transport_as(
        self,
        url: &str,
        member: Option<&str>,
    ) -> Result<Arc<dyn Transport>, BoxError> {
        let short = Duration::from_secs(2);
        match self {
            Broker::Nats => {
                let options = inseam::nats::NatsOptions::from_url(url)?
                    .publish_timeout(short)
                    .request_timeout(short)
                    .connection_timeout(short);
                Ok(Arc::new(inseam::nats::Nats::connect_with(options).await?))
            }
            Broker::Redis => {
                // A consumer killed holding partitions keeps them for the lease's life: 1 s
                // here (5 s by default) lets the next process take over within its run.
                let options = inseam::redis::RedisOptions::from_url(url)?
                    .publish_timeout(short)
                    .request_timeout(short)
                    .connection_timeout(short)
                    .lease_ttl(Duration::from_secs(1));
                Ok(Arc::new(inseam::redis::Redis::connect_with(options).await?))
            }
            Broker::Amqp => {
                let options = inseam::amqp::AmqpOptions::from_url(url)?
                    .publish_timeout(short)
                    .request_timeout(short)
                    .connection_timeout(short);
                Ok(Arc::new(inseam::amqp::Amqp::connect_with(options).await?))
            }
            Broker::Kafka => {
                // tansu on S3 in moto answers an offset commit in about 100 ms, and in
                // seconds when members of a group commit at once (each commit rewrites the
                // group's object in S3): reads of committed offsets get 10 s. A killed process's
                // partitions go to another member after the session timeout.
                let options = inseam::kafka::KafkaOptions::from_url(url)?
                    .publish_timeout(Duration::from_secs(5))
                    .request_timeout(Duration::from_secs(10))
                    .session_timeout(KAFKA_SESSION_TIMEOUT);
                let options = match member {
                    Some(id) => options.instance_id(id),
                    None => options,
                };
                Ok(Arc::new(inseam::kafka::Kafka::connect_with(options)?))
            }
        }
    }

    /// Whether [`redeliveries`](Self::redeliveries) can tell.
    pub fn counts_redeliveries(self) -> bool {
        match self {
            Broker::Nats => true,
            // Redis keeps an entry's delivery count only while it is pending (`XPENDING`)
            // and forgets it with the `XACK`; nothing counts a group's deliveries in all.
            Broker::Redis => false,
            // RabbitMQ counts a queue's redeliveries only in the management plugin's
            // statistics (not over AMQP, and the test's node runs no plugins); a message
            // handed out again carries its `x-delivery-count` to its consumer alone.
            Broker::Amqp => false,
            // Kafka counts no deliveries: the transport records in a companion group only
            // which message of a partition was handed out last and how often, not how many
            // messages were handed out again.
            Broker::Kafka => false,
        }
    }

    /// How many times the broker handed out a message to group `group` again, once the
    /// group's consumers settled everything (`None` while they have not, or when the broker
    /// cannot tell: see [`counts_redeliveries`](Self::counts_redeliveries)). `distinct` is how
    /// many messages the group's channels got.
    pub async fn redeliveries(self, url: &str, group: &str, distinct: u64) -> Option<u64> {
        match self {
            Broker::Nats => nats_redeliveries(url, group, distinct).await,
            Broker::Redis => None,
            Broker::Amqp => None,
            Broker::Kafka => None,
        }
    }
}

/// NATS: each partition's consumer of the group counts its deliveries, the stream its
/// messages.
async fn nats_redeliveries(url: &str, group: &str, distinct: u64) -> Option<u64> {
    let client = async_nats::connect(url).await.ok()?;
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream("INSEAM").await.ok()?;
    let messages = stream.info().await.ok()?.state.messages;
    let mut consumers = stream.consumers();
    let (mut delivered, mut unsettled, mut partitions) = (0, 0, 0);
    // NATS 2.9 filters a partition's whole subject space (the group's consumers also get, and
    // settle, the other channels' messages); later servers filter the group's channels.
    let mut whole_partition = false;
    let described = format!("`{group}`");
    while let Some(info) = consumers.next().await {
        let info = info.ok()?;
        if !info
            .config
            .description
            .as_deref()
            .is_some_and(|d| d.contains(&described))
        {
            continue;
        }
        partitions += 1;
        delivered += info.delivered.consumer_sequence;
        unsettled += info.num_pending + info.num_ack_pending as u64;
        whole_partition |= info.config.filter_subject.ends_with(".>");
    }
    let distinct = if whole_partition { messages } else { distinct };
    (partitions > 0 && unsettled == 0).then(|| delivered - distinct)
}
