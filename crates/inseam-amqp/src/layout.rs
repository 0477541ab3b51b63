//! How inseam's channels, keys, groups and headers map onto RabbitMQ names (decision 0020).
//!
//! Everything here is a pure function of its inputs and stays stable across versions: a
//! publisher and a consumer built from different versions of this crate must agree on where a
//! key goes and what a group's queues are called.

use std::fmt::Write as _;

use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use uuid::Uuid;

/// The header carrying an [`Outgoing`](inseam_core::transport::Outgoing)'s key, as bytes.
pub(crate) const KEY_HEADER: &str = "inseam-key";
/// The header carrying the application's headers, in order, as an array of name, value, name,
/// value... (an AMQP header table is a map, which loses order and repeated names).
pub(crate) const HEADERS_HEADER: &str = "inseam-headers";
/// The header quorum queues set on a redelivered message: how many times it was returned.
pub(crate) const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";
/// The longest AMQP short string (routing keys, queue names, message ids, header names).
pub(crate) const MAX_SHORT: usize = 255;

/// FNV-1a, 64 bits: a stable hash that every process computes alike (std's hasher is seeded
/// per process). The same function as inseam-nats's, written out here.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// The partition of a message: its key's hash, or its id's for a keyless message, modulo the
/// partition count.
pub(crate) fn partition(key: Option<&str>, message_id: Uuid, partitions: u16) -> u16 {
    let hash = match key {
        Some(key) => fnv1a(key.as_bytes()),
        None => fnv1a(message_id.as_bytes()),
    };
    // The remainder is below `partitions`, itself a u16.
    (hash % u64::from(partitions.max(1))) as u16
}

/// Why a channel name cannot be carried in a routing key `<partition>.<channel>` of a topic
/// exchange.
pub(crate) fn channel_problem(channel: &str) -> Option<&'static str> {
    if channel.is_empty() {
        return Some("it is empty");
    }
    // `<partition>.` is at most 5 digits and a dot.
    if channel.len() + 6 > MAX_SHORT {
        return Some("it is longer than 249 bytes (routing keys have at most 255)");
    }
    for word in channel.split('.') {
        if word.is_empty() {
            return Some("it has an empty word (a leading, trailing or doubled `.`)");
        }
        if word.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Some("it has white space or a control character");
        }
        if word.contains(['*', '#']) {
            return Some("it has a topic wildcard (`*` or `#`)");
        }
    }
    None
}

/// Why a name cannot be an exchange name or a queue name prefix.
pub(crate) fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name.len() > 120 {
        return Some("it is longer than 120 bytes");
    }
    if name.starts_with("amq.") {
        return Some("`amq.` names are reserved by the server");
    }
    if name
        .chars()
        .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':')))
    {
        return Some("only ASCII letters, digits, `.`, `_`, `-` and `:` are allowed");
    }
    None
}

/// The routing key of a message: `<partition>.<channel>`.
pub(crate) fn routing_key(partition: u16, channel: &str) -> String {
    format!("{partition}.{channel}")
}

/// The channel of a routing key, or `None` when it is not one of ours.
pub(crate) fn channel_of(routing_key: &str) -> Option<&str> {
    let (partition, channel) = routing_key.split_once('.')?;
    (!partition.is_empty() && partition.bytes().all(|b| b.is_ascii_digit()) && !channel.is_empty())
        .then_some(channel)
}

/// The queue of `group` on `partition`: `<prefix>.<group>.<partition>`, where the group keeps
/// ASCII letters, digits, `_` and `-`, every other character becomes `_`, and a name that was
/// changed or shortened gets a hash of the group's full name so that two groups never share a
/// queue.
pub(crate) fn queue_name(prefix: &str, group: &str, partition: u16) -> String {
    const MAX: usize = 96;
    let mut name: String = group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name != group || name.len() > MAX || name.is_empty() {
        name.truncate(MAX);
        let _ = write!(name, "_{:08x}", fnv1a(group.as_bytes()) as u32);
    }
    format!("{prefix}.{name}.{partition}")
}

/// Whether a header name is the transport's or the server's: such names are carried only in
/// the ordered list, never mirrored into the header table.
fn reserved_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("x-") || lower.starts_with("inseam-")
}

/// The AMQP header table of a message: the key, the application's headers in order (as an
/// array), and each application header whose name allows it mirrored as a table entry so that
/// other AMQP tools see it (the first value of a repeated name).
pub(crate) fn encode_headers(key: Option<&str>, headers: &[(String, String)]) -> FieldTable {
    let mut table = FieldTable::default();
    let mut ordered = FieldArray::default();
    for (name, value) in headers {
        ordered.push(AMQPValue::LongString(LongString::from(name.as_bytes())));
        ordered.push(AMQPValue::LongString(LongString::from(value.as_bytes())));
        if !reserved_header(name)
            && let Ok(short) = ShortString::try_new(name.as_str())
            && !table.contains_key(name)
        {
            table.insert(
                short,
                AMQPValue::LongString(LongString::from(value.as_bytes())),
            );
        }
    }
    if !headers.is_empty() {
        table.insert(HEADERS_HEADER.into(), AMQPValue::FieldArray(ordered));
    }
    if let Some(key) = key {
        table.insert(
            KEY_HEADER.into(),
            AMQPValue::LongString(LongString::from(key.as_bytes())),
        );
    }
    table
}

/// A header value as text: strings as they are (bytes as UTF-8, lossily), numbers written out.
fn text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        _ => return None,
    })
}

/// A header value as a count, when it is an integer.
fn count(value: &AMQPValue) -> Option<u64> {
    match value {
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::Timestamp(n) => Some(*n),
        _ => None,
    }
}

