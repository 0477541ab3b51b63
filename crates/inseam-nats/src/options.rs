//! How to reach the NATS servers and how the transport lays out its stream.

use inseam_core::transport::config::{parse_duration, split_credentials};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::{NatsError, Result};
use crate::layout;

/// A secret (password, token): kept out of `Debug` and of logs.
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

/// The options of a [`Nats`](crate::Nats) transport: connection, authentication, TLS, and the
/// stream's layout (decision 0016).
///
/// Built in code, from a URL ([`from_url`](Self::from_url)) or from the environment
/// ([`from_env`](Self::from_env)). `Debug` shows everything but the password and the token.
///
/// ```
/// use std::time::Duration;
/// use inseam_nats::NatsOptions;
///
/// let options = NatsOptions::from_url("nats://alice:s3cret@nats-1:4222,nats://nats-2:4222")?
///     .stream("SHOP")
///     .prefix("shop")
///     .partitions(16)
///     .publish_timeout(Duration::from_secs(2));
/// assert!(!format!("{options:?}").contains("s3cret"));
/// # Ok::<(), inseam_nats::NatsError>(())
/// ```
#[derive(Clone)]
pub struct NatsOptions {
    pub(crate) servers: Vec<String>,
    pub(crate) user: Option<String>,
    pub(crate) password: Option<Secret>,
    pub(crate) token: Option<Secret>,
    pub(crate) credentials: Option<PathBuf>,
    pub(crate) tls_ca: Option<PathBuf>,
    pub(crate) tls_client: Option<(PathBuf, PathBuf)>,
    pub(crate) require_tls: bool,
    pub(crate) client_name: Option<String>,
    pub(crate) connection_timeout: Duration,
    pub(crate) ping_interval: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) retry_on_initial_connect: bool,
    pub(crate) stream: String,
    pub(crate) prefix: String,
    pub(crate) partitions: u16,
    pub(crate) publish_timeout: Duration,
    pub(crate) duplicate_window: Duration,
    pub(crate) max_age: Option<Duration>,
    pub(crate) replicas: usize,
}

/// The most partitions a stream may be laid out in: each is a consumer per group.
pub const MAX_PARTITIONS: u16 = 1024;

impl Default for NatsOptions {
    /// A server at `nats://127.0.0.1:4222`, stream `INSEAM`, subjects `inseam.>`, 8 partitions.
    fn default() -> Self {
        NatsOptions {
            servers: vec!["nats://127.0.0.1:4222".to_owned()],
            user: None,
            password: None,
            token: None,
            credentials: None,
            tls_ca: None,
            tls_client: None,
            require_tls: false,
            client_name: None,
            connection_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            retry_on_initial_connect: false,
            stream: "INSEAM".to_owned(),
            prefix: "inseam".to_owned(),
            partitions: 8,
            publish_timeout: Duration::from_secs(5),
            duplicate_window: Duration::from_secs(120),
            max_age: None,
            replicas: 1,
        }
    }
}

impl NatsOptions {
    /// The defaults (see [`Default`](#impl-Default-for-NatsOptions)).
    pub fn new() -> Self {
        NatsOptions::default()
    }

    /// Options for the servers of `urls`, comma-separated (`nats://a:4222,nats://b:4222`; a
    /// bare `host:port` means `nats://`). Credentials in a URL (`nats://user:password@host`,
    /// or `nats://token@host`) are taken out of it into the options, so they are never shown.
    pub fn from_url(urls: &str) -> Result<Self> {
        NatsOptions::default().servers_from_urls("url", urls)
    }

    /// Options from the process's environment; see [`from_env_vars`](Self::from_env_vars).
    pub fn from_env() -> Result<Self> {
        NatsOptions::from_env_vars(|name| std::env::var(name).ok())
    }

