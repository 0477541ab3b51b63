//! What the conformance suite does not cover: refused names, idempotent provisioning, the
//! order of a key across several consumers (processes) one of which dies holding messages,
//! the attempt count of a message nacked and then left by a crashed consumer, and publishing
//! and consuming again after the server restarts. Each test runs in a virtual host of its own
//! on a node the test process starts, except the restart test, which has a node of its own.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use inseam_amqp::{Amqp, AmqpOptions};
use inseam_core::transport::{Consumer, Incoming, Outgoing, Subscription, Transport};
use inseam_test_servers::{Server as RabbitNode, amqp as rabbit};
use tokio::time::Instant;
use uuid::Uuid;

static SHARED: OnceLock<RabbitNode> = OnceLock::new();

/// The URL of a new virtual host on the shared node.
async fn vhost() -> String {
    tokio::task::spawn_blocking(|| {
        let node = SHARED.get_or_init(|| {
            let node = rabbit::start();
            node.stop_when_gone();
            node
        });
        let vhost = format!("test-{}", Uuid::now_v7().simple());
        rabbit::add_vhost(node, &vhost).expect("a virtual host");
        rabbit::vhost_url(node, &vhost)
    })
    .await
    .expect("the shared RabbitMQ node")
}

async fn connect(url: &str) -> Amqp {
    Amqp::connect_with(AmqpOptions::from_url(url).expect("an AMQP URL"))
        .await
        .expect("a connection")
}

fn message(channel: &str, key: Option<&str>, label: &str) -> Outgoing {
    Outgoing {
        channel: channel.to_owned(),
        message_id: Uuid::now_v7(),
        key: key.map(str::to_owned),
        headers: vec![("label".to_owned(), label.to_owned())],
        payload: Bytes::from(label.to_owned()),
    }
}

fn label(message: &Incoming) -> String {
    String::from_utf8_lossy(&message.payload).into_owned()
}

async fn publish_ok(transport: &Amqp, batch: &[Outgoing]) {
    for (index, outcome) in transport.publish(batch).await.into_iter().enumerate() {
        if let Err(error) = outcome {
            panic!("message {index} was not published: {error:?}");
        }
    }
}

/// Fetches until `count` messages came or 30 s passed, acknowledging each.
async fn take(consumer: &mut dyn Consumer, count: usize) -> Vec<String> {
    let mut labels = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(30);
    while labels.len() < count {
        assert!(
            Instant::now() < give_up,
            "only {} of {count} messages came: {labels:?}",
            labels.len()
        );
        let batch = match consumer.fetch(16, Duration::from_millis(200)).await {
            Ok(batch) => batch,
            Err(error) if error.transient => continue,
            Err(error) => panic!("fetch failed: {error:?}"),
        };
        for message in batch {
            labels.push(label(&message));
            message.ack().await.expect("an acknowledgement");
        }
    }
    labels
}

