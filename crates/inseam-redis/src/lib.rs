//! Redis Streams transport for inseam: a group's events consumed durably in another process,
//! in per-key order.
//!
//! [`Redis`] implements inseam's [`Transport`] on the `redis` crate (tokio, a reconnecting
//! connection manager). Its layout (decision 0019 in the repository's `docs/decisions/`):
//!
//! - a message goes to one of N partition streams, `<prefix>:stream:<partition>` (8 by
//!   default), its partition a stable hash (FNV-1a) of its key, or of its id when it has none;
//!   the stream holds every channel, the channel being a field of the entry;
//! - a publish is one Lua script per message (`XADD`, and a key remembering the message id for
//!   the deduplication window, so a second publish of an id is dropped); a batch is one
//!   pipeline, and a message counts only once the server answered for it;
//! - a group is one Redis consumer group on each partition stream, starting at the stream's
//!   beginning. One consumer of the group at a time reads a partition, holding a lease
//!   (`SET NX PX`, renewed), and it fetches the partition's next entry only once the one it
//!   handed out is acknowledged (`XACK`, after the consuming process committed). A message
//!   nacked stays pending and is claimed again (`XCLAIM`) after its delay; one held by a
//!   consumer that died is claimed (`XAUTOCLAIM`) by the next holder of the lease once it has
//!   been pending for the subscription's ack wait. The attempt is the entry's delivery count.
//!   A message waiting for its redelivery holds back every key of its partition, which the
//!   transport declares as [`KeyOrder::PerKeyPartitioned`].
//!
//! - request-reply goes through a list of requests per channel, popped (`BLPOP`) by the
//!   channel's servers, and a list of answers per requesting connection; a request nobody
//!   serves fails at once, one nobody answers after its timeout, both as transient.
//!
//! What survives a restart of Redis is what Redis's own persistence keeps (RDB snapshots,
//! the append-only file and its `appendfsync` policy): the transport declares
//! `acks_survive_restart` when the server runs with `appendonly yes` and `appendfsync always`.
//!
//! ```no_run
//! use inseam_core::transport::{Consumer, Subscription, Transport};
//! use inseam_redis::{Redis, RedisOptions};
//! use std::time::Duration;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = Redis::connect_with(RedisOptions::from_env()?).await?;
//! redis.provision(&["orders.order_placed".to_owned()]).await?;
//! let mut consumer = redis
//!     .subscribe(&Subscription::new("shipping", ["orders.order_placed"]))
//!     .await?;
//! for message in consumer.fetch(16, Duration::from_secs(1)).await? {
//!     // ... commit it with the group's inbox row, then:
//!     message.ack().await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! What a process needs to reach the server (URL, credentials, TLS) is in [`RedisOptions`],
//! which also reads `INSEAM_REDIS_*` environment variables.

#![warn(missing_docs)]

mod consumer;
mod error;
mod layout;
mod options;
mod rpc;
mod scripts;

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use inseam_core::transport::{
    Capabilities, Consumer, KeyOrder, Outgoing, Subscription, Transport, TransportError,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, Value};
use tracing::Instrument;

pub use consumer::RedisConsumer;
pub use error::{RedisError, Result};
pub use options::{MAX_PARTITIONS, RedisOptions};

/// The transport's name in errors and logs.
const NAME: &str = "redis";
/// The `tracing` target of everything this crate logs.
const TARGET: &str = "inseam::redis";
/// The oldest server with `XAUTOCLAIM`.
const MIN_VERSION: (u32, u32) = (6, 2);

