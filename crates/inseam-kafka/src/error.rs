//! Errors of setting up the Kafka transport. Once connected, the transport reports through
//! [`TransportError`](inseam_core::transport::TransportError), like every transport.

/// Setting up the Kafka transport failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KafkaError {
    /// An option is invalid or options contradict each other.
    #[error("invalid Kafka option {option}: {problem}")]
    Config {
        /// The option (`partitions`, `INSEAM_KAFKA_TLS_KEY`, ...).
        option: String,
        /// What is wrong with it.
        problem: String,
    },
    /// librdkafka refused to create a client with the options (a bad setting, a missing
    /// certificate file).
    #[error("could not create a Kafka client for {brokers}")]
    Client {
        /// The bootstrap brokers, without credentials.
        brokers: String,
        /// Why.
        #[source]
        source: rdkafka::error::KafkaError,
    },
}

impl KafkaError {
    pub(crate) fn config(option: impl Into<String>, problem: impl Into<String>) -> Self {
        KafkaError::Config {
            option: option.into(),
            problem: problem.into(),
        }
    }
}

/// A result whose error is [`KafkaError`].
pub type Result<T, E = KafkaError> = std::result::Result<T, E>;
