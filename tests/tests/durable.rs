//! Durable delivery on real databases: every scenario runs on a SQLite file and on the
//! PostgreSQL server (`INSEAM_TEST_POSTGRES`, default the local one).

use std::time::Duration;

use inseam::prelude::*;
use inseam::sql::sqlx::{self, Row as _};
use inseam::sql::{Error as SqlError, RelayOptions, SqlStoreOptions};
use inseam::store::{OutboxMessage, Store as _};
use inseam_tests::bank::{self, Deposit, Deposited, Faults};
use inseam_tests::{Backend, TestDb, eventually};

const WAIT: Duration = Duration::from_secs(30);

fn fast_relay() -> RelayOptions {
    RelayOptions {
        poll_interval: Duration::from_millis(50),
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..RelayOptions::default()
    }
}

async fn store(db: &TestDb, relay: RelayOptions) -> SqlStore {
    let store = SqlStore::connect_with(&db.url, SqlStoreOptions::new().relay(relay))
        .await
        .expect("connect the store");
    bank::create_schema(&store).await.expect("bank schema");
    store
}

fn deposit(seq: i64, account: &str, amount: i64) -> Deposit {
    Deposit {
        account: account.to_owned(),
        amount,
        seq,
    }
}

async fn sorted_seqs(store: &SqlStore, group: &str) -> Vec<i64> {
    let mut seqs: Vec<i64> = bank::effects(store.pool(), group)
        .await
        .into_iter()
        .map(|(seq, _)| seq)
        .collect();
    seqs.sort_unstable();
    seqs
}

/// Committed deposits reach both groups exactly once; failed ones reach nobody, and their rows
/// and events were rolled back together.
async fn committed_events_reach_every_group_once(backend: Backend) {
    let db = TestDb::new(backend, "committed_once").await;
    let store = store(&db, fast_relay()).await;
    let app = bank::app(store.clone(), Faults::default()).await.unwrap();
    let relay = app.start();
    let mut committed = Vec::new();
    for seq in 1..=60 {
        let amount = if seq % 7 == 0 { -5 } else { 10 };
        let result = app
            .send(deposit(seq, &format!("acct-{}", seq % 5), amount))
            .await;
        match result {
            Ok(got) => {
                assert_eq!(got, seq);
                committed.push(seq);
            }
            Err(error) => assert_eq!(
                error.to_string(),
                "a deposit must be positive, got -5",
                "deposit {seq}"
            ),
        }
    }
    assert_eq!(committed.len(), 52);
    assert_eq!(bank::deposits(store.pool()).await, committed);
    for group in ["ledger", "audit"] {
        eventually(WAIT, group, || async {
            (sorted_seqs(&store, group).await.len() >= committed.len()).then_some(())
        })
        .await;
    }
    relay.shutdown().await;
    for group in ["ledger", "audit"] {
        assert_eq!(sorted_seqs(&store, group).await, committed, "{group}");
    }
    let lag = store.lag().await.unwrap();
    assert!(lag.groups.is_empty(), "{lag:?}");
    assert_eq!(lag.dead_letters, 0);
}

/// Per key, a group sees events in commit order.
async fn same_key_in_commit_order(backend: Backend) {
    let db = TestDb::new(backend, "key_order").await;
    let store = store(&db, fast_relay()).await;
    let app = bank::app(store.clone(), Faults::default()).await.unwrap();
    for seq in 1..=200 {
        app.send(deposit(seq, &format!("acct-{}", seq % 3), 1))
            .await
            .unwrap();
    }
    let relay = app.start();
    eventually(WAIT, "every deposit in the ledger", || async {
        (bank::effects(store.pool(), "ledger").await.len() == 200).then_some(())
    })
    .await;
    relay.shutdown().await;
    let effects = bank::effects(store.pool(), "ledger").await;
    for account in ["acct-0", "acct-1", "acct-2"] {
        let seqs: Vec<i64> = effects
            .iter()
            .filter(|(_, a)| a == account)
            .map(|(s, _)| *s)
            .collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "{account} out of order");
    }
}

