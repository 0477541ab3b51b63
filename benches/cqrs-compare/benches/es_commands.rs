//! Event-sourced command throughput: load a cart from its events, decide, append one event,
//! commit; inseam on PostgreSQL and on SQLite against cqrs-es with postgres-es on PostgreSQL,
//! in one process.
//!
//! `cargo bench --manifest-path benches/cqrs-compare/Cargo.toml` from the repository root
//! (PostgreSQL at `INSEAM_TEST_POSTGRES`, default `postgres://postgres@127.0.0.1:5432`, trust
//! auth). Each side gets a warm-up, then `INSEAM_BENCH_ROUNDS` rounds (default 5) of
//! `INSEAM_BENCH_CARTS` fresh carts (default 1,000) × `INSEAM_BENCH_COMMANDS` `AddItem`
//! commands each (default 10), sent one at a time. A round is made of passes, one `AddItem` to
//! every cart; the sides take turns pass by pass, in an order that rotates, so that all of them
//! meet the same machine within seconds of each other. The report gives every round's
//! commands/s, the median, and the ratios per round.
//!
//! A fifth side is no framework at all: one `INSERT` of the event row per command, in its own
//! implicit transaction, through bare sqlx on a pool, with no read. It is the floor of any
//! design that commits each command on its own: what one durable commit costs on this server.
//! A sixth is the same on a pool that does not ping a connection before handing it out (sqlx
//! pings by default; inseam's pool pings only a connection idle for over a second). Every
//! inseam side is also given over each floor.
//!
//! `INSEAM_BENCH_SIDES=cache,floor` runs only the sides whose name contains one of those words
//! (and cqrs-es, the reference of the ratios), to profile them alone.
//!
//! `INSEAM_BENCH_SYNCHRONOUS_COMMIT=off` sets that on the benchmark's PostgreSQL databases (not
//! the server), to see the cost of each side without waiting for the WAL flush at commit.

#![allow(clippy::print_stdout)] // a bench binary reports on stdout

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use inseam::prelude::*;
use inseam::sql::sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use inseam::sql::sqlx::{self, AssertSqlSafe, Connection as _, Executor as _};
use inseam_cqrs_compare::on_cqrs_es::{self, CartCommand};
use inseam_cqrs_compare::on_inseam::{self, AddItem, Cart};
use postgres_es::PostgresCqrs;

const WARM_UP_CARTS: usize = 100;

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

enum Target {
    Inseam(App),
    CqrsEs(Box<PostgresCqrs<on_cqrs_es::Cart>>),
    /// One bare `INSERT` per command; the next version of each cart is counted here.
    Floor(PgPool, Mutex<HashMap<String, i64>>),
}

/// The floor side's table: an event row with the same unique stream position as the others.
const FLOOR_SCHEMA: &str = "CREATE TABLE floor_events (
    stream TEXT NOT NULL,
    version BIGINT NOT NULL,
    payload JSONB NOT NULL,
    PRIMARY KEY (stream, version)
)";

const PLAIN: &str = "inseam, PostgreSQL";
const SUBSCRIBED: &str = "inseam, PostgreSQL, 1 group subscribed";
const CACHED: &str = "inseam, PostgreSQL, aggregate cache";
const FLOOR: &str = "floor: one bare INSERT, PostgreSQL";
const FLOOR_UNPINGED: &str = "floor, no ping before acquire";

struct Side {
    name: &'static str,
    target: Target,
    /// Commands per second of each round.
    rounds: Vec<f64>,
}

