//! Relay throughput, commit-to-handler latency and memory, and how they grow with the backlog,
//! the groups, the relay instances and the keys.
//!
//! `cargo bench -p inseam-benches --bench relay -- [CASE..]`, each case
//! `<backend>:<mode>:<events>[:g<groups>][:i<instances>][:k<keys>]`:
//! - backend `pg` (PostgreSQL, `INSEAM_TEST_POSTGRES`) or `sqlite`;
//! - mode `position` (events read by position, decision 0024), `rows` (one delivery row per
//!   event and group, claimed and deleted: the relay before it), or `floor` (PostgreSQL only: a
//!   plain `SELECT .. FOR UPDATE SKIP LOCKED` + `DELETE` loop over a queue table, decoding each
//!   envelope and counting it; no framework, no inbox);
//! - `events` undelivered events preloaded (`10k`, `1M`, ..), `groups` durable groups subscribed
//!   to them (1), `instances` apps with their own relay on the database (1), `keys` distinct keys
//!   (64).
//!
//! Each case preloads the backlog with the relays stopped, starts them and times the drain until
//! every group handled every event (events/s, and the peak RSS growth while draining); then it
//! sends 300 commands one at a time and measures from `send` returning (the commit) to the
//! last group's handler running (p50, p99), over the outbox as the backlog left it. Without
//! cases it runs the set in `docs/benchmarks.md`. `INSEAM_BENCH_CSV=<file>` appends one line per
//! case, which `cargo bench -p inseam-benches --bench relay_plot` draws.

#![allow(clippy::print_stdout)] // a bench binary reports on stdout

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use inseam::prelude::*;
use inseam::sql::{RelayOptions, SqlStoreOptions, sqlx};
use inseam_tests::TestDb;
use sqlx::Row as _;

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "bench.ticked", key = k)]
struct Ticked {
    k: String,
    n: u64,
}

#[derive(Debug, Command)]
#[command(output = ())]
struct Tick(u64);

#[command_handler]
async fn tick(cmd: Tick, ctx: &mut CommandContext<'_>) -> Result<(), std::convert::Infallible> {
    ctx.publish(Ticked {
        k: format!("k{}", cmd.0 % 64),
        n: cmd.0,
    });
    Ok(())
}

/// Handler runs per group, and the time of the last one; `ran` wakes whoever waits for one.
#[derive(Debug, Clone)]
struct Seen {
    count: Arc<[AtomicU64; 16]>,
    last: Arc<std::sync::Mutex<Option<Instant>>>,
    ran: Arc<tokio::sync::Notify>,
}

impl Seen {
    fn new() -> Self {
        Seen {
            count: Arc::new(std::array::from_fn(|_| AtomicU64::new(0))),
            last: Arc::default(),
            ran: Arc::default(),
        }
    }

    fn saw(&self, group: usize) {
        self.count[group].fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last.lock() {
            *last = Some(Instant::now());
        }
        self.ran.notify_one();
    }

    fn min(&self, groups: usize) -> u64 {
        self.count[..groups]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    }
}

macro_rules! groups {
    ($($index:literal $name:ident $group:tt),*) => {
        $(
            #[event_handler(group = $group)]
            async fn $name(ev: &Ticked, State(seen): State<Seen>) {
                std::hint::black_box(ev.n);
                seen.saw($index);
            }
        )*
        const GROUPS: [&str; 16] = [$($group),*];
        fn register(builder: inseam::AppBuilder, groups: usize) -> inseam::AppBuilder {
            let mut builder = builder;
            $(
                if $index < groups {
                    builder = builder.handler::<$name>();
                }
            )*
            builder
        }
    };
}

groups!(
    0 g0 "bench", 1 g1 "bench_1", 2 g2 "bench_2", 3 g3 "bench_3", 4 g4 "bench_4",
    5 g5 "bench_5", 6 g6 "bench_6", 7 g7 "bench_7", 8 g8 "bench_8", 9 g9 "bench_9",
    10 g10 "bench_10", 11 g11 "bench_11", 12 g12 "bench_12", 13 g13 "bench_13",
    14 g14 "bench_14", 15 g15 "bench_15"
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Position,
    Rows,
    Floor,
}

#[derive(Debug, Clone)]
struct Case {
    postgres: bool,
    mode: Mode,
    events: u64,
    groups: usize,
    instances: usize,
    keys: u64,
}

impl Case {
    fn parse(text: &str) -> Option<Case> {
        let mut parts = text.split(':');
        let postgres = match parts.next()? {
            "pg" => true,
            "sqlite" => false,
            _ => return None,
        };
        let mode = match parts.next()? {
            "position" => Mode::Position,
            "rows" => Mode::Rows,
            "floor" => Mode::Floor,
            _ => return None,
        };
        let events = count(parts.next()?)?;
        let mut case = Case {
            postgres,
            mode,
            events,
            groups: 1,
            instances: 1,
            keys: 64,
        };
        for part in parts {
            let (what, n) = part.split_at(1);
            let n = count(n)?;
            match what {
                "g" => case.groups = usize::try_from(n).ok()?.clamp(1, 16),
                "i" => case.instances = usize::try_from(n).ok()?.max(1),
                "k" => case.keys = n.max(1),
                _ => return None,
            }
        }
        Some(case)
    }

