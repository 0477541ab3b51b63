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
    processes(&mut out, catalog);

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

/// Which process runs which modules and groups, and over which transport the others reach
/// it; nothing when one process runs everything, so that an app that is not routed reads as
/// it always did.
fn processes(out: &mut String, catalog: &Catalog) {
    if !catalog.is_routed() {
        return;
    }
    out.push_str("## Processes\n\n");
    out.push_str(
        "Every process runs the same binary with the same routing (`INSEAM_CONFIG`); \
         `INSEAM_PROCESS` names the one starting. The main process runs every group no other \
         process claims. A message whose receiving group runs in another process travels over \
         that process's transport (to the main process, over the sender's own); the receiving \
         process stages it in its own database, and its relay delivers it (the route below).\n\n",
    );
    out.push_str("| Process | Reached over | Modules | Groups |\n|---|---|---|---|\n");
    for process in &catalog.processes {
        row(
            out,
            &[
                &format!("`{}`", process.name),
                &code_list(&process.transports),
                &code_list(&process.modules),
                &code_list(&process.groups),
            ],
        );
    }
    out.push('\n');
}

/// Where a group runs, for a routed app: `` `billing` over `nats` ``.
fn placement(catalog: &Catalog, group: &str) -> String {
    match catalog.group(group) {
        Some(group) if !group.transports.is_empty() => {
            format!("`{}` over {}", group.process, code_list(&group.transports))
        }
        Some(group) => format!("`{}`", group.process),
        None => "–".to_owned(),
    }
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
        event_section(out, catalog, event);
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
                &[
                    &format!("`{}`", event.reference()),
                    &subscribers(catalog, event),
                ],
            );
        }
        out.push('\n');
    }
}

fn event_section(out: &mut String, catalog: &Catalog, event: &EventDoc) {
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
    row(out, &["Subscribers", &subscribers(catalog, event)]);
    out.push('\n');
    match &event.schema {
        Some(schema) => schema_block(out, "Payload schema", schema),
        None => out.push_str(
            "No payload schema: derive `schemars::JsonSchema` on the event to document it.\n\n",
        ),
    }
}

fn subscribers(catalog: &Catalog, event: &EventDoc) -> String {
    if event.subscribers.is_empty() {
        return "none".to_owned();
    }
    event
        .subscribers
        .iter()
        .map(|s| {
            let mut text = match s.group {
                Some(group) if s.role == Role::Subscriber => {
                    format!("group `{group}` (`{}`)", s.handler)
                }
                Some(group) => format!("{} `{group}`", s.role.as_str()),
                None => format!("inline `{}`", s.handler),
            };
            // An inline subscriber runs wherever the event is published; a group, in the
            // process the routing gives it.
            if let Some(group) = s.group.and_then(|g| catalog.group(g))
                && catalog.is_routed()
            {
                let _ = write!(text, " in `{}`", group.process);
            }
            text
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
    let routed = catalog.is_routed();
    if routed {
        out.push_str(
            "| Group | Kind | Process | Route | Receives | Handlers | Publishes | Sends |\n",
        );
        out.push_str("|---|---|---|---|---|---|---|---|\n");
    } else {
        out.push_str("| Group | Kind | Route | Receives | Handlers | Publishes | Sends |\n");
        out.push_str("|---|---|---|---|---|---|---|\n");
    }
    for group in &catalog.groups {
        let receives = if group.role == Role::Command {
            format!("`{}`", group.name.trim_start_matches("command:"))
        } else {
            code_list(&group.events)
        };
        let name = format!("`{}`", group.name);
        let process = placement(catalog, group.name);
        let handlers = code_list(&group.handlers);
        let publishes = code_list(&group.publishes);
        let sends = code_list(&group.sends);
        let mut cells: Vec<&str> = vec![&name, group.role.as_str()];
        if routed {
            cells.push(&process);
        }
        cells.extend([
            group.route.as_str(),
            &receives,
            &handlers,
            &publishes,
            &sends,
        ]);
        row(out, &cells);
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
