//! Testing inseam apps the way they run: a real store (a temporary SQLite file, a fresh
//! PostgreSQL database dropped when the test ends, or a database you give), a manual clock and
//! sequential ids so that every run is the same, the relay run to quiescence in the test's own
//! task (no sleeps), given/when/then scenarios, the flow a command caused as stable text for
//! `insta` (every command, event and timer, and where it went: handled, retried,
//! dead-lettered or not needed, group by group), and event contracts checked against the
//! app's catalog (`assert_contracts`).
//!
//! ```ignore
//! let test = TestApp::new(|builder, store| shop::configure(builder, store, &World::default())).await?;
//! let flow = test
//!     .given_events::<Order>("o-1", [OrderPlaced { .. }.into()])
//!     .await?
//!     .when(ConfirmOrder { order_id: "o-1".into() })
//!     .await;
//! flow.assert_ok();
//! insta::assert_snapshot!(flow.text());
//! ```
//!
//! The same test on PostgreSQL: `TestApp::postgres(..)` instead of `TestApp::new(..)`. It runs
//! on a database of its own, created for the test on the server at `INSEAM_TEST_POSTGRES`
//! (default `postgres://postgres@127.0.0.1:5432`) and dropped when the `TestApp` is dropped,
//! also when the test fails (see [`TestDatabase`]).

mod database;

use std::time::Duration;

use chrono::{DateTime, Utc};
use inseam::catalog::{EventDoc, sorted};
use inseam::sql::SqlStore;
use inseam::{
    Aggregate, AggregateError, App, AppBuilder, Catalog, Command, DispatchError, Headers,
    ManualClock, MessageMeta, Metadata, RawEnvelope, SequentialIds,
};

pub use database::{TestDatabase, postgres_server};

/// Why a test app or database could not be set up or driven.
///
/// Its `Debug` form is its message and causes, so that a test's `.unwrap()` says what went
/// wrong and what to do.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum TestError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] inseam::sql::Error),
    /// The app's wiring is wrong.
    #[error(transparent)]
    Build(#[from] inseam::BuildError),
    /// Setting up the temporary database failed.
    #[error("could not create a temporary database: {0}")]
    TempDir(#[from] std::io::Error),
    /// The PostgreSQL server cannot be reached.
    #[error(
        "PostgreSQL is not reachable at {server}: {source}\n\
         Start the local server with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, \
         or set {env} to the URL of one that trusts the test's user (default {default})",
        env = database::POSTGRES_ENV,
        default = database::DEFAULT_POSTGRES,
    )]
    PostgresUnreachable {
        /// The URL tried (the server's `postgres` database).
        server: String,
        /// Why.
        #[source]
        source: inseam::sql::sqlx::Error,
    },
    /// Creating or dropping a test database failed.
    #[error("could not {operation} the test database `{database}`")]
    Database {
        /// `create` or `drop`.
        operation: &'static str,
        /// The database.
        database: String,
        /// Why.
        #[source]
        source: inseam::sql::sqlx::Error,
    },
    /// A "given" step failed.
    #[error("a given step failed: {0}")]
    Given(String),
}

