//! What the conformance suite does not cover: options, refused names, provisioning, where
//! records really land, and offsets never committed past a message in flight. Each test that
//! needs a broker starts its own `tansu` (see `support`).

use std::time::Duration;

use bytes::Bytes;
use inseam_core::transport::{Consumer, Outgoing, Subscription, Transport};
use inseam_kafka::{Kafka, KafkaError, KafkaOptions};
use inseam_test_servers::{Server as KafkaServer, kafka as kafka_server};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use uuid::Uuid;

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
    move |name| {
        pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    }
}

fn config_option(error: KafkaError) -> String {
    match error {
        KafkaError::Config { option, .. } => option,
        other => panic!("expected a configuration error, got {other}"),
    }
}

#[test]
fn urls_give_brokers_credentials_and_tls() {
    let options = KafkaOptions::from_url("kafka://al%40ice:p%3Ass@k1:9093, k2 ,[::1]:9094")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(options.broker_list(), ["k1:9093", "k2:9092", "[::1]:9094"]);
    let shown = format!("{options:?}");
    assert!(shown.contains("al@ice"), "{shown}");
    assert!(
        !shown.contains("p:ss") && !shown.contains("p%3Ass"),
        "{shown}"
    );
    assert!(shown.contains("tls: false"), "{shown}");

    let secure = KafkaOptions::from_url("kafka+ssl://k1:9093").unwrap_or_else(|e| panic!("{e}"));
    assert!(format!("{secure:?}").contains("tls: true"));

    for (bad, why) in [
        ("http://k1:9092", "scheme"),
        ("kafka://k1:9092,kafka+ssl://k2:9092", "mix"),
        ("kafka://user@k1:9092", "password"),
        (
            "kafka://a:b@k1:9092,kafka://c:d@k2:9092",
            "different credentials",
        ),
        ("k1:notaport", "port"),
        (" , ", "no broker"),
    ] {
        match KafkaOptions::from_url(bad) {
            Err(KafkaError::Config { problem, .. }) => {
                assert!(problem.contains(why), "`{bad}`: {problem}");
            }
            other => panic!("`{bad}` should be refused ({why}), got {other:?}"),
        }
    }
}