/// Nothing more comes within `wait`.
async fn nothing_more(consumer: &mut dyn Consumer, wait: Duration) {
    let until = Instant::now() + wait;
    while Instant::now() < until {
        if let Ok(batch) = consumer.fetch(16, Duration::from_millis(100)).await {
            let labels: Vec<String> = batch.iter().map(label).collect();
            assert!(labels.is_empty(), "more messages came: {labels:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn names_a_routing_key_cannot_carry_are_refused_as_permanent() {
    let url = vhost().await;
    let amqp = connect(&url).await;
    for channel in [
        "",
        "orders.#",
        "orders.*",
        "orders..placed",
        ".orders",
        "order placed",
    ] {
        let error = amqp
            .provision(&[channel.to_owned()])
            .await
            .expect_err("a refused channel");
        assert!(!error.transient, "{channel:?}: {error:?}");
        let outcomes = amqp.publish(&[message(channel, Some("k"), "x")]).await;
        assert!(
            matches!(&outcomes[..], [Err(error)] if !error.transient),
            "{channel:?}: {outcomes:?}"
        );
        let refused = amqp.subscribe(&Subscription::new("g", [channel])).await;
        assert!(
            matches!(&refused, Err(error) if !error.transient),
            "{channel:?}"
        );
    }
    let long = "a".repeat(250);
    assert!(amqp.provision(&[long]).await.is_err_and(|e| !e.transient));
    let empty_group = amqp
        .subscribe(&Subscription::new("", ["orders.placed"]))
        .await;
    assert!(matches!(empty_group, Err(error) if !error.transient));

    // A message after a refused one of the same key in one batch is held back; one of another
    // key goes out.
    amqp.provision(&["orders.placed".to_owned()]).await.unwrap();
    let outcomes = amqp
        .publish(&[
            message("bad channel", Some("k"), "refused"),
            message("orders.placed", Some("k"), "held back"),
            message("orders.placed", Some("other"), "sent"),
        ])
        .await;
    assert!(matches!(&outcomes[0], Err(error) if !error.transient));
    assert!(matches!(&outcomes[1], Err(error) if error.transient));
    assert!(outcomes[2].is_ok());
}

#[tokio::test(flavor = "multi_thread")]
async fn provisioning_and_subscribing_again_change_nothing() {
    let url = vhost().await;
    let amqp = connect(&url).await;
    let channel = "stock.reserved".to_owned();
    for _ in 0..3 {
        amqp.provision(std::slice::from_ref(&channel))
            .await
            .unwrap();
    }
    let group = Subscription::new("stock", [channel.clone()]);
    // The first subscription sets the group up; the later ones find it.
    drop(amqp.subscribe(&group).await.unwrap());
    drop(amqp.subscribe(&group).await.unwrap());
    let messages: Vec<Outgoing> = (0..20)
        .map(|i| message(&channel, Some(&format!("k{i}")), &i.to_string()))
        .collect();
    publish_ok(&amqp, &messages).await;
    let mut consumer = amqp.subscribe(&group).await.unwrap();
    let mut labels = take(&mut *consumer, 20).await;
    nothing_more(&mut *consumer, Duration::from_secs(1)).await;
    labels.sort_by_key(|l| l.parse::<u32>().unwrap_or(u32::MAX));
    let expected: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    assert_eq!(labels, expected, "each message once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nacked_message_left_by_a_crashed_consumer_keeps_its_attempts() {
    let url = vhost().await;
    let amqp = connect(&url).await;
    let channel = "payments.captured".to_owned();
    amqp.provision(std::slice::from_ref(&channel))
        .await
        .unwrap();
    let group = Subscription::new("ledger", [channel.clone()]);
    drop(amqp.subscribe(&group).await.unwrap());
    publish_ok(
        &amqp,
        &[
            message(&channel, Some("p-1"), "first"),
            message(&channel, Some("p-1"), "second"),
        ],
    )
    .await;

    {
        let crashing = connect(&url).await;
        let mut consumer = crashing.subscribe(&group).await.unwrap();
        let mut attempts = Vec::new();
        let give_up = Instant::now() + Duration::from_secs(30);
        // Nacked twice, then held when the consumer and its connection go away.
        while attempts.len() < 3 {
            assert!(Instant::now() < give_up, "attempts so far: {attempts:?}");
            for message in consumer
                .fetch(4, Duration::from_millis(100))
                .await
                .unwrap_or_default()
            {
                assert_eq!(label(&message), "first", "the later message waits");
                attempts.push(message.attempt);
                if attempts.len() < 3 {
                    message.nack(Duration::from_millis(50)).await.unwrap();
                } else {
                    std::mem::forget(message);
                }
            }
        }
        assert_eq!(attempts, [1, 2, 3]);
    }

    let survivor = connect(&url).await;
    let mut consumer = survivor.subscribe(&group).await.unwrap();
    let mut came = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(30);
    while came.len() < 2 {
        assert!(Instant::now() < give_up, "came so far: {came:?}");
        for message in consumer
            .fetch(4, Duration::from_millis(100))
            .await
            .unwrap_or_default()
        {
            came.push((label(&message), message.attempt));
            message.ack().await.unwrap();
        }
    }
    assert_eq!(
        came,
        [("first".to_owned(), 4), ("second".to_owned(), 1)],
        "the crash counts as an attempt, after the two nacks recorded on the server"
    );
    nothing_more(&mut *consumer, Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn key_order_holds_across_consumers_when_one_dies_holding_messages() {
    const KEYS: usize = 6;
    const PER_KEY: usize = 40;
    let url = vhost().await;
    let amqp = connect(&url).await;
    let channels = ["orders.placed".to_owned(), "orders.confirmed".to_owned()];
    amqp.provision(&channels).await.unwrap();
    let mut group = Subscription::new("fulfilment", channels.clone());
    group.ack_wait = Duration::from_secs(2);
    drop(amqp.subscribe(&group).await.unwrap());
    // Key k's messages alternate between the two channels: `k/n`.
    let messages: Vec<Outgoing> = (0..KEYS * PER_KEY)
        .map(|i| {
            let (key, number) = (i % KEYS, i / KEYS);
            message(
                &channels[number % 2],
                Some(&format!("order-{key}")),
                &format!("{key}/{number}"),
            )
        })
        .collect();
    publish_ok(&amqp, &messages).await;

    // One consumer takes a few messages and dies holding them.
    {
        let dying = connect(&url).await;
        let mut consumer = dying.subscribe(&group).await.unwrap();
        let mut held = Vec::new();
        let give_up = Instant::now() + Duration::from_secs(30);
        while held.len() < 3 {
            assert!(
                Instant::now() < give_up,
                "nothing came to the dying consumer"
            );
            held.extend(
                consumer
                    .fetch(3, Duration::from_millis(100))
                    .await
                    .unwrap_or_default(),
            );
        }
    }

    // Three consumers, on connections of their own, handle the rest; per key, what each
    // handles must follow publish order, whoever handles it.
    let handled: std::sync::Arc<std::sync::Mutex<HashMap<usize, Vec<usize>>>> = Default::default();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let connection = connect(&url).await;
        let mut consumer = connection.subscribe(&group).await.unwrap();
        let handled = handled.clone();
        tasks.push(tokio::spawn(async move {
            let _connection = connection;
            let quiet_after = Duration::from_secs(4);
            let mut last = Instant::now();
            let give_up = Instant::now() + Duration::from_secs(60);
            while last.elapsed() < quiet_after && Instant::now() < give_up {
                let batch = consumer
                    .fetch(8, Duration::from_millis(100))
                    .await
                    .unwrap_or_default();
                for message in batch {
                    last = Instant::now();
                    let text = label(&message);
                    let (key, number) = text.split_once('/').expect("k/n");
                    let (key, number): (usize, usize) =
                        (key.parse().expect("k"), number.parse().expect("n"));
                    handled
                        .lock()
                        .expect("the record")
                        .entry(key)
                        .or_default()
                        .push(number);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    message.ack().await.expect("an acknowledgement");
                }
            }
        }));
    }
    for task in tasks {
        task.await.expect("a consumer task");
    }
    let handled = handled.lock().expect("the record").clone();
    for key in 0..KEYS {
        let numbers = handled.get(&key).cloned().unwrap_or_default();
        // The messages the dying consumer held come again; each of them is the first of
        // its key to come, so the order is exactly the publish order.
        let expected: Vec<usize> = (0..PER_KEY).collect();
        assert_eq!(numbers, expected, "key {key}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn publishing_and_consuming_resume_after_the_server_restarts() {
    let mut node = tokio::task::spawn_blocking(rabbit::start)
        .await
        .expect("a RabbitMQ node");
    let url = node.url();
    let amqp = connect(&url).await;
    let channel = "invoices.issued".to_owned();
    amqp.provision(std::slice::from_ref(&channel))
        .await
        .unwrap();
    let group = Subscription::new("mailer", [channel.clone()]);
    let mut consumer = amqp.subscribe(&group).await.unwrap();
    let before: Vec<Outgoing> = (0..10)
        .map(|i| {
            message(
                &channel,
                Some(&format!("k{}", i % 3)),
                &format!("before-{i}"),
            )
        })
        .collect();
    publish_ok(&amqp, &before).await;
    assert_eq!(take(&mut *consumer, 10).await.len(), 10);

    let mut node = tokio::task::spawn_blocking(move || {
        node.stop().expect("a clean stop");
        node
    })
    .await
    .expect("the node stopped");
    let outcomes = amqp
        .publish(&[message(&channel, Some("k0"), "during")])
        .await;
    assert!(
        matches!(&outcomes[..], [Err(error)] if error.transient),
        "{outcomes:?}"
    );
    let node = tokio::task::spawn_blocking(move || {
        node.start_again();
        node
    })
    .await
    .expect("the node started again");

    // Every message goes out after the restart, not just the first: one at a time, then in
    // batches, with nothing else than the first publish retried.
    let after: Vec<Outgoing> = (0..300)
        .map(|i| {
            message(
                &channel,
                Some(&format!("k{}", i % 7)),
                &format!("after-{i}"),
            )
        })
        .collect();
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        match amqp.publish(&after[..1]).await.remove(0) {
            Ok(()) => break,
            Err(error) if error.transient && Instant::now() < give_up => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => panic!("publishing after the restart failed: {error:?}"),
        }
    }
    for message in &after[1..100] {
        publish_ok(&amqp, std::slice::from_ref(message)).await;
    }
    for batch in after[100..].chunks(50) {
        publish_ok(&amqp, batch).await;
    }

    // The consumer from before the restart consumes again by itself.
    let mut labels = take(&mut *consumer, 300).await;
    nothing_more(&mut *consumer, Duration::from_secs(1)).await;
    labels.sort();
    let mut expected: Vec<String> = (0..300).map(|i| format!("after-{i}")).collect();
    expected.sort();
    assert_eq!(labels, expected);
    drop(consumer);
    drop(amqp);
    drop(node);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_group_gets_what_was_published_before_and_during_its_first_subscription() {
    const COUNT: usize = 400;
    const KEYS: usize = 5;
    let url = vhost().await;
    let amqp = connect(&url).await;
    let channel = "catalog.priced".to_owned();
    amqp.provision(std::slice::from_ref(&channel))
        .await
        .unwrap();
    let messages: Vec<Outgoing> = (0..COUNT)
        .map(|i| {
            message(
                &channel,
                Some(&format!("k{}", i % KEYS)),
                &format!("{}/{}", i % KEYS, i / KEYS),
            )
        })
        .collect();
    // Published one by one while the group sets itself up (its fences and its 500 ms grace
    // fall in the middle of the publishing).
    let publisher = {
        let amqp = amqp.clone();
        let messages = messages.clone();
        tokio::spawn(async move {
            for message in &messages {
                publish_ok(&amqp, std::slice::from_ref(message)).await;
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let subscriber = connect(&url).await;
    let mut consumer = subscriber
        .subscribe(&Subscription::new("pricing", [channel.clone()]))
        .await
        .unwrap();
    publisher.await.expect("the publisher");

    let labels = take(&mut *consumer, COUNT).await;
    nothing_more(&mut *consumer, Duration::from_secs(2)).await;
    let mut per_key: HashMap<usize, Vec<usize>> = HashMap::new();
    for text in &labels {
        let (key, number) = text.split_once('/').expect("k/n");
        per_key
            .entry(key.parse().expect("k"))
            .or_default()
            .push(number.parse().expect("n"));
    }
    for key in 0..KEYS {
        let expected: Vec<usize> = (0..COUNT / KEYS).collect();
        assert_eq!(
            per_key.get(&key),
            Some(&expected),
            "key {key}: each once, in order"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_consumer_moves_on_from_the_history_and_takes_over() {
    let url = vhost().await;
    let amqp = connect(&url).await;
    let channel = "carts.checked_out".to_owned();
    amqp.provision(std::slice::from_ref(&channel))
        .await
        .unwrap();
    let before: Vec<Outgoing> = (0..20)
        .map(|i| message(&channel, Some(&format!("c{i}")), &format!("before-{i}")))
        .collect();
    publish_ok(&amqp, &before).await;

    // Two processes of a new group: one sets it up (copying the history), both read it.
    let group = Subscription::new("checkout", [channel.clone()]);
    let first = connect(&url).await;
    let mut first_consumer = first.subscribe(&group).await.unwrap();
    let second = connect(&url).await;
    let mut second_consumer = second.subscribe(&group).await.unwrap();
    let mut labels = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(30);
    while labels.len() < 20 {
        assert!(Instant::now() < give_up, "came so far: {labels:?}");
        for consumer in [&mut first_consumer, &mut second_consumer] {
            for message in consumer
                .fetch(8, Duration::from_millis(50))
                .await
                .unwrap_or_default()
            {
                labels.push(label(&message));
                message.ack().await.unwrap();
            }
        }
    }
    labels.sort();
    let mut expected: Vec<String> = (0..20).map(|i| format!("before-{i}")).collect();
    expected.sort();
    assert_eq!(labels, expected);

    // The first process goes away; the second, which may have waited on the history queues
    // while the first read them, takes every partition over.
    drop(first_consumer);
    drop(first);
    let after: Vec<Outgoing> = (0..40)
        .map(|i| message(&channel, Some(&format!("c{i}")), &format!("after-{i}")))
        .collect();
    publish_ok(&amqp, &after).await;
    let mut labels = take(&mut *second_consumer, 40).await;
    nothing_more(&mut *second_consumer, Duration::from_secs(1)).await;
    labels.sort();
    let mut expected: Vec<String> = (0..40).map(|i| format!("after-{i}")).collect();
    expected.sort();
    assert_eq!(labels, expected);
}