/// The Redis Streams transport. Cloning it shares the connection.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    conn: ConnectionManager,
    options: RedisOptions,
    durable_acks: bool,
    server_version: String,
    /// This connection's reply list and its reader, from the first request on.
    replies: tokio::sync::OnceCell<rpc::Replies>,
}

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let options = &self.inner.options;
        f.debug_struct("Redis")
            .field("server", &options.url)
            .field("version", &self.inner.server_version)
            .field("prefix", &options.prefix)
            .field("partitions", &options.partitions)
            .field("durable_acks", &self.inner.durable_acks)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// Connects to the server of `url` with the default options; see
    /// [`RedisOptions::from_url`].
    pub async fn connect(url: &str) -> Result<Self> {
        Redis::connect_with(RedisOptions::from_url(url)?).await
    }

    /// Connects with `options`. The connection manager reconnects by itself after a lost
    /// connection; meanwhile publishes, fetches and acknowledgements fail with transient
    /// errors.
    pub async fn connect_with(options: RedisOptions) -> Result<Self> {
        options.validate()?;
        let client = build_client(&options).await?;
        let server = options.url.clone();
        let connect_error = |source| RedisError::Connect {
            server: server.clone(),
            source,
        };
        let conn = ConnectionManager::new_with_config(
            client.clone(),
            manager_config(&options, options.request_timeout),
        )
        .await
        .map_err(connect_error)?;

        let mut probe = conn.clone();
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut probe)
            .await
            .map_err(connect_error)?;
        let server_version = info
            .lines()
            .find_map(|line| line.strip_prefix("redis_version:"))
            .unwrap_or("unknown")
            .trim()
            .to_owned();
        if parse_version(&server_version).is_some_and(|version| version < MIN_VERSION) {
            return Err(RedisError::config(
                "server",
                format!(
                    "Redis {server_version} at {server} has no XAUTOCLAIM; the transport needs \
                     6.2 or later"
                ),
            ));
        }
        let durable_acks = match options.durable_acks {
            Some(durable) => durable,
            None => persists_every_write(&mut probe).await,
        };
        tracing::info!(
            target: TARGET,
            server = %server,
            version = %server_version,
            durable_acks,
            "connected to Redis"
        );
        Ok(Redis {
            inner: Arc::new(Inner {
                client,
                conn,
                options,
                durable_acks,
                server_version,
                replies: tokio::sync::OnceCell::new(),
            }),
        })
    }

    /// The connection, for what inseam does not cover (health checks, statistics). Cloning it
    /// shares it.
    pub fn connection(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    /// The options it was connected with.
    pub fn options(&self) -> &RedisOptions {
        &self.inner.options
    }

    /// Whether the transport declares `acks_survive_restart` (see
    /// [`RedisOptions::durable_acks`]).
    pub fn durable_acks(&self) -> bool {
        self.inner.durable_acks
    }

    /// Records this prefix's partition count, or checks it against the one recorded: two
    /// counts would send one key to two partitions.
    async fn check_layout(
        &self,
        operation: &(dyn Fn() -> String + Sync),
    ) -> Result<(), TransportError> {
        let options = &self.inner.options;
        let mut conn = self.inner.conn.clone();
        let recorded: String = redis::Script::new(scripts::LAYOUT)
            .key(layout::layout_key(&options.prefix))
            .arg(options.partitions)
            .invoke_async(&mut conn)
            .await
            .map_err(|err| command_error(operation(), err))?;
        if recorded != options.partitions.to_string() {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                format!(
                    "the keys under `{}` are laid out in {recorded} partitions, and this \
                     process is configured with {}",
                    options.prefix, options.partitions
                ),
            ));
        }
        Ok(())
    }

    async fn publish_batch(&self, batch: &[Outgoing]) -> Vec<Result<(), TransportError>> {
        let options = &self.inner.options;
        let mut outcomes: Vec<Option<Result<(), TransportError>>> =
            batch.iter().map(|_| None).collect();
        // Keys with a message that could not be sent: later messages of the key stay back so
        // that a retry cannot land behind them.
        let mut failed_keys: HashSet<&str> = HashSet::new();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        // The script is loaded once per batch (whatever the server forgot since, a restart or
        // `SCRIPT FLUSH`) and called by its digest: sending its text with every message would
        // make the server parse and hash it every time.
        let publish = publish_script();
        pipe.cmd("SCRIPT").arg("LOAD").arg(scripts::PUBLISH);
        let mut sent = Vec::with_capacity(batch.len());
        let window = options.dedup_window.as_millis().to_string();
        let max_len = options.max_len.unwrap_or(0).to_string();

        for (index, message) in batch.iter().enumerate() {
            let operation = || format!("publish to `{}`", message.channel);
            let key = message.key.as_deref();
            if let Some(key) = key
                && failed_keys.contains(key)
            {
                outcomes[index] = Some(Err(TransportError::transient(
                    NAME,
                    operation(),
                    format!("an earlier message with key `{key}` in this batch was not published"),
                )));
                continue;
            }
            let headers = match prepare(message) {
                Ok(headers) => headers,
                Err(problem) => {
                    outcomes[index] =
                        Some(Err(TransportError::permanent(NAME, operation(), problem)));
                    failed_keys.extend(key);
                    continue;
                }
            };
            let partition = layout::partition(key, message.message_id, options.partitions);
            let command = pipe
                .cmd("EVALSHA")
                .arg(publish.get_hash())
                .arg(2)
                .arg(layout::stream_key(&options.prefix, partition))
                .arg(layout::id_key(&options.prefix, message.message_id))
                .arg(&window)
                .arg(&max_len)
                .arg(layout::FIELD_CHANNEL)
                .arg(&message.channel)
                .arg(layout::FIELD_ID)
                .arg(message.message_id.to_string());
            if let Some(key) = key {
                command.arg(layout::FIELD_KEY).arg(key);
            }
            if !message.headers.is_empty() {
                command.arg(layout::FIELD_HEADERS).arg(headers);
            }
            command
                .arg(layout::FIELD_PAYLOAD)
                .arg(message.payload.as_ref());
            sent.push(index);
        }

        if !sent.is_empty() {
            let mut conn = self.inner.conn.clone();
            let answered = tokio::time::timeout(
                options.publish_timeout,
                pipe.query_async::<Vec<redis::RedisResult<Value>>>(&mut conn),
            )
            .await;
            match answered {
                // The script's load first, then one answer per message.
                Ok(Ok(results)) if results.len() == sent.len() + 1 => {
                    for (index, result) in sent.iter().zip(results.into_iter().skip(1)) {
                        let message = &batch[*index];
                        let operation = format!("publish to `{}`", message.channel);
                        outcomes[*index] = Some(match result {
                            Ok(added) => {
                                if layout::int(&added) == Some(0) {
                                    tracing::debug!(
                                        target: TARGET,
                                        message_id = %message.message_id,
                                        "the message id was published before; dropped"
                                    );
                                }
                                Ok(())
                            }
                            Err(err) => Err(command_error(operation, err)),
                        });
                    }
                }
                Ok(Ok(results)) => {
                    let problem = format!(
                        "the server answered {} of {} commands",
                        results.len(),
                        sent.len() + 1
                    );
                    for index in &sent {
                        outcomes[*index] = Some(Err(TransportError::transient(
                            NAME,
                            format!("publish to `{}`", batch[*index].channel),
                            problem.clone(),
                        )));
                    }
                }
                Ok(Err(err)) => {
                    let transient = is_transient(&err);
                    let err = Arc::new(err);
                    for index in &sent {
                        let operation = format!("publish to `{}`", batch[*index].channel);
                        let source = SharedError(Arc::clone(&err));
                        outcomes[*index] = Some(Err(if transient {
                            TransportError::transient(NAME, operation, source)
                        } else {
                            TransportError::permanent(NAME, operation, source)
                        }));
                    }
                }
                Err(_) => {
                    for index in &sent {
                        outcomes[*index] = Some(Err(TransportError::transient(
                            NAME,
                            format!("publish to `{}`", batch[*index].channel),
                            format!(
                                "the server did not confirm within the publish timeout ({:?})",
                                options.publish_timeout
                            ),
                        )));
                    }
                }
            }
        }

        outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| {
                    Err(TransportError::transient(
                        NAME,
                        "publish",
                        "the message was not sent",
                    ))
                })
            })
            .collect()
    }
}

