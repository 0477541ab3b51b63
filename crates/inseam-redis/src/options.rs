//! How to reach the Redis server and how the transport lays out its streams.

use inseam_core::transport::config::parse_duration;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{RedisError, Result};
use crate::layout;

/// A secret (password): kept out of `Debug` and of logs.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl Secret {
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The options of a [`Redis`](crate::Redis) transport: connection, authentication, TLS, and
/// the streams' layout (decision 0019).
///
/// Built in code, from a URL ([`from_url`](Self::from_url)) or from the environment
/// ([`from_env`](Self::from_env)). `Debug` shows everything but the password.
///
/// ```
/// use std::time::Duration;
/// use inseam_redis::RedisOptions;
///
/// let options = RedisOptions::from_url("redis://app:s3cret@redis-1:6379/2")?
///     .prefix("shop")
///     .partitions(16)
///     .publish_timeout(Duration::from_secs(2));
/// assert!(!format!("{options:?}").contains("s3cret"));
/// assert_eq!(options.server_url(), "redis://redis-1:6379/2");
/// # Ok::<(), inseam_redis::RedisError>(())
/// ```
#[derive(Clone)]
pub struct RedisOptions {
    pub(crate) url: String,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<Secret>,
    pub(crate) tls_ca: Option<PathBuf>,
    pub(crate) tls_client: Option<(PathBuf, PathBuf)>,
    pub(crate) connection_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) prefix: String,
    pub(crate) partitions: u16,
    pub(crate) publish_timeout: Duration,
    pub(crate) dedup_window: Duration,
    pub(crate) max_len: Option<u64>,
    pub(crate) trim_acknowledged: bool,
    pub(crate) lease_ttl: Duration,
    pub(crate) durable_acks: Option<bool>,
}

/// The most partitions the streams may be laid out in: each is a stream, and a lease and a
/// connection per consumer.
pub const MAX_PARTITIONS: u16 = 256;

impl Default for RedisOptions {
    /// A server at `redis://127.0.0.1:6379`, keys under `inseam:`, 8 partitions.
    fn default() -> Self {
        RedisOptions {
            url: "redis://127.0.0.1:6379".to_owned(),
            username: None,
            password: None,
            tls_ca: None,
            tls_client: None,
            connection_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            prefix: "inseam".to_owned(),
            partitions: 8,
            publish_timeout: Duration::from_secs(5),
            dedup_window: Duration::from_secs(120),
            max_len: None,
            trim_acknowledged: false,
            lease_ttl: Duration::from_secs(5),
            durable_acks: None,
        }
    }
}

impl RedisOptions {
    /// The defaults (see [`Default`](#impl-Default-for-RedisOptions)).
    pub fn new() -> Self {
        RedisOptions::default()
    }

    /// Options for the server of `url` (`redis://host:port/db`, `rediss://` for TLS; a bare
    /// `host:port` means `redis://`). Credentials in the URL (`redis://user:password@host`,
    /// or `redis://:password@host`) are taken out of it into the options, so they are never
    /// shown. One server: the transport does not speak Redis Cluster or Sentinel.
    pub fn from_url(url: &str) -> Result<Self> {
        RedisOptions::default().server_from_url("url", url)
    }

    /// Options from the process's environment; see [`from_env_vars`](Self::from_env_vars).
    pub fn from_env() -> Result<Self> {
        RedisOptions::from_env_vars(|name| std::env::var(name).ok())
    }

