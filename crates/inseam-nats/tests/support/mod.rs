//! A `nats-server -js` of a test's own, on a free port with its own store directory, that the
//! test can kill and start again on the same port and store.

#![allow(dead_code)]

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A running (or stopped) NATS server with JetStream; killed on drop.
pub(crate) struct NatsServer {
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
        "the NATS tests need the `nats-server` binary (2.9 or later) and {why}. Install it \
         (Debian/Ubuntu: `apt-get install nats-server`), or set NATS_SERVER_BIN to its path. \
         Nothing needs to run beforehand: each test starts its own `nats-server -js` on a \
         free port of 127.0.0.1."
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
    pub(crate) fn start() -> Self {
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
    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats-server.log")
    }

    /// The store directory (`-sd`).
    pub(crate) fn store(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server (SIGKILL: nothing is flushed that the server had not written).
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server as an operator would (`nats-server --signal term`): it shuts down
    /// cleanly, writing what it keeps in memory to its store. JetStream writes a consumer's
    /// acknowledgements to disk up to 100 ms after confirming them, so a server killed right
    /// after an acknowledgement delivers that message again once restarted; a clean stop
    /// writes them, though a consumer's state can still be lost when the stop meets a write
    /// in progress (see decision 0016). Fails, having killed the server, when it does not exit
    /// within 10 s.
    pub(crate) fn shut_down(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let signalled = Command::new(&self.binary)
            .args(["--signal", &format!("term={}", child.id())])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        let problem = match signalled {
            Ok(status) if status.success() => loop {
                match child.try_wait() {
                    Ok(Some(_)) => return Ok(()),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok(None) => break "it did not exit within 10 s".to_owned(),
                    Err(err) => break format!("waiting for it failed: {err}"),
                }
            },
            Ok(status) => format!("`nats-server --signal term` exited with {status}"),
            Err(err) => format!("`nats-server --signal term` could not run: {err}"),
        };
        let _ = child.kill();
        let _ = child.wait();
        Err(format!(
            "nats-server on port {} did not stop cleanly ({problem}), so it was killed",
            self.port
        ))
    }

    /// Starts the server again on the same port and store.
    pub(crate) fn start_again(&mut self) {
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
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "nats-server did not listen on port {} within 10 s:\n{}",
                    self.port,
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