/// One client error shared by the outcomes of every message of a failed batch.
#[derive(Debug)]
struct SharedError(Arc<redis::RedisError>);

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// The client of `options`: its URL with the credentials and TLS files put back.
async fn build_client(options: &RedisOptions) -> Result<redis::Client> {
    let info = options.url.as_str().into_connection_info().map_err(|err| {
        RedisError::config(
            "url",
            format!("`{}` is not a Redis URL: {err}", options.url),
        )
    })?;
    let mut settings = info.redis_settings().clone();
    if let Some(user) = &options.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &options.password {
        settings = settings.set_password(password.expose());
    }
    let info = info.set_redis_settings(settings);
    if options.tls_ca.is_none() && options.tls_client.is_none() {
        return redis::Client::open(info)
            .map_err(|err| RedisError::config("url", format!("`{}`: {err}", options.url)));
    }
    let root_cert = match &options.tls_ca {
        Some(path) => Some(read_file(path.clone()).await?),
        None => None,
    };
    let client_tls = match &options.tls_client {
        Some((cert, key)) => Some(redis::ClientTlsConfig {
            client_cert: read_file(cert.clone()).await?,
            client_key: read_file(key.clone()).await?,
        }),
        None => None,
    };
    redis::Client::build_with_tls(
        info,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
    .map_err(|err| RedisError::config("tls", err.to_string()))
}

/// Reads a file off the async threads.
async fn read_file(path: std::path::PathBuf) -> Result<Vec<u8>> {
    let read = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || std::fs::read(path)).await
    };
    match read {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(source)) => Err(RedisError::TlsFile { path, source }),
        Err(join) => Err(RedisError::TlsFile {
            path,
            source: std::io::Error::other(join.to_string()),
        }),
    }
}

