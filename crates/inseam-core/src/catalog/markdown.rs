//! The catalog as Markdown.

use std::fmt::Write as _;

use super::{Catalog, EventDoc, Role, cell, code_list, short_type};

pub(super) fn render(catalog: &Catalog) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Message catalog of `{}`\n", catalog.source);
    out.push_str(
        "Generated from the app's registrations (`app.catalog()`); regenerate it instead of \
         editing it.\n\n",
    );
    let _ = writeln!(out, "Modules: {}.\n", code_list(catalog.modules()));

    out.push_str("## Flow\n\n```mermaid\n");
    out.push_str(&catalog.mermaid());
    out.push_str("```\n\n");

    commands(&mut out, catalog);
    queries(&mut out, catalog);
    events(&mut out, catalog);
    groups(&mut out, catalog);
    aggregates(&mut out, catalog);
    out
}

fn commands(out: &mut String, catalog: &Catalog) {
    out.push_str("## Commands\n\n");
    if catalog.commands.is_empty() {
        out.push_str("None.\n\n");
        return;
    }
    out.push_str("| Command | Handler | Returns | Fails with | Durable | Publishes | Sends |\n");
    out.push_str("|---|---|---|---|---|---|---|\n");
    for command in &catalog.commands {
        let handler = command.handler.as_ref();
        row(
            out,
            &[
                &format!("`{}`", command.name),
                &handler.map_or_else(|| "none".to_owned(), |h| format!("`{}`", h.name)),
                &format!("`{}`", short_type(command.output)),
                &format!("`{}`", short_type(command.error)),
                if command.durable { "yes" } else { "no" },
                &code_list(handler.into_iter().flat_map(|h| h.publishes.iter())),
                &code_list(handler.into_iter().flat_map(|h| h.sends.iter())),
            ],
        );
    }
    out.push('\n');
    for command in &catalog.commands {
        if let Some(schema) = &command.schema {
            let summary = format!("`{}` payload schema", command.name);
            schema_block(out, &summary, schema);
        }
    }
}

fn schema_block(out: &mut String, summary: &str, schema: &serde_json::Value) {
    let pretty = serde_json::to_string_pretty(schema).unwrap_or_default();
    let _ = write!(
        out,
        "<details><summary>{summary}</summary>\n\n```json\n{pretty}\n```\n\n</details>\n\n"
    );
}

fn queries(out: &mut String, catalog: &Catalog) {
    out.push_str("## Queries\n\n");
    if catalog.queries.is_empty() {
        out.push_str("None.\n\n");
        return;
    }
    out.push_str("| Query | Handler | Returns | Fails with |\n|---|---|---|---|\n");
    for query in &catalog.queries {
        row(
            out,
            &[
                &format!("`{}`", query.name),
                &query
                    .handler
                    .map_or_else(|| "none".to_owned(), |h| format!("`{h}`")),
                &format!("`{}`", short_type(query.output)),
                &format!("`{}`", short_type(query.error)),
            ],
        );
    }
    out.push('\n');
}

fn events(out: &mut String, catalog: &Catalog) {
    out.push_str("## Events\n\n");
    let mut any = false;
    for event in catalog.contracts() {
        any = true;
        event_section(out, event);
    }
    if !any {
        out.push_str("None.\n\n");
    }
    let internal: Vec<&EventDoc> = catalog.events.iter().filter(|e| e.internal).collect();
    if !internal.is_empty() {
        out.push_str("### inseam's own events\n\n");
        out.push_str("| Event | Subscribers |\n|---|---|\n");
        for event in internal {
            row(
                out,
                &[&format!("`{}`", event.reference()), &subscribers(event)],
            );
        }
        out.push('\n');
    }
}

fn event_section(out: &mut String, event: &EventDoc) {
    let _ = writeln!(out, "### `{}` v{}\n", event.name, event.version);
    out.push_str("| | |\n|---|---|\n");
    row(out, &["Rust type", &format!("`{}`", event.rust_type)]);
    row(out, &["Content type", &format!("`{}`", event.content_type)]);
    let publishers = if event.publishers.is_empty() {
        "none declared".to_owned()
    } else {
        event
            .publishers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    row(out, &["Published by", &publishers]);
    row(out, &["Subscribers", &subscribers(event)]);
    out.push('\n');
    match &event.schema {
        Some(schema) => schema_block(out, "Payload schema", schema),
        None => out.push_str(
            "No payload schema: derive `schemars::JsonSchema` on the event to document it.\n\n",
        ),
    }
}

fn subscribers(event: &EventDoc) -> String {
    if event.subscribers.is_empty() {
        return "none".to_owned();
    }
    event
        .subscribers
        .iter()
        .map(|s| match s.group {
            Some(group) if s.role == Role::Subscriber => {
                format!("group `{group}` (`{}`)", s.handler)
            }
            Some(group) => format!("{} `{group}`", s.role.as_str()),
            None => format!("inline `{}`", s.handler),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn groups(out: &mut String, catalog: &Catalog) {
    out.push_str("## Groups\n\n");
    if catalog.groups.is_empty() {
        out.push_str("None.\n\n");
        return;
    }
    out.push_str("| Group | Kind | Route | Receives | Handlers | Publishes | Sends |\n");
    out.push_str("|---|---|---|---|---|---|---|\n");
    for group in &catalog.groups {
        let receives = if group.role == Role::Command {
            format!("`{}`", group.name.trim_start_matches("command:"))
        } else {
            code_list(&group.events)
        };
        row(
            out,
            &[
                &format!("`{}`", group.name),
                group.role.as_str(),
                group.route.as_str(),
                &receives,
                &code_list(&group.handlers),
                &code_list(&group.publishes),
                &code_list(&group.sends),
            ],
        );
    }
    out.push('\n');
}

fn aggregates(out: &mut String, catalog: &Catalog) {
    out.push_str("## Aggregates\n\n");
    if catalog.aggregates.is_empty() {
        out.push_str("None.\n");
        return;
    }
    out.push_str("| Aggregate | Rust type | Events |\n|---|---|---|\n");
    for aggregate in &catalog.aggregates {
        row(
            out,
            &[
                &format!("`{}`", aggregate.kind),
                &format!("`{}`", aggregate.rust_type),
                &code_list(&aggregate.events),
            ],
        );
    }
}

fn row(out: &mut String, cells: &[&str]) {
    out.push('|');
    for text in cells {
        out.push(' ');
        cell(out, text);
        out.push_str(" |");
    }
    out.push('\n');
}
