//! The envelope every event travels in, and its wire form (CloudEvents 1.0, JSON structured mode).

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::Error as _;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::codec::{Codec, CodecError};
use crate::message::Event;

/// The CloudEvents spec version written to and required on the wire.
pub const SPEC_VERSION: &str = "1.0";

/// Attribute names a header may not take: the CloudEvents context attributes and inseam's own
/// extension attributes.
const RESERVED: &[&str] = &[
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "typeversion",
    "partitionkey",
    "correlationid",
    "causationid",
];

/// The identifiers that tie a message to the flow it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Metadata {
    /// This message's id (UUID v7).
    pub message_id: Uuid,
    /// The id shared by every message of one flow (the first command's id unless given).
    pub correlation_id: Uuid,
    /// The id of the message whose handling produced this one, if any.
    pub causation_id: Option<Uuid>,
}

/// A header name: a CloudEvents extension attribute name (`[a-z0-9]+`) that is not one of the
/// reserved attributes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HeaderName(String);

impl HeaderName {
    /// Validates a header name.
    ///
    /// ```
    /// use inseam_core::HeaderName;
    /// assert!(HeaderName::new("traceparent").is_ok());
    /// assert!(HeaderName::new("Trace-Parent").is_err());
    /// assert!(HeaderName::new("id").is_err());
    /// ```
    pub fn new(name: impl Into<String>) -> Result<Self, HeaderError> {
        let name = name.into();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            return Err(HeaderError::InvalidName { name });
        }
        if RESERVED.contains(&name.as_str()) {
            return Err(HeaderError::Reserved { name });
        }
        Ok(HeaderName(name))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A header could not be set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The name is not a CloudEvents extension attribute name.
    #[error(
        "header name `{name}` is invalid: use lower-case ASCII letters and digits only (CloudEvents extension attribute names)"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// The name is a CloudEvents or inseam attribute.
    #[error("header name `{name}` is reserved for an envelope attribute")]
    Reserved {
        /// The rejected name.
        name: String,
    },
}

/// Free-form string headers of an envelope (trace context, tenant, ...), carried as CloudEvents
/// extension attributes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(HeaderName, String)>);

impl Headers {
    /// No headers (does not allocate).
    pub const fn new() -> Self {
        Headers(Vec::new())
    }

    /// Sets a header, validating its name.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Result<Option<String>, HeaderError> {
        // A sorted vector: envelopes carry a handful of headers, and an empty one costs nothing
        // to create or drop on the dispatch path.
        let name = HeaderName::new(name)?;
        match self.0.binary_search_by(|(k, _)| k.cmp(&name)) {
            Ok(i) => Ok(Some(std::mem::replace(&mut self.0[i].1, value.into()))),
            Err(i) => {
                self.0.insert(i, (name, value.into()));
                Ok(None)
            }
        }
    }

    /// A header's value.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.as_str() == name)
            .map(|(_, v)| v.as_str())
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The headers in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

impl Headers {
    /// Headers from pairs, validating each name.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, HeaderError> {
        let mut headers = Headers::new();
        for (name, value) in pairs {
            headers.insert(name, value)?;
        }
        Ok(headers)
    }
}

/// A typed event with its metadata, as subscribers receive it.
///
/// It dereferences to the payload, so `envelope.order_id` reads a payload field.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<E> {
    /// Id, correlation id and causation id.
    pub metadata: Metadata,
    /// The ordering key.
    pub key: Option<String>,
    /// When the event was published.
    pub occurred_at: DateTime<Utc>,
    /// Where it was published (the app's source, CloudEvents `source`).
    pub source: Arc<str>,
    /// Free-form headers.
    pub headers: Headers,
    /// The event itself.
    pub payload: E,
}

