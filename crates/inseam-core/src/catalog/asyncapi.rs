//! The catalog as an AsyncAPI 3.0 document.
//!
//! One channel per event name, one message per contract version, a `send` operation per event
//! that has publishers and a `receive` operation per group that subscribes to it. Durable
//! commands travel the same way (outbox, relay, their handler's group), so each has a channel
//! `command.<name>` too, with a `receive` operation for its handler and a `send` operation for
//! those that declare they send it. Commands sent in process, and queries, are calls, not
//! messages on a channel: they are in the Markdown catalog only. Payload
//! schemas are JSON Schema draft 2020-12 (what `schemars` writes); their shared definitions
//! move to `components.schemas` so that every `$ref` resolves inside the document.
//!
//! In a routed app, every transport a process is reached over is a server (protocol `nats`
//! for the NATS transport, the transport's name otherwise; its host a variable, since where
//! the broker runs and how to log in belong to the deployment, never to this document). A
//! channel whose messages go from one process to another lists the servers they travel
//! through. On NATS its address is the subject pattern `inseam.*.<channel>` (decision 0016):
//! `*` is the partition token and `inseam` the default subject prefix. A group's `receive`
//! operation over NATS carries the NATS operation binding, whose `queue` is the group: its
//! processes share one durable consumer per partition. A channel without servers stays in
//! one process, outbox to inbox, and its description says so.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{Value, json};

use super::{Catalog, CommandDoc, EventDoc, GroupDoc, Role};

/// The schema format of the payloads.
const SCHEMA_FORMAT: &str = "application/schema+json;version=draft-2020-12";

/// The name of the NATS JetStream transport (`inseam::nats`), whose channels and servers the
/// document describes with the NATS protocol and bindings.
const NATS: &str = "nats";

/// The NATS transport's default subject prefix (`INSEAM_NATS_PREFIX` changes it).
const NATS_PREFIX: &str = "inseam";

/// The version of the AsyncAPI NATS bindings the operations use.
const NATS_BINDING_VERSION: &str = "0.1.0";

/// The longest `queue` the NATS operation binding allows.
const NATS_QUEUE_MAX: usize = 255;

/// The AsyncAPI document could not be written.
#[derive(Debug, thiserror::Error)]
#[error("could not write the AsyncAPI document as YAML: {0}")]
pub struct AsyncApiError(#[source] serde_saphyr::ser::Error);

/// An AsyncAPI 3.0 document. Its fields are public so that an app can fill in what the
/// registrations cannot know (its version, its description) before writing it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Document {
    /// The AsyncAPI version: `3.0.0`.
    pub asyncapi: &'static str,
    /// Title, version and description.
    pub info: Info,
    /// One server per transport between the processes of a routed app; none when one process
    /// runs everything.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub servers: BTreeMap<String, Value>,
    /// The content type of payloads that do not say otherwise.
    pub default_content_type: &'static str,
    /// One channel per event name.
    pub channels: BTreeMap<String, Value>,
    /// Who sends and who receives on each channel.
    pub operations: BTreeMap<String, Value>,
    /// Messages and shared schemas.
    pub components: Components,
}

/// The document's `info`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Info {
    /// The app's source.
    pub title: String,
    /// The API's version (`1.0.0` unless set).
    pub version: String,
    /// What the document is.
    pub description: String,
}

/// The document's `components`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Components {
    /// One message per event contract, keyed `<name>.v<version>`.
    pub messages: BTreeMap<String, Value>,
    /// Schemas the payloads share.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub schemas: BTreeMap<String, Value>,
}

