//! Commands sent from inside handlers join the caller's unit of work, on both backends: a
//! nested send commits with its parent or not at all, its own failure undoes only its own
//! writes, and `EventContext::send` works from inline subscribers, group subscribers and saga
//! steps. `App::send` from inside a unit of work fails at once with a typed error instead of
//! committing apart (or, on SQLite, waiting for the write lock). On SQLite a command that is
//! slow between loading and saving does not hold the write lock.

use std::time::{Duration, Instant};

use inseam::prelude::*;
use inseam::sql::sqlx::{self, Row as _};
use inseam::sql::{RelayOptions, SqlStore, SqlStoreOptions};
use inseam::{BoxError, DispatchFailure};
use inseam_tests::cart::{self, AddItems, Cart, Gate, ItemAdded};
use inseam_tests::{Backend, TestDb, eventually};

async fn store(db: &TestDb) -> SqlStore {
    let options = SqlStoreOptions::new().relay(RelayOptions {
        poll_interval: Duration::from_millis(50),
        backoff_base: Duration::from_millis(10),
        ..RelayOptions::default()
    });
    let store = SqlStore::connect_with(&db.url, options).await.unwrap();
    sqlx::query("CREATE TABLE notes (author TEXT NOT NULL, line TEXT NOT NULL)")
        .execute(store.pool())
        .await
        .unwrap();
    store
}

async fn notes(store: &SqlStore) -> Vec<(String, String)> {
    let rows = sqlx::query("SELECT author, line FROM notes ORDER BY author, line")
        .fetch_all(store.pool())
        .await
        .unwrap();
    rows.iter()
        .map(|row| (row.get::<String, _>(0), row.get::<String, _>(1)))
        .collect()
}

#[derive(Debug, thiserror::Error)]
enum NoteError {
    #[error("refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    /// A nested dispatch failed for a reason of the framework's.
    #[error(transparent)]
    Failed(Box<DispatchFailure>),
}

impl From<DispatchError<NoteError>> for NoteError {
    fn from(error: DispatchError<NoteError>) -> Self {
        match error {
            DispatchError::Handler(own) => own,
            DispatchError::Failed(failure) => NoteError::Failed(failure),
            other => panic!("unexpected dispatch error {other:?}"),
        }
    }
}

async fn note(ctx: &mut impl Transactional, author: &str, line: &str) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO notes (author, line) VALUES ($1, $2)")
        .bind(author.to_owned())
        .bind(line.to_owned())
        .execute(ctx.tx().await?)
        .await?;
    Ok(())
}

/// The child: writes a note and publishes `Noted`; refuses lines starting with `!`, after it
/// wrote (its write must then be undone).
#[derive(Debug, Command)]
#[command(output = (), error = NoteError, name = "nested.write_note")]
struct WriteNote {
    line: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "nested.noted", version = 1)]
struct Noted {
    line: String,
}

#[command_handler]
async fn write_note(cmd: WriteNote, ctx: &mut CommandContext<'_>) -> Result<(), NoteError> {
    note(ctx, "child", &cmd.line).await?;
    if cmd.line.starts_with('!') {
        return Err(NoteError::Refused(cmd.line));
    }
    ctx.publish(Noted { line: cmd.line });
    Ok(())
}

/// The parent: writes its own note, sends the child with `ctx.send`, and fails afterwards when
/// asked to; with `tolerate`, a failing child is caught and the parent goes on.
#[derive(Debug, Command)]
#[command(output = (), error = NoteError, name = "nested.parent")]
struct Parent {
    child: String,
    fail_after: bool,
    tolerate: bool,
}

#[command_handler]
async fn parent(cmd: Parent, ctx: &mut CommandContext<'_>) -> Result<(), NoteError> {
    note(ctx, "parent", &cmd.child).await?;
    match ctx.send(WriteNote { line: cmd.child }).await {
        Ok(()) => {}
        Err(DispatchError::Handler(NoteError::Refused(_))) if cmd.tolerate => {}
        Err(error) => return Err(error.into()),
    }
    if cmd.fail_after {
        return Err(NoteError::Refused("the parent".into()));
    }
    Ok(())
}

