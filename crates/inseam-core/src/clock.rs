//! Time and message ids, as the app sees them: the system clock and UUID v7 ids, or, for
//! deterministic tests, a manual clock and sequential ids.
//!
//! Everything time-dependent reads the app's clock: envelope timestamps, scheduled commands,
//! saga timeouts, and (through `Store::use_clock`) when the store's relay finds a message due.

use std::fmt;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

/// A source of the current time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Now.
    fn now(&self) -> DateTime<Utc>;
}

/// The system's clock: the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told to: timeouts and scheduled messages become due exactly
/// when a test advances it.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<DateTime<Utc>>>);

impl ManualClock {
    /// A clock standing at `at`.
    pub fn new(at: DateTime<Utc>) -> Self {
        ManualClock(Arc::new(Mutex::new(at)))
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: std::time::Duration) {
        let by = chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
        let mut now = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *now = now.checked_add_signed(by).unwrap_or(*now);
    }

    /// Sets the clock to `at`.
    pub fn set(&self, at: DateTime<Utc>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = at;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A source of message ids.
pub trait IdGenerator: Send + Sync + fmt::Debug + 'static {
    /// The next id; ids must increase in the order they are generated.
    fn next_id(&self) -> uuid::Uuid;
}

/// UUID v7 ids from the system clock: the default.
#[derive(Debug, Clone, Copy, Default)]
pub struct V7Ids;

impl IdGenerator for V7Ids {
    fn next_id(&self) -> uuid::Uuid {
        uuid::Uuid::now_v7()
    }
}

/// Ids `00000000-0000-7000-8000-000000000001`, `..02`, ...: the same on every run, so that
/// flows and snapshots of tests are stable.
#[derive(Debug, Clone, Default)]
pub struct SequentialIds(Arc<std::sync::atomic::AtomicU64>);

impl IdGenerator for SequentialIds {
    fn next_id(&self) -> uuid::Uuid {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        uuid::Uuid::from_u128((0x7000_u128 << 64) | (0x8000_u128 << 48) | u128::from(n))
    }
}
