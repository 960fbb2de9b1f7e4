//! GCRA (generic cell rate algorithm) over several buckets at once, all-or-nothing.
//!
//! Written here rather than taken from governor because the same decision must run in two
//! places — in process and inside one Redis Lua script for a fleet — and a paid call must pass
//! every axis (wallet, tool, …) before *any* bucket is charged; governor checks one key at a
//! time and keeps its state in process. The ceiling, which needs neither, uses governor.
//!
//! Exact integer arithmetic in microseconds: a bucket admits `limit` units per `window`; a
//! request of `cost` units advances the bucket's theoretical arrival time (TAT) by
//! `ceil(cost × window / limit)` and is admitted iff the new TAT ≤ now + window. Rounding up
//! only ever makes a bucket stricter, so no sequence of requests exceeds the configured rate
//! over any window. Values stay below 2^53, so the Lua twin (doubles) computes the same.

use std::collections::HashMap;

/// A bucket's shape: `limit` units per `window_us` microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub limit: u64,
    pub window_us: u64,
}

impl Rate {
    /// How far one request of `cost` units advances the TAT, capped just past the window so a
    /// request larger than the whole budget is refused without overflowing anything.
    pub fn increment_us(&self, cost: u64) -> u64 {
        let exact = (u128::from(cost) * u128::from(self.window_us)).div_ceil(u128::from(self.limit.max(1)));
        exact.min(u128::from(self.window_us) + 1) as u64
    }

    /// Units still available if the bucket's TAT is `tat` at `now`.
    pub fn remaining(&self, tat: u64, now: u64) -> u64 {
        let slack = (now + self.window_us).saturating_sub(tat.max(now));
        (u128::from(slack) * u128::from(self.limit) / u128::from(self.window_us.max(1))) as u64
    }
}

/// One bucket touched by a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub key: String,
    pub rate: Rate,
    pub cost: u64,
}

/// The outcome for a set of charges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every bucket admitted the request; their new TATs, in order.
    Allowed { tats: Vec<u64> },
    /// Bucket `index` refused; nothing was charged anywhere. `tat` is its current TAT.
    Denied { index: usize, tat: u64 },
}

impl Verdict {
    /// Microseconds until bucket `index` (denied with `tat`) admits `cost`.
    pub fn retry_after_us(charge: &Charge, tat: u64, now: u64) -> u64 {
        (tat.max(now) + charge.rate.increment_us(charge.cost)).saturating_sub(now + charge.rate.window_us)
    }
}

/// Decides, given the current TAT of each bucket (absent = idle).
pub fn decide(charges: &[Charge], current: &[Option<u64>], now: u64) -> Verdict {
    let mut tats = Vec::with_capacity(charges.len());
    for (index, (charge, tat)) in charges.iter().zip(current).enumerate() {
        let tat = tat.unwrap_or(now).max(now);
        let new_tat = tat + charge.rate.increment_us(charge.cost);
        if new_tat > now + charge.rate.window_us {
            return Verdict::Denied { index, tat };
        }
        tats.push(new_tat);
    }
    Verdict::Allowed { tats }
}

/// In-process buckets with a bound on how many are tracked.
#[derive(Debug)]
pub struct MemoryBuckets {
    tats: std::sync::Mutex<HashMap<String, u64>>,
    max_keys: usize,
}

/// Every bucket slot is taken by a bucket that is not idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limiter is tracking its maximum number of keys")]
pub struct Saturated;

impl MemoryBuckets {
    pub fn new(max_keys: usize) -> Self {
        MemoryBuckets { tats: std::sync::Mutex::new(HashMap::new()), max_keys }
    }

    /// Checks and, if allowed, charges every bucket, atomically.
    pub fn check(&self, charges: &[Charge], now: u64) -> Result<Verdict, Saturated> {
        let mut tats = self.tats.lock().expect("limiter lock");
        let new_keys = charges.iter().filter(|c| !tats.contains_key(&c.key)).count();
        if tats.len() + new_keys > self.max_keys {
            // Idle buckets (TAT in the past) are full: forgetting them loses nothing.
            tats.retain(|_, tat| *tat > now);
            if tats.len() + new_keys > self.max_keys {
                return Err(Saturated);
            }
        }
        let current: Vec<Option<u64>> = charges.iter().map(|c| tats.get(&c.key).copied()).collect();
        let verdict = decide(charges, &current, now);
        if let Verdict::Allowed { tats: new } = &verdict {
            for (charge, tat) in charges.iter().zip(new) {
                tats.insert(charge.key.clone(), *tat);
            }
        }
        Ok(verdict)
    }

