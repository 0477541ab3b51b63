//! Relay throughput, commit-to-handler latency and backlog memory on PostgreSQL.
//!
//! `cargo bench -p inseam-benches --bench relay`. First it sends 2,000 commands one at a time to a running relay and reports the latency from
//! `send` returning (the commit) to the subscriber running, p50 and p99. Then it stops the
//! relay, preloads `INSEAM_BENCH_EVENTS` undelivered events (default 100,000) for the durable
//! group, starts the relay again and reports events/s and the peak RSS while it drains them.

#![allow(clippy::print_stdout)] // a bench binary reports on stdout

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use inseam::prelude::*;
use inseam::sql::{RelayOptions, SqlStoreOptions, sqlx};
use inseam_tests::TestDb;
use tokio::sync::mpsc;

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

#[derive(Debug, Clone)]
struct Seen {
    count: Arc<AtomicU64>,
    at: mpsc::UnboundedSender<Instant>,
}

#[event_handler(group = "bench")]
async fn count(ev: &Ticked, State(seen): State<Seen>) {
    std::hint::black_box(ev.n);
    seen.count.fetch_add(1, Ordering::Relaxed);
    let _ = seen.at.send(Instant::now());
}

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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let events: u64 = std::env::var("INSEAM_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let batch: usize = std::env::var("INSEAM_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    let db = TestDb::postgres("bench_relay").await;
    let options = SqlStoreOptions::new().relay(RelayOptions {
        batch_size: batch,
        ..RelayOptions::default()
    });
    let store = SqlStore::connect_with(&db.url, options).await.unwrap();
    let (at, mut handled_at) = mpsc::unbounded_channel();
    let seen = Seen {
        count: Arc::new(AtomicU64::new(0)),
        at,
    };
    let app = App::builder()
        .store(store.clone())
        .state(seen.clone())
        .handler::<tick>()
        .handler::<count>()
        .build()
        .await
        .unwrap();
    // Latency first, on an empty backlog: the steady state of a relay that keeps up.
    let relay = app.start();
    let mut latencies = Vec::new();
    for n in 0..2_000 {
        app.send(Tick(n)).await.unwrap();
        let committed = Instant::now();
        let handled = handled_at.recv().await.unwrap();
        latencies.push(handled.saturating_duration_since(committed));
    }
    latencies.sort_unstable();
    println!(
        "commit-to-handler latency over {} commands: p50 {:.2?}, p99 {:.2?}, max {:.2?}",
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1]
    );
    relay.shutdown().await;
    seen.count.store(0, Ordering::Relaxed);

    // Preloaded ids are time-ordered like the UUID v7 ids inseam generates.
    let template = Envelope {
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
    let template = String::from_utf8(template).unwrap();
    let loading = Instant::now();
    sqlx::query(
        "INSERT INTO inseam_outbox (message_id, name, version, msg_key, envelope, created_at)
         SELECT id, 'bench.ticked', 1, k,
                convert_to(replace(replace($1, '00000000-0000-0000-0000-000000000000', id), '\"KEY\"', '\"' || k || '\"'), 'UTF8'), 0
         FROM (SELECT '01900000-0000-7000-8000-' || lpad(to_hex(g), 12, '0') AS id, 'k' || (g % 64) AS k FROM generate_series(1, $2) AS g) AS s",
    )
    .bind(template)
    .bind(events as i64)
    .execute(store.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO inseam_deliveries (grp, message_id, msg_key, deliver_at, enqueued_at)
         SELECT 'bench', message_id, msg_key, 0, 0 FROM inseam_outbox WHERE created_at = 0",
    )
    .execute(store.pool())
    .await
    .unwrap();
    eprintln!("preloaded {events} events in {:?}", loading.elapsed());

    // Peak RSS from here on: the relay draining the backlog.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let rss_before = peak_rss_kib();
    let start = Instant::now();
    let relay = app.start();
    while seen.count.load(Ordering::Relaxed) < events {
        tokio::time::sleep(Duration::from_millis(2)).await;
        while handled_at.try_recv().is_ok() {}
    }
    let elapsed = start.elapsed();
    while handled_at.try_recv().is_ok() {}
    println!(
        "relay: {events} events in {elapsed:.2?} = {:.0} events/s (batch {batch}); peak RSS {} MiB (before start {} MiB)",
        events as f64 / elapsed.as_secs_f64(),
        peak_rss_kib() / 1024,
        rss_before / 1024
    );

    relay.shutdown().await;
}