/// A poison message is retried, then dead-lettered with its error, while other keys flow; once
/// the fault is fixed and it is retried from the dead letters, it is delivered once.
async fn poison_message(backend: Backend) {
    let db = TestDb::new(backend, "poison").await;
    let relay_options = RelayOptions {
        max_attempts: 3,
        backoff_base: Duration::from_millis(400),
        backoff_max: Duration::from_secs(2),
        poll_interval: Duration::from_millis(50),
        ..RelayOptions::default()
    };
    let store = store(&db, relay_options).await;
    let faults = Faults::default();
    faults.break_account("bad");
    let app = bank::app(store.clone(), faults.clone()).await.unwrap();
    let relay = app.start();
    app.send(deposit(1, "bad", 1)).await.unwrap();
    app.send(deposit(2, "bad", 1)).await.unwrap();
    for seq in 3..=12 {
        app.send(deposit(seq, &format!("good-{seq}"), 1))
            .await
            .unwrap();
    }
    // The other keys flow while the bad one waits for its retries.
    eventually(WAIT, "the good deposits in the ledger", || async {
        (sorted_seqs(&store, "ledger").await == (3..=12).collect::<Vec<_>>()).then_some(())
    })
    .await;
    assert_eq!(store.lag().await.unwrap().dead_letters, 0);
    // Both bad deposits end as dead letters, one after the other (same key, in order).
    let letters = eventually(WAIT, "two dead letters", || async {
        let letters = store.dead_letters(0, 10).await.unwrap();
        (letters.len() == 2).then_some(letters)
    })
    .await;
    for (letter, seq) in letters.iter().zip([1, 2]) {
        assert_eq!(letter.group, "ledger");
        assert_eq!(letter.name, "bank.deposited");
        assert_eq!(letter.version, 1);
        assert_eq!(letter.key.as_deref(), Some("bad"));
        assert_eq!(letter.attempts, 3);
        assert_eq!(
            letter.error,
            "handler `inseam_tests::bank::ledger` failed: ledger unavailable for account bad"
        );
        assert!(letter.first_failed_at < letter.last_failed_at);
        let raw = inseam::RawEnvelope::from_json(&letter.envelope).unwrap();
        assert_eq!(raw.decode::<Deposited>().unwrap().seq, seq);
    }
    assert_eq!(store.relay_stats().retried, 4);
    assert_eq!(store.relay_stats().dead_lettered, 2);
    // The audit group was never held back.
    assert_eq!(
        sorted_seqs(&store, "audit").await,
        (1..=12).collect::<Vec<_>>()
    );
    faults.repair("bad");
    for letter in &letters {
        store.retry_dead_letter(letter.id).await.unwrap();
    }
    eventually(WAIT, "the retried deposits in the ledger", || async {
        (sorted_seqs(&store, "ledger").await.len() == 12).then_some(())
    })
    .await;
    relay.shutdown().await;
    assert_eq!(
        sorted_seqs(&store, "ledger").await,
        (1..=12).collect::<Vec<_>>()
    );
    assert!(store.dead_letters(0, 10).await.unwrap().is_empty());
    let missing = store.retry_dead_letter(letters[0].id).await.unwrap_err();
    assert!(
        matches!(missing, SqlError::DeadLetterNotFound { .. }),
        "{missing}"
    );
    assert_eq!(
        missing.to_string(),
        format!(
            "dead letter {} does not exist (already retried or discarded, or never written)",
            letters[0].id
        )
    );
}