/// The key and application headers of a received message, in their published order. A
/// message from a publisher other than inseam (no ordered list) gets its table's entries by
/// name, without the server's and the transport's.
pub(crate) fn decode_headers(
    table: Option<&FieldTable>,
) -> (Option<String>, Vec<(String, String)>) {
    let Some(table) = table else {
        return (None, Vec::new());
    };
    let map = table.inner();
    let key = map.get(KEY_HEADER).and_then(text);
    let headers = match map.get(HEADERS_HEADER) {
        Some(AMQPValue::FieldArray(array)) => array
            .as_slice()
            .chunks_exact(2)
            .filter_map(|pair| Some((text(&pair[0])?, text(&pair[1])?)))
            .collect(),
        _ => map
            .iter()
            .filter(|(name, _)| !reserved_header(name.as_str()))
            .filter_map(|(name, value)| Some((name.as_str().to_owned(), text(value)?)))
            .collect(),
    };
    (key, headers)
}

/// The attempt of a delivery, from 1: one more than the times the quorum queue had it
/// returned (`x-delivery-count`); a message the server marks as redelivered without the count
/// (a classic queue) counts as a second attempt.
pub(crate) fn attempt(table: Option<&FieldTable>, redelivered: bool) -> u32 {
    let returned = table
        .and_then(|table| table.inner().get(DELIVERY_COUNT_HEADER))
        .and_then(count);
    match returned {
        Some(returned) => u32::try_from(returned.saturating_add(1)).unwrap_or(u32::MAX),
        None if redelivered => 2,
        None => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_is_the_published_function() {
        // Reference values of 64-bit FNV-1a: a change here moves keys between partitions.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        let id = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
        assert_eq!(
            partition(Some("order-1"), id, 8),
            partition(Some("order-1"), Uuid::nil(), 8)
        );
        assert_eq!(
            partition(Some("foobar"), id, 8),
            (0x8594_4171_f739_67e8_u64 % 8) as u16
        );
        for n in 0..1000 {
            assert!(partition(Some(&format!("k{n}")), id, 8) < 8);
        }
        assert_eq!(partition(Some("x"), id, 1), 0);
    }

    #[test]
    fn channels_are_checked_word_by_word() {
        assert_eq!(channel_problem("orders.order_placed"), None);
        assert_eq!(channel_problem("orders-v2.$x"), None);
        for bad in [
            "",
            "orders.#",
            "orders.*.x",
            "orders..x",
            ".orders",
            "orders.",
            "order placed",
            "order\tplaced",
        ] {
            assert!(channel_problem(bad).is_some(), "{bad:?}");
        }
        assert!(channel_problem(&"a".repeat(249)).is_none());
        assert!(channel_problem(&"a".repeat(250)).is_some());
    }

    #[test]
    fn channels_come_back_from_routing_keys() {
        let key = routing_key(3, "orders.order_placed");
        assert_eq!(key, "3.orders.order_placed");
        assert_eq!(channel_of(&key), Some("orders.order_placed"));
        assert_eq!(channel_of("x.a"), None);
        assert_eq!(channel_of("3"), None);
        assert_eq!(channel_of(".a"), None);
    }

    #[test]
    fn queue_names_are_deterministic_and_distinct() {
        assert_eq!(queue_name("inseam", "inventory", 0), "inseam.inventory.0");
        let dotted = queue_name("inseam", "billing.eu", 1);
        let underscored = queue_name("inseam", "billing_eu", 1);
        assert_ne!(dotted, underscored);
        assert!(dotted.starts_with("inseam.billing_eu_"), "{dotted}");
        let long = "g".repeat(300);
        let name = queue_name("inseam", &long, 3);
        assert!(name.len() < MAX_SHORT, "{name}");
        assert_ne!(name, queue_name("inseam", &"g".repeat(301), 3));
    }

    #[test]
    fn headers_and_key_round_trip_in_order() {
        let headers: Vec<(String, String)> = [
            ("traceparent", "00-abc-01"),
            ("x-request-id", "r1"),
            ("dup", "1"),
            ("dup", "2"),
            ("Inseam-Own", "é 東京 "),
            ("", "empty name"),
        ]
        .iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect();
        let table = encode_headers(Some("clé\n 🦀 "), &headers);
        // Mirrored for other tools, except reserved names and the second `dup`.
        assert!(table.contains_key("traceparent"));
        assert!(!table.contains_key("x-request-id"));
        assert!(!table.contains_key("Inseam-Own"));
        let (key, decoded) = decode_headers(Some(&table));
        assert_eq!(key.as_deref(), Some("clé\n 🦀 "));
        assert_eq!(decoded, headers);
        assert_eq!(
            decode_headers(Some(&encode_headers(None, &[]))),
            (None, vec![])
        );
        assert_eq!(decode_headers(None), (None, vec![]));
    }

    #[test]
    fn foreign_headers_come_by_name() {
        let mut table = FieldTable::default();
        table.insert("zeta".into(), AMQPValue::LongString("1".into()));
        table.insert("alpha".into(), AMQPValue::LongInt(2));
        table.insert("x-delivery-count".into(), AMQPValue::LongInt(2));
        let (key, headers) = decode_headers(Some(&table));
        assert_eq!(key, None);
        assert_eq!(
            headers,
            vec![("alpha".into(), "2".into()), ("zeta".into(), "1".into())]
        );
    }

    #[test]
    fn attempts_count_returns() {
        assert_eq!(attempt(None, false), 1);
        assert_eq!(attempt(None, true), 2);
        let mut table = FieldTable::default();
        table.insert(DELIVERY_COUNT_HEADER.into(), AMQPValue::LongLongInt(3));
        assert_eq!(attempt(Some(&table), true), 4);
        assert_eq!(attempt(Some(&FieldTable::default()), false), 1);
    }
}
