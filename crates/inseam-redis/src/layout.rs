//! How inseam's channels, keys, groups and headers map onto Redis keys and stream entries
//! (decision 0019).
//!
//! Everything here is a pure function of its inputs and stays stable across versions: a
//! publisher and a consumer built from different versions of this crate must agree on where a
//! key goes and how an entry is laid out.

use redis::Value;
use uuid::Uuid;

/// The entry field holding the channel.
pub(crate) const FIELD_CHANNEL: &str = "c";
/// The entry field holding the message id (its text form).
pub(crate) const FIELD_ID: &str = "i";
/// The entry field holding the key; absent for a message without one.
pub(crate) const FIELD_KEY: &str = "k";
/// The entry field holding the headers (see [`encode_headers`]); absent when there are none.
pub(crate) const FIELD_HEADERS: &str = "h";
/// The entry field holding the payload.
pub(crate) const FIELD_PAYLOAD: &str = "p";

/// The longest channel accepted, in bytes.
pub(crate) const MAX_CHANNEL: usize = 1024;

/// FNV-1a, 64 bits: a stable hash that every process computes alike (std's hasher is seeded
/// per process).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
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

/// Why a name cannot be a channel: empty, too long, or with white space or a control
/// character (which no contract's stable name has, and which logs would garble).
pub(crate) fn channel_problem(channel: &str) -> Option<&'static str> {
    if channel.is_empty() {
        return Some("it is empty");
    }
    if channel.len() > MAX_CHANNEL {
        return Some("it is longer than 1024 bytes");
    }
    if channel.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("it has white space or a control character");
    }
    None
}

/// Why a name cannot be the key prefix.
pub(crate) fn prefix_problem(prefix: &str) -> Option<&'static str> {
    if prefix.is_empty() {
        return Some("it is empty");
    }
    if prefix
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '{' | '}'))
    {
        return Some("it has white space, a control character, `{` or `}`");
    }
    None
}

/// The stream of a partition: `<prefix>:stream:<partition>`.
pub(crate) fn stream_key(prefix: &str, partition: u16) -> String {
    format!("{prefix}:stream:{partition}")
}

/// The key that remembers a published message id for the deduplication window.
pub(crate) fn id_key(prefix: &str, message_id: Uuid) -> String {
    format!("{prefix}:id:{message_id}")
}

/// The key recording the partition count every process of this prefix must use.
pub(crate) fn layout_key(prefix: &str) -> String {
    format!("{prefix}:layout")
}

/// The lease of one group's partition: who reads it now. The partition comes last, so the key
/// is unambiguous whatever the group's name holds.
pub(crate) fn lease_key(prefix: &str, group: &str, partition: u16) -> String {
    format!("{prefix}:lease:{group}:{partition}")
}

/// The sorted set of a group's live consumers (score: when each one's membership ends).
pub(crate) fn members_key(prefix: &str, group: &str) -> String {
    format!("{prefix}:members:{group}")
}

/// The list of `channel`'s requests, which its servers pop.
pub(crate) fn requests_key(prefix: &str, channel: &str) -> String {
    format!("{prefix}:rpc:{channel}")
}

/// The sorted set of `channel`'s live request servers (score: when each one's membership
/// ends).
pub(crate) fn servers_key(prefix: &str, channel: &str) -> String {
    format!("{prefix}:rpc-servers:{channel}")
}

/// The list of answers to one connection's requests.
pub(crate) fn replies_key(prefix: &str, connection: Uuid) -> String {
    format!("{prefix}:replies:{connection}")
}

/// The consumer that should read `partition`, among `members` sorted by name: partitions are
/// dealt round-robin. `None` when there is no member.
pub(crate) fn preferred_member(members: &[String], partition: u16) -> Option<&str> {
    if members.is_empty() {
        return None;
    }
    members
        .get(usize::from(partition) % members.len())
        .map(String::as_str)
}

/// The headers as one field: for each, its name's length (4 bytes, big-endian), its name, its
/// value's length and its value. Byte for byte, in order, whatever they hold.
pub(crate) fn encode_headers(headers: &[(String, String)]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    for (name, value) in headers {
        for part in [name, value] {
            let len = u32::try_from(part.len())
                .map_err(|_| format!("header `{name}` is larger than 4 GiB"))?;
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(part.as_bytes());
        }
    }
    Ok(out)
}

/// The headers of [`encode_headers`]'s form; `None` when the bytes are not of that form.
pub(crate) fn decode_headers(mut bytes: &[u8]) -> Option<Vec<(String, String)>> {
    let mut headers = Vec::new();
    let take = |bytes: &mut &[u8]| -> Option<String> {
        let (len, rest) = bytes.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
        if rest.len() < len {
            return None;
        }
        let (text, rest) = rest.split_at(len);
        *bytes = rest;
        String::from_utf8(text.to_vec()).ok()
    };
    while !bytes.is_empty() {
        let name = take(&mut bytes)?;
        let value = take(&mut bytes)?;
        headers.push((name, value));
    }
    Some(headers)
}

/// A stream entry as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The entry's id in the stream.
    pub(crate) id: String,
    pub(crate) channel: String,
    pub(crate) key: Option<String>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) payload: Vec<u8>,
}

/// Text of a bulk or simple string.
pub(crate) fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        Value::Okay => Some("OK".to_owned()),
        _ => None,
    }
}

