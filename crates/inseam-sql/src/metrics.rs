//! What the relay and the transports' bridge report through the [`metrics`] facade.
//!
//! Every name starts with `inseam_`. Counters, labelled `group`:
//! `inseam_deliveries_total` (deliveries handled and committed), `inseam_retries_total` (failed
//! attempts scheduled for a retry), `inseam_dead_letters_total` (messages moved to the dead
//! letters), `inseam_inbox_duplicates_total` (redeliveries the inbox skipped). Histogram,
//! labelled `group`: `inseam_relay_batch_duration_seconds` (one claim and what it delivered).
//! Counters, labelled `transport` (and `group` for what is consumed):
//! `inseam_broker_published_total` (messages a broker confirmed), `inseam_broker_consumed_total`
//! (messages received and kept in the store). Gauges, labelled `group`, set by
//! [`SqlStore::record_gauges`](crate::SqlStore::record_gauges): `inseam_lag_messages`,
//! `inseam_lag_oldest_seconds`, `inseam_dead_letter_depth`.
//!
//! Without a recorder installed each of these is a load and a branch.

use std::time::Duration;

pub(crate) fn delivered(group: &'static str, messages: usize) {
    metrics::counter!("inseam_deliveries_total", "group" => group).increment(messages as u64);
}

pub(crate) fn retried(group: &'static str) {
    metrics::counter!("inseam_retries_total", "group" => group).increment(1);
}

pub(crate) fn dead_lettered(group: &'static str) {
    metrics::counter!("inseam_dead_letters_total", "group" => group).increment(1);
}

pub(crate) fn duplicate(group: &'static str) {
    metrics::counter!("inseam_inbox_duplicates_total", "group" => group).increment(1);
}

pub(crate) fn batch(group: &'static str, took: Duration) {
    metrics::histogram!("inseam_relay_batch_duration_seconds", "group" => group).record(took);
}

pub(crate) fn published(transport: &'static str, messages: usize) {
    if messages > 0 {
        metrics::counter!("inseam_broker_published_total", "transport" => transport)
            .increment(messages as u64);
    }
}

pub(crate) fn consumed(transport: &'static str, group: &'static str, messages: usize) {
    metrics::counter!("inseam_broker_consumed_total", "transport" => transport, "group" => group)
        .increment(messages as u64);
}

/// Sets the backlog gauges of `group`.
pub(crate) fn backlog(group: String, pending: i64, oldest: Option<Duration>, dead_letters: i64) {
    metrics::gauge!("inseam_lag_messages", "group" => group.clone()).set(pending as f64);
    metrics::gauge!("inseam_lag_oldest_seconds", "group" => group.clone())
        .set(oldest.map_or(0.0, |age| age.as_secs_f64()));
    metrics::gauge!("inseam_dead_letter_depth", "group" => group).set(dead_letters as f64);
}