    fn name(&self) -> String {
        format!(
            "{}:{}:{}:g{}:i{}:k{}",
            if self.postgres { "pg" } else { "sqlite" },
            match self.mode {
                Mode::Position => "position",
                Mode::Rows => "rows",
                Mode::Floor => "floor",
            },
            self.events,
            self.groups,
            self.instances,
            self.keys
        )
    }
}

fn count(text: &str) -> Option<u64> {
    let (digits, factor) = match text.as_bytes().last()? {
        b'k' => (&text[..text.len() - 1], 1_000),
        b'M' => (&text[..text.len() - 1], 1_000_000),
        _ => (text, 1),
    };
    digits.parse::<u64>().ok().map(|n| n * factor)
}

const DEFAULT_CASES: &[&str] = &[
    "pg:floor:100k",
    "pg:rows:100k",
    "pg:position:100k",
    "pg:rows:1M",
    "pg:position:1M",
    "pg:position:10k",
    "pg:position:5M",
    "pg:position:100k:g4",
    "pg:position:100k:g16",
    "pg:position:100k:i2",
    "pg:position:100k:i4",
    "pg:position:100k:g4:i2",
    "pg:position:100k:g4:i4",
    "pg:position:100k:k1",
    "pg:position:100k:k10000",
    "sqlite:rows:100k",
    "sqlite:position:100k",
    "sqlite:position:1M",
];

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// One envelope as JSON, with placeholders for the id and the key.
fn template() -> String {
    let bytes = Envelope {
        metadata: inseam::Metadata {
            message_id: uuid::Uuid::nil(),
            correlation_id: uuid::Uuid::nil(),
            causation_id: None,
        },
        key: Some("KEY".to_owned()),
        occurred_at: chrono::Utc::now(),
        source: "bench".into(),
        headers: inseam::Headers::default(),
        payload: Ticked {
            k: "KEY".to_owned(),
            n: 7,
        },
    }
    .to_raw()
    .unwrap()
    .to_json()
    .unwrap();
    String::from_utf8(bytes).unwrap()
}

/// Preloads the case's backlog: outbox rows (listing the groups when read by position) and,
/// for `rows`, a delivery row per event and group.
async fn preload(store: &SqlStore, case: &Case) {
    let groups: Vec<&str> = GROUPS[..case.groups].to_vec();
    let listed = match case.mode {
        Mode::Position => Some(serde_json::to_string(&groups).unwrap()),
        _ => None,
    };
    let sql = if case.postgres {
        "INSERT INTO inseam_outbox (message_id, name, version, msg_key, envelope, created_at, groups)
         SELECT id, 'bench.ticked', 1, k,
                convert_to(replace(replace($1, '00000000-0000-0000-0000-000000000000', id), '\"KEY\"', '\"' || k || '\"'), 'UTF8'), 0, $4
         FROM (SELECT '01900000-0000-7000-8000-' || lpad(to_hex(g), 12, '0') AS id, 'k' || (g % $3) AS k
               FROM generate_series(1, $2) AS g) AS s"
    } else {
        "WITH RECURSIVE s(g) AS (SELECT 1 UNION ALL SELECT g + 1 FROM s WHERE g < $2),
              t AS (SELECT g, '01900000-0000-7000-8000-' || printf('%012x', g) AS id, 'k' || (g % $3) AS k FROM s)
         INSERT INTO inseam_outbox (message_id, name, version, msg_key, envelope, created_at, groups, position)
         SELECT id, 'bench.ticked', 1, k,
                CAST(replace(replace($1, '00000000-0000-0000-0000-000000000000', id), '\"KEY\"', '\"' || k || '\"') AS BLOB), 0, $4,
                (SELECT COALESCE(MAX(position), 0) FROM inseam_outbox) + g
         FROM t"
    };
    sqlx::query(sql)
        .bind(template())
        .bind(case.events as i64)
        .bind(case.keys as i64)
        .bind(listed)
        .execute(store.pool())
        .await
        .unwrap();
    if case.mode == Mode::Rows {
        for group in &groups {
            sqlx::query(
                "INSERT INTO inseam_deliveries (grp, message_id, msg_key, deliver_at, enqueued_at)
                 SELECT $1, message_id, msg_key, 0, 0 FROM inseam_outbox WHERE created_at = 0",
            )
            .bind(*group)
            .execute(store.pool())
            .await
            .unwrap();
        }
    }
    if case.postgres {
        sqlx::query("ANALYZE").execute(store.pool()).await.unwrap();
    }
}

struct Figures {
    events_per_s: f64,
    rss_growth_mib: u64,
    p50: Duration,
    p99: Duration,
}