/// The connection manager's settings: `response_timeout` bounds each command.
pub(crate) fn manager_config(
    options: &RedisOptions,
    response_timeout: Duration,
) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(options.connection_timeout))
        .set_response_timeout(Some(response_timeout))
        .set_max_delay(Duration::from_secs(2))
}

/// `major.minor` of `7.0.15`.
fn parse_version(version: &str) -> Option<(u32, u32)> {
    let mut parts = version.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Whether the server writes every write to its append-only file before answering: then an
/// acknowledged `XACK` survives a restart. No when it refuses to tell.
async fn persists_every_write(conn: &mut ConnectionManager) -> bool {
    let mut setting = async |name: &str| -> Option<String> {
        let value: Value = redis::cmd("CONFIG")
            .arg("GET")
            .arg(name)
            .query_async(conn)
            .await
            .ok()?;
        match value {
            Value::Map(pairs) => pairs.first().and_then(|(_, v)| layout::text(v)),
            other => layout::items(&other)?.get(1).and_then(layout::text),
        }
    };
    let appendonly = setting("appendonly").await;
    let fsync = setting("appendfsync").await;
    appendonly.as_deref() == Some("yes") && fsync.as_deref() == Some("always")
}

/// The encoded headers of a message, or why it cannot be published.
fn prepare(message: &Outgoing) -> std::result::Result<Vec<u8>, String> {
    if let Some(problem) = layout::channel_problem(&message.channel) {
        return Err(format!(
            "channel `{}` cannot be used: {problem}",
            message.channel
        ));
    }
    layout::encode_headers(&message.headers)
}

/// Whether trying a failed command again later may succeed: the server is unreachable, slow,
/// loading its data, out of memory, or a replica.
pub(crate) fn is_transient(err: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    if err.is_io_error()
        || err.is_timeout()
        || err.is_connection_dropped()
        || err.is_connection_refusal()
        || err.is_unrecoverable_error()
    {
        return true;
    }
    match err.kind() {
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::ClusterDown
            // A script the server forgot between its load and its call: the next batch
            // loads it again.
            | ServerErrorKind::NoScript,
        ) => true,
        _ => err
            .code()
            .is_some_and(|code| code == "OOM" || code == "BUSY"),
    }
}

/// The publish script, its digest computed once per process.
fn publish_script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| redis::Script::new(scripts::PUBLISH))
}

/// A failed command as a transport error, transient or permanent.
pub(crate) fn command_error(operation: String, err: redis::RedisError) -> TransportError {
    if is_transient(&err) {
        TransportError::transient(NAME, operation, err)
    } else {
        TransportError::permanent(NAME, operation, err)
    }
}

fn check_channels<'a>(
    operation: impl Fn() -> String,
    channels: impl IntoIterator<Item = &'a String>,
) -> std::result::Result<(), TransportError> {
    for channel in channels {
        if let Some(problem) = layout::channel_problem(channel) {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                format!("channel `{channel}` cannot be used: {problem}"),
            ));
        }
    }
    Ok(())
}

