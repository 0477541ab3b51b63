//! The conformance suite every inseam transport passes: one set of cases, run unchanged
//! against the in-process reference and against each real broker.
//!
//! A transport implements [`inseam_core::transport::Transport`]; its crate's tests give the
//! suite a [`Harness`] (how to connect to a broker under test, which capabilities the
//! transport must declare, how to stop and start that broker) and expand [`suite!`], which
//! writes one test per case:
//!
//! ```no_run
//! use std::sync::Arc;
//!
//! use inseam_conformance::{BoxError, Harness, async_trait};
//! use inseam_core::transport::{Capabilities, InProcess, KeyOrder, Transport};
//!
//! struct InProcessHarness {
//!     broker: InProcess,
//! }
//!
//! #[async_trait]
//! impl Harness for InProcessHarness {
//!     async fn transport(&self) -> Arc<dyn Transport> {
//!         Arc::new(self.broker.clone())
//!     }
//!
//!     fn expected_capabilities(&self) -> Capabilities {
//!         Capabilities {
//!             ordering: KeyOrder::PerKey,
//!             delayed_redelivery: true,
//!             native_delayed_delivery: false,
//!             native_dead_letters: false,
//!             deduplicates: true,
//!             request_reply: true,
//!             acks_survive_restart: true,
//!         }
//!     }
//!
//!     async fn stop_broker(&self) -> Result<(), BoxError> {
//!         self.broker.set_available(false);
//!         Ok(())
//!     }
//!
//!     async fn start_broker(&self) -> Result<(), BoxError> {
//!         self.broker.set_available(true);
//!         Ok(())
//!     }
//! }
//!
//! async fn harness() -> InProcessHarness {
//!     InProcessHarness { broker: InProcess::new() }
//! }
//!
//! inseam_conformance::suite!(harness);
//! # fn main() {}
//! ```
//!
//! # What the suite promises
//!
//! A transport that passes it keeps the promises of the transport seam that inseam's relay
//! and consumers rely on, checked case by case with exact counts:
//!
//! - [`capabilities`](cases::capabilities): it declares exactly the capabilities its harness
//!   expects, so a change to them is a visible change to a test; a partitioned transport's
//!   [`partition`](inseam_core::transport::Transport::partition) agrees with the partition
//!   count it declares.
//! - [`message_is_preserved`](cases::message_is_preserved): bytes, key, headers and channel
//!   arrive as published (non-ASCII text, 200 KiB, `traceparent`, no key, no headers).
//! - [`every_group_gets_every_message`](cases::every_group_gets_every_message): every group
//!   gets every message of its channels exactly once, also a group that first subscribed
//!   after the messages were published.
//! - [`consumers_of_a_group_share_its_messages`](cases::consumers_of_a_group_share_its_messages):
//!   the consumers of one group share its messages, each message going to one of them.
//! - [`same_key_in_publish_order`](cases::same_key_in_publish_order): where key order is
//!   kept, messages of one key are handled in publish order even by concurrent consumers.
//! - [`same_key_in_publish_order_across_channels`](cases::same_key_in_publish_order_across_channels):
//!   where key order is kept, it holds across the channels a group reads: messages of one key
//!   published alternately to two channels are handled, by two concurrent consumers of a
//!   group that reads both, exactly in publish order.
//! - [`nack_redelivers_after_delay`](cases::nack_redelivers_after_delay): a nacked message
//!   comes again with its attempt raised, not before the delay asked, and holds back its key.
//! - [`unsettled_message_comes_again`](cases::unsettled_message_comes_again): a message a
//!   consumer took and never settled comes again to another consumer after the
//!   acknowledgement wait; an acknowledged message never comes again.
//! - [`poison_message_blocks_only_its_key_or_partition`](cases::poison_message_blocks_only_its_key_or_partition):
//!   a message that keeps failing comes back with rising attempts while the keys it must not
//!   hold back flow, and holds back exactly those it must (see below).
//! - [`consumer_restart_resumes_where_acked`](cases::consumer_restart_resumes_where_acked): a
//!   new consumer of a group gets what the group did not acknowledge, and nothing else.
//! - [`broker_restart_loses_nothing`](cases::broker_restart_loses_nothing): a stopped broker
//!   makes publishing fail transiently; after its restart, nothing published or acknowledged
//!   before is lost (a message whose acknowledgement failed during the outage may come again
//!   or not: a failed acknowledgement's outcome is unknown); what was acknowledged before
//!   does not come again, where the transport declares `acks_survive_restart`.
//! - [`duplicate_publish_is_dropped`](cases::duplicate_publish_is_dropped): where declared,
//!   a second publish of a message id is dropped.
//! - [`requests_are_answered_once`](cases::requests_are_answered_once): where declared, each
//!   request reaches one server of its channel and its answer comes back; unserved and
//!   unanswered requests fail as transient within their timeout; without it, requests are
//!   refused as permanent.
//!
//! A case whose capability the transport does not declare says on stderr that it does not
//! apply (never a silent pass).
//!
//! # Order: per key, per partition
//!
//! Key order is per group across every channel the group reads (see
//! [`KeyOrder`](inseam_core::transport::KeyOrder)). The order cases
//! (`same_key_in_publish_order`, `same_key_in_publish_order_across_channels`, and the
//! holding back of a key's later message in `nack_redelivers_after_delay` and
//! `unsettled_message_comes_again`) assert the same for
//! [`KeyOrder::PerKey`](inseam_core::transport::KeyOrder::PerKey) and
//! [`KeyOrder::PerKeyPartitioned`](inseam_core::transport::KeyOrder::PerKeyPartitioned), and
//! are not applicable with `KeyOrder::None`. They differ in what an unsettled message holds
//! back besides its own key, which
//! [`poison_message_blocks_only_its_key_or_partition`](cases::poison_message_blocks_only_its_key_or_partition)
//! pins exactly:
//!
//! - `PerKey`: nothing. The messages of 10 other keys all come while the poison keeps
//!   failing; only the later message of its key waits for it.
//! - `PerKeyPartitioned`: every key of its partition, and no other. The case asks the
//!   transport's [`partition`](inseam_core::transport::Transport::partition) function for 10
//!   keys of other partitions, whose messages must all come while the poison keeps failing,
//!   and 2 keys of the poison's partition, whose messages (like the later one of the poison's
//!   key) must not come before the poison is acknowledged.
//! - `None`: the messages of 10 other keys come while the poison keeps failing.
//!
//! The transport names its partitions, rather than the case asking only that some other key
//! completes while the poison fails, so that the case fails on the real bugs: a transport
//! that holds back more than the partition it declares (a whole group behind one message)
//! fails the "must come" half, one whose partitions are not those it declares (or that does
//! not hold its partition back as declared) fails the "must not come" half.//!
//! # Running against a real broker
//!
//! Every case uses channel and group names of its own (with a fresh UUID), so the cases can
//! run concurrently against one broker and again against a broker that kept earlier runs'
//! messages. [`Harness::stop_broker`] is the exception: it affects every case using that
//! broker, so the harness function that [`suite!`] calls once per case should give each case
//! a broker of its own, or at least the outage case
//! ([`broker_restart_loses_nothing`](cases::broker_restart_loses_nothing)). Restarting must
//! keep the broker's storage: the suite checks that nothing is lost across the restart.
//!
//! Each case runs on a multi-threaded tokio runtime of its own and fails after
//! [`CASE_TIMEOUT`]. The cases wait for at most 30 s for what must come, and for about
//! half a second (longer where an acknowledgement wait is involved) to see that nothing more
//! comes; against the in-process transport the whole suite takes about ten seconds.

