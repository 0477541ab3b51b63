//! The SQL the store runs, per backend, with the table prefix applied once at connect time.
//!
//! Every statement is built here from fixed text and a prefix that [`validate_prefix`] checked,
//! so no SQL is ever built from unchecked input; values always travel as bind parameters.

use std::sync::Arc;

use crate::error::Error;

/// The database behind a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite, a file in WAL mode: the embedded default.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        })
    }
}

impl Backend {
    pub(crate) fn from_url(url: &str) -> Result<Self, Error> {
        if cfg!(feature = "sqlite") && url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if cfg!(feature = "postgres")
            && (url.starts_with("postgres:") || url.starts_with("postgresql:"))
        {
            Ok(Backend::Postgres)
        } else {
            Err(Error::UnsupportedUrl {
                scheme: url.split(':').next().unwrap_or_default().to_owned(),
            })
        }
    }
}

/// Checks a table prefix: 1 to 32 characters, lowercase ASCII letters, digits and `_`,
/// starting with a letter.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), Error> {
    let ok = (1..=32).contains(&prefix.len())
        && prefix.starts_with(|c: char| c.is_ascii_lowercase())
        && prefix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidPrefix {
            prefix: prefix.to_owned(),
        })
    }
}

/// One migration: a version and its statements.
pub(crate) struct Migration {
    pub(crate) version: i64,
    pub(crate) statements: Vec<String>,
}