impl Side {
    async fn add_item(&self, cart: &str, sku: &str) {
        match &self.target {
            Target::Inseam(app) => {
                app.send(AddItem {
                    cart: cart.to_owned(),
                    sku: sku.to_owned(),
                    qty: 1,
                    unit_price: 250,
                })
                .await
                .unwrap_or_else(|e| panic!("{}: add to {cart}: {e}", self.name));
            }
            Target::Floor(pool, versions) => {
                let version = {
                    let mut versions = versions.lock().unwrap_or_else(|p| p.into_inner());
                    let next = versions.entry(cart.to_owned()).or_insert(0);
                    *next += 1;
                    *next
                };
                let payload = format!(r#"{{"sku":"{sku}","qty":1,"unit_price":250}}"#);
                sqlx::query(
                    "INSERT INTO floor_events (stream, version, payload) VALUES ($1, $2, $3::jsonb)",
                )
                .bind(cart)
                .bind(version)
                .bind(payload)
                .execute(pool)
                .await
                .unwrap_or_else(|e| panic!("{}: add to {cart}: {e}", self.name));
            }
            Target::CqrsEs(cqrs) => {
                cqrs.execute(
                    cart,
                    CartCommand::AddItem {
                        sku: sku.to_owned(),
                        qty: 1,
                        unit_price: 250,
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("{}: add to {cart}: {e}", self.name));
            }
        }
    }

    /// One pass: an `AddItem` to each cart of `ids`, by `clients` concurrent clients that each
    /// take every `clients`-th cart in order; returns the time it took.
    async fn pass(&self, ids: &[String], sku: &str, clients: usize) -> Duration {
        let start = Instant::now();
        let client = |first: usize| async move {
            for id in ids.iter().skip(first).step_by(clients) {
                self.add_item(id, sku).await;
            }
        };
        futures::future::join_all((0..clients).map(client)).await;
        start.elapsed()
    }

    fn median(&self) -> f64 {
        let mut sorted = self.rounds.clone();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        }
    }
}

/// `side` over `reference`: the medians' ratio and each round's.
fn print_ratio(side: &Side, reference: &Side) {
    let per_round: Vec<String> = side
        .rounds
        .iter()
        .zip(&reference.rounds)
        .map(|(a, b)| format!("{:.2}", a / b))
        .collect();
    println!(
        "{} / {}: {:.2}x (medians; per round {})",
        side.name,
        reference.name,
        side.median() / reference.median(),
        per_round.join(", ")
    );
}

async fn count(conn: &mut PgConnection, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn run() {
    let carts = setting("INSEAM_BENCH_CARTS", 1_000);
    let commands = setting("INSEAM_BENCH_COMMANDS", 10);
    let rounds = setting("INSEAM_BENCH_ROUNDS", 5).max(1);
    let clients = setting("INSEAM_BENCH_CLIENTS", 1).max(1);
    let synchronous_commit = std::env::var("INSEAM_BENCH_SYNCHRONOUS_COMMIT").ok();
    let server = std::env::var("INSEAM_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());

    let mut admin = PgConnection::connect(&format!("{server}/postgres"))
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL at {server}: {e}"));
    let base = format!("inseam_cqrs_bench_{}", std::process::id());
    let databases = [
        format!("{base}_inseam"),
        format!("{base}_inseam_group"),
        format!("{base}_cqrs"),
        format!("{base}_floor"),
        format!("{base}_inseam_cached"),
        format!("{base}_floor_unpinged"),
    ];
    for db in &databases {
        admin
            .execute(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
            )))
            .await
            .expect("drop an old database");
        admin
            .execute(AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .await
            .expect("create a database");
        if let Some(value) = &synchronous_commit {
            admin
                .execute(AssertSqlSafe(format!(
                    "ALTER DATABASE {db} SET synchronous_commit = '{}'",
                    value.replace('\'', "")
                )))
                .await
                .expect("set synchronous_commit on a database");
        }
    }
    let url = |db: &str| format!("{server}/{db}");
    let sqlite_dir = tempfile::tempdir().expect("a temporary directory");
    let sqlite_url = format!("sqlite://{}", sqlite_dir.path().join("inseam.db").display());

    #[derive(Clone, Copy)]
    enum Variant {
        Plain,
        Subscribed,
        Cached,
    }
    let inseam_app = |url: String, variant: Variant| async move {
        let store = SqlStore::connect(&url).await.expect("connect the store");
        let builder = match variant {
            Variant::Plain => on_inseam::app(store),
            Variant::Subscribed => on_inseam::app_with_subscriber(store),
            Variant::Cached => on_inseam::app_cached(store, carts + WARM_UP_CARTS),
        };
        builder.build().await.expect("build the app")
    };
    let cqrs_url = url(&databases[2]);
    let mut cqrs_conn = PgConnection::connect(&cqrs_url)
        .await
        .expect("connect to the cqrs-es database");
    cqrs_conn
        .execute(on_cqrs_es::SCHEMA)
        .await
        .expect("create the events table");

    let floor_url = url(&databases[3]);
    let floor_pool = PgPoolOptions::new()
        .max_connections(10)
        .connect(&floor_url)
        .await
        .expect("connect to the floor database");
    floor_pool
        .execute(FLOOR_SCHEMA)
        .await
        .expect("create the floor table");
    // The same floor on a pool that does not ping a connection before handing it out, as
    // inseam's pool does not when the connection was back within a second (decision 0028).
    let unpinged_pool = PgPoolOptions::new()
        .max_connections(10)
        .test_before_acquire(false)
        .connect(&url(&databases[5]))
        .await
        .expect("connect to the second floor database");
    unpinged_pool
        .execute(FLOOR_SCHEMA)
        .await
        .expect("create the second floor table");

    // The relay is not started: nothing here measures delivery. With the group subscribed, each
    // outbox row names it (the group reads the outbox by position, decision 0024).
    let mut sides = vec![
        Side {
            name: PLAIN,
            target: Target::Inseam(inseam_app(url(&databases[0]), Variant::Plain).await),
            rounds: Vec::new(),
        },
        Side {
            name: SUBSCRIBED,
            target: Target::Inseam(inseam_app(url(&databases[1]), Variant::Subscribed).await),
            rounds: Vec::new(),
        },
        Side {
            name: "inseam, SQLite",
            target: Target::Inseam(inseam_app(sqlite_url, Variant::Plain).await),
            rounds: Vec::new(),
        },
        Side {
            name: CACHED,
            target: Target::Inseam(inseam_app(url(&databases[4]), Variant::Cached).await),
            rounds: Vec::new(),
        },
        Side {
            name: "cqrs-es + postgres-es, PostgreSQL",
            target: Target::CqrsEs(Box::new(on_cqrs_es::framework(&cqrs_url).await)),
            rounds: Vec::new(),
        },
        Side {
            name: FLOOR,
            target: Target::Floor(floor_pool.clone(), Mutex::new(HashMap::new())),
            rounds: Vec::new(),
        },
        Side {
            name: FLOOR_UNPINGED,
            target: Target::Floor(unpinged_pool.clone(), Mutex::new(HashMap::new())),
            rounds: Vec::new(),
        },
    ];

    // `INSEAM_BENCH_SIDES=cache,floor` keeps only the sides whose name contains one of the
    // words (for profiling one side); the cqrs-es side stays, as the ratios' reference.
    if let Ok(only) = std::env::var("INSEAM_BENCH_SIDES") {
        let words: Vec<&str> = only.split(',').map(str::trim).collect();
        sides.retain(|side| {
            matches!(side.target, Target::CqrsEs(_)) || words.iter().any(|w| side.name.contains(w))
        });
    }
    let skus = ["tea", "milk", "bread"];
    let carts_named = |prefix: &str, n: usize| -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i}")).collect()
    };
    let warm_up = carts_named("warm-", WARM_UP_CARTS);
    for k in 0..commands {
        for side in &sides {
            side.pass(&warm_up, skus[k % skus.len()], clients).await;
        }
    }
    for round in 0..rounds {
        let ids = carts_named(&format!("r{round}-"), carts);
        let mut elapsed = vec![Duration::ZERO; sides.len()];
        for k in 0..commands {
            for i in 0..sides.len() {
                let at = (i + k + round) % sides.len();
                elapsed[at] += sides[at].pass(&ids, skus[k % skus.len()], clients).await;
            }
        }
        for (side, took) in sides.iter_mut().zip(elapsed) {
            side.rounds
                .push((carts * commands) as f64 / took.as_secs_f64());
        }
    }

