//! What each subcommand does.

use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use inseam_core::{App, RawEnvelope};
use inseam_sql::{DeadLetter, DeliveryState, FlowEntry, SqlStore};
use serde_json::{Value, json};

use crate::args::{CatalogFormat, Command, DeadLetters, Groups, Outbox, Projection};
use crate::output::{cut, duration, table};
use crate::{Error, Exit};

/// How far back `status` counts what each group handled.
const WINDOW: Duration = Duration::from_secs(60);

/// A page of dead letters, when walking through all of them.
const PAGE: i64 = 500;

/// What a command runs with.
pub(crate) struct Cx<'a> {
    pub(crate) app: Option<&'a App>,
    pub(crate) store: SqlStore,
    pub(crate) json: bool,
    pub(crate) out: &'a mut dyn Write,
    pub(crate) err: &'a mut dyn Write,
}

impl<'a> Cx<'a> {
    fn print(&mut self, text: &str) -> Result<(), Error> {
        self.out.write_all(text.as_bytes()).map_err(Error::Output)
    }

    fn print_json(&mut self, value: &Value) -> Result<(), Error> {
        let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
        self.print(&text)?;
        self.print("\n")
    }

    /// A note for people on standard error (never mixed into `--json` output).
    fn note(&mut self, text: &str) {
        let _ = writeln!(self.err, "{text}");
    }

