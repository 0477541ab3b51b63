//! Versioned events: upcasters turn a stored payload of an older version into the next one.
//!
//! An event's identity is its name and version, never its Rust path. When an event's payload
//! changes, its version goes up and an upcaster from the previous version is registered on the
//! builder; the chain runs wherever a stored payload is read (the event store, the relay's
//! outbox and dead-letter deliveries), so handlers only ever see the current version.
//! `build()` checks that every event of version `n` has upcasters from 1 to `n - 1`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::envelope::RawEnvelope;
use crate::error::BoxError;

/// Turns a JSON payload of one version into the payload of the next version.
pub(crate) type UpcastFn =
    Arc<dyn Fn(serde_json::Value) -> Result<serde_json::Value, BoxError> + Send + Sync>;

/// The registered upcasters, by event name and the version they read.
#[derive(Clone, Default)]
pub(crate) struct Upcasters {
    by_name: HashMap<&'static str, HashMap<u32, UpcastFn>>,
}

impl fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chains: Vec<(&str, Vec<u32>)> = self
            .by_name
            .iter()
            .map(|(name, from)| {
                let mut versions: Vec<u32> = from.keys().copied().collect();
                versions.sort_unstable();
                (*name, versions)
            })
            .collect();
        chains.sort_unstable();
        f.debug_map().entries(chains).finish()
    }
}

impl Upcasters {
    pub(crate) fn insert(&mut self, name: &'static str, from: u32, upcast: UpcastFn) {
        self.by_name.entry(name).or_default().insert(from, upcast);
    }

    pub(crate) fn has(&self, name: &str, from: u32) -> bool {
        self.by_name
            .get(name)
            .is_some_and(|chain| chain.contains_key(&from))
    }

    /// Every `(name, from_version)` registered.
    pub(crate) fn registered(&self) -> impl Iterator<Item = (&'static str, u32)> + '_ {
        self.by_name
            .iter()
            .flat_map(|(name, chain)| chain.keys().map(move |from| (*name, *from)))
    }

    /// Runs the chain from `raw`'s version as far as it goes.
    pub(crate) fn upcast(&self, mut raw: RawEnvelope) -> Result<RawEnvelope, UpcastError> {
        let Some(chain) = self.by_name.get(raw.name.as_str()) else {
            return Ok(raw);
        };
        while let Some(upcast) = chain.get(&raw.version) {
            let failed = |reason: BoxError| UpcastError {
                name: raw.name.clone(),
                from: raw.version,
                message_id: raw.metadata.message_id,
                source: reason,
            };
            if !raw.content_type.starts_with("application/json") {
                return Err(failed(
                    format!(
                        "only JSON payloads can be upcast, this one is `{}`",
                        raw.content_type
                    )
                    .into(),
                ));
            }
            let value: serde_json::Value =
                serde_json::from_slice(&raw.payload).map_err(|e| failed(Box::new(e)))?;
            let value = upcast(value).map_err(&failed)?;
            raw.payload = serde_json::to_vec(&value).map_err(|e| failed(Box::new(e)))?;
            raw.version += 1;
        }
        Ok(raw)
    }
}

/// An upcaster failed on a stored payload.
#[derive(Debug, thiserror::Error)]
#[error("upcasting `{name}` (message {message_id}) from version {from} failed")]
pub struct UpcastError {
    /// The event's name.
    pub name: String,
    /// The version the failing upcaster reads.
    pub from: u32,
    /// The message.
    pub message_id: uuid::Uuid,
    /// Why.
    #[source]
    pub source: BoxError,
}
