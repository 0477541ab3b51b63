//! The outbox over each broker: relay throughput against the broker's raw client publishing
//! the same bytes with the same acknowledgements, and the latency from a command's commit to a
//! handler in another process.
//!
//! `cargo bench -p inseam-benches --bench brokers` runs every broker and both parts; arguments
//! choose: `-- nats throughput`, `-- latency`, and so on. Each broker is a server of the
//! bench's own on a free port (`inseam_test_servers`), as in the tests.
//!
//! - **Throughput**: an app whose event goes to a group of another process over the broker's
//!   transport (`Routing`; this is the main process, so it only publishes).
//!   `INSEAM_BENCH_EVENTS` events (default 20,000) are written to the outbox first, then the
//!   relay starts, and the time until it has published them all (their rows deleted: the
//!   transport's lag is 0) gives messages/s. The raw side publishes the same envelope bytes
//!   with the broker's own client, in batches of the relay's batch size (`INSEAM_BENCH_BATCH`,
//!   default 1,000), awaiting every acknowledgement (see each broker's module), before and
//!   after the relay. On SQLite (unless `INSEAM_BENCH_SQLITE=0`), and on PostgreSQL when its
//!   server answers (`INSEAM_TEST_POSTGRES` or the local one; unless `INSEAM_BENCH_POSTGRES=0`).
//!   `INSEAM_BENCH_ROUNDS` (default 1) repeats the whole and reports the median ratio; the
//!   database server's CPU per message (PostgreSQL's processes) is reported beside the relay's.
//! - **Latency**: two apps in this process, each with its own SQLite database and connection:
//!   the main one and the one hosting the group. `INSEAM_BENCH_COMMANDS` commands (default
//!   1,000) are sent one at a time at `INSEAM_BENCH_RATE` a second (default 200); the remote
//!   handler records when it runs. Reported: from `send` returning (the commit) to the handler.
//!
//! `INSEAM_BENCH_TRACE=1` prints the relay's and the transport's spans with their durations;
//! `INSEAM_BENCH_MARK=1` prints the monotonic clock's readings when the relay started and
//! ended (to profile the relay alone: `perf record -k CLOCK_MONOTONIC`, `perf report --time`).

#![allow(clippy::print_stdout)] // a bench binary reports on stdout

mod amqp;
mod kafka;
mod nats;
mod redis;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use inseam::Routing;
use inseam::prelude::*;
use inseam::sql::sqlx::{self, Row as _};
use inseam::sql::{RelayOptions, SqlStoreOptions};
use inseam::transport::Transport;
use inseam_test::TestDatabase;
use inseam_test_servers::Server;
use inseam_tests::brokers::Broker;
use tokio::sync::mpsc;

const CHANNEL: &str = "orders.placed";
const GROUP: &str = "billing.ledger";

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "orders.placed", key = key)]
struct Placed {
    key: String,
    order: u64,
    customer: String,
    total_cents: i64,
    lines: Vec<(String, u32)>,
}

impl Placed {
    fn new(order: u64) -> Self {
        Placed {
            key: format!("customer-{}", order % 64),
            order,
            customer: format!("customer-{}", order % 64),
            total_cents: 1_299 + (order % 100) as i64,
            lines: vec![("tea".to_owned(), 2), ("biscuits".to_owned(), 1)],
        }
    }
}

/// Places `count` orders from `from` in one transaction (filling the outbox).
#[derive(Debug, Command)]
#[command(output = ())]
struct PlaceMany {
    from: u64,
    count: u64,
}

#[command_handler]
async fn place_many(
    cmd: PlaceMany,
    ctx: &mut CommandContext<'_>,
) -> Result<(), std::convert::Infallible> {
    for order in cmd.from..cmd.from + cmd.count {
        ctx.publish(Placed::new(order));
    }
    Ok(())
}

/// Places one order.
#[derive(Debug, Command)]
#[command(output = ())]
struct Place(u64);

#[command_handler]
async fn place(cmd: Place, ctx: &mut CommandContext<'_>) -> Result<(), std::convert::Infallible> {
    ctx.publish(Placed::new(cmd.0));
    Ok(())
}

/// When the remote group ran each order: the instant and the wall-clock age of its envelope.
#[derive(Debug, Clone)]
struct Seen(mpsc::UnboundedSender<(u64, Instant, chrono::Duration)>);

