//! Errors of setting up the RabbitMQ transport. Once connected, the transport reports through
//! [`TransportError`](inseam_core::transport::TransportError), like every transport.

use std::path::PathBuf;

/// Setting up the RabbitMQ transport failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AmqpError {
    /// An option is invalid or options contradict each other.
    #[error("invalid AMQP option {option}: {problem}")]
    Config {
        /// The option (`partitions`, `INSEAM_AMQP_TLS_KEY`, ...).
        option: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A TLS file could not be read.
    #[error("could not read the TLS file `{}`", path.display())]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No server of the list accepted the connection.
    #[error("could not connect to RabbitMQ at {servers}")]
    Connect {
        /// The servers tried, without credentials.
        servers: String,
        /// Why (the last server's failure).
        #[source]
        source: inseam_core::BoxError,
    },
}

impl AmqpError {
    pub(crate) fn config(option: impl Into<String>, problem: impl Into<String>) -> Self {
        AmqpError::Config {
            option: option.into(),
            problem: problem.into(),
        }
    }
}

/// A result whose error is [`AmqpError`].
pub type Result<T, E = AmqpError> = std::result::Result<T, E>;
