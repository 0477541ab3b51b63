//! Deliveries that fail after their handler returned `Ok`, at the inbox insert or at commit,
//! are failed attempts like a handler's error: retried with backoff, dead-lettered after
//! `max_attempts` with the database's error, and holding back their own key only. A message
//! that keeps failing runs its handler as often as the relay's documented bound says, and no
//! other handler more than that (decision 0014).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use inseam::prelude::*;
use inseam::sql::sqlx::{self, Row as _};
use inseam::sql::{RelayOptions, SqlStoreOptions};
use inseam::store::{OutboxMessage, Store as _};
use inseam_tests::{Backend, TestDb, eventually};

const WAIT: Duration = Duration::from_secs(30);

/// What the `notes` group's handler does besides recording the note.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Fault {
    /// Nothing: the note is recorded.
    None,
    /// The note references a parent that does not exist, through a foreign key checked at
    /// commit.
    DeferredForeignKey,
    /// After recording the note, a statement fails and the handler ignores it and returns
    /// `Ok` (PostgreSQL: the transaction is aborted).
    SwallowedStatement,
    /// The connection is lost during the commit (PostgreSQL: a deferred trigger terminates
    /// its own backend).
    LostConnection,
    /// The commit fails with a serialization failure (PostgreSQL: raised by a deferred
    /// trigger, as a serializable transaction would be refused).
    SerializationFailure,
    /// The handler fails.
    Fails,
}

impl Fault {
    fn column(self) -> &'static str {
        match self {
            Fault::LostConnection => "lose",
            Fault::SerializationFailure => "serialize",
            _ => "none",
        }
    }
}

/// A note for the `notes` group; `seq` identifies it.
#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "tests.noted", version = 1, key = key)]
struct Noted {
    key: String,
    seq: i64,
    fault: Fault,
}

#[derive(Debug, thiserror::Error)]
enum NoteError {
    #[error("note {0} refused")]
    Refused(i64),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// How often the handler ran, per note.
#[derive(Debug, Clone, Default)]
struct Runs(Arc<Mutex<HashMap<i64, u32>>>);

impl Runs {
    fn count(&self, seq: i64) {
        *self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(seq)
            .or_default() += 1;
    }

    fn of(&self, seq: i64) -> u32 {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&seq)
            .copied()
            .unwrap_or_default()
    }
}

#[event_handler(group = "notes")]
async fn note(
    ev: &Envelope<Noted>,
    ctx: &mut EventContext<'_>,
    State(runs): State<Runs>,
) -> Result<(), NoteError> {
    runs.count(ev.seq);
    if ev.fault == Fault::Fails {
        return Err(NoteError::Refused(ev.seq));
    }
    let parent = (ev.fault == Fault::DeferredForeignKey).then_some(ev.seq);
    sqlx::query("INSERT INTO notes (seq, note_key, parent, fault) VALUES ($1, $2, $3, $4)")
        .bind(ev.seq)
        .bind(ev.key.clone())
        .bind(parent)
        .bind(ev.fault.column())
        .execute(ctx.tx().await?)
        .await?;
    if ev.fault == Fault::SwallowedStatement {
        // Ignored: PostgreSQL has aborted the transaction, and the handler returns `Ok`.
        let _ = sqlx::query("INSERT INTO no_such_table (x) VALUES (1)")
            .execute(ctx.tx().await?)
            .await;
    }
    Ok(())
}

async fn create_schema(store: &SqlStore) {
    let pool = store.pool();
    for statement in [
        "CREATE TABLE note_parents (id BIGINT PRIMARY KEY)",
        "CREATE TABLE notes (seq BIGINT NOT NULL, note_key TEXT NOT NULL, \
         parent BIGINT REFERENCES note_parents (id) DEFERRABLE INITIALLY DEFERRED, \
         fault TEXT NOT NULL)",
    ] {
        sqlx::query(statement).execute(pool).await.unwrap();
    }
    if store.backend() == inseam::sql::Backend::Postgres {
        sqlx::raw_sql(
            "CREATE FUNCTION notes_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.fault = 'lose' THEN
                     PERFORM pg_terminate_backend(pg_backend_pid());
                     PERFORM pg_sleep(5);
                 ELSE
                     RAISE EXCEPTION 'could not serialize access (simulated at commit)'
                         USING ERRCODE = 'serialization_failure';
                 END IF;
                 RETURN NULL;
             END $$;
             CREATE CONSTRAINT TRIGGER notes_at_commit AFTER INSERT ON notes
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                 WHEN (NEW.fault <> 'none') EXECUTE FUNCTION notes_at_commit();",
        )
        .execute(pool)
        .await
        .unwrap();
    }
}