/// Rows that cannot be delivered at all become dead letters at once, with a clear error, and
/// the relay goes on.
async fn bad_rows_are_dead_lettered(backend: Backend) {
    let db = TestDb::new(backend, "bad_rows").await;
    let store = store(&db, fast_relay()).await;
    let app = bank::app(store.clone(), Faults::default()).await.unwrap();
    // An event of a name this build does not know, and one whose payload does not decode.
    let good = bank::deposited(99, "k");
    let mut unknown = good.to_raw().unwrap();
    unknown.name = "bank.withdrawn".to_owned();
    unknown.metadata.message_id = uuid::Uuid::now_v7();
    let mut undecodable = good.to_raw().unwrap();
    undecodable.payload = br#"{"account": 5}"#.to_vec();
    undecodable.metadata.message_id = uuid::Uuid::now_v7();
    let mut uow = store.begin().await.unwrap();
    uow.append(vec![
        OutboxMessage {
            envelope: unknown,
            groups: vec!["ledger"],
            deliver_at: None,
            stream: None,
        },
        OutboxMessage {
            envelope: undecodable,
            groups: vec!["ledger"],
            deliver_at: None,
            stream: None,
        },
        OutboxMessage {
            envelope: good.to_raw().unwrap(),
            groups: vec!["ledger"],
            deliver_at: None,
            stream: None,
        },
    ])
    .await
    .unwrap();
    uow.commit().await.unwrap();
    let relay = app.start();
    let letters = eventually(WAIT, "two dead letters", || async {
        let letters = store.dead_letters(0, 10).await.unwrap();
        (letters.len() == 2).then_some(letters)
    })
    .await;
    eventually(WAIT, "the good event", || async {
        (sorted_seqs(&store, "ledger").await == [99]).then_some(())
    })
    .await;
    relay.shutdown().await;
    assert_eq!(letters[0].attempts, 1);
    assert_eq!(
        letters[0].error,
        "group `ledger` has no subscriber for event `bank.withdrawn` version 1"
    );
    assert_eq!(letters[1].attempts, 1);
    assert!(
        letters[1].error.starts_with(
            "event `bank.deposited` version 1 does not decode: payload of `bank.deposited` v1"
        ),
        "{}",
        letters[1].error
    );
    store.discard_dead_letter(letters[0].id).await.unwrap();
    assert_eq!(store.dead_letters(0, 10).await.unwrap().len(), 1);
}

/// Events written while no relay runs are delivered after a restart; lag shows them meanwhile;
/// retention prunes only what every group has.
async fn restart_resumes_and_lag_is_reported(backend: Backend) {
    let db = TestDb::new(backend, "restart").await;
    {
        let store = store(&db, fast_relay()).await;
        let app = bank::app(store.clone(), Faults::default()).await.unwrap();
        for seq in 1..=20 {
            app.send(deposit(seq, "a", 1)).await.unwrap();
        }
        let lag = store.lag().await.unwrap();
        let groups: Vec<(&str, i64)> = lag
            .groups
            .iter()
            .map(|g| (g.group.as_str(), g.pending))
            .collect();
        assert_eq!(groups, [("audit", 20), ("ledger", 20)]);
        assert!(lag.groups.iter().all(|g| g.oldest_age.is_some()));
    }
    let options = RelayOptions {
        outbox_retention: Duration::ZERO,
        ..fast_relay()
    };
    let store = store(&db, options).await;
    let faults = Faults::default();
    faults.break_account("b");
    let app = bank::app(store.clone(), faults).await.unwrap();
    app.send(deposit(21, "b", 1)).await.unwrap();
    let relay = app.start();
    eventually(WAIT, "the backlog delivered", || async {
        (sorted_seqs(&store, "ledger").await.len() == 20
            && sorted_seqs(&store, "audit").await.len() == 21)
            .then_some(())
    })
    .await;
    relay.shutdown().await;
    let pruned = store.prune().await.unwrap();
    // Deposit 21 still waits in the ledger group: its outbox row stays.
    assert_eq!(pruned.outbox, 20);
    let left: i64 = sqlx::query("SELECT COUNT(*) FROM inseam_outbox")
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 1);
}