impl std::fmt::Debug for TestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")?;
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            write!(f, "\n  caused by: {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// The instant a test app's clock starts at: 2030-01-01T00:00:00Z.
pub fn epoch() -> DateTime<Utc> {
    DateTime::from_timestamp(1_893_456_000, 0).unwrap_or_default()
}

/// An app on a real store, with a manual clock and sequential ids; the relay does not run in
/// the background: [`settle`](Self::settle) delivers everything that is due.
///
/// The app keeps the events no group subscribes to (`keep_unsubscribed_events`), so that a
/// flow shows every event a command caused.
#[derive(Debug)]
pub struct TestApp {
    /// The app.
    pub app: App,
    /// Its store.
    pub store: SqlStore,
    /// Its clock, standing at [`epoch`] until advanced.
    pub clock: ManualClock,
    flows: std::sync::atomic::AtomicU64,
    /// Last: dropped after the app and the store.
    database: Option<TestDatabase>,
}

impl TestApp {
    /// An app on a fresh SQLite file, configured by `configure` (register handlers, state,
    /// sagas, projections; the builder comes with the store, clock and ids set).
    pub async fn new(
        configure: impl FnOnce(AppBuilder, &SqlStore) -> AppBuilder,
    ) -> Result<Self, TestError> {
        Self::on_database(TestDatabase::sqlite()?, configure).await
    }

    /// An app on a fresh PostgreSQL database, named after the running test and dropped with
    /// the app (see [`TestDatabase::postgres`]), configured like [`new`](Self::new).
    ///
    /// ```no_run
    /// # async fn run(configure: fn(inseam::AppBuilder, &inseam::SqlStore) -> inseam::AppBuilder) {
    /// let test = inseam_test::TestApp::postgres(configure).await.unwrap();
    /// // ... given, when, then ...
    /// # }
    /// ```
    pub async fn postgres(
        configure: impl FnOnce(AppBuilder, &SqlStore) -> AppBuilder,
    ) -> Result<Self, TestError> {
        let database = TestDatabase::postgres(&database::current_test_name()).await?;
        Self::on_database(database, configure).await
    }

    /// An app on `database`, which the app then owns: the database goes when the app does.
    pub async fn on_database(
        database: TestDatabase,
        configure: impl FnOnce(AppBuilder, &SqlStore) -> AppBuilder,
    ) -> Result<Self, TestError> {
        let store = SqlStore::connect(database.url()).await?;
        let mut test = Self::on(store, configure).await?;
        test.database = Some(database);
        Ok(test)
    }

    /// An app on `store` (a database the test manages itself).
    pub async fn on(
        store: SqlStore,
        configure: impl FnOnce(AppBuilder, &SqlStore) -> AppBuilder,
    ) -> Result<Self, TestError> {
        let clock = ManualClock::new(epoch());
        let builder = App::builder()
            .store(store.clone())
            .clock(clock.clone())
            .ids(SequentialIds::default())
            .keep_unsubscribed_events();
        let app = configure(builder, &store).build().await?;
        Ok(TestApp {
            app,
            store,
            clock,
            flows: std::sync::atomic::AtomicU64::new(0),
            database: None,
        })
    }

    /// The database the app runs on, when it owns it ([`new`](Self::new),
    /// [`postgres`](Self::postgres), [`on_database`](Self::on_database)).
    pub fn database(&self) -> Option<&TestDatabase> {
        self.database.as_ref()
    }

    /// Closes the store's connections and drops the app's database now, reporting a failure
    /// (dropping the `TestApp` does the same, and can only log one).
    pub async fn close(self) -> Result<(), TestError> {
        let TestApp {
            app,
            store,
            database,
            ..
        } = self;
        drop(app);
        store.pool().close().await;
        drop(store);
        match database {
            Some(database) => database.close().await,
            None => Ok(()),
        }
    }

    /// Delivers everything due until nothing is left; returns how many deliveries ran.
    pub async fn settle(&self) -> Result<u64, TestError> {
        Ok(self.store.deliver_due(&self.app).await?)
    }

    /// Moves the clock forward by `by` and delivers what became due (timeouts, scheduled
    /// commands, retries).
    pub async fn advance(&self, by: Duration) -> Result<u64, TestError> {
        self.clock.advance(by);
        self.settle().await
    }

    /// A fresh flow (correlation id), numbered so that runs are alike.
    fn next_flow(&self) -> uuid::Uuid {
        let n = self
            .flows
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        uuid::Uuid::from_u128((0xf10f_u128 << 112) | u128::from(n))
    }

    /// Given: `command` was handled (and everything it caused settled).
    pub async fn given<C: Command>(&self, command: C) -> Result<&Self, TestError> {
        let meta = MessageMeta::new().correlation_id(self.next_flow());
        self.app
            .send_with(command, meta)
            .await
            .map_err(|e| TestError::Given(e.to_string()))?;
        self.settle().await?;
        Ok(self)
    }

    /// Given: aggregate `A` with `id` has these events (published like any, and settled).
    pub async fn given_events<A: Aggregate>(
        &self,
        id: &str,
        events: impl IntoIterator<Item = A::Event>,
    ) -> Result<&Self, TestError> {
        let meta = MessageMeta::new().correlation_id(self.next_flow());
        self.app
            .append::<A>(id, events.into_iter().collect(), meta)
            .await
            .map_err(|e: DispatchError<AggregateError>| TestError::Given(e.to_string()))?;
        self.settle().await?;
        Ok(self)
    }

    /// When: `command` is sent in a flow of its own, and everything it causes settles.
    pub async fn when<C: Command>(&self, command: C) -> Flow<C> {
        let correlation = self.next_flow();
        let meta = MessageMeta::new().correlation_id(correlation);
        let outcome = self.app.send_with(command, meta).await;
        let settled = self.settle().await.err().map(|e| e.to_string());
        Flow {
            outcome,
            correlation,
            lines: self.lines(correlation).await,
            settle_error: settled,
        }
    }

    /// The flow with `correlation` as text: one line per message (command, event, timer), in
    /// order, each followed by one indented line per group it was routed to, saying whether
    /// that group handled it, is to retry it (with the failure), dead-lettered it, or did not
    /// need it (a saga's timeout after the saga completed); `(no group subscribes)` under an
    /// event that no group receives.
    pub async fn lines(&self, correlation: uuid::Uuid) -> Vec<String> {
        let entries = match self.store.flow(correlation).await {
            Ok(entries) => entries,
            Err(error) => return vec![format!("<the flow could not be read: {error}>")],
        };
        inseam::sql::flow_lines(&entries, Some(&self.app))
    }
}

/// What a command caused: its outcome and every message of its flow.
#[derive(Debug)]
pub struct Flow<C: Command> {
    /// What `send` returned.
    pub outcome: Result<C::Output, DispatchError<C::Error>>,
    /// The flow's correlation id.
    pub correlation: uuid::Uuid,
    /// The flow's messages, as text.
    pub lines: Vec<String>,
    settle_error: Option<String>,
}

impl<C: Command> Flow<C>
where
    C::Output: std::fmt::Debug,
{
    /// Then: the command succeeded; returns its output.
    #[track_caller]
    pub fn assert_ok(&self) -> &C::Output {
        if let Some(error) = &self.settle_error {
            panic!("delivering the flow failed: {error}");
        }
        match &self.outcome {
            Ok(output) => output,
            Err(error) => panic!("expected the command to succeed, it failed: {error}"),
        }
    }

    /// Then: the command failed with exactly `message`.
    #[track_caller]
    pub fn assert_error(&self, message: &str) {
        match &self.outcome {
            Ok(output) => panic!("expected the error `{message}`, the command returned {output:?}"),
            Err(error) => assert_eq!(error.to_string(), message),
        }
    }

    /// Then: these events, in this order, are the flow's events (names only; every event the
    /// command caused, whoever subscribes to it).
    #[track_caller]
    pub fn assert_events(&self, names: &[&str]) {
        let events: Vec<&str> = self
            .lines
            .iter()
            .filter_map(|line| line.strip_prefix("event "))
            .filter_map(|rest| rest.split(' ').next())
            .collect();
        assert_eq!(events, names, "the flow's events");
    }

    /// The flow as text, for a snapshot: the command sent and its outcome, then one line per
    /// message it caused, each followed by where it went (see [`TestApp::lines`]).
    pub fn text(&self) -> String {
        let outcome = match &self.outcome {
            Ok(output) => format!("ok: {output:?}"),
            Err(error) => format!("error: {error}"),
        };
        let mut text = format!("when {} -> {outcome}\n", C::NAME);
        for line in &self.lines {
            text.push_str(line);
            text.push('\n');
        }
        text
    }
}

/// The contract of event `E`: its name, version, content type, the JSON schema of its payload
/// and its wire form (the CloudEvents envelope it travels in, with placeholders for the values
/// of one message), as stored under `contracts/<name>.v<version>.json`.
pub fn contract<E: inseam::Event + schemars::JsonSchema>() -> serde_json::Value {
    let schema = sorted(serde_json::to_value(schemars::schema_for!(E)).unwrap_or_default());
    contract_value(
        E::NAME,
        E::VERSION,
        <E::Codec as inseam::Codec>::CONTENT_TYPE,
        &schema,
    )
}

/// The contract of a catalogued event; `None` when its type does not derive
/// `schemars::JsonSchema`.
pub fn catalog_contract(event: &EventDoc) -> Option<serde_json::Value> {
    let schema = event.schema.as_ref()?;
    Some(contract_value(
        event.name,
        event.version,
        event.content_type,
        schema,
    ))
}

fn contract_value(
    name: &str,
    version: u32,
    content_type: &str,
    schema: &serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "name": name,
        "version": version,
        "content_type": content_type,
        "schema": schema,
        "wire": wire_form(name, version, content_type),
    })
}

