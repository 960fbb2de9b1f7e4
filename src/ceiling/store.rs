//! `BoundedStore`: governor's keyed state, with a hard bound on memory.
//!
//! governor's own DashMap store grows with every distinct key until `retain_recent` runs, so a
//! flood of distinct keys (rotating session ids, spoofed API keys) could grow it without limit.
//! This store keeps at most `max_keys` cells; a key that arrives when all are taken is counted
//! in one shared overflow cell instead. `retain_recent` (the sweeper) drops idle keys — a full
//! bucket carries no state, so forgetting it loses nothing.

use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::ShrinkableKeyedStateStore;

/// One bucket's theoretical arrival time, updated lock-free (as governor's in-memory state).
#[derive(Default)]
struct Cell(AtomicU64);

impl Cell {
    fn measure_and_replace<T, F, E>(&self, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut prev = self.0.load(Ordering::Acquire);
        loop {
            let (outcome, next) = f(Some(Nanos::from(prev)))?;
            match self.0.compare_exchange_weak(prev, next.as_u64(), Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(outcome),
                Err(actual) => prev = actual,
            }
        }
    }
}

pub struct BoundedStore {
    /// Keyed by a keyed hash of the client key (see `Ceiling::hash_parts`): no allocation per lookup.
    cells: DashMap<u64, Cell, nohash_hasher::BuildNoHashHasher<u64>>,
    overflow: Cell,
    max_keys: usize,
}

impl BoundedStore {
    pub fn new(max_keys: usize) -> Self {
        // Keys are already seeded hashes: hashing them again would only cost time.
        BoundedStore { cells: DashMap::default(), overflow: Cell::default(), max_keys }
    }
}

impl StateStore for BoundedStore {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(cell) = self.cells.get(key) {
            return cell.measure_and_replace(f);
        }
        if self.cells.len() >= self.max_keys {
            metrics::counter!("tollgate_ceiling_overflow_total").increment(1);
            return self.overflow.measure_and_replace(f);
        }
        self.cells.entry(*key).or_default().measure_and_replace(f)
    }
}

impl ShrinkableKeyedStateStore<u64> for BoundedStore {
    fn retain_recent(&self, drop_below: Nanos) {
        self.cells.retain(|_, cell| cell.0.load(Ordering::Acquire) > drop_below.as_u64());
    }

    fn shrink_to_fit(&self) {
        self.cells.shrink_to_fit();
    }

    fn len(&self) -> usize {
        self.cells.len()
    }

    fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }
}
