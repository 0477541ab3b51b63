//! What `keep_unsubscribed_events` costs a command, measured on a busy machine: the same
//! command (insert a row, publish an event no group subscribes to) on two apps, one keeping such
//! events and one not, sent in alternating rounds so that the machine's load weighs on both
//! alike; then the space the kept events take.
//!
//! ```sh
//! cargo run --profile bench -p inseam-benches --example unsubscribed_cost [rounds]
//! ```
//!
//! PostgreSQL at `INSEAM_TEST_POSTGRES` (default the local server).

#![allow(clippy::print_stdout)]

use std::time::{Duration, Instant};

use inseam::prelude::*;
use inseam::sql::{Backend as StoreBackend, sqlx};
use inseam_tests::{Backend, TestDb, bank};

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

const PER_ROUND: i64 = 200;

/// The bytes the outbox takes, its indexes included.
async fn outbox_bytes(store: &SqlStore) -> i64 {
    let pool = store.pool();
    match store.backend() {
        StoreBackend::Postgres => {
            sqlx::query_scalar("SELECT pg_total_relation_size('inseam_outbox')")
                .fetch_one(pool.pg().unwrap())
                .await
                .unwrap()
        }
        StoreBackend::Sqlite => sqlx::query_scalar(
            "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name LIKE 'inseam_outbox%'",
        )
        .fetch_one(pool.sqlite().unwrap())
        .await
        .unwrap_or(-1),
    }
}

async fn measure(backend: Backend, rounds: u32) {
    let mut apps = Vec::new();
    let mut dbs = Vec::new();
    for keep in [false, true] {
        let db = TestDb::new(backend, &format!("unsubscribed_cost_{keep}")).await;
        let store = SqlStore::connect(&db.url).await.unwrap();
        bank::create_schema(&store).await.unwrap();
        let builder = App::builder().store(store.clone()).handler::<note>();
        let builder = if keep {
            builder.keep_unsubscribed_events()
        } else {
            builder
        };
        apps.push((builder.build().await.unwrap(), store));
        dbs.push(db);
    }
    let mut seq = 1;
    let mut spent = [Duration::ZERO; 2];
    // One warm-up round each, not counted.
    for round in 0..=rounds {
        for (i, (app, _)) in apps.iter().enumerate() {
            let started = Instant::now();
            for n in 0..PER_ROUND {
                app.send(Note { seq: seq + n }).await.unwrap();
            }
            if round > 0 {
                spent[i] += started.elapsed();
            }
        }
        seq += PER_ROUND;
    }
    let sends = f64::from(rounds) * PER_ROUND as f64;
    let per = |d: Duration| d.as_secs_f64() * 1e6 / sends;
    let (default, kept) = (per(spent[0]), per(spent[1]));
    let events = (i64::from(rounds) + 1) * PER_ROUND;
    let bytes = outbox_bytes(&apps[1].1).await - outbox_bytes(&apps[0].1).await;
    println!(
        "{backend:?}: default {default:.0} µs, kept {kept:.0} µs per command (+{:.0} µs, {:+.0}%); \
         kept outbox: {} bytes for {events} events ({} bytes each)",
        kept - default,
        (kept / default - 1.0) * 100.0,
        bytes,
        bytes / events,
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: u32 = std::env::args()
        .nth(1)
        .map(|n| n.parse().unwrap())
        .unwrap_or(20);
    measure(Backend::Sqlite, rounds).await;
    measure(Backend::Postgres, rounds).await;
}
