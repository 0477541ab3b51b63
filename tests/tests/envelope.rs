//! The envelope's wire form: CloudEvents 1.0, JSON structured mode. The snapshot pins it, so a
//! change to the format is never silent.

use std::sync::Arc;

use chrono::{TimeZone, Utc};
use inseam::prelude::*;
use inseam::{Headers, RawEnvelope, WireError};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed", version = 2, key = order_id)]
struct OrderPlaced {
    order_id: u64,
    customer: String,
    total_cents: i64,
}

fn sample() -> Envelope<OrderPlaced> {
    let mut headers = Headers::new();
    headers
        .insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .expect("valid");
    headers.insert("tenant", "acme").expect("valid");
    Envelope {
        metadata: Metadata {
            message_id: Uuid::parse_str("01937a5e-7c00-7000-8000-000000000001").expect("uuid"),
            correlation_id: Uuid::parse_str("01937a5e-7c00-7000-8000-0000000000c0").expect("uuid"),
            causation_id: Some(
                Uuid::parse_str("01937a5e-7c00-7000-8000-0000000000ca").expect("uuid"),
            ),
        },
        key: Some("42".into()),
        occurred_at: Utc
            .with_ymd_and_hms(2026, 11, 23, 14, 32, 5)
            .single()
            .expect("time"),
        source: Arc::from("shop"),
        headers,
        payload: OrderPlaced {
            order_id: 42,
            customer: "ada".into(),
            total_cents: 12_990,
        },
    }
}

#[test]
fn the_wire_form_is_cloudevents_json() {
    let raw = sample().to_raw().expect("encodes");
    // Pretty-printed in the order the attributes are written on the wire.
    let wire = serde_json::to_string_pretty(&raw).expect("serializes");
    insta::assert_snapshot!("order_placed_v2_wire", wire);
    assert_eq!(
        serde_json::to_vec(&raw).expect("serializes"),
        raw.to_json().expect("serializes")
    );
}

#[test]
fn the_wire_form_round_trips() {
    let envelope = sample();
    let bytes = envelope
        .to_raw()
        .expect("encodes")
        .to_json()
        .expect("serializes");
    let raw = RawEnvelope::from_json(&bytes).expect("reads");
    assert_eq!(raw.name, "orders.order_placed");
    assert_eq!(raw.version, 2);
    assert_eq!(raw.decode::<OrderPlaced>().expect("decodes"), envelope);
}

#[test]
fn the_key_comes_from_the_field_named_in_the_attribute() {
    let event = OrderPlaced {
        order_id: 7,
        customer: "grace".into(),
        total_cents: 1,
    };
    assert_eq!(event.key(), Some("7".to_owned()));
    assert_eq!(<OrderPlaced as Event>::NAME, "orders.order_placed");
    assert_eq!(<OrderPlaced as Event>::VERSION, 2);
}

fn wire_with(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> Vec<u8> {
    let bytes = sample()
        .to_raw()
        .expect("encodes")
        .to_json()
        .expect("serializes");
    let mut value: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    edit(value.as_object_mut().expect("object"));
    serde_json::to_vec(&value).expect("json")
}

#[test]
fn malformed_envelopes_are_typed_errors_naming_the_problem() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "malformed envelope: expected ident"),
        (
            wire_with(|m| {
                m.insert("specversion".into(), "0.3".into());
            }),
            "unsupported specversion `0.3`, expected `1.0`",
        ),
        (
            wire_with(|m| {
                m.remove("data");
            }),
            "envelope has neither `data` nor `data_base64`",
        ),
        (
            wire_with(|m| {
                m.remove("id");
            }),
            "missing field `id`",
        ),
        (
            wire_with(|m| {
                m.insert("id".into(), "nope".into());
            }),
            "invalid character",
        ),
        (
            wire_with(|m| {
                m.insert("Tenant-Id".into(), "x".into());
            }),
            "header name `Tenant-Id` is invalid",
        ),
        (
            wire_with(|m| {
                m.insert("tenant".into(), 5.into());
            }),
            "extension attribute `tenant` is not a string",
        ),
    ];
    for (bytes, expected) in cases {
        match RawEnvelope::from_json(&bytes) {
            Err(WireError::Malformed(error)) => {
                let text = WireError::Malformed(error).to_string();
                assert!(text.contains(expected), "expected `{expected}` in `{text}`");
            }
            other => {
                panic!("expected a malformed-envelope error containing `{expected}`, got {other:?}")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Event)]
#[event(name = "orders.order_placed", version = 3)]
struct OrderPlacedV3 {
    order_id: u64,
}

#[test]
fn decoding_checks_the_contract_and_the_payload() {
    let raw = sample().to_raw().expect("encodes");
    match raw.decode::<OrderPlacedV3>() {
        Err(error @ WireError::WrongType { .. }) => assert_eq!(
            error.to_string(),
            "envelope holds `orders.order_placed` v2, expected `orders.order_placed` v3"
        ),
        other => panic!("expected WrongType, got {other:?}"),
    }

    let mut broken = raw.clone();
    broken.payload = br#"{"order_id":"forty-two"}"#.to_vec();
    match broken.decode::<OrderPlaced>() {
        Err(error @ WireError::Payload { .. }) => {
            assert_eq!(
                error.to_string(),
                "payload of `orders.order_placed` v2 (message 01937a5e-7c00-7000-8000-000000000001) does not decode"
            );
            let cause = std::error::Error::source(&error)
                .expect("has a cause")
                .to_string();
            assert!(
                cause.starts_with("application/json codec: invalid type: string \"forty-two\""),
                "{cause}"
            );
        }
        other => panic!("expected a payload error, got {other:?}"),
    }
}

#[test]
fn header_names_are_cloudevents_attribute_names() {
    let mut headers = Headers::new();
    assert_eq!(
        headers
            .insert("Tenant", "x")
            .expect_err("upper case")
            .to_string(),
        "header name `Tenant` is invalid: use lower-case ASCII letters and digits only (CloudEvents extension attribute names)"
    );
    assert_eq!(
        headers
            .insert("type", "x")
            .expect_err("reserved")
            .to_string(),
        "header name `type` is reserved for an envelope attribute"
    );
    assert!(headers.insert("tenant", "acme").expect("valid").is_none());
    assert_eq!(headers.get("tenant"), Some("acme"));
}