fn noted(seq: i64, key: &str, fault: Fault) -> Envelope<Noted> {
    Envelope {
        metadata: inseam::Metadata {
            message_id: uuid::Uuid::now_v7(),
            correlation_id: uuid::Uuid::now_v7(),
            causation_id: None,
        },
        key: Some(key.to_owned()),
        occurred_at: chrono::Utc::now(),
        source: "inseam".into(),
        headers: inseam::Headers::default(),
        payload: Noted {
            key: key.to_owned(),
            seq,
            fault,
        },
    }
}

/// Writes the notes to the outbox in one transaction, in this order (so ids follow it).
async fn publish(
    store: &SqlStore,
    notes: &[(i64, &str, Fault, Option<chrono::DateTime<chrono::Utc>>)],
) {
    let mut uow = store.begin().await.unwrap();
    uow.append(
        notes
            .iter()
            .map(|&(seq, key, fault, deliver_at)| OutboxMessage {
                envelope: noted(seq, key, fault).to_raw().unwrap(),
                groups: vec!["notes"],
                deliver_at,
                stream: None,
            })
            .collect(),
    )
    .await
    .unwrap();
    uow.commit().await.unwrap();
}

/// The notes recorded, sorted (a note recorded twice appears twice).
async fn recorded(store: &SqlStore) -> Vec<i64> {
    let rows = sqlx::query("SELECT seq FROM notes ORDER BY seq")
        .fetch_all(store.pool())
        .await
        .unwrap();
    rows.iter().map(|r| r.get::<i64, _>(0)).collect()
}

async fn connect(db: &TestDb, relay: RelayOptions) -> SqlStore {
    let store = SqlStore::connect_with(&db.url, SqlStoreOptions::new().relay(relay))
        .await
        .unwrap();
    create_schema(&store).await;
    store
}

/// Note 6 (key `bad`) fails with `fault` after its handler returned `Ok`. It is retried,
/// alone, and dead-lettered after `max_attempts` with the database's error, having run its
/// handler `max_attempts + 1` times; notes of other keys, written before and after it in one
/// transaction (so first claimed in one batch with it), are each recorded once meanwhile;
/// note 7, behind it on its key, is recorded once it is dead-lettered; nothing is left pending.
async fn fails_after_the_handler(backend: Backend, fault: Fault, error: &str) {
    let db = TestDb::new(backend, &format!("after_handler_{fault:?}")).await;
    let store = connect(
        &db,
        RelayOptions {
            max_attempts: 3,
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(40),
            poll_interval: Duration::from_millis(50),
            ..RelayOptions::default()
        },
    )
    .await;
    let runs = Runs::default();
    let app = App::builder()
        .store(store.clone())
        .state(runs.clone())
        .handler::<note>()
        .build()
        .await
        .unwrap();
    let mut notes: Vec<(i64, String, Fault)> = Vec::new();
    for seq in 1..=5 {
        notes.push((seq, format!("k{seq}"), Fault::None));
    }
    notes.push((6, "bad".into(), fault));
    notes.push((7, "bad".into(), Fault::None));
    for seq in 8..=12 {
        notes.push((seq, format!("k{seq}"), Fault::None));
    }
    let written: Vec<_> = notes
        .iter()
        .map(|(seq, key, fault)| (*seq, key.as_str(), *fault, None))
        .collect();
    publish(&store, &written).await;
    let relay = app.start();
    let healthy: Vec<i64> = (1..=12).filter(|&seq| seq != 6).collect();
    let letters = eventually(
        WAIT,
        "note 6 dead-lettered, the others recorded",
        || async {
            let letters = store.dead_letters(0, 10).await.unwrap();
            (letters.len() == 1 && recorded(&store).await.len() >= healthy.len()).then_some(letters)
        },
    )
    .await;
    relay.shutdown().await;
    let letter = &letters[0];
    assert_eq!(letter.group, "notes");
    assert_eq!(letter.key.as_deref(), Some("bad"));
    assert_eq!(letter.attempts, 3);
    let raw = inseam::RawEnvelope::from_json(&letter.envelope).unwrap();
    assert_eq!(raw.decode::<Noted>().unwrap().seq, 6);
    assert!(
        letter.error.starts_with(
            "the handler returned Ok, but its delivery's transaction failed: database error while trying to "
        ) && letter.error.contains(error),
        "{}",
        letter.error
    );
    assert_eq!(recorded(&store).await, healthy, "each other note once");
    assert_eq!(runs.of(6), 4, "max_attempts + 1 runs of the failing note");
    for &seq in &healthy {
        // In the batch that failed (when they ran before its failure), then alone or in a
        // later batch; never again for a retry of note 6.
        assert!(
            (1..=2).contains(&runs.of(seq)),
            "note {seq}: {} runs",
            runs.of(seq)
        );
    }
    let lag = store.lag().await.unwrap();
    assert!(lag.groups.is_empty(), "{lag:?}");
    assert_eq!(lag.dead_letters, 1);
    let stats = store.relay_stats();
    assert_eq!((stats.retried, stats.dead_lettered), (2, 1), "{stats:?}");
}

