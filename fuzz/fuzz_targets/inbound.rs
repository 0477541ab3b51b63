//! What arrives from a broker, run through everything inseam does with it before a handler
//! runs, which must never panic:
//!
//! - the NATS transport's reading of a received message: its channel from the subject, its key
//!   (`Inseam-Key`, or percent-encoded in `Inseam-Key-Encoded`) and its application headers
//!   in their published order (`Inseam-Headers`), from a header map built as the client
//!   builds one from the wire;
//! - what the staging consumer reads before it writes a row (`inseam-sql`'s `bridge::stage`):
//!   the envelope (`RawEnvelope::from_json`), or, for bytes that are not one, the `ce-id` and
//!   `ce-type` broker headers and the reason of the dead letter;
//! - the envelope's decode paths short of the handler, as `App::check_decodes` runs them for
//!   an event group and a durable command: routing by `type` and `typeversion`, the upcaster
//!   chain, `data` or `data_base64` through the event's codec; and the extension attributes
//!   as headers.
//!
//! Beyond not panicking, it checks that an envelope inseam reads and writes again reads back
//! the same, and that the headers and key the NATS transport writes read back as published.
//!
//! An input is the bytes of an envelope alone (the seeds are plain CloudEvents JSON), or a
//! head and the envelope, apart by an empty line:
//!
//! ```text
//! INSEAM-FUZZ
//! subject inseam.3.orders.order_placed
//! key order-42
//! attempt 2
//! Inseam-Key: order-42
//! ce-type: orders.order_placed
//!
//! {"specversion":"1.0", ...}
//! ```
//!
//! `subject` is the NATS subject it came on (`inseam.0.orders.order_placed` by default), `key`
//! a transport's key for the message (otherwise the one the NATS headers give), `attempt` the
//! delivery number (1 by default) and every `name: value` line a broker header.

#![no_main]

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::OnceLock;
use std::time::Duration;

use chrono::SubsecRound as _;
use inseam::prelude::*;
use inseam::transport::{Acker, Incoming, TransportError};
use inseam::{BoxError, Codec, CodecError, HeaderName, RawEnvelope};
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

const HEAD: &[u8] = b"INSEAM-FUZZ\n";
const PREFIX: &str = "inseam";
const GROUP: &str = "shipping";
const DURABLE: &str = "command:orders.place";

// An app with an event at version 2 (an upcaster from 1) for a group, an event whose codec is
// not JSON (`data_base64`), and a durable command: the routes `check_decodes` reaches.

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed", version = 2, key = order_id)]
struct OrderPlaced {
    order_id: u64,
    customer: String,
    total_cents: i64,
}

/// v1 had `order` and `total` (a decimal amount).
fn upcast_v1(mut order: serde_json::Value) -> Result<serde_json::Value, BoxError> {
    let fields = order.as_object_mut().ok_or("a v1 order is a JSON object")?;
    let id = fields.remove("order").ok_or("a v1 order has no `order`")?;
    let total = fields
        .remove("total")
        .and_then(|t| t.as_f64())
        .ok_or("a v1 order has no numeric `total`")?;
    fields.insert("order_id".to_owned(), id);
    fields.insert(
        "total_cents".to_owned(),
        ((total * 100.0).round() as i64).into(),
    );
    Ok(order)
}

/// Plain text payloads: not JSON, so carried as `data_base64`.
#[derive(Debug, Clone, Copy)]
struct Text;

impl Codec for Text {
    const CONTENT_TYPE: &'static str = "text/plain; charset=utf-8";
    const IS_JSON: bool = false;

    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
        match serde_json::to_value(value) {
            Ok(serde_json::Value::String(text)) => Ok(text.into_bytes()),
            _ => Err(text_error("only a string encodes as text")),
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
        let text = std::str::from_utf8(bytes).map_err(|e| text_error(e.to_string()))?;
        T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(text))
            .map_err(|e| text_error(e.to_string()))
    }
}

fn text_error(why: impl Into<String>) -> CodecError {
    CodecError {
        content_type: Text::CONTENT_TYPE,
        source: why.into().into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "shipping.note_written", codec = Text)]
#[serde(transparent)]
struct NoteWritten {
    text: String,
}