    /// Options from variables read through `var` (an empty value counts as unset):
    ///
    /// | variable | meaning |
    /// | --- | --- |
    /// | `INSEAM_REDIS_URL` | the server, as for [`from_url`](Self::from_url) (default `redis://127.0.0.1:6379`) |
    /// | `INSEAM_REDIS_USERNAME`, `INSEAM_REDIS_PASSWORD` | an ACL user and its password; the password alone for `requirepass` |
    /// | `INSEAM_REDIS_TLS_CA` | a PEM file of root certificates to trust (`rediss://`) |
    /// | `INSEAM_REDIS_TLS_CERT`, `INSEAM_REDIS_TLS_KEY` | a client certificate and its key, together |
    /// | `INSEAM_REDIS_PREFIX` | the key prefix |
    /// | `INSEAM_REDIS_PARTITIONS` | the partition count |
    /// | `INSEAM_REDIS_PUBLISH_TIMEOUT` | how long a publish waits for the server: `500ms`, `5s`, `1m` |
    /// | `INSEAM_REDIS_MAX_LEN` | a hard bound on each partition stream's length (see [`max_len`](Self::max_len)) |
    /// | `INSEAM_REDIS_TRIM_ACKNOWLEDGED` | `true` to trim what every group acknowledged |
    ///
    /// ```
    /// use inseam_redis::RedisOptions;
    ///
    /// let vars = [
    ///     ("INSEAM_REDIS_URL", "rediss://cache.internal:6380"),
    ///     ("INSEAM_REDIS_PASSWORD", "pa55"),
    ///     ("INSEAM_REDIS_PARTITIONS", "16"),
    /// ];
    /// let options = RedisOptions::from_env_vars(|name| {
    ///     vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())
    /// })?;
    /// assert_eq!(options.server_url(), "rediss://cache.internal:6380");
    /// assert!(!format!("{options:?}").contains("pa55"));
    /// # Ok::<(), inseam_redis::RedisError>(())
    /// ```
    pub fn from_env_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let var = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        let mut options = match var("INSEAM_REDIS_URL") {
            Some(url) => RedisOptions::default().server_from_url("INSEAM_REDIS_URL", &url)?,
            None => RedisOptions::default(),
        };
        match (var("INSEAM_REDIS_USERNAME"), var("INSEAM_REDIS_PASSWORD")) {
            (Some(user), Some(password)) => options = options.user_and_password(user, password),
            (None, Some(password)) => options = options.password(password),
            (None, None) => {}
            (Some(_), None) => {
                return Err(RedisError::config(
                    "INSEAM_REDIS_USERNAME",
                    "set without INSEAM_REDIS_PASSWORD",
                ));
            }
        }
        if let Some(path) = var("INSEAM_REDIS_TLS_CA") {
            options = options.tls_root_certificates(path);
        }
        match (var("INSEAM_REDIS_TLS_CERT"), var("INSEAM_REDIS_TLS_KEY")) {
            (Some(cert), Some(key)) => options = options.tls_client_certificate(cert, key),
            (None, None) => {}
            (Some(_), None) => {
                return Err(RedisError::config(
                    "INSEAM_REDIS_TLS_CERT",
                    "set without INSEAM_REDIS_TLS_KEY",
                ));
            }
            (None, Some(_)) => {
                return Err(RedisError::config(
                    "INSEAM_REDIS_TLS_KEY",
                    "set without INSEAM_REDIS_TLS_CERT",
                ));
            }
        }
        if let Some(prefix) = var("INSEAM_REDIS_PREFIX") {
            options = options.prefix(prefix.trim());
        }
        if let Some(value) = var("INSEAM_REDIS_PARTITIONS") {
            let partitions = value.trim().parse().map_err(|_| {
                RedisError::config(
                    "INSEAM_REDIS_PARTITIONS",
                    format!("`{value}` is not a number from 1 to {MAX_PARTITIONS}"),
                )
            })?;
            options = options.partitions(partitions);
        }
        if let Some(value) = var("INSEAM_REDIS_PUBLISH_TIMEOUT") {
            let timeout = parse_duration(&value).ok_or_else(|| {
                RedisError::config(
                    "INSEAM_REDIS_PUBLISH_TIMEOUT",
                    format!("`{value}` is not a duration such as `500ms`, `5s` or `1m`"),
                )
            })?;
            options = options.publish_timeout(timeout);
        }
        if let Some(value) = var("INSEAM_REDIS_MAX_LEN") {
            let max_len = value.trim().parse().map_err(|_| {
                RedisError::config(
                    "INSEAM_REDIS_MAX_LEN",
                    format!("`{value}` is not a number of entries"),
                )
            })?;
            options = options.max_len(max_len);
        }
        if let Some(value) = var("INSEAM_REDIS_TRIM_ACKNOWLEDGED") {
            let trim = parse_bool(&value).ok_or_else(|| {
                RedisError::config(
                    "INSEAM_REDIS_TRIM_ACKNOWLEDGED",
                    format!("`{value}` is not `true` or `false`"),
                )
            })?;
            options = options.trim_acknowledged(trim);
        }
        options.validate()?;
        Ok(options)
    }

    fn server_from_url(mut self, option: &str, url: &str) -> Result<Self> {
        let url = url.trim();
        if url.is_empty() {
            return Err(RedisError::config(option, "no server URL"));
        }
        if url.contains(',') {
            return Err(RedisError::config(
                option,
                "several URLs: the transport talks to one Redis server (no Cluster or Sentinel)",
            ));
        }
        let (scheme, rest) = match url.split_once("://") {
            Some((scheme, rest)) => (scheme, rest),
            None => ("redis", url),
        };
        if !matches!(scheme, "redis" | "rediss") {
            return Err(RedisError::config(
                option,
                format!("`{scheme}://` is not `redis://` or `rediss://`"),
            ));
        }
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        let host = match authority.rsplit_once('@') {
            Some((auth, host)) => {
                let (user, password) = match auth.split_once(':') {
                    Some((user, password)) => (percent_decode(user), percent_decode(password)),
                    None => (percent_decode(auth), String::new()),
                };
                self.username = (!user.is_empty()).then_some(user);
                self.password = (!password.is_empty()).then_some(Secret(password));
                host
            }
            None => authority,
        };
        if host.is_empty() {
            return Err(RedisError::config(option, "the URL names no host"));
        }
        self.url = format!("{scheme}://{host}{path}");
        Ok(self)
    }

    /// The server (replaces the one set). The URL's credentials are taken out of it, as with
    /// [`from_url`](Self::from_url).
    pub fn server(self, url: &str) -> Result<Self> {
        self.server_from_url("server", url)
    }

    /// The server URL, without credentials.
    pub fn server_url(&self) -> &str {
        &self.url
    }

    /// Authenticates as an ACL user with its password.
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.username = Some(user.into());
        self.password = Some(Secret(password.into()));
        self
    }

    /// Authenticates with a password only (`requirepass`, or the `default` user).
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.username = None;
        self.password = Some(Secret(password.into()));
        self
    }

    /// Trusts the root certificates of a PEM file (for a `rediss://` server with a private
    /// CA); without it, the system's roots.
    pub fn tls_root_certificates(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(path.into());
        self
    }

    /// Presents a client certificate and its key (PEM files), for servers that verify clients.
    pub fn tls_client_certificate(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.tls_client = Some((cert.into(), key.into()));
        self
    }

    /// How long connecting may take (default 5 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How long one command (an acknowledgement, a claim) may wait for its answer before it
    /// fails as transient (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The prefix of every key the transport uses (default `inseam`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How many partitions keys are spread over (default 8, at most [`MAX_PARTITIONS`]): at
    /// most this many messages of a group are in flight at once, one per partition. Every
    /// publisher and consumer of a prefix must use the same count; the first to provision
    /// records it and the others check it.
    pub fn partitions(mut self, partitions: u16) -> Self {
        self.partitions = partitions;
        self
    }

    /// How long a publish waits for the server to store a batch before its messages fail with
    /// a transient error (default 5 s).
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// How long a published message id is remembered to drop a second publish of it (default
    /// 2 min); zero turns deduplication off.
    pub fn dedup_window(mut self, window: Duration) -> Self {
        self.dedup_window = window;
        self
    }

    /// A hard bound on each partition stream's length (`XADD ... MAXLEN ~`), default none.
    /// It bounds memory whatever the consumers do, at a cost: a group more than this many
    /// entries behind loses the oldest ones. The transport logs an error for each message it
    /// finds gone from a group's pending list; entries a group never read vanish without a
    /// trace. Prefer [`trim_acknowledged`](Self::trim_acknowledged) (see decision 0019).
    pub fn max_len(mut self, entries: u64) -> Self {
        self.max_len = Some(entries);
        self
    }

    /// Trims from each partition stream what every group of the stream has acknowledged
    /// (`XTRIM ... MINID`), at most once a second per partition (default off). It never removes
    /// a message a known group has not acknowledged, but a group that subscribes for the first
    /// time afterwards starts at the oldest entry kept rather than at the beginning, and a
    /// group that stopped consuming for good keeps everything after its position until it is
    /// removed (`XGROUP DESTROY`).
    pub fn trim_acknowledged(mut self, trim: bool) -> Self {
        self.trim_acknowledged = trim;
        self
    }

    /// How long a consumer's hold on a partition lasts without renewal (default 5 s). It is
    /// renewed three times per period; a consumer that dies without letting go holds its
    /// partitions this long, after which its unsettled message goes to another consumer
    /// once it has been pending for the subscription's ack wait.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Whether the transport declares `acks_survive_restart`. By default it asks the server at
    /// connect time: yes when it runs with `appendonly yes` and `appendfsync always`, no
    /// otherwise or when it refuses `CONFIG GET` (a managed Redis). Set it for a server whose
    /// persistence you know.
    pub fn durable_acks(mut self, durable: bool) -> Self {
        self.durable_acks = Some(durable);
        self
    }

    /// Checks the options against each other.
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(problem) = layout::prefix_problem(&self.prefix) {
            return Err(RedisError::config(
                "prefix",
                format!("`{}` is not a key prefix: {problem}", self.prefix),
            ));
        }
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return Err(RedisError::config(
                "partitions",
                format!("{} is not from 1 to {MAX_PARTITIONS}", self.partitions),
            ));
        }
        for (name, value) in [
            ("publish_timeout", self.publish_timeout),
            ("request_timeout", self.request_timeout),
            ("connection_timeout", self.connection_timeout),
        ] {
            if value.is_zero() {
                return Err(RedisError::config(name, "it is zero"));
            }
        }
        if self.lease_ttl < Duration::from_millis(300) {
            return Err(RedisError::config("lease_ttl", "it is below 300 ms"));
        }
        if self.max_len == Some(0) {
            return Err(RedisError::config("max_len", "it is zero"));
        }
        let tls = self.url.starts_with("rediss://");
        if !tls && (self.tls_ca.is_some() || self.tls_client.is_some()) {
            return Err(RedisError::config(
                "tls",
                "TLS files are given but the URL is not `rediss://`",
            ));
        }
        Ok(())
    }
}