    fn app(&self, command: &'static str) -> Result<&'a App, Error> {
        self.app.ok_or(Error::NeedsApp { command })
    }
}

pub(crate) async fn run(cx: &mut Cx<'_>, command: &Command) -> Result<Exit, Error> {
    match command {
        Command::Status => status(cx).await,
        Command::DeadLetters(DeadLetters::List { group, limit }) => {
            list(cx, group.as_deref(), *limit).await
        }
        Command::DeadLetters(DeadLetters::Show { id }) => show(cx, *id).await,
        Command::DeadLetters(DeadLetters::Retry { ids, all: _, group }) => {
            retry(cx, ids, group.as_deref()).await
        }
        Command::DeadLetters(DeadLetters::Discard { ids }) => discard(cx, ids).await,
        Command::DeadLetters(DeadLetters::Edit { id, file }) => {
            edit(cx, *id, file.as_deref()).await
        }
        Command::Flow { correlation_id } => flow(cx, correlation_id).await,
        Command::Groups(Groups::Pause {
            group,
            reason,
            force,
        }) => pause(cx, group, reason, *force).await,
        Command::Groups(Groups::Resume { group }) => resume(cx, group).await,
        Command::Outbox(Outbox::Prune {
            keep_outbox,
            keep_inbox,
        }) => prune(cx, *keep_outbox, *keep_inbox).await,
        Command::Projection(Projection::Rebuild { name }) => rebuild(cx, name).await,
        Command::Catalog { format } => catalog(cx, *format),
    }
}

fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

async fn status(cx: &mut Cx<'_>) -> Result<Exit, Error> {
    let known: Vec<&str> = cx.app.map(|app| app.groups().to_vec()).unwrap_or_default();
    let status = cx.store.status(&known, WINDOW).await?;
    let rate = |handled: i64| handled as f64 / WINDOW.as_secs_f64();
    if cx.json {
        let groups: Vec<Value> = status
            .groups
            .iter()
            .map(|g| {
                json!({
                    "group": g.group,
                    "pending": g.pending,
                    "oldest_age_seconds": g.oldest_age.map(seconds),
                    "handled_last_minute": g.handled_recently,
                    "rate_per_second": rate(g.handled_recently),
                    "dead_letters": g.dead_letters,
                    "paused": g.paused.as_ref().map(|p| json!({
                        "reason": p.reason,
                        "since": time(p.since),
                    })),
                })
            })
            .collect();
        cx.print_json(&json!({
            "groups": groups,
            "dead_letters": status.dead_letters,
            "outbox": {
                "rows": status.outbox_rows,
                "retention_seconds": seconds(status.outbox_retention),
            },
            "inbox": {
                "retention_seconds": seconds(status.inbox_retention),
            },
        }))?;
        return Ok(Exit::Ok);
    }
    let rows: Vec<Vec<String>> = status
        .groups
        .iter()
        .map(|g| {
            vec![
                g.group.clone(),
                g.pending.to_string(),
                g.oldest_age.map_or_else(|| "-".to_owned(), duration),
                g.handled_recently.to_string(),
                g.dead_letters.to_string(),
                match &g.paused {
                    Some(p) => format!("paused since {} ({})", time(p.since), p.reason),
                    None => "running".to_owned(),
                },
            ]
        })
        .collect();
    let mut text = if rows.is_empty() {
        "no groups: nothing waits, nothing was handled in the last minute, no dead letters\n"
            .to_owned()
    } else {
        table(
            &[
                "GROUP",
                "PENDING",
                "OLDEST",
                "RATE (1 MIN)",
                "DEAD",
                "STATE",
            ],
            &rows,
        )
    };
    text.push_str(&format!(
        "\noutbox: {} row(s), delivered rows kept {}; inbox kept {}; {} dead letter(s)\n",
        status.outbox_rows,
        duration(status.outbox_retention),
        duration(status.inbox_retention),
        status.dead_letters,
    ));
    cx.print(&text)?;
    Ok(Exit::Ok)
}

/// Every dead letter, page by page, of `group` if given, at most `limit`.
async fn letters(
    store: &SqlStore,
    group: Option<&str>,
    limit: usize,
) -> Result<Vec<DeadLetter>, Error> {
    let mut found = Vec::new();
    let mut after = 0;
    loop {
        let page = store.dead_letters(after, PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(found);
        };
        after = last.id;
        let full = page.len() as i64 == PAGE;
        for letter in page {
            if group.is_none_or(|g| g == letter.group) {
                found.push(letter);
                if found.len() >= limit {
                    return Ok(found);
                }
            }
        }
        if !full {
            return Ok(found);
        }
    }
}

fn summary(letter: &DeadLetter) -> Value {
    json!({
        "id": letter.id,
        "group": letter.group,
        "message_id": letter.message_id,
        "name": letter.name,
        "version": letter.version,
        "key": letter.key,
        "error": letter.error,
        "attempts": letter.attempts,
        "first_failed_at": time(letter.first_failed_at),
        "last_failed_at": time(letter.last_failed_at),
    })
}

/// The payload as JSON when it is JSON, else as text, and the envelope as JSON when it reads.
fn payload_of(letter: &DeadLetter) -> (Option<RawEnvelope>, Value) {
    match RawEnvelope::from_json(&letter.envelope) {
        Ok(envelope) => {
            let payload = serde_json::from_slice(&envelope.payload).unwrap_or_else(|_| {
                Value::String(String::from_utf8_lossy(&envelope.payload).into_owned())
            });
            (Some(envelope), payload)
        }
        Err(_) => (None, Value::Null),
    }
}

async fn list(cx: &mut Cx<'_>, group: Option<&str>, limit: usize) -> Result<Exit, Error> {
    let letters = letters(&cx.store, group, limit).await?;
    if cx.json {
        let list: Vec<Value> = letters.iter().map(summary).collect();
        cx.print_json(&Value::Array(list))?;
        return Ok(Exit::Ok);
    }
    if letters.is_empty() {
        cx.print("no dead letters\n")?;
        return Ok(Exit::Ok);
    }
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|l| {
            vec![
                l.id.to_string(),
                l.group.clone(),
                format!("{} v{}", l.name, l.version),
                l.attempts.to_string(),
                time(l.last_failed_at),
                cut(&l.error, 60),
            ]
        })
        .collect();
    cx.print(&table(
        &["ID", "GROUP", "MESSAGE", "ATTEMPTS", "LAST FAILED", "ERROR"],
        &rows,
    ))?;
    Ok(Exit::Ok)
}

async fn show(cx: &mut Cx<'_>, id: i64) -> Result<Exit, Error> {
    let letter = cx.store.dead_letter(id).await?;
    let (envelope, payload) = payload_of(&letter);
    if cx.json {
        let mut value = summary(&letter);
        if let Some(object) = value.as_object_mut() {
            object.insert("payload".into(), payload);
            object.insert(
                "correlation_id".into(),
                envelope.as_ref().map_or(Value::Null, |e| {
                    e.metadata.correlation_id.to_string().into()
                }),
            );
            object.insert(
                "envelope".into(),
                serde_json::from_slice(&letter.envelope).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(&letter.envelope).into_owned())
                }),
            );
        }
        cx.print_json(&value)?;
        return Ok(Exit::Ok);
    }
    let mut text = format!(
        "dead letter {}\n  group:        {}\n  message:      {} v{}\n  message id:   {}\n",
        letter.id, letter.group, letter.name, letter.version, letter.message_id
    );
    if let Some(key) = &letter.key {
        text.push_str(&format!("  key:          {key}\n"));
    }
    if let Some(envelope) = &envelope {
        text.push_str(&format!(
            "  correlation:  {}\n",
            envelope.metadata.correlation_id
        ));
    }
    text.push_str(&format!(
        "  attempts:     {}, first failed {}, last failed {}\n  error:        {}\n  payload:\n",
        letter.attempts,
        time(letter.first_failed_at),
        time(letter.last_failed_at),
        letter.error
    ));
    let pretty = serde_json::to_string_pretty(&payload).unwrap_or_default();
    for line in pretty.lines() {
        text.push_str(&format!("    {line}\n"));
    }
    cx.print(&text)?;
    Ok(Exit::Ok)
}

