//! A `redis-server` of a test's own, on a free port of 127.0.0.1 with its data in a temporary
//! directory (append-only file, fsync on every write, no RDB snapshots), that the test can stop
//! and start again on the same port and data.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A running (or stopped) Redis server; killed on drop.
pub(crate) struct RedisServer {
    binary: PathBuf,
    port: u16,
    dir: TempDir,
    child: Option<Child>,
}

/// Where the server binary is: `REDIS_SERVER_BIN`, then `PATH`, then Debian's place.
fn find_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("REDIS_SERVER_BIN") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return path;
        }
        missing(&format!(
            "REDIS_SERVER_BIN names {}, which is not a file",
            path.display()
        ));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join("redis-server"));
    for candidate in on_path.chain([
        PathBuf::from("/usr/bin/redis-server"),
        PathBuf::from("/usr/local/bin/redis-server"),
    ]) {
        if candidate.is_file() {
            return candidate;
        }
    }
    missing("found none on PATH, in /usr/bin or in /usr/local/bin");
}

fn missing(why: &str) -> ! {
    panic!(
        "the Redis tests need the `redis-server` binary (6.2 or later) and {why}. Install it \
         (Debian/Ubuntu: `apt-get install redis-server`), or set REDIS_SERVER_BIN to its path. \
         Nothing needs to run beforehand: each test starts its own `redis-server` on a free \
         port of 127.0.0.1."
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("no free port on 127.0.0.1")
}

impl RedisServer {
    /// Starts a server on a free port of 127.0.0.1.
    pub(crate) fn start() -> Self {
        let mut server = RedisServer {
            binary: find_binary(),
            port: free_port(),
            dir: tempfile::tempdir().expect("a temporary directory for the Redis data"),
            child: None,
        };
        server.start_again();
        server
    }

    /// The client URL.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The data directory (`--dir`).
    pub(crate) fn data(&self) -> &Path {
        self.dir.path()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis-server.log")
    }

    /// Kills the server (SIGKILL). With `appendfsync always`, what it confirmed is on disk.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server as an operator would (`SHUTDOWN`, as SIGTERM does): it closes its
    /// append-only file and exits. Fails, having killed the server, when it does not exit
    /// within 10 s.
    pub(crate) fn shut_down(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let asked = TcpStream::connect(("127.0.0.1", self.port)).and_then(|mut stream| {
            stream.write_all(b"*1\r\n$8\r\nSHUTDOWN\r\n")?;
            // The server closes the connection as it exits.
            let mut sink = Vec::new();
            let _ = stream.read_to_end(&mut sink);
            Ok(())
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let problem = match asked {
            Ok(()) => loop {
                match child.try_wait() {
                    Ok(Some(_)) => return Ok(()),
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Ok(None) => break "it did not exit within 10 s".to_owned(),
                    Err(err) => break format!("waiting for it failed: {err}"),
                }
            },
            Err(err) => format!("`SHUTDOWN` could not be sent: {err}"),
        };
        let _ = child.kill();
        let _ = child.wait();
        Err(format!(
            "redis-server on port {} did not stop cleanly ({problem}), so it was killed",
            self.port
        ))
    }

    /// Starts the server again on the same port and data.
    pub(crate) fn start_again(&mut self) {
        assert!(self.child.is_none(), "the Redis server is already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("the Redis server's log file");
        let err = log.try_clone().expect("the Redis server's log file");
        let child = Command::new(&self.binary)
            .args(["--bind", "127.0.0.1"])
            .args(["--port", &self.port.to_string()])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--appendonly", "yes"])
            .args(["--appendfsync", "always"])
            .args(["--save", ""])
            .args(["--daemonize", "no"])
            .args(["--protected-mode", "no"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", self.binary.display()));
        self.child = Some(child);

        // Ready once it answers PING with PONG (not LOADING while it reads its file).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.pong() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!(
                    "redis-server exited ({status}) on port {}:\n{}",
                    self.port,
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "redis-server did not answer on port {} within 10 s:\n{}",
                    self.port,
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pong(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        if stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
            return false;
        }
        let mut answer = [0u8; 7];
        stream.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