#[event_handler(group = "shipping")]
async fn ship(order: &OrderPlaced) {
    black_box(order.order_id);
}

#[event_handler(group = "shipping")]
async fn file_note(note: &NoteWritten) {
    black_box(&note.text);
}

#[derive(Debug, Clone, Serialize, Deserialize, Command)]
#[command(name = "orders.place", output = ())]
struct Place {
    order_id: u64,
    lines: Vec<(String, u32)>,
}

#[command_handler]
async fn place(cmd: Place, _ctx: &mut CommandContext<'_>) -> Result<(), Infallible> {
    black_box(cmd.order_id);
    Ok(())
}

fn app() -> &'static App {
    static APP: OnceLock<App> = OnceLock::new();
    APP.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime to build the app");
        runtime
            .block_on(
                App::builder()
                    .handler::<ship>()
                    .handler::<file_note>()
                    .handler::<place>()
                    .durable_command::<Place>()
                    .upcaster("orders.order_placed", 1, upcast_v1)
                    .build(),
            )
            .expect("the fuzz target's app builds")
    })
}

/// An input split into what a broker hands over.
struct Input<'a> {
    subject: String,
    key: Option<String>,
    attempt: u32,
    headers: Vec<(String, String)>,
    envelope: &'a [u8],
}

fn split(data: &[u8]) -> Input<'_> {
    let mut input = Input {
        subject: format!("{PREFIX}.0.orders.order_placed"),
        key: None,
        attempt: 1,
        headers: Vec::new(),
        envelope: data,
    };
    let Some(rest) = data.strip_prefix(HEAD) else {
        return input;
    };
    let (head, envelope) = match rest.windows(2).position(|w| w == b"\n\n") {
        Some(at) => (&rest[..at], &rest[at + 2..]),
        None => (rest, &rest[rest.len()..]),
    };
    input.envelope = envelope;
    for line in String::from_utf8_lossy(head).split('\n') {
        if let Some(subject) = line.strip_prefix("subject ") {
            subject.clone_into(&mut input.subject);
        } else if let Some(key) = line.strip_prefix("key ") {
            input.key = Some(key.to_owned());
        } else if let Some(attempt) = line.strip_prefix("attempt ") {
            input.attempt = attempt.trim().parse().unwrap_or(u32::MAX);
        } else if let Some((name, value)) = line.split_once(':') {
            input.headers.push((name.to_owned(), value.to_owned()));
        }
    }
    input
}

/// The header map the NATS client hands over for these header lines: names it accepts, values
/// trimmed, without line breaks.
fn header_map(headers: &[(String, String)]) -> Option<async_nats::HeaderMap> {
    if headers.is_empty() {
        return None;
    }
    let mut map = async_nats::HeaderMap::new();
    for (name, value) in headers {
        let Ok(name) = name.parse::<async_nats::HeaderName>() else {
            continue;
        };
        let Ok(value) = value.trim().parse::<async_nats::HeaderValue>() else {
            continue;
        };
        map.append(name, value);
    }
    Some(map)
}

struct NoAck;

#[async_trait::async_trait]
impl Acker for NoAck {
    async fn ack(&self) -> Result<(), TransportError> {
        Ok(())
    }
    async fn nack(&self, _delay: Duration) -> Result<(), TransportError> {
        Ok(())
    }
}

/// An error and its causes, as a dead letter's reason shows them.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// What the staging consumer does with a received message before writing its rows.
fn stage(message: &Incoming) {
    match RawEnvelope::from_json(&message.payload) {
        // (On PostgreSQL, an envelope whose `type` or key has a NUL goes the dead letter's way.)
        Ok(envelope) => {
            // The outbox and delivery rows' columns.
            black_box((
                envelope.metadata.message_id.to_string(),
                &envelope.name,
                i64::from(envelope.version),
                &envelope.key,
                envelope.metadata.correlation_id.to_string(),
            ));
            check_envelope(&envelope);
        }
        Err(error) => {
            // A dead letter's columns.
            let message_id = message
                .header("ce-id")
                .and_then(|id| Uuid::parse_str(id).ok())
                .unwrap_or_else(Uuid::now_v7)
                .to_string();
            let name = message
                .header("ce-type")
                .unwrap_or(message.channel.as_str())
                .replace('\0', "\u{fffd}");
            let key = message
                .key
                .as_ref()
                .map(|key| key.replace('\0', "\u{fffd}"));
            let reason = format!(
                "received from transport on `{}` (attempt {}): {}",
                message.channel,
                message.attempt,
                chain(&error)
            )
            .replace('\0', "\u{fffd}");
            black_box((message_id, name, reason, key));
        }
    }
}

