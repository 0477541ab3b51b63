//! The suite's cases fail against transports with real bugs: each test here wraps the
//! in-process transport in a mutation (headers dropped, acks ignored, keys not ordered, ...)
//! and expects a named case to fail, with the failure that describes that bug.
//!
//! A partitioned transport is made from the in-process one too, by giving it each message's
//! partition as its key: the suite must pass it as it is, and fail it where its partitions
//! are not the ones it declares.
//!
//! The failing cases' panic messages show up on stderr; they are expected.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use inseam_conformance::{BoxError, Harness, async_trait, cases};
use inseam_core::transport::{
    Acker, Capabilities, Consumer, InProcess, Incoming, KeyOrder, Outgoing, Subscription,
    Transport, TransportError,
};
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mutation {
    /// Declares no deduplication although it deduplicates.
    WrongCapabilities,
    /// Loses the headers.
    DropsHeaders,
    /// Cuts payloads at 64 KiB.
    TruncatesPayloads,
    /// Gives every consumer a group of its own.
    GroupPerConsumer,
    /// Keeps keys (in a header) but does not order by them.
    IgnoresKeys,
    /// Orders a key's messages within each channel only (the broker sees the channel as
    /// part of the key).
    KeysPerChannel,
    /// Redelivers a nacked message at once.
    NackIgnoresDelay,
    /// Says every delivery is the first.
    AttemptAlwaysOne,
    /// Reports acks that it does not pass on.
    AckDoesNothing,
    /// Reports failed publishes as successful.
    SwallowsPublishErrors,
    /// Reports an outage as a permanent failure.
    OutageIsPermanent,
    /// Gives every published message a new id.
    NoDeduplication,
    /// No bug: a partitioned transport that keeps what it declares ([`PARTITIONS`]
    /// partitions, each handed out in order, one message at a time).
    Partitioned,
    /// Partitioned, but [`Transport::partition`] describes other partitions than the ones keys
    /// go to.
    PartitionMisreported,
    /// Declares [`PARTITIONS`] partitions but puts every message in one.
    SinglePartition,
    /// Forgets every group's progress when the broker restarts (each group starts over), but
    /// declares `acks_survive_restart`.
    ForgetsAcksOnRestart,
    /// No bug: forgets every group's progress when the broker restarts, and does not declare
    /// `acks_survive_restart`.
    ForgetsAcksOnRestartAndSaysSo,
}

impl Mutation {
    fn partitioned(self) -> bool {
        matches!(
            self,
            Mutation::Partitioned | Mutation::PartitionMisreported | Mutation::SinglePartition
        )
    }
}

/// How many partitions the partitioned mutants declare.
const PARTITIONS: u16 = 4;

/// FNV-1a, so that the partitions are the same in every run.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The partition a key really goes to in the partitioned mutants.
fn partition_of(bytes: &[u8]) -> u16 {
    u16::try_from(fnv1a(bytes) % u64::from(PARTITIONS)).unwrap_or(0)
}

const KEY_HEADER: &str = "x-mutant-key";

#[derive(Debug)]
struct Mutant {
    inner: InProcess,
    mutation: Mutation,
    /// How often the broker was started again.
    restarts: Arc<AtomicUsize>,
}