#[async_trait]
impl Transport for Redis {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            // One reader per group and partition, with one message in flight: a message
            // waiting for its redelivery holds back its whole partition, not only its key.
            ordering: KeyOrder::PerKeyPartitioned {
                partitions: self.inner.options.partitions,
            },
            delayed_redelivery: true,
            native_delayed_delivery: false,
            native_dead_letters: false,
            deduplicates: !self.inner.options.dedup_window.is_zero(),
            request_reply: true,
            // An acknowledgement is an `XACK`: it survives a restart when the server wrote it
            // to its append-only file before answering (decision 0019).
            acks_survive_restart: self.inner.durable_acks,
        }
    }

    fn partition(&self, key: &str) -> Option<u16> {
        // The message id decides only for a message without a key.
        Some(layout::partition(
            Some(key),
            uuid::Uuid::nil(),
            self.inner.options.partitions,
        ))
    }

    async fn provision(&self, channels: &[String]) -> std::result::Result<(), TransportError> {
        let prefix = &self.inner.options.prefix;
        let operation = || format!("provision the streams under `{prefix}`");
        check_channels(operation, channels)?;
        // The streams come with their first entry or group; what must agree is the layout.
        self.check_layout(&operation).await?;
        tracing::debug!(target: TARGET, prefix = %prefix, "layout provisioned");
        Ok(())
    }

    async fn publish(&self, batch: &[Outgoing]) -> Vec<std::result::Result<(), TransportError>> {
        let span = tracing::debug_span!(
            target: TARGET,
            "publish",
            prefix = %self.inner.options.prefix,
            messages = batch.len(),
        );
        self.publish_batch(batch).instrument(span).await
    }

    async fn request(
        &self,
        channel: &str,
        payload: bytes::Bytes,
        timeout: Duration,
    ) -> std::result::Result<bytes::Bytes, TransportError> {
        let operation = || format!("send a request on `{channel}`");
        if let Some(problem) = layout::channel_problem(channel) {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                format!("channel `{channel}` cannot be used: {problem}"),
            ));
        }
        let inner = &self.inner;
        let replies = inner
            .replies
            .get_or_try_init(|| async { rpc::Replies::start(&inner.client, &inner.options) })
            .await
            .map_err(|err| command_error(operation(), err))?;
        replies
            .request(&inner.conn, &inner.options, channel, payload, timeout)
            .await
    }

    async fn serve(
        &self,
        channel: &str,
    ) -> std::result::Result<Box<dyn inseam_core::transport::Requests>, TransportError> {
        let operation = || format!("serve requests on `{channel}`");
        if let Some(problem) = layout::channel_problem(channel) {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                format!("channel `{channel}` cannot be used: {problem}"),
            ));
        }
        let inner = &self.inner;
        let requests =
            rpc::RedisRequests::start(&inner.client, &inner.conn, &inner.options, channel)
                .await
                .map_err(|err| command_error(operation(), err))?;
        Ok(Box::new(requests))
    }

    async fn subscribe(
        &self,
        subscription: &Subscription,
    ) -> std::result::Result<Box<dyn Consumer>, TransportError> {
        let options = &self.inner.options;
        let group = &subscription.group;
        let operation = || format!("subscribe group `{group}`");
        if group.is_empty() {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                "the group name is empty",
            ));
        }
        if subscription.channels.is_empty() {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                "the subscription names no channel",
            ));
        }
        check_channels(operation, &subscription.channels)?;
        if subscription.ack_wait.is_zero() {
            return Err(TransportError::permanent(
                NAME,
                operation(),
                "the ack wait is zero",
            ));
        }
        self.check_layout(&operation).await?;

        // The group's consumer group on every partition, from the beginning: a group new to
        // the server gets what was published before it first subscribed.
        let mut conn = self.inner.conn.clone();
        for partition in 0..options.partitions {
            let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(layout::stream_key(&options.prefix, partition))
                .arg(group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut conn)
                .await;
            match created {
                Ok(_) => {}
                Err(err) if err.code() == Some("BUSYGROUP") => {}
                Err(err) => return Err(command_error(operation(), err)),
            }
        }
        let consumer = RedisConsumer::start(consumer::Setup {
            client: self.inner.client.clone(),
            conn: self.inner.conn.clone(),
            options: options.clone(),
            subscription: subscription.clone(),
        })
        .await
        .map_err(|err| command_error(operation(), err))?;
        Ok(Box::new(consumer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("7.0.15"), Some((7, 0)));
        assert_eq!(parse_version("6.2"), Some((6, 2)));
        assert_eq!(parse_version("unknown"), None);
        assert!(parse_version("6.0.9").is_some_and(|v| v < MIN_VERSION));
        assert!(parse_version("6.2.0").is_some_and(|v| v >= MIN_VERSION));
    }

    #[test]
    fn server_refusals_are_permanent_and_outages_transient() {
        let refused = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
            "WRONGTYPE",
        ));
        assert!(!is_transient(&refused));
        let down = redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        assert!(is_transient(&down));
        let loading = redis::RedisError::from((
            redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading),
            "loading",
        ));
        assert!(is_transient(&loading));
    }
}