/// The envelope's decode paths short of the handler, and its wire form read back.
fn check_envelope(envelope: &RawEnvelope) {
    for (name, value) in envelope.headers.iter() {
        assert!(
            HeaderName::new(name).is_ok(),
            "a header read from the wire has an invalid name `{name}`"
        );
        assert_eq!(envelope.headers.get(name), Some(value));
    }
    let app = app();
    for group in [GROUP, DURABLE, "unknown"] {
        if let Err(failure) = app.check_decodes(group, envelope) {
            black_box(chain(&failure));
        }
    }
    match envelope.decode::<OrderPlaced>() {
        Ok(order) => {
            black_box(order.name());
        }
        Err(error) => {
            black_box(chain(&error));
        }
    }
    if let Err(error) = app.upcast(envelope.clone()) {
        black_box(chain(&error));
    }

    let Ok(wire) = envelope.to_json() else {
        return;
    };
    let again = match RawEnvelope::from_json(&wire) {
        Ok(again) => again,
        Err(error) => panic!(
            "the wire form written for an envelope read from the wire does not read back: {}\n{}",
            chain(&error),
            String::from_utf8_lossy(&wire)
        ),
    };
    assert_eq!(again.metadata, envelope.metadata);
    assert_eq!(again.name, envelope.name);
    assert_eq!(again.version, envelope.version);
    assert_eq!(again.key, envelope.key);
    assert_eq!(again.source, envelope.source);
    assert_eq!(again.headers, envelope.headers);
    assert_eq!(again.content_type, envelope.content_type);
    // The wire form has microseconds.
    assert_eq!(again.occurred_at, envelope.occurred_at.trunc_subsecs(6));
    if inseam::envelope::is_json(&envelope.content_type) {
        // Embedded as `data`: the same JSON, maybe without the white space around it.
        let read = |bytes: &[u8]| serde_json::from_slice::<serde_json::Value>(bytes).ok();
        assert_eq!(read(&again.payload), read(&envelope.payload));
    } else {
        assert_eq!(again.payload, envelope.payload);
    }
}

/// The NATS transport's headers: what it writes reads back as published.
fn nats_round_trip(key: Option<&str>, headers: &[(String, String)]) {
    let Ok(map) = inseam_nats::fuzzing::encode_headers(Uuid::nil(), key, headers) else {
        return;
    };
    // What the client of the consuming process builds from the wire: every value trimmed.
    let mut received = async_nats::HeaderMap::new();
    for (name, values) in map.iter() {
        for value in values {
            let trimmed = value
                .as_str()
                .trim()
                .parse::<async_nats::HeaderValue>()
                .expect("a header value without line breaks");
            received.append(name.clone(), trimmed);
        }
    }
    let subject = format!("{PREFIX}.1.orders.order_placed");
    let (channel, key_back, headers_back) =
        inseam_nats::fuzzing::read_received(PREFIX, &subject, Some(&received));
    assert_eq!(channel.as_deref(), Some("orders.order_placed"));
    assert_eq!(key_back.as_deref(), key, "the key does not read back");
    assert_eq!(headers_back, headers, "the headers do not read back");
}

fuzz_target!(|data: &[u8]| {
    let input = split(data);
    let map = header_map(&input.headers);
    let (channel, nats_key, headers) =
        inseam_nats::fuzzing::read_received(PREFIX, &input.subject, map.as_ref());
    let message = Incoming {
        channel: channel.unwrap_or_else(|| input.subject.clone()),
        key: input.key.clone().or(nats_key),
        headers,
        payload: bytes::Bytes::copy_from_slice(input.envelope),
        attempt: input.attempt,
        acker: Box::new(NoAck),
    };
    stage(&message);

    // What a publisher would write for this key and these headers.
    nats_round_trip(input.key.as_deref(), &input.headers);
    black_box(format!("{message:?}"));
});
