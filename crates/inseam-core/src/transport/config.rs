//! What every transport's options read the same way: durations in environment variables and
//! credentials in server URLs.

use std::time::Duration;

/// A duration as the transports' `INSEAM_*` variables write it: `500ms`, `5s`, `2m`, or a
/// bare number of seconds. `None` for anything else.
pub fn parse_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(digits_end);
    let number: u64 = number.parse().ok()?;
    match unit.trim() {
        "ms" => Some(Duration::from_millis(number)),
        "" | "s" => Some(Duration::from_secs(number)),
        "m" => Some(Duration::from_secs(number.checked_mul(60)?)),
        _ => None,
    }
}

/// Takes the credentials (`user:password@`, or a token) out of a server URL: returns the URL
/// without them, with `default_scheme` where it had none, and the credentials as written
/// (still percent-encoded).
pub fn split_credentials<'a>(url: &'a str, default_scheme: &str) -> (String, Option<&'a str>) {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (scheme, rest),
        None => (default_scheme, url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((auth, host)) => (format!("{scheme}://{host}{path}"), Some(auth)),
        None => (format!("{scheme}://{authority}{path}"), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 5s "), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("2h"), None);
        assert_eq!(parse_duration("ms"), None);
        assert_eq!(parse_duration(&format!("{}m", u64::MAX)), None);
    }

    #[test]
    fn credentials_leave_the_url() {
        assert_eq!(
            split_credentials("amqp://bob:s3cret@h1:5672/%2f", "amqp"),
            ("amqp://h1:5672/%2f".to_owned(), Some("bob:s3cret"))
        );
        assert_eq!(
            split_credentials("h2:4222", "nats"),
            ("nats://h2:4222".to_owned(), None)
        );
        assert_eq!(
            split_credentials("nats://tok@h3?x=a@b", "nats"),
            ("nats://h3?x=a@b".to_owned(), Some("tok"))
        );
    }
}
