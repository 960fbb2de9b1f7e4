//! The failed-attempt budget: how many payments a client (its API key, else its IP; never a
//! session, which a client can open more of) may get refused per window before its paid calls
//! are turned away ahead of verification.
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

    /// Refuses a client whose budget is spent; spends nothing.
    pub fn admit(&self, client: &str, now_ms: u64) -> Result<(), LimitError> {
        let Some(rate) = self.rate else { return Ok(()) };
        let charge = self.charge(client, rate);
        let now = now_ms * 1000;
        match self.buckets.peek(std::slice::from_ref(&charge), now) {
            Verdict::Allowed { .. } => Ok(()),
            Verdict::Denied { tat, .. } => {
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
        }
    }

    /// Records one refused payment against `client`.
    pub fn spend(&self, client: &str, now_ms: u64) {
        let Some(rate) = self.rate else { return };
        metrics::counter!("tollgate_payment_failures_total").increment(1);
        // Denied means already spent; Saturated cannot happen for one key (see make_room).
        let _ = self.buckets.check(&[self.charge(client, rate)], now_ms * 1000);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_is_refused_after_its_failures_and_admitted_again_after_the_retry_time() {
        let budget = FailureBudget::from_config(&FailureBudgetConfig { attempts: 3, window_secs: 60 });
        for _ in 0..3 {
            assert!(budget.admit("ip:192.0.2.1", 0).is_ok());
            budget.spend("ip:192.0.2.1", 0);
        }
        let Err(LimitError::TooManyFailures { limit: 3, window_seconds: 60, retry_after_seconds }) =
            budget.admit("ip:192.0.2.1", 0)
        else {
            panic!("refused after three failures")
        };
        assert_eq!(retry_after_seconds, 20, "one failure frees every 20 s");
        assert!(budget.admit("ip:192.0.2.2", 0).is_ok(), "another client is untouched");
        assert!(budget.admit("ip:192.0.2.1", 20_000).is_ok());
        let off = FailureBudget::from_config(&FailureBudgetConfig { attempts: 0, window_secs: 60 });
        off.spend("x", 0);
        assert!(off.admit("x", 0).is_ok(), "attempts = 0 turns it off");
    }
}
