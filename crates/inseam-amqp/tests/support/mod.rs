//! A RabbitMQ node of a test's own: its own node name, free AMQP and distribution ports of
//! 127.0.0.1, its database, logs, configuration and Erlang cookie in a temporary directory, no
//! plugins. The test can stop it and start it again on the same ports and database.

#![allow(dead_code)]

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long a node may take to start (the Erlang VM and the boot steps take seconds).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A running (or stopped) RabbitMQ node; stopped on drop.
pub(crate) struct RabbitNode {
    server: PathBuf,
    ctl: PathBuf,
    name: String,
    port: u16,
    dist_port: u16,
    dir: TempDir,
    child: Option<Child>,
}

/// Where `rabbitmq-server` and `rabbitmqctl` are: `RABBITMQ_BIN_DIR`, then the package's own
/// scripts in `/usr/lib/rabbitmq/bin` (Debian's `/usr/sbin` wrappers switch to the `rabbitmq`
/// user when run as root, who cannot write a test's temporary directory), then `PATH`.
fn find_binaries() -> (PathBuf, PathBuf) {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("RABBITMQ_BIN_DIR") {
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
            return (server, ctl);
        }
    }
    panic!(
        "the RabbitMQ tests need `rabbitmq-server` and `rabbitmqctl` (RabbitMQ 3.8 or later, for \
         quorum queues) and found them neither in RABBITMQ_BIN_DIR, /usr/lib/rabbitmq/bin nor \
         on PATH. Install them (Debian/Ubuntu: `apt-get install rabbitmq-server`), or set \
         RABBITMQ_BIN_DIR to their directory. Nothing needs to run beforehand: the tests start \
         their own node on free ports of 127.0.0.1 (never the machine's broker on 5672)."
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("no free port on 127.0.0.1")
}

impl RabbitNode {
    /// Starts a node on free ports of 127.0.0.1 and waits until it accepts AMQP connections.
    pub(crate) fn start() -> Self {
        let (server, ctl) = find_binaries();
        let dir = tempfile::tempdir().expect("a temporary directory for the RabbitMQ node");
        std::fs::create_dir_all(dir.path().join("home")).expect("the node's home directory");
        std::fs::write(dir.path().join("enabled_plugins"), "[].\n").expect("the plugins file");
        std::fs::write(dir.path().join("rabbitmq.conf"), "loopback_users = none\n")
            .expect("the configuration file");
        std::fs::write(dir.path().join("rabbitmq-env.conf"), "").expect("the environment file");
        let mut node = RabbitNode {
            server,
            ctl,
            name: format!("inseam-{}@localhost", uuid::Uuid::now_v7().simple()),
            port: free_port(),
            dist_port: free_port(),
            dir,
            child: None,
        };
        node.start_again();
        node
    }

    /// The AMQP URL of the node's default virtual host, with its default user.
    pub(crate) fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The AMQP URL of virtual host `vhost`.
    pub(crate) fn vhost_url(&self, vhost: &str) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/{vhost}", self.port)
    }

    /// The AMQP port.
    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("rabbitmq-server.log")
    }

    /// Commands for the node's scripts, with its environment.
    fn command(&self, program: &Path) -> Command {
        let dir = self.dir.path();
        let mut command = Command::new(program);
        command
            .env("HOME", dir.join("home"))
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_FEATURE_FLAGS_FILE", dir.join("feature_flags"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", dir.join("plugins-expand"))
            .stdin(Stdio::null());
        command
    }

    /// Runs `rabbitmqctl -n <node> <args>`, failing with its output.
    pub(crate) fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let output = self
            .command(&self.ctl)
            .args(["-n", &self.name])
            .args(args)
            .output()
            .map_err(|err| format!("could not run {}: {err}", self.ctl.display()))?;
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

    /// A new virtual host that the default user may use.
    pub(crate) fn add_vhost(&self, vhost: &str) -> Result<(), String> {
        self.ctl(&["add_vhost", vhost])?;
        self.ctl(&["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"])?;
        Ok(())
    }

    /// Stops the node as an operator would (`rabbitmqctl stop`: a clean shutdown) and waits
    /// for its process to exit; kills it when it does not within 30 s.
    pub(crate) fn shut_down(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let stopped = self.ctl(&["stop"]);
        let deadline = Instant::now() + Duration::from_secs(30);
        let problem = match stopped {
            Ok(_) => loop {
                match child.try_wait() {
                    Ok(Some(_)) => break None,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Ok(None) => break Some("it did not exit within 30 s".to_owned()),
                    Err(err) => break Some(format!("waiting for it failed: {err}")),
                }
            },
            Err(err) => Some(err),
        };
        // The script's child (the Erlang VM) has exited once `rabbitmqctl stop` returned;
        // wait until the port is free too.
        let free_by = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < free_by {
            std::thread::sleep(Duration::from_millis(50));
        }
        match problem {
            None => Ok(()),
            Some(problem) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(format!(
                    "RabbitMQ node {} did not stop cleanly ({problem}), so it was killed",
                    self.name
                ))
            }
        }
    }

    /// Starts the node again on the same ports and database, and waits until it accepts
    /// AMQP connections.
    pub(crate) fn start_again(&mut self) {
        assert!(self.child.is_none(), "the RabbitMQ node is already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("the RabbitMQ node's log file");
        let err = log.try_clone().expect("the RabbitMQ node's log file");
        let child = self
            .command(&self.server)
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", self.server.display()));
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // The port opens once the boot steps are done.
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!(
                    "rabbitmq-server exited ({status}) for node {}:\n{}",
                    self.name,
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "RabbitMQ node {} did not listen on port {} within {START_TIMEOUT:?}:\n{}",
                    self.name,
                    self.port,
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Makes the node stop itself once process `pid` (the test process) is gone: for a node
    /// kept in a `static`, which is never dropped.
    pub(crate) fn stop_when_gone(&self, pid: u32) {
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \"$0\" -n \"$1\" stop >/dev/null 2>&1; \
             sleep 2; rm -rf \"$2\""
        );
        let _ = self
            .command(Path::new("/bin/sh"))
            .arg("-c")
            .arg(script)
            .arg(&self.ctl)
            .arg(&self.name)
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.shut_down();
        }
    }
}
