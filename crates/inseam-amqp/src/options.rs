//! How to reach the RabbitMQ servers and how the transport lays out its exchange and queues.

use inseam_core::transport::config::{parse_duration, split_credentials};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{AmqpError, Result};
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

/// The most partitions keys may be spread over: each is a queue per group.
pub const MAX_PARTITIONS: u16 = 1024;

/// The options of an [`Amqp`](crate::Amqp) transport: connection, authentication, TLS, and the
/// layout of its exchange and queues (decision 0020).
///
/// Built in code, from a URL ([`from_url`](Self::from_url)) or from the environment
/// ([`from_env`](Self::from_env)). `Debug` shows everything but the password.
///
/// ```
/// use std::time::Duration;
/// use inseam_amqp::AmqpOptions;
///
/// let options = AmqpOptions::from_url("amqp://alice:s3cret@rabbit-1:5672/shop,amqp://rabbit-2:5672/shop")?
///     .exchange("shop")
///     .partitions(16)
///     .publish_timeout(Duration::from_secs(2));
/// assert!(!format!("{options:?}").contains("s3cret"));
/// assert_eq!(options.server_urls(), ["amqp://rabbit-1:5672/shop", "amqp://rabbit-2:5672/shop"]);
/// # Ok::<(), inseam_amqp::AmqpError>(())
/// ```
#[derive(Clone)]
pub struct AmqpOptions {
    pub(crate) servers: Vec<String>,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<Secret>,
    pub(crate) tls_ca: Option<PathBuf>,
    pub(crate) tls_client: Option<(PathBuf, PathBuf)>,
    pub(crate) client_name: Option<String>,
    pub(crate) connection_timeout: Duration,
    pub(crate) heartbeat: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) exchange: String,
    pub(crate) prefix: String,
    pub(crate) partitions: u16,
    pub(crate) publish_timeout: Duration,
    pub(crate) quorum: bool,
    pub(crate) history: Option<Duration>,
}

