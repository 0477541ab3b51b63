//! How inseam's channels, keys, groups and headers map onto JetStream names (decision 0016).
//!
//! Everything here is a pure function of its inputs and stays stable across versions: a
//! publisher and a consumer built from different versions of this crate must agree on where a
//! key goes and what a consumer is called.

use std::fmt::Write as _;

use async_nats::HeaderMap;
use uuid::Uuid;

/// The header carrying an [`Outgoing`](inseam_core::transport::Outgoing)'s key when NATS can
/// carry it as it is.
pub(crate) const KEY_HEADER: &str = "Inseam-Key";
/// The header carrying the key percent-encoded, when it has a line break or leading or
/// trailing white space (which NATS headers cannot carry).
pub(crate) const KEY_ENCODED_HEADER: &str = "Inseam-Key-Encoded";
/// The header recording the order of the application's headers (NATS headers arrive as a map).
pub(crate) const ORDER_HEADER: &str = "Inseam-Headers";
/// The JetStream deduplication header.
pub(crate) const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// FNV-1a, 64 bits: a stable hash that every process computes alike (std's hasher is seeded
/// per process).
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

/// Why a name cannot be used as (part of) a NATS subject.
pub(crate) fn subject_problem(subject: &str) -> Option<&'static str> {
    if subject.is_empty() {
        return Some("it is empty");
    }
    for token in subject.split('.') {
        if token.is_empty() {
            return Some("it has an empty token (a leading, trailing or doubled `.`)");
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Some("it has white space or a control character");
        }
        if token.contains(['*', '>']) {
            return Some("it has a wildcard (`*` or `>`)");
        }
    }
    None
}

/// Why a name cannot be a JetStream stream name.
pub(crate) fn stream_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Some("it has white space, a control character, `.`, `*`, `>`, `/` or `\\`");
    }
    None
}

/// The subject a message goes to: `<prefix>.<partition>.<channel>`.
pub(crate) fn subject(prefix: &str, partition: u16, channel: &str) -> String {
    format!("{prefix}.{partition}.{channel}")
}

/// The channel of a subject under `prefix`, or `None` when the subject is not one of ours.
pub(crate) fn channel_of<'a>(prefix: &str, subject: &'a str) -> Option<&'a str> {
    let rest = subject.strip_prefix(prefix)?.strip_prefix('.')?;
    let (partition, channel) = rest.split_once('.')?;
    (partition.bytes().all(|b| b.is_ascii_digit()) && !channel.is_empty()).then_some(channel)
}

/// The durable consumer of `group` on `partition`: `<group>-<partition>`, where the group keeps
/// ASCII letters, digits, `_` and `-`, every other character becomes `_`, and a name that was
/// changed or shortened gets a hash of the group's full name so that two groups never share a
/// consumer.
pub(crate) fn consumer_name(group: &str, partition: u16) -> String {
    const MAX: usize = 64;
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
    let _ = write!(name, "-{partition}");
    name
}

/// A NATS server version, `major.minor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ServerVersion {
    pub(crate) major: u32,
    pub(crate) minor: u32,
}

impl ServerVersion {
    /// Parses `2.9.10`, `2.10.0-beta.1`, `v2.11.3`; `None` for anything else (an empty version
    /// before the first connection).
    pub(crate) fn parse(version: &str) -> Option<Self> {
        let mut parts = version.trim().trim_start_matches('v').split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts
            .next()?
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()?;
        Some(ServerVersion { major, minor })
    }

    /// Whether a consumer may filter on several subjects (`filter_subjects`, NATS 2.10).
    pub(crate) fn has_filter_subjects(self) -> bool {
        (self.major, self.minor) >= (2, 10)
    }
}

/// Whether NATS carries a header value as it is: it trims white space around a value and
/// cannot carry a line break.
fn representable(value: &str) -> bool {
    !value.contains(['\r', '\n']) && value.trim() == value
}

/// Percent-encodes every byte that is not printable ASCII, and `%` itself.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_graphic() && byte != b'%' {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

pub(crate) fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Whether an application header name is the transport's own or the server's.
pub(crate) fn reserved_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.starts_with("nats-") || lower.starts_with("inseam-")
}

/// Why an application header name cannot travel as a NATS header.
pub(crate) fn header_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name.chars().any(|c| !c.is_ascii_graphic() || c == ':') {
        return Some("NATS header names are printable ASCII without `:`");
    }
    if reserved_header(name) {
        return Some(
            "`Nats-*` and `Inseam-*` headers are reserved for the server and the transport",
        );
    }
    None
}

