//! Errors of setting up the Redis transport. Once connected, the transport reports through
//! [`TransportError`](inseam_core::transport::TransportError), like every transport.

use std::path::PathBuf;

/// Setting up the Redis transport failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisError {
    /// An option is invalid or options contradict each other.
    #[error("invalid Redis option {option}: {problem}")]
    Config {
        /// The option (`partitions`, `INSEAM_REDIS_TLS_KEY`, ...).
        option: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A TLS file (root certificates, client certificate or key) could not be read.
    #[error("could not read the TLS file `{}`", path.display())]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The server did not accept the connection (unreachable, refused credentials, TLS).
    #[error("could not connect to Redis at {server}")]
    Connect {
        /// The server, without credentials.
        server: String,
        /// Why.
        #[source]
        source: redis::RedisError,
    },
}

impl RedisError {
    pub(crate) fn config(option: impl Into<String>, problem: impl Into<String>) -> Self {
        RedisError::Config {
            option: option.into(),
            problem: problem.into(),
        }
    }
}

/// A result whose error is [`RedisError`].
pub type Result<T, E = RedisError> = std::result::Result<T, E>;