/// The framework's schema, as migrations.
pub(crate) fn migrations(backend: Backend, p: &str) -> Vec<Migration> {
    let (serial, bytes) = match backend {
        Backend::Sqlite => ("INTEGER PRIMARY KEY", "BLOB"),
        Backend::Postgres => ("BIGSERIAL PRIMARY KEY", "BYTEA"),
    };
    let mut first = vec![
        // One row per message: its wire envelope, kept until delivered to every group and
        // older than the retention.
        format!(
            "CREATE TABLE {p}outbox (
                message_id TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                version BIGINT NOT NULL,
                msg_key TEXT,
                envelope {bytes} NOT NULL,
                created_at BIGINT NOT NULL
            )"
        ),
        format!("CREATE INDEX {p}outbox_created ON {p}outbox (created_at)"),
        // One row per message and group until that group handled it. The id gives the order
        // within a key; a row is claimed, never skipped, so a late commit is never lost.
        format!(
            "CREATE TABLE {p}deliveries (
                id {serial},
                grp TEXT NOT NULL,
                message_id TEXT NOT NULL,
                msg_key TEXT,
                deliver_at BIGINT NOT NULL,
                enqueued_at BIGINT NOT NULL,
                attempts BIGINT NOT NULL DEFAULT 0,
                last_error TEXT,
                first_failed_at BIGINT
            )"
        ),
        format!("CREATE INDEX {p}deliveries_group ON {p}deliveries (grp, id)"),
        format!("CREATE INDEX {p}deliveries_key ON {p}deliveries (grp, msg_key, id)"),
        // The rows that hold back their key: few, so the claim's check stays cheap however
        // long the backlog.
        format!(
            "CREATE INDEX {p}deliveries_failing ON {p}deliveries (grp, msg_key, id) WHERE attempts > 0"
        ),
        format!("CREATE INDEX {p}deliveries_message ON {p}deliveries (message_id)"),
        // What each group handled: a redelivery finds its row and is skipped.
        format!(
            "CREATE TABLE {p}inbox (
                grp TEXT NOT NULL,
                message_id TEXT NOT NULL,
                handled_at BIGINT NOT NULL,
                PRIMARY KEY (grp, message_id)
            )"
        ),
        format!("CREATE INDEX {p}inbox_handled ON {p}inbox (handled_at)"),
        format!(
            "CREATE TABLE {p}dead_letters (
                id {serial},
                grp TEXT NOT NULL,
                message_id TEXT NOT NULL,
                name TEXT NOT NULL,
                version BIGINT NOT NULL,
                msg_key TEXT,
                envelope {bytes} NOT NULL,
                error TEXT NOT NULL,
                attempts BIGINT NOT NULL,
                first_failed_at BIGINT NOT NULL,
                last_failed_at BIGINT NOT NULL
            )"
        ),
        format!("CREATE INDEX {p}dead_letters_group ON {p}dead_letters (grp, id)"),
    ];
    if backend == Backend::Postgres {
        // The deliveries table churns: keep its statistics fresh so the claim stays on its
        // index.
        first.push(format!(
            "ALTER TABLE {p}deliveries SET (autovacuum_vacuum_scale_factor = 0.01, \
             autovacuum_analyze_scale_factor = 0.01)"
        ));
    }
    // Identifiers and keys compare byte-wise: the database's linguistic collation would only
    // slow every index probe of the outbox, the deliveries and the inbox.
    let bytewise = match backend {
        Backend::Sqlite => Vec::new(),
        Backend::Postgres => [
            ("outbox", &["message_id", "msg_key"][..]),
            ("deliveries", &["grp", "message_id", "msg_key"][..]),
            ("inbox", &["grp", "message_id"][..]),
            ("dead_letters", &["grp", "message_id", "msg_key"][..]),
        ]
        .iter()
        .map(|(table, columns)| {
            let columns: Vec<String> = columns
                .iter()
                .map(|c| format!("ALTER COLUMN {c} TYPE TEXT COLLATE \"C\""))
                .collect();
            format!("ALTER TABLE {p}{table} {}", columns.join(", "))
        })
        .collect(),
    };
    // Event sourcing: an event of a stream is an outbox row with its stream and version,
    // kept for good; the unique index is the optimistic concurrency check.
    let text_c = match backend {
        Backend::Sqlite => "TEXT",
        Backend::Postgres => "TEXT COLLATE \"C\"",
    };
    let streams = vec![
        format!("ALTER TABLE {p}outbox ADD COLUMN stream {text_c}"),
        format!("ALTER TABLE {p}outbox ADD COLUMN stream_version BIGINT"),
        format!(
            "CREATE UNIQUE INDEX {p}outbox_stream ON {p}outbox (stream, stream_version) WHERE stream IS NOT NULL"
        ),
        format!(
            "CREATE TABLE {p}snapshots (
                stream {text_c} PRIMARY KEY,
                version BIGINT NOT NULL,
                schema_version BIGINT NOT NULL,
                state {bytes} NOT NULL,
                taken_at BIGINT NOT NULL
            )"
        ),
    ];
    vec![
        Migration {
            version: 1,
            statements: first,
        },
        Migration {
            version: 2,
            statements: bytewise,
        },
        Migration {
            version: 3,
            statements: streams,
        },
        // Processes (saga instances): state keyed by kind and id.
        Migration {
            version: 4,
            statements: vec![format!(
                "CREATE TABLE {p}processes (
                    kind {text_c} NOT NULL,
                    id {text_c} NOT NULL,
                    state {bytes} NOT NULL,
                    done BIGINT NOT NULL,
                    updated_at BIGINT NOT NULL,
                    PRIMARY KEY (kind, id)
                )"
            )],
        },
        // Paused groups (a projection rebuilding, or stopped on an error), and the replay order
        // of a stream's events for rebuilds.
        Migration {
            version: 5,
            statements: vec![
                format!(
                    "CREATE TABLE {p}paused (grp {text_c} PRIMARY KEY, reason TEXT NOT NULL, since BIGINT NOT NULL)"
                ),
                format!(
                    "CREATE INDEX {p}outbox_replay ON {p}outbox (created_at, stream, stream_version) WHERE stream IS NOT NULL"
                ),
            ],
        },
        // A flow's messages by correlation id, for timelines and tools.
        Migration {
            version: 6,
            statements: vec![
                format!("ALTER TABLE {p}outbox ADD COLUMN correlation_id {text_c}"),
                format!("CREATE INDEX {p}outbox_flow ON {p}outbox (correlation_id, created_at)"),
            ],
        },
        // Dead letter ids are never given out again, so that a stale id (in a tool, a log, a
        // retried HTTP request) finds nothing rather than another message. PostgreSQL's
        // sequence never reuses a value; SQLite reuses the highest deleted rowid unless the
        // table is AUTOINCREMENT, which takes a rebuild.
        Migration {
            version: 7,
            statements: match backend {
                Backend::Sqlite => vec![
                    format!(
                        "CREATE TABLE {p}dead_letters_v7 (
                            id INTEGER PRIMARY KEY AUTOINCREMENT,
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
                        )"
                    ),
                    format!(
                        "INSERT INTO {p}dead_letters_v7
                         (id, grp, message_id, name, version, msg_key, envelope, error, attempts, first_failed_at, last_failed_at)
                         SELECT id, grp, message_id, name, version, msg_key, envelope, error, attempts, first_failed_at, last_failed_at
                         FROM {p}dead_letters"
                    ),
                    format!("DROP TABLE {p}dead_letters"),
                    format!("ALTER TABLE {p}dead_letters_v7 RENAME TO {p}dead_letters"),
                    format!("CREATE INDEX {p}dead_letters_group ON {p}dead_letters (grp, id)"),
                ],
                Backend::Postgres => Vec::new(),
            },
        },
        // A delivery may carry its own envelope, which then wins over the outbox row's: a
        // dead letter is retried with its own copy (repaired or not), and the outbox row, which
        // other groups and the event store share, is left as it was written.
        Migration {
            version: 8,
            statements: vec![format!(
                "ALTER TABLE {p}deliveries ADD COLUMN envelope {bytes}"
            )],
        },
        // Why a handled delivery was not needed (a saga's timeout after the saga completed),
        // for flows; NULL for every other delivery.
        Migration {
            version: 9,
            statements: vec![format!("ALTER TABLE {p}inbox ADD COLUMN note TEXT")],
        },
        // Reading the outbox by position (decision 0024): an outbox row may list the groups
        // that read it by position instead of having a delivery row each; every such group
        // keeps a cursor, moved in the transaction of the effects. PostgreSQL also keeps the
        // writing transaction's id, to read only what no running transaction can still add
        // below.
        Migration {
            version: 10,
            statements: match backend {
                Backend::Sqlite => vec![
                    format!("ALTER TABLE {p}outbox ADD COLUMN position BIGINT"),
                    format!("ALTER TABLE {p}outbox ADD COLUMN groups TEXT"),
                    format!("CREATE INDEX {p}outbox_position ON {p}outbox (position)"),
                    format!(
                        "CREATE TABLE {p}cursors (grp TEXT PRIMARY KEY, lo BIGINT NOT NULL, hi BIGINT NOT NULL,
                            pos BIGINT NOT NULL, early_pos BIGINT NOT NULL, early_tx BIGINT NOT NULL)"
                    ),
                ],
                Backend::Postgres => vec![
                    // Which transaction wrote the row: the relay reads rows below the oldest
                    // transaction still running, so none can appear behind what it read.
                    format!(
                        "ALTER TABLE {p}outbox ADD COLUMN tx BIGINT NOT NULL
                         DEFAULT CAST(CAST(pg_current_xact_id() AS TEXT) AS BIGINT)"
                    ),
                    format!("ALTER TABLE {p}outbox ADD COLUMN position BIGSERIAL"),
                    format!("ALTER TABLE {p}outbox ADD COLUMN groups TEXT COLLATE \"C\""),
                    format!(
                        "CREATE INDEX {p}outbox_position ON {p}outbox (position) WHERE groups IS NOT NULL"
                    ),
                    format!(
                        "CREATE INDEX {p}outbox_tx ON {p}outbox (tx, position) WHERE groups IS NOT NULL"
                    ),
                    format!(
                        "CREATE TABLE {p}cursors (grp TEXT COLLATE \"C\" PRIMARY KEY, lo BIGINT NOT NULL,
                            hi BIGINT NOT NULL, pos BIGINT NOT NULL, early_pos BIGINT NOT NULL,
                            early_tx BIGINT NOT NULL)"
                    ),
                    // The messages a group read past its window, until its window reaches them.
                    format!(
                        "CREATE TABLE {p}read_ahead (grp TEXT COLLATE \"C\" NOT NULL,
                            message_id TEXT COLLATE \"C\" NOT NULL, PRIMARY KEY (grp, message_id))"
                    ),
                ],
            },
        },
    ]
}

