//! The cases of the suite, each an async function of a [`Harness`].
//!
//! [`suite!`](crate::suite) runs every one of them as a test; a transport's tests can also run
//! one through [`run`](crate::run). Each case panics, saying what went wrong, when the
//! transport breaks a promise of the seam.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use inseam_core::transport::{Consumer, Incoming, KeyOrder, Outgoing, Subscription, Transport};
use tokio::time::Instant;

use crate::Harness;
use crate::support::{
    FETCH_WAIT, Jitter, Ledger, Names, PATIENCE, QUIET, ack, consume_until, drain_for, error_chain,
    fetch, join, lock, nack, provision, publish_all, subscribe,
};

/// The transport declares exactly [`Harness::expected_capabilities`], on every connection,
/// and has a name. With [`KeyOrder::PerKeyPartitioned`], [`Transport::partition`] puts each
/// of 256 keys (an empty and a non-ASCII one among them) in a partition below the declared
/// count, the same one on every connection, and uses more than one partition when there are
/// several; with any other order it says `None`.
pub async fn capabilities(harness: Arc<dyn Harness>) {
    let expected = harness.expected_capabilities();
    let mut keys: Vec<String> = (0..254).map(|i| format!("key-{i}")).collect();
    keys.extend([String::new(), "clé-🦀-ключ-鍵".to_owned()]);
    let mut first: Option<Vec<Option<u16>>> = None;
    for _ in 0..2 {
        let transport = harness.transport().await;
        let name = transport.name();
        assert!(
            !name.is_empty(),
            "a transport needs a name for logs and errors"
        );
        assert_eq!(
            transport.capabilities(),
            expected,
            "transport `{name}` declares other capabilities than its harness expects",
        );
        let partitions: Vec<Option<u16>> = keys.iter().map(|k| transport.partition(k)).collect();
        match expected.ordering {
            KeyOrder::PerKeyPartitioned { partitions: count } => {
                assert!(
                    count >= 1,
                    "transport `{name}` declares KeyOrder::PerKeyPartitioned with no partition"
                );
                for (key, partition) in keys.iter().zip(&partitions) {
                    match partition {
                        Some(partition) if *partition < count => {}
                        other => panic!(
                            "transport `{name}` declares {count} partitions but puts key \
                             {key:?} in partition {other:?}"
                        ),
                    }
                }
                let used: HashSet<&Option<u16>> = partitions.iter().collect();
                assert!(
                    count == 1 || used.len() > 1,
                    "transport `{name}` declares {count} partitions but puts all of 256 keys \
                     in one"
                );
            }
            _ => {
                if let Some((key, partition)) = keys
                    .iter()
                    .zip(&partitions)
                    .find(|(_, partition)| partition.is_some())
                {
                    panic!(
                        "transport `{name}` does not declare KeyOrder::PerKeyPartitioned but \
                         puts key {key:?} in partition {partition:?}"
                    );
                }
            }
        }
        match &first {
            None => first = Some(partitions),
            Some(before) => assert!(
                *before == partitions,
                "transport `{name}` puts keys in other partitions on another connection"
            ),
        }
    }
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A message's bytes, key, headers and channel reach the group exactly as published: a JSON
/// payload full of non-ASCII text and escapes, a 200 KiB payload, seven headers (with
/// `traceparent` and `tracestate`) or none, a non-ASCII key or none, on two channels read by
/// one group. Each comes once, with attempt 1.
pub async fn message_is_preserved(harness: Arc<dyn Harness>) {
    let names = Names::new("preserved");
    let transport = harness.transport().await;
    let (a, b) = (names.channel("a"), names.channel("b"));
    provision(&*transport, &[a.clone(), b.clone()]).await;

    let mut unicode = names.message(&a, Some("clé-🦀-ключ-鍵"), "unicode");
    unicode.payload = Bytes::from(format!(
        r#"{{"id":"{}","data":{{"name":"Zoë Ørsted — “quoted”","city":"東京","emoji":"🦀🚀","escaped":"line\nbreak \"quote\" \\ back \u00e9","n":-1.5e3}}}}"#,
        unicode.message_id
    ));
    unicode.headers = [
        ("traceparent", TRACEPARENT),
        ("tracestate", "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"),
        ("ce-id", &unicode.message_id.to_string()),
        ("ce-type", "conformance.preserved"),
        ("ce-source", "/conformance"),
        ("ce-specversion", "1.0"),
        (
            "content-type",
            "application/cloudevents+json; charset=utf-8",
        ),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();

    let mut large = names.message(&b, Some("large"), "large");
    large.payload = large_payload(&large.message_id.to_string());
    let other_trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    large.headers = vec![("traceparent".to_owned(), other_trace.to_owned())];

    let mut bare = names.message(&a, None, "bare");
    bare.headers.clear();

    let messages = vec![unicode, large, bare];
    publish_all(&*transport, &messages).await;

    let group = names.group("g");
    let mut consumer = subscribe(&*transport, &Subscription::new(&group, [a, b])).await;
    let mut ledger = Ledger::new(&messages);
    let traces: Vec<(Bytes, Option<&str>)> = vec![
        (messages[0].payload.clone(), Some(TRACEPARENT)),
        (messages[1].payload.clone(), Some(other_trace)),
        (messages[2].payload.clone(), None),
    ];
    let inspect = |message: &Incoming| {
        assert_eq!(message.attempt, 1, "a first delivery has attempt 1");
        if let Some((_, trace)) = traces.iter().find(|(p, _)| *p == message.payload) {
            assert_eq!(
                message.header("traceparent"),
                *trace,
                "the traceparent header"
            );
            assert_eq!(
                message.header("TraceParent"),
                *trace,
                "the traceparent header, looked up in another case"
            );
        }
    };
    consume_until(
        &mut *consumer,
        &mut ledger,
        0,
        10,
        inspect,
        Ledger::all_acked,
    )
    .await;
    drain_for(&mut *consumer, &mut ledger, 0, QUIET).await;
    if let Err(problem) = ledger.check_exactly_once() {
        panic!("group `{group}`: {problem}");
    }
}

/// A JSON document of exactly 200 KiB with non-ASCII text throughout.
fn large_payload(id: &str) -> Bytes {
    const SIZE: usize = 200 * 1024;
    const FILLER: &str = "ünïcødé ✓ 🦀 東京 ";
    let mut text = format!(r#"{{"id":"{id}","data":""#);
    while text.len() + FILLER.len() + 2 <= SIZE {
        text.push_str(FILLER);
    }
    while text.len() + 2 < SIZE {
        text.push('.');
    }
    text.push_str(r#""}"#);
    Bytes::from(text)
}

/// Two groups each get every one of 200 messages (10 keys) exactly once when they
/// acknowledge each: one group subscribed before the messages were published, the other only
/// after (a group new to the broker starts at the beginning of its channels).
pub async fn every_group_gets_every_message(harness: Arc<dyn Harness>) {
    let names = Names::new("fanout");
    let channel = names.channel("events");
    let publisher = harness.transport().await;
    provision(&*publisher, std::slice::from_ref(&channel)).await;

    let early_transport = harness.transport().await;
    provision(&*early_transport, std::slice::from_ref(&channel)).await;
    let early_group = names.group("early");
    let mut early = subscribe(
        &*early_transport,
        &Subscription::new(&early_group, [channel.clone()]),
    )
    .await;

    let messages: Vec<Outgoing> = (0..200)
        .map(|i| names.message(&channel, Some(&format!("k{}", i % 10)), &i.to_string()))
        .collect();
    publish_all(&*publisher, &messages).await;

    let late_transport = harness.transport().await;
    provision(&*late_transport, std::slice::from_ref(&channel)).await;
    let late_group = names.group("late");
    let mut late = subscribe(
        &*late_transport,
        &Subscription::new(&late_group, [channel.clone()]),
    )
    .await;

    let mut early_ledger = Ledger::new(&messages);
    let mut late_ledger = Ledger::new(&messages);
    tokio::join!(
        consume_until(
            &mut *early,
            &mut early_ledger,
            0,
            32,
            |_| {},
            Ledger::all_acked
        ),
        consume_until(
            &mut *late,
            &mut late_ledger,
            1,
            32,
            |_| {},
            Ledger::all_acked
        ),
    );
    tokio::join!(
        drain_for(&mut *early, &mut early_ledger, 0, QUIET),
        drain_for(&mut *late, &mut late_ledger, 1, QUIET),
    );
    for (group, ledger) in [(&early_group, &early_ledger), (&late_group, &late_ledger)] {
        if let Err(problem) = ledger.check_exactly_once() {
            panic!("group `{group}`: {problem}");
        }
    }
}

/// Two consumers of one group, on two connections, share 400 messages: each message comes
/// exactly once in all, and each consumer gets some.
pub async fn consumers_of_a_group_share_its_messages(harness: Arc<dyn Harness>) {
    const COUNT: usize = 400;
    let names = Names::new("share");
    let channel = names.channel("events");
    let mut subscription = Subscription::new(names.group("g"), [channel.clone()]);
    subscription.max_in_flight = 10;

    let mut connections = Vec::new();
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let transport = harness.transport().await;
        provision(&*transport, std::slice::from_ref(&channel)).await;
        consumers.push(subscribe(&*transport, &subscription).await);
        connections.push(transport);
    }
    // Half the messages have a key of their own, half none.
    let messages: Vec<Outgoing> = (0..COUNT)
        .map(|i| {
            let key = (i % 2 == 0).then(|| format!("k{i}"));
            names.message(&channel, key.as_deref(), &i.to_string())
        })
        .collect();
    publish_all(&*connections[0], &messages).await;

    let ledger = Arc::new(Mutex::new(Ledger::new(&messages)));
    let tasks: Vec<_> = consumers
        .into_iter()
        .enumerate()
        .map(|(tag, mut consumer)| {
            let ledger = Arc::clone(&ledger);
            tokio::spawn(async move {
                let done = || {
                    let ledger = lock(&ledger);
                    ledger.assert_no_problems();
                    ledger.all_acked()
                };
                until_quiet(&mut *consumer, done, |batch| {
                    let ledger = Arc::clone(&ledger);
                    async move {
                        for message in batch {
                            let index = lock(&ledger).record(&message, tag);
                            // A little handling time, as a real handler has, so that one
                            // consumer cannot take everything before the other looks.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            ack(&message).await;
                            if let Some(index) = index {
                                lock(&ledger).acked(index);
                            }
                        }
                    }
                })
                .await;
            })
        })
        .collect();
    for task in tasks {
        join(task).await;
    }

    let ledger = lock(&ledger);
    if let Err(problem) = ledger.check_exactly_once() {
        panic!("group `{}`: {problem}", subscription.group);
    }
    let (first, second) = (ledger.deliveries_to(0), ledger.deliveries_to(1));
    assert_eq!(first + second, COUNT);
    assert!(
        first > 0 && second > 0,
        "the group's consumers did not share its messages: {first} to one, {second} to the other"
    );
}

/// Fetches batches and hands each to `handle` until `done` says everything expected came,
/// then for [`QUIET`] more; fails after [`PATIENCE`].
async fn until_quiet<F>(
    consumer: &mut dyn Consumer,
    done: impl Fn() -> bool,
    mut handle: impl FnMut(Vec<Incoming>) -> F,
) where
    F: Future<Output = ()>,
{
    let give_up = Instant::now() + PATIENCE;
    let mut quiet_until = None;
    loop {
        let now = Instant::now();
        match quiet_until {
            Some(until) if now >= until => return,
            Some(_) => {}
            None if done() => quiet_until = Some(now + QUIET),
            None => assert!(
                now < give_up,
                "not everything expected came within {PATIENCE:?}"
            ),
        }
        let batch = fetch(consumer, 5, FETCH_WAIT).await;
        if !batch.is_empty() {
            handle(batch).await;
        }
    }
}

/// With [`KeyOrder::PerKey`] or [`KeyOrder::PerKeyPartitioned`]: two consumers of a group
/// handle 20 keys × 25 messages, each
/// message in a task of its own that takes a varying time; per key, the messages are handled
/// exactly in publish order, each once. A transport that declares [`KeyOrder::None`] is not
/// tested for order (and the case says so on stderr).
pub async fn same_key_in_publish_order(harness: Arc<dyn Harness>) {
    const KEYS: usize = 20;
    const PER_KEY: usize = 25;
    let transport = harness.transport().await;
    if !keeps_key_order(&*transport, "same_key_in_publish_order") {
        return;
    }

    let names = Names::new("order");
    let channel = names.channel("events");
    let mut subscription = Subscription::new(names.group("g"), [channel.clone()]);
    subscription.max_in_flight = 64;
    // Keys interleaved: message `i` is number `i / KEYS` of key `i % KEYS`.
    let messages: Vec<Outgoing> = (0..KEYS * PER_KEY)
        .map(|i| {
            let (key, number) = (i % KEYS, i / KEYS);
            names.message(
                &channel,
                Some(&format!("key-{key}")),
                &format!("{key}/{number}"),
            )
        })
        .collect();
    let (ledger, handled) =
        handle_concurrently(&harness, transport, &subscription, &messages).await;

    let mut per_key = vec![Vec::new(); KEYS];
    for index in handled {
        per_key[index % KEYS].push(index / KEYS);
    }
    let publish_order: Vec<usize> = (0..PER_KEY).collect();
    for (key, numbers) in per_key.iter().enumerate() {
        assert_eq!(
            numbers, &publish_order,
            "the messages of key `key-{key}` were handled in another order than published"
        );
    }
    if let Err(problem) = ledger.check_exactly_once() {
        panic!("group `{}`: {problem}", subscription.group);
    }
}

/// With [`KeyOrder::PerKey`] or [`KeyOrder::PerKeyPartitioned`]: 60 messages of one key,
/// published alternately to two channels
/// (as one order's `order_placed`, `order_confirmed`, ... events are), reach a group that
/// reads both channels in publish order across the channels: two consumers of the group
/// handle each message in a task of its own that takes a varying time, and the messages are
/// handled exactly in publish order, each once. A transport that declares [`KeyOrder::None`]
/// is not tested for order (and the case says so on stderr).
pub async fn same_key_in_publish_order_across_channels(harness: Arc<dyn Harness>) {
    const COUNT: usize = 60;
    let transport = harness.transport().await;
    if !keeps_key_order(&*transport, "same_key_in_publish_order_across_channels") {
        return;
    }

    let names = Names::new("crossorder");
    let channels = [names.channel("placed"), names.channel("confirmed")];
    let mut subscription = Subscription::new(names.group("g"), channels.clone());
    subscription.max_in_flight = 64;
    let messages: Vec<Outgoing> = (0..COUNT)
        .map(|i| names.message(&channels[i % 2], Some("order-1"), &i.to_string()))
        .collect();
    let (ledger, handled) =
        handle_concurrently(&harness, transport, &subscription, &messages).await;

    let publish_order: Vec<usize> = (0..COUNT).collect();
    assert_eq!(
        handled, publish_order,
        "the messages of one key on two channels were handled in another order than published"
    );
    if let Err(problem) = ledger.check_exactly_once() {
        panic!("group `{}`: {problem}", subscription.group);
    }
}

/// Whether the transport declares an order to test; says on stderr that `case` does not
/// apply when it does not.
fn keeps_key_order(transport: &dyn Transport, case: &str) -> bool {
    let ordering = transport.capabilities().ordering;
    if ordering.keeps_key_order() {
        return true;
    }
    assert_eq!(ordering, KeyOrder::None);
    eprintln!(
        "inseam-conformance: {case} is not applicable: transport `{}` declares KeyOrder::None",
        transport.name()
    );
    false
}

/// Provisions the subscription's channels, publishes `messages` through `transport`, and has
/// two consumers of the subscription's group (on `transport` and on a second connection)
/// handle them: each message in a task of its own after a varying pause, then acknowledged.
/// Only the transport's holding back of same-key successors can keep them in order. Returns
/// the ledger and the indices of the messages in the order they were handled.
async fn handle_concurrently(
    harness: &Arc<dyn Harness>,
    transport: Arc<dyn Transport>,
    subscription: &Subscription,
    messages: &[Outgoing],
) -> (Ledger, Vec<usize>) {
    provision(&*transport, &subscription.channels).await;
    let mut connections = vec![Arc::clone(&transport)];
    let mut consumers = vec![subscribe(&*transport, subscription).await];
    let second = harness.transport().await;
    provision(&*second, &subscription.channels).await;
    consumers.push(subscribe(&*second, subscription).await);
    connections.push(second);
    publish_all(&*transport, messages).await;

    struct Handled {
        ledger: Ledger,
        order: Vec<usize>,
    }
    let handled = Arc::new(Mutex::new(Handled {
        ledger: Ledger::new(messages),
        order: Vec::new(),
    }));
    let tasks: Vec<_> = consumers
        .into_iter()
        .enumerate()
        .map(|(tag, mut consumer)| {
            let handled = Arc::clone(&handled);
            tokio::spawn(async move {
                let mut jitter = Jitter::new(0x9e37_79b9_7f4a_7c15 ^ tag as u64);
                let mut handlers = Vec::new();
                let done = || {
                    let handled = lock(&handled);
                    handled.ledger.assert_no_problems();
                    handled.ledger.all_acked()
                };
                until_quiet(&mut *consumer, done, |batch| {
                    // Each message is handled concurrently with the others: only the
                    // transport's holding back of same-key successors keeps them in order.
                    for message in batch {
                        let handled = Arc::clone(&handled);
                        let pause = jitter.next(Duration::from_millis(3));
                        handlers.push(tokio::spawn(async move {
                            tokio::time::sleep(pause).await;
                            let index = {
                                let mut handled = lock(&handled);
                                let index = handled.ledger.record(&message, tag);
                                if let Some(index) = index {
                                    handled.order.push(index);
                                }
                                index
                            };
                            ack(&message).await;
                            if let Some(index) = index {
                                lock(&handled).ledger.acked(index);
                            }
                        }));
                    }
                    std::future::ready(())
                })
                .await;
                for handler in handlers {
                    join(handler).await;
                }
            })
        })
        .collect();
    for task in tasks {
        join(task).await;
    }
    drop(connections);

    let Ok(handled) = Arc::try_unwrap(handled) else {
        panic!("a handler of the case still runs after every consumer finished");
    };
    let handled = handled.into_inner().unwrap_or_else(PoisonError::into_inner);
    (handled.ledger, handled.order)
}

/// A nacked message comes again with attempt 2, then 3, each time not before the nack's
/// delay where the transport declares `delayed_redelivery`; a later message of its key waits
/// for it (where [`KeyOrder::keeps_key_order`]) and comes once, with attempt 1, after it was
/// acknowledged. Nothing comes after that.
pub async fn nack_redelivers_after_delay(harness: Arc<dyn Harness>) {
    const DELAY: Duration = Duration::from_millis(600);
    let transport = harness.transport().await;
    let capabilities = transport.capabilities();
    if !capabilities.delayed_redelivery {
        eprintln!(
            "inseam-conformance: nack_redelivers_after_delay: transport `{}` does not declare \
             delayed_redelivery, so the delay is not measured",
            transport.name()
        );
    }
    let names = Names::new("nack");
    let channel = names.channel("events");
    provision(&*transport, std::slice::from_ref(&channel)).await;
    let messages = vec![
        names.message(&channel, Some("k"), "first"),
        names.message(&channel, Some("k"), "second"),
    ];
    publish_all(&*transport, &messages).await;
    let group = names.group("g");
    let mut consumer = subscribe(&*transport, &Subscription::new(&group, [channel])).await;

    let mut ledger = Ledger::new(&messages);
    let mut nacked_at: Option<Instant> = None;
    let give_up = Instant::now() + PATIENCE;
    while !ledger.all_acked() {
        assert!(
            Instant::now() < give_up,
            "the messages did not come within {PATIENCE:?}: {:?}",
            ledger.check_at_least_once().err()
        );
        for message in fetch(&mut *consumer, 10, FETCH_WAIT).await {
            let received = Instant::now();
            let index = ledger.record(&message, 0);
            ledger.assert_no_problems();
            match index {
                Some(0) => {
                    if let (Some(nacked), true) = (nacked_at, capabilities.delayed_redelivery) {
                        let after = received.duration_since(nacked);
                        assert!(
                            after >= DELAY,
                            "a message nacked with a delay of {DELAY:?} came again after {after:?}"
                        );
                    }
                    // Nacked on its first two deliveries, acknowledged on the third.
                    if ledger.deliveries(0).len() < 3 {
                        nacked_at = Some(Instant::now());
                        nack(&message, DELAY).await;
                    } else {
                        ack(&message).await;
                        ledger.acked(0);
                    }
                }
                Some(1) => {
                    if capabilities.ordering.keeps_key_order() {
                        assert!(
                            ledger.is_acked(0),
                            "a message came while an earlier one of its key was nacked and \
                             not yet acknowledged"
                        );
                    }
                    ack(&message).await;
                    ledger.acked(1);
                }
                // The ledger has it as a problem.
                _ => ack(&message).await,
            }
        }
    }
    drain_for(&mut *consumer, &mut ledger, 0, DELAY + QUIET).await;
    if let Err(problem) = ledger.check_at_least_once() {
        panic!("group `{group}`: {problem}");
    }
    let attempts =
        |index: usize| -> Vec<u32> { ledger.deliveries(index).iter().map(|d| d.attempt).collect() };
    assert_eq!(attempts(0), [1, 2, 3], "the nacked message's attempts");
    assert_eq!(attempts(1), [1], "the later message of its key");
}

/// A consumer takes a message and goes away without settling it (a process that died between
/// its handler and the ack): with a 1 s acknowledgement wait, the message comes again to a
/// new consumer of the group on another connection, with attempt 2 or more, before a later
/// message of its key (where [`KeyOrder::keeps_key_order`]); once acknowledged, neither comes
/// again.
pub async fn unsettled_message_comes_again(harness: Arc<dyn Harness>) {
    const ACK_WAIT: Duration = Duration::from_secs(1);
    let names = Names::new("unsettled");
    let channel = names.channel("events");
    let mut subscription = Subscription::new(names.group("g"), [channel.clone()]);
    subscription.ack_wait = ACK_WAIT;
    let messages = vec![
        names.message(&channel, Some("k"), "first"),
        names.message(&channel, Some("k"), "second"),
    ];
    let mut ledger = Ledger::new(&messages);

    let ordering = {
        let dying = harness.transport().await;
        provision(&*dying, std::slice::from_ref(&channel)).await;
        let mut consumer = subscribe(&*dying, &subscription).await;
        publish_all(&*dying, &messages).await;
        let mut held = Vec::new();
        let give_up = Instant::now() + PATIENCE;
        while ledger.deliveries(0).is_empty() {
            assert!(Instant::now() < give_up, "the message did not come");
            for message in fetch(&mut *consumer, 10, FETCH_WAIT).await {
                ledger.record(&message, 0);
                held.push(message);
            }
        }
        // Everything held is dropped unsettled, with the consumer and its connection.
        dying.capabilities().ordering
    };
    if ordering.keeps_key_order() {
        assert!(
            ledger.deliveries(1).is_empty(),
            "a message came while an earlier one of its key was unsettled"
        );
    }

    let survivor = harness.transport().await;
    provision(&*survivor, std::slice::from_ref(&channel)).await;
    let mut consumer = subscribe(&*survivor, &subscription).await;
    let give_up = Instant::now() + PATIENCE;
    while !ledger.all_acked() {
        assert!(
            Instant::now() < give_up,
            "the unsettled message did not come again within {PATIENCE:?} (acknowledgement \
             wait {ACK_WAIT:?}): {:?}",
            ledger.check_at_least_once().err()
        );
        for message in fetch(&mut *consumer, 10, FETCH_WAIT).await {
            let index = ledger.record(&message, 1);
            ledger.assert_no_problems();
            match index {
                Some(0) => assert!(
                    message.attempt >= 2,
                    "a message handed out before came again with attempt {}",
                    message.attempt
                ),
                Some(1) if ordering.keeps_key_order() => assert!(
                    ledger.is_acked(0),
                    "a message came before an earlier one of its key, left unsettled by a \
                     consumer that went away, was acknowledged"
                ),
                _ => {}
            }
            ack(&message).await;
            if let Some(index) = index {
                ledger.acked(index);
            }
        }
    }
    // Long enough for a redelivery of a message whose acknowledgement was lost.
    let late = drain_for(&mut *consumer, &mut ledger, 1, ACK_WAIT * 2 + QUIET).await;
    assert_eq!(late, 0, "messages came again after they were acknowledged");
    if let Err(problem) = ledger.check_at_least_once() {
        panic!("group `{}`: {problem}", subscription.group);
    }
    let to_survivor = |index: usize| {
        ledger
            .deliveries(index)
            .iter()
            .filter(|d| d.consumer == 1)
            .count()
    };
    assert_eq!(
        to_survivor(0),
        1,
        "the unsettled message came to the new consumer"
    );
    assert_eq!(
        to_survivor(1),
        1,
        "the later message came to the new consumer"
    );
}

/// A message nacked every time (a poison message) keeps coming with attempts 1, 2, 3, 4, ...
/// while 50 messages of other keys flow, and is then acknowledged; every other message comes
/// once. What must flow and what must wait depends on the order the transport declares:
///
/// - [`KeyOrder::PerKey`]: the 50 messages of 10 other keys all come and are acknowledged
///   while the poison keeps failing; a later message of the poison's key does not come until
///   the poison is acknowledged.
/// - [`KeyOrder::PerKeyPartitioned`]: the keys are chosen by [`Transport::partition`]: 10
///   keys of other partitions than the poison's, whose messages all come and are
///   acknowledged while the poison keeps failing, and 2 keys of the poison's partition,
///   whose messages, like the later one of the poison's key, do not come until the poison is
///   acknowledged. With a single partition no key can flow: the case says so on stderr and
///   checks that everything waits.
/// - [`KeyOrder::None`]: the messages of the 10 other keys come while the poison keeps
///   failing; the later message of its key may come at any time.
pub async fn poison_message_blocks_only_its_key_or_partition(harness: Arc<dyn Harness>) {
    const DELAY: Duration = Duration::from_millis(50);
    const POISON: usize = 0;
    const BEHIND_POISON: usize = 26;
    const POISON_KEY: &str = "poison";
    let transport = harness.transport().await;
    let ordering = transport.capabilities().ordering;
    let names = Names::new("poison");
    let channel = names.channel("events");
    provision(&*transport, std::slice::from_ref(&channel)).await;

    // `free`: keys whose messages must flow while the poison fails; `mates`: other keys whose
    // messages must wait for it, since they share its partition.
    let (free, mates) = poison_neighbours(&*transport, ordering, POISON_KEY);
    let others: Vec<&String> = free.iter().chain(&mates).collect();
    // The poison first, its key-mate in the middle of the others.
    let mut messages = vec![names.message(&channel, Some(POISON_KEY), "poison")];
    for i in 0..50 {
        if messages.len() == BEHIND_POISON {
            messages.push(names.message(&channel, Some(POISON_KEY), "behind"));
        }
        messages.push(names.message(&channel, Some(others[i % others.len()]), &i.to_string()));
    }
    let key_of = |index: usize| messages[index].key.as_deref().unwrap_or_default();
    let must_flow: Vec<usize> = (0..messages.len())
        .filter(|i| free.iter().any(|k| k == key_of(*i)))
        .collect();
    let must_wait: Vec<usize> = (0..messages.len())
        .filter(|i| {
            let key = key_of(*i);
            *i != POISON
                && ((key == POISON_KEY && ordering.keeps_key_order())
                    || mates.iter().any(|k| k == key))
        })
        .collect();
    publish_all(&*transport, &messages).await;
    let group = names.group("g");
    let mut consumer = subscribe(&*transport, &Subscription::new(&group, [channel])).await;

    let mut ledger = Ledger::new(&messages);
    let mut cured = false;
    let give_up = Instant::now() + PATIENCE;
    while !ledger.all_acked() {
        let flowed = must_flow.iter().all(|i| ledger.is_acked(*i));
        assert!(
            Instant::now() < give_up,
            "the messages of the {} keys that must not wait for it did not all come within \
             {PATIENCE:?} while one message kept failing: {:?}",
            free.len(),
            ledger.check_at_least_once().err()
        );
        // Once those are through and the poison came four times, it is "fixed".
        if !cured && flowed && ledger.deliveries(POISON).len() >= 4 {
            cured = true;
        }
        for message in fetch(&mut *consumer, 10, FETCH_WAIT).await {
            let index = ledger.record(&message, 0);
            ledger.assert_no_problems();
            match index {
                Some(POISON) if !cured => nack(&message, DELAY).await,
                Some(index) => {
                    if must_wait.contains(&index) {
                        assert!(
                            ledger.is_acked(POISON),
                            "{}",
                            if key_of(index) == POISON_KEY {
                                "a message came while an earlier one of its key kept failing"
                                    .to_owned()
                            } else {
                                format!(
                                    "a message of key `{}` came while an earlier message of \
                                     its partition (key `{POISON_KEY}`) kept failing",
                                    key_of(index)
                                )
                            }
                        );
                    }
                    ack(&message).await;
                    ledger.acked(index);
                }
                None => ack(&message).await,
            }
        }
    }
    drain_for(&mut *consumer, &mut ledger, 0, QUIET).await;
    if let Err(problem) = ledger.check_at_least_once() {
        panic!("group `{group}`: {problem}");
    }
    let attempts: Vec<u32> = ledger
        .deliveries(POISON)
        .iter()
        .map(|d| d.attempt)
        .collect();
    let expected: Vec<u32> = (1..=u32::try_from(attempts.len()).unwrap_or(u32::MAX)).collect();
    assert!(
        attempts.len() >= 5,
        "the poison came {} times",
        attempts.len()
    );
    assert_eq!(attempts, expected, "the poison message's attempts");
    for index in (0..messages.len()).filter(|i| *i != POISON) {
        assert_eq!(
            ledger.deliveries(index).len(),
            1,
            "message {index} came more than once"
        );
    }
}

/// The keys for [`poison_message_blocks_only_its_key_or_partition`]: 10 keys whose messages
/// must flow while the poison fails, and the other keys whose messages must wait for it
/// (with [`KeyOrder::PerKeyPartitioned`], 2 keys of the poison's partition; none otherwise).
fn poison_neighbours(
    transport: &dyn Transport,
    ordering: KeyOrder,
    poison: &str,
) -> (Vec<String>, Vec<String>) {
    const FREE: usize = 10;
    const MATES: usize = 2;
    /// How many candidate keys are tried: enough for two mates of 1024 partitions many
    /// times over.
    const CANDIDATES: usize = 100_000;
    let candidate = |i: usize| format!("key-{i}");
    let KeyOrder::PerKeyPartitioned { partitions } = ordering else {
        return ((0..FREE).map(candidate).collect(), Vec::new());
    };
    let name = transport.name();
    let partition_of = |key: &str| match transport.partition(key) {
        Some(partition) => partition,
        None => panic!(
            "transport `{name}` declares KeyOrder::PerKeyPartitioned but puts key {key:?} in no \
             partition"
        ),
    };
    let poisoned = partition_of(poison);
    let (mut free, mut mates) = (Vec::new(), Vec::new());
    for key in (0..CANDIDATES).map(candidate) {
        if free.len() == FREE && mates.len() == MATES {
            break;
        }
        if partition_of(&key) == poisoned {
            if mates.len() < MATES {
                mates.push(key);
            }
        } else if free.len() < FREE {
            free.push(key);
        }
    }
    assert!(
        mates.len() == MATES,
        "transport `{name}` puts only {} of {CANDIDATES} keys in the partition of key \
         {poison:?}",
        mates.len()
    );
    if partitions == 1 {
        eprintln!(
            "inseam-conformance: poison_message_blocks_only_its_key_or_partition: transport \
             `{name}` has a single partition, so no key can flow while the poison fails; only \
             the waiting is checked"
        );
    } else {
        assert!(
            free.len() == FREE,
            "transport `{name}` declares {partitions} partitions but puts only {} of \
             {CANDIDATES} keys outside the partition of key {poison:?}",
            free.len()
        );
    }
    (free, mates)
}

/// One consumer acknowledges 200 (or a few more) of 500 messages, takes a few more without settling them and
/// goes away; a new consumer of the group then gets each of the other 300 exactly once (the
/// unsettled ones with attempt 2 or more, after the 2 s acknowledgement wait) and none of
/// the 200, which never come again.
pub async fn consumer_restart_resumes_where_acked(harness: Arc<dyn Harness>) {
    const COUNT: usize = 500;
    const FIRST: usize = 200;
    const ACK_WAIT: Duration = Duration::from_secs(2);
    let names = Names::new("restart");
    let channel = names.channel("events");
    let mut subscription = Subscription::new(names.group("g"), [channel.clone()]);
    subscription.ack_wait = ACK_WAIT;
    let messages: Vec<Outgoing> = (0..COUNT)
        .map(|i| names.message(&channel, Some(&format!("key-{}", i % 25)), &i.to_string()))
        .collect();
    let mut ledger = Ledger::new(&messages);

    let held_back: Vec<usize> = {
        let first = harness.transport().await;
        provision(&*first, std::slice::from_ref(&channel)).await;
        publish_all(&*first, &messages).await;
        let mut consumer = subscribe(&*first, &subscription).await;
        consume_until(
            &mut *consumer,
            &mut ledger,
            0,
            10,
            |_| {},
            |ledger| ledger.acked_count() >= FIRST,
        )
        .await;
        let mut held = Vec::new();
        let give_up = Instant::now() + PATIENCE;
        while held.is_empty() {
            assert!(Instant::now() < give_up, "no more messages came");
            held = fetch(&mut *consumer, 10, FETCH_WAIT).await;
        }
        held.iter().filter_map(|m| ledger.record(m, 0)).collect()
    };
    let acked_before: Vec<usize> = (0..COUNT).filter(|i| ledger.is_acked(*i)).collect();

    let second = harness.transport().await;
    provision(&*second, std::slice::from_ref(&channel)).await;
    let mut consumer = subscribe(&*second, &subscription).await;
    consume_until(
        &mut *consumer,
        &mut ledger,
        1,
        10,
        |_| {},
        Ledger::all_acked,
    )
    .await;
    drain_for(&mut *consumer, &mut ledger, 1, QUIET).await;
    if let Err(problem) = ledger.check_at_least_once() {
        panic!("group `{}`: {problem}", subscription.group);
    }
    assert!(acked_before.len() >= FIRST);
    assert_eq!(
        ledger.deliveries_to(1),
        COUNT - acked_before.len(),
        "the new consumer gets every message not acknowledged before, once"
    );
    for index in held_back {
        let again = ledger.deliveries(index).iter().find(|d| d.consumer == 1);
        assert!(
            again.is_some_and(|d| d.attempt >= 2),
            "message {index}, held unsettled by the first consumer, came again as {again:?}"
        );
    }
}

/// Messages published before the broker stops and acknowledged are not delivered again after
/// it restarts; publishing while it is stopped fails with a transient error; the messages not
/// yet consumed and those published again after the restart all come. With `deduplicates`,
/// publishing again some messages that were taken before the stop adds nothing.
///
/// A few messages taken before the stop are acknowledged while the broker is stopped. An
/// acknowledgement that fails leaves its outcome unknown (see [`Incoming::ack`]): such a
/// message may come again after the restart (it is then acknowledged like the others), or
/// not; one whose acknowledgement succeeded must not. Where the transport does not declare
/// `acks_survive_restart`, every message acknowledged before the restart may come again,
/// its attempts counted from 1 again (and the case says on stderr that it does not check
/// that they stay acknowledged).
pub async fn broker_restart_loses_nothing(harness: Arc<dyn Harness>) {
    const BEFORE: usize = 60;
    const COUNT: usize = 100;
    const ACKED_BEFORE: usize = 30;
    const ACK_WAIT: Duration = Duration::from_secs(2);
    let names = Names::new("outage");
    let channel = names.channel("events");
    let mut subscription = Subscription::new(names.group("g"), [channel.clone()]);
    subscription.ack_wait = ACK_WAIT;
    let messages: Vec<Outgoing> = (0..COUNT)
        .map(|i| names.message(&channel, Some(&format!("key-{}", i % 10)), &i.to_string()))
        .collect();
    let mut ledger = Ledger::new(&messages);

    let transport = harness.transport().await;
    provision(&*transport, std::slice::from_ref(&channel)).await;
    publish_all(&*transport, &messages[..BEFORE]).await;
    let mut consumer = subscribe(&*transport, &subscription).await;
    consume_until(
        &mut *consumer,
        &mut ledger,
        0,
        10,
        |_| {},
        |ledger| ledger.acked_count() >= ACKED_BEFORE,
    )
    .await;
    let mut held = fetch(&mut *consumer, 5, FETCH_WAIT).await;
    for message in &held {
        ledger.record(message, 0);
    }

    if let Err(error) = harness.stop_broker().await {
        panic!("the harness could not stop its broker: {error}");
    }
    let outcomes = transport.publish(&messages[BEFORE..]).await;
    assert_eq!(outcomes.len(), COUNT - BEFORE);
    for (i, outcome) in outcomes.iter().enumerate() {
        match outcome {
            Err(error) if error.transient => {}
            Err(error) => panic!(
                "publishing while the broker is stopped failed with a permanent error (it \
                 should be transient, to be tried again): {}",
                error_chain(error)
            ),
            Ok(()) => panic!(
                "publishing message {} succeeded while the broker was stopped",
                BEFORE + i
            ),
        }
    }
    // Settling while the broker is away may fail; what was acknowledged must stay so. What
    // failed to be acknowledged is in doubt: the broker may have taken the acknowledgement
    // after all (a client that sends it once it is connected again).
    // The acknowledgements run at once, so that the case waits for one timeout of the
    // transport's, not one per message.
    let settling: Vec<_> = held
        .drain(..)
        .filter_map(|message| {
            let index = messages.iter().position(|m| m.payload == message.payload)?;
            Some(tokio::spawn(
                async move { (index, message.ack().await.is_ok()) },
            ))
        })
        .collect();
    let mut in_doubt = Vec::new();
    for task in settling {
        match join(task).await {
            (index, true) => ledger.acked(index),
            (index, false) => in_doubt.push(index),
        }
    }
    drop(consumer);
    if let Err(error) = harness.start_broker().await {
        panic!("the harness could not start its broker again: {error}");
    }
    if !transport.capabilities().acks_survive_restart {
        eprintln!(
            "inseam-conformance: broker_restart_loses_nothing: transport `{}` does not declare \
             acks_survive_restart, so messages acknowledged before the restart may come again",
            transport.name()
        );
        for index in 0..COUNT {
            if ledger.is_acked(index) || in_doubt.contains(&index) {
                ledger.reopen(index);
                if !in_doubt.contains(&index) {
                    in_doubt.push(index);
                }
            }
        }
    }

    // The relay's way: publish again whatever has not been taken, until the broker is back.
    let mut again: Vec<Outgoing> = messages[BEFORE..].to_vec();
    if transport.capabilities().deduplicates {
        again.extend(messages[..10].iter().cloned());
    }
    let give_up = Instant::now() + PATIENCE;
    while !again.is_empty() {
        let outcomes = transport.publish(&again).await;
        assert_eq!(outcomes.len(), again.len());
        let mut left = Vec::new();
        for (message, outcome) in again.into_iter().zip(outcomes) {
            match outcome {
                Ok(()) => {}
                Err(error) if error.transient && Instant::now() < give_up => left.push(message),
                Err(error) => panic!(
                    "publishing after the broker restarted failed: {}",
                    error_chain(&error)
                ),
            }
        }
        again = left;
        if !again.is_empty() {
            tokio::time::sleep(FETCH_WAIT).await;
        }
    }
    // A group whose member was cut off by the restart may hold out for that member's session
    // before it takes a new one (Kafka): room for more than one attempt to join.
    let give_up = Instant::now() + 2 * PATIENCE;
    let mut consumer = loop {
        match transport.subscribe(&subscription).await {
            Ok(consumer) => break consumer,
            Err(error) if error.transient && Instant::now() < give_up => {
                tokio::time::sleep(FETCH_WAIT).await;
            }
            Err(error) => panic!(
                "subscribing after the broker restarted failed: {}",
                error_chain(&error)
            ),
        }
    };
    consume_until(
        &mut *consumer,
        &mut ledger,
        1,
        10,
        |_| {},
        |ledger| (0..COUNT).all(|i| ledger.is_acked(i) || in_doubt.contains(&i)),
    )
    .await;
    // Long enough for a message in doubt whose acknowledgement the broker does not have to
    // come again after its acknowledgement wait (and for a broker that forgot a consumer's
    // progress to go through its messages again).
    let quiet = if in_doubt.is_empty() {
        QUIET
    } else {
        ACK_WAIT * 2 + QUIET
    };
    drain_for(&mut *consumer, &mut ledger, 1, quiet).await;
    for index in in_doubt {
        if !ledger.is_acked(index) {
            ledger.acked(index);
        }
    }
    if let Err(problem) = ledger.check_at_least_once() {
        panic!("group `{}`: {problem}", subscription.group);
    }
}

/// With `deduplicates`: a message published again, alone and in a batch, and twice in one
/// batch, is reported `Ok` each time and comes once. A transport that does not declare it is
/// not tested (and the case says so on stderr).
pub async fn duplicate_publish_is_dropped(harness: Arc<dyn Harness>) {
    let transport = harness.transport().await;
    if !transport.capabilities().deduplicates {
        eprintln!(
            "inseam-conformance: duplicate_publish_is_dropped is not applicable: transport `{}` \
             does not declare deduplicates",
            transport.name()
        );
        return;
    }
    let names = Names::new("dedup");
    let channel = names.channel("events");
    provision(&*transport, std::slice::from_ref(&channel)).await;
    let messages = vec![
        names.message(&channel, Some("k"), "first"),
        names.message(&channel, Some("k"), "second"),
    ];
    publish_all(&*transport, &messages[..1]).await;
    publish_all(&*transport, &messages[..1]).await;
    publish_all(
        &*transport,
        &[
            messages[0].clone(),
            messages[1].clone(),
            messages[1].clone(),
        ],
    )
    .await;
    let group = names.group("g");
    let mut consumer = subscribe(&*transport, &Subscription::new(&group, [channel])).await;
    let mut ledger = Ledger::new(&messages);
    consume_until(
        &mut *consumer,
        &mut ledger,
        0,
        10,
        |_| {},
        Ledger::all_acked,
    )
    .await;
    drain_for(&mut *consumer, &mut ledger, 0, QUIET).await;
    if let Err(problem) = ledger.check_exactly_once() {
        panic!("group `{group}`: {problem}");
    }
}

/// Request-reply, when declared: with two servers of a channel on two connections, each of 20
/// requests is answered exactly once, with its own answer, and both servers take some; a
/// request nobody serves, and one whose server does not answer, fail as transient within the
/// requester's timeout. Without it, a request is refused as permanent.
pub async fn requests_are_answered_once(harness: Arc<dyn Harness>) {
    let transport = harness.transport().await;
    let names = Names::new("rpc");
    let channel = names.channel("ask");
    if !transport.capabilities().request_reply {
        let refused = transport
            .request(&channel, Bytes::from_static(b"{}"), Duration::from_secs(1))
            .await;
        match refused {
            Err(error) if !error.transient => eprintln!(
                "inseam-conformance: requests_are_answered_once is not applicable: transport `{}` \
                 does not declare request_reply, and refuses requests",
                transport.name()
            ),
            other => panic!(
                "a transport without request_reply must refuse requests as permanent, got {other:?}"
            ),
        }
        return;
    }
    let unserved = transport
        .request(&channel, Bytes::from_static(b"{}"), Duration::from_secs(2))
        .await;
    match unserved {
        Err(error) if error.transient => {}
        other => panic!("a request nobody serves must fail as transient, got {other:?}"),
    }
    let served: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
    for server in 0..2 {
        let connection = harness.transport().await;
        let mut requests = match connection.serve(&channel).await {
            Ok(requests) => requests,
            Err(error) => panic!("serve `{channel}`: {}", error_chain(&error)),
        };
        let served = served.clone();
        tokio::spawn(async move {
            // The connection lives as long as its server.
            let _connection = connection;
            while let Some(request) = requests.next().await {
                let question = String::from_utf8_lossy(&request.payload).into_owned();
                lock(&served).push((server, question.clone()));
                let answer = Bytes::from(format!("{question} answered by {server}"));
                if let Err(error) = request.responder.respond(answer).await {
                    panic!("answer `{question}`: {}", error_chain(&error));
                }
            }
        });
    }
    // Give both servers time to be known to the broker.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..20 {
        let question = format!("q{i}");
        let answer = match transport
            .request(&channel, Bytes::from(question.clone()), PATIENCE)
            .await
        {
            Ok(answer) => String::from_utf8_lossy(&answer).into_owned(),
            Err(error) => panic!("request `{question}`: {}", error_chain(&error)),
        };
        assert!(
            answer.starts_with(&format!("{question} answered by ")),
            "request `{question}` got the answer `{answer}`"
        );
    }
    let served = lock(&served).clone();
    let mut questions: Vec<&str> = served.iter().map(|(_, q)| q.as_str()).collect();
    questions.sort_unstable();
    let mut expected: Vec<String> = (0..20).map(|i| format!("q{i}")).collect();
    expected.sort_unstable();
    assert_eq!(
        questions, expected,
        "each request must reach exactly one server"
    );
    assert!(
        served.iter().any(|(s, _)| *s == 0) && served.iter().any(|(s, _)| *s == 1),
        "both servers must take requests: {served:?}"
    );

    let silent = names.channel("silent");
    let connection = harness.transport().await;
    let mut requests = match connection.serve(&silent).await {
        Ok(requests) => requests,
        Err(error) => panic!("serve `{silent}`: {}", error_chain(&error)),
    };
    tokio::spawn(async move {
        let _connection = connection;
        let mut kept = Vec::new();
        while let Some(request) = requests.next().await {
            kept.push(request);
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let timeout = Duration::from_millis(500);
    match transport
        .request(&silent, Bytes::from_static(b"{}"), timeout)
        .await
    {
        Err(error) if error.transient => {}
        other => panic!("a request nobody answers must fail as transient, got {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= timeout && waited < timeout + Duration::from_secs(3),
        "a request nobody answers must fail after its timeout of {timeout:?}, took {waited:?}"
    );
}
