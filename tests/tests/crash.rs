//! Crash safety: an app under steady command load is killed with SIGKILL at random moments,
//! again and again, and restarted each time. Afterwards every committed deposit has reached
//! every group's effects exactly once, and no rolled-back deposit reached any.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use inseam::sql::SqlStore;
use inseam_tests::bank;
use inseam_tests::{Backend, TestDb};

const CHILD: &str = env!("CARGO_BIN_EXE_crash_child");

fn rounds() -> u64 {
    std::env::var("INSEAM_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20)
}

async fn killed_again_and_again(backend: Backend) {
    let db = TestDb::new(backend, "crash").await;
    let rounds = rounds();
    for round in 0..rounds {
        let mut child = Command::new(CHILD)
            .args([&db.url, &(round * 1_000_000 + 1).to_string(), "load"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the crash child");
        let delay = Duration::from_millis(fastrand::u64(200..900));
        tokio::time::sleep(delay).await;
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the child stopped by itself in round {round}: {status}");
        }
        // `kill` is SIGKILL on Unix: no destructor, no shutdown, no flush.
        child.kill().expect("kill the child");
        child.wait().expect("reap the child");
    }
    let start = Instant::now();
    let status = Command::new(CHILD)
        .args([&db.url, "0", "drain"])
        .status()
        .expect("run the draining child");
    assert!(status.success(), "draining failed: {status}");
    let store = SqlStore::connect(&db.url).await.unwrap();
    let committed = bank::deposits(store.pool()).await;
    assert!(
        committed.len() as u64 >= rounds,
        "too little load to mean anything: {} deposits in {rounds} rounds",
        committed.len()
    );
    assert!(
        committed.iter().all(|seq| seq % 11 != 0),
        "a failed deposit was committed"
    );
    for group in ["ledger", "audit"] {
        let mut handled: Vec<i64> = bank::effects(store.pool(), group)
            .await
            .into_iter()
            .map(|(seq, _)| seq)
            .collect();
        handled.sort_unstable();
        let twice = handled.windows(2).filter(|w| w[0] == w[1]).count();
        assert_eq!(twice, 0, "{group} handled {twice} deposits twice");
        assert_eq!(
            handled, committed,
            "{group}: effects differ from the committed deposits"
        );
    }
    let lag = store.lag().await.unwrap();
    assert!(lag.groups.is_empty() && lag.dead_letters == 0, "{lag:?}");
    eprintln!(
        "{backend:?}: {rounds} kills, {} committed deposits, each handled once by both groups; drained in {:?}",
        committed.len(),
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_survives_sigkill() {
    killed_again_and_again(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_survives_sigkill() {
    killed_again_and_again(Backend::Postgres).await;
}
