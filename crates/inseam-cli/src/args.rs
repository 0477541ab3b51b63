//! The command line, as clap reads it.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

/// Operate an inseam app's database: what is stuck, and what to do about it.
///
/// Exit codes: 0 done, 1 failed, 2 bad usage (or a command that needs the app's own binary),
/// 3 not found (a dead letter, flow, group or projection), 4 database unreachable, not an
/// inseam database, or a schema of another version.
#[derive(Debug, Parser)]
#[command(name = "inseam", version, max_term_width = 100)]
pub struct Args {
    /// The app's database: `sqlite://path` or `postgres://user@host/db`. Never migrated.
    #[arg(
        long,
        env = "INSEAM_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    pub database_url: Option<String>,

    /// The prefix of inseam's tables, if the app sets one (default `inseam_`).
    #[arg(long, global = true, value_name = "PREFIX")]
    pub table_prefix: Option<String>,

    /// Print JSON for scripts instead of tables (field names are stable).
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Per group: backlog, oldest age, recent rate, paused or not, dead letters; the outbox.
    Status,
    /// List, inspect, retry, discard or edit dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLetters),
    /// Every message of a flow and where it went, by correlation id.
    Flow {
        /// The flow's correlation id (a UUID).
        correlation_id: String,
    },
    /// Pause or resume a group's deliveries.
    #[command(subcommand)]
    Groups(Groups),
    /// The outbox's retention.
    #[command(subcommand)]
    Outbox(Outbox),
    /// Rebuild a projection (needs the app's own binary).
    #[command(subcommand)]
    Projection(Projection),
    /// The app's message catalog (needs the app's own binary).
    Catalog {
        /// How to render it.
        #[arg(long, value_enum, default_value_t = CatalogFormat::Markdown)]
        format: CatalogFormat,
    },
}

/// `inseam dead-letters ...`
#[derive(Debug, Subcommand)]
pub enum DeadLetters {
    /// The dead letters, oldest first.
    List {
        /// Only this group's.
        #[arg(long)]
        group: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One dead letter: its error, attempts and payload.
    Show {
        /// The dead letter's id.
        id: i64,
    },
    /// Put dead letters back in their group's queue, due now.
    Retry {
        /// The dead letters' ids.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<i64>,
        /// Every dead letter of `--group`.
        #[arg(long, requires = "group")]
        all: bool,
        /// The group whose dead letters `--all` retries.
        #[arg(long, requires = "all")]
        group: Option<String>,
    },
    /// Delete dead letters for good.
    Discard {
        /// The dead letters' ids.
        #[arg(required = true)]
        ids: Vec<i64>,
    },
    /// Replace a dead letter's payload: in `$EDITOR`, or from `--file`.
    Edit {
        /// The dead letter's id.
        id: i64,
        /// Read the new payload from this file instead of opening an editor.
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
    },
}

/// `inseam groups ...`
#[derive(Debug, Subcommand)]
pub enum Groups {
    /// Stop delivering to a group, on every instance, until it is resumed.
    Pause {
        /// The group.
        group: String,
        /// Why (shown by `status`).
        #[arg(long, default_value = "paused by an operator")]
        reason: String,
        /// Pause a group this database has no trace of (standalone only).
        #[arg(long)]
        force: bool,
    },
    /// Deliver to a paused group again.
    Resume {
        /// The group.
        group: String,
    },
}

/// `inseam outbox ...`
#[derive(Debug, Subcommand)]
pub enum Outbox {
    /// Delete delivered outbox rows and inbox rows older than the retention.
    Prune {
        /// Keep delivered outbox rows this long instead of the store's retention (`90s`,
        /// `30m`, `24h`, `7d`).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        keep_outbox: Option<Duration>,
        /// Keep inbox rows this long instead of the store's retention: a message redelivered
        /// after its inbox row is gone is handled again.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        keep_inbox: Option<Duration>,
    },
}

/// `90s`, `30m`, `24h`, `7d` (or a number of seconds).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map_or((text, "s"), |at| text.split_at(at));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: use a whole number and s, m, h or d"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "`{text}` has an unknown unit `{unit}`: use s, m, h or d"
            ));
        }
    };
    Ok(Duration::from_secs(n.saturating_mul(seconds)))
}

/// `inseam projection ...`
#[derive(Debug, Subcommand)]
pub enum Projection {
    /// Replay the event store into a fresh copy of the projection's tables and swap it in.
    Rebuild {
        /// The projection's name (its group).
        name: String,
    },
}

/// How `catalog` renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CatalogFormat {
    /// Markdown.
    Markdown,
    /// AsyncAPI 3.0 YAML.
    Asyncapi,
    /// A Mermaid flowchart.
    Mermaid,
}