/// A durable command runs at its time, once, in the relay with its inbox row; one that keeps
/// failing ends in the dead letters.
async fn scheduled_commands(backend: Backend) {
    let db = TestDb::new(backend, "scheduled").await;
    let store = store(
        &db,
        RelayOptions {
            max_attempts: 2,
            ..fast_relay()
        },
    )
    .await;
    let app = bank::builder(store.clone(), Faults::default())
        .durable_command::<Deposit>()
        .build()
        .await
        .unwrap();
    let relay = app.start();
    let at = chrono::Utc::now() + chrono::Duration::milliseconds(1500);
    app.schedule(at, deposit(7, "a", 5)).await.unwrap();
    app.schedule(chrono::Utc::now(), deposit(8, "a", -1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        bank::deposits(store.pool()).await.is_empty(),
        "ran before its time"
    );
    eventually(WAIT, "the scheduled deposit and its events", || async {
        (bank::deposits(store.pool()).await == [7]
            && sorted_seqs(&store, "ledger").await == [7]
            && sorted_seqs(&store, "audit").await == [7])
        .then_some(())
    })
    .await;
    assert!(chrono::Utc::now() >= at);
    let letters = eventually(WAIT, "the failing command dead-lettered", || async {
        let letters = store.dead_letters(0, 10).await.unwrap();
        (letters.len() == 1).then_some(letters)
    })
    .await;
    relay.shutdown().await;
    assert_eq!(letters[0].group, "command:bank.deposit");
    assert_eq!(letters[0].attempts, 2);
    assert_eq!(
        letters[0].error,
        "handler `inseam_tests::bank::deposit` failed: a deposit must be positive, got -1"
    );
    let inbox: i64 =
        sqlx::query("SELECT COUNT(*) FROM inseam_inbox WHERE grp = 'command:bank.deposit'")
            .fetch_one(store.pool())
            .await
            .unwrap()
            .get(0);
    assert_eq!(inbox, 1);
    // A command not declared durable is refused, typed.
    let other = bank::app(store.clone(), Faults::default()).await.unwrap();
    let refused = other.schedule(at, deposit(9, "a", 1)).await.unwrap_err();
    assert_eq!(
        refused.to_string(),
        "command `inseam_tests::bank::Deposit` cannot be dispatched durably: it was not declared durable: add `.durable_command::<..>()` to the app builder"
    );
}

/// Opens an account: dispatches its first deposit durably, then refuses amounts over 1,000,
/// which must take the dispatched deposit back with it.
#[derive(Debug, Serialize, Deserialize, Command)]
#[command(output = (), error = OpenError, name = "bank.open")]
struct Open {
    account: String,
    first: i64,
    seq: i64,
}

#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error("a first deposit of {0} needs a branch visit")]
    TooLarge(i64),
    #[error(transparent)]
    Dispatch(#[from] DispatchError<std::convert::Infallible>),
}

#[command_handler]
async fn open(cmd: Open, ctx: &mut CommandContext<'_>) -> Result<(), OpenError> {
    ctx.dispatch(deposit(cmd.seq, &cmd.account, cmd.first))
        .await?;
    if cmd.first > 1000 {
        return Err(OpenError::TooLarge(cmd.first));
    }
    Ok(())
}

/// Rewards every deposit of 100 or more with a bonus deposit, dispatched durably from the
/// relay's delivery: once per rewarded deposit, however often the delivery is retried.
#[event_handler(group = "rewards")]
async fn rewards(
    ev: &Envelope<Deposited>,
    ctx: &mut EventContext<'_>,
) -> Result<(), DispatchError<std::convert::Infallible>> {
    if ev.amount >= 100 {
        ctx.dispatch(deposit(ev.seq + 1000, &ev.account, 1)).await?;
    }
    Ok(())
}

/// Handlers dispatch durable commands in their unit of work: a command handler's exist only
/// if it commits; a group subscriber's are written with its inbox row, so exactly once. The
/// whole flow keeps one correlation id.
async fn handlers_dispatch_durable_commands(backend: Backend) {
    let db = TestDb::new(backend, "dispatch").await;
    let store = store(&db, fast_relay()).await;
    let refused = bank::builder(store.clone(), Faults::default())
        .handler::<open>()
        .build()
        .await
        .unwrap()
        .send(Open {
            account: "z".into(),
            first: 1,
            seq: 99,
        })
        .await
        .unwrap_err();
    assert_eq!(
        refused.to_string(),
        "command `inseam_tests::bank::Deposit` cannot be dispatched durably: it was not declared durable: add `.durable_command::<..>()` to the app builder"
    );
    let app = bank::builder(store.clone(), Faults::default())
        .handler::<open>()
        .handler::<rewards>()
        .durable_command::<Deposit>()
        .build()
        .await
        .unwrap();
    let relay = app.start();
    let open = |account: &str, first, seq| Open {
        account: account.into(),
        first,
        seq,
    };
    app.send(open("a", 150, 1)).await.unwrap();
    let error = app.send(open("b", 5000, 2)).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "a first deposit of 5000 needs a branch visit"
    );
    app.send(open("c", 20, 3)).await.unwrap();
    eventually(WAIT, "the dispatched deposits and the bonus", || async {
        (bank::deposits(store.pool()).await == [1, 3, 1001]
            && sorted_seqs(&store, "ledger").await == [1, 3, 1001]
            && sorted_seqs(&store, "audit").await == [1, 3, 1001])
        .then_some(())
    })
    .await;
    // Nothing more arrives: no second bonus, nothing of the refused opening.
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.shutdown().await;
    assert_eq!(bank::deposits(store.pool()).await, [1, 3, 1001]);
    assert_eq!(sorted_seqs(&store, "ledger").await, [1, 3, 1001]);
    let rows = sqlx::query("SELECT envelope FROM inseam_outbox")
        .fetch_all(store.pool())
        .await
        .unwrap();
    let mut flow_a = Vec::new();
    for row in rows {
        let bytes: Vec<u8> = row.get(0);
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        if json["data"]["account"] == "a" {
            flow_a.push((json["type"].to_string(), json["correlationid"].to_string()));
        }
    }
    flow_a.sort();
    // Deposit 1, Deposited 1, the bonus Deposit 1001 and its Deposited.
    assert_eq!(flow_a.len(), 4, "{flow_a:?}");
    assert!(
        flow_a
            .iter()
            .all(|(_, correlation)| *correlation == flow_a[0].1),
        "one correlation id across the flow: {flow_a:?}"
    );
}