#[test]
fn environment_variables_are_read_and_checked() {
    let options = KafkaOptions::from_env_vars(vars(&[
        ("INSEAM_KAFKA_URL", "k1:9092,k2:9092"),
        ("INSEAM_KAFKA_USER", "app"),
        ("INSEAM_KAFKA_PASSWORD", "s3cret-pw"),
        ("INSEAM_KAFKA_SASL_MECHANISM", "scram-sha-512"),
        ("INSEAM_KAFKA_TLS_CA", "/etc/ca.pem"),
        ("INSEAM_KAFKA_TOPIC", "shop"),
        ("INSEAM_KAFKA_PARTITIONS", "16"),
        ("INSEAM_KAFKA_PUBLISH_TIMEOUT", "1500ms"),
        ("INSEAM_KAFKA_SESSION_TIMEOUT", "6s"),
        ("INSEAM_KAFKA_INSTANCE_ID", "billing-0"),
        ("INSEAM_KAFKA_FETCH_WAIT", "10ms"),
    ]))
    .unwrap_or_else(|e| panic!("{e}"));
    let shown = format!("{options:?}");
    assert!(!shown.contains("s3cret-pw"), "{shown}");
    for part in [
        "SCRAM-SHA-512",
        "tls: true",
        "topic: \"shop\"",
        "partitions: 16",
        "publish_timeout: 1.5s",
        "session_timeout: 6s",
        "instance_id: Some(\"billing-0\")",
        "fetch_wait: Some(10ms)",
    ] {
        assert!(shown.contains(part), "{part} in {shown}");
    }

    for (pairs, option) in [
        (&[("INSEAM_KAFKA_USER", "app")][..], "INSEAM_KAFKA_USER"),
        (
            &[("INSEAM_KAFKA_PASSWORD", "x")][..],
            "INSEAM_KAFKA_PASSWORD",
        ),
        (
            &[("INSEAM_KAFKA_TLS_CERT", "c.pem")][..],
            "INSEAM_KAFKA_TLS_CERT",
        ),
        (
            &[("INSEAM_KAFKA_PARTITIONS", "many")][..],
            "INSEAM_KAFKA_PARTITIONS",
        ),
        (&[("INSEAM_KAFKA_PARTITIONS", "0")][..], "partitions"),
        (&[("INSEAM_KAFKA_PARTITIONS", "2000")][..], "partitions"),
        (&[("INSEAM_KAFKA_TLS", "maybe")][..], "INSEAM_KAFKA_TLS"),
        (&[("INSEAM_KAFKA_TOPIC", "a topic")][..], "topic"),
        (
            &[("INSEAM_KAFKA_SASL_MECHANISM", "GSSAPI")][..],
            "sasl_mechanism",
        ),
        (
            &[("INSEAM_KAFKA_PUBLISH_TIMEOUT", "soon")][..],
            "INSEAM_KAFKA_PUBLISH_TIMEOUT",
        ),
        (
            &[("INSEAM_KAFKA_SESSION_TIMEOUT", "later")][..],
            "INSEAM_KAFKA_SESSION_TIMEOUT",
        ),
        (
            &[("INSEAM_KAFKA_SESSION_TIMEOUT", "500ms")][..],
            "heartbeat_interval",
        ),
        (&[("INSEAM_KAFKA_INSTANCE_ID", "pod 0")][..], "instance_id"),
        (
            &[("INSEAM_KAFKA_FETCH_WAIT", "often")][..],
            "INSEAM_KAFKA_FETCH_WAIT",
        ),
        (&[("INSEAM_KAFKA_FETCH_WAIT", "0s")][..], "fetch_wait"),
        (&[("INSEAM_KAFKA_FETCH_WAIT", "10m")][..], "fetch_wait"),
    ] {
        match KafkaOptions::from_env_vars(vars(pairs)) {
            Err(error) => assert_eq!(config_option(error), option, "{pairs:?}"),
            Ok(options) => panic!("{pairs:?} should be refused, got {options:?}"),
        }
    }
}

#[test]
fn secret_librdkafka_settings_are_redacted() {
    let options = KafkaOptions::new()
        .set("sasl.oauthbearer.client.secret", "oauth-s3cret")
        .set("ssl.key.password", "key-s3cret")
        .set("socket.keepalive.enable", "true");
    let shown = format!("{options:?}");
    assert!(!shown.contains("oauth-s3cret"), "{shown}");
    assert!(!shown.contains("key-s3cret"), "{shown}");
    assert!(shown.contains("socket.keepalive.enable"), "{shown}");
}

