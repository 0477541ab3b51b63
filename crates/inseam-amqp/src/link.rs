//! A connection that is made again when it was lost: every user asks it for a channel, and
//! gets one on a live connection or an error saying why none could be made.

use std::sync::Arc;

use inseam_core::BoxError;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::uri::{AMQPUri, AMQPUserInfo};
use lapin::{Channel, Connection, ConnectionProperties, DefaultConnectionBuilder};

use crate::TARGET;
use crate::error::{AmqpError, Result};
use crate::options::AmqpOptions;

/// One AMQP connection, made again on demand after it was lost.
pub(crate) struct Link {
    options: Arc<AmqpOptions>,
    tls: OwnedTLSConfig,
    /// Who uses it, for logs and the server's connection list.
    role: &'static str,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    /// Set by [`close`](Self::close): no connection is made again.
    closed: std::sync::atomic::AtomicBool,
}

impl Link {
    /// A link that connects on first use. Reads the TLS files now.
    pub(crate) fn new(options: Arc<AmqpOptions>, role: &'static str) -> Result<Self> {
        Ok(Link {
            tls: tls_config(&options)?,
            options,
            role,
            connection: tokio::sync::Mutex::new(None),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Connects now, failing with the last server's error when none accepts.
    pub(crate) async fn connect_now(&self) -> Result<()> {
        self.connection()
            .await
            .map(|_| ())
            .map_err(|source| AmqpError::Connect {
                servers: self.options.servers.join(","),
                source,
            })
    }

    /// The live connection, connecting (again) when there is none.
    pub(crate) async fn connection(&self) -> std::result::Result<Arc<Connection>, BoxError> {
        let mut current = self.connection.lock().await;
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("the connection was closed".into());
        }
        if let Some(connection) = current.as_ref() {
            if connection.status().connected() {
                return Ok(Arc::clone(connection));
            }
            tracing::warn!(target: TARGET, role = self.role, "lost the RabbitMQ connection; reconnecting");
        }
        if let Some(old) = current.take() {
            close_in_background(old);
        }
        let connection = Arc::new(self.connect().await?);
        tracing::info!(target: TARGET, role = self.role, "connected to RabbitMQ");
        *current = Some(Arc::clone(&connection));
        Ok(connection)
    }

    /// A new channel on the live connection.
    pub(crate) async fn channel(&self) -> std::result::Result<Channel, BoxError> {
        let connection = self.connection().await?;
        match connection.create_channel().await {
            Ok(channel) => Ok(channel),
            Err(err) => {
                // Most likely the connection went away meanwhile: the next call makes a new one.
                let mut current = self.connection.lock().await;
                if current
                    .as_ref()
                    .is_some_and(|c| Arc::ptr_eq(c, &connection))
                {
                    current.take();
                }
                close_in_background(connection);
                Err(err.into())
            }
        }
    }

    /// Whether the connection is up (false while it is being made).
    pub(crate) fn connected(&self) -> bool {
        match self.connection.try_lock() {
            Ok(current) => current.as_ref().is_some_and(|c| c.status().connected()),
            Err(_) => false,
        }
    }

    /// Closes the connection, if any, for good: the link makes no other.
    pub(crate) async fn close(&self) {
        let mut current = self.connection.lock().await;
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(connection) = current.take() {
            let _ = connection.close(200, "inseam: closing".into()).await;
        }
    }

    async fn connect(&self) -> std::result::Result<Connection, BoxError> {
        let options = &self.options;
        let mut last: Option<BoxError> = None;
        for server in &options.servers {
            let mut uri: AMQPUri = match server.parse() {
                Ok(uri) => uri,
                Err(problem) => {
                    last = Some(format!("`{server}` is not an AMQP URL: {problem}").into());
                    continue;
                }
            };
            if let (Some(user), Some(password)) = (&options.user, &options.password) {
                uri.authority.userinfo = AMQPUserInfo {
                    username: user.clone(),
                    password: password.expose().to_owned(),
                };
            }
            let heartbeat = u16::try_from(options.heartbeat.as_secs().max(1)).unwrap_or(u16::MAX);
            uri.query.heartbeat = Some(heartbeat);
            uri.query.connection_timeout =
                Some(u64::try_from(options.connection_timeout.as_millis()).unwrap_or(u64::MAX));
            let name = match &options.client_name {
                Some(name) => format!("{name} ({})", self.role),
                None => format!("inseam {}", self.role),
            };
            let properties = ConnectionProperties::default().with_connection_name(name.into());
            let builder = match DefaultConnectionBuilder::new() {
                Ok(builder) => builder,
                Err(err) => return Err(err.into()),
            };
            let builder = builder
                .with_uri(uri)
                .with_properties(properties)
                .with_tls_config(self.tls.clone());
            let connecting = builder.connect();
            match tokio::time::timeout(options.connection_timeout, connecting).await {
                Ok(Ok(connection)) => return Ok(connection),
                Ok(Err(err)) => {
                    tracing::debug!(target: TARGET, server = %server, error = %err, "could not connect");
                    last = Some(err.into());
                }
                Err(_) => {
                    tracing::debug!(target: TARGET, server = %server, "connecting timed out");
                    last = Some(
                        format!(
                            "`{server}` did not accept a connection within {:?}",
                            options.connection_timeout
                        )
                        .into(),
                    );
                }
            }
        }
        Err(last.unwrap_or_else(|| "no server URL".into()))
    }
}

fn close_in_background(connection: Arc<Connection>) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            let _ = connection.close(200, "inseam: reconnecting".into()).await;
        });
    }
}

/// The TLS configuration of `amqps://` servers: the extra root certificates and the client
/// certificate, read from their files.
fn tls_config(options: &AmqpOptions) -> Result<OwnedTLSConfig> {
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path).map_err(|source| AmqpError::TlsFile {
            path: path.clone(),
            source,
        })
    };
    let cert_chain = match &options.tls_ca {
        Some(path) => Some(String::from_utf8(read(path)?).map_err(|_| {
            AmqpError::config("tls_ca", format!("`{}` is not a PEM file", path.display()))
        })?),
        None => None,
    };
    let identity = match &options.tls_client {
        Some((cert, key)) => Some(OwnedIdentity::PKCS8 {
            pem: read(cert)?,
            key: read(key)?,
        }),
        None => None,
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}
