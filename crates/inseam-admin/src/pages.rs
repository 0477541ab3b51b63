//! The routes and their pages.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::extract::rejection::FormRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use inseam_sql::{DeadLetter, DeliveryState};
use serde::Deserialize;
use uuid::Uuid;

use crate::Admin;
use crate::error::{Failure, chain, render};
use crate::graph::flow_svg;
use crate::guard::{CSRF_COOKIE, Change, Ctx, LOGIN_COOKIE, SameSite, hex, set_cookie};
use crate::html::{self, age, button, csrf_field, esc, layout, url};

/// Dead letters per page.
const PAGE: i64 = 50;

pub(crate) fn routes(admin: Admin) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/assets/admin.css", get(css))
        .route("/assets/admin.js", get(js))
        .route("/dead-letters", get(dead_letters))
        .route("/dead-letters/{id}", get(dead_letter))
        .route("/dead-letters/{id}/retry", post(retry))
        .route("/dead-letters/{id}/discard", post(discard))
        .route("/dead-letters/{id}/payload", post(repair))
        .route("/groups/{group}/pause", post(pause))
        .route("/groups/{group}/resume", post(resume))
        .route("/flows", get(flow_search))
        .route("/flows/{correlation_id}", get(flow))
        .route("/messages", get(message_search))
        .route("/messages/{message_id}", get(message))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .fallback(|| async { Failure::not_found("no such page") })
        .layer(axum::middleware::from_fn(render))
        .with_state(admin)
}

/// A page, with the CSRF cookie set when it is new and headers that keep it to itself.
fn page(ctx: &Ctx, title: &str, body: &str) -> Response {
    page_with(ctx, StatusCode::OK, title, body)
}