#[async_trait]
impl Transport for Mutant {
    fn name(&self) -> &'static str {
        "mutant"
    }

    fn capabilities(&self) -> Capabilities {
        let mut capabilities = self.inner.capabilities();
        if self.mutation == Mutation::WrongCapabilities {
            capabilities.deduplicates = false;
        }
        if self.mutation.partitioned() {
            capabilities.ordering = KeyOrder::PerKeyPartitioned {
                partitions: PARTITIONS,
            };
        }
        if self.mutation == Mutation::ForgetsAcksOnRestartAndSaysSo {
            capabilities.acks_survive_restart = false;
        }
        capabilities
    }

    fn partition(&self, key: &str) -> Option<u16> {
        match self.mutation {
            Mutation::Partitioned | Mutation::SinglePartition => Some(partition_of(key.as_bytes())),
            // Other bits of the hash: other partitions, not the same ones renumbered (which
            // would be no bug; the low bits of FNV-1a after one more byte are just that).
            Mutation::PartitionMisreported => {
                u16::try_from((fnv1a(key.as_bytes()) >> 32) % u64::from(PARTITIONS)).ok()
            }
            _ => None,
        }
    }

    async fn provision(&self, channels: &[String]) -> Result<(), TransportError> {
        self.inner.provision(channels).await
    }

    async fn publish(&self, batch: &[Outgoing]) -> Vec<Result<(), TransportError>> {
        let batch: Vec<Outgoing> = batch
            .iter()
            .cloned()
            .map(|mut message| {
                match self.mutation {
                    Mutation::DropsHeaders => message.headers.clear(),
                    Mutation::TruncatesPayloads => message.payload.truncate(64 * 1024),
                    Mutation::IgnoresKeys => {
                        if let Some(key) = message.key.take() {
                            message.headers.push((KEY_HEADER.to_owned(), key));
                        }
                    }
                    Mutation::KeysPerChannel => {
                        if let Some(key) = message.key.take() {
                            message.key = Some(format!("{}/{key}", message.channel));
                            message.headers.push((KEY_HEADER.to_owned(), key));
                        }
                    }
                    // The in-process broker orders by key: given the partition as the key,
                    // it holds back a partition behind an unsettled message of it.
                    Mutation::Partitioned
                    | Mutation::PartitionMisreported
                    | Mutation::SinglePartition => {
                        let partition = match (&message.key, self.mutation) {
                            (_, Mutation::SinglePartition) => 0,
                            (Some(key), _) => partition_of(key.as_bytes()),
                            (None, _) => partition_of(message.message_id.as_bytes()),
                        };
                        if let Some(key) = message.key.take() {
                            message.headers.push((KEY_HEADER.to_owned(), key));
                        }
                        message.key = Some(format!("partition-{partition}"));
                    }
                    Mutation::NoDeduplication => message.message_id = Uuid::now_v7(),
                    _ => {}
                }
                message
            })
            .collect();
        let outcomes = self.inner.publish(&batch).await;
        outcomes
            .into_iter()
            .map(|outcome| match (self.mutation, outcome) {
                (Mutation::SwallowsPublishErrors, _) => Ok(()),
                (Mutation::OutageIsPermanent, Err(error)) => Err(TransportError::permanent(
                    "mutant",
                    error.operation.clone(),
                    error,
                )),
                (_, outcome) => outcome,
            })
            .collect()
    }

    async fn subscribe(
        &self,
        subscription: &Subscription,
    ) -> Result<Box<dyn Consumer>, TransportError> {
        let mut subscription = subscription.clone();
        if self.mutation == Mutation::GroupPerConsumer {
            subscription.group = format!("{}-{}", subscription.group, Uuid::now_v7());
        }
        // A group of the same name after a restart is a new group to the in-process broker:
        // it starts at the beginning, as a consumer whose stored progress was lost does.
        if matches!(
            self.mutation,
            Mutation::ForgetsAcksOnRestart | Mutation::ForgetsAcksOnRestartAndSaysSo
        ) {
            let restarts = self.restarts.load(Ordering::SeqCst);
            subscription.group = format!("{}-{restarts}", subscription.group);
        }
        let inner = self.inner.subscribe(&subscription).await?;
        Ok(Box::new(MutantConsumer {
            inner,
            mutation: self.mutation,
        }))
    }
}

struct MutantConsumer {
    inner: Box<dyn Consumer>,
    mutation: Mutation,
}

#[async_trait]
impl Consumer for MutantConsumer {
    async fn fetch(&mut self, max: usize, wait: Duration) -> Result<Vec<Incoming>, TransportError> {
        let fetched = self.inner.fetch(max, wait).await?;
        Ok(fetched
            .into_iter()
            .map(|mut message| {
                match self.mutation {
                    Mutation::IgnoresKeys
                    | Mutation::KeysPerChannel
                    | Mutation::Partitioned
                    | Mutation::PartitionMisreported
                    | Mutation::SinglePartition => {
                        message.key = message
                            .headers
                            .iter()
                            .position(|(n, _)| n == KEY_HEADER)
                            .map(|at| message.headers.remove(at).1);
                    }
                    Mutation::AttemptAlwaysOne => message.attempt = 1,
                    Mutation::AckDoesNothing | Mutation::NackIgnoresDelay => {
                        message.acker = Box::new(MutantAcker {
                            inner: message.acker,
                            mutation: self.mutation,
                        });
                    }
                    _ => {}
                }
                message
            })
            .collect())
    }
}

