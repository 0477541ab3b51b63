//! What the cases share: unique names, messages that identify themselves by their bytes, the
//! calls to the transport with failures turned into panics that say what failed, and a ledger
//! of every delivery that checks what a group received against what was published.

use std::collections::HashMap;
use std::error::Error;
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use inseam_core::transport::{Consumer, Incoming, Outgoing, Subscription, Transport};
use tokio::time::Instant;
use uuid::Uuid;

/// How long a case waits for something that must happen before it fails.
pub(crate) const PATIENCE: Duration = Duration::from_secs(30);
/// How long one fetch waits.
pub(crate) const FETCH_WAIT: Duration = Duration::from_millis(100);
/// How long a case keeps fetching, after everything it expected came, to see that nothing
/// more comes.
pub(crate) const QUIET: Duration = Duration::from_millis(500);

/// The names one run of one case uses, unique so that cases can run concurrently against one
/// broker and again against a broker that kept the messages of earlier runs.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    case: &'static str,
    run: String,
}

impl Names {
    pub(crate) fn new(case: &'static str) -> Self {
        Names {
            case,
            run: Uuid::now_v7().simple().to_string(),
        }
    }

    /// A channel, dotted like the contract names channels are made of.
    pub(crate) fn channel(&self, what: &str) -> String {
        format!("conformance.{}.{what}.{}", self.case, self.run)
    }

    /// A group, without dots (some brokers refuse them in consumer names).
    pub(crate) fn group(&self, what: &str) -> String {
        format!("conformance-{}-{what}-{}", self.case, self.run)
    }

    /// A message on `channel`, whose payload (a small CloudEvents-like JSON document) is
    /// unique to it, so the payload alone tells which message a delivery is.
    pub(crate) fn message(&self, channel: &str, key: Option<&str>, label: &str) -> Outgoing {
        let id = Uuid::now_v7();
        let payload = format!(
            r#"{{"specversion":"1.0","id":"{id}","type":"conformance.{case}","source":"/conformance/{run}","data":{{"label":"{label}"}}}}"#,
            case = self.case,
            run = self.run,
        );
        Outgoing {
            channel: channel.to_owned(),
            message_id: id,
            key: key.map(str::to_owned),
            headers: vec![("ce-id".to_owned(), id.to_string())],
            payload: Bytes::from(payload),
        }
    }
}

/// `error` and its sources, one after the other.
pub(crate) fn error_chain(error: &(dyn Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}

pub(crate) async fn provision(transport: &dyn Transport, channels: &[String]) {
    if let Err(error) = transport.provision(channels).await {
        panic!("provisioning {channels:?} failed: {}", error_chain(&error));
    }
}

/// Publishes `messages` in batches and fails unless the broker took every one.
pub(crate) async fn publish_all(transport: &dyn Transport, messages: &[Outgoing]) {
    for (chunk_index, chunk) in messages.chunks(100).enumerate() {
        let outcomes = transport.publish(chunk).await;
        assert_eq!(
            outcomes.len(),
            chunk.len(),
            "publish returned {} outcomes for a batch of {} messages",
            outcomes.len(),
            chunk.len()
        );
        for (i, outcome) in outcomes.iter().enumerate() {
            if let Err(error) = outcome {
                panic!(
                    "publishing message {} failed: {}",
                    chunk_index * 100 + i,
                    error_chain(error)
                );
            }
        }
    }
}

pub(crate) async fn subscribe(
    transport: &dyn Transport,
    subscription: &Subscription,
) -> Box<dyn Consumer> {
    match transport.subscribe(subscription).await {
        Ok(consumer) => consumer,
        Err(error) => panic!(
            "subscribing group `{}` failed: {}",
            subscription.group,
            error_chain(&error)
        ),
    }
}

pub(crate) async fn fetch(
    consumer: &mut dyn Consumer,
    max: usize,
    wait: Duration,
) -> Vec<Incoming> {
    match consumer.fetch(max, wait).await {
        Ok(messages) => {
            assert!(
                messages.len() <= max,
                "a fetch of at most {max} returned {}",
                messages.len()
            );
            messages
        }
        Err(error) => panic!("fetch failed: {}", error_chain(&error)),
    }
}

pub(crate) async fn ack(message: &Incoming) {
    if let Err(error) = message.ack().await {
        panic!("acknowledging {message:?} failed: {}", error_chain(&error));
    }
}

pub(crate) async fn nack(message: &Incoming, delay: Duration) {
    if let Err(error) = message.nack(delay).await {
        panic!("nacking {message:?} failed: {}", error_chain(&error));
    }
}

/// Every delivery of a set of published messages to one group, checked as it is recorded.
#[derive(Debug)]
pub(crate) struct Ledger {
    expected: Vec<Outgoing>,
    by_payload: HashMap<Bytes, usize>,
    deliveries: Vec<Vec<Delivery>>,
    acked: Vec<bool>,
    /// Messages that may come again as if new, attempts counted from 1 again (see
    /// [`reopen`](Self::reopen)).
    reopened: Vec<bool>,
    problems: Vec<String>,
}

/// One delivery of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Delivery {
    pub(crate) attempt: u32,
    /// Which consumer of the case got it.
    pub(crate) consumer: usize,
}

