//! The catalog as a Mermaid flow diagram.
//!
//! Commands are parallelograms, events hexagons, groups subroutines (sagas, projections and
//! subscribers), inline subscribers stadiums; nodes sit in one box per module. A solid arrow is
//! "publishes" or "receives", a dotted arrow "sends durably".

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{Catalog, EventRef, Role};

pub(super) fn render(catalog: &Catalog) -> String {
    let mut nodes: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let mut outside: Vec<String> = Vec::new();
    let mut edges: Vec<String> = Vec::new();

    for command in &catalog.commands {
        nodes
            .entry(Catalog::module_of(command.name))
            .or_default()
            .push(format!("{}[/\"{}\"/]", id("c", command.name), command.name));
        if let Some(handler) = &command.handler {
            emits(
                &mut edges,
                &id("c", command.name),
                &handler.publishes,
                &handler.sends,
            );
        }
    }
    for event in catalog.contracts() {
        nodes
            .entry(Catalog::module_of(event.name))
            .or_default()
            .push(format!(
                "{}{{{{\"{}\"}}}}",
                event_id(&event.reference()),
                event.reference()
            ));
        for subscriber in &event.subscribers {
            match subscriber.group {
                Some(group) => {
                    edges.push(format!(
                        "{} --> {}",
                        event_id(&event.reference()),
                        id("g", group)
                    ));
                }
                None => {
                    let node = id("i", subscriber.handler);
                    outside.push(format!("{node}([\"{}\"])", subscriber.handler));
                    edges.push(format!("{} --> {node}", event_id(&event.reference())));
                }
            }
        }
    }
    for group in catalog.groups.iter().filter(|g| g.role != Role::Command) {
        let label = match group.role {
            Role::Subscriber => group.name.to_owned(),
            role => format!("{} {}", role.as_str(), group.name),
        };
        nodes
            .entry(Catalog::module_of(group.name))
            .or_default()
            .push(format!("{}[[\"{label}\"]]", id("g", group.name)));
        emits(
            &mut edges,
            &id("g", group.name),
            &group.publishes,
            &group.sends,
        );
    }
    for event in &catalog.events {
        for publisher in &event.publishers {
            if let super::Publisher::InlineSubscriber(handler) = publisher {
                edges.push(format!(
                    "{} --> {}",
                    id("i", handler),
                    event_id(&event.reference())
                ));
            }
        }
    }

    let mut out = String::from("flowchart LR\n");
    for (module, nodes) in &nodes {
        let _ = writeln!(out, "  subgraph {}[\"{module}\"]", id("m", module));
        for node in nodes {
            let _ = writeln!(out, "    {node}");
        }
        out.push_str("  end\n");
    }
    outside.sort();
    outside.dedup();
    for node in outside {
        let _ = writeln!(out, "  {node}");
    }
    edges.sort();
    edges.dedup();
    for edge in edges {
        let _ = writeln!(out, "  {edge}");
    }
    out
}

/// The edges from `from` to what it publishes (solid) and sends (dotted).
fn emits(edges: &mut Vec<String>, from: &str, publishes: &[EventRef], sends: &[&str]) {
    for event in publishes {
        edges.push(format!("{from} --> {}", event_id(event)));
    }
    for sent in sends {
        edges.push(format!("{from} -.-> {}", id("c", sent)));
    }
}

/// The node id of one version of an event.
fn event_id(event: &EventRef) -> String {
    format!("{}_v{}", id("e", event.name), event.version)
}

/// A Mermaid node id: a kind prefix and the name, `_` written `__` and every other character
/// that is not a letter or a digit `_`, so that different names never share an id.
fn id(kind: &str, name: &str) -> String {
    let mut id = String::with_capacity(kind.len() + 1 + name.len());
    id.push_str(kind);
    id.push('_');
    for c in name.chars() {
        match c {
            '_' => id.push_str("__"),
            c if c.is_ascii_alphanumeric() => id.push(c),
            _ => id.push('_'),
        }
    }
    id
}