    /// Options from variables read through `var` (an empty value counts as unset):
    ///
    /// | variable | meaning |
    /// | --- | --- |
    /// | `INSEAM_NATS_URL` | the servers, comma-separated, as for [`from_url`](Self::from_url) (default `nats://127.0.0.1:4222`) |
    /// | `INSEAM_NATS_USER`, `INSEAM_NATS_PASSWORD` | user and password, together |
    /// | `INSEAM_NATS_TOKEN` | a token |
    /// | `INSEAM_NATS_CREDENTIALS` | a `.creds` file (JWT and NKey seed) |
    /// | `INSEAM_NATS_TLS_CA` | a PEM file of root certificates to trust |
    /// | `INSEAM_NATS_TLS_CERT`, `INSEAM_NATS_TLS_KEY` | a client certificate and its key, together |
    /// | `INSEAM_NATS_REQUIRE_TLS` | `true` or `false` |
    /// | `INSEAM_NATS_STREAM` | the stream's name |
    /// | `INSEAM_NATS_PREFIX` | the subject prefix |
    /// | `INSEAM_NATS_PARTITIONS` | the partition count |
    /// | `INSEAM_NATS_PUBLISH_TIMEOUT` | how long a publish waits for the server: `500ms`, `5s`, `1m` |
    ///
    /// ```
    /// use inseam_nats::NatsOptions;
    ///
    /// let vars = [
    ///     ("INSEAM_NATS_URL", "nats://n1:4222,nats://n2:4222"),
    ///     ("INSEAM_NATS_TOKEN", "t0ken"),
    ///     ("INSEAM_NATS_PARTITIONS", "16"),
    /// ];
    /// let options = NatsOptions::from_env_vars(|name| {
    ///     vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string())
    /// })?;
    /// assert_eq!(options.server_urls(), ["nats://n1:4222", "nats://n2:4222"]);
    /// assert!(!format!("{options:?}").contains("t0ken"));
    /// # Ok::<(), inseam_nats::NatsError>(())
    /// ```
    pub fn from_env_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let var = |name: &str| var(name).filter(|value| !value.trim().is_empty());
        let mut options = match var("INSEAM_NATS_URL") {
            Some(urls) => NatsOptions::default().servers_from_urls("INSEAM_NATS_URL", &urls)?,
            None => NatsOptions::default(),
        };
        match (var("INSEAM_NATS_USER"), var("INSEAM_NATS_PASSWORD")) {
            (Some(user), Some(password)) => options = options.user_and_password(user, password),
            (None, None) => {}
            (Some(_), None) => {
                return Err(NatsError::config(
                    "INSEAM_NATS_USER",
                    "set without INSEAM_NATS_PASSWORD",
                ));
            }
            (None, Some(_)) => {
                return Err(NatsError::config(
                    "INSEAM_NATS_PASSWORD",
                    "set without INSEAM_NATS_USER",
                ));
            }
        }
        if let Some(token) = var("INSEAM_NATS_TOKEN") {
            options = options.token(token);
        }
        if let Some(path) = var("INSEAM_NATS_CREDENTIALS") {
            options = options.credentials_file(path);
        }
        if let Some(path) = var("INSEAM_NATS_TLS_CA") {
            options = options.tls_root_certificates(path);
        }
        match (var("INSEAM_NATS_TLS_CERT"), var("INSEAM_NATS_TLS_KEY")) {
            (Some(cert), Some(key)) => options = options.tls_client_certificate(cert, key),
            (None, None) => {}
            (Some(_), None) => {
                return Err(NatsError::config(
                    "INSEAM_NATS_TLS_CERT",
                    "set without INSEAM_NATS_TLS_KEY",
                ));
            }
            (None, Some(_)) => {
                return Err(NatsError::config(
                    "INSEAM_NATS_TLS_KEY",
                    "set without INSEAM_NATS_TLS_CERT",
                ));
            }
        }
        if let Some(value) = var("INSEAM_NATS_REQUIRE_TLS") {
            let required = match value.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => {
                    return Err(NatsError::config(
                        "INSEAM_NATS_REQUIRE_TLS",
                        format!("`{value}` is not `true` or `false`"),
                    ));
                }
            };
            options = options.require_tls(required);
        }
        if let Some(stream) = var("INSEAM_NATS_STREAM") {
            options = options.stream(stream.trim());
        }
        if let Some(prefix) = var("INSEAM_NATS_PREFIX") {
            options = options.prefix(prefix.trim());
        }
        if let Some(value) = var("INSEAM_NATS_PARTITIONS") {
            let partitions = value.trim().parse().map_err(|_| {
                NatsError::config(
                    "INSEAM_NATS_PARTITIONS",
                    format!("`{value}` is not a number from 1 to {MAX_PARTITIONS}"),
                )
            })?;
            options = options.partitions(partitions);
        }
        if let Some(value) = var("INSEAM_NATS_PUBLISH_TIMEOUT") {
            let timeout = parse_duration(&value).ok_or_else(|| {
                NatsError::config(
                    "INSEAM_NATS_PUBLISH_TIMEOUT",
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
            let (server, auth) = split_credentials(url, "nats");
            if let Some(auth) = auth {
                let (user, password, token) = match auth.split_once(':') {
                    Some((user, password)) => (
                        Some(percent_decode(user)),
                        Some(Secret(percent_decode(password))),
                        None,
                    ),
                    None => (None, None, Some(Secret(percent_decode(auth)))),
                };
                let known = self.user.is_some() || self.token.is_some();
                if known && (self.user != user || self.password != password || self.token != token)
                {
                    return Err(NatsError::config(
                        option,
                        "the URLs carry different credentials; give one set of credentials",
                    ));
                }
                self.user = user;
                self.password = password;
                self.token = token;
            }
            servers.push(server);
        }
        if servers.is_empty() {
            return Err(NatsError::config(option, "no server URL"));
        }
        self.servers = servers;
        Ok(self)
    }

    /// The servers to connect to (replaces the list). A URL's credentials are taken out of it,
    /// as with [`from_url`](Self::from_url).
    pub fn servers(self, urls: impl IntoIterator<Item = impl AsRef<str>>) -> Result<Self> {
        let joined: Vec<String> = urls.into_iter().map(|u| u.as_ref().to_owned()).collect();
        self.servers_from_urls("servers", &joined.join(","))
    }

    /// The server URLs, without credentials.
    pub fn server_urls(&self) -> &[String] {
        &self.servers
    }

    /// Authenticates with a user and a password.
    pub fn user_and_password(
        mut self,
        user: impl Into<String>,
        password: impl Into<String>,
    ) -> Self {
        self.user = Some(user.into());
        self.password = Some(Secret(password.into()));
        self
    }

    /// Authenticates with a token.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Secret(token.into()));
        self
    }

    /// Authenticates with a `.creds` file (a user JWT and its NKey seed), read when connecting.
    pub fn credentials_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.credentials = Some(path.into());
        self
    }

    /// Trusts the root certificates of a PEM file (for a server with a private CA).
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

    /// Refuses to connect without TLS.
    pub fn require_tls(mut self, required: bool) -> Self {
        self.require_tls = required;
        self
    }

    /// The client name the server shows in its connection list.
    pub fn client_name(mut self, name: impl Into<String>) -> Self {
        self.client_name = Some(name.into());
        self
    }

    /// How long connecting to one server may take (default 5 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How often the client pings the server; two unanswered pings count as a lost connection
    /// (default 10 s).
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// How long a JetStream API request (creating the stream or a consumer, an acknowledgement
    /// that waits for the server) may take (default 5 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Returns from connecting at once even when no server answers yet, and keeps trying in
    /// the background (default: connecting fails when no server answers).
    pub fn retry_on_initial_connect(mut self, retry: bool) -> Self {
        self.retry_on_initial_connect = retry;
        self
    }

    /// The JetStream stream's name (default `INSEAM`).
    pub fn stream(mut self, name: impl Into<String>) -> Self {
        self.stream = name.into();
        self
    }

    /// The subject prefix: the stream captures `<prefix>.>` (default `inseam`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How many partitions keys are spread over (default 8, at most [`MAX_PARTITIONS`]): at
    /// most this many messages of a group are in flight at once, one per partition. Every
    /// publisher and consumer of a stream must use the same count.
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

    /// How long the stream remembers message ids to drop a second publish (default 2 min).
    pub fn duplicate_window(mut self, window: Duration) -> Self {
        self.duplicate_window = window;
        self
    }

    /// How long the stream keeps a message (default: until removed by hand). A group that
    /// stays away longer loses what expired.
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = Some(age);
        self
    }

    /// How many servers of a cluster store the stream (default 1).
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// Checks the options against each other and NATS's naming rules.
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(problem) = layout::stream_name_problem(&self.stream) {
            return Err(NatsError::config(
                "stream",
                format!("`{}` is not a stream name: {problem}", self.stream),
            ));
        }
        if let Some(problem) = layout::subject_problem(&self.prefix) {
            return Err(NatsError::config(
                "prefix",
                format!("`{}` is not a subject prefix: {problem}", self.prefix),
            ));
        }
        if self.partitions == 0 || self.partitions > MAX_PARTITIONS {
            return Err(NatsError::config(
                "partitions",
                format!("{} is not from 1 to {MAX_PARTITIONS}", self.partitions),
            ));
        }
        if self.publish_timeout.is_zero() {
            return Err(NatsError::config("publish_timeout", "it is zero"));
        }
        if self.request_timeout.is_zero() {
            return Err(NatsError::config("request_timeout", "it is zero"));
        }
        let methods = [
            self.user.is_some(),
            self.token.is_some(),
            self.credentials.is_some(),
        ];
        if methods.iter().filter(|set| **set).count() > 1 {
            return Err(NatsError::config(
                "authentication",
                "give one of a user and password, a token, or a credentials file",
            ));
        }
        if self.servers.is_empty() {
            return Err(NatsError::config("servers", "no server URL"));
        }
        Ok(())
    }
}