impl Ledger {
    pub(crate) fn new(expected: &[Outgoing]) -> Self {
        let by_payload = expected
            .iter()
            .enumerate()
            .map(|(i, m)| (m.payload.clone(), i))
            .collect::<HashMap<_, _>>();
        assert_eq!(
            by_payload.len(),
            expected.len(),
            "the case published two messages with the same payload"
        );
        Ledger {
            expected: expected.to_vec(),
            by_payload,
            deliveries: vec![Vec::new(); expected.len()],
            acked: vec![false; expected.len()],
            reopened: vec![false; expected.len()],
            problems: Vec::new(),
        }
    }

    /// Records that `consumer` received `incoming`, and returns which expected message it
    /// is. A delivery that does not match what was published (its bytes, channel, key or
    /// headers), comes after the message was acknowledged, or whose attempt does not
    /// follow the previous one is recorded as a problem.
    pub(crate) fn record(&mut self, incoming: &Incoming, consumer: usize) -> Option<usize> {
        let Some(&index) = self.by_payload.get(&incoming.payload) else {
            self.problems.push(format!(
                "an unexpected message came: {incoming:?}, payload {:?}",
                preview(&incoming.payload)
            ));
            return None;
        };
        let expected = &self.expected[index];
        if incoming.channel != expected.channel {
            self.problems.push(format!(
                "message {index} came on channel `{}`, published to `{}`",
                incoming.channel, expected.channel
            ));
        }
        if incoming.key != expected.key {
            self.problems.push(format!(
                "message {index} came with key {:?}, published with {:?}",
                incoming.key, expected.key
            ));
        }
        if sorted(&incoming.headers) != sorted(&expected.headers) {
            self.problems.push(format!(
                "message {index} came with headers {:?}, published with {:?}",
                sorted(&incoming.headers),
                sorted(&expected.headers)
            ));
        }
        if self.acked[index] {
            self.problems.push(format!(
                "message {index} came again (attempt {}) after it was acknowledged",
                incoming.attempt
            ));
        }
        let reopened = std::mem::replace(&mut self.reopened[index], false);
        match self.deliveries[index].last() {
            _ if incoming.attempt == 0 => self.problems.push(format!(
                "message {index} came with attempt 0; attempts count from 1"
            )),
            Some(previous) if incoming.attempt <= previous.attempt && !reopened => {
                self.problems.push(format!(
                    "message {index} came with attempt {} after a delivery with attempt {}",
                    incoming.attempt, previous.attempt
                ));
            }
            _ => {}
        }
        self.deliveries[index].push(Delivery {
            attempt: incoming.attempt,
            consumer,
        });
        Some(index)
    }

    /// Fails at once when a delivery so far was wrong (see [`record`](Self::record)): a lost
    /// acknowledgement or a corrupted message can hold back its key for good, and the case
    /// would otherwise end only much later, by running out of patience.
    pub(crate) fn assert_no_problems(&self) {
        if !self.problems.is_empty() {
            panic!(
                "the group's deliveries are wrong:\n{}",
                self.problem_report()
            );
        }
    }

    /// Lets message `index`, acknowledged or not, come again as if it were new (its attempts
    /// counted from 1 again): for a broker that may forget acknowledgements or deliveries
    /// across a restart.
    pub(crate) fn reopen(&mut self, index: usize) {
        self.acked[index] = false;
        self.reopened[index] = true;
    }