/// An integer, also sent as text.
pub(crate) fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

/// The items of an array reply.
pub(crate) fn items(value: &Value) -> Option<&[Value]> {
    match value {
        Value::Array(items) | Value::Set(items) => Some(items),
        _ => None,
    }
}

/// What a stream entry (`[id, [field, value, ...]]`) holds. `Ok(None)` for an entry whose
/// fields are gone (deleted while pending); `Err` with the entry's id when it is not one of
/// ours (no channel, no payload, unreadable headers).
pub(crate) fn parse_entry(value: &Value) -> Result<Option<Entry>, String> {
    let parts = items(value).ok_or("a stream entry is not an array")?;
    let id = parts
        .first()
        .and_then(text)
        .ok_or("a stream entry has no id")?;
    let fields = match parts.get(1) {
        None | Some(Value::Nil) => return Ok(None),
        Some(fields) => items(fields).ok_or_else(|| format!("entry {id}: fields not an array"))?,
    };
    let (mut channel, mut key, mut headers, mut payload) = (None, None, Vec::new(), None);
    for pair in fields.chunks(2) {
        let [name, value] = pair else { break };
        let Value::BulkString(bytes) = value else {
            continue;
        };
        match text(name).as_deref() {
            Some(FIELD_CHANNEL) => channel = String::from_utf8(bytes.clone()).ok(),
            Some(FIELD_KEY) => key = String::from_utf8(bytes.clone()).ok(),
            Some(FIELD_HEADERS) => {
                headers = decode_headers(bytes)
                    .ok_or_else(|| format!("entry {id}: its headers cannot be read"))?;
            }
            Some(FIELD_PAYLOAD) => payload = Some(bytes.clone()),
            _ => {}
        }
    }
    match (channel, payload) {
        (Some(channel), Some(payload)) => Ok(Some(Entry {
            id,
            channel,
            key,
            headers,
            payload,
        })),
        _ => Err(format!("entry {id} has no channel or no payload")),
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
    fn channels_are_checked() {
        assert_eq!(channel_problem("orders.order_placed"), None);
        assert_eq!(channel_problem("orders:v2/é"), None);
        assert_eq!(channel_problem(""), Some("it is empty"));
        assert!(channel_problem("order placed").is_some());
        assert!(channel_problem("order\nplaced").is_some());
        assert!(channel_problem(&"x".repeat(1025)).is_some());
        assert!(prefix_problem("inseam").is_none());
        assert!(prefix_problem("a{b}").is_some());
        assert!(prefix_problem("").is_some());
    }

    #[test]
    fn keys_are_laid_out_as_documented() {
        assert_eq!(stream_key("inseam", 3), "inseam:stream:3");
        assert_eq!(
            lease_key("inseam", "billing:eu", 7),
            "inseam:lease:billing:eu:7"
        );
        assert_eq!(members_key("acme", "g"), "acme:members:g");
        assert_eq!(layout_key("acme"), "acme:layout");
        assert_eq!(
            id_key("inseam", Uuid::nil()),
            "inseam:id:00000000-0000-0000-0000-000000000000"
        );
    }

    #[test]
    fn partitions_are_dealt_round_robin() {
        let members: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
        let owners: Vec<_> = (0..6).map(|p| preferred_member(&members, p)).collect();
        assert_eq!(
            owners,
            [
                Some("a"),
                Some("b"),
                Some("c"),
                Some("a"),
                Some("b"),
                Some("c")
            ]
        );
        assert_eq!(preferred_member(&[], 0), None);
    }

    #[test]
    fn headers_round_trip_byte_for_byte() {
        let headers: Vec<(String, String)> = [
            ("traceparent", "00-abc-def-01"),
            ("multi", "first"),
            ("odd", " padded "),
            ("multi", "second"),
            ("lines", "a\r\nb"),
            ("", ""),
            ("unicode ключ", "héllo 🦀"),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
        let bytes = encode_headers(&headers).unwrap();
        assert_eq!(decode_headers(&bytes), Some(headers));
        assert_eq!(decode_headers(&[]), Some(vec![]));
        assert_eq!(decode_headers(&[0, 0, 0, 5, b'a']), None);
        assert_eq!(decode_headers(&[0, 0]), None);
    }

    #[test]
    fn entries_parse_and_foreign_ones_are_refused() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let headers = encode_headers(&[("a".into(), "b".into())]).unwrap();
        let entry = Value::Array(vec![
            bulk("1-2"),
            Value::Array(vec![
                bulk("c"),
                bulk("orders.placed"),
                bulk("i"),
                bulk("id"),
                bulk("k"),
                bulk("clé"),
                bulk("h"),
                Value::BulkString(headers),
                bulk("p"),
                bulk("{}"),
            ]),
        ]);
        assert_eq!(
            parse_entry(&entry),
            Ok(Some(Entry {
                id: "1-2".into(),
                channel: "orders.placed".into(),
                key: Some("clé".into()),
                headers: vec![("a".into(), "b".into())],
                payload: b"{}".to_vec(),
            }))
        );
        let gone = Value::Array(vec![bulk("1-3"), Value::Nil]);
        assert_eq!(parse_entry(&gone), Ok(None));
        let foreign = Value::Array(vec![bulk("1-4"), Value::Array(vec![bulk("x"), bulk("y")])]);
        assert!(parse_entry(&foreign).unwrap_err().contains("1-4"));
    }
}