impl fmt::Debug for NatsOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsOptions")
            .field("servers", &self.servers)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("token", &self.token)
            .field("credentials", &self.credentials)
            .field("tls_ca", &self.tls_ca)
            .field("tls_client", &self.tls_client)
            .field("require_tls", &self.require_tls)
            .field("client_name", &self.client_name)
            .field("connection_timeout", &self.connection_timeout)
            .field("ping_interval", &self.ping_interval)
            .field("request_timeout", &self.request_timeout)
            .field("retry_on_initial_connect", &self.retry_on_initial_connect)
            .field("stream", &self.stream)
            .field("prefix", &self.prefix)
            .field("partitions", &self.partitions)
            .field("publish_timeout", &self.publish_timeout)
            .field("duplicate_window", &self.duplicate_window)
            .field("max_age", &self.max_age)
            .field("replicas", &self.replicas)
            .finish()
    }
}

fn percent_decode(value: &str) -> String {
    layout::percent_decode(value).unwrap_or_else(|| value.to_owned())
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
    fn debug_redacts_password_and_token() {
        let options = NatsOptions::new().user_and_password("alice", "pa55word-secret");
        let shown = format!("{options:?}");
        assert!(!shown.contains("pa55word-secret"), "{shown}");
        assert!(shown.contains("alice"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");

        let options = NatsOptions::new().token("t0ken-secret");
        let shown = format!("{options:#?}");
        assert!(!shown.contains("t0ken-secret"), "{shown}");

        let options = NatsOptions::from_url("nats://bob:hunter2-secret@h1:4222").unwrap();
        let shown = format!("{options:?}");
        assert!(!shown.contains("hunter2-secret"), "{shown}");
        assert_eq!(options.server_urls(), ["nats://h1:4222"]);

        let options = NatsOptions::from_url("tls://t0k3n-secret@h1:4222").unwrap();
        assert!(!format!("{options:?}").contains("t0k3n-secret"));
        assert_eq!(
            options.token.as_ref().map(Secret::expose),
            Some("t0k3n-secret")
        );
    }

    #[test]
    fn urls_split_into_servers_and_credentials() {
        let options =
            NatsOptions::from_url(" nats://u:p%40ss@a:4222 , b:4223,tls://u:p%40ss@c:4224/ ")
                .unwrap();
        assert_eq!(
            options.server_urls(),
            ["nats://a:4222", "nats://b:4223", "tls://c:4224/"]
        );
        assert_eq!(options.user.as_deref(), Some("u"));
        assert_eq!(options.password.as_ref().map(Secret::expose), Some("p@ss"));
        assert!(NatsOptions::from_url("nats://u:p@a,nats://v:q@b").is_err());
        assert!(NatsOptions::from_url(" , ").is_err());
    }

    #[test]
    fn environment_variables_fill_every_option() {
        let options = NatsOptions::from_env_vars(vars(&[
            ("INSEAM_NATS_URL", "nats://n1:4222,nats://n2:4222"),
            ("INSEAM_NATS_USER", "svc"),
            ("INSEAM_NATS_PASSWORD", "pw-secret"),
            ("INSEAM_NATS_TLS_CA", "/etc/ca.pem"),
            ("INSEAM_NATS_TLS_CERT", "/etc/c.pem"),
            ("INSEAM_NATS_TLS_KEY", "/etc/k.pem"),
            ("INSEAM_NATS_REQUIRE_TLS", "true"),
            ("INSEAM_NATS_STREAM", "SHOP"),
            ("INSEAM_NATS_PREFIX", "shop.events"),
            ("INSEAM_NATS_PARTITIONS", "16"),
            ("INSEAM_NATS_PUBLISH_TIMEOUT", "750ms"),
        ]))
        .unwrap();
        assert_eq!(options.server_urls(), ["nats://n1:4222", "nats://n2:4222"]);
        assert_eq!(options.user.as_deref(), Some("svc"));
        assert_eq!(options.tls_ca, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(
            options.tls_client,
            Some((PathBuf::from("/etc/c.pem"), PathBuf::from("/etc/k.pem")))
        );
        assert!(options.require_tls);
        assert_eq!(options.stream, "SHOP");
        assert_eq!(options.prefix, "shop.events");
        assert_eq!(options.partitions, 16);
        assert_eq!(options.publish_timeout, Duration::from_millis(750));
        assert!(!format!("{options:?}").contains("pw-secret"));

        let options = NatsOptions::from_env_vars(vars(&[
            ("INSEAM_NATS_CREDENTIALS", "/run/app.creds"),
            ("INSEAM_NATS_TOKEN", ""),
        ]))
        .unwrap();
        assert_eq!(options.credentials, Some(PathBuf::from("/run/app.creds")));
        assert_eq!(options.server_urls(), ["nats://127.0.0.1:4222"]);
    }

    #[test]
    fn contradicting_environments_are_refused_by_name() {
        for (pairs, named) in [
            (vec![("INSEAM_NATS_USER", "u")], "INSEAM_NATS_USER"),
            (vec![("INSEAM_NATS_TLS_KEY", "k")], "INSEAM_NATS_TLS_KEY"),
            (
                vec![("INSEAM_NATS_REQUIRE_TLS", "maybe")],
                "INSEAM_NATS_REQUIRE_TLS",
            ),
            (vec![("INSEAM_NATS_PARTITIONS", "0")], "partitions"),
            (
                vec![("INSEAM_NATS_PARTITIONS", "many")],
                "INSEAM_NATS_PARTITIONS",
            ),
            (vec![("INSEAM_NATS_PREFIX", "a.>")], "prefix"),
            (vec![("INSEAM_NATS_STREAM", "A.B")], "stream"),
            (
                vec![("INSEAM_NATS_PUBLISH_TIMEOUT", "soon")],
                "INSEAM_NATS_PUBLISH_TIMEOUT",
            ),
            (
                vec![("INSEAM_NATS_TOKEN", "t"), ("INSEAM_NATS_CREDENTIALS", "c")],
                "authentication",
            ),
        ] {
            let err = NatsOptions::from_env_vars(vars(&pairs)).unwrap_err();
            assert!(err.to_string().contains(named), "{err}");
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
