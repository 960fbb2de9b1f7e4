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
    /// Per key: its TAT and its window (to compare how busy buckets of different windows are).
    tats: std::sync::Mutex<HashMap<String, (u64, u64)>>,
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

    /// Checks and, if allowed, charges every bucket, atomically. A full table makes room by
    /// forgetting idle buckets, then the least busy ones: a flood of new keys can cost other
    /// keys a little of their history, but never refuses every paid call.
    pub fn check(&self, charges: &[Charge], now: u64) -> Result<Verdict, Saturated> {
        let mut tats = self.tats.lock().expect("limiter lock");
        let new_keys = charges.iter().filter(|c| !tats.contains_key(&c.key)).count();
        if tats.len() + new_keys > self.max_keys {
            make_room(&mut tats, new_keys, self.max_keys, now);
            if tats.len() + new_keys > self.max_keys {
                return Err(Saturated);
            }
        }
        let current: Vec<Option<u64>> = charges.iter().map(|c| tats.get(&c.key).map(|e| e.0)).collect();
        let verdict = decide(charges, &current, now);
        if let Verdict::Allowed { tats: new } = &verdict {
            for (charge, tat) in charges.iter().zip(new) {
                tats.insert(charge.key.clone(), (*tat, charge.rate.window_us));
            }
        }
        Ok(verdict)
    }

    /// The bucket's TAT, if it is tracked.
    pub fn tat(&self, key: &str) -> Option<u64> {
        self.tats.lock().expect("limiter lock").get(key).map(|e| e.0)
    }

    /// Gives back what an admitted `charge` took (never below an idle bucket).
    pub fn refund(&self, charge: &Charge, now: u64) {
        let mut tats = self.tats.lock().expect("limiter lock");
        if let Some((tat, _)) = tats.get_mut(&charge.key) {
            *tat = tat.saturating_sub(charge.rate.increment_us(charge.cost)).max(now);
        }
    }

    pub fn len(&self) -> usize {
        self.tats.lock().expect("limiter lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets idle buckets.
    pub fn sweep(&self, now: u64) {
        self.tats.lock().expect("limiter lock").retain(|_, (tat, _)| *tat > now);
    }
}

/// Frees room for `new_keys` more: idle buckets first (a full bucket carries no history), then
/// the least busy, measured as the share of its window a bucket is booked ahead, (TAT − now) /
/// window, so buckets of different windows compare fairly; a sixteenth of the table at a time,
/// so the O(n) scan is paid once per many inserts. A bucket at its limit is booked a whole
/// window ahead and is forgotten last: flooding new keys cannot reset the buckets holding
/// someone back.
fn make_room(tats: &mut HashMap<String, (u64, u64)>, new_keys: usize, max_keys: usize, now: u64) {
    tats.retain(|_, (tat, _)| *tat > now);
    let excess = (tats.len() + new_keys).saturating_sub(max_keys);
    if excess == 0 {
        return;
    }
    // Booked share in millionths: exact integers, and windows are at least a second.
    let busy = |(tat, window): &(u64, u64)| {
        (u128::from(tat - now) * 1_000_000 / u128::from((*window).max(1))) as u64
    };
    let evict = excess.max(max_keys / 16).min(tats.len());
    let mut shares: Vec<u64> = tats.values().map(busy).collect();
    let (_, threshold, _) = shares.select_nth_unstable(evict - 1);
    let threshold = *threshold;
    let mut left = evict;
    tats.retain(|_, entry| {
        if left > 0 && busy(entry) <= threshold {
            left -= 1;
            return false;
        }
        true
    });
    metrics::counter!("tollgate_limiter_evictions_total").increment(evict as u64);
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
    fn a_full_table_forgets_idle_then_least_busy_buckets_and_keeps_admitting_new_keys() {
        let buckets = MemoryBuckets::new(2);
        let c = |k: &str| [charge(k, 10, 1, 1)];
        buckets.check(&c("a"), 0).unwrap();
        // "busy" spends its whole budget: its TAT is the largest in the table.
        for _ in 0..10 {
            buckets.check(&c("busy"), 0).unwrap();
        }
        assert!(matches!(buckets.check(&c("busy"), 0), Ok(Verdict::Denied { .. })));
        // A new key while both are busy: the least busy ("a") makes room, not "busy".
        assert!(matches!(buckets.check(&c("new"), 0), Ok(Verdict::Allowed { .. })));
        assert!(buckets.len() <= 2);
        assert!(matches!(buckets.check(&c("busy"), 0), Ok(Verdict::Denied { .. })), "still held back");
        // A thousand more new keys: every one admitted, the table stays bounded, and the
        // bucket at its limit is still remembered.
        for i in 0..1000 {
            assert!(matches!(buckets.check(&c(&format!("k{i}")), 0), Ok(Verdict::Allowed { .. })));
        }
        assert!(buckets.len() <= 2);
        assert!(matches!(buckets.check(&c("busy"), 0), Ok(Verdict::Denied { .. })), "never reset");
        // Idle buckets are dropped first once time has passed.
        assert!(buckets.check(&c("late"), SEC).is_ok());
    }

    #[test]
    fn eviction_compares_how_busy_buckets_are_not_their_raw_times_across_windows() {
        let buckets = MemoryBuckets::new(2);
        // A per-minute bucket at its limit (booked a whole minute ahead) ...
        let minute = [charge("held-back", 1, 60, 1)];
        buckets.check(&minute, 0).unwrap();
        // ... and an hourly spend bucket a fifth booked (12 minutes ahead: a later raw TAT).
        let hour = [charge("spend", 5, 3600, 1)];
        buckets.check(&hour, 0).unwrap();
        // A new key evicts the less busy one: the hourly bucket, not the one at its limit.
        buckets.check(&[charge("new", 10, 60, 1)], 0).unwrap();
        assert!(matches!(buckets.check(&minute, 0), Ok(Verdict::Denied { .. })), "still held back");
    }

    #[test]
    fn a_refund_gives_back_what_a_charge_took() {
        let buckets = MemoryBuckets::new(4);
        let c = [charge("k", 1, 60, 1)];
        assert!(matches!(buckets.check(&c, 0), Ok(Verdict::Allowed { .. })));
        assert!(matches!(buckets.check(&c, 0), Ok(Verdict::Denied { .. })));
        buckets.refund(&c[0], 0);
        assert!(matches!(buckets.check(&c, 0), Ok(Verdict::Allowed { .. })), "refunded");
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