/// The envelope an event travels in, with placeholders: nil ids, the test epoch, `<source>`,
/// `<key>` and `<payload>` for what differs between messages.
fn wire_form(name: &str, version: u32, content_type: &str) -> serde_json::Value {
    let nil = uuid::Uuid::nil();
    let json = inseam::envelope::is_json(content_type);
    let envelope = RawEnvelope {
        metadata: Metadata {
            message_id: nil,
            correlation_id: nil,
            causation_id: Some(nil),
        },
        name: name.to_owned(),
        version,
        key: Some("<key>".to_owned()),
        occurred_at: epoch(),
        source: "<source>".to_owned(),
        headers: Headers::default(),
        content_type: content_type.to_owned(),
        payload: if json {
            b"\"<payload>\"".to_vec()
        } else {
            b"<payload>".to_vec()
        },
    };
    // The placeholder payload is valid in both forms, so rendering cannot fail; if it ever
    // did, the contract says so rather than recording nothing.
    match envelope
        .to_json()
        .map_err(|e| e.to_string())
        .and_then(|bytes| serde_json::from_slice(&bytes).map_err(|e| e.to_string()))
    {
        Ok(wire) => wire,
        Err(error) => serde_json::Value::String(format!("<the wire form failed: {error}>")),
    }
}