/// Applies `act` to each id; a missing one is reported and the others are still done.
async fn each_id<F, Fut>(cx: &mut Cx<'_>, ids: &[i64], verb: &str, act: F) -> Result<Exit, Error>
where
    F: Fn(SqlStore, i64) -> Fut,
    Fut: Future<Output = Result<(), inseam_sql::Error>>,
{
    let mut done = Vec::new();
    let mut missing = Vec::new();
    let mut exit = Exit::Ok;
    for &id in ids {
        match act(cx.store.clone(), id).await {
            Ok(()) => done.push(id),
            Err(error @ inseam_sql::Error::DeadLetterNotFound { .. }) => {
                cx.note(&format!("inseam: {error}"));
                missing.push(id);
                exit = Exit::NotFound;
            }
            Err(error) => return Err(error.into()),
        }
    }
    if cx.json {
        cx.print_json(&json!({ verb: done, "not_found": missing }))?;
    } else if !done.is_empty() {
        let ids: Vec<String> = done.iter().map(i64::to_string).collect();
        cx.print(&format!(
            "{verb} {} dead letter(s): {}\n",
            done.len(),
            ids.join(", ")
        ))?;
    }
    Ok(exit)
}

async fn retry(cx: &mut Cx<'_>, ids: &[i64], group: Option<&str>) -> Result<Exit, Error> {
    let ids = match group {
        Some(group) => {
            let of_group: Vec<i64> = letters(&cx.store, Some(group), usize::MAX)
                .await?
                .iter()
                .map(|l| l.id)
                .collect();
            if of_group.is_empty() && !cx.json {
                cx.print(&format!("no dead letters of group `{group}`\n"))?;
                return Ok(Exit::Ok);
            }
            of_group
        }
        None => ids.to_vec(),
    };
    each_id(cx, &ids, "retried", |store, id| async move {
        store.retry_dead_letter(id).await
    })
    .await
}

async fn discard(cx: &mut Cx<'_>, ids: &[i64]) -> Result<Exit, Error> {
    each_id(cx, ids, "discarded", |store, id| async move {
        store.discard_dead_letter(id).await
    })
    .await
}

async fn edit(cx: &mut Cx<'_>, id: i64, file: Option<&std::path::Path>) -> Result<Exit, Error> {
    let letter = cx.store.dead_letter(id).await?;
    let new = match file {
        Some(path) => tokio::fs::read(path).await.map_err(|source| Error::File {
            action: "read",
            path: path.display().to_string(),
            source,
        })?,
        None => {
            let (_, payload) = payload_of(&letter);
            let mut current = serde_json::to_vec_pretty(&payload).unwrap_or_default();
            current.push(b'\n');
            let edited = in_editor(current.clone()).await?;
            if edited == current {
                cx.note(&format!(
                    "inseam: the payload was not changed; dead letter {id} is left as it was"
                ));
                return Ok(Exit::Ok);
            }
            edited
        }
    };
    let is_json = RawEnvelope::from_json(&letter.envelope)
        .map(|e| e.content_type.contains("json"))
        .unwrap_or(true);
    if is_json {
        serde_json::from_slice::<Value>(&new).map_err(|source| Error::NotJson { id, source })?;
    }
    let repaired = match cx.app {
        Some(app) => cx.store.repair_dead_letter(app, id, new).await?,
        None => {
            let repaired = cx.store.replace_dead_letter_payload(id, new).await?;
            cx.note(
                "inseam: the new payload is well-formed JSON; whether the group's decoder accepts it is checked only by the app's own binary (`inseam::cli`)",
            );
            repaired
        }
    };
    if cx.json {
        let (_, payload) = payload_of(&repaired);
        let mut value = summary(&repaired);
        if let Some(object) = value.as_object_mut() {
            object.insert("payload".into(), payload);
            object.insert("checked_by_decoder".into(), cx.app.is_some().into());
        }
        cx.print_json(&value)?;
    } else {
        cx.print(&format!(
            "dead letter {id} repaired; `inseam dead-letters retry {id}` delivers it again\n"
        ))?;
    }
    Ok(Exit::Ok)
}

/// Opens `$VISUAL` or `$EDITOR` (else `vi`) on `content` in a temporary file and returns what
/// it holds when the editor exits successfully.
async fn in_editor(content: Vec<u8>) -> Result<Vec<u8>, Error> {
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let editor = set("VISUAL")
        .or_else(|| set("EDITOR"))
        .unwrap_or_else(|| "vi".to_owned());
    let shown = editor.clone();
    tokio::task::spawn_blocking(move || -> Result<Vec<u8>, Error> {
        let file = tempfile::Builder::new()
            .prefix("inseam-dead-letter-")
            .suffix(".json")
            .tempfile()
            .map_err(|source| Error::File {
                action: "create",
                path: "a temporary file".to_owned(),
                source,
            })?;
        let path = file.path().to_owned();
        let shown_path = path.display().to_string();
        std::fs::write(&path, &content).map_err(|source| Error::File {
            action: "write",
            path: shown_path.clone(),
            source,
        })?;
        // Through the shell, as git does: `$EDITOR` may hold arguments (`code --wait`).
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{editor} \"$1\""))
            .arg("sh")
            .arg(&path)
            .status()
            .map_err(|e| Error::Editor {
                editor: editor.clone(),
                outcome: format!("could not start: {e}"),
            })?;
        if !status.success() {
            return Err(Error::Editor {
                editor,
                outcome: format!("failed ({status})"),
            });
        }
        std::fs::read(&path).map_err(|source| Error::File {
            action: "read",
            path: shown_path,
            source,
        })
    })
    .await
    .map_err(|e| Error::Editor {
        editor: shown,
        outcome: format!("could not run: {e}"),
    })?
}