impl<E: Event> Envelope<E> {
    /// The event's stable name.
    pub fn name(&self) -> &'static str {
        E::NAME
    }

    /// The event's contract version.
    pub fn version(&self) -> u32 {
        E::VERSION
    }

    /// This event's id.
    pub fn message_id(&self) -> Uuid {
        self.metadata.message_id
    }

    /// The flow's correlation id.
    pub fn correlation_id(&self) -> Uuid {
        self.metadata.correlation_id
    }

    /// Encodes the payload with the event's codec into an untyped envelope.
    pub fn to_raw(&self) -> Result<RawEnvelope, CodecError> {
        Ok(RawEnvelope {
            metadata: self.metadata,
            name: E::NAME.to_owned(),
            version: E::VERSION,
            key: self.key.clone(),
            occurred_at: self.occurred_at,
            source: self.source.to_string(),
            headers: self.headers.clone(),
            content_type: <E::Codec as Codec>::CONTENT_TYPE.to_owned(),
            payload: <E::Codec as Codec>::encode(&self.payload)?,
        })
    }
}

impl<E> Deref for Envelope<E> {
    type Target = E;
    fn deref(&self) -> &E {
        &self.payload
    }
}

/// An envelope whose payload is still encoded: what outboxes store and transports carry.
#[derive(Debug, Clone, PartialEq)]
pub struct RawEnvelope {
    /// Id, correlation id and causation id.
    pub metadata: Metadata,
    /// The message's stable name (CloudEvents `type`).
    pub name: String,
    /// The contract version (`typeversion`).
    pub version: u32,
    /// The ordering key (`partitionkey`).
    pub key: Option<String>,
    /// When the message was published (`time`).
    pub occurred_at: DateTime<Utc>,
    /// Where it was published (`source`).
    pub source: String,
    /// Extension attributes.
    pub headers: Headers,
    /// The payload's media type (`datacontenttype`).
    pub content_type: String,
    /// The encoded payload.
    pub payload: Vec<u8>,
}

/// A message could not be read from its wire form or decoded into its type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The bytes are not a CloudEvents 1.0 JSON envelope inseam can read.
    #[error("malformed envelope: {0}")]
    Malformed(#[source] serde_json::Error),
    /// The envelope is for another message or version than the one requested.
    #[error("envelope holds `{found}` v{found_version}, expected `{expected}` v{expected_version}")]
    WrongType {
        /// What the envelope holds.
        found: String,
        /// Its version.
        found_version: u32,
        /// What was asked for.
        expected: &'static str,
        /// The version asked for.
        expected_version: u32,
    },
    /// The envelope holds an event that is not one of an event set's.
    #[error("envelope holds `{found}` v{found_version}, which is not one of the events of `{set}`")]
    NotInSet {
        /// What the envelope holds.
        found: String,
        /// Its version.
        found_version: u32,
        /// The event set.
        set: &'static str,
    },
    /// The payload does not decode into the message type.
    #[error("payload of `{name}` v{version} (message {message_id}) does not decode")]
    Payload {
        /// The message name.
        name: String,
        /// Its version.
        version: u32,
        /// The message id.
        message_id: Uuid,
        /// Why.
        #[source]
        source: CodecError,
    },
}

impl RawEnvelope {
    /// Decodes the payload into the event type, checking name and version.
    pub fn decode<E: Event>(&self) -> Result<Envelope<E>, WireError> {
        if self.name != E::NAME || self.version != E::VERSION {
            return Err(WireError::WrongType {
                found: self.name.clone(),
                found_version: self.version,
                expected: E::NAME,
                expected_version: E::VERSION,
            });
        }
        let payload =
            <E::Codec as Codec>::decode(&self.payload).map_err(|source| WireError::Payload {
                name: self.name.clone(),
                version: self.version,
                message_id: self.metadata.message_id,
                source,
            })?;
        Ok(Envelope {
            metadata: self.metadata,
            key: self.key.clone(),
            occurred_at: self.occurred_at,
            source: Arc::from(self.source.as_str()),
            headers: self.headers.clone(),
            payload,
        })
    }

    /// The CloudEvents 1.0 JSON (structured mode) form of this envelope.
    ///
    /// A JSON payload is embedded as `data`; any other payload is base64 in `data_base64`.
    pub fn to_json(&self) -> Result<Vec<u8>, WireError> {
        serde_json::to_vec(self).map_err(WireError::Malformed)
    }

