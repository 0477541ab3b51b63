//! The NATS transport against real `nats-server -js` processes, one per test.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use inseam_core::transport::{
    Capabilities, Consumer, Incoming, KeyOrder, Outgoing, Subscription, Transport, TransportError,
};
use inseam_nats::{Nats, NatsOptions};
use tokio::time::Instant;
use uuid::Uuid;

use inseam_test_servers::{Server as NatsServer, nats as nats_server};

const PLACED: &str = "orders.order_placed";
const CANCELLED: &str = "orders.order_cancelled";

async fn connect(server: &NatsServer, tweak: impl FnOnce(NatsOptions) -> NatsOptions) -> Nats {
    let options = tweak(NatsOptions::from_url(&server.url()).unwrap());
    let nats = Nats::connect_with(options).await.unwrap();
    nats.provision(&[PLACED.to_owned(), CANCELLED.to_owned()])
        .await
        .unwrap();
    nats
}

fn message(channel: &str, key: Option<&str>, payload: impl Into<Bytes>) -> Outgoing {
    Outgoing {
        channel: channel.to_owned(),
        message_id: Uuid::now_v7(),
        key: key.map(str::to_owned),
        headers: Vec::new(),
        payload: payload.into(),
    }
}

async fn publish_all(nats: &Nats, batch: &[Outgoing]) {
    for (i, outcome) in nats.publish(batch).await.into_iter().enumerate() {
        if let Err(err) = outcome {
            panic!("message {i} was not published: {}", chain(&err));
        }
    }
}

/// Fetches until `count` messages came, failing after `within`.
async fn fetch_count(consumer: &mut dyn Consumer, count: usize, within: Duration) -> Vec<Incoming> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < count {
        assert!(
            Instant::now() < deadline,
            "got {} of {count} messages within {within:?}",
            got.len()
        );
        match consumer
            .fetch(count - got.len(), Duration::from_millis(200))
            .await
        {
            Ok(batch) => got.extend(batch),
            Err(err) => panic!("fetch failed: {}", chain(&err)),
        }
    }
    got
}

/// Asserts that nothing more comes for `wait`.
async fn assert_nothing_more(consumer: &mut dyn Consumer, wait: Duration) {
    let extra = consumer.fetch(16, wait).await.unwrap();
    let shown: Vec<_> = extra
        .iter()
        .map(|m| (m.channel.clone(), m.key.clone(), m.attempt))
        .collect();
    assert!(extra.is_empty(), "unexpected messages: {shown:?}");
}

fn chain(err: &TransportError) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}