async fn run(case: &Case) -> Figures {
    let db = if case.postgres {
        TestDb::postgres("bench_relay").await
    } else {
        TestDb::sqlite()
    };
    if case.mode == Mode::Floor {
        return floor(&db, case).await;
    }
    let seen = Seen::new();
    let mut instances = Vec::new();
    for _ in 0..case.instances {
        let options = SqlStoreOptions::new().relay(RelayOptions {
            read_by_position: case.mode == Mode::Position,
            ..RelayOptions::default()
        });
        let store = SqlStore::connect_with(&db.url, options).await.unwrap();
        let builder = App::builder()
            .store(store.clone())
            .state(seen.clone())
            .handler::<tick>();
        let app = register(builder, case.groups).build().await.unwrap();
        instances.push((store, app));
    }
    let (store, app) = instances[0].clone();
    // The groups' cursors, as the first event written makes them.
    app.send(Tick(0)).await.unwrap();
    store.deliver_due(&app).await.unwrap();
    preload(&store, case).await;
    let base = seen.min(case.groups);
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = peak_rss_kib();
    let start = Instant::now();
    let relays: Vec<_> = instances.iter().map(|(_, app)| app.start()).collect();
    while seen.min(case.groups) < base + case.events {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = start.elapsed();
    let rss_growth_mib = peak_rss_kib().saturating_sub(rss_before) / 1024;
    // Latency at a steady state over the outbox the backlog left.
    let mut latencies = Vec::new();
    for n in 0..300u64 {
        let target = seen.min(case.groups) + 1;
        app.send(Tick(n)).await.unwrap();
        let committed = Instant::now();
        // Waits without spinning: a spinning task would take one of the two cores from the
        // relay and the database.
        while seen.min(case.groups) < target {
            seen.ran.notified().await;
        }
        let handled = seen.last.lock().unwrap().unwrap_or(committed);
        latencies.push(handled.saturating_duration_since(committed));
    }
    latencies.sort_unstable();
    for relay in relays {
        relay.shutdown().await;
    }
    Figures {
        events_per_s: case.events as f64 * case.groups as f64 / elapsed.as_secs_f64(),
        rss_growth_mib,
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
    }
}

/// The floor of the claim-and-delete design: a queue table, `FOR UPDATE SKIP LOCKED` in batches
/// of 1,000, each envelope decoded and counted, the batch deleted, committed.
async fn floor(db: &TestDb, case: &Case) -> Figures {
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    sqlx::query("CREATE TABLE queue (id BIGSERIAL PRIMARY KEY, envelope BYTEA NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO queue (envelope)
         SELECT convert_to(replace(replace($1, '00000000-0000-0000-0000-000000000000',
                '01900000-0000-7000-8000-' || lpad(to_hex(g), 12, '0')), '\"KEY\"', '\"k' || (g % $3) || '\"'), 'UTF8')
         FROM generate_series(1, $2) AS g",
    )
    .bind(template())
    .bind(case.events as i64)
    .bind(case.keys as i64)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE queue").execute(&pool).await.unwrap();
    let start = Instant::now();
    let mut handled = 0u64;
    while handled < case.events {
        let mut tx = pool.begin().await.unwrap();
        let rows = sqlx::query(
            "SELECT id, envelope FROM queue ORDER BY id LIMIT 1000 FOR UPDATE SKIP LOCKED",
        )
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let bytes: Vec<u8> = row.get(1);
            let raw = inseam::RawEnvelope::from_json(&bytes).unwrap();
            std::hint::black_box(raw.decode::<Ticked>().unwrap().n);
            ids.push(row.get::<i64, _>(0));
        }
        sqlx::query("DELETE FROM queue WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        handled += rows.len() as u64;
    }
    let elapsed = start.elapsed();
    Figures {
        events_per_s: case.events as f64 / elapsed.as_secs_f64(),
        rss_growth_mib: 0,
        p50: Duration::ZERO,
        p99: Duration::ZERO,
    }
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
    let texts: Vec<String> = if args.is_empty() {
        DEFAULT_CASES.iter().map(|s| (*s).to_owned()).collect()
    } else {
        args
    };
    let csv = std::env::var("INSEAM_BENCH_CSV").ok();
    println!(
        "| case | events/s | RSS growth | commit-to-handler p50 | p99 |\n|---|---|---|---|---|"
    );
    for text in texts {
        let Some(case) = Case::parse(&text) else {
            eprintln!("not a case: `{text}` (see the bench's docs)");
            std::process::exit(2);
        };
        let figures = run(&case).await;
        let latency = |d: Duration| {
            if case.mode == Mode::Floor {
                "-".to_owned()
            } else {
                format!("{:.2} ms", d.as_secs_f64() * 1e3)
            }
        };
        println!(
            "| {} | {:.0} | {} MiB | {} | {} |",
            case.name(),
            figures.events_per_s,
            figures.rss_growth_mib,
            latency(figures.p50),
            latency(figures.p99)
        );
        if let Some(path) = &csv {
            use std::io::Write as _;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap();
            writeln!(
                file,
                "{},{},{},{},{},{},{:.0},{:.3}",
                if case.postgres { "pg" } else { "sqlite" },
                case.name().split(':').nth(1).unwrap_or_default(),
                case.events,
                case.groups,
                case.instances,
                case.keys,
                figures.events_per_s,
                figures.p99.as_secs_f64() * 1e3
            )
            .unwrap();
        }
    }
}