/// A message the group's inbox already holds (enqueued twice, say) is skipped, its handler not
/// run again, while the rest of its batch is delivered.
async fn the_inbox_skips_a_redelivery(backend: Backend) {
    let db = TestDb::new(backend, "redelivery").await;
    let store = store(&db, fast_relay()).await;
    let app = bank::app(store.clone(), Faults::default()).await.unwrap();
    let events: Vec<_> = (1..=3)
        .map(|seq| bank::deposited(seq, &format!("acct-{seq}")))
        .collect();
    sqlx::query("INSERT INTO inseam_inbox (grp, message_id, handled_at) VALUES ('ledger', $1, 0)")
        .bind(events[1].message_id().to_string())
        .execute(store.pool())
        .await
        .unwrap();
    let mut uow = store.begin().await.unwrap();
    uow.append(
        events
            .iter()
            .map(|ev| OutboxMessage {
                envelope: ev.to_raw().unwrap(),
                groups: vec!["ledger"],
                deliver_at: None,
                stream: None,
            })
            .collect(),
    )
    .await
    .unwrap();
    uow.commit().await.unwrap();
    let relay = app.start();
    eventually(WAIT, "the other two deposits", || async {
        (sorted_seqs(&store, "ledger").await == [1, 3]).then_some(())
    })
    .await;
    // The counters move after each delivery's transaction commits, so they are waited for too.
    eventually(
        WAIT,
        "the skipped duplicate and the two deliveries counted",
        || async {
            let stats = store.relay_stats();
            (stats.duplicates >= 1 && stats.delivered >= 2).then_some(())
        },
    )
    .await;
    relay.shutdown().await;
    let stats = store.relay_stats();
    assert_eq!((stats.delivered, stats.duplicates), (2, 1));
    assert_eq!(sorted_seqs(&store, "ledger").await, [1, 3]);
    let left: i64 = sqlx::query("SELECT COUNT(*) FROM inseam_deliveries")
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}

inseam_tests::on_every_backend!(
    committed_events_reach_every_group_once,
    same_key_in_commit_order,
    poison_message,
    bad_rows_are_dead_lettered,
    restart_resumes_and_lag_is_reported,
    scheduled_commands,
    handlers_dispatch_durable_commands,
    the_inbox_skips_a_redelivery,
);

