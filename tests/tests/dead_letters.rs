//! Dead letters on real databases: ids are never given out twice, concurrent retries and
//! discards of one dead letter are decided by the database, and a repaired payload is checked
//! against the decoder (and the upcasters) before it is accepted, then delivered on retry.
//! Every scenario runs on a SQLite file and on the PostgreSQL server.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use inseam::prelude::*;
use inseam::sql::sqlx::{self, Row as _};
use inseam::sql::{DeadLetter, Error as SqlError, RelayOptions, SqlStoreOptions};
use inseam::store::{OutboxMessage, Store as _};
use inseam_tests::{Backend, TestDb};

/// A note. Version 1 held `topic` and `message`; version 2 renamed `message` to `text` and
/// added `n`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "letters.noted", version = 2, key = topic)]
struct Noted {
    topic: String,
    text: String,
    n: i64,
}

/// A durable command that fails on `poison`, like the notes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Command)]
#[command(output = (), error = NoteError, name = "letters.file")]
struct File {
    text: String,
    n: i64,
}

#[derive(Debug, thiserror::Error)]
enum NoteError {
    #[error("cannot take `{0}`")]
    Poison(String),
    #[error("the notes group is switched off")]
    Off,
}

/// Every run of the handlers, with what they were given and whether they succeeded.
#[derive(Debug, Clone, Default)]
struct Runs {
    notes: Arc<Mutex<Vec<(Noted, bool)>>>,
    files: Arc<Mutex<Vec<(File, bool)>>>,
    /// While set, the notes group fails whatever it gets.
    off: Arc<AtomicBool>,
}

