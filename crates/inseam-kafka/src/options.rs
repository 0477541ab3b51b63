//! How to reach the Kafka brokers and how the transport lays out its topic.

use inseam_core::transport::config::parse_duration;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use rdkafka::ClientConfig;

use crate::error::{KafkaError, Result};
use crate::layout;

/// A secret (a password): kept out of `Debug` and of logs.
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

/// The SASL mechanisms the transport can authenticate with (built into librdkafka).
const SASL_MECHANISMS: [&str; 3] = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"];

/// The most partitions the topic may be laid out in.
pub const MAX_PARTITIONS: u16 = 1024;

/// The options of a [`Kafka`](crate::Kafka) transport: brokers, authentication, TLS, and the
/// topic's layout (decision 0021).
///
/// Built in code, from a URL ([`from_url`](Self::from_url)) or from the environment
/// ([`from_env`](Self::from_env)). `Debug` shows everything but the password (and the values
/// of librdkafka settings that look secret).
///
/// ```
/// use std::time::Duration;
/// use inseam_kafka::KafkaOptions;
///
/// let options = KafkaOptions::from_url("kafka://alice:s3cret@kafka-1:9092,kafka-2:9092")?
///     .topic("shop")
///     .partitions(16)
///     .publish_timeout(Duration::from_secs(2));
/// assert_eq!(options.broker_list(), ["kafka-1:9092", "kafka-2:9092"]);
/// assert!(!format!("{options:?}").contains("s3cret"));
/// # Ok::<(), inseam_kafka::KafkaError>(())
/// ```
#[derive(Clone)]
pub struct KafkaOptions {
    pub(crate) brokers: Vec<String>,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<Secret>,
    pub(crate) sasl_mechanism: String,
    pub(crate) tls: bool,
    pub(crate) tls_ca: Option<PathBuf>,
    pub(crate) tls_client: Option<(PathBuf, PathBuf)>,
    pub(crate) client_id: String,
    pub(crate) topic: String,
    pub(crate) partitions: u16,
    pub(crate) replication: u16,
    pub(crate) publish_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) session_timeout: Duration,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) instance_id: Option<String>,
    pub(crate) fetch_wait: Option<Duration>,
    pub(crate) extra: Vec<(String, Secret)>,
}

impl Default for KafkaOptions {
    /// A broker at `127.0.0.1:9092`, topic `inseam` with 8 partitions, replication 1.
    fn default() -> Self {
        KafkaOptions {
            brokers: vec!["127.0.0.1:9092".to_owned()],
            user: None,
            password: None,
            sasl_mechanism: "PLAIN".to_owned(),
            tls: false,
            tls_ca: None,
            tls_client: None,
            client_id: "inseam".to_owned(),
            topic: "inseam".to_owned(),
            partitions: 8,
            replication: 1,
            publish_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            session_timeout: Duration::from_secs(20),
            heartbeat_interval: Duration::from_secs(1),
            instance_id: None,
            fetch_wait: None,
            extra: Vec::new(),
        }
    }
}

impl KafkaOptions {
    /// The defaults (see [`Default`](#impl-Default-for-KafkaOptions)).
    pub fn new() -> Self {
        KafkaOptions::default()
    }

    /// Options for the brokers of `urls`, comma-separated: `kafka://host:port` (plaintext),
    /// `kafka+ssl://host:port` or `kafkas://host:port` (TLS), or a bare `host:port`; the port
    /// defaults to 9092. Credentials in a URL (`kafka://user:password@host`) are taken out
    /// of it into the options (SASL, `PLAIN` unless another mechanism is set), so they are
    /// never shown.
    pub fn from_url(urls: &str) -> Result<Self> {
        KafkaOptions::default().brokers_from_urls("url", urls)
    }

    /// Options from the process's environment; see [`from_env_vars`](Self::from_env_vars).
    pub fn from_env() -> Result<Self> {
        KafkaOptions::from_env_vars(|name| std::env::var(name).ok())
    }

