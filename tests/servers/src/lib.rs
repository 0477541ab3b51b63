//! Broker servers of a test's own: each started on a free port of 127.0.0.1 with its storage
//! in a temporary directory, stopped (cleanly or killed) and started again on the same port
//! and storage, and killed when dropped. The machine's own servers are never touched.
//!
//! One [`Server`] runs any broker; a [`Spec`] says how (see [`nats`], [`redis`], [`amqp`], [`kafka`]). A broker
//! that keeps its data in another server (tansu in S3) names that one as its [`Companion`]:
//! it starts first, stays up while the broker is stopped and started again, and is killed
//! with it when the [`Server`] is dropped. The transport crates'
//! tests, the workspace's cross-process tests and the benchmarks all start their brokers here.
//!
//! A broker binary that cannot be found makes [`Server::start`] panic with a message naming
//! it and the command that installs it, as a test that needs it should fail.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub mod amqp;
pub mod kafka;
pub mod nats;
pub mod redis;

/// How to find, start and reach one broker.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// The broker's binary, as named in messages (`nats-server`).
    pub binary: &'static str,
    /// The variable that names the binary's path, checked first (`NATS_SERVER_BIN`).
    pub binary_env: &'static str,
    /// Where the binary may be besides `PATH`.
    pub places: &'static [&'static str],
    /// Where else it may be, looked up last (a binary shipped in a package).
    pub locate: fn() -> Option<PathBuf>,
    /// How to install it, for the message when it is missing.
    pub install: &'static str,
    /// How to find the binary: [`find_binary`] for most brokers.
    pub find: fn(&Spec) -> PathBuf,
    /// Whether the binary is a script that runs the server as its child: it then runs in a
    /// process group of its own, which [`Server::kill`] kills whole ([`Server::stop`] still
    /// signals the script alone, which stops its child).
    pub process_group: bool,
    /// The arguments and environment of the server on `port` (and `ports`, more free ports
    /// for what else it listens on, the first of them the companion's when it has one),
    /// keeping its data in `dir`.
    pub command: fn(&mut Command, u16, &[u16], &Path),
    /// How many more free ports it needs besides the client port (its companion's
    /// included).
    pub more_ports: usize,
    /// A server it keeps its data in, started before it on the first of its more ports.
    pub companion: Option<Companion>,
    /// The client URL of a server on `port`.
    pub url: fn(u16) -> String,
    /// Whether a server listening on `port` is ready for clients; `None` when listening is
    /// enough. (Redis listens while it reads its data back and answers `LOADING` meanwhile.)
    pub ready: Option<fn(u16) -> bool>,
    /// How long it may take to listen (and be ready).
    pub start_timeout: Duration,
    /// How long a clean stop may take before the server is killed.
    pub stop_timeout: Duration,
}

/// A server a broker keeps its data in: started once, before the broker, on the first of the
/// broker's more ports, and left running while the broker is stopped and started again.
#[derive(Debug, Clone, Copy)]
pub struct Companion {
    /// Its binary, as named in messages (`moto_server`).
    pub binary: &'static str,
    /// The variable that names the binary's path, checked first.
    pub binary_env: &'static str,
    /// Where the binary may be besides `PATH`.
    pub places: &'static [&'static str],
    /// How to install it, for the message when it is missing.
    pub install: &'static str,
    /// Its arguments and environment on `port`, keeping its data in `dir`.
    pub command: fn(&mut Command, u16, &Path),
    /// What to do once it listens on `port` (create a bucket), before the broker starts.
    pub ready: fn(u16) -> Result<(), String>,
}

/// A running (or stopped) broker server of a test's own; killed on drop, with its
/// companion.
#[derive(Debug)]
pub struct Server {
    spec: Spec,
    binary: PathBuf,
    port: u16,
    more_ports: Vec<u16>,
    dir: TempDir,
    child: Option<Child>,
    companion: Option<Child>,
}

/// No other place to look for a binary.
pub fn nowhere() -> Option<PathBuf> {
    None
}

/// A free TCP port of 127.0.0.1.
///
/// # Panics
/// When there is none.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("no free port on 127.0.0.1")
}

/// Where `spec`'s binary is: its variable, then `PATH`, then its usual places.
///
/// # Panics
/// When it is nowhere, with a message saying how to install it.
pub fn find_binary(spec: &Spec) -> PathBuf {
    find(
        spec.binary,
        spec.binary_env,
        spec.places,
        spec.locate,
        spec.install,
    )
}

fn find(
    binary: &str,
    binary_env: &str,
    places: &[&str],
    locate: fn() -> Option<PathBuf>,
    install: &str,
) -> PathBuf {
    if let Some(path) = std::env::var_os(binary_env) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return path;
        }
        missing(
            binary,
            binary_env,
            install,
            &format!("{binary_env} names {}, which is not a file", path.display()),
        );
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(binary));
    for candidate in on_path.chain(places.iter().map(PathBuf::from)) {
        if candidate.is_file() {
            return candidate;
        }
    }
    if let Some(path) = locate().filter(|path| path.is_file()) {
        return path;
    }
    missing(
        binary,
        binary_env,
        install,
        "found none on PATH or in its usual places",
    )
}

fn missing(binary: &str, env: &str, install: &str, why: &str) -> ! {
    panic!(
        "this test needs the `{binary}` binary and {why}. Install it ({install}), or set {env} \
         to its path. Nothing needs to run beforehand: the test starts its own `{binary}` on a \
         free port of 127.0.0.1.",
    );
}