/// The billing module's group: runs in the process that hosts `billing`.
#[event_handler(group = "billing.ledger")]
async fn ledger(ev: &Envelope<Placed>, State(seen): State<Seen>) {
    let age = chrono::Utc::now() - ev.occurred_at;
    let _ = seen.0.send((ev.order, Instant::now(), age));
}

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn routing(broker: Broker) -> Routing {
    Routing::from_toml(&format!(
        "[processes.billing]\ntransport = \"{}\"\nmodules = [\"billing\"]\n",
        broker.name()
    ))
    .unwrap()
}

/// The transport of `broker` connected to `server`, its names (stream, topic, exchange) all
/// in namespace `name`, so that runs do not meet.
async fn transport(broker: Broker, server: &Server, name: &str) -> Arc<dyn Transport> {
    match broker {
        Broker::Nats => nats::transport(server, name).await,
        Broker::Redis => redis::transport(server, name).await,
        Broker::Amqp => amqp::transport(server, name).await,
        Broker::Kafka => kafka::transport(server, name).await,
    }
}

/// The CPU time process `pid` (every thread of it) has used, from `/proc/<pid>/stat` (clock
/// ticks of 10 ms); zero where it cannot be read.
fn cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command's closing parenthesis, from field 3 (state): utime and
    // stime are fields 14 and 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// The CPU time of this process and of the broker's server so far.
fn cpu_now(server: &Server) -> (Duration, Duration) {
    (
        cpu(std::process::id()),
        server.pid().map_or(Duration::ZERO, cpu),
    )
}

/// One side's run: messages/s, and CPU per message in this process (the relay and the
/// database for inseam, the client for raw) and in the broker's server.
#[derive(Debug, Clone, Copy)]
struct Run {
    rate: f64,
    here: Duration,
    broker: Duration,
}

impl Run {
    fn measure(
        events: u64,
        elapsed: Duration,
        before: (Duration, Duration),
        after: (Duration, Duration),
    ) -> Self {
        let per = |d: Duration| d / u32::try_from(events.max(1)).unwrap_or(u32::MAX);
        Run {
            rate: events as f64 / elapsed.as_secs_f64(),
            here: per(after.0.saturating_sub(before.0)),
            broker: per(after.1.saturating_sub(before.1)),
        }
    }
}

/// Publishes `rows` to the channel with `broker`'s own client, as the transport lays them out
/// in namespace `name`, in batches of `batch`, awaiting every acknowledgement; with the
/// transport's deduplication id when `ids`. Timed from the first publish to the last
/// acknowledgement (connecting and creating the broker's channels not counted); CPU counted
/// around the whole call.
async fn raw_publish(
    broker: Broker,
    server: &Server,
    name: &str,
    rows: &[Row],
    batch: usize,
    ids: bool,
) -> Run {
    let cpu_before = cpu_now(server);
    let elapsed = match broker {
        Broker::Nats => nats::publish(server, name, rows, batch, ids).await,
        Broker::Redis => redis::publish(server, name, rows, batch, ids).await,
        Broker::Amqp => amqp::publish(server, name, rows, batch, ids).await,
        Broker::Kafka => kafka::publish(server, name, rows, batch, ids).await,
    };
    let cpu_after = cpu_now(server);
    assert_eq!(
        messages(broker, server, name, rows.len() as u64).await,
        rows.len() as u64
    );
    Run::measure(rows.len() as u64, elapsed, cpu_before, cpu_after)
}

/// How many messages `broker` holds in namespace `name`, where `expected` were published
/// (RabbitMQ counts them in statistics that lag behind).
async fn messages(broker: Broker, server: &Server, name: &str, expected: u64) -> u64 {
    match broker {
        Broker::Nats => nats::messages(server, name).await,
        Broker::Redis => redis::messages(server, name).await,
        Broker::Amqp => amqp::messages(server, name, expected).await,
        Broker::Kafka => kafka::messages(server, name).await,
    }
}

async fn app(
    url: &str,
    transport: Arc<dyn Transport>,
    routing: Routing,
    seen: Seen,
    batch: usize,
) -> (App, SqlStore) {
    let options = SqlStoreOptions::new().relay(RelayOptions {
        batch_size: batch,
        ..RelayOptions::default()
    });
    let store = SqlStore::connect_with(url, options).await.unwrap();
    let app = App::builder()
        .store(store.clone())
        .state(seen)
        .handler::<place_many>()
        .handler::<place>()
        .handler::<ledger>()
        .transport_arc(transport)
        .routing(routing)
        .build()
        .await
        .unwrap();
    (app, store)
}