#[tokio::test]
async fn a_bad_table_prefix_is_refused() {
    let db = TestDb::sqlite();
    let error = SqlStore::connect_with(
        &db.url,
        SqlStoreOptions::new().table_prefix("x; DROP TABLE users"),
    )
    .await
    .unwrap_err();
    assert_eq!(
        error.to_string(),
        "invalid table prefix `x; DROP TABLE users`: use 1 to 32 lowercase ASCII letters, digits or `_`, starting with a letter"
    );
    let error = SqlStore::connect("mysql://localhost/x").await.unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("unsupported database URL scheme `mysql`")
    );
}

#[tokio::test]
async fn a_custom_prefix_keeps_its_own_tables() {
    let db = TestDb::sqlite();
    let store = SqlStore::connect_with(&db.url, SqlStoreOptions::new().table_prefix("shop_"))
        .await
        .unwrap();
    bank::create_schema(&store).await.unwrap();
    let app = bank::app(store.clone(), Faults::default()).await.unwrap();
    app.send(deposit(1, "a", 1)).await.unwrap();
    let count = |table: &'static str| {
        let store = store.clone();
        async move {
            sqlx::query(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
                .fetch_one(store.pool())
                .await
                .unwrap()
                .get::<i64, _>(0)
        }
    };
    // One outbox row, read by position by the two groups, each with its cursor.
    assert_eq!(count("shop_outbox").await, 1);
    assert_eq!(count("shop_cursors").await, 2);
    assert_eq!(count("shop_deliveries").await, 0);
}

#[tokio::test]
async fn tx_without_a_store_is_a_clear_error() {
    let app = inseam::App::builder()
        .handler::<bank_no_store::touch>()
        .build()
        .await
        .unwrap();
    let error = app.send(bank_no_store::Touch).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "error with configuration: this handler runs without an inseam-sql transaction: give the app a store with `App::builder().store(SqlStore::connect(url).await?)`"
    );
}

mod bank_no_store {
    use inseam::prelude::*;

    #[derive(Debug, Command)]
    #[command(output = (), error = inseam::sql::sqlx::Error)]
    pub(crate) struct Touch;

    #[command_handler]
    pub(crate) async fn touch(
        _: Touch,
        ctx: &mut CommandContext<'_>,
    ) -> Result<(), inseam::sql::sqlx::Error> {
        ctx.tx().await?;
        Ok(())
    }
}

fn deposited(seq: i64, account: &str) -> OutboxMessage {
    let envelope = bank::deposited(seq, account);
    OutboxMessage {
        envelope: envelope.to_raw().unwrap(),
        groups: vec!["ledger", "audit"],
        deliver_at: None,
        stream: None,
    }
}

/// PostgreSQL hands out ids when rows are inserted but makes them visible when their
/// transaction commits: here every writer inserts, then they commit in the reverse order of
/// their ids while the relay runs. A reader that tracked "the last id seen" would skip the
/// early ids that become visible late; the relay delivers every one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_out_of_order_commits_lose_nothing() {
    let db = TestDb::postgres("out_of_order").await;
    // One connection per open writer, plus the relay's.
    let store = SqlStore::connect_with(
        &db.url,
        SqlStoreOptions::new()
            .max_connections(60)
            .relay(fast_relay()),
    )
    .await
    .unwrap();
    bank::create_schema(&store).await.unwrap();
    let app = bank::app(store.clone(), Faults::default()).await.unwrap();
    let relay = app.start();
    let writers = 40;
    let mut open = Vec::new();
    // Insert in order 1..=40, each in its own open transaction.
    for seq in 1..=writers {
        let mut uow = store.begin().await.unwrap();
        uow.append(vec![deposited(seq, &format!("acct-{}", seq % 4))])
            .await
            .unwrap();
        open.push((seq, uow));
    }
    // Commit the later half first, and wait until the relay delivered them all, so that its
    // view has moved past ids that are still invisible.
    let late = open.split_off(writers as usize / 2);
    for (_, uow) in late.into_iter().rev() {
        uow.commit().await.unwrap();
        store.committed();
    }
    eventually(WAIT, "the later half delivered", || async {
        (sorted_seqs(&store, "audit").await == (21..=40).collect::<Vec<_>>()).then_some(())
    })
    .await;
    // Now the early ids commit, concurrently and in no particular order.
    let mut commits = Vec::new();
    for (_, uow) in open.into_iter().rev() {
        let store = store.clone();
        commits.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..30))).await;
            uow.commit().await.unwrap();
            store.committed();
        }));
    }
    for commit in commits {
        commit.await.unwrap();
    }
    for group in ["ledger", "audit"] {
        eventually(WAIT, group, || async {
            (sorted_seqs(&store, group).await == (1..=40).collect::<Vec<_>>()).then_some(())
        })
        .await;
    }
    relay.shutdown().await;
}