pub(super) fn document(catalog: &Catalog) -> Document {
    let mut doc = Document {
        asyncapi: "3.0.0",
        info: Info {
            title: catalog.source.clone(),
            version: "1.0.0".to_owned(),
            description: format!(
                "The events and durable commands of `{}`, generated from its registrations.",
                catalog.source
            ),
        },
        servers: BTreeMap::new(),
        default_content_type: "application/json",
        channels: BTreeMap::new(),
        operations: BTreeMap::new(),
        components: Components {
            messages: BTreeMap::new(),
            schemas: BTreeMap::new(),
        },
    };
    for event in catalog.contracts() {
        let key = message_key(event);
        let payload = event.schema.clone().map(|schema| {
            json!({
                "schemaFormat": SCHEMA_FORMAT,
                "schema": hoist(schema, &mut doc.components.schemas, &key),
            })
        });
        let mut message = json!({
            "name": event.name,
            "title": format!("{} v{}", event.name, event.version),
            "contentType": event.content_type,
            "x-inseam-version": event.version,
            "x-inseam-rust-type": event.rust_type,
        });
        if let (Some(payload), Some(object)) = (payload, message.as_object_mut()) {
            object.insert("payload".to_owned(), payload);
        }
        doc.components.messages.insert(key.clone(), message);

        let channel = doc
            .channels
            .entry(event.name.to_owned())
            .or_insert_with(|| json!({ "address": event.name, "messages": {} }));
        if let Some(messages) = channel.get_mut("messages").and_then(Value::as_object_mut) {
            messages.insert(
                key.clone(),
                json!({ "$ref": format!("#/components/messages/{key}") }),
            );
        }
        let channel_ref = json!({ "$ref": format!("#/channels/{}", event.name) });
        let message_ref = json!([{ "$ref": format!("#/channels/{}/messages/{key}", event.name) }]);
        let senders = catalog.event_senders(event);
        let mut channel_transports = BTreeSet::new();

        if !event.publishers.is_empty() {
            let by: Vec<String> = event.publishers.iter().map(ToString::to_string).collect();
            doc.operations.insert(
                format!("publish--{key}"),
                json!({
                    "action": "send",
                    "channel": channel_ref,
                    "summary": format!("Published by {}.", by.join(", ")),
                    "messages": message_ref,
                }),
            );
        }
        for subscriber in &event.subscribers {
            let Some(group) = subscriber.group else {
                continue;
            };
            let role = match subscriber.role {
                Role::Subscriber => String::new(),
                role => format!(" ({})", role.as_str()),
            };
            let route = catalog
                .group(group)
                .map_or("", |g| g.route.as_str())
                .to_owned();
            let mut operation = json!({
                "action": "receive",
                "channel": channel_ref,
                "summary": format!("Received by group `{group}`{role}."),
                "messages": message_ref,
                "x-inseam-group": group,
                "x-inseam-route": route,
            });
            if let Some(receiver) = catalog.group(group) {
                channel_transports.extend(receive_route(
                    catalog,
                    &mut operation,
                    receiver,
                    &senders,
                ));
            }
            doc.operations.insert(
                format!("{}--receives--{key}", operation_part(group)),
                operation,
            );
        }
        if let Some(channel) = doc.channels.get_mut(event.name) {
            routed_channel(catalog, channel, event.name, &channel_transports);
        }
    }
    for command in catalog.commands.iter().filter(|c| c.durable) {
        durable_command(&mut doc, catalog, command);
    }
    for process in &catalog.processes {
        for transport in &process.transports {
            doc.servers
                .entry(server_key(transport))
                .or_insert_with(|| server(transport));
        }
    }
    doc
}

/// Adds to a group's `receive` operation, in a routed app, the process that runs the group
/// and, when its messages reach it over NATS, the NATS binding. Returns the transports the
/// group's messages take to reach it from `senders`.
fn receive_route<'a>(
    catalog: &'a Catalog,
    operation: &mut Value,
    group: &GroupDoc,
    senders: &BTreeSet<&'a str>,
) -> BTreeSet<&'a str> {
    let transports = catalog.transports_into(senders, &group.process);
    let Some(object) = operation.as_object_mut() else {
        return transports;
    };
    if !catalog.is_routed() {
        return transports;
    }
    object.insert("x-inseam-process".to_owned(), json!(group.process));
    if transports.contains(NATS) {
        // The group's processes share its consumers as a queue group shares a subject.
        let mut binding = serde_json::Map::new();
        if group.name.len() <= NATS_QUEUE_MAX {
            binding.insert("queue".to_owned(), json!(group.name));
        }
        binding.insert("bindingVersion".to_owned(), json!(NATS_BINDING_VERSION));
        object.insert("bindings".to_owned(), json!({ NATS: binding }));
    }
    transports
}