impl Runs {
    fn notes(&self) -> Vec<(Noted, bool)> {
        self.notes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The notes handled successfully.
    fn taken(&self) -> Vec<Noted> {
        self.notes()
            .into_iter()
            .filter_map(|(note, ok)| ok.then_some(note))
            .collect()
    }

    fn files(&self) -> Vec<(File, bool)> {
        self.files.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn switch_off(&self, off: bool) {
        self.off.store(off, Ordering::SeqCst);
    }
}

#[event_handler(group = "notes")]
async fn take_note(ev: &Envelope<Noted>, State(runs): State<Runs>) -> Result<(), NoteError> {
    let outcome = if runs.off.load(Ordering::SeqCst) {
        Err(NoteError::Off)
    } else if ev.text == "poison" {
        Err(NoteError::Poison(ev.text.clone()))
    } else {
        Ok(())
    };
    runs.notes
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(((**ev).clone(), outcome.is_ok()));
    outcome
}

#[command_handler]
async fn file(cmd: File, State(runs): State<Runs>) -> Result<(), NoteError> {
    let outcome = if cmd.text == "poison" {
        Err(NoteError::Poison(cmd.text.clone()))
    } else {
        Ok(())
    };
    runs.files
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((cmd, outcome.is_ok()));
    outcome
}

/// A v1 note becomes a v2 note; a v1 payload without `message` is refused by name.
fn upcast_v1(mut note: serde_json::Value) -> Result<serde_json::Value, inseam::BoxError> {
    let fields = note.as_object_mut().ok_or("a v1 note is a JSON object")?;
    let message = fields
        .remove("message")
        .ok_or("a v1 note has no field `message`")?;
    fields.insert("text".to_owned(), message);
    fields.insert("n".to_owned(), 0.into());
    Ok(note)
}

/// A store whose relay dead-letters a message at its first failure; tests deliver with
/// `deliver_due`, so no relay runs.
async fn setup(backend: Backend, name: &str) -> (TestDb, SqlStore, App, Runs) {
    let db = TestDb::new(backend, name).await;
    let relay = RelayOptions {
        max_attempts: 1,
        ..RelayOptions::default()
    };
    let store = SqlStore::connect_with(&db.url, SqlStoreOptions::new().relay(relay))
        .await
        .expect("connect the store");
    let runs = Runs::default();
    let app = App::builder()
        .store(store.clone())
        .state(runs.clone())
        .handler::<take_note>()
        .handler::<file>()
        .durable_command::<File>()
        .upcaster("letters.noted", 1, upcast_v1)
        .build()
        .await
        .expect("build the app");
    (db, store, app, runs)
}

fn note(topic: &str, text: &str, n: i64) -> Noted {
    Noted {
        topic: topic.to_owned(),
        text: text.to_owned(),
        n,
    }
}

/// Publishes `note` and delivers what is due; returns the dead letter it became.
async fn dead_letter_of(store: &SqlStore, app: &App, note: Noted) -> DeadLetter {
    let text = note.text.clone();
    let before: Vec<i64> = all_letters(store).await.iter().map(|l| l.id).collect();
    app.publish(note).await.unwrap();
    store.deliver_due(app).await.unwrap();
    let mut new: Vec<DeadLetter> = all_letters(store)
        .await
        .into_iter()
        .filter(|l| !before.contains(&l.id))
        .collect();
    assert_eq!(new.len(), 1, "one new dead letter for `{text}`");
    new.remove(0)
}

async fn all_letters(store: &SqlStore) -> Vec<DeadLetter> {
    store.dead_letters(0, 1000).await.unwrap()
}

fn payload_of(letter: &DeadLetter) -> serde_json::Value {
    let raw = inseam::RawEnvelope::from_json(&letter.envelope).unwrap();
    serde_json::from_slice(&raw.payload).unwrap()
}

fn assert_not_found(error: &SqlError, id: i64) {
    assert!(
        matches!(error, SqlError::DeadLetterNotFound { id: got } if *got == id),
        "expected dead letter {id} not found, got {error:?}"
    );
    assert_eq!(
        error.to_string(),
        format!("dead letter {id} does not exist (already retried or discarded, or never written)")
    );
}

/// A dead letter retried or discarded leaves its id behind for good: the next dead letter
/// gets another, and the old id finds nothing rather than the new message.
async fn ids_are_never_reused(backend: Backend) {
    let (_db, store, app, runs) = setup(backend, "dl_ids").await;
    runs.switch_off(true);
    let a = dead_letter_of(&store, &app, note("a", "first", 1)).await;
    store.discard_dead_letter(a.id).await.unwrap();
    let b = dead_letter_of(&store, &app, note("b", "second", 2)).await;
    assert_ne!(
        b.id, a.id,
        "a discarded dead letter's id was given out again"
    );
    for error in [
        store.retry_dead_letter(a.id).await.unwrap_err(),
        store.discard_dead_letter(a.id).await.unwrap_err(),
        store
            .repair_dead_letter(
                &app,
                a.id,
                br#"{"topic": "a", "text": "x", "n": 1}"#.to_vec(),
            )
            .await
            .unwrap_err(),
        store.dead_letter(a.id).await.unwrap_err(),
    ] {
        assert_not_found(&error, a.id);
    }
    assert_eq!(
        all_letters(&store).await,
        std::slice::from_ref(&b),
        "b was not touched"
    );

    // Retried while the group still fails: it comes back under a new id.
    store.retry_dead_letter(b.id).await.unwrap();
    store.deliver_due(&app).await.unwrap();
    let again = all_letters(&store).await;
    assert_eq!(again.len(), 1);
    let b2 = &again[0];
    assert_eq!(b2.message_id, b.message_id);
    assert!(b2.id != b.id && b2.id != a.id, "{} reused", b2.id);
    for stale in [a.id, b.id] {
        assert_not_found(&store.retry_dead_letter(stale).await.unwrap_err(), stale);
    }
    assert_eq!(
        all_letters(&store).await,
        again,
        "b's new dead letter was not touched"
    );
    assert!(runs.taken().is_empty());
}

/// Of two retries (or a retry and a discard) of one dead letter at the same time, exactly one
/// succeeds; the other is told the dead letter is gone. The message is delivered once per
/// winning retry.
async fn concurrent_retries_and_discards(backend: Backend) {
    let (_db, store, app, runs) = setup(backend, "dl_race").await;
    runs.switch_off(true);
    let mut letters = Vec::new();
    for i in 0..8 {
        letters.push(
            dead_letter_of(
                &store,
                &app,
                note(&format!("k{i}"), &format!("note {i}"), i),
            )
            .await,
        );
    }
    runs.switch_off(false);

    #[derive(Clone, Copy, Debug)]
    enum Op {
        Retry,
        Discard,
    }
    let mut retried = Vec::new();
    for (i, letter) in letters.iter().enumerate() {
        let ops = if i < 5 {
            [Op::Retry, Op::Retry]
        } else {
            [Op::Retry, Op::Discard]
        };
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let tasks: Vec<_> = ops
            .into_iter()
            .map(|op| {
                let (store, barrier, id) = (store.clone(), barrier.clone(), letter.id);
                tokio::spawn(async move {
                    barrier.wait().await;
                    let outcome = match op {
                        Op::Retry => store.retry_dead_letter(id).await,
                        Op::Discard => store.discard_dead_letter(id).await,
                    };
                    (op, outcome)
                })
            })
            .collect();
        let mut won = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                (op, Ok(())) => won.push(op),
                (_, Err(error)) => assert_not_found(&error, letter.id),
            }
        }
        assert_eq!(
            won.len(),
            1,
            "dead letter {}: {won:?} both succeeded",
            letter.id
        );
        if matches!(won[0], Op::Retry) {
            retried.push(format!("note {i}"));
        }
    }
    assert!(all_letters(&store).await.is_empty());
    // One delivery waits per winning retry, and no more.
    let lag = store.lag().await.unwrap();
    let pending: i64 = lag.groups.iter().map(|g| g.pending).sum();
    assert_eq!(pending, retried.len() as i64, "{lag:?}");
    store.deliver_due(&app).await.unwrap();
    let mut taken: Vec<String> = runs.taken().into_iter().map(|n| n.text).collect();
    taken.sort();
    retried.sort();
    assert_eq!(taken, retried);
    assert_eq!(store.relay_stats().duplicates, 0);
    assert!(all_letters(&store).await.is_empty());
}