/// A note whose foreign key, checked at commit, fails: SQLite checks a deferred foreign key at
/// COMMIT too (sqlx turns `foreign_keys` on).
async fn a_deferred_foreign_key_fails_at_commit(backend: Backend) {
    let error = match backend {
        Backend::Sqlite => {
            "commit a delivery: error returned from database: (code: 787) FOREIGN KEY constraint failed"
        }
        Backend::Postgres => {
            "commit a delivery: error returned from database: insert or update on table \"notes\" violates foreign key constraint"
        }
    };
    fails_after_the_handler(backend, Fault::DeferredForeignKey, error).await;
}

inseam_tests::on_every_backend!(
    a_deferred_foreign_key_fails_at_commit,
    a_poison_message_runs_its_handler_as_the_bound_says,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_swallowed_failed_statement_fails_the_delivery() {
    fails_after_the_handler(
        Backend::Postgres,
        Fault::SwallowedStatement,
        "write the inbox: error returned from database: current transaction is aborted, commands ignored until end of transaction block",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_connection_lost_at_commit_fails_the_delivery() {
    fails_after_the_handler(
        Backend::Postgres,
        Fault::LostConnection,
        "commit a delivery: ",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_serialization_failure_at_commit_fails_the_delivery() {
    fails_after_the_handler(
        Backend::Postgres,
        Fault::SerializationFailure,
        "commit a delivery: error returned from database: could not serialize access (simulated at commit)",
    )
    .await;
}

/// The bound of the relay's docs, counted: with `max_attempts` 3, a note whose handler always
/// fails runs it 4 times (its first attempt in a batch and then alone, then one run per retry,
/// alone); a note before it in that first batch runs twice (in the batch, then alone); a note
/// after it runs once (alone); a note that shares the batch of its retry runs once.
async fn a_poison_message_runs_its_handler_as_the_bound_says(backend: Backend) {
    let db = TestDb::new(backend, "poison_runs").await;
    let store = connect(
        &db,
        RelayOptions {
            max_attempts: 3,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(1),
            ..RelayOptions::default()
        },
    )
    .await;
    let start = chrono::Utc::now();
    let clock = inseam::ManualClock::new(start);
    let runs = Runs::default();
    let app = App::builder()
        .store(store.clone())
        .clock(clock.clone())
        .state(runs.clone())
        .handler::<note>()
        .build()
        .await
        .unwrap();
    // Note 1 comes first but is due only when note 3's first retry is (the backoff of a first
    // retry is at most 1 s): it shares that retry's batch.
    let later = start + chrono::Duration::seconds(1);
    publish(
        &store,
        &[
            (1, "s", Fault::None, Some(later)),
            (2, "h", Fault::None, None),
            (3, "p", Fault::Fails, None),
            (4, "t", Fault::None, None),
        ],
    )
    .await;
    let counts = |runs: &Runs| [1, 2, 3, 4].map(|seq| runs.of(seq));
    let attempts = || async {
        sqlx::query("SELECT attempts FROM inseam_deliveries ORDER BY id")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<i64, _>(0))
            .collect::<Vec<_>>()
    };
    // First attempt: the batch of 2, 3, 4 fails at 3; 2, 3 and 4 then go one by one.
    assert_eq!(store.deliver_due(&app).await.unwrap(), 3);
    assert_eq!(counts(&runs), [0, 2, 2, 1]);
    assert_eq!(attempts().await, [0, 1]);
    // Second attempt: 1 goes in a batch, 3 alone.
    clock.advance(Duration::from_secs(1));
    assert_eq!(store.deliver_due(&app).await.unwrap(), 2);
    assert_eq!(counts(&runs), [1, 2, 3, 1]);
    assert_eq!(attempts().await, [2]);
    // Third and last attempt: 3 alone, then dead-lettered.
    clock.advance(Duration::from_secs(1));
    assert_eq!(store.deliver_due(&app).await.unwrap(), 1);
    assert_eq!(counts(&runs), [1, 2, 4, 1]);
    let letters = store.dead_letters(0, 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].attempts, 3);
    assert_eq!(
        letters[0].error,
        "handler `relay_failures::note` failed: note 3 refused"
    );
    assert_eq!(recorded(&store).await, [1, 2, 4]);
    assert!(store.lag().await.unwrap().groups.is_empty());
    // Nothing runs again.
    clock.advance(Duration::from_secs(10));
    assert_eq!(store.deliver_due(&app).await.unwrap(), 0);
    assert_eq!(counts(&runs), [1, 2, 4, 1]);
}