    pub fn len(&self) -> usize {
        self.tats.lock().expect("limiter lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets idle buckets.
    pub fn sweep(&self, now: u64) {
        self.tats.lock().expect("limiter lock").retain(|_, tat| *tat > now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000;

    fn charge(key: &str, limit: u64, window_s: u64, cost: u64) -> Charge {
        Charge { key: key.into(), rate: Rate { limit, window_us: window_s * SEC }, cost }
    }

    #[test]
    fn a_burst_up_to_the_limit_passes_then_refuses_until_one_emission_interval() {
        let buckets = MemoryBuckets::new(10);
        let c = [charge("w", 3, 60, 1)];
        for i in 0..3 {
            assert!(matches!(buckets.check(&c, 0), Ok(Verdict::Allowed { .. })), "call {i}");
        }
        let Ok(Verdict::Denied { index: 0, tat }) = buckets.check(&c, 0) else { panic!("4th passes") };
        assert_eq!(Verdict::retry_after_us(&c[0], tat, 0), 20 * SEC, "one slot frees every 20 s");
        assert!(matches!(buckets.check(&c, 20 * SEC - 1), Ok(Verdict::Denied { .. })));
        assert!(matches!(buckets.check(&c, 20 * SEC), Ok(Verdict::Allowed { .. })));
    }

    #[test]
    fn all_or_nothing_a_denial_on_one_axis_charges_no_other() {
        let buckets = MemoryBuckets::new(10);
        let both = [charge("wallet", 10, 60, 1), charge("tool", 1, 60, 1)];
        assert!(matches!(buckets.check(&both, 0), Ok(Verdict::Allowed { .. })));
        assert!(matches!(buckets.check(&both, 0), Ok(Verdict::Denied { index: 1, .. })));
        let wallet_only = [charge("wallet", 10, 60, 1)];
        let Ok(Verdict::Allowed { tats }) = buckets.check(&wallet_only, 0) else { panic!() };
        assert_eq!(tats[0], 12 * SEC, "the wallet bucket was charged twice, not three times");
    }

    #[test]
    fn spend_buckets_count_units_and_refuse_a_request_bigger_than_the_budget() {
        let buckets = MemoryBuckets::new(10);
        let spend = |cost| [charge("spend", 1_000_000, 3600, cost)];
        assert!(matches!(buckets.check(&spend(600_000), 0), Ok(Verdict::Allowed { .. })));
        assert!(matches!(buckets.check(&spend(500_000), 0), Ok(Verdict::Denied { .. })));
        assert!(matches!(buckets.check(&spend(400_000), 0), Ok(Verdict::Allowed { .. })));
        let fresh = MemoryBuckets::new(10);
        assert!(matches!(fresh.check(&spend(1_000_001), 0), Ok(Verdict::Denied { .. })));
    }

    #[test]
    fn tracked_keys_stay_bounded_idle_ones_are_forgotten_first() {
        let buckets = MemoryBuckets::new(2);
        let c = |k: &str| [charge(k, 10, 1, 1)];
        buckets.check(&c("a"), 0).unwrap();
        buckets.check(&c("b"), 0).unwrap();
        assert_eq!(buckets.check(&c("c"), 0), Err(Saturated), "full of busy buckets");
        assert!(buckets.check(&c("c"), SEC).is_ok(), "a and b went idle and were dropped");
        assert!(buckets.len() <= 2);
    }

    #[test]
    fn remaining_counts_whole_units_left() {
        let rate = Rate { limit: 3, window_us: 60 * SEC };
        assert_eq!(rate.remaining(0, 0), 3);
        assert_eq!(rate.remaining(20 * SEC, 0), 2);
        assert_eq!(rate.remaining(60 * SEC, 0), 0);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Token-bucket bound: over any interval [a, b], admitted units never exceed the burst
        /// plus the refill, L + (b − a)·L/W — whatever the sequence of calls and costs.
        #[test]
        fn no_sequence_of_calls_exceeds_the_configured_rate_over_any_interval(
            limit in 1u64..20,
            window_s in 1u64..120,
            calls in proptest::collection::vec((0u64..5_000_000, 1u64..4), 1..200),
        ) {
            let buckets = MemoryBuckets::new(4);
            let rate = Rate { limit, window_us: window_s * SEC };
            let mut now = 0u64;
            let mut admitted: Vec<(u64, u64)> = Vec::new();
            for (advance, cost) in calls {
                now += advance;
                let c = [Charge { key: "k".into(), rate, cost }];
                if let Ok(Verdict::Allowed { .. }) = buckets.check(&c, now) {
                    admitted.push((now, cost));
                }
            }
            for i in 0..admitted.len() {
                let mut units = 0u128;
                for j in i..admitted.len() {
                    units += u128::from(admitted[j].1);
                    let span = u128::from(admitted[j].0 - admitted[i].0);
                    let bound = u128::from(limit) * u128::from(rate.window_us) + span * u128::from(limit);
                    proptest::prop_assert!(
                        units * u128::from(rate.window_us) <= bound,
                        "{units} units in {span} µs exceeds {limit} per {window_s} s"
                    );
                }
            }
        }

        /// A refused request is admitted once the reported retry-after has passed (if the
        /// request fits the budget at all): the advice a client gets is never too short.
        #[test]
        fn waiting_the_reported_retry_after_is_enough(
            limit in 1u64..10,
            window_s in 1u64..60,
            burst in 1usize..30,
            cost in 1u64..3,
        ) {
            let buckets = MemoryBuckets::new(4);
            let c = [Charge { key: "k".into(), rate: Rate { limit, window_us: window_s * SEC }, cost }];
            let mut denial = None;
            for _ in 0..burst {
                if let Ok(Verdict::Denied { tat, .. }) = buckets.check(&c, 0) {
                    denial = Some(tat);
                    break;
                }
            }
            if let (Some(tat), true) = (denial, cost <= limit) {
                let wait = Verdict::retry_after_us(&c[0], tat, 0);
                let admitted = matches!(buckets.check(&c, wait), Ok(Verdict::Allowed { .. }));
                proptest::prop_assert!(admitted, "refused again after waiting {} µs", wait);
            }
        }
    }
}
