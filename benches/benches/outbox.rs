//! Command + outbox write: `send` of a command whose handler inserts a row through `ctx.tx()`
//! and publishes an event for two groups, against the same rows inserted with bare sqlx (the
//! native driver) in the same transaction pattern, on SQLite and PostgreSQL, in one run.
//!
//! The `unsubscribed_event` group measures what `keep_unsubscribed_events` costs: a command
//! whose handler inserts a row and publishes an event that no group subscribes to, by default
//! (nothing is stored for the event) and with the option (an outbox row without deliveries).
//!
//! Run with `cargo bench -p inseam-benches --bench outbox` (PostgreSQL at
//! `INSEAM_TEST_POSTGRES`, default the local server).

use std::sync::atomic::{AtomicI64, Ordering};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use inseam::prelude::*;
use inseam::sql::{Backend as StoreBackend, sqlx};
use inseam_tests::bank::{self, Deposit, Faults};
use inseam_tests::{Backend, TestDb};

fn envelope_json(seq: i64, account: &str) -> (String, Vec<u8>) {
    let envelope = bank::deposited(seq, account);
    let id = envelope.metadata.message_id.to_string();
    let json = envelope
        .to_raw()
        .and_then(|raw| {
            raw.to_json().map_err(|e| inseam::CodecError {
                content_type: "application/json",
                source: e.into(),
            })
        })
        .unwrap_or_default();
    (id, json)
}

const DEPOSIT: &str = "INSERT INTO bank_deposits (seq, account, amount) VALUES ($1, $2, $3)";
const OUTBOX: &str = "INSERT INTO inseam_outbox (message_id, name, version, msg_key, envelope, created_at) VALUES ($1, $2, $3, $4, $5, $6)";
const DELIVERIES: &str = "INSERT INTO inseam_deliveries (grp, message_id, msg_key, deliver_at, enqueued_at) VALUES ($1, $2, $3, $4, $4), ($5, $2, $3, $4, $4)";

macro_rules! bare_command {
    ($tx:expr, $seq:expr) => {{
        let seq: i64 = $seq;
        let account = format!("acct-{}", seq % 8);
        let (id, json) = envelope_json(seq, &account);
        let now = chrono::Utc::now().timestamp_micros();
        sqlx::query(DEPOSIT)
            .bind(seq)
            .bind(&account)
            .bind(1_i64)
            .execute(&mut *$tx)
            .await
            .unwrap();
        sqlx::query(OUTBOX)
            .bind(&id)
            .bind("bank.deposited")
            .bind(1_i64)
            .bind(&account)
            .bind(json)
            .bind(now)
            .execute(&mut *$tx)
            .await
            .unwrap();
        sqlx::query(DELIVERIES)
            .bind("ledger")
            .bind(&id)
            .bind(&account)
            .bind(now)
            .bind("audit")
            .execute(&mut *$tx)
            .await
            .unwrap();
    }};
}

fn outbox(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("command_with_outbox");
    group.throughput(Throughput::Elements(1));
    group.sample_size(30);
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let db = rt.block_on(TestDb::new(backend, "bench_outbox"));
        let store = rt.block_on(async {
            let store = SqlStore::connect(&db.url).await.unwrap();
            bank::create_schema(&store).await.unwrap();
            store
        });
        let app = rt
            .block_on(bank::app(store.clone(), Faults::default()))
            .unwrap();
        let seq = AtomicI64::new(1);
        let name = format!("{backend:?}").to_lowercase();
        match store.backend() {
            StoreBackend::Sqlite => {
                let pool = rt
                    .block_on(sqlx::sqlite::SqlitePool::connect(&format!(
                        "{}?mode=rwc",
                        db.url
                    )))
                    .unwrap();
                rt.block_on(async {
                    sqlx::query("PRAGMA journal_mode = WAL")
                        .execute(&pool)
                        .await
                        .unwrap();
                });
                group.bench_function(BenchmarkId::new("bare_sqlx", &name), |b| {
                    b.to_async(&rt).iter(|| async {
                        let mut conn = pool.acquire().await.unwrap();
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await
                            .unwrap();
                        let mut tx = sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE")
                            .await
                            .unwrap();
                        bare_command!(tx, seq.fetch_add(1, Ordering::Relaxed));
                        tx.commit().await.unwrap();
                    })
                });
            }
            StoreBackend::Postgres => {
                let pool = rt
                    .block_on(sqlx::postgres::PgPool::connect(&db.url))
                    .unwrap();
                group.bench_function(BenchmarkId::new("bare_sqlx", &name), |b| {
                    b.to_async(&rt).iter(|| async {
                        let mut tx = pool.begin().await.unwrap();
                        bare_command!(tx, seq.fetch_add(1, Ordering::Relaxed));
                        tx.commit().await.unwrap();
                    })
                });
            }
        }
        group.bench_function(BenchmarkId::new("inseam_send", &name), |b| {
            b.to_async(&rt).iter(|| async {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                app.send(Deposit {
                    account: format!("acct-{}", n % 8),
                    amount: 1,
                    seq: n,
                })
                .await
                .unwrap()
            })
        });
    }
    group.finish();
}

/// Records a note; nothing subscribes to what it publishes.
#[derive(Debug, Command)]
#[command(output = i64, error = sqlx::Error, name = "bench.note")]
struct Note {
    seq: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "bench.noted", key = account)]
struct Noted {
    account: String,
    seq: i64,
}

#[command_handler(publishes(Noted))]
async fn note(cmd: Note, ctx: &mut CommandContext<'_>) -> Result<i64, sqlx::Error> {
    let account = format!("acct-{}", cmd.seq % 8);
    sqlx::query("INSERT INTO bank_deposits (seq, account, amount) VALUES ($1, $2, $3)")
        .bind(cmd.seq)
        .bind(account.clone())
        .bind(1_i64)
        .execute(ctx.tx().await?)
        .await?;
    ctx.publish(Noted {
        account,
        seq: cmd.seq,
    });
    Ok(cmd.seq)
}

fn unsubscribed_event(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("unsubscribed_event");
    group.throughput(Throughput::Elements(1));
    group.sample_size(30);
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let name = format!("{backend:?}").to_lowercase();
        for keep in [false, true] {
            let id = if keep { "kept" } else { "default" };
            let db = rt.block_on(TestDb::new(backend, &format!("bench_unsubscribed_{id}")));
            let store = rt.block_on(async {
                let store = SqlStore::connect(&db.url).await.unwrap();
                bank::create_schema(&store).await.unwrap();
                store
            });
            let builder = App::builder().store(store).handler::<note>();
            let builder = if keep {
                builder.keep_unsubscribed_events()
            } else {
                builder
            };
            let app = rt.block_on(builder.build()).unwrap();
            let seq = AtomicI64::new(1);
            group.bench_function(BenchmarkId::new(id, &name), |b| {
                b.to_async(&rt).iter(|| async {
                    app.send(Note {
                        seq: seq.fetch_add(1, Ordering::Relaxed),
                    })
                    .await
                    .unwrap()
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, outbox, unsubscribed_event);
criterion_main!(benches);