/// Checks event `E`'s contract against the one recorded in `dir` for its name and version.
/// A different contract under the same version fails, saying so: bump the version (and
/// register an upcaster) instead. A contract not recorded yet is written, and the check fails
/// so that it is reviewed and committed; set `INSEAM_ACCEPT_NEW_CONTRACTS=1` to write new ones
/// without failing.
#[track_caller]
pub fn assert_contract<E: inseam::Event + schemars::JsonSchema>(dir: &std::path::Path) {
    if let Err(problem) = check_contract(E::NAME, E::VERSION, &contract::<E>(), dir) {
        panic!("{problem}");
    }
}

/// Checks the contract of every event in `catalog` (except inseam's own) against `dir`, as
/// [`assert_contract`] does for one, and fails listing every problem: a changed contract
/// without a version bump, a new contract (written, to review), an event whose type does not
/// derive `schemars::JsonSchema`.
#[track_caller]
pub fn assert_contracts(catalog: &Catalog, dir: &std::path::Path) {
    let mut problems = Vec::new();
    for event in catalog.contracts() {
        let outcome = match catalog_contract(event) {
            Some(contract) => check_contract(event.name, event.version, &contract, dir),
            None => Err(format!(
                "event `{}` version {} (`{}`) has no payload schema: derive `schemars::JsonSchema` on it so that its contract is recorded",
                event.name, event.version, event.rust_type
            )),
        };
        if let Err(problem) = outcome {
            problems.push(problem);
        }
    }
    if !problems.is_empty() {
        panic!(
            "{} contract problem(s):\n\n{}",
            problems.len(),
            problems.join("\n\n")
        );
    }
}

fn check_contract(
    name: &str,
    version: u32,
    current: &serde_json::Value,
    dir: &std::path::Path,
) -> Result<(), String> {
    let path = dir.join(format!("{name}.v{version}.json"));
    let rendered = serde_json::to_string_pretty(current).unwrap_or_default() + "\n";
    match std::fs::read_to_string(&path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(format!(
            "cannot read the recorded contract {}: {error}",
            path.display()
        )),
        Ok(recorded) if recorded == rendered => Ok(()),
        Ok(recorded) => Err(format!(
            "event `{name}` version {version} changed its contract without a version bump.\n\
             Recorded in {}:\n{recorded}\nNow:\n{rendered}\n\
             Stored events of version {version} keep the recorded shape: keep the payload, or bump \
             `#[event(version = {})]` and register an upcaster from {version}.",
            path.display(),
            version + 1,
        )),
        Err(_) => {
            std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::write(&path, &rendered))
                .map_err(|error| {
                    format!("could not record the contract {}: {error}", path.display())
                })?;
            if std::env::var("INSEAM_ACCEPT_NEW_CONTRACTS").as_deref() != Ok("1") {
                return Err(format!(
                    "new contract recorded in {}: review it and commit it (or set INSEAM_ACCEPT_NEW_CONTRACTS=1)",
                    path.display()
                ));
            }
            Ok(())
        }
    }
}
