//! The `inseam` command: operate an inseam app's database without writing code.
//!
//! `status` shows each group's backlog, oldest age, recent rate, pause and dead letters and the
//! outbox; `dead-letters list | show | retry | discard | edit` act on what is stuck; `flow`
//! prints a flow as `inseam-test` does; `groups pause | resume` and `outbox prune` control the
//! relay; `projection rebuild` and `catalog` need the app's code. Tables for people, `--json`
//! for scripts, and [exit codes](Exit) scripts can rely on.
//!
//! Standalone, the `inseam` binary works on a database URL (`--database-url` or
//! `INSEAM_DATABASE_URL`). Embedded, an app's own binary mounts the same commands with its
//! registrations at hand, so that an edited payload is checked against the event's decoder and
//! projections can be rebuilt:
//!
//! ```no_run
//! # async fn run(app: inseam_core::App, store: inseam_sql::SqlStore) -> std::process::ExitCode {
//! // `my-app inseam status`, `my-app inseam projection rebuild orders.summaries`, ...
//! let args = std::env::args_os().skip(1); // from "inseam" on
//! inseam_cli::run(&app, &store, args).await
//! # }
//! ```
//!
//! # `--json`
//!
//! One JSON document on standard output; messages for people go to standard error. Times are
//! RFC 3339 in UTC, durations are seconds (`f64`). The field names are stable:
//!
//! - `status`: `{"groups": [{"group", "pending", "oldest_age_seconds", "handled_last_minute",
//!   "rate_per_second", "dead_letters", "paused": null | {"reason", "since"}}], "dead_letters",
//!   "outbox": {"rows", "retention_seconds"}, "inbox": {"retention_seconds"}}`
//! - `dead-letters list`: `[{"id", "group", "message_id", "name", "version", "key", "error",
//!   "attempts", "first_failed_at", "last_failed_at"}]`; `show` adds `"payload"`,
//!   `"correlation_id"` and `"envelope"`; `edit` adds `"payload"` and `"checked_by_decoder"`
//! - `dead-letters retry`: `{"retried": [ids], "not_found": [ids]}`; `discard`:
//!   `{"discarded": [ids], "not_found": [ids]}`
//! - `flow`: `{"correlation_id", "messages": [{"kind", "name", "version", "message_id", "key",
//!   "recorded_at", "payload", "deliveries": [{"group", "state", "attempts", "error"}]}]}`, the
//!   state one of `handled`, `pending`, `not_needed`, `dead_letter`
//! - `groups pause`: `{"group", "paused": true, "reason"}`; `resume`: `{"group", "paused": false}`
//! - `outbox prune`: `{"outbox", "inbox", "outbox_retention_seconds", "inbox_retention_seconds"}`
//! - `projection rebuild`: `{"projection", "events", "elapsed_seconds"}`
//! - `catalog`: `{"format", "text"}`
//!
//! The command never creates or migrates inseam's tables: it opens the database with
//! [`SqlStore::open`](inseam_sql::SqlStore::open), which refuses a database without them or
//! with a schema of another version.

mod args;
mod commands;
mod output;

use std::ffi::OsString;
use std::future::Future;
use std::io::Write;
use std::process::ExitCode;

use inseam_core::{App, BoxError};
use inseam_sql::{SqlStore, SqlStoreOptions};

pub use args::{Args, CatalogFormat, Command, DeadLetters, Groups, Outbox, Projection};

/// How a command ended, as its exit code.
///
/// | code | meaning |
/// |---|---|
/// | 0 | done |
/// | 1 | failed (the database refused, an editor failed, a payload was refused, ...) |
/// | 2 | bad usage: unknown subcommand or option, malformed argument, missing database URL, a command that needs the app's own binary |
/// | 3 | not found: a dead letter, flow, group or projection |
/// | 4 | the database: unreachable, a malformed or unsupported URL, not an inseam database, or a schema of another version |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: done.
    Ok,
    /// 1: failed.
    Failure,
    /// 2: bad usage.
    Usage,
    /// 3: what was named does not exist.
    NotFound,
    /// 4: the database cannot be used.
    Database,
}

