//! The `inseam` command on real databases, SQLite and PostgreSQL: the standalone binary on a
//! database URL (`standalone_*`), and the same commands embedded in an app with its
//! registrations (`embedded_*`, through `inseam_cli::run_to`). Dead letters come from a
//! durable group whose handler fails; outcomes are read back through the store's API.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use inseam::prelude::*;
use inseam::sql::sqlx::{self, AssertSqlSafe, Row as _};
use inseam::sql::{EventInfo, Model, Projection, RelayOptions, SqlStoreOptions, SqlTx};
use inseam::{BoxError, MessageMeta};
use inseam_cli::Database;
use inseam_test::TestDatabase;
use serde_json::Value;

/// A note; the `notes` group fails on the text `poison`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "letters.noted", version = 1, key = topic)]
struct Noted {
    topic: String,
    text: String,
    n: i64,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot take `{0}`")]
struct Poison(String);

/// What the `notes` group handled, in order.
#[derive(Debug, Clone, Default)]
struct Taken(Arc<Mutex<Vec<String>>>);

impl Taken {
    fn texts(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[event_handler(group = "notes")]
async fn take_note(ev: &Envelope<Noted>, State(taken): State<Taken>) -> Result<(), Poison> {
    if ev.text == "poison" {
        return Err(Poison(ev.text.clone()));
    }
    taken
        .0
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(ev.text.clone());
    Ok(())
}

/// An account, event-sourced: its entries are kept for good and so can be replayed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "ledger.entered", version = 1)]
struct Entered {
    amount: i64,
}

#[derive(Debug, Clone, PartialEq, EventSet)]
enum LedgerEvent {
    Entered(Entered),
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Account {
    balance: i64,
}

impl Aggregate for Account {
    const TYPE: &'static str = "account";
    type Event = LedgerEvent;

    fn apply(&mut self, event: &LedgerEvent) {
        let LedgerEvent::Entered(entered) = event;
        self.balance += entered.amount;
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Command)]
#[command(output = u64, error = AggregateError, name = "ledger.enter")]
struct Enter {
    account: String,
    amount: i64,
}

#[command_handler]
async fn enter(cmd: Enter, ctx: &mut CommandContext<'_>) -> Result<u64, AggregateError> {
    let mut account = ctx.load::<Account>(&cmd.account).await?;
    account.emit(Entered { amount: cmd.amount });
    ctx.save(account).await
}

/// Balances per account, from the ledger's events.
struct Balances;

impl Projection for Balances {
    const NAME: &'static str = "ledger.balances";
    type Event = LedgerEvent;

    fn tables(&self) -> &'static [&'static str] {
        &["balances"]
    }

    async fn create(&self, tx: &mut SqlTx, model: Model) -> Result<(), sqlx::Error> {
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {} (account TEXT PRIMARY KEY, balance BIGINT NOT NULL)",
            model.table("balances")
        );
        sqlx::query(AssertSqlSafe(sql)).execute(tx).await.map(drop)
    }

    async fn apply(
        &self,
        event: &LedgerEvent,
        info: &EventInfo<'_>,
        tx: &mut SqlTx,
        model: Model,
    ) -> Result<(), BoxError> {
        let LedgerEvent::Entered(entered) = event;
        let account = info.key.ok_or("an entry without its account")?.to_owned();
        let table = model.table("balances");
        let sql = format!(
            "INSERT INTO {table} (account, balance) VALUES ($1, $2)
             ON CONFLICT (account) DO UPDATE SET balance = {table}.balance + excluded.balance"
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(account)
            .bind(entered.amount)
            .execute(tx)
            .await?;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh database; PostgreSQL's is dropped with the guard.
async fn database(backend: Backend, name: &str) -> TestDatabase {
    match backend {
        Backend::Sqlite => TestDatabase::sqlite().expect("a temporary directory"),
        Backend::Postgres => match TestDatabase::postgres(name).await {
            Ok(db) => db,
            Err(error) => panic!("PostgreSQL is required for this test: {error}"),
        },
    }
}

/// The app on a migrated store whose relay dead-letters at the first failure and keeps
/// delivered outbox rows `outbox_retention`; tests deliver with `deliver_due`.
async fn app(url: &str, outbox_retention: Duration) -> (SqlStore, App, Taken) {
    let relay = RelayOptions {
        max_attempts: 1,
        outbox_retention,
        ..RelayOptions::default()
    };
    let store = SqlStore::connect_with(url, SqlStoreOptions::new().relay(relay))
        .await
        .expect("connect the store");
    store.install(&Balances).await.expect("install balances");
    let taken = Taken::default();
    let app = App::builder()
        .store(store.clone())
        .state(taken.clone())
        .handler::<take_note>()
        .handler::<enter>()
        .aggregate::<Account>()
        .projection(Balances)
        .build()
        .await
        .expect("build the app");
    (store, app, taken)
}

fn note(topic: &str, text: &str, n: i64) -> Noted {
    Noted {
        topic: topic.to_owned(),
        text: text.to_owned(),
        n,
    }
}

/// Publishes `notes` in the flow `correlation` and delivers what is due.
async fn publish(store: &SqlStore, app: &App, correlation: uuid::Uuid, notes: Vec<Noted>) {
    for note in notes {
        app.publish_with(note, MessageMeta::new().correlation_id(correlation))
            .await
            .expect("publish");
    }
    store.deliver_due(app).await.expect("deliver");
}

async fn dead_letter_ids(store: &SqlStore) -> Vec<i64> {
    let letters = store
        .dead_letters(0, 1000)
        .await
        .expect("list dead letters");
    letters.iter().map(|l| l.id).collect()
}

/// What a run of the command gave: its exit code, standard output and standard error.
#[derive(Debug)]
struct Ran {
    code: i32,
    out: String,
    err: String,
}

impl Ran {
    fn json(&self) -> Value {
        serde_json::from_str(&self.out)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.out, self.err))
    }

    #[track_caller]
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "stdout: {}\nstderr: {}", self.out, self.err);
        self
    }
}

/// The standalone binary with `args`, `env` set and no `INSEAM_DATABASE_URL` from outside.
async fn inseam_env(args: &[&str], env: &[(&str, &str)]) -> Ran {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_inseam"));
    command
        .args(args)
        .env_remove("INSEAM_DATABASE_URL")
        .env_remove("VISUAL");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("run the inseam binary");
    Ran {
        code: output.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&output.stdout).into_owned(),
        err: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The standalone binary on `url`.
async fn inseam(url: &str, args: &[&str]) -> Ran {
    let mut all = vec!["--database-url", url];
    all.extend_from_slice(args);
    inseam_env(&all, &[]).await
}

/// The commands embedded in `app`, on `store`.
async fn embedded(app: &App, store: &SqlStore, args: &[&str]) -> Ran {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let all = std::iter::once("app-inseam").chain(args.iter().copied());
    let exit = inseam_cli::run_to(
        Some(app),
        Some(Database::from(store)),
        all,
        &mut out,
        &mut err,
    )
    .await;
    Ran {
        code: i32::from(exit.code()),
        out: String::from_utf8_lossy(&out).into_owned(),
        err: String::from_utf8_lossy(&err).into_owned(),
    }
}

fn not_found(id: i64) -> String {
    format!(
        "inseam: dead letter {id} does not exist (already retried or discarded, or never written)\n"
    )
}

/// Every standalone command on a database with dead letters, outcomes read back through the
/// store.
async fn standalone_commands(backend: Backend) {
    let db = database(backend, "cli_standalone").await;
    let url = db.url().to_owned();
    let (store, app, taken) = app(&url, Duration::from_secs(24 * 3600)).await;
    let flow = uuid::Uuid::now_v7();
    publish(
        &store,
        &app,
        flow,
        vec![
            note("a", "poison", 1),
            note("b", "poison", 2),
            note("c", "poison", 3),
            note("d", "fine", 4),
        ],
    )
    .await;
    let ids = dead_letter_ids(&store).await;
    assert_eq!(ids.len(), 3, "three dead letters");
    assert_eq!(taken.texts(), ["fine"]);

    // status: as a table and as JSON.
    let status = inseam(&url, &["status"]).await.ok();
    assert!(status.out.starts_with("GROUP"), "{}", status.out);
    assert!(status.out.contains("notes"), "{}", status.out);
    assert!(status.out.contains("3 dead letter(s)"), "{}", status.out);
    let status = inseam(&url, &["--json", "status"]).await.ok().json();
    let notes = status["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["group"] == "notes")
        .expect("the notes group")
        .clone();
    assert_eq!(notes["dead_letters"], 3);
    assert_eq!(notes["pending"], 0);
    assert_eq!(notes["paused"], Value::Null);
    assert_eq!(notes["handled_last_minute"], 1);
    assert_eq!(status["dead_letters"], 3);
    assert_eq!(status["outbox"]["rows"], 4);
    assert_eq!(status["outbox"]["retention_seconds"], 86_400.0);

    // dead-letters list and show.
    let listed = inseam(&url, &["dead-letters", "list", "--json"])
        .await
        .ok()
        .json();
    let listed = listed.as_array().expect("a list");
    let listed_ids: Vec<i64> = listed
        .iter()
        .map(|l| l["id"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(listed_ids, ids);
    assert_eq!(listed[0]["group"], "notes");
    assert_eq!(listed[0]["name"], "letters.noted");
    assert_eq!(listed[0]["attempts"], 1);
    let table = inseam(&url, &["dead-letters", "list"]).await.ok();
    assert!(table.out.contains("cannot take `poison`"), "{}", table.out);
    let shown = inseam(
        &url,
        &["--json", "dead-letters", "show", &ids[0].to_string()],
    )
    .await
    .ok()
    .json();
    assert_eq!(shown["payload"]["text"], "poison");
    assert_eq!(shown["payload"]["topic"], "a");
    assert_eq!(shown["correlation_id"], flow.to_string());
    let shown = inseam(&url, &["dead-letters", "show", &ids[0].to_string()])
        .await
        .ok();
    assert!(shown.out.contains("\"text\": \"poison\""), "{}", shown.out);

    // An unknown id: exit 3 and the store's own message, nothing else touched.
    for args in [
        &["dead-letters", "show", "999999"][..],
        &["dead-letters", "retry", "999999"],
        &["dead-letters", "discard", "999999"],
        &["dead-letters", "edit", "999999", "--file", "/dev/null"],
    ] {
        let ran = inseam(&url, args).await;
        assert_eq!(ran.code, 3, "{args:?}: {ran:?}");
        assert_eq!(ran.err, not_found(999_999), "{args:?}");
    }
    assert_eq!(dead_letter_ids(&store).await, ids);

    // edit in $EDITOR (a sed script here): only checked to be JSON, which the command says.
    let edited = inseam_env(
        &[
            "--database-url",
            &url,
            "dead-letters",
            "edit",
            &ids[0].to_string(),
        ],
        &[("EDITOR", "sed -i s/poison/mended/")],
    )
    .await;
    let edited = edited.ok();
    assert!(
        edited.err.contains("checked only by the app's own binary"),
        "{}",
        edited.err
    );
    let letter = store
        .dead_letter(ids[0])
        .await
        .expect("still a dead letter");
    let envelope = inseam::RawEnvelope::from_json(&letter.envelope).expect("an envelope");
    let payload: Value = serde_json::from_slice(&envelope.payload).expect("JSON");
    assert_eq!(payload["text"], "mended");

    // edit from a file that is not JSON: refused, the dead letter unchanged.
    let dir = tempfile::tempdir().expect("a directory");
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, b"{\"text\": mended").expect("write");
    let before = store.dead_letter(ids[1]).await.expect("a dead letter");
    let ran = inseam(
        &url,
        &[
            "dead-letters",
            "edit",
            &ids[1].to_string(),
            "--file",
            &bad.display().to_string(),
        ],
    )
    .await;
    assert_eq!(ran.code, 1, "{ran:?}");
    assert!(
        ran.err.starts_with(&format!(
            "inseam: the new payload of dead letter {} is not well-formed JSON, the dead letter is unchanged: ",
            ids[1]
        )),
        "{}",
        ran.err
    );
    assert_eq!(store.dead_letter(ids[1]).await.expect("unchanged"), before);

    // retry: the mended one is gone from the dead letters and delivered.
    let retried = inseam(
        &url,
        &["--json", "dead-letters", "retry", &ids[0].to_string()],
    )
    .await
    .ok()
    .json();
    assert_eq!(retried["retried"], serde_json::json!([ids[0]]));
    assert_eq!(dead_letter_ids(&store).await, ids[1..]);
    store.deliver_due(&app).await.expect("deliver");
    assert_eq!(taken.texts(), ["fine", "mended"]);

    // discard: gone for good.
    let discarded = inseam(&url, &["dead-letters", "discard", &ids[1].to_string()])
        .await
        .ok();
    assert_eq!(
        discarded.out,
        format!("discarded 1 dead letter(s): {}\n", ids[1])
    );
    assert_eq!(dead_letter_ids(&store).await, ids[2..]);

    // retry --all --group: back in the queue (pending), no dead letters left.
    let ran = inseam(
        &url,
        &["dead-letters", "retry", "--all", "--group", "notes"],
    )
    .await
    .ok();
    assert_eq!(ran.out, format!("retried 1 dead letter(s): {}\n", ids[2]));
    assert!(dead_letter_ids(&store).await.is_empty());
    let lag = store.lag().await.expect("lag");
    assert_eq!(lag.groups.len(), 1);
    assert_eq!(
        (lag.groups[0].group.as_str(), lag.groups[0].pending),
        ("notes", 1)
    );
    // --all without --group is bad usage.
    assert_eq!(
        inseam(&url, &["dead-letters", "retry", "--all"]).await.code,
        2
    );

    // groups pause / resume.
    let ran = inseam(
        &url,
        &["groups", "pause", "notes", "--reason", "maintenance"],
    )
    .await
    .ok();
    assert!(
        ran.out.starts_with("group `notes` paused (maintenance)"),
        "{}",
        ran.out
    );
    let paused = store.paused().await.expect("paused");
    assert_eq!(paused.len(), 1);
    assert_eq!(
        (paused[0].group.as_str(), paused[0].reason.as_str()),
        ("notes", "maintenance")
    );
    let status = inseam(&url, &["status", "--json"]).await.ok().json();
    let notes = status["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .find(|g| g["group"] == "notes")
        .expect("notes")
        .clone();
    assert_eq!(notes["paused"]["reason"], "maintenance");
    assert_eq!(notes["pending"], 1);
    // A paused group is not delivered to.
    store.deliver_due(&app).await.expect("deliver");
    assert_eq!(store.lag().await.expect("lag").groups[0].pending, 1);
    inseam(&url, &["groups", "resume", "notes"]).await.ok();
    assert!(store.paused().await.expect("paused").is_empty());
    let again = inseam(&url, &["groups", "resume", "notes"]).await;
    assert_eq!(
        (again.code, again.err.as_str()),
        (3, "inseam: group `notes` is not paused\n")
    );
    // A group the database never saw, unless forced.
    let typo = inseam(&url, &["groups", "pause", "nots"]).await;
    assert_eq!(typo.code, 3, "{typo:?}");
    assert!(
        typo.err
            .starts_with("inseam: no group `nots` in this database"),
        "{}",
        typo.err
    );
    assert!(store.paused().await.expect("paused").is_empty());
    inseam(&url, &["groups", "pause", "nots", "--force"])
        .await
        .ok();
    assert_eq!(store.paused().await.expect("paused")[0].group, "nots");
    inseam(&url, &["groups", "resume", "nots"]).await.ok();

    // flow: the stored names, without the app's kinds.
    store.deliver_due(&app).await.expect("deliver");
    let text = inseam(&url, &["flow", &flow.to_string()]).await.ok();
    let lines: Vec<&str> = text.out.lines().collect();
    assert_eq!(lines.len(), 8, "{}", text.out);
    assert_eq!(
        lines[0],
        r#"message letters.noted {"n":1,"text":"poison","topic":"a"}"#
    );
    assert_eq!(lines[7], "  -> notes: handled");
    assert!(
        lines[5].starts_with("  -> notes: dead letter after 1 attempt(s): "),
        "{}",
        lines[5]
    );
    let json = inseam(&url, &["flow", &flow.to_string(), "--json"])
        .await
        .ok()
        .json();
    let messages = json["messages"].as_array().expect("messages");
    assert_eq!(messages.len(), 4);
    assert_eq!(messages[3]["payload"]["text"], "fine");
    assert_eq!(messages[3]["deliveries"][0]["state"], "handled");
    let bad = inseam(&url, &["flow", "not-a-uuid"]).await;
    assert_eq!(bad.code, 2);
    assert!(
        bad.err
            .starts_with("inseam: `not-a-uuid` is not a correlation id (a UUID): ")
    );
    let none = uuid::Uuid::now_v7();
    let missing = inseam(&url, &["flow", &none.to_string()]).await;
    assert_eq!(missing.code, 3);
    assert!(
        missing
            .err
            .starts_with(&format!("inseam: no flow {none} in the outbox"))
    );

    // outbox prune: nothing within the store's retention; everything delivered with 0s.
    let pruned = inseam(&url, &["--json", "outbox", "prune"])
        .await
        .ok()
        .json();
    assert_eq!(pruned["outbox"], 0);
    assert_eq!(pruned["outbox_retention_seconds"], 86_400.0);
    let pruned = inseam(&url, &["--json", "outbox", "prune", "--keep-outbox", "0s"])
        .await
        .ok()
        .json();
    let status = store
        .status(&[], Duration::from_secs(60))
        .await
        .expect("status");
    assert_eq!(status.outbox_rows, 0);
    assert_eq!(pruned["outbox"], 4);

    // The commands that need the app's code say so.
    for args in [
        &["catalog"][..],
        &["projection", "rebuild", "ledger.balances"],
    ] {
        let ran = inseam(&url, args).await;
        assert_eq!(ran.code, 2, "{ran:?}");
        assert!(
            ran.err
                .contains("needs the app's code: run it from the app's own binary"),
            "{}",
            ran.err
        );
    }

    // A newer schema than this binary's: refused, whatever the command.
    sqlx::query("INSERT INTO inseam_migrations (version, applied_at) VALUES (99, 0)")
        .execute(store.pool())
        .await
        .expect("a newer migration");
    let ran = inseam(&url, &["status"]).await;
    assert_eq!(ran.code, 4, "{ran:?}");
    assert!(
        ran.err
            .starts_with("inseam: schema version 99 is newer than this binary's "),
        "{}",
        ran.err
    );
    // An older one (the app not restarted since an upgrade): refused too, never migrated.
    let newest: i64 = sqlx::query("SELECT MAX(version) FROM inseam_migrations WHERE version < 99")
        .fetch_one(store.pool())
        .await
        .expect("the schema version")
        .get(0);
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM inseam_migrations WHERE version >= {newest}"
    )))
    .execute(store.pool())
    .await
    .expect("forget the newest migrations");
    let ran = inseam(&url, &["dead-letters", "list"]).await;
    assert_eq!(ran.code, 4, "{ran:?}");
    assert_eq!(
        ran.err,
        format!(
            "inseam: schema version {} is older than this binary's {newest}: start the app (which migrates its database) before operating it with this binary\n",
            newest - 1
        )
    );
}

/// A database without inseam's tables is refused, and left without them.
async fn standalone_refuses_other_databases(backend: Backend) {
    let db = database(backend, "cli_foreign").await;
    let url = db.url().to_owned();
    // Someone else's table, through the store's own pool type only to reach the database.
    match backend {
        Backend::Sqlite => {
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .connect_with(
                    url.parse::<sqlx::sqlite::SqliteConnectOptions>()
                        .expect("a SQLite URL")
                        .create_if_missing(true),
                )
                .await
                .expect("create the file");
            sqlx::query("CREATE TABLE things (id INTEGER)")
                .execute(&pool)
                .await
                .expect("a table");
            pool.close().await;
        }
        Backend::Postgres => {
            let pool = sqlx::postgres::PgPool::connect(&url)
                .await
                .expect("connect");
            sqlx::query("CREATE TABLE things (id INTEGER)")
                .execute(&pool)
                .await
                .expect("a table");
            pool.close().await;
        }
    }
    for args in [
        &["status"][..],
        &["dead-letters", "list"],
        &["groups", "pause", "x", "--force"],
    ] {
        let ran = inseam(&url, args).await;
        assert_eq!(ran.code, 4, "{ran:?}");
        assert_eq!(
            ran.err,
            "inseam: no inseam tables in this database (no table `inseam_migrations`): it is not an inseam app's database, its app never started, or its tables have another prefix\n"
        );
    }
    let tables = tables(backend, &url).await;
    assert_eq!(tables, ["things"]);
    // Another prefix is looked for as asked.
    let ran = inseam(&url, &["--table-prefix", "shop_", "status"]).await;
    assert_eq!(ran.code, 4);
    assert!(
        ran.err.contains("no table `shop_migrations`"),
        "{}",
        ran.err
    );
}

async fn tables(backend: Backend, url: &str) -> Vec<String> {
    let sql = match backend {
        Backend::Sqlite => "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name",
        Backend::Postgres => {
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public' ORDER BY table_name"
        }
    };
    match backend {
        Backend::Sqlite => {
            let pool = sqlx::sqlite::SqlitePool::connect(url)
                .await
                .expect("connect");
            let rows: Vec<String> = sqlx::query(sql)
                .fetch_all(&pool)
                .await
                .expect("tables")
                .iter()
                .map(|r| r.get::<String, _>(0))
                .collect();
            pool.close().await;
            rows
        }
        Backend::Postgres => {
            let pool = sqlx::postgres::PgPool::connect(url).await.expect("connect");
            let rows: Vec<String> = sqlx::query(sql)
                .fetch_all(&pool)
                .await
                .expect("tables")
                .iter()
                .map(|r| r.get::<String, _>(0))
                .collect();
            pool.close().await;
            rows
        }
    }
}

/// Embedded, an edited payload is checked against the group's decoder; projections rebuild;
/// the catalog renders; groups are the app's.
async fn embedded_commands(backend: Backend) {
    let db = database(backend, "cli_embedded").await;
    let (store, app, taken) = app(db.url(), Duration::ZERO).await;
    publish(
        &store,
        &app,
        uuid::Uuid::now_v7(),
        vec![note("a", "poison", 1)],
    )
    .await;
    let id = dead_letter_ids(&store).await[0];

    // status lists the app's groups, also those with nothing to report.
    let status = embedded(&app, &store, &["status", "--json"])
        .await
        .ok()
        .json();
    let groups: Vec<&str> = status["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .filter_map(|g| g["group"].as_str())
        .collect();
    assert_eq!(groups, ["ledger.balances", "notes"]);

    // A payload the decoder cannot read is refused, naming the field.
    let dir = tempfile::tempdir().expect("a directory");
    let file = dir.path().join("payload.json");
    std::fs::write(&file, br#"{"topic": "a", "text": "mended"}"#).expect("write");
    let path = file.display().to_string();
    let refused = embedded(
        &app,
        &store,
        &["dead-letters", "edit", &id.to_string(), "--file", &path],
    )
    .await;
    assert_eq!(refused.code, 1, "{refused:?}");
    // The decoder's own message, which names the message id in between.
    assert!(
        refused.err.starts_with(&format!(
            "inseam: dead letter {id} was not repaired: group `notes` cannot read the new payload: event `letters.noted` version 1 does not decode: "
        )),
        "{}",
        refused.err
    );
    assert!(
        refused
            .err
            .ends_with("application/json codec: missing field `n` at line 1 column 32\n"),
        "{}",
        refused.err
    );
    let unchanged = store.dead_letter(id).await.expect("still a dead letter");
    let envelope = inseam::RawEnvelope::from_json(&unchanged.envelope).expect("an envelope");
    assert_eq!(
        serde_json::from_slice::<Value>(&envelope.payload).expect("JSON")["text"],
        "poison"
    );
    std::fs::write(&file, br#"{"topic": "a", "text": "mended", "n": 7}"#).expect("write");
    let accepted = embedded(
        &app,
        &store,
        &[
            "--json",
            "dead-letters",
            "edit",
            &id.to_string(),
            "--file",
            &path,
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(accepted["checked_by_decoder"], true);
    assert_eq!(accepted["payload"]["n"], 7);
    embedded(&app, &store, &["dead-letters", "retry", &id.to_string()])
        .await
        .ok();
    store.deliver_due(&app).await.expect("deliver");
    assert_eq!(taken.texts(), ["mended"]);
    assert!(dead_letter_ids(&store).await.is_empty());

    // An unknown id, embedded as standalone.
    let ran = embedded(&app, &store, &["dead-letters", "discard", "424242"]).await;
    assert_eq!((ran.code, ran.err), (3, not_found(424_242)));

    // Pausing a group the app does not have.
    let ran = embedded(&app, &store, &["groups", "pause", "nots"]).await;
    assert_eq!(ran.code, 3);
    assert_eq!(
        ran.err,
        "inseam: no group `nots` in this app (groups: ledger.balances, notes)\n"
    );

    // projection rebuild: the model is rebuilt from the accounts' streams.
    for (account, amount) in [("x", 5), ("y", 7), ("x", 10)] {
        app.send(Enter {
            account: account.to_owned(),
            amount,
        })
        .await
        .expect("enter");
    }
    store.deliver_due(&app).await.expect("deliver");
    assert_eq!(
        balances(&store).await,
        [("x".to_owned(), 15), ("y".to_owned(), 7)]
    );
    sqlx::query("UPDATE balances SET balance = 0")
        .execute(store.pool())
        .await
        .expect("spoil the model");
    let rebuilt = embedded(
        &app,
        &store,
        &["--json", "projection", "rebuild", "ledger.balances"],
    )
    .await
    .ok()
    .json();
    assert_eq!(rebuilt["events"], 3);
    assert_eq!(
        balances(&store).await,
        [("x".to_owned(), 15), ("y".to_owned(), 7)]
    );
    assert!(store.paused().await.expect("paused").is_empty());
    let unknown = embedded(&app, &store, &["projection", "rebuild", "balance"]).await;
    assert_eq!(
        (unknown.code, unknown.err.as_str()),
        (
            3,
            "inseam: no projection `balance` in this app (projections: ledger.balances)\n"
        )
    );

    // flow with the app's kinds.
    let correlation = uuid::Uuid::now_v7();
    publish(&store, &app, correlation, vec![note("z", "fine", 1)]).await;
    let flow = embedded(&app, &store, &["flow", &correlation.to_string()])
        .await
        .ok();
    assert_eq!(
        flow.out,
        "event letters.noted {\"n\":1,\"text\":\"fine\",\"topic\":\"z\"}\n  -> notes: handled\n"
    );

    // catalog, in each format.
    let markdown = embedded(&app, &store, &["catalog"]).await.ok();
    assert!(markdown.out.contains("letters.noted"), "{}", markdown.out);
    assert_eq!(markdown.out, app.catalog().markdown());
    let mermaid = embedded(&app, &store, &["catalog", "--format", "mermaid"])
        .await
        .ok();
    assert_eq!(mermaid.out, app.catalog().mermaid());
    let asyncapi = embedded(&app, &store, &["catalog", "--format", "asyncapi"])
        .await
        .ok();
    assert!(
        asyncapi.out.starts_with("asyncapi: \"3.0.0\""),
        "{}",
        asyncapi.out
    );
    assert_eq!(
        asyncapi.out,
        app.catalog().asyncapi_yaml().expect("AsyncAPI")
    );

    // outbox prune with the app's retention (none kept here): delivered notes go, the
    // ledger's stream stays.
    let before = store
        .status(&[], Duration::from_secs(60))
        .await
        .expect("status")
        .outbox_rows;
    let pruned = embedded(&app, &store, &["--json", "outbox", "prune"])
        .await
        .ok()
        .json();
    let after = store
        .status(&[], Duration::from_secs(60))
        .await
        .expect("status")
        .outbox_rows;
    assert_eq!(pruned["outbox"], before - after);
    assert_eq!(
        after, 3,
        "the three ledger entries are a stream's, kept for good"
    );
}

async fn balances(store: &SqlStore) -> Vec<(String, i64)> {
    sqlx::query("SELECT account, balance FROM balances ORDER BY account")
        .fetch_all(store.pool())
        .await
        .expect("balances")
        .iter()
        .map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1)))
        .collect()
}

/// Usage and URL errors need no database.
#[tokio::test]
async fn usage_and_url_errors() {
    let ran = inseam_env(&["status"], &[]).await;
    assert_eq!(ran.code, 2);
    assert_eq!(
        ran.err,
        "inseam: no database: give --database-url URL or set INSEAM_DATABASE_URL\n"
    );
    let ran = inseam_env(&["frobnicate"], &[]).await;
    assert_eq!(ran.code, 2);
    assert!(
        ran.err.contains("unrecognized subcommand 'frobnicate'"),
        "{}",
        ran.err
    );
    let ran = inseam_env(&["--help"], &[]).await.ok();
    assert!(ran.out.contains("dead-letters"), "{}", ran.out);
    let ran = inseam("mysql://127.0.0.1/app", &["status"]).await;
    assert_eq!(ran.code, 4);
    assert_eq!(
        ran.err,
        "inseam: unsupported database URL scheme `mysql`: use `sqlite://path` (feature `sqlite`) or `postgres://...` (feature `postgres`)\n"
    );
    let ran = inseam("postgres://postgres@127.0.0.1:1/app", &["status"]).await;
    assert_eq!(ran.code, 4, "{ran:?}");
    assert!(
        ran.err
            .starts_with("inseam: database error while trying to connect to the database: "),
        "{}",
        ran.err
    );
    let dir = tempfile::tempdir().expect("a directory");
    let missing = dir.path().join("missing.db");
    let ran = inseam(&format!("sqlite://{}", missing.display()), &["status"]).await;
    assert_eq!(ran.code, 4, "{ran:?}");
    assert!(!missing.exists(), "the command created a database file");
    let ran = inseam_env(&["status"], &[("INSEAM_DATABASE_URL", "mysql://x")]).await;
    assert_eq!(ran.code, 4, "the variable is read: {ran:?}");
    let ran = inseam(
        "sqlite://x.db",
        &["outbox", "prune", "--keep-outbox", "3 weeks"],
    )
    .await;
    assert_eq!(ran.code, 2);
}

/// An app whose tables have another prefix is operated with `--table-prefix`.
#[tokio::test]
async fn a_table_prefix_is_followed() {
    let db = database(Backend::Sqlite, "cli_prefix").await;
    let relay = RelayOptions {
        max_attempts: 1,
        ..RelayOptions::default()
    };
    let options = SqlStoreOptions::new().table_prefix("app_").relay(relay);
    let store = SqlStore::connect_with(db.url(), options)
        .await
        .expect("connect the store");
    let app = App::builder()
        .store(store.clone())
        .state(Taken::default())
        .handler::<take_note>()
        .build()
        .await
        .expect("build the app");
    publish(
        &store,
        &app,
        uuid::Uuid::now_v7(),
        vec![note("a", "poison", 1)],
    )
    .await;
    let id = dead_letter_ids(&store).await[0];
    let without = inseam(db.url(), &["status"]).await;
    assert_eq!(without.code, 4, "{without:?}");
    assert!(
        without.err.contains("no table `inseam_migrations`"),
        "{}",
        without.err
    );
    let listed = inseam(
        db.url(),
        &["--table-prefix", "app_", "dead-letters", "list", "--json"],
    )
    .await
    .ok()
    .json();
    assert_eq!(listed[0]["id"], id);
    inseam(
        db.url(),
        &[
            "--table-prefix",
            "app_",
            "dead-letters",
            "discard",
            &id.to_string(),
        ],
    )
    .await
    .ok();
    assert!(dead_letter_ids(&store).await.is_empty());
    let bad = inseam(db.url(), &["--table-prefix", "App-", "status"]).await;
    assert_eq!(bad.code, 2, "a malformed argument: {bad:?}");
    assert!(
        bad.err.starts_with("inseam: invalid table prefix `App-`"),
        "{}",
        bad.err
    );
}

mod sqlite {
    #[tokio::test]
    async fn standalone_commands() {
        super::standalone_commands(super::Backend::Sqlite).await;
    }

    #[tokio::test]
    async fn standalone_refuses_other_databases() {
        super::standalone_refuses_other_databases(super::Backend::Sqlite).await;
    }

    #[tokio::test]
    async fn embedded_commands() {
        super::embedded_commands(super::Backend::Sqlite).await;
    }
}

mod postgres {
    #[tokio::test]
    async fn standalone_commands() {
        super::standalone_commands(super::Backend::Postgres).await;
    }

    #[tokio::test]
    async fn standalone_refuses_other_databases() {
        super::standalone_refuses_other_databases(super::Backend::Postgres).await;
    }

    #[tokio::test]
    async fn embedded_commands() {
        super::embedded_commands(super::Backend::Postgres).await;
    }
}