/// The statements of a store, with its prefix applied.
#[derive(Debug)]
pub(crate) struct Statements {
    /// The table prefix, for statements built per call (`write_outbox_rows`).
    pub(crate) prefix: Arc<str>,
    pub(crate) migrations_table: Arc<str>,
    pub(crate) applied: Arc<str>,
    pub(crate) record_migration: Arc<str>,
    pub(crate) lock_migrations: Option<Arc<str>>,
    pub(crate) insert_outbox: Arc<str>,
    /// PostgreSQL: the outbox row, its deliveries and the relays' wake-up in one statement
    /// (parameters in the order of `OutboxRow::bind`, then the channel).
    pub(crate) write_outbox: Option<Arc<str>>,
    /// PostgreSQL: [`write_outbox_rows`](Self::write_outbox_rows) of one row, without and
    /// with the wake-up.
    write_one_row: [Arc<str>; 2],
    pub(crate) insert_deliveries: Arc<str>,
    pub(crate) notify: Option<Arc<str>>,
    pub(crate) channel: Arc<str>,
    pub(crate) claim: Arc<str>,
    pub(crate) claim_one: Arc<str>,
    /// PostgreSQL: keep the relay's statements (claim, key check, delete) on their indexes,
    /// whatever the statistics say: a burst into an empty table must not meet plans made for
    /// an empty table.
    pub(crate) plan_claim: Option<Arc<str>>,
    /// PostgreSQL: undo `plan_claim` before handlers run their own SQL in the transaction.
    pub(crate) unplan_claim: Option<Arc<str>>,
    /// The rows of some keys up to an id, to keep a batch to key prefixes.
    pub(crate) key_rows: Arc<str>,
    pub(crate) in_inbox: Arc<str>,
    pub(crate) insert_inbox: Arc<str>,
    /// The inbox rows of a batch; a duplicate fails it, and the batch goes one by one.
    pub(crate) insert_inbox_batch: Arc<str>,
    /// Why a delivery just written to the inbox was not needed.
    pub(crate) note_inbox: Arc<str>,
    pub(crate) delete_deliveries: Arc<str>,
    pub(crate) delete_delivery: Arc<str>,
    pub(crate) retry_later: Arc<str>,
    pub(crate) insert_dead_letter: Arc<str>,
    /// A message received from a transport, kept as its outbox row (unless one is there).
    pub(crate) stage_outbox: Arc<str>,
    /// Its delivery to the consuming group, unless the group has it already (pending, in
    /// its inbox, or dead-lettered).
    pub(crate) stage_delivery: Arc<str>,
    pub(crate) list_dead_letters: Arc<str>,
    pub(crate) get_dead_letter: Arc<str>,
    pub(crate) delete_dead_letter: Arc<str>,
    /// Deletes a dead letter and returns it: whoever gets the row back retries it, so two
    /// concurrent retries (or a retry and a discard) cannot both act on it.
    pub(crate) take_dead_letter: Arc<str>,
    /// Replaces a dead letter's envelope and returns the row (none when it is gone).
    pub(crate) repair_dead_letter: Arc<str>,
    pub(crate) restore_outbox: Arc<str>,
    /// A retried dead letter's delivery, carrying the dead letter's envelope.
    pub(crate) requeue_delivery: Arc<str>,
    pub(crate) lag: Arc<str>,
    pub(crate) dead_letter_depth: Arc<str>,
    pub(crate) prune_outbox: Arc<str>,
    pub(crate) read_stream: Arc<str>,
    pub(crate) load_snapshot: Arc<str>,
    pub(crate) save_snapshot: Arc<str>,
    pub(crate) load_process: Arc<str>,
    pub(crate) flow: Arc<str>,
    pub(crate) flow_deliveries: Arc<str>,
    pub(crate) pause: Arc<str>,
    pub(crate) resume: Arc<str>,
    pub(crate) paused: Arc<str>,
    pub(crate) count_replay: Arc<str>,
    pub(crate) replay_batch: Arc<str>,
    pub(crate) rename_inbox: Arc<str>,
    pub(crate) clear_inbox: Arc<str>,
    pub(crate) save_process: Arc<str>,
    pub(crate) prune_inbox: Arc<str>,
    /// Reading by position (decision 0024): a group's cursor, created with its first row.
    pub(crate) ensure_cursor: Arc<str>,
    /// The cursor of a group, unless it is paused (PostgreSQL: locked, skipping one another
    /// relay holds).
    pub(crate) lock_cursor: Arc<str>,
    pub(crate) update_cursor: Arc<str>,
    /// SQLite: a group's rows past its position. PostgreSQL: its rows of the current window
    /// (written by transactions in `[lo, hi)`) past its position in the window.
    pub(crate) read_position: Arc<str>,
    /// PostgreSQL: rows written by transactions at or above `hi` (past the window), visible
    /// now, that the group does not have yet.
    pub(crate) read_early: Option<Arc<str>>,
    /// PostgreSQL: the oldest transaction still running.
    pub(crate) oldest_running: Option<Arc<str>>,
    /// PostgreSQL: the first position written by transactions in `[lo, hi)`.
    pub(crate) window_start: Option<Arc<str>>,
    /// SQLite: the highest position written.
    pub(crate) last_position: Option<Arc<str>>,
    /// Keys with a delivery row of the group due or failing: their later messages wait
    /// behind it, as delivery rows of their own.
    pub(crate) parked_keys: Arc<str>,
    /// A message read by position, turned into a delivery row (returns its id).
    pub(crate) materialize: Arc<str>,
    /// PostgreSQL: forgets, and returns, which of some messages a group read past its
    /// window.
    pub(crate) take_read_ahead: Option<Arc<str>>,
    /// PostgreSQL: remembers that a group read a message past its window.
    pub(crate) mark_read_ahead: Option<Arc<str>>,
    /// The backlog read by position, per group.
    pub(crate) lag_by_position: Arc<str>,
}