impl Exit {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Failure => 1,
            Exit::Usage => 2,
            Exit::NotFound => 3,
            Exit::Database => 4,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

/// What went wrong in a command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Neither `--database-url` nor `INSEAM_DATABASE_URL` was given.
    #[error("no database: give --database-url URL or set INSEAM_DATABASE_URL")]
    NoDatabase,
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] inseam_sql::Error),
    /// The command needs the app's registrations.
    #[error(
        "`{command}` needs the app's code: run it from the app's own binary, which mounts these commands with `inseam::cli` (feature `cli`)"
    )]
    NeedsApp {
        /// The command.
        command: &'static str,
    },
    /// A correlation id that is not a UUID.
    #[error("`{input}` is not a correlation id (a UUID)")]
    BadCorrelationId {
        /// What was given.
        input: String,
        /// Why.
        #[source]
        source: uuid::Error,
    },
    /// No message of the flow is in the outbox.
    #[error(
        "no flow {correlation_id} in the outbox (never written, pruned after the retention, or its events kept by no group)"
    )]
    NoFlow {
        /// The correlation id.
        correlation_id: uuid::Uuid,
    },
    /// A group the app does not have, or the database has no trace of.
    #[error("no group `{group}` {context}")]
    UnknownGroup {
        /// The group.
        group: String,
        /// Where it was looked for.
        context: String,
    },
    /// `groups resume` of a group that is not paused.
    #[error("group `{group}` is not paused")]
    NotPaused {
        /// The group.
        group: String,
    },
    /// A new payload that is not JSON.
    #[error(
        "the new payload of dead letter {id} is not well-formed JSON, the dead letter is unchanged"
    )]
    NotJson {
        /// The dead letter.
        id: i64,
        /// Where the JSON is broken.
        #[source]
        source: serde_json::Error,
    },
    /// A file (`--file`, the editor's) could not be read or written.
    #[error("cannot {action} {path}")]
    File {
        /// Read or write.
        action: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The editor could not run or failed.
    #[error("the editor `{editor}` {outcome}; the dead letter is unchanged")]
    Editor {
        /// `$VISUAL`, `$EDITOR` or `vi`.
        editor: String,
        /// What happened.
        outcome: String,
    },
    /// The catalog could not be rendered.
    #[error("cannot render the catalog: {0}")]
    Catalog(String),
    /// Standard output could not be written.
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
}

impl Error {
    /// The exit code this error ends the command with.
    pub fn exit(&self) -> Exit {
        use inseam_sql::Error as Store;
        match self {
            Error::NoDatabase
            | Error::BadCorrelationId { .. }
            | Error::NeedsApp { .. }
            | Error::Store(inseam_sql::Error::InvalidPrefix { .. }) => Exit::Usage,
            Error::NoFlow { .. } | Error::UnknownGroup { .. } | Error::NotPaused { .. } => {
                Exit::NotFound
            }
            Error::Store(Store::DeadLetterNotFound { .. } | Store::UnknownProjection { .. }) => {
                Exit::NotFound
            }
            Error::Store(
                Store::NoSchema { .. }
                | Store::SchemaTooNew { .. }
                | Store::SchemaTooOld { .. }
                | Store::UnsupportedUrl { .. },
            ) => Exit::Database,
            Error::Store(Store::Database { operation, .. })
                if *operation == "connect to the database"
                    || *operation == "look for the inseam tables"
                    || *operation == "read the schema version" =>
            {
                Exit::Database
            }
            _ => Exit::Failure,
        }
    }
}

/// Where the commands find the database.
#[derive(Debug, Clone)]
pub enum Database {
    /// A store the app opened.
    Store(SqlStore),
    /// A URL, opened without migrating ([`SqlStore::open`]).
    Url(String),
}

impl From<SqlStore> for Database {
    fn from(store: SqlStore) -> Self {
        Database::Store(store)
    }
}

impl From<&SqlStore> for Database {
    fn from(store: &SqlStore) -> Self {
        Database::Store(store.clone())
    }
}

impl From<String> for Database {
    fn from(url: String) -> Self {
        Database::Url(url)
    }
}

impl From<&str> for Database {
    fn from(url: &str) -> Self {
        Database::Url(url.to_owned())
    }
}

