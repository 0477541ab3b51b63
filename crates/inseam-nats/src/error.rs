//! Errors of setting up the NATS transport. Once connected, the transport reports through
//! [`TransportError`](inseam_core::transport::TransportError), like every transport.

use std::path::PathBuf;

/// Setting up the NATS transport failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// An option is invalid or options contradict each other.
    #[error("invalid NATS option {option}: {problem}")]
    Config {
        /// The option (`partitions`, `INSEAM_NATS_TLS_KEY`, ...).
        option: String,
        /// What is wrong with it.
        problem: String,
    },
    /// The credentials file could not be read or parsed.
    #[error("could not use the NATS credentials file `{}`", path.display())]
    Credentials {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No server of the list accepted the connection.
    #[error("could not connect to NATS at {servers}")]
    Connect {
        /// The servers tried, without credentials.
        servers: String,
        /// Why.
        #[source]
        source: async_nats::ConnectError,
    },
}

impl NatsError {
    pub(crate) fn config(option: impl Into<String>, problem: impl Into<String>) -> Self {
        NatsError::Config {
            option: option.into(),
            problem: problem.into(),
        }
    }
}

/// A result whose error is [`NatsError`].
pub type Result<T, E = NatsError> = std::result::Result<T, E>;
