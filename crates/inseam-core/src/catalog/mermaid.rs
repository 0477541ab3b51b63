//! The catalog as a Mermaid flow diagram.
//!
//! Commands are parallelograms, events hexagons, groups subroutines (sagas, projections and
//! subscribers), inline subscribers stadiums; nodes sit in one box per module. A solid arrow is
//! "publishes" or "receives", a dotted arrow "sends durably".
//!
//! In a routed app, the modules and groups of each process other than the main one sit in a
//! box of their own (`billing (over nats)`), and an arrow between two processes is labelled
//! with the transport it takes. A group is placed in the process that runs it, a durable
//! command in the process of its group, and an event or a command sent in process with its
//! module's process.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use super::{Catalog, EventRef, Role};
use crate::routing::MAIN;

/// An arrow: where it starts, its kind (`-->` or `-.->`) and where it ends.
type Edge = (String, &'static str, String);

pub(super) fn render(catalog: &Catalog) -> String {
    // Nodes by process and module. The main process's module boxes are written first and at
    // the top level, as in an app that is not routed; each other process's inside its own box.
    let mut nodes: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
    // The process of every node that has one (inline subscribers run wherever their event
    // is published, so they have none).
    let mut places: HashMap<String, &str> = HashMap::new();
    let mut outside: Vec<String> = Vec::new();
    let mut edges: Vec<Edge> = Vec::new();

    for command in &catalog.commands {
        let node = id("c", command.name);
        let process = catalog.command_process(command.name);
        nodes
            .entry((process, Catalog::module_of(command.name)))
            .or_default()
            .push(format!("{node}[/\"{}\"/]", command.name));
        places.insert(node.clone(), process);
        if let Some(handler) = &command.handler {
            emits(&mut edges, &node, &handler.publishes, &handler.sends);
        }
    }
    for event in catalog.contracts() {
        let node = event_id(&event.reference());
        let module = Catalog::module_of(event.name);
        let process = catalog.module_process(module);
        nodes
            .entry((process, module))
            .or_default()
            .push(format!("{node}{{{{\"{}\"}}}}", event.reference()));
        places.insert(node.clone(), process);
        for subscriber in &event.subscribers {
            match subscriber.group {
                Some(group) => edges.push((node.clone(), "-->", id("g", group))),
                None => {
                    let inline = id("i", subscriber.handler);
                    outside.push(format!("{inline}([\"{}\"])", subscriber.handler));
                    edges.push((node.clone(), "-->", inline));
                }
            }
        }
    }
    for group in catalog.groups.iter().filter(|g| g.role != Role::Command) {
        let label = match group.role {
            Role::Subscriber => group.name.to_owned(),
            role => format!("{} {}", role.as_str(), group.name),
        };
        let node = id("g", group.name);
        nodes
            .entry((group.process.as_str(), Catalog::module_of(group.name)))
            .or_default()
            .push(format!("{node}[[\"{label}\"]]"));
        places.insert(node.clone(), group.process.as_str());
        emits(&mut edges, &node, &group.publishes, &group.sends);
    }
    for event in &catalog.events {
        for publisher in &event.publishers {
            if let super::Publisher::InlineSubscriber(handler) = publisher {
                edges.push((id("i", handler), "-->", event_id(&event.reference())));
            }
        }
    }

    let mut out = String::from("flowchart LR\n");
    for ((_, module), nodes) in nodes.iter().filter(|((p, _), _)| *p == MAIN) {
        module_box(&mut out, "  ", &id("m", module), module, nodes);
    }
    for process in catalog.processes.iter().filter(|p| p.name != MAIN) {
        let _ = writeln!(
            out,
            "  subgraph {}[\"{} (over {})\"]",
            id("p", &process.name),
            process.name,
            process.transports.join(", ")
        );
        let boxes = nodes
            .iter()
            .filter(|((p, _), _)| *p == process.name.as_str());
        for ((_, module), nodes) in boxes {
            // A module's box in another process has an id of its own: a module whose single
            // groups are routed away has a box in the main process too.
            let module_id = format!("{}_{}", id("p", &process.name), id("m", module));
            module_box(&mut out, "    ", &module_id, module, nodes);
        }
        out.push_str("  end\n");
    }
    outside.sort();
    outside.dedup();
    for node in outside {
        let _ = writeln!(out, "  {node}");
    }
    let mut lines: Vec<String> = edges
        .into_iter()
        .map(|(from, arrow, to)| {
            let transport = match (places.get(&from), places.get(&to)) {
                (Some(a), Some(b)) => catalog.transport_between(a, b),
                _ => None,
            };
            match transport {
                Some(transport) => format!("{from} {arrow}|{transport}| {to}"),
                None => format!("{from} {arrow} {to}"),
            }
        })
        .collect();
    lines.sort();
    lines.dedup();
    for line in lines {
        let _ = writeln!(out, "  {line}");
    }
    out
}

/// Writes a module's box with its nodes, indented by `indent`.
fn module_box(out: &mut String, indent: &str, box_id: &str, module: &str, nodes: &[String]) {
    let _ = writeln!(out, "{indent}subgraph {box_id}[\"{module}\"]");
    for node in nodes {
        let _ = writeln!(out, "{indent}  {node}");
    }
    let _ = writeln!(out, "{indent}end");
}

/// The edges from `from` to what it publishes (solid) and sends (dotted).
fn emits(edges: &mut Vec<Edge>, from: &str, publishes: &[EventRef], sends: &[&str]) {
    for event in publishes {
        edges.push((from.to_owned(), "-->", event_id(event)));
    }
    for sent in sends {
        edges.push((from.to_owned(), "-.->", id("c", sent)));
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