fn page_with(ctx: &Ctx, status: StatusCode, title: &str, body: &str) -> Response {
    let mut response = (status, Html(layout(&ctx.base, title, body, Some(ctx)))).into_response();
    secure(&mut response);
    if ctx.new_csrf
        && let Some(cookie) = set_cookie(ctx, CSRF_COOKIE, &ctx.csrf)
    {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    response
}

/// Headers for every page: nothing from elsewhere, no framing, no inline script.
fn secure(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", html::CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", html::JS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

/// A dead letter id from the path.
fn letter_id(text: &str) -> Result<i64, Failure> {
    text.parse::<i64>().map_err(|_| {
        Failure::bad_request(format!(
            "malformed dead letter id `{text}`: expected a whole number"
        ))
    })
}

/// A message or correlation id.
fn uuid(what: &str, text: &str) -> Result<Uuid, Failure> {
    text.trim()
        .parse::<Uuid>()
        .map_err(|e| Failure::bad_request(format!("malformed {what} `{text}`: {e}")))
}

/// A notice after an action, from the redirect's query.
#[derive(Debug, Deserialize, Default)]
struct Notice {
    done: Option<String>,
    id: Option<String>,
    after: Option<i64>,
}

impl Notice {
    fn html(&self) -> String {
        let id = self.id.as_deref().unwrap_or("?");
        let text = match self.done.as_deref() {
            Some("retried") => {
                format!("Dead letter {id} requeued: its group will receive it again.")
            }
            Some("discarded") => format!("Dead letter {id} discarded."),
            Some("repaired") => {
                format!("Dead letter {id} repaired: retry it to deliver the new payload.")
            }
            Some("paused") => format!("Group {id} paused."),
            Some("resumed") => format!("Group {id} resumed."),
            Some("login") => "Logged in.".to_owned(),
            Some("logout") => "Logged out.".to_owned(),
            _ => return String::new(),
        };
        format!("<p class=\"notice\" id=\"notice\">{}</p>", esc(&text))
    }
}

// ---------------------------------------------------------------------------------------------
// Overview

#[derive(Debug, Default)]
struct GroupRow {
    role: String,
    process: String,
    pending: i64,
    oldest: Option<std::time::Duration>,
    dead: i64,
    paused: Option<(String, chrono::DateTime<chrono::Utc>)>,
}

async fn overview(
    State(admin): State<Admin>,
    ctx: Ctx,
    Query(notice): Query<Notice>,
) -> Result<Response, Failure> {
    let catalog = admin.app.catalog();
    let lag = admin.store.lag().await?;
    let depths = admin.store.dead_letter_depths().await?;
    let paused = admin.store.paused().await?;
    let mut rows: BTreeMap<String, GroupRow> = BTreeMap::new();
    for group in &catalog.groups {
        let row = rows.entry(group.name.to_owned()).or_default();
        row.role = group.role.as_str().to_owned();
        row.process = group.process.clone();
    }
    for group in &lag.groups {
        let row = rows.entry(group.group.clone()).or_default();
        row.pending = group.pending;
        row.oldest = group.oldest_age;
    }
    for (group, depth) in &depths {
        rows.entry(group.clone()).or_default().dead = *depth;
    }
    for p in &paused {
        rows.entry(p.group.clone()).or_default().paused = Some((p.reason.clone(), p.since));
    }
    if ctx.json {
        let groups: Vec<serde_json::Value> = rows
            .iter()
            .map(|(name, row)| {
                serde_json::json!({
                    "group": name,
                    "role": row.role,
                    "process": row.process,
                    "pending": row.pending,
                    "oldest_age_secs": row.oldest.map(|d| d.as_secs_f64()),
                    "dead_letters": row.dead,
                    "paused": row.paused.as_ref().map(|(reason, since)| serde_json::json!({"reason": reason, "since": since})),
                })
            })
            .collect();
        return Ok(Json(serde_json::json!({
            "groups": groups,
            "dead_letters": lag.dead_letters,
        }))
        .into_response());
    }
    let b = esc(&ctx.base);
    let mut body = notice.html();
    let _ = write!(
        body,
        "<h1>{}</h1><section><h2>Groups</h2><table id=\"groups\"><thead><tr><th>Group</th><th>Role</th><th>Process</th><th class=\"num\">Backlog</th><th>Oldest</th><th class=\"num\">Dead letters</th><th>State</th><th></th></tr></thead><tbody>",
        esc(&admin.options.title)
    );
    for (name, row) in &rows {
        let dead = if row.dead > 0 {
            format!(
                "<a class=\"bad\" href=\"{b}/dead-letters\">{}</a>",
                row.dead
            )
        } else {
            "0".to_owned()
        };
        let (state, action) = match &row.paused {
            Some((reason, since)) => (
                format!(
                    "<span class=\"paused\">paused</span> <span class=\"muted\">since {}: {}</span>",
                    since.format("%Y-%m-%d %H:%M:%S UTC"),
                    esc(reason)
                ),
                button(
                    &ctx,
                    &format!("{}/groups/{}/resume", ctx.base, url(name)),
                    "Resume",
                    "",
                ),
            ),
            None => (
                "<span class=\"running\">running</span>".to_owned(),
                button(
                    &ctx,
                    &format!("{}/groups/{}/pause", ctx.base, url(name)),
                    "Pause",
                    "",
                ),
            ),
        };
        let _ = write!(
            body,
            "<tr data-group=\"{n}\"><td><code>{n}</code></td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{dead}</td><td>{state}</td><td>{action}</td></tr>",
            esc(&row.role),
            esc(&row.process),
            row.pending,
            row.oldest.map(age).unwrap_or_else(|| "–".to_owned()),
            n = esc(name),
        );
    }
    let _ = write!(
        body,
        "</tbody></table><p class=\"muted\">{} dead letter(s) in all. Backlog: deliveries waiting, scheduled or retrying.</p></section>",
        lag.dead_letters
    );
    let _ = write!(
        body,
        "<section><h2>Flow</h2><p class=\"legend\"><span class=\"key command\">command</span><span class=\"key event\">event</span><span class=\"key group\">group</span><span class=\"key inline\">inline subscriber</span> solid: publishes or receives; dashed: sends durably</p><div class=\"diagram\">{}</div></section>",
        flow_svg(catalog)
    );
    Ok(page(&ctx, &admin.options.title, &body))
}

// ---------------------------------------------------------------------------------------------
// Dead letters

fn letter_json(letter: &DeadLetter) -> serde_json::Value {
    serde_json::json!({
        "id": letter.id,
        "group": letter.group,
        "message_id": letter.message_id,
        "name": letter.name,
        "version": letter.version,
        "key": letter.key,
        "error": letter.error,
        "attempts": letter.attempts,
        "first_failed_at": letter.first_failed_at,
        "last_failed_at": letter.last_failed_at,
    })
}

/// The error and its causes as a list, outermost first.
fn error_chain(error: &str) -> String {
    let mut out = String::from("<ol class=\"chain\">");
    for part in error.split(": ") {
        let _ = write!(out, "<li>{}</li>", esc(part));
    }
    out.push_str("</ol>");
    out
}

fn letter_actions(ctx: &Ctx, letter: &DeadLetter) -> String {
    let path = format!("{}/dead-letters/{}", ctx.base, letter.id);
    format!(
        "{}{}<a class=\"button\" href=\"{}\">Edit payload</a>",
        button(ctx, &format!("{path}/retry"), "Retry", "retry"),
        button(ctx, &format!("{path}/discard"), "Discard", "discard danger"),
        esc(&path)
    )
}

async fn dead_letters(
    State(admin): State<Admin>,
    ctx: Ctx,
    Query(notice): Query<Notice>,
) -> Result<Response, Failure> {
    let after = notice.after.unwrap_or(0);
    let letters = admin.store.dead_letters(after, PAGE).await?;
    if ctx.json {
        let list: Vec<_> = letters.iter().map(letter_json).collect();
        return Ok(Json(list).into_response());
    }
    let b = esc(&ctx.base);
    let mut body = notice.html();
    body.push_str("<h1>Dead letters</h1>");
    if letters.is_empty() {
        body.push_str("<p id=\"no-dead-letters\">No dead letters.</p>");
    } else {
        body.push_str("<table id=\"dead-letters\"><thead><tr><th>Id</th><th>Group</th><th>Message</th><th class=\"num\">Attempts</th><th>Last failed</th><th>Error</th><th></th></tr></thead><tbody>");
        for letter in &letters {
            let _ = write!(
                body,
                "<tr id=\"dead-letter-{id}\" data-id=\"{id}\"><td><a href=\"{b}/dead-letters/{id}\">{id}</a></td><td><code>{}</code></td><td><code>{} v{}</code><br><a class=\"muted\" href=\"{b}/messages/{}\">{}</a></td><td class=\"num\">{}</td><td>{}</td><td>{}</td><td class=\"actions\">{}</td></tr>",
                esc(&letter.group),
                esc(&letter.name),
                letter.version,
                url(&letter.message_id),
                esc(&letter.message_id),
                letter.attempts,
                letter.last_failed_at.format("%Y-%m-%d %H:%M:%S"),
                error_chain(&letter.error),
                letter_actions(&ctx, letter),
                id = letter.id,
            );
        }
        body.push_str("</tbody></table>");
        if letters.len() as i64 == PAGE
            && let Some(last) = letters.last()
        {
            let _ = write!(
                body,
                "<p><a href=\"{b}/dead-letters?after={}\">Next page</a></p>",
                last.id
            );
        }
    }
    Ok(page(&ctx, "Dead letters", &body))
}

async fn dead_letter(
    State(admin): State<Admin>,
    ctx: Ctx,
    Path(id): Path<String>,
    Query(notice): Query<Notice>,
) -> Result<Response, Failure> {
    let id = letter_id(&id)?;
    let letter = admin.store.dead_letter(id).await?;
    if ctx.json {
        return Ok(Json(letter_json(&letter)).into_response());
    }
    let body = letter_page(&ctx, &letter, &notice.html(), None);
    Ok(page(&ctx, &format!("Dead letter {id}"), &body))
}

/// The page of one dead letter; `refused` is a repair refused, with the payload that was sent.
fn letter_page(
    ctx: &Ctx,
    letter: &DeadLetter,
    notice: &str,
    refused: Option<(&str, &str)>,
) -> String {
    let b = esc(&ctx.base);
    let envelope = inseam_core::RawEnvelope::from_json(&letter.envelope);
    let (payload, meta) = match &envelope {
        Ok(envelope) => {
            let payload = serde_json::from_slice::<serde_json::Value>(&envelope.payload)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok())
                .unwrap_or_else(|| String::from_utf8_lossy(&envelope.payload).into_owned());
            let meta = format!(
                "<dt>Correlation</dt><dd><a href=\"{b}/flows/{c}\">{c}</a></dd><dt>Causation</dt><dd>{}</dd><dt>Occurred</dt><dd>{}</dd><dt>Source</dt><dd>{}</dd><dt>Content type</dt><dd>{}</dd>",
                envelope
                    .metadata
                    .causation_id
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "–".to_owned()),
                envelope.occurred_at.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
                esc(&envelope.source),
                esc(&envelope.content_type),
                c = envelope.metadata.correlation_id,
            );
            (payload, meta)
        }
        Err(error) => (
            String::from_utf8_lossy(&letter.envelope).into_owned(),
            format!(
                "<dt>Envelope</dt><dd class=\"bad\">unreadable: {}</dd>",
                esc(&chain(error))
            ),
        ),
    };
    let mut body = notice.to_owned();
    let _ = write!(
        body,
        "<h1>Dead letter {id}</h1><dl class=\"meta\"><dt>Group</dt><dd><code>{}</code></dd><dt>Message</dt><dd><code>{} v{}</code> <a href=\"{b}/messages/{}\">{}</a></dd><dt>Key</dt><dd>{}</dd><dt>Attempts</dt><dd>{}</dd><dt>First failed</dt><dd>{}</dd><dt>Last failed</dt><dd>{}</dd>{meta}</dl>\
<h2>Error</h2>{}<div class=\"actions\">{}{}</div>",
        esc(&letter.group),
        esc(&letter.name),
        letter.version,
        url(&letter.message_id),
        esc(&letter.message_id),
        letter
            .key
            .as_deref()
            .map(esc)
            .unwrap_or_else(|| "–".to_owned()),
        letter.attempts,
        letter.first_failed_at.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
        letter.last_failed_at.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
        error_chain(&letter.error),
        button(
            ctx,
            &format!("{}/dead-letters/{}/retry", ctx.base, letter.id),
            "Retry",
            "retry"
        ),
        button(
            ctx,
            &format!("{}/dead-letters/{}/discard", ctx.base, letter.id),
            "Discard",
            "discard danger"
        ),
        id = letter.id,
    );
    let (text, reason) = match refused {
        Some((payload, reason)) => (
            payload.to_owned(),
            format!(
                "<p class=\"refused\" id=\"refused\">Refused: {}</p>",
                esc(reason)
            ),
        ),
        None => (payload, String::new()),
    };
    let _ = write!(
        body,
        "<h2>Payload</h2>{reason}<form method=\"post\" action=\"{b}/dead-letters/{}/payload\" id=\"repair\">{}<textarea name=\"payload\" id=\"payload\" rows=\"12\" spellcheck=\"false\">{}</textarea>\
<p><button type=\"button\" class=\"format-json\">Format JSON</button> <button type=\"submit\" id=\"save-payload\">Save payload</button> <span class=\"muted\">The payload is checked against the decoder of <code>{}</code> before it is kept; retry to deliver it.</span></p></form>",
        letter.id,
        csrf_field(ctx),
        esc(&text),
        esc(&letter.group),
    );
    body
}

