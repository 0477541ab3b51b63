//! Which process runs which groups, and over which transport the others are reached.
//!
//! By default an app is one process: every group and durable command runs where its message
//! was published, through the store's outbox and relay. A [`Routing`] moves chosen modules
//! (or single groups) to other processes of the same binary: in every process, a group that
//! runs elsewhere is reached over a [`Transport`](crate::transport::Transport), and the process
//! that runs it consumes it from there. Handler code never changes; only the configuration,
//! which is the same file (or environment) for every process, plus the name of the process
//! being started.
//!
//! ```toml
//! # inseam.toml
//! [processes.billing]          # a second process of the same binary
//! transport = "nats"           # how the others reach it, and it them
//! modules = ["payments", "shipping"]
//! groups = []                  # single groups, by name, if a module is too coarse
//! ```
//!
//! A process started with `INSEAM_PROCESS=billing` runs the groups of `payments` and
//! `shipping`; any other name, or none, is the main process, which runs every group no other
//! process claims. A group's module is the first dotted segment of its name (`payments` for
//! `payments` and `payments.ledger`), and a durable command's module that of its command name
//! (`payments` for `command:payments.charge`).
//!
//! The file is read by [`Routing::from_env`] from `INSEAM_CONFIG` (or set on the builder
//! with [`AppBuilder::routing`](crate::AppBuilder::routing)); `build()` checks it against the
//! app's groups and transports with every other wiring problem.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Deserialize;

/// The name of the process that runs every group no other process claims.
pub const MAIN: &str = "main";

/// The prefix of the relay group that publishes a transport's messages (`transport:nats`).
pub const OUTBOX_PREFIX: &str = "transport:";

/// Where each group runs; see the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    /// The process being started; `None` is the main process.
    this: Option<String>,
    processes: BTreeMap<String, ProcessRoute>,
}

/// A process other than the main one: what it runs and how it is reached.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessRoute {
    /// The transport between it and the other processes.
    pub transport: String,
    /// The modules whose groups and durable commands it runs.
    #[serde(default)]
    pub modules: Vec<String>,
    /// Single groups it runs, by name (`notifications`, `command:payments.charge`).
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    processes: BTreeMap<String, ProcessRoute>,
}

/// The routing configuration could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RoutingError {
    /// The file could not be read.
    #[error("could not read the routing file `{path}`")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid routing TOML.
    #[error("the routing file `{path}` is not valid: {message}")]
    Parse {
        /// The file (or `<string>`).
        path: String,
        /// What is wrong, with its line and column.
        message: String,
    },
}

impl Routing {
    /// One process running everything: the default.
    pub fn single() -> Self {
        Routing::default()
    }

    /// Reads the routing of every process from TOML (see the module documentation).
    pub fn from_toml(text: &str) -> Result<Self, RoutingError> {
        Self::parse(text, "<string>")
    }

