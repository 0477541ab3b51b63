//! What the conformance suite does not cover: refused names, provisioning and the recorded
//! layout, the partition leases under several consumers, trimming, deduplication turned off,
//! what the transport reads of the server's persistence, and entries that are not inseam's.
//! Each test starts its own `redis-server` (`inseam_test_servers::redis`).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use inseam_core::transport::{Consumer, Incoming, Outgoing, Subscription, Transport};
use inseam_redis::{Redis, RedisError, RedisOptions};
use redis::aio::ConnectionManager;
use tokio::time::Instant;
use uuid::Uuid;

use inseam_test_servers::{Server as RedisServer, redis as redis_server};

async fn server() -> RedisServer {
    tokio::task::spawn_blocking(redis_server::start)
        .await
        .expect("the test's Redis server did not start")
}

async fn connect(
    server: &RedisServer,
    options: impl FnOnce(RedisOptions) -> RedisOptions,
) -> Redis {
    let options = options(RedisOptions::from_url(&server.url()).expect("a Redis URL"));
    Redis::connect_with(options).await.expect("connecting")
}

fn message(channel: &str, key: Option<&str>, label: &str) -> Outgoing {
    Outgoing {
        channel: channel.to_owned(),
        message_id: Uuid::now_v7(),
        key: key.map(str::to_owned),
        headers: vec![("label".to_owned(), label.to_owned())],
        payload: Bytes::from(format!(r#"{{"label":"{label}"}}"#)),
    }
}

async fn publish(transport: &Redis, messages: &[Outgoing]) {
    for (i, outcome) in transport.publish(messages).await.into_iter().enumerate() {
        if let Err(err) = outcome {
            panic!("publishing message {i} failed: {err:?}");
        }
    }
}

fn label(message: &Incoming) -> String {
    message.header("label").unwrap_or_default().to_owned()
}

/// Fetches and acknowledges until `count` messages came, then for `quiet` more; returns
/// their labels in the order they came.
async fn consume(consumer: &mut dyn Consumer, count: usize, quiet: Duration) -> Vec<String> {
    let mut labels = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(30);
    let mut quiet_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if quiet_until.is_some_and(|until| now >= until) {
            return labels;
        }
        assert!(
            now < give_up,
            "only {} of {count} messages came",
            labels.len()
        );
        if quiet_until.is_none() && labels.len() >= count {
            quiet_until = Some(now + quiet);
        }
        let batch = match consumer.fetch(10, Duration::from_millis(100)).await {
            Ok(batch) => batch,
            // What a consumer does: try again (the server restarted, a group was recreated).
            Err(err) if err.transient => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(err) => panic!("fetch: {err:?}"),
        };
        for message in batch {
            labels.push(label(&message));
            message.ack().await.expect("ack");
        }
    }
}

async fn raw(transport: &Redis) -> ConnectionManager {
    transport.connection()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_channels_and_subscriptions_are_permanent_and_named() {
    let server = server().await;
    let redis = connect(&server, |o| o).await;
    for channel in ["", "order placed", "tab\there", "line\nbreak"] {
        let err = redis
            .provision(&[channel.to_owned()])
            .await
            .expect_err("a refused channel");
        assert!(!err.transient, "{err:?}");
        let shown = err
            .source
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        assert!(shown.contains(&format!("channel `{channel}`")), "{shown}");

        let outcomes = redis
            .publish(&[
                message(channel, Some("k"), "x"),
                message("fine", Some("k"), "y"),
            ])
            .await;
        assert_eq!(outcomes.len(), 2);
        let first = outcomes[0].as_ref().expect_err("a refused channel");
        assert!(!first.transient);
        // The later message of the same key is held back, to be retried after the first.
        let second = outcomes[1].as_ref().expect_err("held back behind its key");
        assert!(second.transient, "{second:?}");

        let refused = redis.subscribe(&Subscription::new("g", [channel])).await;
        assert!(refused.is_err_and(|err| !err.transient));
    }
    let no_group = redis.subscribe(&Subscription::new("", ["a"])).await;
    assert!(no_group.is_err_and(|err| !err.transient));
    let no_channel = redis
        .subscribe(&Subscription::new("g", Vec::<String>::new()))
        .await;
    assert!(no_channel.is_err_and(|err| !err.transient));
    let mut zero_wait = Subscription::new("g", ["a"]);
    zero_wait.ack_wait = Duration::ZERO;
    assert!(
        redis
            .subscribe(&zero_wait)
            .await
            .is_err_and(|err| !err.transient)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_is_idempotent_and_guards_the_partition_count() {
    let server = server().await;
    let redis = connect(&server, |o| o).await;
    let channels = vec!["orders.placed".to_owned()];
    redis.provision(&channels).await.expect("first provision");
    redis.provision(&channels).await.expect("second provision");
    let same = connect(&server, |o| o.partitions(8)).await;
    same.provision(&channels).await.expect("same layout");

    let other = connect(&server, |o| o.partitions(4)).await;
    let err = other.provision(&channels).await.expect_err("4 partitions");
    assert!(!err.transient);
    let why = err.source.map(|s| s.to_string()).unwrap_or_default();
    assert!(
        why.contains("8 partitions") && why.contains("configured with 4"),
        "{why}"
    );
    let refused = other
        .subscribe(&Subscription::new("g", ["orders.placed"]))
        .await;
    assert!(refused.is_err_and(|err| !err.transient));

    // Another prefix is another layout.
    let apart = connect(&server, |o| o.partitions(4).prefix("other")).await;
    apart.provision(&channels).await.expect("another prefix");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_nothing_fails_and_an_outage_is_transient() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let err = Redis::connect(&format!("redis://127.0.0.1:{port}"))
        .await
        .expect_err("nothing listens");
    assert!(matches!(err, RedisError::Connect { .. }), "{err:?}");

    let mut server = server().await;
    let redis = connect(&server, |o| o.publish_timeout(Duration::from_secs(1))).await;
    redis.provision(&["a".to_owned()]).await.expect("provision");
    tokio::task::spawn_blocking(move || {
        server.kill();
        server
    })
    .await
    .expect("killing the server");
    let outcomes = redis
        .publish(&[message("a", None, "x"), message("a", None, "y")])
        .await;
    for outcome in outcomes {
        let err = outcome.expect_err("the server is down");
        assert!(err.transient, "{err:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_persistence_decides_acks_survive_restart() {
    let server = server().await;
    let durable = connect(&server, |o| o).await;
    assert!(durable.capabilities().acks_survive_restart);
    let mut conn = raw(&durable).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendfsync")
        .arg("everysec")
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET");
    let relaxed = connect(&server, |o| o).await;
    assert!(!relaxed.capabilities().acks_survive_restart);
    let told = connect(&server, |o| o.durable_acks(true)).await;
    assert!(told.capabilities().acks_survive_restart);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_dedup_window_a_second_publish_comes_twice() {
    let server = server().await;
    let redis = connect(&server, |o| o.dedup_window(Duration::ZERO)).await;
    assert!(!redis.capabilities().deduplicates);
    let first = message("events", Some("k"), "once");
    publish(&redis, &[first.clone(), first]).await;
    let mut consumer = redis
        .subscribe(&Subscription::new("g", ["events"]))
        .await
        .expect("subscribe");
    let labels = consume(&mut *consumer, 2, Duration::from_millis(300)).await;
    assert_eq!(labels, ["once", "once"]);

    let deduplicating = connect(&server, |o| o).await;
    let again = message("events", Some("k"), "dedup");
    publish(&deduplicating, &[again.clone(), again.clone()]).await;
    publish(&deduplicating, &[again]).await;
    let labels = consume(&mut *consumer, 1, Duration::from_millis(300)).await;
    assert_eq!(labels, ["dedup"]);
}

/// The publish script is called by its digest: a server that forgot it (`SCRIPT FLUSH`, as after
/// a restart) gets it again with the next batch, and nothing published fails or goes twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_script_cache_does_not_fail_a_publish() {
    let server = server().await;
    let redis = connect(&server, |o| o).await;
    publish(&redis, &[message("events", Some("k"), "before")]).await;
    let mut conn = raw(&redis).await;
    let flushed: String = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .expect("SCRIPT FLUSH");
    assert_eq!(flushed, "OK");
    publish(&redis, &[message("events", Some("k"), "after")]).await;
    let mut consumer = redis
        .subscribe(&Subscription::new("g", ["events"]))
        .await
        .expect("subscribe");
    let labels = consume(&mut *consumer, 2, Duration::from_millis(300)).await;
    assert_eq!(labels, ["before", "after"]);
}

/// Three consumers of one group, on three connections, share the partitions: each partition's
/// messages go to one consumer at a time, every key comes in publish order across two channels,
/// and when a consumer goes away the others take over its partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_deal_partitions_among_consumers_and_pass_on_when_one_leaves() {
    const KEYS: usize = 16;
    const PER_KEY: usize = 10;
    let server = server().await;
    let options = |o: RedisOptions| o.lease_ttl(Duration::from_secs(1));
    let publisher = connect(&server, options).await;
    let mut subscription = Subscription::new("lease-group", ["a", "b"]);
    // What the leaving consumer had queued and not fetched comes again after this.
    subscription.ack_wait = Duration::from_secs(2);
    let mut transports = Vec::new();
    let mut consumers = Vec::new();
    for _ in 0..3 {
        let transport = connect(&server, options).await;
        consumers.push(transport.subscribe(&subscription).await.expect("subscribe"));
        transports.push(transport);
    }
    // Time for the memberships to settle and the leases to be dealt.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut conn = raw(&publisher).await;
    let mut owners = HashMap::new();
    for partition in 0..8u16 {
        let owner: Option<String> = redis::cmd("GET")
            .arg(format!("inseam:lease:lease-group:{partition}"))
            .query_async(&mut conn)
            .await
            .expect("GET");
        *owners
            .entry(owner.expect("every partition has a reader"))
            .or_insert(0) += 1;
    }
    let mut counts: Vec<i32> = owners.values().copied().collect();
    counts.sort_unstable();
    assert_eq!(counts, [2, 3, 3], "8 partitions dealt among 3 consumers");

    let messages: Vec<Outgoing> = (0..KEYS * PER_KEY)
        .map(|i| {
            let (key, n) = (i % KEYS, i / KEYS);
            message(
                if n % 2 == 0 { "a" } else { "b" },
                Some(&format!("key-{key}")),
                &format!("{key}/{n}"),
            )
        })
        .collect();
    publish(&publisher, &messages).await;

    // The first consumer leaves after a few messages; the other two finish.
    let mut leaving = consumers.remove(0);
    let mut seen: Vec<String> = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(30);
    while seen.len() < 5 {
        assert!(Instant::now() < give_up);
        for m in leaving
            .fetch(1, Duration::from_millis(100))
            .await
            .expect("fetch")
        {
            seen.push(label(&m));
            m.ack().await.expect("ack");
        }
    }
    drop(leaving);
    let mut handles = Vec::new();
    for mut consumer in consumers {
        handles.push(tokio::spawn(async move {
            let mut labels = Vec::new();
            let give_up = Instant::now() + Duration::from_secs(30);
            let mut idle_since = Instant::now();
            while idle_since.elapsed() < Duration::from_secs(3) {
                assert!(Instant::now() < give_up);
                let batch = consumer
                    .fetch(10, Duration::from_millis(100))
                    .await
                    .expect("fetch");
                if !batch.is_empty() {
                    idle_since = Instant::now();
                }
                for m in batch {
                    labels.push((Instant::now(), label(&m)));
                    m.ack().await.expect("ack");
                }
            }
            labels
        }));
    }
    let mut timed: Vec<(Instant, String)> = Vec::new();
    for handle in handles {
        timed.extend(handle.await.expect("a consumer task"));
    }
    timed.sort();
    seen.extend(timed.into_iter().map(|(_, l)| l));
    assert_eq!(seen.len(), KEYS * PER_KEY, "each message once");
    let mut per_key: Vec<Vec<usize>> = vec![Vec::new(); KEYS];
    for l in &seen {
        let (key, n) = l.split_once('/').expect("a label");
        per_key[key.parse::<usize>().expect("a key")].push(n.parse().expect("a number"));
    }
    for (key, numbers) in per_key.iter().enumerate() {
        assert_eq!(numbers, &(0..PER_KEY).collect::<Vec<_>>(), "key {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_removes_only_what_every_group_acknowledged() {
    let server = server().await;
    let redis = connect(&server, |o| o.partitions(1).trim_acknowledged(true)).await;
    let slow = redis
        .subscribe(&Subscription::new("slow", ["events"]))
        .await
        .expect("subscribe");
    let mut fast = redis
        .subscribe(&Subscription::new("fast", ["events"]))
        .await
        .expect("subscribe");
    let messages: Vec<Outgoing> = (0..20)
        .map(|i| message("events", Some("k"), &i.to_string()))
        .collect();
    publish(&redis, &messages).await;
    let mut conn = raw(&redis).await;
    let len = |mut conn: ConnectionManager| async move {
        redis::cmd("XLEN")
            .arg("inseam:stream:0")
            .query_async::<u64>(&mut conn)
            .await
            .expect("XLEN")
    };
    assert_eq!(
        consume(&mut *fast, 20, Duration::from_millis(1500))
            .await
            .len(),
        20
    );
    // The slow group read nothing: nothing goes.
    assert_eq!(len(conn.clone()).await, 20);

    let mut slow = slow;
    let labels = consume(&mut *slow, 20, Duration::from_millis(1500)).await;
    assert_eq!(labels.len(), 20);
    // Both acknowledged everything: all but the last delivered entry go.
    let give_up = Instant::now() + Duration::from_secs(10);
    while len(conn.clone()).await > 1 {
        assert!(Instant::now() < give_up, "the stream was not trimmed");
        publish(&redis, &[message("events", Some("k"), "more")]).await;
        let _ = consume(&mut *fast, 1, Duration::ZERO).await;
        let _ = consume(&mut *slow, 1, Duration::from_millis(1100)).await;
    }
    let _: () = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .expect("PING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_that_are_not_inseams_are_skipped() {
    let server = server().await;
    let redis = connect(&server, |o| o.partitions(1)).await;
    let mut conn = raw(&redis).await;
    let mut consumer = redis
        .subscribe(&Subscription::new("g", ["events"]))
        .await
        .expect("subscribe");
    let _: String = redis::cmd("XADD")
        .arg("inseam:stream:0")
        .arg("*")
        .arg("foreign")
        .arg("entry")
        .query_async(&mut conn)
        .await
        .expect("XADD");
    publish(
        &redis,
        &[
            message("other", Some("k"), "other"),
            message("events", Some("k"), "ours"),
        ],
    )
    .await;
    let labels = consume(&mut *consumer, 1, Duration::from_millis(500)).await;
    assert_eq!(labels, ["ours"]);
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg("inseam:stream:0")
        .arg("g")
        .query_async(&mut conn)
        .await
        .expect("XPENDING");
    let redis::Value::Array(summary) = pending else {
        panic!("XPENDING answered {pending:?}");
    };
    assert_eq!(
        summary.first(),
        Some(&redis::Value::Int(0)),
        "nothing left pending"
    );
}

async fn request(
    redis: &Redis,
    channel: &str,
    question: &str,
    timeout: Duration,
) -> Result<String, inseam_core::transport::TransportError> {
    redis
        .request(channel, Bytes::from(question.to_owned()), timeout)
        .await
        .map(|answer| String::from_utf8_lossy(&answer).into_owned())
}

/// A server that stops waiting for requests (its `next` cancelled) leaves the request it had
/// popped to another server; a server that went away is no longer sent requests; a request
/// whose sender gave up is not handed to a server that starts afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_to_a_waiting_server_and_never_to_a_gone_one() {
    let server = server().await;
    let requester = connect(&server, |o| o).await;
    let serving = connect(&server, |o| o).await;

    // Nobody serves: refused at once, as transient.
    let started = Instant::now();
    let err = request(&requester, "ask", "q0", Duration::from_secs(5))
        .await
        .expect_err("nobody serves");
    assert!(err.transient);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // A server whose `next` is cancelled after it popped nothing yet, then another that
    // answers: the request reaches the one that waits.
    let mut impatient = serving.serve("ask").await.expect("serve");
    let _ = tokio::time::timeout(Duration::from_millis(200), impatient.next()).await;
    let mut patient = serving.serve("ask").await.expect("serve");
    let answering = tokio::spawn(async move {
        let request = patient.next().await.expect("a request");
        let question = String::from_utf8_lossy(&request.payload).into_owned();
        request
            .responder
            .respond(Bytes::from(format!("{question}!")))
            .await
            .expect("respond");
        patient
    });
    assert_eq!(
        request(&requester, "ask", "q1", Duration::from_secs(10))
            .await
            .expect("an answer"),
        "q1!"
    );
    let patient = answering.await.expect("the answering task");

    // Both servers gone: refused again (they leave the channel's servers when dropped).
    drop(impatient);
    drop(patient);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let err = request(&requester, "ask", "q2", Duration::from_secs(5))
        .await
        .expect_err("nobody serves any more");
    assert!(err.transient);

    // A request that timed out while its only server did not take it is not handed to a
    // server that comes later.
    let _silent = serving.serve("late").await.expect("serve");
    let err = request(&requester, "late", "stale", Duration::from_millis(300))
        .await
        .expect_err("nobody answers");
    assert!(err.transient);
    let mut late = serving.serve("late").await.expect("serve");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let asking = tokio::spawn({
        let requester = requester.clone();
        async move { request(&requester, "late", "fresh", Duration::from_secs(10)).await }
    });
    let first = tokio::time::timeout(Duration::from_secs(5), late.next())
        .await
        .expect("a request came")
        .expect("a request");
    assert_eq!(
        &first.payload[..],
        b"fresh",
        "the stale request was dropped"
    );
    first
        .responder
        .respond(Bytes::from_static(b"ok"))
        .await
        .expect("respond");
    assert_eq!(
        asking.await.expect("the asking task").expect("an answer"),
        "ok"
    );
}

/// Credentials from the URL reach the server; without them the connection is refused, and
/// neither the options nor the transport show the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_in_the_url_authenticates_and_stays_hidden() {
    let server = server().await;
    let open = connect(&server, |o| o).await;
    let mut conn = raw(&open).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("s3cret-pass")
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET requirepass");
    let port = server
        .url()
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();

    let refused = Redis::connect(&format!("redis://127.0.0.1:{port}")).await;
    assert!(
        matches!(refused, Err(RedisError::Connect { .. })),
        "{refused:?}"
    );

    let options =
        RedisOptions::from_url(&format!("redis://:s3cret-pass@127.0.0.1:{port}")).expect("a URL");
    assert!(!format!("{options:?}").contains("s3cret-pass"));
    let redis = Redis::connect_with(options).await.expect("authenticated");
    assert!(!format!("{redis:?}").contains("s3cret-pass"));
    publish(&redis, &[message("events", Some("k"), "authenticated")]).await;
    let mut consumer = redis
        .subscribe(&Subscription::new("g", ["events"]))
        .await
        .expect("subscribe");
    assert_eq!(
        consume(&mut *consumer, 1, Duration::from_millis(200)).await,
        ["authenticated"]
    );
}

/// A server that lost its data (a restart without persistence) has the group created again
/// by the consumer, which goes on with what is published afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_consumer_group_is_created_again() {
    let server = server().await;
    let redis = connect(&server, |o| o.partitions(1)).await;
    let mut consumer = redis
        .subscribe(&Subscription::new("g", ["events"]))
        .await
        .expect("subscribe");
    publish(&redis, &[message("events", Some("k"), "before")]).await;
    assert_eq!(consume(&mut *consumer, 1, Duration::ZERO).await, ["before"]);
    let mut conn = raw(&redis).await;
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("FLUSHALL");
    // The layout key went too: publishing works again once provisioned.
    redis
        .provision(&["events".to_owned()])
        .await
        .expect("provision");
    publish(&redis, &[message("events", Some("k"), "after")]).await;
    assert_eq!(
        consume(&mut *consumer, 1, Duration::from_millis(300)).await,
        ["after"]
    );
}

/// `max_len` bounds a stream whatever the groups read, at the cost the decision names: a
/// pending message trimmed away is lost to its group (and logged), and the group goes on with
/// what the stream still holds, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_len_bounds_the_stream_and_a_trimmed_pending_message_does_not_stall_the_group() {
    const MORE: usize = 500;
    let server = server().await;
    let redis = connect(&server, |o| o.partitions(1).max_len(10)).await;
    let mut subscription = Subscription::new("g", ["events"]);
    subscription.ack_wait = Duration::from_millis(500);
    {
        let mut dying = redis.subscribe(&subscription).await.expect("subscribe");
        publish(&redis, &[message("events", Some("k"), "first")]).await;
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(Instant::now() < give_up, "the first message did not come");
            let batch = dying
                .fetch(1, Duration::from_millis(100))
                .await
                .expect("fetch");
            if let Some(first) = batch.first() {
                assert_eq!(label(first), "first");
                break;
            }
        }
        // Dropped holding it, unsettled.
    }
    let more: Vec<Outgoing> = (0..MORE)
        .map(|i| message("events", Some("k"), &i.to_string()))
        .collect();
    for chunk in more.chunks(50) {
        publish(&redis, chunk).await;
    }
    let mut conn = raw(&redis).await;
    let len: usize = redis::cmd("XLEN")
        .arg("inseam:stream:0")
        .query_async(&mut conn)
        .await
        .expect("XLEN");
    assert!(len < MORE, "the stream holds {len} entries");

    let mut consumer = redis.subscribe(&subscription).await.expect("subscribe");
    let give_up = Instant::now() + Duration::from_secs(30);
    let mut labels: Vec<String> = Vec::new();
    while labels.last().map(String::as_str) != Some("499") {
        assert!(Instant::now() < give_up, "came: {labels:?}");
        for m in consumer
            .fetch(10, Duration::from_millis(100))
            .await
            .unwrap_or_default()
        {
            labels.push(label(&m));
            m.ack().await.expect("ack");
        }
    }
    assert!(!labels.contains(&"first".to_owned()), "{labels:?}");
    let numbers: Vec<usize> = labels
        .iter()
        .map(|l| l.parse().expect("a number"))
        .collect();
    assert!(numbers.len() < MORE, "{} came", numbers.len());
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "in order: {numbers:?}"
    );
}