/// What a form that changes state sends.
#[derive(Debug, Deserialize)]
struct ChangeForm {
    csrf: Option<String>,
    payload: Option<String>,
    reason: Option<String>,
    token: Option<String>,
}

/// The form, or an empty one for a request without a body (a tool's `POST` with a bearer
/// token); a body that is not a form is refused.
fn form(form: Result<Form<ChangeForm>, FormRejection>) -> Result<ChangeForm, Failure> {
    match form {
        Ok(Form(form)) => Ok(form),
        Err(FormRejection::InvalidFormContentType(_)) => Ok(ChangeForm {
            csrf: None,
            payload: None,
            reason: None,
            token: None,
        }),
        Err(rejection) => Err(Failure::new(rejection.status(), rejection.body_text())),
    }
}

/// After a change: JSON, or a redirect to `to`.
fn done(ctx: &Ctx, to: String, json: serde_json::Value) -> Response {
    if ctx.json {
        return Json(json).into_response();
    }
    Redirect::to(&to).into_response()
}

async fn retry(
    State(admin): State<Admin>,
    change: Change,
    Path(id): Path<String>,
    body: Result<Form<ChangeForm>, FormRejection>,
) -> Result<Response, Failure> {
    let form = form(body)?;
    change.check_csrf(form.csrf.as_deref())?;
    let id = letter_id(&id)?;
    admin.store.retry_dead_letter(id).await?;
    let ctx = &change.ctx;
    Ok(done(
        ctx,
        format!("{}/dead-letters?done=retried&id={id}", ctx.base),
        serde_json::json!({ "retried": id }),
    ))
}