struct MutantAcker {
    inner: Box<dyn Acker>,
    mutation: Mutation,
}

#[async_trait]
impl Acker for MutantAcker {
    async fn ack(&self) -> Result<(), TransportError> {
        if self.mutation == Mutation::AckDoesNothing {
            return Ok(());
        }
        self.inner.ack().await
    }

    async fn nack(&self, delay: Duration) -> Result<(), TransportError> {
        if self.mutation == Mutation::NackIgnoresDelay {
            return self.inner.nack(Duration::ZERO).await;
        }
        self.inner.nack(delay).await
    }
}

struct MutantHarness {
    broker: InProcess,
    mutation: Mutation,
    restarts: Arc<AtomicUsize>,
}

impl MutantHarness {
    fn new(mutation: Mutation) -> Self {
        MutantHarness {
            broker: InProcess::new(),
            mutation,
            restarts: Arc::new(AtomicUsize::new(0)),
        }
    }
}

#[async_trait]
impl Harness for MutantHarness {
    async fn transport(&self) -> Arc<dyn Transport> {
        Arc::new(Mutant {
            inner: self.broker.clone(),
            mutation: self.mutation,
            restarts: Arc::clone(&self.restarts),
        })
    }

    fn expected_capabilities(&self) -> Capabilities {
        let mut capabilities = self.broker.capabilities();
        if self.mutation.partitioned() {
            capabilities.ordering = KeyOrder::PerKeyPartitioned {
                partitions: PARTITIONS,
            };
        }
        if self.mutation == Mutation::ForgetsAcksOnRestartAndSaysSo {
            capabilities.acks_survive_restart = false;
        }
        capabilities
    }

    async fn stop_broker(&self) -> Result<(), BoxError> {
        self.broker.set_available(false);
        Ok(())
    }

    async fn start_broker(&self) -> Result<(), BoxError> {
        self.restarts.fetch_add(1, Ordering::SeqCst);
        self.broker.set_available(true);
        Ok(())
    }
}

/// Runs `case` against `mutation` and expects it to pass.
fn passes<F>(mutation: Mutation, case: fn(Arc<dyn Harness>) -> F)
where
    F: Future<Output = ()> + Send + 'static,
{
    inseam_conformance::run(|| async move { MutantHarness::new(mutation) }, case);
}

/// Runs `case` against `mutation` and expects it to fail with a message containing `says`.
fn fails<F>(mutation: Mutation, case: fn(Arc<dyn Harness>) -> F, says: &str)
where
    F: Future<Output = ()> + Send + 'static,
{
    eprintln!("expecting {mutation:?} to fail a case with \"{says}\":");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let outcome = runtime.block_on(async {
        let harness: Arc<dyn Harness> = Arc::new(MutantHarness::new(mutation));
        tokio::time::timeout(Duration::from_secs(60), tokio::spawn(case(harness))).await
    });
    let panic = match outcome {
        Err(_) => panic!("the case did not finish against {mutation:?}"),
        Ok(Ok(())) => panic!("the case passed against a transport with {mutation:?}"),
        Ok(Err(error)) => error.into_panic(),
    };
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default();
    assert!(
        message.contains(says),
        "against {mutation:?} the case failed, but not with \"{says}\": {message}"
    );
}

#[test]
fn misdeclared_capabilities() {
    fails(
        Mutation::WrongCapabilities,
        cases::capabilities,
        "declares other capabilities",
    );
}

#[test]
fn dropped_headers() {
    fails(
        Mutation::DropsHeaders,
        cases::message_is_preserved,
        "the traceparent header",
    );
}

#[test]
fn truncated_payloads() {
    fails(
        Mutation::TruncatesPayloads,
        cases::message_is_preserved,
        "an unexpected message came",
    );
}

#[test]
fn a_group_per_consumer_does_not_share() {
    fails(
        Mutation::GroupPerConsumer,
        cases::consumers_of_a_group_share_its_messages,
        "came with attempt 1 after a delivery with attempt 1",
    );
}

#[test]
fn a_group_per_consumer_does_not_resume() {
    fails(
        Mutation::GroupPerConsumer,
        cases::consumer_restart_resumes_where_acked,
        "after it was acknowledged",
    );
}