#[test]
fn invalid_options_are_refused_when_connecting() {
    let error = Kafka::connect_with(KafkaOptions::new().topic("no/slash")).map(|_| ());
    assert_eq!(
        config_option(error.err().unwrap_or_else(|| panic!("accepted"))),
        "topic"
    );
    let error = Kafka::connect_with(
        KafkaOptions::new()
            .session_timeout(Duration::from_secs(1))
            .heartbeat_interval(Duration::from_secs(2)),
    )
    .map(|_| ());
    assert_eq!(
        config_option(error.err().unwrap_or_else(|| panic!("accepted"))),
        "heartbeat_interval"
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

fn message(channel: &str, key: Option<&str>, body: &str) -> Outgoing {
    Outgoing {
        channel: channel.to_owned(),
        message_id: Uuid::now_v7(),
        key: key.map(str::to_owned),
        headers: vec![("traceparent".to_owned(), body.to_owned())],
        payload: Bytes::from(body.to_owned()),
    }
}

fn connect(server: &KafkaServer, partitions: u16) -> Kafka {
    let options = KafkaOptions::from_url(&server.url())
        .unwrap_or_else(|e| panic!("{e}"))
        .partitions(partitions);
    Kafka::connect_with(options).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn bad_channels_and_reserved_headers_are_refused_as_permanent() {
    let server = kafka_server::start_in_memory();
    runtime().block_on(async {
        let kafka = connect(&server, 8);
        let refused = kafka.provision(&[String::new()]).await;
        assert!(matches!(refused, Err(ref e) if !e.transient), "{refused:?}");
        match kafka
            .subscribe(&Subscription::new("g", ["ok", "bad\u{0}"]))
            .await
        {
            Err(error) => assert!(!error.transient, "{error:?}"),
            Ok(_) => panic!("a channel with a NUL was accepted"),
        }
        match kafka.subscribe(&Subscription::new("", ["ok"])).await {
            Err(error) => assert!(!error.transient, "{error:?}"),
            Ok(_) => panic!("an empty group was accepted"),
        }

        kafka
            .provision(&["ok".to_owned()])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut reserved = message("ok", Some("k"), "reserved");
        reserved
            .headers
            .push(("inseam-channel".to_owned(), "other".to_owned()));
        let batch = [
            message("", Some("k"), "no channel"),
            reserved,
            // Same key (so same partition) after a refused message: held back, transient.
            message("ok", Some("k"), "after"),
            message("ok", Some("other-key-1"), "fine"),
        ];
        let outcomes = kafka.publish(&batch).await;
        assert_eq!(outcomes.len(), 4);
        assert!(
            matches!(&outcomes[0], Err(e) if !e.transient),
            "{:?}",
            outcomes[0]
        );
        assert!(
            matches!(&outcomes[1], Err(e) if !e.transient),
            "{:?}",
            outcomes[1]
        );
        assert!(
            matches!(&outcomes[2], Err(e) if e.transient),
            "{:?}",
            outcomes[2]
        );
        // A key of another partition goes through.
        let other = kafka.partition("other-key-1");
        if other != kafka.partition("k") {
            assert!(outcomes[3].is_ok(), "{:?}", outcomes[3]);
        }
    });
}

#[test]
fn provisioning_is_idempotent_and_checks_the_partition_count() {
    let server = kafka_server::start_in_memory();
    runtime().block_on(async {
        let kafka = connect(&server, 6);
        for _ in 0..3 {
            kafka
                .provision(&["a".to_owned(), "b".to_owned()])
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let admin: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", server.url())
            .create()
            .unwrap_or_else(|e| panic!("{e}"));
        let metadata = tokio::task::block_in_place(|| {
            admin.fetch_metadata(Some("inseam"), Duration::from_secs(5))
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(metadata.topics()[0].partitions().len(), 6);

        let other = connect(&server, 8);
        match other.provision(&["a".to_owned()]).await {
            Err(error) => {
                assert!(!error.transient, "{error:?}");
                let chain = format!("{:?}", std::error::Error::source(&error));
                assert!(
                    chain.contains("6 partitions") && chain.contains("say 8"),
                    "{chain}"
                );
            }
            Ok(()) => panic!("a topic of 6 partitions was accepted for 8"),
        }
    });
}

#[test]
fn records_land_in_the_partition_the_transport_names() {
    let server = kafka_server::start_in_memory();
    runtime().block_on(async {
        let kafka = connect(&server, 8);
        kafka
            .provision(&["c".to_owned()])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let keys: Vec<String> = (0..40)
            .map(|i| format!("order-{i}"))
            .chain(["clé-🦀".to_owned(), String::new()])
            .collect();
        let batch: Vec<Outgoing> = keys.iter().map(|k| message("c", Some(k), k)).collect();
        for outcome in kafka.publish(&batch).await {
            outcome.unwrap_or_else(|e| panic!("{e}"));
        }
        let reader: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", server.url())
            .set("group.id", "partition-check")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut list = TopicPartitionList::new();
        for partition in 0..8 {
            list.add_partition_offset("inseam", partition, Offset::Beginning)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        reader.assign(&list).unwrap_or_else(|e| panic!("{e}"));
        let mut seen = 0;
        let mut used = std::collections::HashSet::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        tokio::task::block_in_place(|| {
            while seen < keys.len() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "only {seen} records came"
                );
                let Some(record) = reader.poll(Duration::from_millis(200)) else {
                    continue;
                };
                let record = record.unwrap_or_else(|e| panic!("{e}"));
                let key = String::from_utf8(record.key().unwrap_or_default().to_vec())
                    .unwrap_or_else(|e| panic!("{e}"));
                let named = kafka.partition(&key).map(i32::from);
                assert_eq!(Some(record.partition()), named, "key {key:?}");
                used.insert(record.partition());
                seen += 1;
            }
        });
        assert!(used.len() > 1, "every key landed in one partition");
    });
}

async fn committed(server: &KafkaServer, group: &str, partition: i32) -> Offset {
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", server.url())
        .set("group.id", format!("inseam.{group}"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap_or_else(|e| panic!("{e}"));
    let mut list = TopicPartitionList::new();
    list.add_partition("inseam", partition);
    let read =
        tokio::task::block_in_place(|| reader.committed_offsets(list, Duration::from_secs(5)))
            .unwrap_or_else(|e| panic!("{e}"));
    read.elements()[0].offset()
}

/// Waits until the group's committed offset of `partition` is `offset` (the consumer's thread
/// commits shortly after an acknowledgement), failing with what it is after 10 s.
async fn committed_reaches(server: &KafkaServer, group: &str, partition: i32, offset: i64) {
    let give_up = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let now = committed(server, group, partition).await;
        if now == Offset::Offset(offset) {
            return;
        }
        assert!(
            std::time::Instant::now() < give_up,
            "the committed offset is {now:?}, not {offset}, 10 s after the acknowledgement"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn fetch_one(consumer: &mut dyn Consumer) -> inseam_core::transport::Incoming {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        assert!(tokio::time::Instant::now() < deadline, "nothing came");
        let mut batch = consumer
            .fetch(10, Duration::from_millis(200))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            batch.len() <= 1,
            "{} messages of one partition came at once",
            batch.len()
        );
        if let Some(message) = batch.pop() {
            return message;
        }
    }
}

/// Messages 1 to 4 of one partition: 2 and 3 are of a channel the group does not read, so
/// the member settles them as they arrive, while 1 is handed out and unsettled. The group's
/// committed offset, read from the broker, stays at 1 until 1 is acknowledged, then moves
/// past 3 (to 4), then past 4.
#[test]
fn no_offset_is_committed_past_a_message_in_flight() {
    let server = kafka_server::start_in_memory();
    runtime().block_on(async {
        let kafka = connect(&server, 8);
        kafka
            .provision(&["read".to_owned(), "skipped".to_owned()])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let key = "order-7";
        let partition = i32::from(
            kafka
                .partition(key)
                .unwrap_or_else(|| panic!("no partition")),
        );
        let batch = [
            message("read", Some(key), "1"),
            message("skipped", Some(key), "2"),
            message("skipped", Some(key), "3"),
            message("read", Some(key), "4"),
        ];
        for outcome in kafka.publish(&batch).await {
            outcome.unwrap_or_else(|e| panic!("{e}"));
        }
        let mut consumer = kafka
            .subscribe(&Subscription::new("offsets", ["read"]))
            .await
            .unwrap_or_else(|e| panic!("{e}"));

        let first = fetch_one(&mut *consumer).await;
        assert_eq!(first.payload, "1");
        assert_eq!(first.attempt, 1);
        // Nothing else of the partition comes while 1 is out.
        let more = consumer
            .fetch(10, Duration::from_millis(1500))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(more.is_empty(), "{more:?}");
        // 2 and 3 were settled on arrival and the member has committed since (it does every
        // second): the commit stays at 1's offset.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let before = committed(&server, "offsets", partition).await;
        assert!(
            matches!(before, Offset::Offset(0) | Offset::Invalid),
            "committed {before:?} while the message at offset 0 was in flight"
        );

        first.ack().await.unwrap_or_else(|e| panic!("{e}"));
        committed_reaches(&server, "offsets", partition, 3).await;

        let fourth = fetch_one(&mut *consumer).await;
        assert_eq!(fourth.payload, "4");
        assert_eq!(
            committed(&server, "offsets", partition).await,
            Offset::Offset(3)
        );
        fourth.ack().await.unwrap_or_else(|e| panic!("{e}"));
        committed_reaches(&server, "offsets", partition, 4).await;
    });
}

/// A member that nacks a message holds its partition back for the delay, hands it out again
/// with the next attempt, and its key's later message only after it was acknowledged.
#[test]
fn a_nacked_message_holds_back_its_partition_for_the_delay() {
    let server = kafka_server::start_in_memory();
    runtime().block_on(async {
        let kafka = connect(&server, 8);
        kafka
            .provision(&["c".to_owned()])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        for outcome in kafka
            .publish(&[
                message("c", Some("k"), "first"),
                message("c", Some("k"), "second"),
            ])
            .await
        {
            outcome.unwrap_or_else(|e| panic!("{e}"));
        }
        let mut consumer = kafka
            .subscribe(&Subscription::new("nacks", ["c"]))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let first = fetch_one(&mut *consumer).await;
        assert_eq!((first.payload.as_ref(), first.attempt), (&b"first"[..], 1));
        let nacked = tokio::time::Instant::now();
        first
            .nack(Duration::from_millis(800))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let again = fetch_one(&mut *consumer).await;
        assert!(
            nacked.elapsed() >= Duration::from_millis(800),
            "{:?}",
            nacked.elapsed()
        );
        assert_eq!((again.payload.as_ref(), again.attempt), (&b"first"[..], 2));
        again.ack().await.unwrap_or_else(|e| panic!("{e}"));
        let second = fetch_one(&mut *consumer).await;
        assert_eq!(
            (second.payload.as_ref(), second.attempt),
            (&b"second"[..], 1)
        );
        second.ack().await.unwrap_or_else(|e| panic!("{e}"));
    });
}

/// A member whose partition queue filled up (the member pauses the partition's fetching at
/// 256 records) and which loses the partition in a rebalance and gets it back reads it again:
/// librdkafka keeps a pause across a rebalance, so the member resumes what it is assigned.
/// A second member joins the group and leaves it, each a rebalance; every message then comes
/// to the first.
#[test]
fn a_partition_paused_before_a_rebalance_is_read_after_it() {
    const MESSAGES: usize = 600;
    let server = kafka_server::start_in_memory();
    runtime().block_on(async {
        let connect = || {
            let options = KafkaOptions::from_url(&server.url())
                .unwrap_or_else(|e| panic!("{e}"))
                .partitions(1)
                .session_timeout(Duration::from_secs(6));
            Kafka::connect_with(options).unwrap_or_else(|e| panic!("{e}"))
        };
        let kafka = connect();
        kafka
            .provision(&["c".to_owned()])
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let batch: Vec<Outgoing> = (0..MESSAGES)
            .map(|n| message("c", Some("k"), &n.to_string()))
            .collect();
        for outcome in kafka.publish(&batch).await {
            outcome.unwrap_or_else(|e| panic!("{e}"));
        }
        let subscription = Subscription::new("paused", ["c"]);
        let mut first = kafka
            .subscribe(&subscription)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut seen = std::collections::BTreeSet::new();
        let head = fetch_one(&mut *first).await;
        seen.insert(String::from_utf8_lossy(&head.payload).into_owned());
        head.ack().await.unwrap_or_else(|e| panic!("{e}"));
        // The member's queue fills (the rest of the partition is far more than 256 records)
        // and its fetching pauses.
        tokio::time::sleep(Duration::from_secs(2)).await;

        let other = connect();
        let second = other
            .subscribe(&subscription)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        drop(second);
        drop(other);

        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while seen.len() < MESSAGES {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {MESSAGES} messages came in 60 s after the rebalances",
                seen.len()
            );
            let batch = first
                .fetch(10, Duration::from_millis(200))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            for message in batch {
                seen.insert(String::from_utf8_lossy(&message.payload).into_owned());
                // An acknowledgement of a message whose partition was taken away in the
                // meantime fails; the message comes again.
                let _ = message.ack().await;
            }
        }
        let expected: std::collections::BTreeSet<String> =
            (0..MESSAGES).map(|n| n.to_string()).collect();
        assert_eq!(seen, expected);
    });
}