fn payload_text(message: &Incoming) -> String {
    String::from_utf8(message.payload.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_keeps_key_headers_and_bytes_and_drops_a_second_publish() {
    let server = nats_server::start();
    let nats = connect(&server, |o| o).await;
    assert_eq!(
        nats.capabilities(),
        Capabilities {
            ordering: KeyOrder::PerKeyPartitioned { partitions: 8 },
            delayed_redelivery: true,
            native_delayed_delivery: false,
            native_dead_letters: false,
            deduplicates: true,
            request_reply: true,
            acks_survive_restart: false,
        }
    );
    // FNV-1a of `foobar` is 0x85944171f73967e8, 0 modulo 8 (pinned in the layout's tests).
    assert_eq!(nats.partition("foobar"), Some(0));
    assert!((0..100).all(|i| nats.partition(&format!("k{i}")).is_some_and(|p| p < 8)));
    let mut consumer = nats
        .subscribe(&Subscription::new("audit", [PLACED, CANCELLED]))
        .await
        .unwrap();

    let mut keyed = message(
        PLACED,
        Some("order 1 ✓"),
        Bytes::from_static(b"{\"id\":1}\x00\xff\r\n"),
    );
    keyed.headers = [
        ("ce-type", PLACED),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("tenant", " padded "),
        ("multi", "one"),
        ("tenant", "second"),
        ("note", "line 1\nline 2"),
        ("empty", ""),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_owned(), v.to_owned()))
    .collect();
    let keyless = message(CANCELLED, None, Bytes::new());
    // The same message again, as a relay that crashed before recording the first publish does.
    publish_all(&nats, &[keyed.clone(), keyless.clone(), keyed.clone()]).await;

    // Both may share a partition, where the second comes only once the first is acknowledged.
    let got = fetch_count_acking(consumer.as_mut(), 2).await;
    let first = got.iter().find(|m| m.channel == PLACED).unwrap();
    assert_eq!(first.key, keyed.key);
    assert_eq!(first.headers, keyed.headers);
    assert_eq!(first.payload, keyed.payload);
    assert_eq!(first.attempt, 1);
    let second = got.iter().find(|m| m.channel == CANCELLED).unwrap();
    assert_eq!(second.key, None);
    assert_eq!(second.headers, Vec::<(String, String)>::new());
    assert_eq!(second.payload, Bytes::new());
    assert_eq!(second.attempt, 1);
    assert_nothing_more(consumer.as_mut(), Duration::from_millis(700)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_group_gets_every_message_of_its_channels() {
    let server = nats_server::start();
    let nats = connect(&server, |o| o).await;
    let mut billing = nats
        .subscribe(&Subscription::new("billing", [PLACED]))
        .await
        .unwrap();
    let mut shipping = nats
        .subscribe(&Subscription::new("shipping", [PLACED, CANCELLED]))
        .await
        .unwrap();

    let mut batch = Vec::new();
    for i in 0..20 {
        batch.push(message(
            PLACED,
            Some(&format!("o{}", i % 7)),
            format!("placed {i}"),
        ));
    }
    for i in 0..10 {
        batch.push(message(
            CANCELLED,
            Some(&format!("o{}", i % 7)),
            format!("cancelled {i}"),
        ));
    }
    publish_all(&nats, &batch).await;

    let placed: HashSet<String> = (0..20).map(|i| format!("placed {i}")).collect();
    let all: HashSet<String> = batch
        .iter()
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    for (consumer, expected) in [(&mut billing, &placed), (&mut shipping, &all)] {
        let got = fetch_count_acking(consumer.as_mut(), expected.len()).await;
        let texts: Vec<String> = got.iter().map(payload_text).collect();
        assert_eq!(texts.len(), expected.len(), "{texts:?}");
        assert_eq!(&texts.iter().cloned().collect::<HashSet<_>>(), expected);
        assert_nothing_more(consumer.as_mut(), Duration::from_millis(500)).await;
    }
}

/// Fetches and acknowledges until `count` messages came (a partition hands out its next
/// message only after the previous one is acknowledged).
async fn fetch_count_acking(consumer: &mut dyn Consumer, count: usize) -> Vec<Incoming> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < count {
        assert!(Instant::now() < deadline, "got {} of {count}", got.len());
        for message in consumer
            .fetch(count, Duration::from_millis(200))
            .await
            .unwrap()
        {
            message.ack().await.unwrap();
            got.push(message);
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_filter_on_the_group_channels_where_the_server_can() {
    let server = nats_server::start();
    let nats = connect(&server, |o| o.partitions(2)).await;
    assert_eq!(
        nats.capabilities().ordering,
        KeyOrder::PerKeyPartitioned { partitions: 2 }
    );
    let _consumer = nats
        .subscribe(&Subscription::new("billing.eu", [PLACED, CANCELLED]))
        .await
        .unwrap();
    let version = nats.client().server_info().version;
    let js = async_nats::jetstream::new(nats.client().clone());
    let stream = js.get_stream("INSEAM").await.unwrap();
    let mut names: Vec<String> = Vec::new();
    for partition in 0..2 {
        let name = format!("billing_eu_{:08x}-{partition}", fnv1a32_of("billing.eu"));
        let info = stream.consumer_info(&name).await.unwrap();
        names.push(info.name.clone());
        let config = info.config;
        assert_eq!(config.max_ack_pending, 1);
        assert_eq!(config.max_deliver, -1);
        assert_eq!(config.ack_wait, Duration::from_secs(30));
        assert_eq!(config.durable_name.as_deref(), Some(name.as_str()));
        let mut parts = version
            .split('.')
            .map(|part| part.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap(), parts.next().unwrap());
        if (major, minor) >= (2, 10) {
            assert_eq!(config.filter_subject, "");
            assert_eq!(
                config.filter_subjects,
                [
                    format!("inseam.{partition}.{CANCELLED}"),
                    format!("inseam.{partition}.{PLACED}")
                ]
            );
        } else {
            assert_eq!(config.filter_subject, format!("inseam.{partition}.>"));
            assert!(config.filter_subjects.is_empty());
        }
    }
    assert_eq!(names.len(), 2, "server {version}");
}

/// The lower 32 bits of FNV-1a 64, as consumer names carry it.
fn fnv1a32_of(text: &str) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash as u32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_across_two_consumer_processes() {
    const KEYS: usize = 30;
    const PER_KEY: usize = 10;
    let server = nats_server::start();
    let publisher = connect(&server, |o| o).await;
    let mut batch = Vec::new();
    for seq in 0..PER_KEY {
        for key in 0..KEYS {
            batch.push(message(
                PLACED,
                Some(&format!("k{key}")),
                format!("k{key}:{seq}"),
            ));
        }
    }
    publish_all(&publisher, &batch).await;

    // Two connections stand for two processes of the group.
    let handled = Arc::new(AtomicUsize::new(0));
    let in_flight = Arc::new(Mutex::new(HashSet::<String>::new()));
    let last_seq = Arc::new(Mutex::new(HashMap::<String, usize>::new()));
    let violations = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut workers = Vec::new();
    for worker in 0..2u64 {
        let nats = connect(&server, |o| o).await;
        let mut consumer = nats
            .subscribe(&Subscription::new("inventory", [PLACED]))
            .await
            .unwrap();
        let (handled, in_flight, last_seq, violations) = (
            Arc::clone(&handled),
            Arc::clone(&in_flight),
            Arc::clone(&last_seq),
            Arc::clone(&violations),
        );
        workers.push(tokio::spawn(async move {
            let _nats = nats;
            let deadline = Instant::now() + Duration::from_secs(40);
            let mut mine = 0usize;
            while handled.load(Ordering::SeqCst) < KEYS * PER_KEY && Instant::now() < deadline {
                let messages = consumer.fetch(8, Duration::from_millis(100)).await.unwrap();
                for (n, message) in messages.into_iter().enumerate() {
                    let text = payload_text(&message);
                    let (key, seq) = text.split_once(':').unwrap();
                    let seq: usize = seq.parse().unwrap();
                    if !in_flight.lock().unwrap().insert(key.to_owned()) {
                        violations
                            .lock()
                            .unwrap()
                            .push(format!("{text} handed out while its key was unsettled"));
                    }
                    {
                        let mut last = last_seq.lock().unwrap();
                        let expected = last.get(key).map_or(0, |s| s + 1);
                        if seq != expected {
                            violations
                                .lock()
                                .unwrap()
                                .push(format!("{text} came when {key}:{expected} was due"));
                        }
                        last.insert(key.to_owned(), seq);
                    }
                    // Some handling time, different on each side.
                    tokio::time::sleep(Duration::from_micros(
                        200 + 300 * ((worker + n as u64 + seq as u64) % 4),
                    ))
                    .await;
                    // The key is settled from the moment the ack leaves.
                    in_flight.lock().unwrap().remove(key);
                    message.ack().await.unwrap();
                    handled.fetch_add(1, Ordering::SeqCst);
                    mine += 1;
                }
            }
            mine
        }));
    }
    let mut per_worker = Vec::new();
    for worker in workers {
        per_worker.push(worker.await.unwrap());
    }
    let violations = violations.lock().unwrap();
    assert!(
        violations.is_empty(),
        "{:#?}",
        &violations[..violations.len().min(20)]
    );
    assert_eq!(handled.load(Ordering::SeqCst), KEYS * PER_KEY);
    let last = last_seq.lock().unwrap();
    assert_eq!(last.len(), KEYS);
    assert!(last.values().all(|seq| *seq == PER_KEY - 1), "{last:?}");
    assert!(
        per_worker.iter().all(|n| *n > 0),
        "both processes should have handled messages: {per_worker:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_held_by_a_dropped_consumer_comes_back_first_after_the_ack_wait() {
    let server = nats_server::start();
    let nats = connect(&server, |o| o).await;
    let mut subscription = Subscription::new("payments", [PLACED]);
    subscription.ack_wait = Duration::from_secs(1);

    let mut crashing = nats.subscribe(&subscription).await.unwrap();
    publish_all(
        &nats,
        &[
            message(PLACED, Some("order-9"), "first"),
            message(PLACED, Some("order-9"), "second"),
        ],
    )
    .await;
    let held = fetch_count(crashing.as_mut(), 1, Duration::from_secs(10)).await;
    let taken = Instant::now();
    assert_eq!(payload_text(&held[0]), "first");
    assert_eq!(held[0].attempt, 1);
    // The process dies holding it: nothing is settled.
    drop(held);
    drop(crashing);

    let mut survivor = nats.subscribe(&subscription).await.unwrap();
    let again = fetch_count(survivor.as_mut(), 1, Duration::from_secs(10)).await;
    assert_eq!(
        payload_text(&again[0]),
        "first",
        "the later message of the key overtook"
    );
    assert!(again[0].attempt >= 2, "attempt {}", again[0].attempt);
    assert!(
        taken.elapsed() >= Duration::from_millis(900),
        "redelivered after {:?}, before the 1 s ack wait",
        taken.elapsed()
    );
    again[0].ack().await.unwrap();
    let next = fetch_count(survivor.as_mut(), 1, Duration::from_secs(10)).await;
    assert_eq!(payload_text(&next[0]), "second");
    assert_eq!(next[0].attempt, 1);
    next[0].ack().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_with_delay_redelivers_not_before_the_delay() {
    let server = nats_server::start();
    let nats = connect(&server, |o| o).await;
    let mut consumer = nats
        .subscribe(&Subscription::new("notifications", [PLACED]))
        .await
        .unwrap();
    publish_all(
        &nats,
        &[
            message(PLACED, Some("order-3"), "failing"),
            message(PLACED, Some("order-3"), "after it"),
        ],
    )
    .await;
    let got = fetch_count(consumer.as_mut(), 1, Duration::from_secs(10)).await;
    assert_eq!(payload_text(&got[0]), "failing");
    let delay = Duration::from_millis(1500);
    let asked = Instant::now();
    got[0].nack(delay).await.unwrap();

    let again = fetch_count(consumer.as_mut(), 1, Duration::from_secs(10)).await;
    let after = asked.elapsed();
    assert_eq!(
        payload_text(&again[0]),
        "failing",
        "the later message of the key overtook"
    );
    assert_eq!(again[0].attempt, 2);
    assert!(
        after >= delay,
        "redelivered after {after:?}, before the {delay:?} delay"
    );
    assert!(
        after < delay + Duration::from_secs(3),
        "redelivered only after {after:?}"
    );
    again[0].ack().await.unwrap();
    let next = fetch_count(consumer.as_mut(), 1, Duration::from_secs(10)).await;
    assert_eq!(payload_text(&next[0]), "after it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_fast_and_loses_nothing_stored_before_it() {
    let mut server = nats_server::start();
    let timeout = Duration::from_secs(1);
    let nats = connect(&server, |o| o.publish_timeout(timeout)).await;
    // A delivery the kill cut off on the wire is the server's until the ack wait ends: keep it
    // short so that such a message comes back within the test.
    let mut subscription = Subscription::new("reporting", [PLACED]);
    subscription.ack_wait = Duration::from_secs(2);
    let mut consumer = nats.subscribe(&subscription).await.unwrap();
    let before: Vec<Outgoing> = (0..10)
        .map(|i| message(PLACED, Some(&format!("k{}", i % 3)), format!("before {i}")))
        .collect();
    publish_all(&nats, &before).await;

    server.kill();
    let during: Vec<Outgoing> = (0..3)
        .map(|i| message(PLACED, Some(&format!("k{i}")), format!("during {i}")))
        .collect();
    let started = Instant::now();
    let outcomes = nats.publish(&during).await;
    let took = started.elapsed();
    assert!(
        took < timeout + Duration::from_millis(500),
        "publish took {took:?}"
    );
    for outcome in &outcomes {
        let err = outcome
            .as_ref()
            .expect_err("published with the server down");
        assert!(err.transient, "not transient: {}", chain(err));
    }
    let started = Instant::now();
    let err = consumer
        .fetch(10, Duration::from_secs(2))
        .await
        .expect_err("fetched with the server down");
    assert!(err.transient, "not transient: {}", chain(&err));
    assert!(started.elapsed() < Duration::from_millis(2500));

    server.start_again();
    // The relay retries what failed; the client reconnects by itself.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let outcomes = nats.publish(&during).await;
        if outcomes.iter().all(Result::is_ok) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "publishing did not resume after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after = message(PLACED, Some("k0"), "after");
    publish_all(&nats, std::slice::from_ref(&after)).await;

    // The consumer made before the outage goes on.
    let expected: HashSet<String> = before
        .iter()
        .chain(&during)
        .chain([&after])
        .map(|m| String::from_utf8(m.payload.to_vec()).unwrap())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut got = HashSet::new();
    while got.len() < expected.len() {
        assert!(
            Instant::now() < deadline,
            "got {} of {}: {got:?}",
            got.len(),
            expected.len()
        );
        // The consumer may report the reconnection once.
        if let Ok(messages) = consumer.fetch(16, Duration::from_millis(200)).await {
            for message in messages {
                message.ack().await.unwrap();
                // At least once: a message whose delivery the kill cut off comes again.
                got.insert(payload_text(&message));
            }
        }
    }
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_that_are_not_subjects_are_refused_by_name() {
    let server = nats_server::start();
    let nats = connect(&server, |o| o).await;

    let outcomes = nats
        .publish(&[
            message(PLACED, Some("a"), "ok"),
            message("orders.>", Some("b"), "wildcard"),
            message(CANCELLED, Some("c"), "ok too"),
        ])
        .await;
    assert!(outcomes[0].is_ok());
    let err = outcomes[1].as_ref().unwrap_err();
    assert!(!err.transient);
    assert!(chain(err).contains("`orders.>`"), "{}", chain(err));
    assert!(outcomes[2].is_ok());

    let Err(err) = nats
        .subscribe(&Subscription::new("g", [PLACED, "order placed"]))
        .await
    else {
        panic!("subscribed to a channel with a space");
    };
    assert!(!err.transient);
    assert!(chain(&err).contains("`order placed`"), "{}", chain(&err));

    let err = nats.provision(&["orders..x".to_owned()]).await.unwrap_err();
    assert!(!err.transient);
    assert!(chain(&err).contains("`orders..x`"), "{}", chain(&err));
}

/// Request-reply: a request reaches one server of its channel and its answer comes back; two
/// servers share requests; with no server, or a server that does not answer, the requester
/// gets a transient error within its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_one_server_and_come_back() {
    let server = nats_server::start();
    let client = connect(&server, |o| o).await;
    let first = connect(&server, |o| o).await;
    let second = connect(&server, |o| o).await;

    let err = client
        .request("billing.balance", "{}".into(), Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(err.transient, "{}", chain(&err));

    let served = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    for (name, nats) in [("first", first.clone()), ("second", second.clone())] {
        let mut requests = nats.serve("billing.balance").await.unwrap();
        let served = served.clone();
        tokio::spawn(async move {
            while let Some(request) = requests.next().await {
                served.lock().unwrap().push(name);
                let mut answer = request.payload.to_vec();
                answer.extend_from_slice(format!(" answered by {name}").as_bytes());
                request.responder.respond(answer.into()).await.unwrap();
            }
        });
    }
    // Let both queue subscriptions reach the server.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..20 {
        let answer = client
            .request(
                "billing.balance",
                format!("q{i}").into(),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        let answer = String::from_utf8(answer.to_vec()).unwrap();
        assert!(
            answer.starts_with(&format!("q{i} answered by ")),
            "{answer}"
        );
    }
    let served = served.lock().unwrap().clone();
    assert_eq!(served.len(), 20, "each request went to exactly one server");
    assert!(
        served.contains(&"first") && served.contains(&"second"),
        "{served:?}"
    );

    // A server that never answers: the requester's timeout.
    let mut silent = first.serve("billing.silent").await.unwrap();
    tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Some(request) = silent.next().await {
            kept.push(request);
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let err = client
        .request("billing.silent", "{}".into(), Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(err.transient);
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(chain(&err).contains("no answer within"), "{}", chain(&err));
}