#[test]
fn keys_not_ordered() {
    fails(
        Mutation::IgnoresKeys,
        cases::same_key_in_publish_order,
        "in another order than published",
    );
}

#[test]
fn keys_ordered_only_within_each_channel() {
    fails(
        Mutation::KeysPerChannel,
        cases::same_key_in_publish_order_across_channels,
        "on two channels were handled in another order than published",
    );
}

#[test]
fn keys_not_held_back_behind_a_nacked_message() {
    fails(
        Mutation::IgnoresKeys,
        cases::nack_redelivers_after_delay,
        "while an earlier one of its key was nacked",
    );
}

#[test]
fn keys_not_held_back_behind_a_poison_message() {
    fails(
        Mutation::IgnoresKeys,
        cases::poison_message_blocks_only_its_key_or_partition,
        "while an earlier one of its key kept failing",
    );
}

#[test]
fn keys_not_held_back_behind_an_unsettled_message() {
    fails(
        Mutation::IgnoresKeys,
        cases::unsettled_message_comes_again,
        "while an earlier one of its key was unsettled",
    );
}

#[test]
fn nack_delay_ignored() {
    fails(
        Mutation::NackIgnoresDelay,
        cases::nack_redelivers_after_delay,
        "came again after",
    );
}

#[test]
fn attempts_not_counted_on_nack() {
    fails(
        Mutation::AttemptAlwaysOne,
        cases::nack_redelivers_after_delay,
        "with attempt 1 after a delivery with attempt 1",
    );
}

#[test]
fn attempts_not_counted_on_redelivery() {
    fails(
        Mutation::AttemptAlwaysOne,
        cases::unsettled_message_comes_again,
        "came with attempt 1 after a delivery with attempt 1",
    );
}

#[test]
fn acks_lost() {
    fails(
        Mutation::AckDoesNothing,
        cases::unsettled_message_comes_again,
        "came again (attempt 3) after it was acknowledged",
    );
}

#[test]
fn publish_errors_swallowed() {
    fails(
        Mutation::SwallowsPublishErrors,
        cases::broker_restart_loses_nothing,
        "succeeded while the broker was stopped",
    );
}

#[test]
fn outage_reported_as_permanent() {
    fails(
        Mutation::OutageIsPermanent,
        cases::broker_restart_loses_nothing,
        "failed with a permanent error",
    );
}

#[test]
fn duplicates_delivered() {
    fails(
        Mutation::NoDeduplication,
        cases::duplicate_publish_is_dropped,
        "after it was acknowledged",
    );
}

#[test]
fn duplicates_delivered_after_a_restart() {
    fails(
        Mutation::NoDeduplication,
        cases::broker_restart_loses_nothing,
        "after it was acknowledged",
    );
}

#[test]
fn a_partitioned_transport_passes_the_order_cases() {
    passes(Mutation::Partitioned, cases::capabilities);
    passes(Mutation::Partitioned, cases::same_key_in_publish_order);
    passes(
        Mutation::Partitioned,
        cases::same_key_in_publish_order_across_channels,
    );
    passes(Mutation::Partitioned, cases::nack_redelivers_after_delay);
    passes(Mutation::Partitioned, cases::unsettled_message_comes_again);
    passes(
        Mutation::Partitioned,
        cases::poison_message_blocks_only_its_key_or_partition,
    );
}

#[test]
fn partitions_not_as_declared() {
    fails(
        Mutation::PartitionMisreported,
        cases::poison_message_blocks_only_its_key_or_partition,
        "came while an earlier message of its partition (key `poison`) kept failing",
    );
}

#[test]
fn one_partition_holding_back_every_key() {
    fails(
        Mutation::SinglePartition,
        cases::poison_message_blocks_only_its_key_or_partition,
        "keys that must not wait for it did not all come within",
    );
}

#[test]
fn acks_forgotten_on_restart() {
    fails(
        Mutation::ForgetsAcksOnRestart,
        cases::broker_restart_loses_nothing,
        "after it was acknowledged",
    );
}

#[test]
fn a_transport_that_forgets_acks_on_restart_and_says_so_passes() {
    passes(
        Mutation::ForgetsAcksOnRestartAndSaysSo,
        cases::broker_restart_loses_nothing,
    );
    passes(Mutation::ForgetsAcksOnRestartAndSaysSo, cases::capabilities);
}