/// Points a channel at the servers its messages travel through between processes, with its
/// address on the broker; in a routed app, says that a channel without any stays in process.
fn routed_channel(catalog: &Catalog, channel: &mut Value, name: &str, transports: &BTreeSet<&str>) {
    let Some(object) = channel.as_object_mut() else {
        return;
    };
    if !catalog.is_routed() {
        return;
    }
    if transports.is_empty() {
        object.insert(
            "description".to_owned(),
            json!(
                "Stays in one process: its publishers and receiving groups run together, so it \
                 goes from the outbox to the inbox of one database and on no broker."
            ),
        );
        return;
    }
    let mut description = Vec::new();
    for transport in transports {
        if *transport == NATS {
            object.insert(
                "address".to_owned(),
                json!(format!("{NATS_PREFIX}.*.{name}")),
            );
            description.push(format!(
                "On NATS JetStream between processes: subjects `{NATS_PREFIX}.<partition>.{name}` \
                 (the address's `*` is the partition token; `{NATS_PREFIX}` is the default \
                 subject prefix, `INSEAM_NATS_PREFIX`)."
            ));
        } else {
            description.push(format!(
                "On transport `{transport}` between processes: channel `{name}`."
            ));
        }
    }
    object.insert("description".to_owned(), json!(description.join(" ")));
    let servers: Vec<Value> = transports
        .iter()
        .map(|t| json!({ "$ref": format!("#/servers/{}", server_key(t)) }))
        .collect();
    object.insert("servers".to_owned(), Value::Array(servers));
}

/// The server of a transport. Its host is a variable: where the broker runs, and how to log
/// in, belong to each deployment.
fn server(transport: &str) -> Value {
    if transport == NATS {
        return json!({
            "host": "{host}",
            "protocol": "nats",
            "title": "NATS JetStream",
            "description": format!(
                "The NATS JetStream servers between the processes (`inseam::nats`, decision \
                 0016). One stream, `INSEAM` by default, holds every message, on the subject \
                 `{NATS_PREFIX}.<partition>.<channel>`; each group reads through one durable \
                 pull consumer per partition, named `<group>-<partition>`. The servers and \
                 their credentials come from the environment of each process \
                 (`INSEAM_NATS_URL` and the other `INSEAM_NATS_*` variables)."
            ),
            "variables": {
                "host": {
                    "default": "127.0.0.1:4222",
                    "description": "A NATS server, `host:port` (`INSEAM_NATS_URL`).",
                },
            },
        });
    }
    json!({
        "host": "{host}",
        "protocol": transport,
        "description": format!("Transport `{transport}` between the processes."),
        "variables": {
            "host": {
                "description": format!("Where transport `{transport}` runs."),
            },
        },
    })
}