/// Waits until `child` listens on `port`; panics, having killed it, when it exits or does not
/// listen within `timeout`.
fn wait_listening(child: &mut Child, binary: &str, port: u16, timeout: Duration, log: &Path) {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{binary} exited ({status}) on port {port}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{binary} did not listen on port {port} within {timeout:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Server {
    /// Starts a server of `spec` on a free port of 127.0.0.1, with its data in a new
    /// temporary directory.
    ///
    /// # Panics
    /// When the binary cannot be found (the message says how to install it) or the server
    /// does not listen within its start timeout.
    pub fn start(spec: Spec) -> Self {
        let mut server = Server {
            binary: (spec.find)(&spec),
            port: free_port(),
            more_ports: (0..spec.more_ports).map(|_| free_port()).collect(),
            dir: tempfile::tempdir().expect("a temporary directory for the broker's data"),
            child: None,
            companion: None,
            spec,
        };
        if let Some(companion) = spec.companion {
            server.start_companion(&companion);
        }
        server.start_again();
        server
    }

    fn start_companion(&mut self, companion: &Companion) {
        let binary = find(
            companion.binary,
            companion.binary_env,
            companion.places,
            nowhere,
            companion.install,
        );
        let port = *self
            .more_ports
            .first()
            .expect("a broker with a companion has a port for it among its more ports");
        let dir = self.dir.path().join(companion.binary);
        std::fs::create_dir_all(&dir).expect("the companion's directory");
        let log_path = self.dir.path().join(format!("{}.log", companion.binary));
        let log = File::create(&log_path).expect("the companion's log file");
        let err = log.try_clone().expect("the companion's log file");
        let mut command = Command::new(&binary);
        (companion.command)(&mut command, port, &dir);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", binary.display()));
        wait_listening(
            &mut child,
            companion.binary,
            port,
            self.spec.start_timeout,
            &log_path,
        );
        if let Err(problem) = (companion.ready)(port) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{} on port {port}: {problem}", companion.binary);
        }
        self.companion = Some(child);
    }

    /// The client URL.
    pub fn url(&self) -> String {
        (self.spec.url)(self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The more ports the spec asked for.
    pub fn more_ports(&self) -> &[u16] {
        &self.more_ports
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The binary the server runs.
    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// The spec the server was started with.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Makes the server stop (cleanly, then killed after its stop timeout) and its directory
    /// go once this process is gone: for a server kept in a `static`, which is never dropped.
    pub fn stop_when_gone(&self) {
        let Some(child) = &self.child else {
            return;
        };
        let target = if self.spec.process_group {
            format!("-- -{}", child.id())
        } else {
            child.id().to_string()
        };
        let script = format!(
            "while kill -0 {test} 2>/dev/null; do sleep 1; done; kill -TERM {pid} 2>/dev/null; \
             i=0; while kill -0 {pid} 2>/dev/null && [ $i -lt {wait} ]; do sleep 1; i=$((i+1)); done; \
             kill -KILL {target} 2>/dev/null; rm -rf \"$0\"",
            test = std::process::id(),
            pid = child.id(),
            wait = self.spec.stop_timeout.as_secs().max(1),
        );
        let _ = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The server's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the server runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server (SIGKILL: it flushes nothing); its companion stays up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.spec.process_group {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{}", child.id())])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server as an operator does (SIGTERM): it closes its clients' connections
    /// and writes what it keeps before it exits. Fails, having killed it, when it does not
    /// exit within the spec's stop timeout.
    pub fn stop(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let signalled = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + self.spec.stop_timeout;
        let problem = match signalled {
            Ok(status) if status.success() => loop {
                match child.try_wait() {
                    Ok(Some(_)) => return Ok(()),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok(None) => {
                        break format!("it did not exit within {:?}", self.spec.stop_timeout);
                    }
                    Err(err) => break format!("waiting for it failed: {err}"),
                }
            },
            Ok(status) => format!("`kill -TERM` exited with {status}"),
            Err(err) => format!("`kill -TERM` could not run: {err}"),
        };
        let _ = child.kill();
        let _ = child.wait();
        Err(format!(
            "{} on port {} did not stop cleanly ({problem}), so it was killed",
            self.spec.binary, self.port
        ))
    }

    /// Starts the server again on the same port and data.
    ///
    /// # Panics
    /// When it is running already, exits, or does not listen (and, when its spec says how to
    /// tell, is not ready) within the start timeout.
    pub fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "{} is already running",
            self.spec.binary
        );
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("the broker's log file");
        let err = log.try_clone().expect("the broker's log file");
        let mut command = Command::new(&self.binary);
        (self.spec.command)(&mut command, self.port, &self.more_ports, self.dir.path());
        if self.spec.process_group {
            command.process_group(0);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", self.binary.display()));
        self.child = Some(child);

        let deadline = Instant::now() + self.spec.start_timeout;
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.spec.ready.is_none_or(|ready| ready(self.port))
            {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!(
                    "{} exited ({status}) on port {}:\n{}",
                    self.spec.binary,
                    self.port,
                    self.log()
                );
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "{} did not {} on port {} within {:?}:\n{}",
                    self.spec.binary,
                    if self.spec.ready.is_some() {
                        "get ready"
                    } else {
                        "listen"
                    },
                    self.port,
                    self.spec.start_timeout,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if let Some(mut companion) = self.companion.take() {
            let _ = companion.kill();
            let _ = companion.wait();
        }
    }
}