/// Runs the commands from an app's own binary, with its registrations: `args` are the
/// arguments after the program's own (the first one is taken as the command's name, as
/// `inseam` in `my-app inseam status`). `--database-url` or `INSEAM_DATABASE_URL`, when given,
/// wins over `store`. Prints to standard output and error.
pub async fn run<I, T>(app: &App, database: impl Into<Database>, args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    run_to(Some(app), Some(database.into()), args, &mut out, &mut err)
        .await
        .into()
}

/// As [`run`], for an app whose store is opened from the command line: the database is
/// `--database-url`, else `INSEAM_DATABASE_URL`, else `default_url`; it is opened without
/// migrating, then `build` builds the app on it. `--help` and bad usage need no database.
pub async fn run_with<I, T, F, Fut>(default_url: Option<&str>, build: F, args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
    F: FnOnce(SqlStore) -> Fut,
    Fut: Future<Output = Result<App, BoxError>>,
{
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let args = match parse(args, &mut out, &mut err) {
        Ok(args) => args,
        Err(exit) => return exit.into(),
    };
    let url = match args.database_url.clone().or(default_url.map(str::to_owned)) {
        Some(url) => url,
        None => return fail(&mut err, &Error::NoDatabase).into(),
    };
    let store = match open(&url, args.table_prefix.as_deref()).await {
        Ok(store) => store,
        Err(error) => return fail(&mut err, &error).into(),
    };
    let app = match build(store.clone()).await {
        Ok(app) => app,
        Err(error) => {
            let _ = writeln!(
                err,
                "inseam: cannot build the app: {}",
                inseam_core::error::Report(&*error)
            );
            return Exit::Failure.into();
        }
    };
    execute(Some(&app), store, &args, &mut out, &mut err)
        .await
        .into()
}

/// The standalone `inseam` binary: the database from `--database-url` or
/// `INSEAM_DATABASE_URL`, without the app's code.
pub async fn run_standalone<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    run_to(None, None, args, &mut out, &mut err).await.into()
}

/// The commands with their output written to `out` and `err`: what [`run`] and
/// [`run_standalone`] call, and what tests call to read the output.
pub async fn run_to<I, T>(
    app: Option<&App>,
    database: Option<Database>,
    args: I,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Exit
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args = match parse(args, out, err) {
        Ok(args) => args,
        Err(exit) => return exit,
    };
    let database = match (args.database_url.clone(), database) {
        (Some(url), _) => Database::Url(url),
        (None, Some(database)) => database,
        (None, None) => return fail(err, &Error::NoDatabase),
    };
    let store = match database {
        Database::Store(store) => store,
        Database::Url(url) => match open(&url, args.table_prefix.as_deref()).await {
            Ok(store) => store,
            Err(error) => return fail(err, &error),
        },
    };
    execute(app, store, &args, out, err).await
}

fn parse<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> Result<Args, Exit>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    use clap::Parser as _;
    match Args::try_parse_from(args) {
        Ok(args) => Ok(args),
        Err(error) => {
            let text = error.render().to_string();
            if error.use_stderr() {
                let _ = err.write_all(text.as_bytes());
                Err(Exit::Usage)
            } else {
                // --help, --version
                let _ = out.write_all(text.as_bytes());
                Err(Exit::Ok)
            }
        }
    }
}

async fn open(url: &str, prefix: Option<&str>) -> Result<SqlStore, Error> {
    let mut options = SqlStoreOptions::new().max_connections(2);
    if let Some(prefix) = prefix {
        options = options.table_prefix(prefix);
    }
    Ok(SqlStore::open_with(url, options).await?)
}

async fn execute(
    app: Option<&App>,
    store: SqlStore,
    args: &Args,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Exit {
    let mut cx = commands::Cx {
        app,
        store,
        json: args.json,
        out,
        err,
    };
    match commands::run(&mut cx, &args.command).await {
        Ok(exit) => exit,
        Err(error) => fail(cx.err, &error),
    }
}

/// Reports `error` on `err` with its causes; returns its exit code.
fn fail(err: &mut dyn Write, error: &Error) -> Exit {
    let _ = writeln!(err, "inseam: {}", inseam_core::error::Report(error));
    error.exit()
}