/// A group reading by position stops at the oldest transaction still running, and when that
/// transaction ends nothing wakes the relay (it wrote no outbox row). Here a transaction that
/// writes nothing stays open while an event commits, with a poll interval of an hour: the
/// event still reaches both groups, because a read held back reads again soon (decision 0027).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_read_held_back_by_a_running_transaction_goes_on() {
    let db = TestDb::postgres("held_back").await;
    let store = store(
        &db,
        RelayOptions {
            poll_interval: Duration::from_secs(3_600),
            ..fast_relay()
        },
    )
    .await;
    let app = bank::app(store.clone(), Faults::default()).await.unwrap();
    let relay = app.start();
    // The groups' cursors exist and the relay is idle.
    let mut uow = store.begin().await.unwrap();
    uow.append(vec![deposited(1, "acct-1")]).await.unwrap();
    uow.commit().await.unwrap();
    store.committed();
    for group in ["ledger", "audit"] {
        eventually(WAIT, group, || async {
            (sorted_seqs(&store, group).await == [1]).then_some(())
        })
        .await;
    }
    // A transaction with an id, older than the next event's, open across its commit.
    let mut connection = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url)
        .await
        .unwrap();
    let mut holder = sqlx::Connection::begin(&mut connection).await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *holder)
        .await
        .unwrap();
    let mut uow = store.begin().await.unwrap();
    uow.append(vec![deposited(2, "acct-2")]).await.unwrap();
    uow.commit().await.unwrap();
    store.committed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    holder.commit().await.unwrap();
    for group in ["ledger", "audit"] {
        eventually(WAIT, group, || async {
            (sorted_seqs(&store, group).await == [1, 2]).then_some(())
        })
        .await;
    }
    relay.shutdown().await;
}

/// Two app instances with their own relays on one database share the work: every event is
/// handled, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_relays_share_the_work() {
    let db = TestDb::postgres("two_relays").await;
    let relay_options = RelayOptions {
        batch_size: 50,
        ..fast_relay()
    };
    let first = store(&db, relay_options.clone()).await;
    let second = store(&db, relay_options).await;
    let app_one = bank::app(first.clone(), Faults::default()).await.unwrap();
    let app_two = bank::app(second.clone(), Faults::default()).await.unwrap();
    let relay_one = app_one.start();
    let relay_two = app_two.start();
    let total = 1_000;
    let mut senders = Vec::new();
    for (part, app) in [app_one.clone(), app_two.clone()].into_iter().enumerate() {
        senders.push(tokio::spawn(async move {
            for n in 0..total / 2 {
                let seq = (n * 2 + part as i64) + 1;
                app.send(deposit(seq, &format!("acct-{}", seq % 10), 1))
                    .await
                    .unwrap();
            }
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
    for group in ["ledger", "audit"] {
        eventually(WAIT, group, || async {
            (bank::effects(first.pool(), group).await.len() >= total as usize).then_some(())
        })
        .await;
    }
    relay_one.shutdown().await;
    relay_two.shutdown().await;
    for group in ["ledger", "audit"] {
        assert_eq!(
            sorted_seqs(&first, group).await,
            (1..=total).collect::<Vec<_>>(),
            "{group}: every deposit exactly once"
        );
    }
    let (one, two) = (first.relay_stats(), second.relay_stats());
    assert_eq!(
        one.delivered + two.delivered,
        2 * total as u64,
        "{one:?} {two:?}"
    );
    assert_eq!(one.duplicates + two.duplicates, 0);
}
