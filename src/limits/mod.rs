//! Wallet limits: per wallet, per tool, per wallet×tool and per agent, in requests and
//! optionally in USDC spend per window — keyed on the *recovered* payer only.
//!
//! Guarantees: checked after local verification and before the claim, so a denial charges
//! nothing and leaves the authorization unclaimed (usable later); all of a request's buckets
//! are charged together or not at all; with the Redis backend every replica shares the
//! buckets, and an unreachable Redis refuses paid calls (fails closed) rather than letting
//! them through unlimited. Does not check: anything before verification (that is the ceiling).

pub mod failures;
pub mod gcra;
pub mod redis;

use std::fmt;

use gcra::{Charge, MemoryBuckets, Rate, Verdict};

use crate::config::{Axis, LimitBackend, LimitsConfig, secret_opt};
use crate::money::UsdcAmount;
use crate::payment::verify::Payer;

/// Who and what a paid call is, for the limit keys.
pub struct LimitRequest<'a> {
    pub payer: Payer,
    pub tool: &'a str,
    /// The caller's client key (session, API key or IP), as the ceiling derived it.
    pub agent: &'a str,
    pub amount: UsdcAmount,
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Requests,
    /// USDC atomic units.
    Spend,
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Unit::Requests => "requests",
            Unit::Spend => "usdc_atomic",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("rate limited on the {axis} axis: {limit} {unit} per {window_seconds}s")]
    Exceeded {
        axis: Axis,
        unit: Unit,
        limit: u64,
        window_seconds: u64,
        remaining: u64,
        retry_after_seconds: u64,
    },
    #[error("the rate limiter is unavailable; paid calls are refused until it returns")]
    Unavailable,
    #[error("the rate limiter is saturated; retry shortly")]
    Saturated,
    #[error("too many refused payments from this client: {limit} per {window_seconds}s")]
    TooManyFailures { limit: u64, window_seconds: u64, retry_after_seconds: u64 },
    /// The wallet's funds vanished between a paid run and its settlement (`on_success`).
    #[error(
        "this wallet is refused paid calls for a while: a recent call ran and its payment could not be settled"
    )]
    Penalized { retry_after_seconds: u64 },
}

/// One configured limit, compiled.
#[derive(Debug, Clone)]
struct Rule {
    axis: Axis,
    /// Only this tool, when set.
    tool: Option<String>,
    unit: Unit,
    rate: Rate,
    window_seconds: u64,
}

enum Backend {
    Memory(MemoryBuckets),
    Redis(redis::RedisBuckets),
}

pub struct WalletLimits {
    rules: Vec<Rule>,
    backend: Backend,
    /// In memory: payer key → penalised until (ms). Bounded by `max_tracked_keys`.
    penalties: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    max_penalties: usize,
}

impl WalletLimits {
    pub async fn from_config(c: &LimitsConfig) -> anyhow::Result<WalletLimits> {
        let backend = match c.backend {
            LimitBackend::Memory => Backend::Memory(MemoryBuckets::new(c.max_tracked_keys)),
            LimitBackend::Redis => {
                let url = secret_opt(&c.redis_url)
                    .ok_or_else(|| anyhow::anyhow!("limits.redis_url is required"))?;
                Backend::Redis(redis::RedisBuckets::connect(url, &c.key_prefix).await?)
            }
        };
        let mut rules = Vec::new();
        for r in &c.rules {
            let window_us = r.window_secs * 1_000_000;
            let tool = (!r.tool.is_empty()).then(|| r.tool.clone());
            if r.requests > 0 {
                let rate = Rate { limit: r.requests, window_us };
                rules.push(Rule {
                    axis: r.axis,
                    tool: tool.clone(),
                    unit: Unit::Requests,
                    rate,
                    window_seconds: r.window_secs,
                });
            }
            if let Some(spend) = r.spend {
                let rate = Rate { limit: spend.atomic(), window_us };
                rules.push(Rule {
                    axis: r.axis,
                    tool,
                    unit: Unit::Spend,
                    rate,
                    window_seconds: r.window_secs,
                });
            }
        }
        Ok(WalletLimits { rules, backend, penalties: Default::default(), max_penalties: c.max_tracked_keys })
    }

