//! `redis-server` with its data in the server's directory: an append-only file written and
//! fsynced before every answer (`appendfsync always`), no RDB snapshots.
//!
//! So what the server confirmed is on disk, and a server [killed](crate::Server::kill) keeps
//! it: published entries and acknowledgements survive any restart (decision 0019). A clean
//! [`stop`](crate::Server::stop) (SIGTERM, as `SHUTDOWN`) closes the append-only file and
//! exits. The server counts as started once it answers `PING` with `PONG`: it listens while it
//! reads its file back, answering `LOADING` meanwhile.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::{Server, Spec};

/// The Redis server, 6.2 or later (the transport needs `XAUTOCLAIM`).
pub const SPEC: Spec = Spec {
    binary: "redis-server",
    binary_env: "REDIS_SERVER_BIN",
    places: &["/usr/bin/redis-server", "/usr/local/bin/redis-server"],
    install: "Debian/Ubuntu: `apt-get install redis-server`; 6.2 or later",
    find: crate::find_binary,
    process_group: false,
    command,
    more_ports: 0,
    url,
    ready: Some(pong),
    locate: crate::nowhere,
    companion: None,
    start_timeout: Duration::from_secs(10),
    stop_timeout: Duration::from_secs(10),
};

fn command(command: &mut Command, port: u16, _: &[u16], dir: &Path) {
    command
        .args(["--bind", "127.0.0.1"])
        .args(["--port", &port.to_string()])
        .arg("--dir")
        .arg(dir)
        .args(["--appendonly", "yes"])
        .args(["--appendfsync", "always"])
        .args(["--save", ""])
        .args(["--daemonize", "no"])
        .args(["--protected-mode", "no"]);
}

fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

/// Whether the server on `port` answers `PING` with `PONG` (not `LOADING`).
fn pong(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream.write_all(b"*1\r\n$4\r\nPING\r\n").is_err() {
        return false;
    }
    let mut answer = [0u8; 7];
    stream.read_exact(&mut answer).is_ok() && &answer == b"+PONG\r\n"
}

/// Starts a `redis-server` of the test's own.
///
/// # Panics
/// See [`Server::start`].
pub fn start() -> Server {
    Server::start(SPEC)
}