impl fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisOptions")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("tls_ca", &self.tls_ca)
            .field("tls_client", &self.tls_client)
            .field("connection_timeout", &self.connection_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .field("publish_timeout", &self.publish_timeout)
            .field("dedup_window", &self.dedup_window)
            .field("max_len", &self.max_len)
            .field("trim_acknowledged", &self.trim_acknowledged)
            .field("lease_ttl", &self.lease_ttl)
            .field("durable_acks", &self.durable_acks)
            .finish()
    }
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| value.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match decoded {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| value.to_owned())
}

fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn debug_redacts_the_password() {
        let options = RedisOptions::new().user_and_password("alice", "pa55word-secret");
        let shown = format!("{options:?}");
        assert!(!shown.contains("pa55word-secret"), "{shown}");
        assert!(shown.contains("alice"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");

        let options = RedisOptions::from_url("redis://bob:hunter2-secret@h1:6379/3").unwrap();
        let shown = format!("{options:#?}");
        assert!(!shown.contains("hunter2-secret"), "{shown}");
        assert_eq!(options.server_url(), "redis://h1:6379/3");
        assert_eq!(options.username.as_deref(), Some("bob"));

        let options = RedisOptions::from_url("rediss://:only%40pass@h2").unwrap();
        assert!(!format!("{options:?}").contains("only@pass"));
        assert_eq!(options.username, None);
        assert_eq!(
            options.password.as_ref().map(Secret::expose),
            Some("only@pass")
        );
        assert_eq!(options.server_url(), "rediss://h2");
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            RedisOptions::from_url(" 10.0.0.1:6380 ")
                .unwrap()
                .server_url(),
            "redis://10.0.0.1:6380"
        );
        for (url, problem) in [
            ("", "no server URL"),
            ("redis://a,redis://b", "several URLs"),
            ("http://a:6379", "is not `redis://`"),
            ("redis://u:p@", "no host"),
        ] {
            let err = RedisOptions::from_url(url).unwrap_err().to_string();
            assert!(err.contains(problem), "{url}: {err}");
        }
    }

    #[test]
    fn environment_variables_fill_every_option() {
        let options = RedisOptions::from_env_vars(vars(&[
            ("INSEAM_REDIS_URL", "rediss://r1:6380/1"),
            ("INSEAM_REDIS_USERNAME", "svc"),
            ("INSEAM_REDIS_PASSWORD", "pw-secret"),
            ("INSEAM_REDIS_TLS_CA", "/etc/ca.pem"),
            ("INSEAM_REDIS_TLS_CERT", "/etc/c.pem"),
            ("INSEAM_REDIS_TLS_KEY", "/etc/k.pem"),
            ("INSEAM_REDIS_PREFIX", "shop"),
            ("INSEAM_REDIS_PARTITIONS", "16"),
            ("INSEAM_REDIS_PUBLISH_TIMEOUT", "750ms"),
            ("INSEAM_REDIS_MAX_LEN", "100000"),
            ("INSEAM_REDIS_TRIM_ACKNOWLEDGED", "yes"),
        ]))
        .unwrap();
        assert_eq!(options.server_url(), "rediss://r1:6380/1");
        assert_eq!(options.username.as_deref(), Some("svc"));
        assert_eq!(
            options.password.as_ref().map(Secret::expose),
            Some("pw-secret")
        );
        assert_eq!(options.tls_ca, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(
            options.tls_client,
            Some((PathBuf::from("/etc/c.pem"), PathBuf::from("/etc/k.pem")))
        );
        assert_eq!(options.prefix, "shop");
        assert_eq!(options.partitions, 16);
        assert_eq!(options.publish_timeout, Duration::from_millis(750));
        assert_eq!(options.max_len, Some(100_000));
        assert!(options.trim_acknowledged);
        assert!(!format!("{options:?}").contains("pw-secret"));

        let options =
            RedisOptions::from_env_vars(vars(&[("INSEAM_REDIS_PARTITIONS", "")])).unwrap();
        assert_eq!(options.server_url(), "redis://127.0.0.1:6379");
        assert_eq!(options.partitions, 8);
        assert!(!options.trim_acknowledged);
    }

    #[test]
    fn contradicting_environments_are_refused_by_name() {
        for (pairs, named) in [
            (
                vec![("INSEAM_REDIS_USERNAME", "u")],
                "INSEAM_REDIS_USERNAME",
            ),
            (vec![("INSEAM_REDIS_TLS_KEY", "k")], "INSEAM_REDIS_TLS_KEY"),
            (
                vec![
                    ("INSEAM_REDIS_TLS_CA", "/ca.pem"),
                    ("INSEAM_REDIS_URL", "redis://h"),
                ],
                "tls",
            ),
            (vec![("INSEAM_REDIS_PARTITIONS", "0")], "partitions"),
            (vec![("INSEAM_REDIS_PARTITIONS", "257")], "partitions"),
            (
                vec![("INSEAM_REDIS_PARTITIONS", "many")],
                "INSEAM_REDIS_PARTITIONS",
            ),
            (vec![("INSEAM_REDIS_PREFIX", "a b")], "prefix"),
            (vec![("INSEAM_REDIS_MAX_LEN", "-1")], "INSEAM_REDIS_MAX_LEN"),
            (vec![("INSEAM_REDIS_MAX_LEN", "0")], "max_len"),
            (
                vec![("INSEAM_REDIS_TRIM_ACKNOWLEDGED", "maybe")],
                "INSEAM_REDIS_TRIM_ACKNOWLEDGED",
            ),
            (
                vec![("INSEAM_REDIS_PUBLISH_TIMEOUT", "soon")],
                "INSEAM_REDIS_PUBLISH_TIMEOUT",
            ),
        ] {
            let err = RedisOptions::from_env_vars(vars(&pairs)).unwrap_err();
            assert!(err.to_string().contains(named), "{named}: {err}");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("2h"), None);
        assert_eq!(parse_duration("ms"), None);
    }
}