    /// Options from variables read through `var` (an empty value counts as unset):
    ///
    /// | variable | meaning |
    /// | --- | --- |
    /// | `INSEAM_KAFKA_URL` | the brokers, comma-separated, as for [`from_url`](Self::from_url) (default `127.0.0.1:9092`) |
    /// | `INSEAM_KAFKA_USER`, `INSEAM_KAFKA_PASSWORD` | SASL user and password, together |
    /// | `INSEAM_KAFKA_SASL_MECHANISM` | `PLAIN` (default), `SCRAM-SHA-256` or `SCRAM-SHA-512` |
    /// | `INSEAM_KAFKA_TLS` | `true` or `false`: connect with TLS |
    /// | `INSEAM_KAFKA_TLS_CA` | a PEM file of CA certificates to trust (implies TLS) |
    /// | `INSEAM_KAFKA_TLS_CERT`, `INSEAM_KAFKA_TLS_KEY` | a client certificate and its key, together (imply TLS) |
    /// | `INSEAM_KAFKA_TOPIC` | the topic's name (default `inseam`) |
    /// | `INSEAM_KAFKA_PARTITIONS` | the topic's partition count (default 8) |
    /// | `INSEAM_KAFKA_REPLICATION` | the topic's replication factor (default 1) |
    /// | `INSEAM_KAFKA_PUBLISH_TIMEOUT` | how long a publish waits for the brokers: `500ms`, `5s`, `1m` |
    /// | `INSEAM_KAFKA_INSTANCE_ID` | this process's static member id in its groups, as [`instance_id`](Self::instance_id) |
    /// | `INSEAM_KAFKA_SESSION_TIMEOUT` | how long a silent consumer keeps its partitions, as [`session_timeout`](Self::session_timeout): `6s` |
    /// | `INSEAM_KAFKA_FETCH_WAIT` | how long the brokers may hold a consumer's fetch, as [`fetch_wait`](Self::fetch_wait): `10ms` |
    ///
    /// ```
    /// use inseam_kafka::KafkaOptions;
    ///
    /// let vars = [
    ///     ("INSEAM_KAFKA_URL", "k1:9092,k2:9093"),
    ///     ("INSEAM_KAFKA_USER", "app"),
    ///     ("INSEAM_KAFKA_PASSWORD", "pa55"),
    ///     ("INSEAM_KAFKA_PARTITIONS", "16"),
    /// ];
    /// let options = KafkaOptions::from_env_vars(|name| {
    ///     vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())
    /// })?;
    /// assert_eq!(options.broker_list(), ["k1:9092", "k2:9093"]);
    /// assert!(!format!("{options:?}").contains("pa55"));
    /// # Ok::<(), inseam_kafka::KafkaError>(())
    /// ```
    pub fn from_env_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let var = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        let mut options = match var("INSEAM_KAFKA_URL") {
            Some(urls) => KafkaOptions::default().brokers_from_urls("INSEAM_KAFKA_URL", &urls)?,
            None => KafkaOptions::default(),
        };
        match (var("INSEAM_KAFKA_USER"), var("INSEAM_KAFKA_PASSWORD")) {
            (Some(user), Some(password)) => options = options.user_and_password(user, password),
            (None, None) => {}
            (Some(_), None) => {
                return Err(KafkaError::config(
                    "INSEAM_KAFKA_USER",
                    "set without INSEAM_KAFKA_PASSWORD",
                ));
            }
            (None, Some(_)) => {
                return Err(KafkaError::config(
                    "INSEAM_KAFKA_PASSWORD",
                    "set without INSEAM_KAFKA_USER",
                ));
            }
        }
        if let Some(mechanism) = var("INSEAM_KAFKA_SASL_MECHANISM") {
            options = options.sasl_mechanism(mechanism.trim());
        }
        if let Some(value) = var("INSEAM_KAFKA_TLS") {
            options = options.tls(parse_bool("INSEAM_KAFKA_TLS", &value)?);
        }
        if let Some(path) = var("INSEAM_KAFKA_TLS_CA") {
            options = options.tls_root_certificates(path);
        }
        match (var("INSEAM_KAFKA_TLS_CERT"), var("INSEAM_KAFKA_TLS_KEY")) {
            (Some(cert), Some(key)) => options = options.tls_client_certificate(cert, key),
            (None, None) => {}
            (Some(_), None) => {
                return Err(KafkaError::config(
                    "INSEAM_KAFKA_TLS_CERT",
                    "set without INSEAM_KAFKA_TLS_KEY",
                ));
            }
            (None, Some(_)) => {
                return Err(KafkaError::config(
                    "INSEAM_KAFKA_TLS_KEY",
                    "set without INSEAM_KAFKA_TLS_CERT",
                ));
            }
        }
        if let Some(topic) = var("INSEAM_KAFKA_TOPIC") {
            options = options.topic(topic.trim());
        }
        if let Some(value) = var("INSEAM_KAFKA_PARTITIONS") {
            let partitions = value.trim().parse().map_err(|_| {
                KafkaError::config(
                    "INSEAM_KAFKA_PARTITIONS",
                    format!("`{value}` is not a number from 1 to {MAX_PARTITIONS}"),
                )
            })?;
            options = options.partitions(partitions);
        }
        if let Some(value) = var("INSEAM_KAFKA_REPLICATION") {
            let replication = value.trim().parse().map_err(|_| {
                KafkaError::config(
                    "INSEAM_KAFKA_REPLICATION",
                    format!("`{value}` is not a replication factor"),
                )
            })?;
            options = options.replication(replication);
        }
        if let Some(value) = var("INSEAM_KAFKA_PUBLISH_TIMEOUT") {
            options =
                options.publish_timeout(duration_var("INSEAM_KAFKA_PUBLISH_TIMEOUT", &value)?);
        }
        if let Some(id) = var("INSEAM_KAFKA_INSTANCE_ID") {
            options = options.instance_id(id.trim());
        }
        if let Some(value) = var("INSEAM_KAFKA_SESSION_TIMEOUT") {
            options =
                options.session_timeout(duration_var("INSEAM_KAFKA_SESSION_TIMEOUT", &value)?);
        }
        if let Some(value) = var("INSEAM_KAFKA_FETCH_WAIT") {
            options = options.fetch_wait(duration_var("INSEAM_KAFKA_FETCH_WAIT", &value)?);
        }
        options.validate()?;
        Ok(options)
    }

    fn brokers_from_urls(mut self, option: &str, urls: &str) -> Result<Self> {
        let mut brokers = Vec::new();
        let mut tls = None;
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            let (scheme, rest) = match url.split_once("://") {
                Some((scheme, rest)) => (Some(scheme.to_ascii_lowercase()), rest),
                None => (None, url),
            };
            let secure = match scheme.as_deref() {
                None | Some("kafka" | "tcp" | "plaintext") => false,
                Some("kafka+ssl" | "kafkas" | "ssl") => true,
                Some(other) => {
                    return Err(KafkaError::config(
                        option,
                        format!(
                            "`{other}://` is not a Kafka URL scheme (use kafka:// or kafka+ssl://)"
                        ),
                    ));
                }
            };
            if tls.is_some_and(|known| known != secure) {
                return Err(KafkaError::config(
                    option,
                    "the URLs mix TLS and plaintext; use one scheme",
                ));
            }
            tls = Some(secure);
            let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
            let host = match authority.rsplit_once('@') {
                Some((auth, host)) => {
                    let (user, password) = match auth.split_once(':') {
                        Some((user, password)) => (
                            layout::percent_decode(user),
                            Secret(layout::percent_decode(password)),
                        ),
                        None => {
                            return Err(KafkaError::config(
                                option,
                                "a URL's credentials need a user and a password (`user:password@`)",
                            ));
                        }
                    };
                    if self.user.is_some()
                        && (self.user.as_deref() != Some(user.as_str())
                            || self.password.as_ref() != Some(&password))
                    {
                        return Err(KafkaError::config(
                            option,
                            "the URLs carry different credentials; give one set of credentials",
                        ));
                    }
                    self.user = Some(user);
                    self.password = Some(password);
                    host
                }
                None => authority,
            };
            if host.is_empty() {
                return Err(KafkaError::config(option, format!("`{url}` names no host")));
            }
            let has_port = match host.rsplit_once(':') {
                // An IPv6 address in brackets: `[::1]` has no port, `[::1]:9092` has one.
                Some((before, port)) => {
                    !port.contains(']') && !before.is_empty() && port.parse::<u16>().is_ok()
                }
                None => false,
            };
            if host.contains(':') && !host.starts_with('[') && !has_port {
                return Err(KafkaError::config(
                    option,
                    format!("`{url}` has no valid port"),
                ));
            }
            brokers.push(if has_port {
                host.to_owned()
            } else {
                format!("{host}:9092")
            });
        }
        if brokers.is_empty() {
            return Err(KafkaError::config(option, "no broker URL"));
        }
        self.brokers = brokers;
        self.tls = tls.unwrap_or(false) || self.tls;
        Ok(self)
    }

    /// The brokers to bootstrap from (replaces the list), as for [`from_url`](Self::from_url).
    pub fn brokers(self, urls: impl IntoIterator<Item = impl AsRef<str>>) -> Result<Self> {
        let joined: Vec<String> = urls.into_iter().map(|u| u.as_ref().to_owned()).collect();
        self.brokers_from_urls("brokers", &joined.join(","))
    }

    /// The bootstrap brokers (`host:port`), without credentials.
    pub fn broker_list(&self) -> &[String] {
        &self.brokers
    }

    /// Authenticates with SASL, as `user` with `password` (mechanism `PLAIN` unless set with
    /// [`sasl_mechanism`](Self::sasl_mechanism)).
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.user = Some(user.into());
        self.password = Some(Secret(password.into()));
        self
    }

    /// The SASL mechanism: `PLAIN` (default), `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub fn sasl_mechanism(mut self, mechanism: impl Into<String>) -> Self {
        self.sasl_mechanism = mechanism.into().to_ascii_uppercase();
        self
    }

    /// Connects with TLS (default: plaintext, unless a URL says `kafka+ssl://` or a
    /// certificate is given).
    pub fn tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    /// Trusts the CA certificates of a PEM file (for brokers with a private CA); implies TLS.
    pub fn tls_root_certificates(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(path.into());
        self.tls = true;
        self
    }

    /// Presents a client certificate and its key (PEM files), for brokers that verify
    /// clients; implies TLS.
    pub fn tls_client_certificate(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.tls_client = Some((cert.into(), key.into()));
        self.tls = true;
        self
    }

    /// The client id the brokers log (default `inseam`).
    pub fn client_id(mut self, id: impl Into<String>) -> Self {
        self.client_id = id.into();
        self
    }

    /// The topic that carries every channel (default `inseam`). A group's consumer group is
    /// `<topic>.<group>`.
    pub fn topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self
    }

    /// The topic's partition count (default 8, at most [`MAX_PARTITIONS`]): at most this many
    /// messages of a group are in flight at once, one per partition. Every publisher and
    /// consumer of a topic must use the same count, which provisioning checks against the
    /// topic's.
    pub fn partitions(mut self, partitions: u16) -> Self {
        self.partitions = partitions;
        self
    }

    /// The topic's replication factor when the transport creates it (default 1).
    pub fn replication(mut self, replication: u16) -> Self {
        self.replication = replication;
        self
    }

    /// How long a publish waits for the brokers to confirm a batch before its messages fail
    /// with a transient error (default 5 s; librdkafka's `message.timeout.ms`).
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// How long creating the topic, committing an offset or reading metadata may take
    /// (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How long a consumer may go silent before its group gives its partitions to the other
    /// consumers (default 20 s; `session.timeout.ms`, within the brokers' allowed range,
    /// which is 6 s to 30 min on Apache Kafka): a crashed process's unsettled messages come
    /// again after it. tansu makes the first member of a new group wait about half of it
    /// before it gets its partitions.
    pub fn session_timeout(mut self, timeout: Duration) -> Self {
        self.session_timeout = timeout;
        self
    }

    /// Makes this process a static member of its consumer groups (`group.instance.id`,
    /// Kafka's KIP-345), under `id`: when the process restarts with the same id, for
    /// instance after a crash, the group gives it back its partitions at once, without
    /// waiting for the session timeout or moving them to the other members. Each process of a
    /// group needs an id of its own (a StatefulSet pod's name, for instance). A static member
    /// does not leave its groups when it stops: its partitions wait for it, or for the
    /// session timeout. No id (the default): dynamic membership.
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// How long the brokers may hold a consumer's fetch when they have nothing new for it
    /// (`fetch.wait.max.ms`; librdkafka's default, 500 ms, when not set). Apache Kafka and
    /// Redpanda answer a fetch as soon as records arrive, so the default costs them nothing.
    /// tansu 0.6 answers only when the wait is over, which adds up to the wait to every
    /// message's way from publisher to handler: against tansu with its memory storage, set a
    /// few milliseconds (the latency benchmark measured p50 137 ms with the default and 7 ms
    /// with 10 ms; with tansu storing in S3, consumers with 10 ms received nothing in one
    /// test, so measure before using it there). From 1 ms to 5 min.
    pub fn fetch_wait(mut self, wait: Duration) -> Self {
        self.fetch_wait = Some(wait);
        self
    }

    /// How often a consumer tells its group it is alive, and so how soon it learns of a
    /// rebalance (default 1 s; `heartbeat.interval.ms`).
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// Sets a librdkafka property on every client (producer, consumers, admin), for what the
    /// options do not cover (`socket.keepalive.enable`, `sasl.oauthbearer.config`, ...). The
    /// transport's own settings (idempotence, `acks`, offsets) win over these.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.extra.push((key.into(), Secret(value.into())));
        self
    }

    /// Checks the options against each other and Kafka's naming rules.
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(problem) = layout::topic_name_problem(&self.topic) {
            return Err(KafkaError::config(
                "topic",
                format!("`{}` is not a topic name: {problem}", self.topic),
            ));
        }
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return Err(KafkaError::config(
                "partitions",
                format!("{} is not from 1 to {MAX_PARTITIONS}", self.partitions),
            ));
        }
        if self.replication == 0 {
            return Err(KafkaError::config("replication", "it is zero"));
        }
        for (option, value) in [
            ("publish_timeout", self.publish_timeout),
            ("request_timeout", self.request_timeout),
            ("session_timeout", self.session_timeout),
            ("heartbeat_interval", self.heartbeat_interval),
        ] {
            if value.is_zero() {
                return Err(KafkaError::config(option, "it is zero"));
            }
        }
        if let Some(wait) = self.fetch_wait
            && !(Duration::from_millis(1)..=Duration::from_secs(300)).contains(&wait)
        {
            return Err(KafkaError::config(
                "fetch_wait",
                format!("{wait:?} is not from 1 ms to 5 min"),
            ));
        }
        if let Some(id) = &self.instance_id
            && let Some(problem) = layout::topic_name_problem(id)
        {
            return Err(KafkaError::config(
                "instance_id",
                format!("`{id}` is not a member id: {problem}"),
            ));
        }
        if self.heartbeat_interval >= self.session_timeout {
            return Err(KafkaError::config(
                "heartbeat_interval",
                "it must be shorter than the session timeout",
            ));
        }
        if !SASL_MECHANISMS.contains(&self.sasl_mechanism.as_str()) {
            return Err(KafkaError::config(
                "sasl_mechanism",
                format!(
                    "`{}` is not one of {}",
                    self.sasl_mechanism,
                    SASL_MECHANISMS.join(", ")
                ),
            ));
        }
        if self.brokers.is_empty() {
            return Err(KafkaError::config("brokers", "no broker URL"));
        }
        Ok(())
    }

    /// What a consumer that joins a group sets besides [`client_config`](Self::client_config):
    /// the session and, for a static member, its id.
    pub(crate) fn member_config(&self, group_id: &str) -> ClientConfig {
        let mut config = self.consumer_config();
        config
            .set("group.id", group_id)
            .set("session.timeout.ms", millis(self.session_timeout))
            .set("heartbeat.interval.ms", millis(self.heartbeat_interval));
        if let Some(id) = &self.instance_id {
            config.set("group.instance.id", id);
        }
        config
    }

    /// What every consumer sets besides [`client_config`](Self::client_config): the fetch
    /// wait, when one is set.
    pub(crate) fn consumer_config(&self) -> ClientConfig {
        let mut config = self.client_config();
        if let Some(wait) = self.fetch_wait {
            config.set("fetch.wait.max.ms", millis(wait));
        }
        config
    }

    /// The settings every client of the transport shares: brokers, security, client id.
    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (key, value) in &self.extra {
            config.set(key, value.expose());
        }
        config
            .set("bootstrap.servers", self.brokers.join(","))
            .set("client.id", &self.client_id)
            .set(
                "socket.timeout.ms",
                millis(self.request_timeout.max(Duration::from_secs(10))),
            )
            .set("log.connection.close", "false");
        let protocol = match (self.tls, self.user.is_some()) {
            (false, false) => "plaintext",
            (true, false) => "ssl",
            (false, true) => "sasl_plaintext",
            (true, true) => "sasl_ssl",
        };
        config.set("security.protocol", protocol);
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            config
                .set("sasl.mechanism", &self.sasl_mechanism)
                .set("sasl.username", user)
                .set("sasl.password", password.expose());
        }
        if let Some(ca) = &self.tls_ca {
            config.set("ssl.ca.location", ca.display().to_string());
        }
        if let Some((cert, key)) = &self.tls_client {
            config
                .set("ssl.certificate.location", cert.display().to_string())
                .set("ssl.key.location", key.display().to_string());
        }
        config
    }
}