/// A header name NATS takes as it is: the names inseam sends on every message need no parsing
/// nor allocation.
fn header_name(name: &str) -> Option<async_nats::HeaderName> {
    Some(match name {
        "ce-id" => async_nats::HeaderName::from_static("ce-id"),
        "ce-type" => async_nats::HeaderName::from_static("ce-type"),
        "traceparent" => async_nats::HeaderName::from_static("traceparent"),
        "tracestate" => async_nats::HeaderName::from_static("tracestate"),
        _ => name.parse().ok()?,
    })
}

/// The NATS headers of a message: the id, the key and the application's headers with their
/// order. Fails with the problem and the header's name.
pub(crate) fn encode_headers(
    message_id: Uuid,
    key: Option<&str>,
    headers: &[(String, String)],
) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::new();
    let mut order = String::new();
    for (name, value) in headers {
        if let Some(problem) = header_name_problem(name) {
            return Err(format!("header `{name}` cannot be carried: {problem}"));
        }
        let header = header_name(name)
            .ok_or_else(|| format!("header `{name}` is not a valid NATS header name"))?;
        if !order.is_empty() {
            order.push(' ');
        }
        // A `:` (which no header name has) marks a value that had to be percent-encoded.
        let value = if representable(value) {
            order.push_str(name);
            value.parse()
        } else {
            order.push(':');
            order.push_str(name);
            percent_encode(value).parse()
        };
        let value: async_nats::HeaderValue =
            value.map_err(|_| format!("header `{name}` has a value NATS cannot carry"))?;
        map.append(header, value);
    }
    let mut id = Uuid::encode_buffer();
    let id: &str = message_id.hyphenated().encode_lower(&mut id);
    map.insert(async_nats::HeaderName::from_static(MSG_ID_HEADER), id);
    if let Some(key) = key {
        if representable(key) {
            map.insert(async_nats::HeaderName::from_static(KEY_HEADER), key);
        } else {
            map.insert(
                async_nats::HeaderName::from_static(KEY_ENCODED_HEADER),
                percent_encode(key).as_str(),
            );
        }
    }
    if !order.is_empty() {
        // Header names (printable ASCII, checked above), spaces and `:`: a valid value.
        if let Ok(order) = order.parse::<async_nats::HeaderValue>() {
            map.insert(async_nats::HeaderName::from_static(ORDER_HEADER), order);
        }
    }
    Ok(map)
}

