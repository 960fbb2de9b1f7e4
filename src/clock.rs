//! Time as a dependency: stages ask a [`Clock`], tests move a [`ManualClock`] instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock time. Seconds are the unit of EIP-3009 validity windows; rate limits need
/// milliseconds.
pub trait Clock: Send + Sync + 'static {
    fn now_millis(&self) -> u64;

    fn now_unix(&self) -> u64 {
        self.now_millis() / 1000
    }
}

/// The real wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }
}

/// A clock that only moves when told to. Clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// Starts at `now_unix` seconds.
    pub fn new(now_unix: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(now_unix * 1000)))
    }

    pub fn advance(&self, secs: u64) {
        self.advance_millis(secs * 1000);
    }

    pub fn advance_millis(&self, millis: u64) {
        self.0.fetch_add(millis, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

pub type SharedClock = Arc<dyn Clock>;