/// Records every `Noted` in the `audit` group, in its delivery's transaction.
#[event_handler(group = "audit")]
async fn audit(ev: &Envelope<Noted>, ctx: &mut EventContext<'_>) -> Result<(), sqlx::Error> {
    note(ctx, "audit", &ev.payload.line).await
}

fn base(store: SqlStore) -> inseam::AppBuilder {
    App::builder()
        .store(store)
        .handler::<write_note>()
        .handler::<parent>()
        .handler::<audit>()
}

async fn audited(store: &SqlStore, expected: usize) {
    eventually(Duration::from_secs(10), "the audit group", || async {
        let audit = notes(store)
            .await
            .into_iter()
            .filter(|(author, _)| author == "audit")
            .count();
        (audit >= expected).then_some(())
    })
    .await;
}

/// A nested send commits with its parent: both writes and the child's event; when the parent
/// fails afterwards, neither write nor the event exists; when the child fails and the parent
/// tolerates it, only the child's write is undone.
async fn a_nested_send_is_atomic_with_its_parent(backend: Backend) {
    let db = TestDb::new(backend, "nested_atomic").await;
    let store = store(&db).await;
    let app = base(store.clone()).build().await.unwrap();
    let relay = app.start();

    app.send(Parent {
        child: "kept".into(),
        fail_after: false,
        tolerate: false,
    })
    .await
    .unwrap();

    let error = app
        .send(Parent {
            child: "dropped".into(),
            fail_after: true,
            tolerate: false,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&error, DispatchError::Handler(NoteError::Refused(what)) if what == "the parent"),
        "{error:?}"
    );

    app.send(Parent {
        child: "!refused".into(),
        fail_after: false,
        tolerate: true,
    })
    .await
    .unwrap();

    audited(&store, 1).await;
    // Long enough for an event that should not exist to be delivered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.shutdown().await;
    assert_eq!(
        notes(&store).await,
        [
            ("audit".to_owned(), "kept".to_owned()),
            ("child".to_owned(), "kept".to_owned()),
            ("parent".to_owned(), "!refused".to_owned()),
            ("parent".to_owned(), "kept".to_owned()),
        ]
    );
    let pending = store.lag().await.unwrap();
    assert!(pending.groups.is_empty(), "{pending:?}");
}

/// An inline subscriber of the parent's event sends the child with `EventContext::send`: it
/// joins the parent's unit of work, so the parent's later failure undoes it.
#[derive(Debug, Command)]
#[command(output = (), error = NoteError, name = "nested.announce")]
struct Announce {
    line: String,
    fail_after: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, Event)]
#[event(name = "nested.announced", version = 1)]
struct Announced {
    line: String,
}

#[command_handler]
async fn announce(cmd: Announce, ctx: &mut CommandContext<'_>) -> Result<(), NoteError> {
    ctx.publish(Announced { line: cmd.line });
    if cmd.fail_after {
        return Err(NoteError::Refused("the announcement".into()));
    }
    Ok(())
}

#[event_handler(inline)]
async fn announce_inline(
    ev: &Envelope<Announced>,
    ctx: &mut EventContext<'_>,
) -> Result<(), BoxError> {
    ctx.send(WriteNote {
        line: format!("inline {}", ev.payload.line),
    })
    .await?;
    Ok(())
}

/// A group subscriber sends the child: it commits with the delivery (and the inbox row).
#[event_handler(group = "relay")]
async fn announce_later(
    ev: &Envelope<Announced>,
    ctx: &mut EventContext<'_>,
) -> Result<(), BoxError> {
    ctx.send(WriteNote {
        line: format!("group {}", ev.payload.line),
    })
    .await?;
    Ok(())
}

