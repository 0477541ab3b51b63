//! Payload codecs: how an event's payload becomes bytes and back.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// A payload codec. JSON ([`Json`]) is the default; an event picks another one with
/// `#[event(codec = MyCodec)]`.
pub trait Codec: Send + Sync + 'static {
    /// The media type written to the envelope's `datacontenttype`.
    const CONTENT_TYPE: &'static str;
    /// Whether the encoded bytes are JSON, so the wire envelope can embed them as `data`
    /// instead of base64 in `data_base64`.
    const IS_JSON: bool;

    /// Encodes a payload.
    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError>;
    /// Decodes a payload.
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError>;
}

/// A payload could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[error("{content_type} codec: {source}")]
pub struct CodecError {
    /// The codec's media type.
    pub content_type: &'static str,
    /// The underlying error.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

/// The JSON codec (`application/json`), the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl Codec for Json {
    const CONTENT_TYPE: &'static str = "application/json";
    const IS_JSON: bool = true;

    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
        serde_json::to_vec(value).map_err(|e| CodecError {
            content_type: Self::CONTENT_TYPE,
            source: Box::new(e),
        })
    }

    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
        serde_json::from_slice(bytes).map_err(|e| CodecError {
            content_type: Self::CONTENT_TYPE,
            source: Box::new(e),
        })
    }
}