/// Milliseconds as librdkafka reads them.
pub(crate) fn millis(duration: Duration) -> String {
    duration.as_millis().max(1).to_string()
}

/// Whether a librdkafka setting's value must not be shown.
fn looks_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "oauthbearer",
        "ssl.key",
        "jaas",
        "keystore",
    ]
    .iter()
    .any(|word| key.contains(word))
}

impl fmt::Debug for KafkaOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let extra: Vec<(&str, &str)> = self
            .extra
            .iter()
            .map(|(key, value)| {
                let shown = if looks_secret(key) {
                    "<redacted>"
                } else {
                    value.expose()
                };
                (key.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaOptions")
            .field("brokers", &self.brokers)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("tls", &self.tls)
            .field("tls_ca", &self.tls_ca)
            .field("tls_client", &self.tls_client)
            .field("client_id", &self.client_id)
            .field("topic", &self.topic)
            .field("partitions", &self.partitions)
            .field("replication", &self.replication)
            .field("publish_timeout", &self.publish_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("session_timeout", &self.session_timeout)
            .field("instance_id", &self.instance_id)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("fetch_wait", &self.fetch_wait)
            .field("extra", &extra)
            .finish()
    }
}

/// The duration in variable `name`, or the error naming it.
fn duration_var(name: &str, value: &str) -> Result<Duration> {
    parse_duration(value).ok_or_else(|| {
        KafkaError::config(
            name,
            format!("`{value}` is not a duration such as `500ms`, `5s` or `1m`"),
        )
    })
}

fn parse_bool(option: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(KafkaError::config(
            option,
            format!("`{value}` is not `true` or `false`"),
        )),
    }
}