fn delivery_json(delivery: &inseam_sql::FlowDelivery) -> Value {
    let (state, attempts, error) = match &delivery.state {
        DeliveryState::Handled => ("handled", Value::Null, Value::Null),
        DeliveryState::Pending {
            attempts,
            last_error,
        } => ("pending", json!(attempts), json!(last_error)),
        DeliveryState::NotNeeded { reason } => ("not_needed", Value::Null, json!(reason)),
        DeliveryState::DeadLettered { attempts, error } => {
            ("dead_letter", json!(attempts), json!(error))
        }
    };
    json!({ "group": delivery.group, "state": state, "attempts": attempts, "error": error })
}

fn entry_json(entry: &FlowEntry, app: Option<&App>) -> Value {
    let kind = match app {
        Some(app) => entry.kind(app),
        None if entry.envelope.name.starts_with("inseam.") => "timer",
        None => "message",
    };
    json!({
        "kind": kind,
        "name": entry.envelope.name,
        "version": entry.envelope.version,
        "message_id": entry.envelope.metadata.message_id.to_string(),
        "key": entry.envelope.key,
        "recorded_at": time(entry.recorded_at),
        "payload": serde_json::from_slice::<Value>(&entry.envelope.payload).unwrap_or(Value::Null),
        "deliveries": entry.deliveries.iter().map(delivery_json).collect::<Vec<_>>(),
    })
}

async fn flow(cx: &mut Cx<'_>, correlation_id: &str) -> Result<Exit, Error> {
    let correlation =
        uuid::Uuid::parse_str(correlation_id).map_err(|source| Error::BadCorrelationId {
            input: correlation_id.to_owned(),
            source,
        })?;
    let entries = cx.store.flow(correlation).await?;
    if entries.is_empty() {
        return Err(Error::NoFlow {
            correlation_id: correlation,
        });
    }
    if cx.json {
        let messages: Vec<Value> = entries.iter().map(|e| entry_json(e, cx.app)).collect();
        cx.print_json(&json!({
            "correlation_id": correlation.to_string(),
            "messages": messages,
        }))?;
        return Ok(Exit::Ok);
    }
    let mut text = String::new();
    for line in inseam_sql::flow_lines(&entries, cx.app) {
        text.push_str(&line);
        text.push('\n');
    }
    cx.print(&text)?;
    Ok(Exit::Ok)
}