impl Default for AmqpOptions {
    /// A server at `amqp://127.0.0.1:5672/%2f`, exchange `inseam`, queues `inseam.*`, 8
    /// partitions, quorum queues.
    fn default() -> Self {
        AmqpOptions {
            servers: vec!["amqp://127.0.0.1:5672/%2f".to_owned()],
            user: None,
            password: None,
            tls_ca: None,
            tls_client: None,
            client_name: None,
            connection_timeout: Duration::from_secs(5),
            heartbeat: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            exchange: "inseam".to_owned(),
            prefix: "inseam".to_owned(),
            partitions: 8,
            publish_timeout: Duration::from_secs(5),
            quorum: true,
            history: Some(Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

impl AmqpOptions {
    /// The defaults (see [`Default`](#impl-Default-for-AmqpOptions)).
    pub fn new() -> Self {
        AmqpOptions::default()
    }

    /// Options for the servers of `urls`, comma-separated (`amqp://a:5672/vhost,amqps://b`; a
    /// bare `host:port` means `amqp://`). The path is the virtual host, percent-encoded as
    /// usual (`%2f` for `/`, the default when there is no path). Credentials in a URL
    /// (`amqp://user:password@host`) are taken out of it into the options, so they are never
    /// shown. `amqps://` connects with TLS.
    pub fn from_url(urls: &str) -> Result<Self> {
        AmqpOptions::default().servers_from_urls("url", urls)
    }

    /// Options from the process's environment; see [`from_env_vars`](Self::from_env_vars).
    pub fn from_env() -> Result<Self> {
        AmqpOptions::from_env_vars(|name| std::env::var(name).ok())
    }

    /// Options from variables read through `var` (an empty value counts as unset):
    ///
    /// | variable | meaning |
    /// | --- | --- |
    /// | `INSEAM_AMQP_URL` | the servers, comma-separated, as for [`from_url`](Self::from_url) (default `amqp://127.0.0.1:5672/%2f`) |
    /// | `INSEAM_AMQP_USER`, `INSEAM_AMQP_PASSWORD` | user and password, together |
    /// | `INSEAM_AMQP_TLS_CA` | a PEM file of root certificates to trust |
    /// | `INSEAM_AMQP_TLS_CERT`, `INSEAM_AMQP_TLS_KEY` | a client certificate and its PKCS#8 key (PEM), together |
    /// | `INSEAM_AMQP_EXCHANGE` | the topic exchange's name |
    /// | `INSEAM_AMQP_PREFIX` | the prefix of the groups' queue names |
    /// | `INSEAM_AMQP_PARTITIONS` | the partition count |
    /// | `INSEAM_AMQP_PUBLISH_TIMEOUT` | how long a publish waits for the server's confirms: `500ms`, `5s`, `1m` |
    ///
    /// ```
    /// use inseam_amqp::AmqpOptions;
    ///
    /// let vars = [
    ///     ("INSEAM_AMQP_URL", "amqp://r1:5672,amqp://r2:5672"),
    ///     ("INSEAM_AMQP_USER", "svc"),
    ///     ("INSEAM_AMQP_PASSWORD", "pa55"),
    ///     ("INSEAM_AMQP_PARTITIONS", "16"),
    /// ];
    /// let options = AmqpOptions::from_env_vars(|name| {
    ///     vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())
    /// })?;
    /// assert_eq!(options.server_urls(), ["amqp://r1:5672", "amqp://r2:5672"]);
    /// assert!(!format!("{options:?}").contains("pa55"));
    /// # Ok::<(), inseam_amqp::AmqpError>(())
    /// ```
    pub fn from_env_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let var = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        let mut options = match var("INSEAM_AMQP_URL") {
            Some(urls) => AmqpOptions::default().servers_from_urls("INSEAM_AMQP_URL", &urls)?,
            None => AmqpOptions::default(),
        };
        match (var("INSEAM_AMQP_USER"), var("INSEAM_AMQP_PASSWORD")) {
            (Some(user), Some(password)) => options = options.user_and_password(user, password),
            (None, None) => {}
            (Some(_), None) => {
                return Err(AmqpError::config(
                    "INSEAM_AMQP_USER",
                    "set without INSEAM_AMQP_PASSWORD",
                ));
            }
            (None, Some(_)) => {
                return Err(AmqpError::config(
                    "INSEAM_AMQP_PASSWORD",
                    "set without INSEAM_AMQP_USER",
                ));
            }
        }
        if let Some(path) = var("INSEAM_AMQP_TLS_CA") {
            options = options.tls_root_certificates(path);
        }
        match (var("INSEAM_AMQP_TLS_CERT"), var("INSEAM_AMQP_TLS_KEY")) {
            (Some(cert), Some(key)) => options = options.tls_client_certificate(cert, key),
            (None, None) => {}
            (Some(_), None) => {
                return Err(AmqpError::config(
                    "INSEAM_AMQP_TLS_CERT",
                    "set without INSEAM_AMQP_TLS_KEY",
                ));
            }
            (None, Some(_)) => {
                return Err(AmqpError::config(
                    "INSEAM_AMQP_TLS_KEY",
                    "set without INSEAM_AMQP_TLS_CERT",
                ));
            }
        }
        if let Some(exchange) = var("INSEAM_AMQP_EXCHANGE") {
            options = options.exchange(exchange.trim());
        }
        if let Some(prefix) = var("INSEAM_AMQP_PREFIX") {
            options = options.prefix(prefix.trim());
        }
        if let Some(value) = var("INSEAM_AMQP_PARTITIONS") {
            let partitions = value.trim().parse().map_err(|_| {
                AmqpError::config(
                    "INSEAM_AMQP_PARTITIONS",
                    format!("`{value}` is not a number from 1 to {MAX_PARTITIONS}"),
                )
            })?;
            options = options.partitions(partitions);
        }
        if let Some(value) = var("INSEAM_AMQP_PUBLISH_TIMEOUT") {
            let timeout = parse_duration(&value).ok_or_else(|| {
                AmqpError::config(
                    "INSEAM_AMQP_PUBLISH_TIMEOUT",
                    format!("`{value}` is not a duration such as `500ms`, `5s` or `1m`"),
                )
            })?;
            options = options.publish_timeout(timeout);
        }
        options.validate()?;
        Ok(options)
    }

    fn servers_from_urls(mut self, option: &str, urls: &str) -> Result<Self> {
        let mut servers = Vec::new();
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let (server, auth) = split_credentials(url, "amqp");
            if let Some(auth) = auth {
                let (user, password) = match auth.split_once(':') {
                    Some((user, password)) => (
                        Some(percent_decode(user)),
                        Some(Secret(percent_decode(password))),
                    ),
                    None => (Some(percent_decode(auth)), Some(Secret(String::new()))),
                };
                if self.user.is_some() && (self.user != user || self.password != password) {
                    return Err(AmqpError::config(
                        option,
                        "the URLs carry different credentials; give one set of credentials",
                    ));
                }
                self.user = user;
                self.password = password;
            }
            if let Err(problem) = server.parse::<lapin::uri::AMQPUri>() {
                return Err(AmqpError::config(
                    option,
                    format!("`{server}` is not an AMQP URL: {problem}"),
                ));
            }
            servers.push(server);
        }
        if servers.is_empty() {
            return Err(AmqpError::config(option, "no server URL"));
        }
        self.servers = servers;
        Ok(self)
    }

    /// The servers to connect to, tried in order (replaces the list). A URL's credentials are
    /// taken out of it, as with [`from_url`](Self::from_url).
    pub fn servers(self, urls: impl IntoIterator<Item = impl AsRef<str>>) -> Result<Self> {
        let joined: Vec<String> = urls.into_iter().map(|u| u.as_ref().to_owned()).collect();
        self.servers_from_urls("servers", &joined.join(","))
    }

    /// The server URLs, without credentials.
    pub fn server_urls(&self) -> &[String] {
        &self.servers
    }

    /// Authenticates with a user and a password (AMQP PLAIN).
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.user = Some(user.into());
        self.password = Some(Secret(password.into()));
        self
    }

    /// Trusts the root certificates of a PEM file (for a server with a private CA), for
    /// `amqps://` servers.
    pub fn tls_root_certificates(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(path.into());
        self
    }

    /// Presents a client certificate and its PKCS#8 key (PEM files), for servers that verify
    /// clients.
    pub fn tls_client_certificate(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.tls_client = Some((cert.into(), key.into()));
        self
    }

    /// The connection name the server shows in its connection list.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = Some(name.into());
        self
    }