#![warn(missing_docs)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use async_trait::async_trait;
pub use inseam_core::BoxError;
use inseam_core::transport::{Capabilities, Transport};

pub mod cases;
mod support;

/// How long one case may run before it fails.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(180);

/// What the suite needs from a transport's tests: connections to a broker under test, the
/// capabilities to expect, and a way to stop and start that broker.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// A new connection to the broker under test (called several times to act as several
    /// processes).
    async fn transport(&self) -> Arc<dyn Transport>;

    /// The capabilities the transport must declare (pinned by the suite).
    fn expected_capabilities(&self) -> Capabilities;

    /// Stops the broker, keeping its storage (for the outage case). The in-process harness
    /// uses [`InProcess::set_available`](inseam_core::transport::InProcess::set_available); a
    /// real broker's harness stops its own server. It returns an error when it cannot stop
    /// the broker, never pretends.
    async fn stop_broker(&self) -> Result<(), BoxError>;

    /// Starts the broker stopped by [`stop_broker`](Self::stop_broker) again, on the same
    /// storage and address.
    async fn start_broker(&self) -> Result<(), BoxError>;
}

/// Runs one case: builds a multi-threaded tokio runtime, makes a harness with `harness` and
/// runs `case` with it, failing (by panicking, as a test does) when the case fails or takes
/// longer than [`CASE_TIMEOUT`]. [`suite!`] calls it once per case.
pub fn run<H, Make, Made, Case, Running>(harness: Make, case: Case)
where
    H: Harness,
    Make: FnOnce() -> Made,
    Made: Future<Output = H>,
    Case: FnOnce(Arc<dyn Harness>) -> Running,
    Running: Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|error| panic!("building a tokio runtime failed: {error}"));
    runtime.block_on(async {
        let harness: Arc<dyn Harness> = Arc::new(harness().await);
        // Spawned, so that the case runs on the runtime's workers like an app's tasks do.
        let running = tokio::spawn(case(harness));
        match tokio::time::timeout(CASE_TIMEOUT, running).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => match error.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(error) => panic!("the case was cancelled: {error}"),
            },
            Err(_) => panic!("the case did not finish within {CASE_TIMEOUT:?}"),
        }
    });
}

/// Writes one `#[test]` per case of the suite, each running that case against a harness made
/// by `$harness` (a function, async or returning a future, that returns a [`Harness`]). See
/// the crate documentation for an example.
#[macro_export]
macro_rules! suite {
    (@cases $harness:path; $($case:ident),+ $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::run($harness, $crate::cases::$case);
            }
        )+
    };
    ($harness:path) => {
        $crate::suite!(@cases $harness;
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
            broker_restart_loses_nothing,
            duplicate_publish_is_dropped,
            requests_are_answered_once,
        );
    };
}