    /// Refuses `payer`'s paid calls on the wallet axis until `now_ms + secs`, in every replica
    /// sharing the backend. Best effort: a penalty that cannot be stored is logged, never fatal.
    pub async fn penalize(&self, payer: Payer, secs: u64, now_ms: u64) {
        if secs == 0 {
            return;
        }
        let until = now_ms + secs * 1000;
        metrics::counter!("tollgate_wallet_penalties_total").increment(1);
        match &self.backend {
            Backend::Memory(_) => {
                let mut penalties = self.penalties.lock().expect("penalty lock");
                if penalties.len() >= self.max_penalties {
                    penalties.retain(|_, t| *t > now_ms);
                }
                if penalties.len() < self.max_penalties {
                    penalties.insert(payer.key(), until);
                }
            }
            Backend::Redis(r) => {
                if let Err(e) = r.penalize(&payer.key(), until, secs * 1000).await {
                    tracing::warn!(error = %e, "could not store a wallet penalty");
                }
            }
        }
    }

    async fn penalized_until(&self, payer: Payer) -> Result<Option<u64>, LimitError> {
        match &self.backend {
            Backend::Memory(_) => Ok(self.penalties.lock().expect("penalty lock").get(&payer.key()).copied()),
            Backend::Redis(r) => r.penalty(&payer.key()).await.map_err(|e| {
                tracing::warn!(error = %e, "wallet limiter (redis) unavailable; refusing paid calls");
                LimitError::Unavailable
            }),
        }
    }

    /// Admits the call on every axis, or says which axis refused and when to retry.
    pub async fn check(&self, req: &LimitRequest<'_>, now_ms: u64) -> Result<(), LimitError> {
        if let Some(until) = self.penalized_until(req.payer).await?
            && until > now_ms
        {
            return Err(LimitError::Penalized { retry_after_seconds: (until - now_ms).div_ceil(1000) });
        }
        let applicable: Vec<&Rule> =
            self.rules.iter().filter(|r| r.tool.as_deref().is_none_or(|t| t == req.tool)).collect();
        let charges: Vec<Charge> = applicable
            .iter()
            .enumerate()
            .map(|(i, rule)| Charge {
                key: bucket_key(i, rule, req),
                rate: rule.rate,
                cost: match rule.unit {
                    Unit::Requests => 1,
                    Unit::Spend => req.amount.atomic(),
                },
            })
            .collect();
        if charges.is_empty() {
            return Ok(());
        }
        let now_us = now_ms * 1000;
        let verdict = match &self.backend {
            Backend::Memory(m) => m.check(&charges, now_us).map_err(|_| LimitError::Saturated)?,
            Backend::Redis(r) => r.check(&charges, now_us).await.map_err(|e| {
                metrics::counter!("tollgate_limiter_unavailable_total").increment(1);
                tracing::warn!(error = %e, "wallet limiter (redis) unavailable; refusing paid calls");
                LimitError::Unavailable
            })?,
        };
        let Verdict::Denied { index, tat } = verdict else { return Ok(()) };
        let rule = applicable[index];
        let retry_us = Verdict::retry_after_us(&charges[index], tat, now_us);
        metrics::counter!("tollgate_limit_refusals_total", "axis" => rule.axis.as_str(), "unit" => rule.unit.to_string())
            .increment(1);
        Err(LimitError::Exceeded {
            axis: rule.axis,
            unit: rule.unit,
            limit: rule.rate.limit,
            window_seconds: rule.window_seconds,
            remaining: rule.rate.remaining(tat, now_us),
            retry_after_seconds: retry_us.div_ceil(1_000_000),
        })
    }

    /// Readiness: Redis answers (always true in memory).
    pub async fn ping(&self) -> bool {
        match &self.backend {
            Backend::Memory(_) => true,
            Backend::Redis(r) => r.ping().await.is_ok(),
        }
    }

    /// Forgets idle in-memory buckets (Redis expires them itself).
    pub fn sweep(&self, now_ms: u64) {
        if let Backend::Memory(m) = &self.backend {
            m.sweep(now_ms * 1000);
        }
    }
}

/// `<rule index>:<axis>:<subject>`: rules never share a bucket, subjects never collide.
fn bucket_key(index: usize, rule: &Rule, req: &LimitRequest<'_>) -> String {
    let subject = match rule.axis {
        Axis::Wallet => req.payer.key(),
        Axis::Tool => req.tool.to_owned(),
        Axis::WalletTool => format!("{}:{}", req.payer.key(), req.tool),
        Axis::Agent => req.agent.to_owned(),
    };
    format!("limit:{index}:{}:{subject}", rule.axis.as_str())
}
