//! `nats-server -js`: JetStream on, its store in the server's directory.
//!
//! A clean [`stop`](crate::Server::stop) writes what the server keeps in memory to its store.
//! JetStream writes a consumer's acknowledgements to disk up to 100 ms after confirming them,
//! so a server killed right after an acknowledgement delivers that message again once
//! restarted; a clean stop writes them, though a consumer's state can still be lost when the
//! stop meets a write in progress (decision 0016).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::{Server, Spec, nowhere};

/// The NATS server with JetStream.
pub const SPEC: Spec = Spec {
    binary: "nats-server",
    binary_env: "NATS_SERVER_BIN",
    places: &["/usr/sbin/nats-server", "/usr/local/bin/nats-server"],
    locate: nowhere,
    install: "Debian/Ubuntu: `apt-get install nats-server`; 2.9 or later",
    find: crate::find_binary,
    process_group: false,
    command,
    more_ports: 0,
    companion: None,
    url,
    ready: None,
    start_timeout: Duration::from_secs(10),
    stop_timeout: Duration::from_secs(10),
};

fn command(command: &mut Command, port: u16, _: &[u16], dir: &Path) {
    command
        .arg("-js")
        .args(["-a", "127.0.0.1"])
        .args(["-p", &port.to_string()])
        .arg("-sd")
        .arg(dir.join("jetstream"));
}

fn url(port: u16) -> String {
    format!("nats://127.0.0.1:{port}")
}

/// Starts a `nats-server -js` of the test's own.
///
/// # Panics
/// See [`Server::start`].
pub fn start() -> Server {
    Server::start(SPEC)
}