async fn discard(
    State(admin): State<Admin>,
    change: Change,
    Path(id): Path<String>,
    body: Result<Form<ChangeForm>, FormRejection>,
) -> Result<Response, Failure> {
    let form = form(body)?;
    change.check_csrf(form.csrf.as_deref())?;
    let id = letter_id(&id)?;
    admin.store.discard_dead_letter(id).await?;
    let ctx = &change.ctx;
    Ok(done(
        ctx,
        format!("{}/dead-letters?done=discarded&id={id}", ctx.base),
        serde_json::json!({ "discarded": id }),
    ))
}

async fn repair(
    State(admin): State<Admin>,
    change: Change,
    Path(id): Path<String>,
    body: Result<Form<ChangeForm>, FormRejection>,
) -> Result<Response, Failure> {
    let form = form(body)?;
    change.check_csrf(form.csrf.as_deref())?;
    let id = letter_id(&id)?;
    let ctx = &change.ctx;
    let Some(payload) = form.payload else {
        return Err(Failure::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the form has no `payload` field",
        ));
    };
    match admin
        .store
        .repair_dead_letter(&admin.app, id, payload.clone().into_bytes())
        .await
    {
        Ok(letter) => Ok(done(
            ctx,
            format!("{}/dead-letters/{id}?done=repaired&id={id}", ctx.base),
            letter_json(&letter),
        )),
        Err(error @ inseam_sql::Error::RepairRefused { .. }) if !ctx.json => {
            // The page again, with what was typed and why it was refused.
            let reason = chain(&error);
            let letter = admin.store.dead_letter(id).await?;
            let body = letter_page(ctx, &letter, "", Some((&payload, &reason)));
            Ok(page_with(
                ctx,
                StatusCode::UNPROCESSABLE_ENTITY,
                &format!("Dead letter {id}"),
                &body,
            ))
        }
        Err(error) => Err(error.into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Groups

/// A group the app knows or the store holds something of.
async fn known_group(admin: &Admin, group: &str) -> Result<(), Failure> {
    if admin.app.catalog().group(group).is_some()
        || admin.store.paused().await?.iter().any(|p| p.group == group)
    {
        return Ok(());
    }
    Err(Failure::not_found(format!(
        "no group `{group}` in this app"
    )))
}

async fn pause(
    State(admin): State<Admin>,
    change: Change,
    Path(group): Path<String>,
    body: Result<Form<ChangeForm>, FormRejection>,
) -> Result<Response, Failure> {
    let form = form(body)?;
    change.check_csrf(form.csrf.as_deref())?;
    known_group(&admin, &group).await?;
    let reason = form
        .reason
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| "paused from the admin page".to_owned());
    admin.store.pause(&group, &reason).await?;
    let ctx = &change.ctx;
    Ok(done(
        ctx,
        format!("{}?done=paused&id={}", html::home(&ctx.base), url(&group)),
        serde_json::json!({ "paused": group }),
    ))
}

async fn resume(
    State(admin): State<Admin>,
    change: Change,
    Path(group): Path<String>,
    body: Result<Form<ChangeForm>, FormRejection>,
) -> Result<Response, Failure> {
    let form = form(body)?;
    change.check_csrf(form.csrf.as_deref())?;
    known_group(&admin, &group).await?;
    admin.store.resume(&group).await?;
    let ctx = &change.ctx;
    Ok(done(
        ctx,
        format!("{}?done=resumed&id={}", html::home(&ctx.base), url(&group)),
        serde_json::json!({ "resumed": group }),
    ))
}

// ---------------------------------------------------------------------------------------------
// Flows and messages

#[derive(Debug, Deserialize)]
struct FlowQuery {
    correlation_id: Option<String>,
}

async fn flow_search(ctx: Ctx, Query(query): Query<FlowQuery>) -> Result<Response, Failure> {
    let text = query.correlation_id.unwrap_or_default();
    let id = uuid("correlation id", &text)?;
    Ok(Redirect::to(&format!("{}/flows/{id}", ctx.base)).into_response())
}

async fn flow(
    State(admin): State<Admin>,
    ctx: Ctx,
    Path(correlation_id): Path<String>,
) -> Result<Response, Failure> {
    let correlation = uuid("correlation id", &correlation_id)?;
    let entries = admin.store.flow(correlation).await?;
    if entries.is_empty() {
        return Err(Failure::not_found(format!(
            "no message of flow {correlation} in the outbox (never written, or pruned by the retention)"
        )));
    }
    if ctx.json {
        let list: Vec<_> = entries
            .iter()
            .map(|entry| {
                serde_json::json!({
                    "recorded_at": entry.recorded_at,
                    "kind": entry.kind(&admin.app),
                    "name": entry.envelope.name,
                    "version": entry.envelope.version,
                    "key": entry.envelope.key,
                    "message_id": entry.envelope.metadata.message_id,
                    "causation_id": entry.envelope.metadata.causation_id,
                    "data": entry.data(),
                    "deliveries": entry.deliveries.iter().map(ToString::to_string).collect::<Vec<_>>(),
                })
            })
            .collect();
        return Ok(Json(list).into_response());
    }
    let b = esc(&ctx.base);
    let start = entries.first().map(|e| e.recorded_at);
    let mut body =
        format!("<h1>Flow <code>{correlation}</code></h1><ol class=\"timeline\" id=\"timeline\">");
    for entry in &entries {
        let offset = start
            .map(|s| (entry.recorded_at - s).num_milliseconds())
            .unwrap_or(0);
        let id = entry.envelope.metadata.message_id;
        let _ = write!(
            body,
            "<li id=\"m-{id}\" class=\"{kind}\"><div class=\"when\">+{offset} ms<br><span class=\"muted\">{}</span></div><div class=\"what\"><span class=\"kind\">{kind}</span> <code>{} v{}</code>{}<div class=\"muted\">message {id}{}</div><pre class=\"data\">{}</pre><ul class=\"deliveries\">",
            entry.recorded_at.format("%H:%M:%S%.3f"),
            esc(&entry.envelope.name),
            entry.envelope.version,
            entry
                .envelope
                .key
                .as_deref()
                .map(|k| format!(" key <code>{}</code>", esc(k)))
                .unwrap_or_default(),
            entry
                .envelope
                .metadata
                .causation_id
                .map(|c| format!(", caused by <a href=\"#m-{c}\">{c}</a>"))
                .unwrap_or_default(),
            esc(&entry.data()),
            kind = entry.kind(&admin.app),
        );
        if entry.deliveries.is_empty() {
            body.push_str("<li class=\"muted\">no group receives it</li>");
        }
        for delivery in &entry.deliveries {
            let class = match &delivery.state {
                DeliveryState::Handled => "handled",
                DeliveryState::Pending { .. } => "pending",
                DeliveryState::NotNeeded { .. } => "not-needed",
                DeliveryState::DeadLettered { .. } => "dead",
            };
            let link = if class == "dead" {
                format!(" <a href=\"{b}/messages/{id}\">see the dead letter</a>")
            } else {
                String::new()
            };
            let _ = write!(
                body,
                "<li class=\"{class}\" data-group=\"{}\">{}{link}</li>",
                esc(&delivery.group),
                esc(&delivery.to_string())
            );
        }
        body.push_str("</ul></div></li>");
    }
    body.push_str("</ol>");
    Ok(page(&ctx, &format!("Flow {correlation}"), &body))
}

#[derive(Debug, Deserialize)]
struct MessageQuery {
    message_id: Option<String>,
}

async fn message_search(ctx: Ctx, Query(query): Query<MessageQuery>) -> Result<Response, Failure> {
    let text = query.message_id.unwrap_or_default();
    let id = uuid("message id", &text)?;
    Ok(Redirect::to(&format!("{}/messages/{id}", ctx.base)).into_response())
}

async fn message(
    State(admin): State<Admin>,
    ctx: Ctx,
    Path(message_id): Path<String>,
) -> Result<Response, Failure> {
    let id = uuid("message id", &message_id)?;
    let correlation = admin.store.correlation_of(id).await?;
    let letters = admin.store.dead_letters_of(id).await?;
    if correlation.is_none() && letters.is_empty() {
        return Err(Failure::not_found(format!(
            "no message {id} in the outbox or the dead letters"
        )));
    }
    if ctx.json {
        return Ok(Json(serde_json::json!({
            "message_id": id,
            "correlation_id": correlation,
            "dead_letters": letters.iter().map(letter_json).collect::<Vec<_>>(),
        }))
        .into_response());
    }
    if letters.is_empty()
        && let Some(correlation) = correlation
    {
        return Ok(
            Redirect::to(&format!("{}/flows/{correlation}#m-{id}", ctx.base)).into_response(),
        );
    }
    let b = esc(&ctx.base);
    let mut body = format!("<h1>Message <code>{id}</code></h1>");
    match correlation {
        Some(c) => {
            let _ = write!(
                body,
                "<p>Part of <a id=\"flow-link\" href=\"{b}/flows/{c}#m-{id}\">flow {c}</a>.</p>"
            );
        }
        None => body.push_str("<p class=\"muted\">The outbox no longer holds it.</p>"),
    }
    body.push_str("<h2>Dead letters</h2><ul>");
    for letter in &letters {
        let _ = write!(
            body,
            "<li><a href=\"{b}/dead-letters/{id}\">dead letter {id}</a> of <code>{}</code>: {} {}</li>",
            esc(&letter.group),
            error_chain(&letter.error),
            letter_actions(&ctx, letter),
            id = letter.id,
        );
    }
    body.push_str("</ul>");
    Ok(page(&ctx, &format!("Message {id}"), &body))
}

// ---------------------------------------------------------------------------------------------
// Login

async fn login_page(
    State(admin): State<Admin>,
    ctx: Ctx,
    Query(notice): Query<Notice>,
) -> Result<Response, Failure> {
    if admin.options.token.is_none() {
        return Err(Failure::not_found(
            "this admin page has no token login: the app authorises changes itself",
        ));
    }
    let body = format!(
        "{}<h1>Log in</h1><form method=\"post\" action=\"{}/login\" id=\"login-form\">{}<label>Admin token <input type=\"password\" name=\"token\" id=\"token\" autocomplete=\"current-password\"></label> <button type=\"submit\" id=\"login-submit\">Log in</button></form>",
        notice.html(),
        esc(&ctx.base),
        csrf_field(&ctx)
    );
    Ok(page(&ctx, "Log in", &body))
}

async fn login(
    State(admin): State<Admin>,
    SameSite(attempt): SameSite,
    body: Result<Form<ChangeForm>, FormRejection>,
) -> Result<Response, Failure> {
    let Some(token) = admin.options.token.as_deref() else {
        return Err(Failure::not_found(
            "this admin page has no token login: the app authorises changes itself",
        ));
    };
    let form = form(body)?;
    attempt.check_csrf(form.csrf.as_deref())?;
    let typed = form.token.unwrap_or_default();
    let ctx = &attempt.ctx;
    if !crate::guard::token_is(&typed, token) {
        tracing::warn!(target: "inseam::admin", "admin login refused: wrong token");
        return Err(Failure::forbidden("wrong token"));
    }
    let mut response =
        Redirect::to(&format!("{}?done=login", html::home(&ctx.base))).into_response();
    if let Some(cookie) = set_cookie(ctx, LOGIN_COOKIE, &hex(token)) {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    Ok(response)
}

async fn logout(
    SameSite(attempt): SameSite,
    body: Result<Form<ChangeForm>, FormRejection>,
) -> Result<Response, Failure> {
    let form = form(body)?;
    attempt.check_csrf(form.csrf.as_deref())?;
    let ctx = &attempt.ctx;
    let mut response = Redirect::to(&format!("{}/login?done=logout", ctx.base)).into_response();
    if let Some(cookie) = set_cookie(ctx, LOGIN_COOKIE, "") {
        response.headers_mut().append(header::SET_COOKIE, cookie);
    }
    Ok(response)
}