    /// Reads the routing of every process from a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, RoutingError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| RoutingError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    fn parse(text: &str, path: &str) -> Result<Self, RoutingError> {
        let file: File = toml::from_str(text).map_err(|error| RoutingError::Parse {
            path: path.to_owned(),
            message: error.to_string().trim_end().to_owned(),
        })?;
        Ok(Routing {
            this: None,
            processes: file.processes,
        })
    }

    /// The routing the environment asks for: the file named by `INSEAM_CONFIG` (one process
    /// running everything when it is unset), started as the process named by
    /// `INSEAM_PROCESS` (the main process when unset).
    pub fn from_env() -> Result<Self, RoutingError> {
        let routing = match std::env::var_os("INSEAM_CONFIG") {
            Some(path) if !path.is_empty() => Self::from_file(path)?,
            _ => Routing::single(),
        };
        Ok(match std::env::var("INSEAM_PROCESS") {
            Ok(name) if !name.is_empty() => routing.this_process(name),
            _ => routing,
        })
    }

    /// Declares a process other than the main one, reached over `transport`, running the
    /// groups and durable commands of `modules`.
    pub fn process(
        mut self,
        name: impl Into<String>,
        transport: impl Into<String>,
        modules: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        self.processes.insert(
            name.into(),
            ProcessRoute {
                transport: transport.into(),
                modules: modules.into_iter().map(Into::into).collect(),
                groups: Vec::new(),
            },
        );
        self
    }

    /// Adds single groups, by name, to process `name` (declared with [`process`](Self::process)).
    pub fn groups(
        mut self,
        name: &str,
        groups: impl IntoIterator<Item = impl Into<String>>,
    ) -> Self {
        if let Some(process) = self.processes.get_mut(name) {
            process.groups.extend(groups.into_iter().map(Into::into));
        }
        self
    }

    /// Starts this app as process `name` (the main process for [`MAIN`]).
    pub fn this_process(mut self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.this = (name != MAIN).then_some(name);
        self
    }

    /// The process being started.
    pub fn current(&self) -> &str {
        self.this.as_deref().unwrap_or(MAIN)
    }

    /// Whether every group runs in this one process.
    pub fn is_single(&self) -> bool {
        self.processes.is_empty()
    }

    /// The processes other than the main one.
    pub fn processes(&self) -> impl Iterator<Item = (&str, &ProcessRoute)> {
        self.processes
            .iter()
            .map(|(name, route)| (name.as_str(), route))
    }

    /// The process that runs `group`.
    pub fn host(&self, group: &str) -> &str {
        let module = module_of(group);
        self.processes
            .iter()
            .find(|(_, route)| {
                route.groups.iter().any(|g| g == group) || route.modules.iter().any(|m| m == module)
            })
            .map_or(MAIN, |(name, _)| name.as_str())
    }

    /// Whether `group` runs in this process.
    pub fn is_local(&self, group: &str) -> bool {
        self.host(group) == self.current()
    }

    /// The transport over which this process reaches `group`, or `None` when it runs here.
    pub fn transport_to(&self, group: &str) -> Option<&str> {
        let host = self.host(group);
        if host == self.current() {
            return None;
        }
        // A group of another named process is reached over that process's transport; one of
        // the main process over this process's own.
        let route = self
            .processes
            .get(host)
            .or_else(|| self.this.as_ref().and_then(|this| self.processes.get(this)))?;
        Some(route.transport.as_str())
    }

    /// The transports this process consumes its own groups from: its own transport, or for
    /// the main process every transport another process uses. Empty in a single process.
    pub fn inbound_transports(&self) -> Vec<&str> {
        let mut transports: Vec<&str> = match &self.this {
            Some(this) => self
                .processes
                .get(this)
                .map(|route| route.transport.as_str())
                .into_iter()
                .collect(),
            None => self
                .processes
                .values()
                .map(|route| route.transport.as_str())
                .collect(),
        };
        transports.sort_unstable();
        transports.dedup();
        transports
    }

    /// What is wrong with this routing for an app with `groups`, given the names of the
    /// transports it has: every problem, as `(what, why)`.
    pub(crate) fn problems(&self, groups: &[&str], transports: &[&str]) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(this) = &self.this
            && !self.processes.contains_key(this)
        {
            let known: Vec<&str> = self.processes.keys().map(String::as_str).collect();
            problems.push(format!(
                "this process is `{this}` (INSEAM_PROCESS), which the routing does not declare; declared processes: {}",
                list(std::iter::once(MAIN).chain(known))
            ));
        }
        for (name, route) in &self.processes {
            if name == MAIN {
                problems.push(format!(
                    "process `{MAIN}` is the one that runs every group no other process claims; name the other processes differently"
                ));
            }
            if !transports.contains(&route.transport.as_str()) {
                problems.push(format!(
                    "process `{name}` is reached over transport `{}`, which is not configured; add it with `.transport(..)` (configured: {})",
                    route.transport,
                    list(transports.iter().copied())
                ));
            }
            for module in &route.modules {
                if !groups.iter().any(|g| module_of(g) == module) {
                    problems.push(format!(
                        "process `{name}` runs module `{module}`, but no group or durable command belongs to it (modules: {})",
                        list(modules(groups))
                    ));
                }
            }
            for group in &route.groups {
                if !groups.contains(&group.as_str()) {
                    problems.push(format!(
                        "process `{name}` runs group `{group}`, which the app does not have (groups: {})",
                        list(groups.iter().copied())
                    ));
                }
            }
            if route.modules.is_empty() && route.groups.is_empty() {
                problems.push(format!(
                    "process `{name}` runs nothing: give it modules or groups"
                ));
            }
        }
        for group in groups {
            let claimed: Vec<&str> = self
                .processes
                .iter()
                .filter(|(_, route)| {
                    route.groups.iter().any(|g| g == group)
                        || route.modules.iter().any(|m| m == module_of(group))
                })
                .map(|(name, _)| name.as_str())
                .collect();
            if claimed.len() > 1 {
                problems.push(format!(
                    "group `{group}` is claimed by several processes ({}); a group runs in one",
                    list(claimed)
                ));
            }
        }
        problems
    }
}