impl Statements {
    pub(crate) fn new(backend: Backend, p: &str) -> Self {
        let s = |text: String| -> Arc<str> { Arc::from(text) };
        // A JSON array of strings bound as one parameter: one prepared statement for any batch
        // size, on both backends.
        let each = |param: &str| match backend {
            Backend::Sqlite => format!("(SELECT value AS x FROM json_each({param})) AS items"),
            Backend::Postgres => format!(
                "(SELECT x FROM jsonb_array_elements_text(CAST({param} AS jsonb)) AS t(x)) AS items"
            ),
        };
        // `id IN` a JSON array of ids; on PostgreSQL as `= ANY(ARRAY(..))`, which stays an
        // index lookup per id whatever the statistics say about the table.
        let id_in = |param: &str| match backend {
            Backend::Sqlite => format!("id IN (SELECT value FROM json_each({param}))"),
            Backend::Postgres => format!(
                "id = ANY(ARRAY(SELECT CAST(x AS BIGINT) FROM jsonb_array_elements_text(CAST({param} AS jsonb)) AS t(x)))"
            ),
        };
        let lock = match backend {
            Backend::Sqlite => "",
            Backend::Postgres => " FOR UPDATE OF d SKIP LOCKED",
        };
        // A row is due when its time came and no earlier row of its key in the group waits for
        // a retry or a scheduled time: a failing row holds back its own key only. The batch
        // claim lets earlier due rows of the key through (they are in the same batch, or held
        // by another relay; `key_heads` sorts that out); the single claim wants none at all.
        let claim_base = |strict: bool| {
            let waiting = if strict {
                " AND (e.deliver_at <= $2 OR e.attempts > 0)"
            } else {
                " AND e.attempts > 0"
            };
            format!(
                "SELECT d.id, d.message_id, d.msg_key, d.attempts, d.first_failed_at, o.name, o.version,
                        COALESCE(d.envelope, o.envelope)
                 FROM {p}deliveries d JOIN {p}outbox o ON o.message_id = d.message_id
                 WHERE d.grp = $1 AND d.deliver_at <= $2
                   AND NOT EXISTS (SELECT 1 FROM {p}paused z WHERE z.grp = $1)
                   AND (d.msg_key IS NULL OR NOT EXISTS (
                       SELECT 1 FROM {p}deliveries e
                       WHERE e.grp = d.grp AND e.msg_key = d.msg_key AND e.id < d.id{waiting}))"
            )
        };
        // The groups an outbox row lists for reading by position, one row each (`g.value`).
        let listed = match backend {
            Backend::Sqlite => "json_each(o.groups) AS g",
            Backend::Postgres => "jsonb_array_elements_text(CAST(o.groups AS jsonb)) AS g(value)",
        };
        // Whether cursor `c` moved past outbox row `o`.
        let passed = match backend {
            Backend::Sqlite => "c.pos >= o.position",
            Backend::Postgres => "(o.tx < c.lo OR (o.tx < c.hi AND o.position <= c.pos))",
        };
        Statements {
            prefix: s(p.to_owned()),
            migrations_table: s(format!(
                "CREATE TABLE IF NOT EXISTS {p}migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)"
            )),
            applied: s(format!("SELECT version FROM {p}migrations ORDER BY version")),
            record_migration: s(format!(
                "INSERT INTO {p}migrations (version, applied_at) VALUES ($1, $2)"
            )),
            lock_migrations: match backend {
                Backend::Sqlite => None,
                Backend::Postgres => Some(s(format!(
                    "SELECT pg_advisory_xact_lock(hashtext('{p}migrations'))"
                ))),
            },
            insert_outbox: s(match backend {
                Backend::Sqlite => format!(
                    "INSERT INTO {p}outbox (message_id, name, version, msg_key, envelope, created_at, stream, stream_version, correlation_id, groups, position)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, (SELECT COALESCE(MAX(m), 0) + 1 FROM (SELECT MAX(position) AS m FROM {p}outbox UNION ALL SELECT MAX(pos) FROM {p}cursors)))"
                ),
                Backend::Postgres => format!(
                    "INSERT INTO {p}outbox (message_id, name, version, msg_key, envelope, created_at, stream, stream_version, correlation_id, groups)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
                ),
            }),
            write_outbox: match backend {
                Backend::Sqlite => None,
                Backend::Postgres => Some(s(format!(
                    "WITH o AS (
                        INSERT INTO {p}outbox (message_id, name, version, msg_key, envelope, created_at, stream, stream_version, correlation_id, groups)
                        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $12) RETURNING message_id, msg_key),
                     d AS (
                        INSERT INTO {p}deliveries (grp, message_id, msg_key, deliver_at, enqueued_at)
                        SELECT items.x, o.message_id, o.msg_key, $10, $6 FROM o CROSS JOIN {groups})
                     SELECT pg_notify($13, '')",
                    groups = each("$11")
                ))),
            },
            write_one_row: {
                let insert = format!(
                    "INSERT INTO {p}outbox (message_id, name, version, msg_key, envelope, created_at, stream, stream_version, correlation_id, groups)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $12)"
                );
                [
                    s(insert.clone()),
                    s(format!("WITH o AS ({insert}) SELECT pg_notify($13, '')")),
                ]
            },
            insert_deliveries: s(format!(
                "INSERT INTO {p}deliveries (grp, message_id, msg_key, deliver_at, enqueued_at)
                 SELECT x, $2, $3, $4, $5 FROM {groups}",
                groups = each("$1")
            )),
            notify: match backend {
                Backend::Sqlite => None,
                Backend::Postgres => Some(s("SELECT pg_notify($1, '')".to_owned())),
            },
            channel: s(format!("{p}outbox")),
            claim: s(format!(
                "{} AND d.id > $4 ORDER BY d.id LIMIT $3{lock}",
                claim_base(false)
            )),
            claim_one: s(format!("{} AND d.id = $3{lock}", claim_base(true))),
            plan_claim: match backend {
                Backend::Sqlite => None,
                Backend::Postgres => Some(s(
                    "SELECT set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true), \
                     set_config('enable_sort', 'off', true), set_config('jit', 'off', true), \
                     set_config('max_parallel_workers_per_gather', '0', true)"
                        .to_owned(),
                )),
            },
            unplan_claim: match backend {
                Backend::Sqlite => None,
                Backend::Postgres => Some(s(
                    "SET LOCAL enable_seqscan TO DEFAULT; SET LOCAL enable_bitmapscan TO DEFAULT; \
                     SET LOCAL enable_sort TO DEFAULT; \
                     SET LOCAL jit TO DEFAULT; SET LOCAL max_parallel_workers_per_gather TO DEFAULT"
                        .to_owned(),
                )),
            },
            key_rows: s(match backend {
                Backend::Sqlite => format!(
                    "SELECT id, msg_key FROM {p}deliveries
                     WHERE grp = $1 AND id <= $2
                       AND msg_key IN (SELECT value FROM json_each($3))
                       AND (deliver_at <= $4 OR attempts > 0)"
                ),
                Backend::Postgres => format!(
                    "SELECT id, msg_key FROM {p}deliveries
                     WHERE grp = $1 AND id <= $2
                       AND msg_key = ANY(ARRAY(SELECT jsonb_array_elements_text(CAST($3 AS jsonb))))
                       AND (deliver_at <= $4 OR attempts > 0)"
                ),
            }),
            in_inbox: s(format!(
                "SELECT COUNT(*) FROM {p}inbox WHERE grp = $1 AND message_id = $2"
            )),
            insert_inbox: s(format!(
                "INSERT INTO {p}inbox (grp, message_id, handled_at)
                 SELECT $1, x, $3 FROM {messages} WHERE true
                 ON CONFLICT DO NOTHING",
                messages = each("$2")
            )),
            insert_inbox_batch: s(format!(
                "INSERT INTO {p}inbox (grp, message_id, handled_at) SELECT $1, x, $3 FROM {messages}",
                messages = each("$2")
            )),
            note_inbox: s(format!(
                "UPDATE {p}inbox SET note = $3 WHERE grp = $1 AND message_id = $2"
            )),
            delete_deliveries: s(format!(
                "DELETE FROM {p}deliveries WHERE {ids}",
                ids = id_in("$1")
            )),
            delete_delivery: s(format!("DELETE FROM {p}deliveries WHERE id = $1")),
            retry_later: s(format!(
                "UPDATE {p}deliveries
                 SET attempts = $2, deliver_at = $3, last_error = $4,
                     first_failed_at = COALESCE(first_failed_at, $5)
                 WHERE id = $1"
            )),
            stage_outbox: s(format!(
                "INSERT INTO {p}outbox (message_id, name, version, msg_key, envelope, created_at, correlation_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (message_id) DO NOTHING"
            )),
            stage_delivery: s(format!(
                "INSERT INTO {p}deliveries (grp, message_id, msg_key, deliver_at, enqueued_at)
                 SELECT $1, $2, $3, $4, $4
                 WHERE NOT EXISTS (SELECT 1 FROM {p}inbox WHERE grp = $1 AND message_id = $2)
                   AND NOT EXISTS (SELECT 1 FROM {p}deliveries WHERE grp = $1 AND message_id = $2)
                   AND NOT EXISTS (SELECT 1 FROM {p}dead_letters WHERE grp = $1 AND message_id = $2)"
            )),
            insert_dead_letter: s(format!(
                "INSERT INTO {p}dead_letters
                 (grp, message_id, name, version, msg_key, envelope, error, attempts, first_failed_at, last_failed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            )),
            list_dead_letters: s(format!(
                "SELECT id, grp, message_id, name, version, msg_key, envelope, error, attempts, first_failed_at, last_failed_at
                 FROM {p}dead_letters WHERE id > $1 ORDER BY id LIMIT $2"
            )),
            get_dead_letter: s(format!(
                "SELECT id, grp, message_id, name, version, msg_key, envelope, error, attempts, first_failed_at, last_failed_at
                 FROM {p}dead_letters WHERE id = $1"
            )),
            delete_dead_letter: s(format!("DELETE FROM {p}dead_letters WHERE id = $1")),
            take_dead_letter: s(format!(
                "DELETE FROM {p}dead_letters WHERE id = $1
                 RETURNING id, grp, message_id, name, version, msg_key, envelope, error, attempts, first_failed_at, last_failed_at"
            )),
            repair_dead_letter: s(format!(
                "UPDATE {p}dead_letters SET envelope = $2 WHERE id = $1
                 RETURNING id, grp, message_id, name, version, msg_key, envelope, error, attempts, first_failed_at, last_failed_at"
            )),
            requeue_delivery: s(format!(
                "INSERT INTO {p}deliveries (grp, message_id, msg_key, deliver_at, enqueued_at, envelope)
                 VALUES ($1, $2, $3, $4, $5, $6)"
            )),
            restore_outbox: s(format!(
                "INSERT INTO {p}outbox (message_id, name, version, msg_key, envelope, created_at, correlation_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING"
            )),
            lag: s(format!(
                "SELECT grp, COUNT(*), MIN(enqueued_at) FROM {p}deliveries GROUP BY grp ORDER BY grp"
            )),
            dead_letter_depth: s(format!("SELECT COUNT(*) FROM {p}dead_letters")),
            // A row read by position goes once every group it lists moved past it. (SQLite draws
            // a position above every row and every cursor, so none is drawn twice.)
            prune_outbox: s(format!(
                "DELETE FROM {p}outbox WHERE message_id IN (
                    SELECT o.message_id FROM {p}outbox o WHERE o.created_at < $1 AND o.stream IS NULL
                    AND NOT EXISTS (SELECT 1 FROM {p}deliveries d WHERE d.message_id = o.message_id)
                    AND (o.groups IS NULL OR NOT EXISTS (SELECT 1 FROM {listed}
                        WHERE NOT EXISTS (SELECT 1 FROM {p}cursors c WHERE c.grp = g.value AND {passed}))))",
            )),
            prune_inbox: s(format!("DELETE FROM {p}inbox WHERE handled_at < $1")),
            read_stream: s(format!(
                "SELECT stream_version, envelope, created_at FROM {p}outbox
                 WHERE stream = $1 AND stream_version > $2 AND created_at <= $3
                 ORDER BY stream_version"
            )),
            load_snapshot: s(format!(
                "SELECT version, schema_version, state FROM {p}snapshots WHERE stream = $1"
            )),
            save_snapshot: s(format!(
                "INSERT INTO {p}snapshots (stream, version, schema_version, state, taken_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (stream) DO UPDATE SET version = excluded.version,
                     schema_version = excluded.schema_version, state = excluded.state,
                     taken_at = excluded.taken_at"
            )),
            pause: s(format!(
                "INSERT INTO {p}paused (grp, reason, since) VALUES ($1, $2, $3)
                 ON CONFLICT (grp) DO UPDATE SET reason = excluded.reason, since = excluded.since"
            )),
            resume: s(format!("DELETE FROM {p}paused WHERE grp = $1")),
            paused: s(format!("SELECT grp, reason, since FROM {p}paused ORDER BY grp")),
            count_replay: s(format!(
                "SELECT COUNT(*) FROM {p}outbox WHERE stream IS NOT NULL AND name IN (SELECT x FROM {names})",
                names = each("$1")
            )),
            replay_batch: s(format!(
                "SELECT message_id, envelope, created_at, stream, stream_version FROM {p}outbox
                 WHERE stream IS NOT NULL AND name IN (SELECT x FROM {names})
                   AND (created_at, stream, stream_version) > ($2, $3, $4)
                 ORDER BY created_at, stream, stream_version LIMIT $5",
                names = each("$1")
            )),
            rename_inbox: s(format!("UPDATE {p}inbox SET grp = $1 WHERE grp = $2")),
            clear_inbox: s(format!("DELETE FROM {p}inbox WHERE grp = $1")),
            flow: s(format!(
                "SELECT envelope, created_at FROM {p}outbox WHERE correlation_id = $1
                 ORDER BY created_at, message_id"
            )),
            flow_deliveries: s(format!(
                "SELECT i.message_id, i.grp, 'handled', CAST(0 AS BIGINT), i.note
                   FROM {p}inbox i JOIN {p}outbox o ON o.message_id = i.message_id
                  WHERE o.correlation_id = $1
                 UNION ALL
                 SELECT d.message_id, d.grp, 'pending', d.attempts, d.last_error
                   FROM {p}deliveries d JOIN {p}outbox o ON o.message_id = d.message_id
                  WHERE o.correlation_id = $1
                 UNION ALL
                 SELECT l.message_id, l.grp, 'dead', l.attempts, l.error
                   FROM {p}dead_letters l JOIN {p}outbox o ON o.message_id = l.message_id
                  WHERE o.correlation_id = $1
                 UNION ALL
                 SELECT o.message_id, g.value, 'pending', CAST(0 AS BIGINT), CAST(NULL AS TEXT)
                   FROM {p}outbox o CROSS JOIN {listed}
                  WHERE o.correlation_id = $1 AND o.groups IS NOT NULL
                    AND NOT EXISTS (SELECT 1 FROM {p}cursors c WHERE c.grp = g.value AND {passed}){ahead}",
                ahead = match backend {
                    Backend::Sqlite => String::new(),
                    Backend::Postgres => format!(
                        "
                    AND NOT EXISTS (SELECT 1 FROM {p}read_ahead r WHERE r.grp = g.value AND r.message_id = o.message_id)"
                    ),
                }
            )),
            load_process: s(format!(
                "SELECT state, done FROM {p}processes WHERE kind = $1 AND id = $2"
            )),
            ensure_cursor: s(format!(
                "INSERT INTO {p}cursors (grp, lo, hi, pos, early_pos, early_tx) VALUES ($1, 0, 0, 0, 0, 0)
                 ON CONFLICT (grp) DO NOTHING"
            )),
            lock_cursor: s(format!(
                "SELECT lo, hi, pos, early_pos, early_tx FROM {p}cursors c
                 WHERE c.grp = $1 AND NOT EXISTS (SELECT 1 FROM {p}paused z WHERE z.grp = $1){skip}",
                skip = match backend {
                    Backend::Sqlite => "",
                    Backend::Postgres => " FOR UPDATE SKIP LOCKED",
                }
            )),
            update_cursor: s(format!(
                "UPDATE {p}cursors SET lo = $2, hi = $3, pos = $4, early_pos = $5, early_tx = $6 WHERE grp = $1"
            )),
            // `$1` is the group as a JSON string (`"ledger"`): found as such in the array.
            read_position: s(match backend {
                Backend::Sqlite => format!(
                    "SELECT ROWS FROM {p}outbox
                     WHERE position > $2 AND groups IS NOT NULL AND instr(groups, $1) > 0
                     ORDER BY position LIMIT $3"
                ),
                // `tx + 0`: walk the position index and stop after `$3` rows, rather than read
                // the whole window through the transaction index and sort it.
                Backend::Postgres => format!(
                    "SELECT ROWS, tx FROM {p}outbox
                     WHERE groups IS NOT NULL AND position > $2 AND tx + 0 >= $4 AND tx + 0 < $5
                       AND strpos(groups, $1) > 0
                     ORDER BY position LIMIT $3"
                ),
            }.replace("ROWS", "position, message_id, msg_key, name, version, envelope")),
            read_early: match backend {
                Backend::Sqlite => None,
                Backend::Postgres => Some(s(format!(
                    "SELECT position, message_id, msg_key, name, version, envelope, tx FROM {p}outbox o
                     WHERE groups IS NOT NULL AND tx >= $4 AND strpos(groups, $1) > 0
                       AND NOT EXISTS (SELECT 1 FROM {p}read_ahead r WHERE r.grp = $2 AND r.message_id = o.message_id)
                     ORDER BY position LIMIT $3"
                ))),
            },
            oldest_running: match backend {
                Backend::Sqlite => None,
                Backend::Postgres => Some(s(
                    "SELECT CAST(CAST(pg_snapshot_xmin(pg_current_snapshot()) AS TEXT) AS BIGINT), \
                            CAST(CAST(pg_current_xact_id() AS TEXT) AS BIGINT)"
                        .to_owned(),
                )),
            },
            window_start: match backend {
                Backend::Sqlite => None,
                Backend::Postgres => Some(s(format!(
                    "SELECT MIN(position) FROM {p}outbox WHERE groups IS NOT NULL AND tx >= $1 AND tx < $2"
                ))),
            },
            last_position: match backend {
                Backend::Sqlite => Some(s(format!("SELECT MAX(position) FROM {p}outbox"))),
                Backend::Postgres => None,
            },
            parked_keys: s(match backend {
                Backend::Sqlite => format!(
                    "SELECT DISTINCT msg_key FROM {p}deliveries
                     WHERE grp = $1 AND msg_key IN (SELECT value FROM json_each($2))
                       AND (deliver_at <= $3 OR attempts > 0)"
                ),
                Backend::Postgres => format!(
                    "SELECT DISTINCT msg_key FROM {p}deliveries
                     WHERE grp = $1 AND msg_key = ANY(ARRAY(SELECT jsonb_array_elements_text(CAST($2 AS jsonb))))
                       AND (deliver_at <= $3 OR attempts > 0)"
                ),
            }),
            materialize: s(format!(
                "INSERT INTO {p}deliveries (grp, message_id, msg_key, deliver_at, enqueued_at)
                 SELECT $1, message_id, msg_key, $3, created_at FROM {p}outbox WHERE message_id = $2
                 RETURNING id"
            )),
            take_read_ahead: match backend {
                Backend::Sqlite => None,
                Backend::Postgres => Some(s(format!(
                    "DELETE FROM {p}read_ahead WHERE grp = $1 AND message_id IN (SELECT x FROM {messages})
                     RETURNING message_id",
                    messages = each("$2")
                ))),
            },
            mark_read_ahead: match backend {
                Backend::Sqlite => None,
                Backend::Postgres => Some(s(format!(
                    "INSERT INTO {p}read_ahead (grp, message_id) SELECT $1, x FROM {messages}",
                    messages = each("$2")
                ))),
            },
            lag_by_position: s(match backend {
                Backend::Sqlite => format!(
                    "SELECT c.grp, COUNT(o.position), MIN(o.created_at) FROM {p}cursors c
                     JOIN {p}outbox o ON o.position > c.pos AND o.groups IS NOT NULL
                      AND instr(o.groups, '\"' || c.grp || '\"') > 0
                     GROUP BY c.grp"
                ),
                Backend::Postgres => format!(
                    "SELECT c.grp, COUNT(o.position), MIN(o.created_at) FROM {p}cursors c
                     JOIN {p}outbox o ON o.groups IS NOT NULL AND o.tx >= c.lo
                      AND NOT (o.tx < c.hi AND o.position <= c.pos)
                      AND strpos(o.groups, '\"' || c.grp || '\"') > 0
                     WHERE NOT EXISTS (SELECT 1 FROM {p}read_ahead r WHERE r.grp = c.grp AND r.message_id = o.message_id)
                     GROUP BY c.grp"
                ),
            }),
            save_process: s(format!(
                "INSERT INTO {p}processes (kind, id, state, done, updated_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (kind, id) DO UPDATE SET state = excluded.state,
                     done = excluded.done, updated_at = excluded.updated_at"
            )),
        }
    }

    /// PostgreSQL: `rows` outbox rows, their deliveries and the relays' wake-up in one
    /// statement, committed on its own. Each row binds [`ROW_PARAMS`] parameters, in the
    /// order of `OutboxRow::bind`; with a wake-up, the channel comes last. Rows and deliveries
    /// are inserted in the order given, so ids keep the order of each key's messages.
    /// `shape` leaves out what no row needs: the deliveries' insert, and the wake-up when no
    /// group reads any of the rows (an event nobody subscribed to: only its stream reads it).
    pub(crate) fn write_outbox_rows(&self, rows: usize, shape: RowsShape) -> Arc<str> {
        use std::fmt::Write as _;
        // One row (a command's event, one at a time): a plain `INSERT`, with no rows to order.
        match shape {
            RowsShape::Quiet if rows == 1 => return self.write_one_row[0].clone(),
            RowsShape::Wake if rows == 1 => return self.write_one_row[1].clone(),
            _ => {}
        }
        let p = &self.prefix;
        let mut values = String::with_capacity(rows * 64);
        for row in 0..rows {
            let first = row * ROW_PARAMS;
            let sep = if row == 0 { "" } else { ", " };
            let _ = write!(values, "{sep}({row}");
            for param in 1..=ROW_PARAMS {
                let _ = write!(values, ", ${}", first + param);
            }
            values.push(')');
        }
        let channel = rows * ROW_PARAMS + 1;
        let v = format!(
            "v (ord, message_id, name, version, msg_key, envelope, created_at, stream, stream_version, correlation_id, deliver_at, groups, read_by) AS (
                VALUES {values})"
        );
        let outbox = format!(
            "INSERT INTO {p}outbox (message_id, name, version, msg_key, envelope, created_at, stream, stream_version, correlation_id, groups)
                SELECT message_id, name, version, msg_key, envelope, created_at, stream, stream_version, correlation_id, read_by
                FROM v ORDER BY ord"
        );
        let sql = match shape {
            RowsShape::Quiet => format!("WITH {v} {outbox}"),
            RowsShape::Wake => format!(
                "WITH {v},
                 o AS ({outbox})
                 SELECT pg_notify(${channel}, '')"
            ),
            RowsShape::Deliveries => format!(
                "WITH {v},
                 o AS ({outbox}),
                 d AS (
                    INSERT INTO {p}deliveries (grp, message_id, msg_key, deliver_at, enqueued_at)
                    SELECT g.x, v.message_id, v.msg_key, v.deliver_at, v.created_at
                    FROM v CROSS JOIN LATERAL jsonb_array_elements_text(CAST(v.groups AS jsonb)) WITH ORDINALITY AS g(x, n)
                    ORDER BY v.ord, g.n)
                 SELECT pg_notify(${channel}, '')"
            ),
        };
        Arc::from(sql)
    }
}

/// What a statement of [`Statements::write_outbox_rows`] writes besides the outbox rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RowsShape {
    /// Nothing: no row has a delivery row or a group reading it by position.
    Quiet,
    /// The relays' wake-up: some row is read by position, none has a delivery row.
    Wake,
    /// Delivery rows and the wake-up.
    Deliveries,
}

impl RowsShape {
    /// The channel parameter is bound after the rows.
    pub(crate) fn wakes(self) -> bool {
        self != RowsShape::Quiet
    }
}

/// The parameters each row of [`Statements::write_outbox_rows`] binds.
pub(crate) const ROW_PARAMS: usize = 12;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_checked() {
        assert!(validate_prefix("inseam_").is_ok());
        assert!(validate_prefix("shop2_").is_ok());
        for bad in [
            "",
            "1abc",
            "Inseam",
            "a;drop table x",
            "a-b",
            &"a".repeat(33),
        ] {
            let err = validate_prefix(bad).unwrap_err();
            assert!(
                err.to_string().contains("invalid table prefix"),
                "{bad}: {err}"
            );
        }
    }
}
