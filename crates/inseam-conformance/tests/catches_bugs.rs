//! The suite's cases fail against transports with real bugs: each test here wraps the
//! in-process transport in a mutation (headers dropped, acks ignored, keys not ordered, ...)
//! and expects a named case to fail, with the failure that describes that bug.
//!
//! The failing cases' panic messages show up on stderr; they are expected.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use inseam_conformance::{BoxError, Harness, async_trait, cases};
use inseam_core::transport::{
    Acker, Capabilities, Consumer, InProcess, Incoming, Outgoing, Subscription, Transport,
    TransportError,
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
}

const KEY_HEADER: &str = "x-mutant-key";

#[derive(Debug)]
struct Mutant {
    inner: InProcess,
    mutation: Mutation,
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
        capabilities
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
                    Mutation::IgnoresKeys | Mutation::KeysPerChannel => {
                        if let Some(at) = message.headers.iter().position(|(n, _)| n == KEY_HEADER)
                        {
                            message.key = Some(message.headers.remove(at).1);
                        }
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
}

#[async_trait]
impl Harness for MutantHarness {
    async fn transport(&self) -> Arc<dyn Transport> {
        Arc::new(Mutant {
            inner: self.broker.clone(),
            mutation: self.mutation,
        })
    }

    fn expected_capabilities(&self) -> Capabilities {
        self.broker.capabilities()
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
        let harness: Arc<dyn Harness> = Arc::new(MutantHarness {
            broker: InProcess::new(),
            mutation,
        });
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
        cases::poison_message_blocks_only_its_key,
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