impl fmt::Display for Routing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_single() {
            return f.write_str("one process runs every group");
        }
        write!(f, "this is process `{}`", self.current())?;
        for (name, route) in &self.processes {
            write!(
                f,
                "; `{name}` over `{}` runs modules [{}] and groups [{}]",
                route.transport,
                route.modules.join(", "),
                route.groups.join(", ")
            )?;
        }
        Ok(())
    }
}

/// The module of a group or durable command: the first dotted segment of its name.
pub fn module_of(group: &str) -> &str {
    let name = group.strip_prefix("command:").unwrap_or(group);
    name.split('.').next().unwrap_or(name)
}

fn modules<'a>(groups: &'a [&'a str]) -> impl Iterator<Item = &'a str> {
    let mut modules: Vec<&str> = groups.iter().map(|g| module_of(g)).collect();
    modules.sort_unstable();
    modules.dedup();
    modules.into_iter()
}

fn list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let items: Vec<&str> = items.into_iter().collect();
    if items.is_empty() {
        "none".to_owned()
    } else {
        items
            .iter()
            .map(|i| format!("`{i}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPLIT: &str = r#"
        [processes.billing]
        transport = "nats"
        modules = ["payments", "shipping"]
        groups = ["notifications"]
    "#;

    #[test]
    fn hosts_and_transports_from_either_side() {
        let main = Routing::from_toml(SPLIT).unwrap();
        assert_eq!(main.current(), MAIN);
        assert_eq!(main.host("command:payments.charge"), "billing");
        assert_eq!(main.host("notifications"), "billing");
        assert_eq!(main.host("orders.fulfilment"), MAIN);
        assert_eq!(
            main.transport_to("command:shipping.create_shipment"),
            Some("nats")
        );
        assert_eq!(main.transport_to("orders.fulfilment"), None);
        assert_eq!(main.inbound_transports(), ["nats"]);

        let billing = main.clone().this_process("billing");
        assert!(billing.is_local("command:payments.charge"));
        assert_eq!(billing.transport_to("orders.fulfilment"), Some("nats"));
        assert_eq!(billing.inbound_transports(), ["nats"]);
    }

    #[test]
    fn single_process_routes_nothing() {
        let routing = Routing::single();
        assert!(routing.is_local("anything"));
        assert!(routing.inbound_transports().is_empty());
        assert!(routing.problems(&["a"], &[]).is_empty());
    }

    #[test]
    fn every_problem_at_once() {
        let routing = Routing::from_toml(
            r#"
            [processes.billing]
            transport = "kafka"
            modules = ["payment"]
            groups = ["notification"]
            "#,
        )
        .unwrap()
        .this_process("bililng");
        let problems = routing.problems(&["command:payments.charge", "notifications"], &["nats"]);
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(problems[0].contains("`bililng`"), "{}", problems[0]);
        assert!(problems[1].contains("transport `kafka`, which is not configured"));
        assert!(problems[2].contains("module `payment`"));
        assert!(problems[3].contains("group `notification`"));
    }

    #[test]
    fn a_bad_file_names_the_line() {
        let error = Routing::from_toml("[processes.billing]\ntransprt = \"nats\"\n").unwrap_err();
        let text = error.to_string();
        assert!(text.contains("transprt"), "{text}");
        assert!(text.contains("line 2"), "{text}");
    }
}