    /// How long connecting to one server may take (default 5 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// The AMQP heartbeat asked of the server; a connection silent for two of them counts as
    /// lost (default 10 s).
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.heartbeat = interval;
        self
    }

    /// How long a declaration (the exchange, a group's queues and bindings) may take
    /// (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The topic exchange messages are published to (default `inseam`).
    pub fn exchange(mut self, name: impl Into<String>) -> Self {
        self.exchange = name.into();
        self
    }

    /// The prefix of the groups' queue names: `<prefix>.<group>.<partition>` (default
    /// `inseam`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How many partitions keys are spread over (default 8, at most [`MAX_PARTITIONS`]): at
    /// most this many messages of a group are in flight at once, one per partition, and a
    /// group has a queue per partition. Every publisher and consumer of an exchange must use
    /// the same count.
    pub fn partitions(mut self, partitions: u16) -> Self {
        self.partitions = partitions;
        self
    }

    /// How long a publish waits for the server's confirms of a batch before its messages fail
    /// with a transient error (default 5 s).
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Whether the groups' queues are quorum queues (default, RabbitMQ 3.8 and later: the
    /// attempt count comes from the server) or classic durable queues (for a server without
    /// quorum queues: a redelivered message then counts as a second attempt, however many
    /// times it came). A queue keeps the type it was declared with.
    pub fn quorum_queues(mut self, quorum: bool) -> Self {
        self.quorum = quorum;
        self
    }

    /// How long the history stream keeps messages (default 7 days), or `None` for no
    /// history stream.
    ///
    /// RabbitMQ keeps a message only for the queues bound when it was published. So that a
    /// group new to the server gets the messages published before its first subscription
    /// (as inseam expects: a publishing process may start, and commit events, before the
    /// consuming one), every message also goes to a stream, and a group's first subscription
    /// copies the stream's messages of its channels into queues it reads first (decision
    /// 0020). Without a history, a new group gets only what is published after its first
    /// subscription; with one, only what the stream still has. Every process of an exchange
    /// must use the same setting: the stream keeps the age it was declared with.
    pub fn history(mut self, max_age: Option<Duration>) -> Self {
        self.history = max_age;
        self
    }

    /// Checks the options against each other and RabbitMQ's naming rules.
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(problem) = layout::name_problem(&self.exchange) {
            return Err(AmqpError::config(
                "exchange",
                format!("`{}` is not an exchange name: {problem}", self.exchange),
            ));
        }
        if let Some(problem) = layout::name_problem(&self.prefix) {
            return Err(AmqpError::config(
                "prefix",
                format!("`{}` is not a queue name prefix: {problem}", self.prefix),
            ));
        }
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return Err(AmqpError::config(
                "partitions",
                format!("{} is not from 1 to {MAX_PARTITIONS}", self.partitions),
            ));
        }
        if self.publish_timeout.is_zero() {
            return Err(AmqpError::config("publish_timeout", "it is zero"));
        }
        if self.request_timeout.is_zero() {
            return Err(AmqpError::config("request_timeout", "it is zero"));
        }
        if self.servers.is_empty() {
            return Err(AmqpError::config("servers", "no server URL"));
        }
        if self.history.is_some_and(|age| age.as_secs() == 0) {
            return Err(AmqpError::config("history", "it is shorter than a second"));
        }
        Ok(())
    }
}