async fn pending(store: &SqlStore, group: &str) -> i64 {
    store
        .lag()
        .await
        .unwrap()
        .groups
        .iter()
        .find(|g| g.group == group)
        .map_or(0, |g| g.pending)
}

/// A stored message: its id, key and envelope bytes.
type Row = (String, String, Bytes);

/// An app whose outbox holds `events` events for the remote group, its relay not started.
struct Filled {
    app: App,
    store: SqlStore,
    name: String,
    group: String,
    events: u64,
    fill: Duration,
    /// What the relay will publish, in its order: id, key, envelope bytes (for the raw side).
    rows: Vec<Row>,
}

async fn fill(
    broker: Broker,
    server: &Server,
    name: &str,
    url: &str,
    events: u64,
    batch: usize,
) -> Filled {
    let transport = transport(broker, server, name).await;
    let (seen, _unused) = mpsc::unbounded_channel();
    let (app, store) = app(
        url,
        Arc::clone(&transport),
        routing(broker),
        Seen(seen),
        batch,
    )
    .await;
    let group = format!("transport:{}", broker.name());
    assert_eq!(app.groups(), [group.as_str()]);

    let filling = Instant::now();
    let per_command = 100;
    for from in (0..events).step_by(per_command as usize) {
        let count = per_command.min(events - from);
        app.send(PlaceMany { from, count }).await.unwrap();
    }
    let fill = filling.elapsed();
    assert_eq!(pending(&store, &group).await, events as i64);
    let rows: Vec<Row> =
        sqlx::query("SELECT message_id, msg_key, envelope FROM inseam_outbox ORDER BY position")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r.get::<String, _>(0),
                    r.get::<String, _>(1),
                    Bytes::from(r.get::<Vec<u8>, _>(2)),
                )
            })
            .collect();
    assert_eq!(
        rows.len() as u64,
        events,
        "every event's outbox row, for the raw side"
    );
    // The broker's channels exist before the clock starts, as on the raw side.
    transport.provision(&[CHANNEL.to_owned()]).await.unwrap();
    Filled {
        app,
        store,
        name: name.to_owned(),
        group,
        events,
        fill,
        rows,
    }
}

/// Starts the relay and times it publishing everything; returns the run, the time and the
/// database server's CPU per message meanwhile.
async fn drain(broker: Broker, server: &Server, filled: &Filled) -> (Run, Duration, Duration) {
    let Filled { app, store, .. } = filled;
    // The relay counts what the broker acknowledged once the rows are deleted: when the count
    // reaches `events`, the lag is 0 (checked below). Polling `lag()` instead (a `COUNT(*)`
    // over the deliveries every few milliseconds) would take a core from the relay.
    let published = store.relay_stats().published;
    let cpu_before = cpu_now(server);
    let database_before = database_cpu();
    let start = Instant::now();
    let relay = app.start();
    while store.relay_stats().published - published < filled.events {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let drain = start.elapsed();
    if env("INSEAM_BENCH_MARK", 0) == 1 {
        // The monotonic clock's readings (`perf record -k CLOCK_MONOTONIC`, then
        // `perf report --time`), for a profile of the relay alone.
        eprintln!("relay from {start:?} to {:?}", Instant::now());
    }
    let cpu_after = cpu_now(server);
    let database = database_cpu().saturating_sub(database_before)
        / u32::try_from(filled.events.max(1)).unwrap_or(u32::MAX);
    assert_eq!(pending(store, &filled.group).await, 0);
    relay.shutdown().await;
    assert_eq!(
        messages(broker, server, &filled.name, filled.events).await,
        filled.events
    );
    (
        Run::measure(filled.events, drain, cpu_before, cpu_after),
        drain,
        database,
    )
}

/// The CPU time the database's server processes (every process named `postgres`) have used
/// so far; zero for SQLite, whose work is counted in this process.
fn database_cpu() -> Duration {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "postgres")
        })
        .map(cpu)
        .sum()
}

/// Whether the bench has a raw side sending the transport's own headers for `broker`.
fn has_raw_same(broker: Broker) -> bool {
    matches!(broker, Broker::Nats | Broker::Redis)
}