    /// Records that the acknowledgement of message `index` succeeded.
    pub(crate) fn acked(&mut self, index: usize) {
        self.acked[index] = true;
    }

    pub(crate) fn is_acked(&self, index: usize) -> bool {
        self.acked[index]
    }

    pub(crate) fn deliveries(&self, index: usize) -> &[Delivery] {
        &self.deliveries[index]
    }

    pub(crate) fn all_acked(&self) -> bool {
        self.acked.iter().all(|a| *a)
    }

    pub(crate) fn acked_count(&self) -> usize {
        self.acked.iter().filter(|a| **a).count()
    }

    /// How many deliveries consumer `consumer` got.
    pub(crate) fn deliveries_to(&self, consumer: usize) -> usize {
        self.deliveries
            .iter()
            .flatten()
            .filter(|d| d.consumer == consumer)
            .count()
    }

    /// Every message came exactly once, as published, and nothing else came.
    pub(crate) fn check_exactly_once(&self) -> Result<(), String> {
        self.check(|deliveries| deliveries == 1, "exactly once")
    }

    /// Every message came at least once, as published, was acknowledged and did not come
    /// again after that, and nothing else came.
    pub(crate) fn check_at_least_once(&self) -> Result<(), String> {
        self.check(|deliveries| deliveries >= 1, "at least once")?;
        let unacked: Vec<usize> = (0..self.expected.len())
            .filter(|i| !self.acked[*i])
            .collect();
        if unacked.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} of {} messages were never acknowledged, e.g. {:?}",
                unacked.len(),
                self.expected.len(),
                &unacked[..unacked.len().min(10)]
            ))
        }
    }

    fn check(&self, count_ok: impl Fn(usize) -> bool, promise: &str) -> Result<(), String> {
        let mut report = self.problem_report();
        let wrong: Vec<(usize, usize)> = self
            .deliveries
            .iter()
            .enumerate()
            .filter(|(_, d)| !count_ok(d.len()))
            .map(|(i, d)| (i, d.len()))
            .collect();
        if !wrong.is_empty() {
            let _ = writeln!(
                report,
                "  {} of {} messages did not come {promise}; (message, deliveries): {:?}",
                wrong.len(),
                self.expected.len(),
                &wrong[..wrong.len().min(10)]
            );
        }
        if report.is_empty() {
            Ok(())
        } else {
            Err(format!("the group's deliveries are wrong:\n{report}"))
        }
    }

    fn problem_report(&self) -> String {
        let mut report = String::new();
        for problem in self.problems.iter().take(10) {
            let _ = writeln!(report, "  {problem}");
        }
        if self.problems.len() > 10 {
            let _ = writeln!(report, "  ... and {} more", self.problems.len() - 10);
        }
        report
    }
}

fn sorted(headers: &[(String, String)]) -> Vec<(String, String)> {
    let mut headers = headers.to_vec();
    headers.sort();
    headers
}

fn preview(payload: &[u8]) -> String {
    let text = String::from_utf8_lossy(payload);
    if text.chars().count() > 120 {
        format!("{}...", text.chars().take(120).collect::<String>())
    } else {
        text.into_owned()
    }
}

/// Fetches from `consumer`, records each delivery in `ledger`, lets `inspect` look at it and
/// acknowledges it, until `done` says so; fails after [`PATIENCE`].
pub(crate) async fn consume_until(
    consumer: &mut dyn Consumer,
    ledger: &mut Ledger,
    tag: usize,
    max: usize,
    mut inspect: impl FnMut(&Incoming) + Send,
    done: impl Fn(&Ledger) -> bool + Send,
) {
    let give_up = Instant::now() + PATIENCE;
    while !done(ledger) {
        assert!(
            Instant::now() < give_up,
            "not everything expected came within {PATIENCE:?}: {} of {} messages acknowledged; {:?}",
            ledger.acked_count(),
            ledger.expected.len(),
            ledger.check_at_least_once().err()
        );
        for message in fetch(consumer, max, FETCH_WAIT).await {
            inspect(&message);
            let index = ledger.record(&message, tag);
            ledger.assert_no_problems();
            ack(&message).await;
            if let Some(index) = index {
                ledger.acked(index);
            }
        }
    }
}