async fn event_context_send_joins_the_unit_of_work(backend: Backend) {
    let db = TestDb::new(backend, "nested_event_send").await;
    let store = store(&db).await;
    let app = base(store.clone())
        .handler::<announce>()
        .handler::<announce_inline>()
        .handler::<announce_later>()
        .build()
        .await
        .unwrap();
    let relay = app.start();

    app.send(Announce {
        line: "one".into(),
        fail_after: false,
    })
    .await
    .unwrap();
    // The announcement fails after its inline subscriber sent the child: nothing of either.
    app.send(Announce {
        line: "two".into(),
        fail_after: true,
    })
    .await
    .unwrap_err();

    // The inline child's and the group child's notes, each audited once.
    audited(&store, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.shutdown().await;
    assert_eq!(
        notes(&store).await,
        [
            ("audit".to_owned(), "group one".to_owned()),
            ("audit".to_owned(), "inline one".to_owned()),
            ("child".to_owned(), "group one".to_owned()),
            ("child".to_owned(), "inline one".to_owned()),
        ]
    );
}

/// A saga step sends the child through its context: committed with the saga's state.
#[derive(Debug, Clone, EventSet)]
enum NoteFlow {
    Announced(Announced),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct NoteSaga {
    seen: u32,
}

impl Saga for NoteSaga {
    const NAME: &'static str = "note_saga";
    type Event = NoteFlow;

    fn starts(_: &NoteFlow) -> bool {
        true
    }

    async fn handle(
        &mut self,
        event: &NoteFlow,
        ctx: &mut SagaContext<'_, '_>,
    ) -> Result<(), BoxError> {
        let NoteFlow::Announced(announced) = event;
        self.seen += 1;
        ctx.send(WriteNote {
            line: format!("saga {}", announced.line),
        })
        .await?;
        ctx.complete();
        Ok(())
    }
}

async fn a_saga_step_sends_in_its_unit_of_work(backend: Backend) {
    let db = TestDb::new(backend, "nested_saga_send").await;
    let store = store(&db).await;
    let app = base(store.clone())
        .handler::<announce>()
        .saga::<NoteSaga>()
        .build()
        .await
        .unwrap();
    let relay = app.start();
    app.send(Announce {
        line: "three".into(),
        fail_after: false,
    })
    .await
    .unwrap();
    audited(&store, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.shutdown().await;
    assert_eq!(
        notes(&store).await,
        [
            ("audit".to_owned(), "saga three".to_owned()),
            ("child".to_owned(), "saga three".to_owned()),
        ]
    );
}

/// `App::send` from inside a handler's unit of work fails at once, typed, and nothing of the
/// inner command runs; the outer command's error carries it.
#[derive(Debug, Command)]
#[command(output = (), error = NoteError, name = "nested.detached")]
struct Detached;

#[command_handler]
async fn detached(_: Detached, ctx: &mut CommandContext<'_>, app: App) -> Result<(), NoteError> {
    note(ctx, "parent", "detached").await?;
    app.send(WriteNote {
        line: "detached".into(),
    })
    .await?;
    Ok(())
}

async fn app_send_inside_a_unit_of_work_is_refused_at_once(backend: Backend) {
    let db = TestDb::new(backend, "nested_detached").await;
    let store = store(&db).await;
    let app = base(store.clone())
        .handler::<detached>()
        .build()
        .await
        .unwrap();
    let started = Instant::now();
    let error = app.send(Detached).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5), "it stalled");
    let DispatchError::Handler(NoteError::Failed(failure)) = error else {
        panic!("expected the inner send's failure, got {error:?}");
    };
    match &*failure {
        DispatchFailure::OutsideUnit { message } => {
            assert!(message.ends_with("WriteNote"), "{message}");
        }
        other => panic!("expected OutsideUnit, got {other:?}"),
    }
    assert!(
        failure.to_string().contains("send it with `ctx.send(..)`"),
        "{failure}"
    );
    assert!(notes(&store).await.is_empty());
}

/// A command handler that panics after it wrote: the caller gets a typed failure naming the
/// handler and the panic, and nothing of the command is committed.
#[derive(Debug, Command)]
#[command(output = (), error = NoteError, name = "nested.panicking")]
struct Panicking;

#[command_handler]
async fn panicking(_: Panicking, ctx: &mut CommandContext<'_>) -> Result<(), NoteError> {
    note(ctx, "parent", "before the panic").await?;
    panic!("the handler gave up");
}

async fn a_panicking_command_handler_rolls_back(backend: Backend) {
    let db = TestDb::new(backend, "nested_panic").await;
    let store = store(&db).await;
    let app = base(store.clone())
        .handler::<panicking>()
        .build()
        .await
        .unwrap();
    let error = app.send(Panicking).await.unwrap_err();
    match error.failure() {
        Some(DispatchFailure::Panicked { handler, reason }) => {
            assert!(handler.ends_with("panicking"), "{handler}");
            assert_eq!(reason, "the handler gave up");
        }
        other => panic!("expected Panicked, got {other:?}"),
    }
    assert!(notes(&store).await.is_empty());
    // The app goes on.
    app.send(WriteNote {
        line: "after".into(),
    })
    .await
    .unwrap();
    assert_eq!(notes(&store).await.len(), 1);
}

/// Adds one item to a cart after sleeping 15 s between loading and saving.
#[derive(Debug, Command)]
#[command(output = u64, error = cart::CartError, name = "nested.slow_add")]
struct SlowAdd {
    cart: String,
}

#[command_handler]
async fn slow_add(cmd: SlowAdd, ctx: &mut CommandContext<'_>) -> Result<u64, cart::CartError> {
    let mut cart = ctx.load::<Cart>(&cmd.cart).await?;
    tokio::time::sleep(Duration::from_secs(15)).await;
    cart.emit(ItemAdded {
        sku: "slow".into(),
        qty: 1,
        unit_price: 1,
    });
    Ok(ctx.save(cart).await?)
}

/// A command that sleeps 15 s between loading and saving does not fail a concurrent command,
/// which completes at once; then the sleeper saves too.
async fn a_slow_command_does_not_hold_up_the_others(backend: Backend) {
    let db = TestDb::new(backend, "nested_slow").await;
    let store = store(&db).await;
    let app = cart::builder(store.clone(), Gate::default())
        .handler::<slow_add>()
        .build()
        .await
        .unwrap();
    let slow = {
        let app = app.clone();
        tokio::spawn(async move { app.send(SlowAdd { cart: "c".into() }).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let version = app
        .send(AddItems {
            cart: "other".into(),
            sku: "tea".into(),
            count: 1,
        })
        .await
        .unwrap();
    assert_eq!(version, 1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the quick command waited {:?}",
        started.elapsed()
    );
    assert!(!slow.is_finished());
    assert_eq!(slow.await.unwrap().unwrap(), 1);
}

/// Holds SQLite's write lock (its transaction) for 12 s.
#[derive(Debug, Command)]
#[command(output = (), error = NoteError, name = "nested.hog")]
struct Hog;

#[command_handler]
async fn hog(_: Hog, ctx: &mut CommandContext<'_>) -> Result<(), NoteError> {
    note(ctx, "hog", "holding the lock").await?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    Ok(())
}

/// On SQLite, a command that needs the write lock while another holds it for longer than the
/// wait fails, and its top-level message says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_lock_timeout_says_so_at_the_top() {
    let db = TestDb::new(Backend::Sqlite, "nested_lock_timeout").await;
    let store = store(&db).await;
    let app = cart::builder(store.clone(), Gate::default())
        .handler::<hog>()
        .build()
        .await
        .unwrap();
    let hog = {
        let app = app.clone();
        tokio::spawn(async move { app.send(Hog).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let error = app
        .send(AddItems {
            cart: "late".into(),
            sku: "tea".into(),
            count: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "the store failed to take SQLite's write lock in time"
    );
    assert!(
        inseam::error::Report(&error)
            .to_string()
            .contains("waited 10s for SQLite's write lock, which another unit of work of this app held all that time"),
        "{}",
        inseam::error::Report(&error)
    );
    hog.await.unwrap().unwrap();
}

inseam_tests::on_every_backend!(
    a_nested_send_is_atomic_with_its_parent,
    event_context_send_joins_the_unit_of_work,
    a_saga_step_sends_in_its_unit_of_work,
    app_send_inside_a_unit_of_work_is_refused_at_once,
    a_slow_command_does_not_hold_up_the_others,
    a_panicking_command_handler_rolls_back,
);
