//! A RabbitMQ node of a test's own: node name `inseam-<port>@localhost`, free AMQP and
//! distribution ports of 127.0.0.1, its database, logs, configuration and Erlang cookie in the
//! server's directory, no plugins, the default user `guest` allowed from 127.0.0.1.
//!
//! `rabbitmq-server` and `rabbitmqctl` are taken from `RABBITMQ_BIN_DIR`, then from the
//! package's own scripts in `/usr/lib/rabbitmq/bin` (Debian's `/usr/sbin` wrappers switch to
//! the `rabbitmq` user when run as root, who cannot write a test's temporary directory), then
//! from `PATH`. The script runs the Erlang VM as its child, so the server runs in a process
//! group of its own: a [`kill`](crate::Server::kill) kills the VM too, and a clean
//! [`stop`](crate::Server::stop) (SIGTERM to the script) stops the node as
//! `rabbitmqctl stop` does. The node accepts AMQP connections once its boot steps are done,
//! which is when its port opens.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{Server, Spec};

/// A RabbitMQ node (3.8 or later, for quorum queues).
pub const SPEC: Spec = Spec {
    binary: "rabbitmq-server",
    binary_env: "RABBITMQ_BIN_DIR",
    places: &["/usr/lib/rabbitmq/bin/rabbitmq-server"],
    install: "Debian/Ubuntu: `apt-get install rabbitmq-server`; 3.8 or later, for quorum queues",
    find,
    process_group: true,
    command,
    more_ports: 1,
    url,
    ready: None,
    // The Erlang VM and the boot steps take seconds, more on a loaded machine.
    locate: crate::nowhere,
    companion: None,
    start_timeout: Duration::from_secs(60),
    stop_timeout: Duration::from_secs(30),
};

/// `RABBITMQ_BIN_DIR` (a directory), `/usr/lib/rabbitmq/bin`, then `PATH`: the first that has
/// both `rabbitmq-server` and `rabbitmqctl`.
fn find(spec: &Spec) -> PathBuf {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os(spec.binary_env) {
        dirs.push(PathBuf::from(dir));
    }
    dirs.push(PathBuf::from("/usr/lib/rabbitmq/bin"));
    dirs.extend(
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>()),
    );
    for dir in dirs {
        let (server, ctl) = (dir.join("rabbitmq-server"), dir.join("rabbitmqctl"));
        if server.is_file() && ctl.is_file() {
            return server;
        }
    }
    panic!(
        "this test needs `rabbitmq-server` and `rabbitmqctl` and found them neither in \
         {env}, /usr/lib/rabbitmq/bin nor on PATH. Install them ({install}), or set {env} to \
         their directory. Nothing needs to run beforehand: the test starts its own node on free \
         ports of 127.0.0.1 (never the machine's broker on 5672).",
        env = spec.binary_env,
        install = spec.install,
    );
}

fn node_name(port: u16) -> String {
    format!("inseam-{port}@localhost")
}

/// The node's environment (for `rabbitmq-server` and `rabbitmqctl` alike), its files written
/// into `dir` first.
fn command(command: &mut Command, port: u16, more: &[u16], dir: &Path) {
    std::fs::create_dir_all(dir.join("home")).expect("the node's home directory");
    std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("the plugins file");
    std::fs::write(dir.join("rabbitmq.conf"), "loopback_users = none\n")
        .expect("the configuration file");
    std::fs::write(dir.join("rabbitmq-env.conf"), "").expect("the environment file");
    command
        .env("HOME", dir.join("home"))
        .env("RABBITMQ_NODENAME", node_name(port))
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", port.to_string())
        .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", dir.join("log"))
        .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
        .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
        .env("RABBITMQ_FEATURE_FLAGS_FILE", dir.join("feature_flags"))
        .env("RABBITMQ_PLUGINS_EXPAND_DIR", dir.join("plugins-expand"))
        .env("ERL_CRASH_DUMP", dir.join("erl_crash.dump"));
    if let Some(dist) = more.first() {
        command.env("RABBITMQ_DIST_PORT", dist.to_string());
    }
}

/// The AMQP URL of the node's default virtual host, with its default user.
fn url(port: u16) -> String {
    format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
}

/// Starts a RabbitMQ node of the test's own.
///
/// # Panics
/// See [`Server::start`].
pub fn start() -> Server {
    Server::start(SPEC)
}

/// The AMQP URL of virtual host `vhost` of `server`'s node.
pub fn vhost_url(server: &Server, vhost: &str) -> String {
    format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", server.port())
}

/// Runs `rabbitmqctl -n <node> <args>` against `server`'s node, failing with its output.
pub fn ctl(server: &Server, args: &[&str]) -> Result<String, String> {
    let program = server.binary().with_file_name("rabbitmqctl");
    let mut ctl = Command::new(&program);
    command(&mut ctl, server.port(), server.more_ports(), server.dir());
    let output = ctl
        .args(["-n", &node_name(server.port())])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|err| format!("could not run {}: {err}", program.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!(
            "`rabbitmqctl {}` failed ({}): {text}",
            args.join(" "),
            output.status
        ))
    }
}

/// A new virtual host of `server`'s node that the default user may use.
pub fn add_vhost(server: &Server, vhost: &str) -> Result<(), String> {
    ctl(server, &["add_vhost", vhost])?;
    ctl(
        server,
        &["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
    )?;
    Ok(())
}