/// Fetches from `consumer` for `period`, records and acknowledges whatever comes, and returns
/// how many messages came.
pub(crate) async fn drain_for(
    consumer: &mut dyn Consumer,
    ledger: &mut Ledger,
    tag: usize,
    period: Duration,
) -> usize {
    let until = Instant::now() + period;
    let mut count = 0;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return count;
        }
        for message in fetch(consumer, 64, left.min(FETCH_WAIT)).await {
            count += 1;
            let index = ledger.record(&message, tag);
            ack(&message).await;
            if let Some(index) = index {
                ledger.acked(index);
            }
        }
    }
}

/// Locks `mutex`, also after a panic of another task of the case (which fails the case
/// anyway, with its own message).
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Awaits a spawned task, passing its panic on as it was.
pub(crate) async fn join<T>(task: tokio::task::JoinHandle<T>) -> T {
    match task.await {
        Ok(value) => value,
        Err(error) => match error.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            Err(error) => panic!("a task of the case was cancelled: {error}"),
        },
    }
}

/// A small deterministic pseudo-random source (xorshift), enough to vary handling times.
#[derive(Debug)]
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn new(seed: u64) -> Self {
        Jitter(seed | 1)
    }

    /// A duration from zero to `max`, in microseconds.
    pub(crate) fn next(&mut self, max: Duration) -> Duration {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        let micros = u64::try_from(max.as_micros()).unwrap_or(u64::MAX).max(1);
        Duration::from_micros(x % micros)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_trait::async_trait;
    use inseam_core::transport::{Acker, TransportError};

    use super::*;

    #[derive(Debug)]
    struct NoAcker;

    #[async_trait]
    impl Acker for NoAcker {
        async fn ack(&self) -> Result<(), TransportError> {
            Ok(())
        }
        async fn nack(&self, _delay: Duration) -> Result<(), TransportError> {
            Ok(())
        }
    }

    fn incoming(message: &Outgoing, attempt: u32) -> Incoming {
        Incoming {
            channel: message.channel.clone(),
            key: message.key.clone(),
            headers: message.headers.clone(),
            payload: message.payload.clone(),
            attempt,
            acker: Box::new(NoAcker),
        }
    }

    fn two() -> (Names, Vec<Outgoing>) {
        let names = Names::new("ledger");
        let channel = names.channel("a");
        let messages = vec![
            names.message(&channel, Some("k"), "0"),
            names.message(&channel, None, "1"),
        ];
        (names, messages)
    }

    #[test]
    fn names_are_unique_per_run_and_messages_per_call() {
        let (a, b) = (Names::new("x"), Names::new("x"));
        assert_ne!(a.channel("c"), b.channel("c"));
        assert_ne!(a.group("g"), b.group("g"));
        assert!(!a.group("g").contains('.'));
        let channel = a.channel("c");
        let (m1, m2) = (
            a.message(&channel, None, "l"),
            a.message(&channel, None, "l"),
        );
        assert_ne!(m1.payload, m2.payload);
        assert_ne!(m1.message_id, m2.message_id);
    }

    #[test]
    fn a_clean_run_passes_both_checks() {
        let (_, messages) = two();
        let mut ledger = Ledger::new(&messages);
        for m in &messages {
            let index = ledger.record(&incoming(m, 1), 0).unwrap();
            ledger.acked(index);
        }
        assert!(ledger.all_acked());
        ledger.check_exactly_once().unwrap();
        ledger.check_at_least_once().unwrap();
    }

    #[test]
    fn a_duplicate_fails_exactly_once_but_not_at_least_once_before_the_ack() {
        let (_, messages) = two();
        let mut ledger = Ledger::new(&messages);
        ledger.record(&incoming(&messages[0], 1), 0);
        ledger.record(&incoming(&messages[0], 2), 1);
        ledger.acked(0);
        ledger.record(&incoming(&messages[1], 1), 0);
        ledger.acked(1);
        assert!(ledger.check_exactly_once().is_err());
        ledger.check_at_least_once().unwrap();
        assert_eq!(ledger.deliveries_to(1), 1);
    }

    #[test]
    fn a_delivery_after_the_ack_fails_both_checks() {
        let (_, messages) = two();
        let mut ledger = Ledger::new(&messages);
        ledger.record(&incoming(&messages[0], 1), 0);
        ledger.acked(0);
        ledger.record(&incoming(&messages[0], 2), 0);
        ledger.record(&incoming(&messages[1], 1), 0);
        ledger.acked(1);
        let error = ledger.check_at_least_once().unwrap_err();
        assert!(error.contains("after it was acknowledged"), "{error}");
        assert!(ledger.check_exactly_once().is_err());
    }

    #[test]
    #[should_panic(expected = "came again (attempt 2) after it was acknowledged")]
    fn a_wrong_delivery_can_fail_at_once() {
        let (_, messages) = two();
        let mut ledger = Ledger::new(&messages);
        ledger.record(&incoming(&messages[0], 1), 0);
        ledger.assert_no_problems();
        ledger.acked(0);
        ledger.assert_no_problems();
        ledger.record(&incoming(&messages[0], 2), 0);
        ledger.assert_no_problems();
    }

    #[test]
    fn a_missing_or_unacknowledged_message_fails() {
        let (_, messages) = two();
        let mut ledger = Ledger::new(&messages);
        ledger.record(&incoming(&messages[0], 1), 0);
        ledger.acked(0);
        assert!(ledger.check_exactly_once().is_err());
        assert!(ledger.check_at_least_once().is_err());
        ledger.record(&incoming(&messages[1], 1), 0);
        let error = ledger.check_at_least_once().unwrap_err();
        assert!(error.contains("never acknowledged"), "{error}");
    }

    #[test]
    fn altered_bytes_channel_key_headers_or_attempts_are_problems() {
        let (_, messages) = two();
        type Alter = Box<dyn Fn(&mut Incoming)>;
        let cases: Vec<(&str, Alter)> = vec![
            (
                "payload",
                Box::new(|m| m.payload = Bytes::from_static(b"{}")),
            ),
            ("channel", Box::new(|m| m.channel.push('x'))),
            ("key", Box::new(|m| m.key = Some("other".to_owned()))),
            (
                "headers",
                Box::new(|m| m.headers.push(("x".into(), "y".into()))),
            ),
            ("header value", Box::new(|m| m.headers[0].1.push('x'))),
        ];
        for (what, alter) in cases {
            let mut ledger = Ledger::new(&messages);
            let mut wrong = incoming(&messages[0], 1);
            alter(&mut wrong);
            if let Some(index) = ledger.record(&wrong, 0) {
                ledger.acked(index);
            }
            let right = incoming(&messages[1], 1);
            ledger.record(&right, 0);
            ledger.acked(1);
            if let Some(index) = ledger.record(&incoming(&messages[0], 2), 0) {
                ledger.acked(index);
            }
            assert!(
                ledger.check_at_least_once().is_err(),
                "{what} was not caught"
            );
        }

        let mut ledger = Ledger::new(&messages);
        ledger.record(&incoming(&messages[0], 2), 0);
        ledger.record(&incoming(&messages[0], 2), 0);
        ledger.acked(0);
        ledger.record(&incoming(&messages[1], 0), 0);
        ledger.acked(1);
        let error = ledger.check_at_least_once().unwrap_err();
        assert!(
            error.contains("attempt 2 after a delivery with attempt 2"),
            "{error}"
        );
        assert!(error.contains("attempt 0"), "{error}");
    }

    #[test]
    fn header_order_does_not_matter() {
        let (names, _) = two();
        let channel = names.channel("a");
        let mut message = names.message(&channel, None, "h");
        message
            .headers
            .push(("traceparent".into(), "00-a-b-01".into()));
        let mut ledger = Ledger::new(std::slice::from_ref(&message));
        let mut received = incoming(&message, 1);
        received.headers.reverse();
        ledger.record(&received, 0);
        ledger.acked(0);
        ledger.check_exactly_once().unwrap();
    }

    #[test]
    fn errors_are_shown_with_their_sources() {
        let error = TransportError::transient("t", "publish to `x`", "connection refused");
        assert_eq!(
            error_chain(&error),
            "t: could not publish to `x`: connection refused"
        );
    }

    #[test]
    fn jitter_stays_within_its_bound_and_varies() {
        let mut jitter = Jitter::new(7);
        let values: Vec<Duration> = (0..100)
            .map(|_| jitter.next(Duration::from_millis(2)))
            .collect();
        assert!(values.iter().all(|v| *v < Duration::from_millis(2)));
        assert!(values.iter().any(|v| *v != values[0]));
        assert_eq!(Jitter::new(0).next(Duration::ZERO), Duration::ZERO);
    }
}