/// A repaired payload is checked before it is accepted; a retry then delivers it, once, even
/// though the outbox still holds the original.
async fn a_repaired_dead_letter_is_delivered_repaired(backend: Backend) {
    let (_db, store, app, runs) = setup(backend, "dl_repair").await;
    let letter = dead_letter_of(&store, &app, note("t", "poison", 1)).await;
    assert_eq!(letter.version, 2);
    assert!(
        letter.error.contains("cannot take `poison`"),
        "{}",
        letter.error
    );

    let refused = [
        (&br#"{"topic": "t", "n": 3}"#[..], "missing field `text`"),
        (
            br#"{"topic": "t", "text": 5, "n": 1}"#,
            "invalid type: integer `5`, expected a string",
        ),
        (
            br#"{"topic": "t", "text": "x", "n": "many"}"#,
            "invalid type: string \"many\", expected i64",
        ),
        (b"not json", "expected ident"),
    ];
    for (payload, why) in refused {
        let error = store
            .repair_dead_letter(&app, letter.id, payload.to_vec())
            .await
            .unwrap_err();
        assert!(
            matches!(&error, SqlError::RepairRefused { id, group, .. } if *id == letter.id && group == "notes"),
            "{error:?}"
        );
        let text = error.to_string();
        assert!(
            text.starts_with(&format!(
                "dead letter {} was not repaired: group `notes` cannot read the new payload: event `letters.noted` version 2 does not decode",
                letter.id
            )),
            "{text}"
        );
        assert!(text.contains(why), "{text} does not say {why}");
        assert_eq!(
            store.dead_letter(letter.id).await.unwrap(),
            letter,
            "a refused repair changed the dead letter"
        );
    }

    let repaired = store
        .repair_dead_letter(
            &app,
            letter.id,
            br#"{"topic": "t", "text": "fixed", "n": 2}"#.to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(repaired.id, letter.id);
    assert_eq!(
        payload_of(&repaired),
        serde_json::json!({"topic": "t", "text": "fixed", "n": 2})
    );
    assert_eq!(store.dead_letter(letter.id).await.unwrap(), repaired);
    let original = inseam::RawEnvelope::from_json(&letter.envelope).unwrap();
    let kept = inseam::RawEnvelope::from_json(&repaired.envelope).unwrap();
    assert_eq!(
        (
            kept.metadata,
            &kept.name,
            kept.version,
            &kept.key,
            &kept.headers
        ),
        (
            original.metadata,
            &original.name,
            original.version,
            &original.key,
            &original.headers
        ),
        "only the payload changes"
    );

    // The failing delivery ran in its batch, then alone: every run so far failed on poison.
    let failed = runs.notes();
    assert!(
        !failed.is_empty()
            && failed
                .iter()
                .all(|run| *run == (note("t", "poison", 1), false)),
        "{failed:?}"
    );
    store.retry_dead_letter(letter.id).await.unwrap();
    store.deliver_due(&app).await.unwrap();
    assert_eq!(
        runs.notes()[failed.len()..],
        [(note("t", "fixed", 2), true)],
        "the retry ran the handler once, with the repair"
    );
    assert_eq!(store.deliver_due(&app).await.unwrap(), 0);
    assert_eq!(runs.taken(), [note("t", "fixed", 2)]);
    assert!(all_letters(&store).await.is_empty());
    // The outbox row, which the event store and the other groups share, is as written.
    let stored: Vec<u8> = sqlx::query("SELECT envelope FROM inseam_outbox WHERE message_id = $1")
        .bind(letter.message_id.clone())
        .fetch_one(store.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, letter.envelope);
}

/// A dead letter of an older version is repaired in that version: the new payload must
/// upcast and then decode.
async fn an_older_version_is_repaired_in_its_own_version(backend: Backend) {
    let (_db, store, app, runs) = setup(backend, "dl_repair_v1").await;
    let mut raw = Envelope {
        metadata: inseam::Metadata {
            message_id: uuid::Uuid::now_v7(),
            correlation_id: uuid::Uuid::now_v7(),
            causation_id: None,
        },
        key: Some("old".to_owned()),
        occurred_at: chrono::Utc::now(),
        source: "inseam".into(),
        headers: inseam::Headers::default(),
        payload: note("old", "poison", 0),
    }
    .to_raw()
    .unwrap();
    raw.version = 1;
    raw.payload = br#"{"topic": "old", "message": "poison"}"#.to_vec();
    let mut uow = store.begin().await.unwrap();
    uow.append(vec![OutboxMessage {
        envelope: raw,
        groups: vec!["notes"],
        deliver_at: None,
        stream: None,
    }])
    .await
    .unwrap();
    uow.commit().await.unwrap();
    store.deliver_due(&app).await.unwrap();
    let failed = runs.notes();
    assert!(
        !failed.is_empty()
            && failed
                .iter()
                .all(|run| *run == (note("old", "poison", 0), false)),
        "{failed:?}"
    );
    let letters = all_letters(&store).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.version, 1);

    // The current version's shape is not a v1 payload.
    let error = store
        .repair_dead_letter(
            &app,
            letter.id,
            br#"{"topic": "old", "text": "fixed", "n": 1}"#.to_vec(),
        )
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(
        text.contains("upcasting `letters.noted`")
            && text.contains("from version 1 failed: a v1 note has no field `message`"),
        "{text}"
    );
    // A v1 payload that upcasts to something the decoder refuses.
    let error = store
        .repair_dead_letter(&app, letter.id, br#"{"message": "fixed"}"#.to_vec())
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("missing field `topic`"),
        "{error}"
    );
    assert_eq!(&store.dead_letter(letter.id).await.unwrap(), letter);

    let repaired = store
        .repair_dead_letter(
            &app,
            letter.id,
            br#"{"topic": "old", "message": "fixed"}"#.to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(repaired.version, 1);
    store.retry_dead_letter(letter.id).await.unwrap();
    store.deliver_due(&app).await.unwrap();
    assert_eq!(
        runs.notes()[failed.len()..],
        [(note("old", "fixed", 0), true)]
    );
}

/// A durable command's dead letter is checked against the command's type, and retried
/// repaired.
async fn a_durable_command_is_repaired(backend: Backend) {
    let (_db, store, app, runs) = setup(backend, "dl_repair_cmd").await;
    app.schedule(
        chrono::Utc::now(),
        File {
            text: "poison".to_owned(),
            n: 1,
        },
    )
    .await
    .unwrap();
    store.deliver_due(&app).await.unwrap();
    let letters = all_letters(&store).await;
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.group, "command:letters.file");
    let poison = File {
        text: "poison".to_owned(),
        n: 1,
    };
    let failed = runs.files();
    assert!(
        !failed.is_empty() && failed.iter().all(|run| *run == (poison.clone(), false)),
        "{failed:?}"
    );
    let error = store
        .repair_dead_letter(&app, letter.id, br#"{"text": "fixed"}"#.to_vec())
        .await
        .unwrap_err();
    assert!(
        matches!(error, SqlError::RepairRefused { .. })
            && error.to_string().contains("missing field `n`"),
        "{error}"
    );
    assert_eq!(&store.dead_letter(letter.id).await.unwrap(), letter);
    store
        .repair_dead_letter(&app, letter.id, br#"{"text": "fixed", "n": 5}"#.to_vec())
        .await
        .unwrap();
    store.retry_dead_letter(letter.id).await.unwrap();
    store.deliver_due(&app).await.unwrap();
    let fixed = File {
        text: "fixed".to_owned(),
        n: 5,
    };
    assert_eq!(runs.files()[failed.len()..], [(fixed, true)]);
    assert!(all_letters(&store).await.is_empty());
}

/// The admin queries: the dead letters per group, a message's dead letters, and the flow a
/// message belongs to.
async fn a_message_is_found_by_its_id(backend: Backend) {
    let (_db, store, app, runs) = setup(backend, "dl_find").await;
    assert_eq!(store.dead_letter_depths().await.unwrap(), []);
    runs.switch_off(true);
    let a = dead_letter_of(&store, &app, note("a", "first", 1)).await;
    let b = dead_letter_of(&store, &app, note("b", "second", 2)).await;
    assert_eq!(
        store.dead_letter_depths().await.unwrap(),
        [("notes".to_owned(), 2)]
    );
    let id = a.message_uuid().unwrap();
    assert_eq!(
        store.dead_letters_of(id).await.unwrap(),
        std::slice::from_ref(&a)
    );
    let envelope = inseam::RawEnvelope::from_json(&a.envelope).unwrap();
    assert_eq!(
        store.correlation_of(id).await.unwrap(),
        Some(envelope.metadata.correlation_id)
    );
    let unknown = uuid::Uuid::now_v7();
    assert_eq!(store.correlation_of(unknown).await.unwrap(), None);
    assert_eq!(store.dead_letters_of(unknown).await.unwrap(), []);
    store.discard_dead_letter(b.id).await.unwrap();
    assert_eq!(
        store.dead_letter_depths().await.unwrap(),
        [("notes".to_owned(), 1)]
    );
}

inseam_tests::on_every_backend!(
    a_message_is_found_by_its_id,
    ids_are_never_reused,
    concurrent_retries_and_discards,
    a_repaired_dead_letter_is_delivered_repaired,
    an_older_version_is_repaired_in_its_own_version,
    a_durable_command_is_repaired,
);

/// A SQLite database from before dead letter ids were AUTOINCREMENT keeps its dead letters,
/// ids and all, and from then on never gives an id out twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_sqlite_schema_keeps_its_dead_letters() {
    let db = TestDb::sqlite();
    let store = SqlStore::connect(&db.url).await.unwrap();
    let pool = store.pool().clone();
    // One connection for the whole setup: another connection of the pool may still read an
    // older snapshot of the schema, in which the dropped table's index exists.
    let mut conn = pool.sqlite().unwrap().acquire().await.unwrap();
    // The table as migration 1 made it, with three dead letters, and migration 7 undone.
    for statement in [
        "DROP TABLE inseam_dead_letters",
        "CREATE TABLE inseam_dead_letters (
            id INTEGER PRIMARY KEY,
            grp TEXT NOT NULL,
            message_id TEXT NOT NULL,
            name TEXT NOT NULL,
            version BIGINT NOT NULL,
            msg_key TEXT,
            envelope BLOB NOT NULL,
            error TEXT NOT NULL,
            attempts BIGINT NOT NULL,
            first_failed_at BIGINT NOT NULL,
            last_failed_at BIGINT NOT NULL
        )",
        "CREATE INDEX inseam_dead_letters_group ON inseam_dead_letters (grp, id)",
        "DELETE FROM inseam_migrations WHERE version = 7",
    ] {
        sqlx::query(statement).execute(&mut *conn).await.unwrap();
    }
    for (id, group) in [(1_i64, "a"), (2, "b"), (5, "c")] {
        sqlx::query(
            "INSERT INTO inseam_dead_letters (id, grp, message_id, name, version, msg_key, envelope, error, attempts, first_failed_at, last_failed_at)
             VALUES ($1, $2, $3, 'letters.noted', 2, NULL, $4, 'down', 3, 10, 20)",
        )
        .bind(id)
        .bind(group)
        .bind(format!("m-{id}"))
        .bind(b"{}".to_vec())
        .execute(&mut *conn)
        .await
        .unwrap();
    }
    drop(conn);
    drop(store);
    pool.close().await;

    let store = SqlStore::connect(&db.url).await.unwrap();
    let letters = all_letters(&store).await;
    assert_eq!(
        letters
            .iter()
            .map(|l| (l.id, l.group.as_str(), l.message_id.as_str(), l.attempts))
            .collect::<Vec<_>>(),
        [(1, "a", "m-1", 3), (2, "b", "m-2", 3), (5, "c", "m-5", 3)]
    );
    let schema: String =
        sqlx::query("SELECT sql FROM sqlite_master WHERE name = 'inseam_dead_letters'")
            .fetch_one(store.pool())
            .await
            .unwrap()
            .get(0);
    assert!(schema.contains("AUTOINCREMENT"), "{schema}");
    let indexes: i64 = sqlx::query(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'index' AND name = 'inseam_dead_letters_group'",
    )
    .fetch_one(store.pool())
    .await
    .unwrap()
    .get(0);
    assert_eq!(indexes, 1);
    store.discard_dead_letter(5).await.unwrap();
    sqlx::query(
        "INSERT INTO inseam_dead_letters (grp, message_id, name, version, msg_key, envelope, error, attempts, first_failed_at, last_failed_at)
         VALUES ('d', 'm-new', 'letters.noted', 2, NULL, $1, 'down', 1, 30, 30)",
    )
    .bind(b"{}".to_vec())
    .execute(store.pool())
    .await
    .unwrap();
    let ids: Vec<i64> = all_letters(&store).await.iter().map(|l| l.id).collect();
    assert_eq!(ids, [1, 2, 6]);
}