async fn pause(cx: &mut Cx<'_>, group: &str, reason: &str, force: bool) -> Result<Exit, Error> {
    match cx.app {
        Some(app) if !app.groups().contains(&group) => {
            return Err(Error::UnknownGroup {
                group: group.to_owned(),
                context: format!("in this app (groups: {})", app.groups().join(", ")),
            });
        }
        Some(_) => {}
        None if !force => {
            let status = cx
                .store
                .status(&[], Duration::from_secs(365 * 86_400))
                .await?;
            if !status.groups.iter().any(|g| g.group == group) {
                return Err(Error::UnknownGroup {
                    group: group.to_owned(),
                    context: "in this database (nothing waiting, handled or dead-lettered for it): check the name, or pause it anyway with --force".to_owned(),
                });
            }
        }
        None => {}
    }
    cx.store.pause(group, reason).await?;
    if cx.json {
        cx.print_json(&json!({ "group": group, "paused": true, "reason": reason }))?;
    } else {
        cx.print(&format!(
            "group `{group}` paused ({reason}); `inseam groups resume {group}` resumes it\n"
        ))?;
    }
    Ok(Exit::Ok)
}

async fn resume(cx: &mut Cx<'_>, group: &str) -> Result<Exit, Error> {
    let paused = cx.store.paused().await?;
    if !paused.iter().any(|p| p.group == group) {
        return Err(Error::NotPaused {
            group: group.to_owned(),
        });
    }
    cx.store.resume(group).await?;
    if cx.json {
        cx.print_json(&json!({ "group": group, "paused": false }))?;
    } else {
        cx.print(&format!("group `{group}` resumed\n"))?;
    }
    Ok(Exit::Ok)
}

async fn prune(
    cx: &mut Cx<'_>,
    outbox: Option<Duration>,
    inbox: Option<Duration>,
) -> Result<Exit, Error> {
    let options = cx.store.relay_options();
    let outbox = outbox.unwrap_or(options.outbox_retention);
    let inbox = inbox.unwrap_or(options.inbox_retention);
    let pruned = cx.store.prune_older_than(outbox, inbox).await?;
    if cx.json {
        cx.print_json(&json!({
            "outbox": pruned.outbox,
            "inbox": pruned.inbox,
            "outbox_retention_seconds": seconds(outbox),
            "inbox_retention_seconds": seconds(inbox),
        }))?;
    } else {
        cx.print(&format!(
            "pruned {} outbox row(s) delivered more than {} ago and {} inbox row(s) older than {}\n",
            pruned.outbox,
            duration(outbox),
            pruned.inbox,
            duration(inbox)
        ))?;
    }
    Ok(Exit::Ok)
}

async fn rebuild(cx: &mut Cx<'_>, name: &str) -> Result<Exit, Error> {
    let app = cx.app("projection rebuild")?;
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {pos}/{len} events, {per_sec}, ETA {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("rebuilding {name}"));
    let rebuilt = cx
        .store
        .rebuild_named(app, name, |progress| {
            bar.set_length(progress.total);
            bar.set_position(progress.done);
        })
        .await;
    bar.finish_and_clear();
    let rebuilt = rebuilt?;
    if cx.json {
        cx.print_json(&json!({
            "projection": name,
            "events": rebuilt.events,
            "elapsed_seconds": seconds(rebuilt.elapsed),
        }))?;
    } else {
        cx.print(&format!(
            "rebuilt {name}: {} event(s) replayed in {}, swapped in, group resumed\n",
            rebuilt.events,
            duration(rebuilt.elapsed)
        ))?;
    }
    Ok(Exit::Ok)
}

fn catalog(cx: &mut Cx<'_>, format: CatalogFormat) -> Result<Exit, Error> {
    let app = cx.app("catalog")?;
    let catalog = app.catalog();
    let (name, text) = match format {
        CatalogFormat::Markdown => ("markdown", catalog.markdown()),
        CatalogFormat::Mermaid => ("mermaid", catalog.mermaid()),
        CatalogFormat::Asyncapi => (
            "asyncapi",
            catalog
                .asyncapi_yaml()
                .map_err(|e| Error::Catalog(inseam_core::error::Report(&e).to_string()))?,
        ),
    };
    if cx.json {
        cx.print_json(&json!({ "format": name, "text": text }))?;
    } else {
        cx.print(&text)?;
    }
    Ok(Exit::Ok)
}