/// `name` with every character a server's key does not allow (`[A-Za-z0-9_-]`) as `_`.
fn server_key(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The channel, message and operations of a durable command.
fn durable_command(doc: &mut Document, catalog: &Catalog, command: &CommandDoc) {
    let key = format!("command.{}", command.name);
    let mut message = json!({
        "name": command.name,
        "title": format!("{} (command)", command.name),
        "contentType": "application/json",
        "x-inseam-rust-type": command.rust_type,
    });
    if let (Some(schema), Some(object)) = (command.schema.clone(), message.as_object_mut()) {
        let schema = hoist(schema, &mut doc.components.schemas, &key);
        object.insert(
            "payload".to_owned(),
            json!({ "schemaFormat": SCHEMA_FORMAT, "schema": schema }),
        );
    }
    doc.components.messages.insert(key.clone(), message);
    doc.channels.insert(
        key.clone(),
        json!({
            "address": command.name,
            "messages": { key.clone(): { "$ref": format!("#/components/messages/{key}") } },
        }),
    );
    let channel_ref = json!({ "$ref": format!("#/channels/{key}") });
    let message_ref = json!([{ "$ref": format!("#/channels/{key}/messages/{key}") }]);

    let mut senders: Vec<String> = catalog
        .groups
        .iter()
        .filter(|g| g.role != Role::Command && g.sends.contains(&command.name))
        .map(|g| match g.role {
            Role::Subscriber => format!("group `{}`", g.name),
            role => format!("{} `{}`", role.as_str(), g.name),
        })
        .collect();
    senders.extend(
        catalog
            .commands
            .iter()
            .filter_map(|c| c.handler.as_ref())
            .filter(|h| h.sends.contains(&command.name))
            .map(|h| format!("command handler `{}`", h.name)),
    );
    if !senders.is_empty() {
        doc.operations.insert(
            format!("send--{key}"),
            json!({
                "action": "send",
                "channel": channel_ref,
                "summary": format!("Sent durably by {}.", senders.join(", ")),
                "messages": message_ref,
            }),
        );
    }
    let group = catalog
        .groups
        .iter()
        .find(|g| g.role == Role::Command && g.name.strip_prefix("command:") == Some(command.name));
    let mut transports = BTreeSet::new();
    if let (Some(handler), Some(group)) = (&command.handler, group) {
        let mut operation = json!({
            "action": "receive",
            "channel": channel_ref,
            "summary": format!("Handled by `{}`.", handler.name),
            "messages": message_ref,
            "x-inseam-group": group.name,
            "x-inseam-route": group.route.as_str(),
        });
        let senders = catalog.command_senders(command.name);
        transports = receive_route(catalog, &mut operation, group, &senders);
        doc.operations.insert(
            format!("{}--receives--{key}", operation_part(group.name)),
            operation,
        );
    }
    if let Some(channel) = doc.channels.get_mut(&key) {
        routed_channel(catalog, channel, command.name, &transports);
    }
}

pub(super) fn yaml(catalog: &Catalog) -> Result<String, AsyncApiError> {
    serde_saphyr::to_string(&document(catalog)).map_err(AsyncApiError)
}

/// `name` with every character an AsyncAPI key does not allow (`[A-Za-z0-9.\-_]`) as `_`.
fn operation_part(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn message_key(event: &EventDoc) -> String {
    format!("{}.v{}", event.name, event.version)
}

/// Moves `schema`'s `$defs` into `shared` and points its references there. A definition whose
/// name is taken by a different one is kept under `<message>.<name>`.
fn hoist(mut schema: Value, shared: &mut BTreeMap<String, Value>, message: &str) -> Value {
    let defs = schema
        .as_object_mut()
        .and_then(|object| {
            object.remove("$schema");
            object.remove("$defs")
        })
        .and_then(|defs| match defs {
            Value::Object(defs) => Some(defs),
            _ => None,
        })
        .unwrap_or_default();
    // A definition is compared in its stored form (its own references rewritten); a name
    // taken by a different definition moves this message's one under `<message>.<name>`, which
    // can change other definitions' references, hence the second round.
    let mut renames: BTreeMap<String, String> = defs
        .keys()
        .map(|name| (name.clone(), name.clone()))
        .collect();
    for _ in 0..2 {
        let mut next = BTreeMap::new();
        for (name, def) in &defs {
            let key = match shared.get(name) {
                Some(existing) if *existing != rewrite(def.clone(), &renames) => {
                    format!("{message}.{name}")
                }
                _ => name.clone(),
            };
            next.insert(name.clone(), key);
        }
        renames = next;
    }
    for (name, def) in defs {
        let key = renames.get(&name).cloned().unwrap_or(name);
        let def = rewrite(def, &renames);
        shared.entry(key).or_insert(def);
    }
    rewrite(schema, &renames)
}

/// `value` with every `#/$defs/<name>` reference pointing into `components.schemas`.
fn rewrite(value: Value, renames: &BTreeMap<String, String>) -> Value {
    match value {
        Value::Object(object) => Value::Object(
            object
                .into_iter()
                .map(|(key, value)| {
                    let value = match (key.as_str(), value) {
                        ("$ref", Value::String(target)) => {
                            Value::String(match target.strip_prefix("#/$defs/") {
                                Some(name) => format!(
                                    "#/components/schemas/{}",
                                    renames.get(name).map_or(name, String::as_str)
                                ),
                                None => target,
                            })
                        }
                        (_, value) => rewrite(value, renames),
                    };
                    (key, value)
                })
                .collect(),
        ),
        Value::Array(items) => {
            Value::Array(items.into_iter().map(|v| rewrite(v, renames)).collect())
        }
        other => other,
    }
}