    // Every command stored exactly one event, and the carts fold to what was sent.
    let events = ((WARM_UP_CARTS + rounds * carts) * commands) as i64;
    let expected_tea = commands.div_ceil(3) as u32;
    for side in &sides {
        match &side.target {
            Target::Inseam(app) => {
                let cart = app.load::<Cart>("r0-0").await.expect("load a cart");
                assert_eq!(cart.version(), commands as u64, "{}", side.name);
                assert_eq!(cart.0.items["tea"], (expected_tea, 250), "{}", side.name);
            }
            Target::CqrsEs(_) | Target::Floor(..) => {}
        }
    }
    // A side left out stored nothing: its database expects no events.
    let ran = |name: &str| sides.iter().any(|side| side.name == name);
    let events_of = |name: &str| if ran(name) { events } else { 0 };
    let mut conns = Vec::new();
    for db in [&databases[0], &databases[1], &databases[4]] {
        conns.push(PgConnection::connect(&url(db)).await.expect("connect"));
    }
    const STREAM_ROWS: &str = "SELECT count(*) FROM inseam_outbox WHERE stream IS NOT NULL";
    // Rows a group still has to read, and delivery rows (only failures and parked messages
    // have one; nothing was delivered here).
    const FOR_A_GROUP: &str =
        "SELECT count(*) FROM inseam_outbox WHERE stream IS NOT NULL AND groups IS NOT NULL";
    const DELIVERY_ROWS: &str = "SELECT count(*) FROM inseam_deliveries";
    let (plain, subscribed, cached) = (events_of(PLAIN), events_of(SUBSCRIBED), events_of(CACHED));
    assert_eq!(count(&mut conns[0], STREAM_ROWS).await, plain);
    assert_eq!(count(&mut conns[0], FOR_A_GROUP).await, 0);
    assert_eq!(count(&mut conns[1], STREAM_ROWS).await, subscribed);
    assert_eq!(count(&mut conns[1], FOR_A_GROUP).await, subscribed);
    assert_eq!(count(&mut conns[1], DELIVERY_ROWS).await, 0);
    assert_eq!(count(&mut conns[2], STREAM_ROWS).await, cached);
    // Every stream is gapless: its versions are exactly 1..=commands.
    const GAPLESS: &str = "SELECT count(*) FROM (SELECT stream FROM inseam_outbox WHERE stream IS NOT NULL \
         GROUP BY stream HAVING min(stream_version) <> 1 OR max(stream_version) <> count(*)) AS gaps";
    for conn in &mut conns {
        assert_eq!(count(conn, GAPLESS).await, 0);
    }
    assert_eq!(
        count(&mut cqrs_conn, "SELECT count(*) FROM events").await,
        events
    );
    for (pool, name) in [(&floor_pool, FLOOR), (&unpinged_pool, FLOOR_UNPINGED)] {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM floor_events")
            .fetch_one(pool)
            .await
            .expect("count the floor rows");
        assert_eq!(rows, events_of(name), "{name}");
    }
    let tea: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE aggregate_id = 'r0-0' AND payload::text LIKE '%\"tea\"%'",
    )
    .fetch_one(&mut cqrs_conn)
    .await
    .expect("count a cart's events");
    assert_eq!(tea, i64::from(expected_tea));

    let sent_by = if clients == 1 {
        "one at a time".to_owned()
    } else {
        format!("by {clients} concurrent clients, each one command at a time")
    };
    println!(
        "event-sourced AddItem commands, sent {sent_by}: {rounds} round(s) of {carts} carts x \
         {commands} commands (after a warm-up of {WARM_UP_CARTS} carts x {commands}), commands/s"
    );
    if let Some(value) = &synchronous_commit {
        println!("PostgreSQL databases with synchronous_commit = {value}");
    }
    let header: String = (1..=rounds)
        .map(|r| format!("{:>10}", format!("round {r}")))
        .collect();
    println!("{:<40}{header}{:>10}", "side", "median");
    for side in &sides {
        let cells: String = side.rounds.iter().map(|r| format!("{r:>10.0}")).collect();
        println!("{:<40}{cells}{:>10.0}", side.name, side.median());
    }
    let cqrs = sides
        .iter()
        .find(|side| matches!(side.target, Target::CqrsEs(_)))
        .expect("the cqrs-es side");
    for side in sides.iter().filter(|side| !std::ptr::eq(*side, cqrs)) {
        print_ratio(side, cqrs);
    }
    for floor in sides
        .iter()
        .filter(|side| matches!(side.target, Target::Floor(..)))
    {
        for side in sides
            .iter()
            .filter(|side| matches!(side.target, Target::Inseam(_)))
        {
            print_ratio(side, floor);
        }
    }
    println!("verified: {events} events stored on each side, carts fold to what was sent");

    drop(conns);
    drop(cqrs_conn);
    floor_pool.close().await;
    unpinged_pool.close().await;
    drop(sides);
    for db in &databases {
        admin
            .execute(AssertSqlSafe(format!("DROP DATABASE {db} WITH (FORCE)")))
            .await
            .expect("drop a database");
    }
}

fn main() {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(run());
}
