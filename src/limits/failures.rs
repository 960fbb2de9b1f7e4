//! The failed-attempt budget: how many payments a client (its API key, else its IP; never a
//! session, which a client can open more of) may get refused per window before its paid calls
//! are turned away ahead of verification. A client that has failed lately takes its unit when
//! an attempt starts (given back unless it fails), so a burst of concurrent attempts is bounded
//! too; a client with no recent failure pays only for the failures it causes.
//!
//! Why: a signature from a fresh, unfunded wallet passes local verification, and everything
//! after it costs us — store writes, a wallet-limit bucket, RPC reads. Without this, one client
//! minting wallets turns a flood into RPC load that settlement needs. Honest payers almost never
//! fail, so a small budget costs them nothing.
//!
//! Per process (a fleet allows each replica's budget; the shared ceiling in front still bounds
//! the rate), in memory and bounded like the wallet limits.

use super::LimitError;
use super::gcra::{Charge, MemoryBuckets, Rate, Verdict};
use crate::config::FailureBudgetConfig;

/// Clients tracked at most; past it the least busy are forgotten (see `gcra::make_room`).
const TRACKED_CLIENTS: usize = 100_000;

pub struct FailureBudget {
    /// `None`: the budget is off (`attempts = 0`).
    rate: Option<Rate>,
    window_seconds: u64,
    buckets: MemoryBuckets,
}

impl FailureBudget {
    pub fn from_config(c: &FailureBudgetConfig) -> FailureBudget {
        let rate = (c.attempts > 0).then(|| Rate { limit: c.attempts, window_us: c.window_secs * 1_000_000 });
        FailureBudget { rate, window_seconds: c.window_secs, buckets: MemoryBuckets::new(TRACKED_CLIENTS) }
    }

    fn charge(&self, client: &str, rate: Rate) -> Charge {
        Charge { key: client.to_owned(), rate, cost: 1 }
    }

    /// Admits a paid attempt, or refuses a client whose budget is spent. A client with no
    /// recent failure is admitted freely (honest payers, however concurrent, never wait on
    /// this); one that has failed lately takes a unit up front, so a burst of concurrent
    /// attempts cannot all pass before the first of them fails.
    pub fn admit(&self, client: &str, now_ms: u64) -> Result<Attempt, LimitError> {
        let Some(rate) = self.rate else { return Ok(Attempt { prepaid: false }) };
        let now = now_ms * 1000;
        if self.buckets.tat(client).is_none_or(|tat| tat <= now) {
            return Ok(Attempt { prepaid: false });
        }
        let charge = self.charge(client, rate);
        // Saturated cannot happen for a single key (see `gcra::make_room`).
        match self.buckets.check(std::slice::from_ref(&charge), now) {
            Ok(Verdict::Denied { tat, .. }) => {
                metrics::counter!("tollgate_limit_refusals_total", "axis" => "failed_attempts", "unit" => "requests")
                    .increment(1);
                Err(LimitError::TooManyFailures {
                    limit: rate.limit,
                    window_seconds: self.window_seconds,
                    retry_after_seconds: Verdict::retry_after_us(&charge, tat, now)
                        .div_ceil(1_000_000)
                        .max(1),
                })
            }
            _ => Ok(Attempt { prepaid: true }),
        }
    }

    /// Settles an admitted attempt: a failure keeps (or takes) its unit, anything else gives a
    /// prepaid unit back.
    pub fn settle(&self, client: &str, attempt: Attempt, failed: bool, now_ms: u64) {
        let Some(rate) = self.rate else { return };
        let charge = self.charge(client, rate);
        match (attempt.prepaid, failed) {
            (true, false) => self.buckets.refund(&charge, now_ms * 1000),
            (false, true) => {
                // Denied means the budget is already spent: nothing more to record.
                let _ = self.buckets.check(std::slice::from_ref(&charge), now_ms * 1000);
            }
            _ => {}
        }
    }
}

/// An admitted paid attempt: whether it took its unit up front.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    prepaid: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_refused_after_its_failures_and_admitted_again_after_the_retry_time() {
        let budget = FailureBudget::from_config(&FailureBudgetConfig { attempts: 3, window_secs: 60 });
        let client = "ip:192.0.2.1";
        // Successes cost nothing; three failures spend the budget.
        for _ in 0..10 {
            let attempt = budget.admit(client, 0).unwrap();
            budget.settle(client, attempt, false, 0);
        }
        for _ in 0..3 {
            let attempt = budget.admit(client, 0).unwrap();
            budget.settle(client, attempt, true, 0);
        }
        let Err(LimitError::TooManyFailures { limit: 3, window_seconds: 60, retry_after_seconds }) =
            budget.admit(client, 0)
        else {
            panic!("refused after three failures")
        };
        assert_eq!(retry_after_seconds, 20, "one failure frees every 20 s");
        assert!(budget.admit("ip:192.0.2.2", 0).is_ok(), "another client is untouched");
        // After one refill, a client that has failed lately prepays: of many concurrent
        // attempts, one is admitted; its success gives the unit back.
        let first = budget.admit(client, 20_000).unwrap();
        assert!(budget.admit(client, 20_000).is_err(), "the refill is taken by the first attempt");
        budget.settle(client, first, false, 20_000);
        assert!(budget.admit(client, 20_000).is_ok(), "a success gave its unit back");
        let off = FailureBudget::from_config(&FailureBudgetConfig { attempts: 0, window_secs: 60 });
        for _ in 0..100 {
            let attempt = off.admit("x", 0).unwrap();
            off.settle("x", attempt, true, 0);
        }
        assert!(off.admit("x", 0).is_ok(), "attempts = 0 turns it off");
    }
}