impl fmt::Debug for AmqpOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpOptions")
            .field("servers", &self.servers)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("tls_ca", &self.tls_ca)
            .field("tls_client", &self.tls_client)
            .field("client_name", &self.client_name)
            .field("connection_timeout", &self.connection_timeout)
            .field("heartbeat", &self.heartbeat)
            .field("request_timeout", &self.request_timeout)
            .field("exchange", &self.exchange)
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .field("publish_timeout", &self.publish_timeout)
            .field("quorum", &self.quorum)
            .field("history", &self.history)
            .finish()
    }
}

/// Decodes `%XX` escapes; a value with a broken escape is kept as it is.
pub(crate) fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let Some(byte) = value
                .get(i + 1..i + 3)
                .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            else {
                return value.to_owned();
            };
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap_or_else(|_| value.to_owned())
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
        let options = AmqpOptions::new().user_and_password("alice", "pa55word-secret");
        let shown = format!("{options:?}");
        assert!(!shown.contains("pa55word-secret"), "{shown}");
        assert!(shown.contains("alice"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");

        let options = AmqpOptions::from_url("amqp://bob:hunter2-secret@h1:5672/%2f").unwrap();
        let shown = format!("{options:#?}");
        assert!(!shown.contains("hunter2-secret"), "{shown}");
        assert_eq!(options.server_urls(), ["amqp://h1:5672/%2f"]);
        assert_eq!(
            options.password.as_ref().map(Secret::expose),
            Some("hunter2-secret")
        );
    }

    #[test]
    fn urls_split_into_servers_and_credentials() {
        let options =
            AmqpOptions::from_url(" amqp://u:p%40ss@a:5672/v , b:5673,amqps://u:p%40ss@c:5671/ ")
                .unwrap();
        assert_eq!(
            options.server_urls(),
            ["amqp://a:5672/v", "amqp://b:5673", "amqps://c:5671/"]
        );
        assert_eq!(options.user.as_deref(), Some("u"));
        assert_eq!(options.password.as_ref().map(Secret::expose), Some("p@ss"));
        let err = AmqpOptions::from_url("amqp://u:p@a,amqp://v:q@b").unwrap_err();
        assert!(err.to_string().contains("different credentials"), "{err}");
        assert!(AmqpOptions::from_url(" , ").is_err());
        assert!(AmqpOptions::from_url("http://a:80").is_err());
    }

    #[test]
    fn environment_variables_fill_every_option() {
        let options = AmqpOptions::from_env_vars(vars(&[
            (
                "INSEAM_AMQP_URL",
                "amqps://r1:5671/shop,amqps://r2:5671/shop",
            ),
            ("INSEAM_AMQP_USER", "svc"),
            ("INSEAM_AMQP_PASSWORD", "pw-secret"),
            ("INSEAM_AMQP_TLS_CA", "/etc/ca.pem"),
            ("INSEAM_AMQP_TLS_CERT", "/etc/c.pem"),
            ("INSEAM_AMQP_TLS_KEY", "/etc/k.pem"),
            ("INSEAM_AMQP_EXCHANGE", "shop.events"),
            ("INSEAM_AMQP_PREFIX", "shop"),
            ("INSEAM_AMQP_PARTITIONS", "16"),
            ("INSEAM_AMQP_PUBLISH_TIMEOUT", "750ms"),
        ]))
        .unwrap();
        assert_eq!(
            options.server_urls(),
            ["amqps://r1:5671/shop", "amqps://r2:5671/shop"]
        );
        assert_eq!(options.user.as_deref(), Some("svc"));
        assert_eq!(options.tls_ca, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(
            options.tls_client,
            Some((PathBuf::from("/etc/c.pem"), PathBuf::from("/etc/k.pem")))
        );
        assert_eq!(options.exchange, "shop.events");
        assert_eq!(options.prefix, "shop");
        assert_eq!(options.partitions, 16);
        assert_eq!(options.publish_timeout, Duration::from_millis(750));
        assert!(!format!("{options:?}").contains("pw-secret"));

        let options = AmqpOptions::from_env_vars(vars(&[("INSEAM_AMQP_USER", "")])).unwrap();
        assert_eq!(options.server_urls(), ["amqp://127.0.0.1:5672/%2f"]);
        assert_eq!(options.user, None);
    }

    #[test]
    fn contradicting_environments_are_refused_by_name() {
        for (pairs, named) in [
            (vec![("INSEAM_AMQP_USER", "u")], "INSEAM_AMQP_USER"),
            (vec![("INSEAM_AMQP_PASSWORD", "p")], "INSEAM_AMQP_PASSWORD"),
            (vec![("INSEAM_AMQP_TLS_KEY", "k")], "INSEAM_AMQP_TLS_KEY"),
            (vec![("INSEAM_AMQP_PARTITIONS", "0")], "partitions"),
            (vec![("INSEAM_AMQP_PARTITIONS", "2000")], "partitions"),
            (
                vec![("INSEAM_AMQP_PARTITIONS", "many")],
                "INSEAM_AMQP_PARTITIONS",
            ),
            (vec![("INSEAM_AMQP_EXCHANGE", "amq.topic")], "exchange"),
            (vec![("INSEAM_AMQP_PREFIX", "a b")], "prefix"),
            (
                vec![("INSEAM_AMQP_PUBLISH_TIMEOUT", "soon")],
                "INSEAM_AMQP_PUBLISH_TIMEOUT",
            ),
            (vec![("INSEAM_AMQP_URL", "ftp://x")], "INSEAM_AMQP_URL"),
        ] {
            let err = AmqpOptions::from_env_vars(vars(&pairs)).unwrap_err();
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