    /// Reads a CloudEvents 1.0 JSON envelope.
    pub fn from_json(bytes: &[u8]) -> Result<Self, WireError> {
        serde_json::from_slice(bytes).map_err(WireError::Malformed)
    }
}

/// Whether a payload of `content_type` is JSON (`application/json`, with parameters or not, or
/// any `+json` type), so that the wire envelope embeds it as `data`.
pub fn is_json(content_type: &str) -> bool {
    let base = content_type.split(';').next().unwrap_or("").trim();
    base == "application/json" || base.ends_with("+json")
}

impl Serialize for RawEnvelope {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("specversion", SPEC_VERSION)?;
        map.serialize_entry("id", &self.metadata.message_id)?;
        map.serialize_entry("source", &self.source)?;
        map.serialize_entry("type", &self.name)?;
        map.serialize_entry("typeversion", &self.version)?;
        map.serialize_entry(
            "time",
            &self
                .occurred_at
                .to_rfc3339_opts(SecondsFormat::Micros, true),
        )?;
        map.serialize_entry("datacontenttype", &self.content_type)?;
        if let Some(key) = &self.key {
            map.serialize_entry("partitionkey", key)?;
        }
        map.serialize_entry("correlationid", &self.metadata.correlation_id)?;
        if let Some(causation) = &self.metadata.causation_id {
            map.serialize_entry("causationid", causation)?;
        }
        for (name, value) in self.headers.iter() {
            map.serialize_entry(name, value)?;
        }
        if is_json(&self.content_type) {
            let raw: &serde_json::value::RawValue =
                serde_json::from_slice(&self.payload).map_err(serde::ser::Error::custom)?;
            map.serialize_entry("data", raw)?;
        } else {
            map.serialize_entry("data_base64", &BASE64.encode(&self.payload))?;
        }
        map.end()
    }
}

#[derive(Deserialize)]
struct WireForm {
    specversion: String,
    id: Uuid,
    source: String,
    #[serde(rename = "type")]
    name: String,
    typeversion: u32,
    time: DateTime<Utc>,
    datacontenttype: Option<String>,
    partitionkey: Option<String>,
    correlationid: Uuid,
    causationid: Option<Uuid>,
    data: Option<Box<serde_json::value::RawValue>>,
    data_base64: Option<String>,
    #[serde(flatten)]
    extensions: BTreeMap<String, serde_json::Value>,
}

impl<'de> Deserialize<'de> for RawEnvelope {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let wire = WireForm::deserialize(deserializer)?;
        if wire.specversion != SPEC_VERSION {
            return Err(D::Error::custom(format_args!(
                "unsupported specversion `{}`, expected `{SPEC_VERSION}`",
                wire.specversion
            )));
        }
        let content_type = wire
            .datacontenttype
            .unwrap_or_else(|| "application/json".to_owned());
        let payload = match (wire.data, wire.data_base64) {
            (Some(data), None) => data.get().as_bytes().to_vec(),
            (None, Some(b64)) => BASE64.decode(b64).map_err(D::Error::custom)?,
            (None, None) => {
                return Err(D::Error::custom(
                    "envelope has neither `data` nor `data_base64`",
                ));
            }
            (Some(_), Some(_)) => {
                return Err(D::Error::custom(
                    "envelope has both `data` and `data_base64`",
                ));
            }
        };
        let mut headers = Headers::new();
        for (name, value) in wire.extensions {
            let serde_json::Value::String(value) = value else {
                return Err(D::Error::custom(format_args!(
                    "extension attribute `{name}` is not a string"
                )));
            };
            headers.insert(name, value).map_err(D::Error::custom)?;
        }
        Ok(RawEnvelope {
            metadata: Metadata {
                message_id: wire.id,
                correlation_id: wire.correlationid,
                causation_id: wire.causationid,
            },
            name: wire.name,
            version: wire.typeversion,
            key: wire.partitionkey,
            occurred_at: wire.time,
            source: wire.source,
            headers,
            content_type,
            payload,
        })
    }
}