/// Raw publishing with the transport's own headers (NATS and Redis): the same bytes on the
/// wire as the relay's.
async fn raw_same(broker: Broker, server: &Server, name: &str, rows: &[Row], batch: usize) -> Run {
    let cpu_before = cpu_now(server);
    let elapsed = match broker {
        Broker::Redis => redis::publish_as_transport(server, name, rows, batch).await,
        _ => nats::publish_as_transport(server, name, rows, batch).await,
    };
    let same = Run::measure(rows.len() as u64, elapsed, cpu_before, cpu_now(server));
    assert_eq!(
        messages(broker, server, name, rows.len() as u64).await,
        rows.len() as u64
    );
    same
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

async fn throughput(broker: Broker, server: &Server) {
    let events: u64 = env("INSEAM_BENCH_EVENTS", 20_000);
    let batch: usize = env("INSEAM_BENCH_BATCH", 1_000);
    let rounds: usize = env("INSEAM_BENCH_ROUNDS", 1);
    let mut backends = Vec::new();
    if env("INSEAM_BENCH_SQLITE", 1) == 1 {
        backends.push("SQLite");
    }
    if env("INSEAM_BENCH_POSTGRES", 1) == 1 {
        backends.push("PostgreSQL");
    }
    for backend in backends {
        let name = backend.to_lowercase();
        let mut ratios = Vec::new();
        for round in 1..=rounds {
            let name = format!("{name}{round}");
            // A database of the round's own: the outbox of the round before keeps its rows.
            let db = if backend == "SQLite" {
                TestDatabase::sqlite().unwrap()
            } else {
                match TestDatabase::postgres(&format!("bench_{}_{round}", broker.name())).await {
                    Ok(db) => db,
                    Err(error) => {
                        eprintln!("PostgreSQL skipped: {error}");
                        break;
                    }
                }
            };
            let filled = fill(
                broker,
                server,
                &format!("bench_{name}"),
                db.url(),
                events,
                batch,
            )
            .await;
            let rows = &filled.rows;
            let bytes: usize = rows.iter().map(|(_, _, b)| b.len()).sum();
            // The raw sides run before and after the relay, so that both meet the same machine.
            let same_kind = has_raw_same(broker);
            let same_before = if same_kind {
                Some(raw_same(broker, server, &format!("raw_{name}_s1"), rows, batch).await)
            } else {
                None
            };
            let before =
                raw_publish(broker, server, &format!("raw_{name}_1"), rows, batch, true).await;
            let (inseam, took, database) = drain(broker, server, &filled).await;
            let after =
                raw_publish(broker, server, &format!("raw_{name}_2"), rows, batch, true).await;
            let same_after = if same_kind {
                Some(raw_same(broker, server, &format!("raw_{name}_s2"), rows, batch).await)
            } else {
                None
            };
            let bare = raw_publish(
                broker,
                server,
                &format!("raw_{name}_bare"),
                rows,
                batch,
                false,
            )
            .await;
            let raw = (before.rate + after.rate) / 2.0;
            if let (Some(same_before), Some(same_after)) = (same_before, same_after) {
                let same = (same_before.rate + same_after.rate) / 2.0;
                ratios.push(inseam.rate / same);
                println!(
                    "{} throughput {backend}, round {round}: raw with the transport's headers \
                     {:.0} msg/s before, {:.0} after; inseam / that {:.2}x; CPU per message \
                     {:.1?} + {:.1?} and {:.1?} + {:.1?}",
                    broker.name(),
                    same_before.rate,
                    same_after.rate,
                    inseam.rate / same,
                    same_before.here,
                    same_before.broker,
                    same_after.here,
                    same_after.broker,
                );
            } else {
                ratios.push(inseam.rate / raw);
            }
            println!(
                "{} throughput {backend}, round {round}: {events} events ({} bytes each on average), \
                 batch {batch}; outbox filled in {:.2?}; inseam relay {:.0} msg/s ({took:.2?}); \
                 raw with ids {:.0} msg/s before, {:.0} after; raw without headers {:.0} msg/s; \
                 inseam / raw with ids {:.2}x, / raw without headers {:.2}x; \
                 CPU per message, this process + broker (+ database server): inseam {:.1?} + {:.1?} (+ {database:.1?}), \
                 raw with ids {:.1?} + {:.1?} and {:.1?} + {:.1?}",
                broker.name(),
                bytes / rows.len().max(1),
                filled.fill,
                inseam.rate,
                before.rate,
                after.rate,
                bare.rate,
                inseam.rate / raw,
                inseam.rate / bare.rate,
                inseam.here,
                inseam.broker,
                before.here,
                before.broker,
                after.here,
                after.broker,
            );
        }
        if rounds > 1 {
            println!(
                "{} throughput {backend}: median of {rounds} rounds, inseam / raw {} {:.2}x",
                broker.name(),
                if has_raw_same(broker) {
                    "with the transport's headers"
                } else {
                    "with ids"
                },
                median(ratios),
            );
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn latency(broker: Broker, server: &Server) {
    let commands: u64 = env("INSEAM_BENCH_COMMANDS", 1_000);
    let rate: u64 = env("INSEAM_BENCH_RATE", 200);
    let warm_up = 50;
    let main_db = TestDatabase::sqlite().unwrap();
    let billing_db = TestDatabase::sqlite().unwrap();
    let (tx, mut handled) = mpsc::unbounded_channel();
    let (main, _main_store) = app(
        main_db.url(),
        transport(broker, server, "latency").await,
        routing(broker),
        Seen(tx.clone()),
        1_000,
    )
    .await;
    let (billing, _billing_store) = app(
        billing_db.url(),
        transport(broker, server, "latency").await,
        routing(broker).this_process("billing"),
        Seen(tx),
        1_000,
    )
    .await;
    assert!(billing.groups().contains(&GROUP));
    let billing_relay = billing.start();
    let main_relay = main.start();

    // One command crosses first, unmeasured: a consumer of a new group may get its partitions
    // only seconds after it joined (Kafka's group assignment), and the clock is not about that.
    main.send(Place(0)).await.unwrap();
    let (first, ..) = tokio::time::timeout(Duration::from_secs(60), handled.recv())
        .await
        .expect("the first command handled within 60 s")
        .unwrap();
    assert_eq!(first, 0);
    let committed: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let total = warm_up + commands;
    let sender = {
        let committed = Arc::clone(&committed);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for order in 1..=total {
                tick.tick().await;
                main.send(Place(order)).await.unwrap();
                let at = Instant::now();
                committed.lock().unwrap().insert(order, at);
            }
            main
        })
    };
    let mut latencies = Vec::new();
    let mut ages = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60 + total / rate.max(1));
    for _ in 0..total {
        let left = deadline.saturating_duration_since(Instant::now());
        let (order, at, age) = tokio::time::timeout(left, handled.recv())
            .await
            .expect("every command handled in time")
            .unwrap();
        if order <= warm_up {
            continue;
        }
        // The handler may run before `send` returned to the sender task.
        let sent = loop {
            if let Some(sent) = committed.lock().unwrap().get(&order).copied() {
                break sent;
            }
            tokio::task::yield_now().await;
        };
        latencies.push(at.saturating_duration_since(sent));
        ages.push(age.to_std().unwrap_or_default());
    }
    let main = sender.await.unwrap();
    latencies.sort_unstable();
    ages.sort_unstable();
    println!(
        "{} latency over {commands} commands at {rate}/s (after {warm_up} warm-up): commit-to-remote-handler p50 {:.2?}, p99 {:.2?}, max {:.2?}; \
         envelope time to handler p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        broker.name(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1],
        percentile(&ages, 0.50),
        percentile(&ages, 0.99),
        ages[ages.len() - 1],
    );
    main_relay.shutdown().await;
    billing_relay.shutdown().await;
    drop(main);
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    if env("INSEAM_BENCH_TRACE", 0) == 1 {
        tracing_subscriber::fmt()
            .with_env_filter(
                "inseam::relay=info,inseam::transport=debug,inseam::nats=debug,inseam::redis=debug,inseam::amqp=debug",
            )
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_writer(std::io::stderr)
            .init();
    }
    let chosen = |names: &[&str]| -> Vec<String> {
        args.iter()
            .filter(|a| names.contains(&a.as_str()))
            .cloned()
            .collect()
    };
    let names: Vec<&str> = Broker::ALL.iter().map(|b| b.name()).collect();
    let brokers = chosen(&names);
    let parts = chosen(&["throughput", "latency"]);
    for &broker in Broker::ALL {
        if !brokers.is_empty() && !brokers.iter().any(|b| b == broker.name()) {
            continue;
        }
        let server = broker.start();
        if parts.is_empty() || parts.iter().any(|p| p == "throughput") {
            throughput(broker, &server).await;
        }
        if parts.is_empty() || parts.iter().any(|p| p == "latency") {
            latency(broker, &server).await;
        }
    }
}
