//! How messages are laid out on Kafka (decision 0021): one topic for every channel, the
//! channel and the message id in headers, the key as the record key, the partition by the
//! Java client's murmur2 hash of the key.

use rdkafka::message::{Header, Headers, OwnedHeaders};
use uuid::Uuid;

/// The header that names a record's channel.
pub(crate) const CHANNEL_HEADER: &str = "inseam-channel";
/// The header that carries a record's message id.
pub(crate) const ID_HEADER: &str = "inseam-id";

/// Kafka's murmur2 (the Java client's `Utils.murmur2`, and librdkafka's `rd_murmur2`).
pub(crate) fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    // Kafka hashes the length as a 32-bit int; longer records are refused far below that.
    let mut h: u32 = SEED ^ (data.len() as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of a record: murmur2 of its key, as the Java client's default partitioner
/// and librdkafka's `murmur2_random` compute it; a record without a key by its message id.
pub(crate) fn partition(key: Option<&str>, message_id: Uuid, partitions: u16) -> u16 {
    let hash = match key {
        Some(key) => murmur2(key.as_bytes()),
        None => murmur2(message_id.as_bytes()),
    };
    // Below `partitions`, a u16.
    ((hash & 0x7fff_ffff) % u32::from(partitions.max(1))) as u16
}

/// Why `name` is not a Kafka topic name, if it is not one.
pub(crate) fn topic_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name == "." || name == ".." {
        return Some("`.` and `..` alone are not allowed");
    }
    if name.len() > 249 {
        return Some("it is longer than 249 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Some("it may hold only ASCII letters, digits, `.`, `_` and `-`");
    }
    None
}

/// Why `channel` cannot be carried as a channel, if it cannot.
pub(crate) fn channel_problem(channel: &str) -> Option<&'static str> {
    if channel.is_empty() {
        return Some("it is empty");
    }
    if channel.chars().any(char::is_control) {
        return Some("it holds control characters");
    }
    None
}

/// The Kafka headers of a record: the application's headers in order, byte for byte, then
/// the channel and the message id. Fails when an application header uses a reserved name.
pub(crate) fn encode_headers(
    channel: &str,
    message_id: Uuid,
    headers: &[(String, String)],
) -> Result<OwnedHeaders, String> {
    let mut encoded = OwnedHeaders::new_with_capacity(headers.len() + 2);
    for (name, value) in headers {
        if name.eq_ignore_ascii_case(CHANNEL_HEADER) || name.eq_ignore_ascii_case(ID_HEADER) {
            return Err(format!(
                "header `{name}` is reserved by the transport for the record's channel and id"
            ));
        }
        encoded = encoded.insert(Header {
            key: name,
            value: Some(value.as_bytes()),
        });
    }
    let id = message_id.to_string();
    Ok(encoded
        .insert(Header {
            key: CHANNEL_HEADER,
            value: Some(channel.as_bytes()),
        })
        .insert(Header {
            key: ID_HEADER,
            value: Some(id.as_bytes()),
        }))
}

/// A received record's channel (`None` when it has none: not published by inseam) and its
/// application headers, in order.
pub(crate) fn decode_headers<H: Headers>(
    headers: Option<&H>,
) -> (Option<String>, Vec<(String, String)>) {
    let mut channel = None;
    let mut application = Vec::new();
    let Some(headers) = headers else {
        return (None, application);
    };
    for header in headers.iter() {
        let value = header
            .value
            .map(|value| String::from_utf8_lossy(value).into_owned())
            .unwrap_or_default();
        if header.key == CHANNEL_HEADER {
            channel = Some(value);
        } else if header.key != ID_HEADER {
            application.push((header.key.to_owned(), value));
        }
    }
    (channel, application)
}

/// Decodes `%XX` escapes; `None` when an escape is malformed or the result is not UTF-8.
fn try_percent_decode(value: &str) -> Option<String> {
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

/// Decodes `%XX` escapes of a URL's user or password, leaving a malformed value as it is.
pub(crate) fn percent_decode(value: &str) -> String {
    try_percent_decode(value).unwrap_or_else(|| value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // The vectors of Kafka's `UtilsTest.testMurmur2`.
        let cases: [(&str, i32); 6] = [
            ("21", -973_932_308),
            ("foobar", -790_332_482),
            ("a-little-bit-long-string", -985_981_536),
            ("a-little-bit-longer-string", -1_486_304_829),
            (
                "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
            ("abc", 479_470_107),
        ];
        for (input, expected) in cases {
            assert_eq!(
                murmur2(input.as_bytes()) as i32,
                expected,
                "murmur2({input:?})"
            );
        }
    }

    #[test]
    fn partition_is_the_positive_hash_modulo_the_count() {
        // "foobar" hashes to -790332482: positive part 1357151166, modulo 8 is 6.
        assert_eq!(partition(Some("foobar"), Uuid::nil(), 8), 6);
        assert_eq!(partition(Some("foobar"), Uuid::nil(), 1), 0);
        let id = Uuid::now_v7();
        assert_eq!(partition(None, id, 16), partition(None, id, 16));
    }

    #[test]
    fn topic_names_follow_kafka_rules() {
        assert_eq!(topic_name_problem("inseam"), None);
        assert_eq!(topic_name_problem("shop.events_v-2"), None);
        assert!(topic_name_problem("").is_some());
        assert!(topic_name_problem("..").is_some());
        assert!(topic_name_problem("a b").is_some());
        assert!(topic_name_problem("é").is_some());
        assert!(topic_name_problem(&"a".repeat(250)).is_some());
    }

    #[test]
    fn headers_round_trip_and_reserved_names_are_refused() {
        let headers = vec![
            ("traceparent".to_owned(), "00-abc-01".to_owned()),
            ("ce-type".to_owned(), "Zoë — 東京 🦀".to_owned()),
            ("ce-type".to_owned(), String::new()),
        ];
        let encoded = encode_headers("orders.placed", Uuid::nil(), &headers)
            .unwrap_or_else(|problem| panic!("{problem}"));
        let (channel, decoded) = decode_headers(Some(&encoded));
        assert_eq!(channel.as_deref(), Some("orders.placed"));
        assert_eq!(decoded, headers);

        let reserved = vec![("Inseam-Channel".to_owned(), "x".to_owned())];
        assert!(encode_headers("c", Uuid::nil(), &reserved).is_err());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("p%40ss%3Aword"), "p@ss:word");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