/// The key and application headers of a received message, in their published order. Headers
/// that a publisher other than inseam set come after, by name.
pub(crate) fn decode_headers(map: Option<&HeaderMap>) -> (Option<String>, Vec<(String, String)>) {
    let Some(map) = map else {
        return (None, Vec::new());
    };
    let key = match map.get(KEY_ENCODED_HEADER) {
        Some(encoded) => {
            percent_decode(encoded.as_str()).or_else(|| Some(encoded.as_str().to_owned()))
        }
        None => map.get(KEY_HEADER).map(|value| value.as_str().to_owned()),
    };

    // Values of one name stay in their order; `taken` counts those already placed.
    let mut taken: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut headers = Vec::new();
    if let Some(order) = map.get(ORDER_HEADER) {
        for entry in order.as_str().split(' ').filter(|e| !e.is_empty()) {
            let (name, encoded) = match entry.strip_prefix(':') {
                Some(name) => (name, true),
                None => (entry, false),
            };
            // Parsed first: `get_all` panics on a name that is not a valid header name, and
            // this list comes from the wire.
            let Ok(header) = name.parse::<async_nats::HeaderName>() else {
                continue;
            };
            let index = taken.entry(name).or_insert(0);
            let Some(value) = map.get_all(header).nth(*index) else {
                continue;
            };
            *index += 1;
            let value = if encoded {
                percent_decode(value.as_str()).unwrap_or_else(|| value.as_str().to_owned())
            } else {
                value.as_str().to_owned()
            };
            headers.push((name.to_owned(), value));
        }
    }
    let mut rest: Vec<(String, String)> = Vec::new();
    for (name, values) in map.iter() {
        let name: &str = name.as_ref();
        if reserved_header(name) {
            continue;
        }
        let skip = taken.get(name).copied().unwrap_or(0);
        rest.extend(
            values
                .iter()
                .skip(skip)
                .map(|value| (name.to_owned(), value.as_str().to_owned())),
        );
    }
    rest.sort_by(|a, b| a.0.cmp(&b.0));
    headers.extend(rest);
    (key, headers)
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
        assert_eq!(partition(None, id, 8), partition(None, id, 8));
        assert_eq!(partition(Some("x"), id, 1), 0);
    }

    #[test]
    fn subjects_are_checked_token_by_token() {
        assert_eq!(subject_problem("orders.order_placed"), None);
        assert_eq!(subject_problem("orders-v2.$x"), None);
        assert!(subject_problem("").is_some());
        assert!(subject_problem("orders.>").is_some());
        assert!(subject_problem("orders.*.x").is_some());
        assert!(subject_problem("orders..x").is_some());
        assert!(subject_problem(".orders").is_some());
        assert!(subject_problem("orders.").is_some());
        assert!(subject_problem("order placed").is_some());
        assert!(subject_problem("order\tplaced").is_some());
    }

    #[test]
    fn channels_come_back_from_subjects() {
        let s = subject("inseam", 3, "orders.order_placed");
        assert_eq!(s, "inseam.3.orders.order_placed");
        assert_eq!(channel_of("inseam", &s), Some("orders.order_placed"));
        assert_eq!(channel_of("acme.inseam", "acme.inseam.0.a.b"), Some("a.b"));
        assert_eq!(channel_of("inseam", "inseamx.3.a"), None);
        assert_eq!(channel_of("inseam", "inseam.x.a"), None);
        assert_eq!(channel_of("inseam", "inseam.3"), None);
    }

    #[test]
    fn consumer_names_are_deterministic_and_distinct() {
        assert_eq!(consumer_name("inventory", 0), "inventory-0");
        assert_eq!(consumer_name("ship_ping-2", 7), "ship_ping-2-7");
        let dotted = consumer_name("billing.eu", 1);
        let underscored = consumer_name("billing_eu", 1);
        assert_ne!(dotted, underscored);
        assert!(dotted.starts_with("billing_eu_"));
        assert_eq!(dotted, consumer_name("billing.eu", 1));
        let long = "g".repeat(300);
        let name = consumer_name(&long, 3);
        assert!(name.len() < 80, "{name}");
        assert_ne!(name, consumer_name(&"g".repeat(301), 3));
        for name in [
            consumer_name("a b/c\\d*e>f", 2),
            consumer_name("", 0),
            consumer_name("é", 0),
        ] {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "{name}"
            );
        }
    }

    #[test]
    fn server_versions_parse() {
        let v = |s| ServerVersion::parse(s);
        assert_eq!(v("2.9.10"), Some(ServerVersion { major: 2, minor: 9 }));
        assert_eq!(
            v("v2.10.0-beta.1"),
            Some(ServerVersion {
                major: 2,
                minor: 10
            })
        );
        assert_eq!(
            v("2.11"),
            Some(ServerVersion {
                major: 2,
                minor: 11
            })
        );
        assert_eq!(v(""), None);
        assert_eq!(v("dev"), None);
        assert!(!v("2.9.10").is_some_and(ServerVersion::has_filter_subjects));
        assert!(v("2.10.3").is_some_and(ServerVersion::has_filter_subjects));
        assert!(v("3.0.0").is_some_and(ServerVersion::has_filter_subjects));
    }

    #[test]
    fn headers_round_trip_in_order_with_awkward_values() {
        let headers: Vec<(String, String)> = [
            ("traceparent", "00-abc-def-01"),
            ("ce-type", "orders.order_placed"),
            ("multi", "first"),
            ("odd", " padded "),
            ("multi", "second"),
            ("lines", "a\r\nb"),
            ("pct", "100%"),
            ("empty", ""),
            ("unicode", "héllo wörld"),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
        let id = Uuid::from_u128(7);
        let map = encode_headers(id, Some(" key\nwith break "), &headers).unwrap();
        assert_eq!(
            map.get(MSG_ID_HEADER).map(|v| v.as_str()),
            Some(id.to_string().as_str())
        );
        let (key, back) = decode_headers(Some(&map));
        assert_eq!(key.as_deref(), Some(" key\nwith break "));
        assert_eq!(back, headers);

        let map = encode_headers(id, Some("order-1"), &[]).unwrap();
        assert_eq!(map.get(KEY_HEADER).map(|v| v.as_str()), Some("order-1"));
        assert_eq!(decode_headers(Some(&map)), (Some("order-1".into()), vec![]));
        assert_eq!(
            decode_headers(Some(&encode_headers(id, None, &[]).unwrap())),
            (None, vec![])
        );
    }

    #[test]
    fn reserved_and_invalid_header_names_are_refused() {
        for name in [
            "Nats-Msg-Id",
            "nats-expected-stream",
            "Inseam-Key",
            "",
            "a:b",
            "a b",
        ] {
            let err = encode_headers(Uuid::nil(), None, &[(name.to_owned(), "v".to_owned())])
                .unwrap_err();
            assert!(err.contains(&format!("`{name}`")), "{err}");
        }
    }

    #[test]
    fn foreign_headers_follow_by_name() {
        let mut map = HeaderMap::new();
        map.insert("zeta", "1");
        map.insert("alpha", "2");
        map.insert("Nats-Stream", "S");
        let (key, headers) = decode_headers(Some(&map));
        assert_eq!(key, None);
        assert_eq!(
            headers,
            vec![("alpha".into(), "2".into()), ("zeta".into(), "1".into())]
        );
    }
}
