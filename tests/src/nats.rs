//! A `nats-server -js` of a test's own, on a free port with its own store directory, that the
//! test can stop and start again on the same port and store. The machine's own server, if it
//! runs one, is never touched.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A running (or stopped) NATS server with JetStream; killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

/// Where the server binary is: `NATS_SERVER_BIN`, then `PATH`, then Debian's place.
fn find_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return path;
        }
        missing(&format!(
            "NATS_SERVER_BIN names {}, which is not a file",
            path.display()
        ));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("nats-server"));
    for candidate in on_path.chain([
        PathBuf::from("/usr/sbin/nats-server"),
        PathBuf::from("/usr/local/bin/nats-server"),
    ]) {
        if candidate.is_file() {
            return candidate;
        }
    }
    missing("found none on PATH, in /usr/sbin or in /usr/local/bin");
}

fn missing(why: &str) -> ! {
    panic!(
        "this test needs the `nats-server` binary (2.9 or later) and {why}. Install it \
         (Debian/Ubuntu: `apt-get install nats-server`), or set NATS_SERVER_BIN to its path. \
         Nothing needs to run beforehand: the test starts its own `nats-server -js` on a free \
         port of 127.0.0.1."
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("no free port on 127.0.0.1")
}

impl NatsServer {
    /// Starts a server with JetStream on a free port of 127.0.0.1.
    ///
    /// # Panics
    /// When `nats-server` cannot be found (the message says how to install it) or does not
    /// start.
    pub fn start() -> Self {
        let mut server = NatsServer {
            binary: find_binary(),
            port: free_port(),
            dir: tempfile::tempdir().expect("a temporary directory for the NATS store"),
            child: None,
        };
        server.start_again();
        server
    }

    /// The client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The store directory.
    pub fn store(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Kills the server (SIGKILL: the server flushes nothing).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server the way an operator does (SIGTERM): it closes its clients' connections
    /// and writes its streams' and consumers' state before it exits (falls back to SIGKILL
    /// after 10 s).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let terminated = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .is_ok_and(|status| status.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        while terminated && Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Whether the server runs.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts the server again on the same port and store.
    ///
    /// # Panics
    /// When it is running already, or does not listen within 10 s.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "the NATS server is already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("the NATS server's log file");
        let err = log.try_clone().expect("the NATS server's log file");
        let child = Command::new(&self.binary)
            .arg("-js")
            .args(["-a", "127.0.0.1"])
            .args(["-p", &self.port.to_string()])
            .arg("-sd")
            .arg(self.dir.path().join("jetstream"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", self.binary.display()));
        self.child = Some(child);

        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!(
                    "nats-server exited ({status}) on port {}:\n{}",
                    self.port,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on port {} within 10 s:\n{}",
                self.port,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
