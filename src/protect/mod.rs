//! Protecting the API behind the tools: each `[[upstream]]`'s own budget (a quota across all
//! payers, a cap on calls in flight), a pause while its provider says it is throttled, and a
//! result cache for read tools — all decided before anyone pays.
//!
//! Guarantees:
//! - a refusal ([`UpstreamRefusal`]) comes before any claim or settlement, so it charges
//!   nothing and the authorization stays usable;
//! - an admitted call ([`Admission`]) holds its in-flight slot from admission, through the
//!   settlement and the handler, and gives it back on every path (it is dropped); a call that
//!   never reached the upstream gives its quota back too;
//! - in fleet mode (`limits.backend = "redis"`) the quota, the pauses and the cache are shared
//!   by every replica; the in-flight cap is per replica;
//! - a throttle signal in an answer ([`throttle`]) pauses sales of that upstream's live calls
//!   until the retry time (a cached answer asks the upstream nothing, and is still served);
//!   nothing here ever retries a call.
//!
//! Does not check wallet limits (`limits`) or whether the upstream answers (`ToolEntry::ready`).

pub mod cache;
pub mod throttle;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use regex::RegexSet;
use rmcp::model::CallToolResult;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::clock::SharedClock;
use crate::config::{Config, LimitBackend, QuotaConfig, UpstreamConfig, secret_opt};
use crate::limits::gcra::{Charge, MemoryBuckets, Rate, Verdict};
use crate::limits::redis::RedisBuckets;
use crate::money::UsdcAmount;
use cache::{Bounds, CachedAnswer, ResultCache};

/// Why a call into an upstream is refused before payment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamRefusal {
    #[error(
        "upstream `{upstream}` is throttled by its provider; its tools are not sold for {retry_after_seconds}s"
    )]
    Paused { upstream: String, retry_after_seconds: u64 },
    #[error("upstream `{upstream}` has used its quota of {limit} requests per {window_seconds}s")]
    Quota { upstream: String, limit: u64, window_seconds: u64, remaining: u64, retry_after_seconds: u64 },
    #[error("upstream `{upstream}` already has {limit} calls in flight")]
    Busy { upstream: String, limit: u32 },
    #[error("the upstream budget (redis) is unavailable; calls to `{upstream}` are refused until it returns")]
    Unavailable { upstream: String },
}

impl UpstreamRefusal {
    /// The metric label and the `reason` of the structured refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            UpstreamRefusal::Paused { .. } => "paused",
            UpstreamRefusal::Quota { .. } => "quota",
            UpstreamRefusal::Busy { .. } => "in_flight",
            UpstreamRefusal::Unavailable { .. } => "unavailable",
        }
    }

    pub fn upstream(&self) -> &str {
        match self {
            UpstreamRefusal::Paused { upstream, .. }
            | UpstreamRefusal::Quota { upstream, .. }
            | UpstreamRefusal::Busy { upstream, .. }
            | UpstreamRefusal::Unavailable { upstream } => upstream,
        }
    }
}

/// One tool's cache settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    pub ttl_secs: u64,
    pub cached_price: Option<UsdcAmount>,
}

/// One upstream's budget and state.
#[derive(Debug)]
pub struct UpstreamGuard {
    pub name: String,
    quota: Option<(Rate, QuotaConfig)>,
    slots: Option<Arc<Semaphore>>,
    max_in_flight: u32,
    patterns: RegexSet,
    pause_secs: u64,
    /// Until when (ms, service clock) this replica knows the upstream is paused.
    paused_until_ms: AtomicU64,
    /// Remote tool name → its cache policy.
    cached_tools: HashMap<String, CachePolicy>,
}

/// Where quotas and pauses live.
enum Shared {
    Memory(MemoryBuckets),
    Redis(RedisBuckets),
}

pub struct Protection {
    upstreams: HashMap<String, Arc<UpstreamGuard>>,
    shared: Arc<Shared>,
    pub cache: Arc<ResultCache>,
    clock: SharedClock,
    /// How long an answer stays payable at its cached price after the TTL: an offer made at that
    /// price lives `payment.max_timeout_seconds`.
    offer_grace_secs: u64,
}

/// A protected tool: its upstream's guard and its own cache policy.
#[derive(Debug, Clone)]
pub struct Protected {
    pub guard: Arc<UpstreamGuard>,
    pub cache: Option<CachePolicy>,
    /// The cache key: the tool's catalog name and the SHA-256 of its canonical arguments.
    key: String,
}

/// How an admitted paid call is served.
pub enum Service {
    /// From the cache: the upstream is not called.
    Cached(Arc<CachedAnswer>),
    /// By the upstream (or a built-in tool, with no admission).
    Live(Option<Admission>),
}

impl Service {
    /// The time of the cached answer served, for the receipt.
    pub fn cached_at(&self) -> Option<u64> {
        match self {
            Service::Cached(answer) => Some(answer.at),
            Service::Live(_) => None,
        }
    }
}

/// A call admitted into its upstream: holds an in-flight slot and a unit of quota until it is
/// dropped. Dropped before [`Admission::started`] (the call never reached the upstream: the
/// settlement failed, the payer went away), the quota is given back.
pub struct Admission {
    protected: Protected,
    shared: Arc<Shared>,
    cache: Arc<ResultCache>,
    clock: SharedClock,
    cache_keep_secs: u64,
    slot: Option<OwnedSemaphorePermit>,
    quota: Option<Charge>,
    ran: bool,
}

impl Protection {
    pub async fn from_config(config: &Config, clock: SharedClock) -> anyhow::Result<Protection> {
        let t = &config.tools;
        let bounds = Bounds { max_entries: t.cache_max_entries, max_bytes: t.cache_max_bytes };
        let (shared, cache) = match config.limits.backend {
            LimitBackend::Memory => {
                let keys = config.upstream.len().max(1);
                (Shared::Memory(MemoryBuckets::new(keys)), ResultCache::memory(bounds))
            }
            LimitBackend::Redis => {
                let url = secret_opt(&config.limits.redis_url)
                    .ok_or_else(|| anyhow::anyhow!("limits.redis_url is required"))?;
                let prefix = &config.limits.key_prefix;
                let buckets = RedisBuckets::connect(url, prefix).await?;
                let cache = ResultCache::redis(buckets.connection(), prefix, bounds);
                (Shared::Redis(buckets), cache)
            }
        };
        let upstreams =
            config.upstream.iter().map(|u| (u.name.clone(), Arc::new(UpstreamGuard::new(u)))).collect();
        let offer_grace_secs = config.payment.max_timeout_seconds;
        let (shared, cache) = (Arc::new(shared), Arc::new(cache));
        Ok(Protection { upstreams, shared, cache, clock, offer_grace_secs })
    }

    /// Protects nothing (no upstreams): for a pipeline built without a config.
    pub fn none(clock: SharedClock) -> Protection {
        let bounds = Bounds { max_entries: 1, max_bytes: 1024 };
        Protection {
            upstreams: HashMap::new(),
            shared: Arc::new(Shared::Memory(MemoryBuckets::new(1))),
            cache: Arc::new(ResultCache::memory(bounds)),
            clock,
            offer_grace_secs: 0,
        }
    }

    /// The protection of `entry` for these arguments, if it is an upstream's tool.
    /// `tool` is the catalog's name; `upstream` and `remote` say where it comes from
    /// (`ToolEntry::upstream`).
    pub fn of(&self, tool: &str, (upstream, remote): (&str, &str), args_hash: &str) -> Option<Protected> {
        let guard = self.upstreams.get(upstream)?.clone();
        let cache = guard.cached_tools.get(remote).copied();
        Some(Protected { guard, cache, key: format!("{tool}:{args_hash}") })
    }

    /// Refuses while the upstream is paused, and while the fleet's pauses cannot be read.
    pub async fn check_paused(&self, guard: &UpstreamGuard) -> Result<(), UpstreamRefusal> {
        match self.pause(guard).await? {
            Some(paused) => Err(self.refused(paused)),
            None => Ok(()),
        }
    }

    /// Refuses a challenge while the upstream is paused, unless the call would be answered
    /// from the cache, which asks the upstream nothing. The cache is read only during a pause:
    /// challenges are free to ask for, and a cached answer can be large.
    pub async fn check_challenge(&self, p: &Protected) -> Result<(), UpstreamRefusal> {
        match self.pause(&p.guard).await? {
            Some(paused) if self.fresh(p).await.is_none() => Err(self.refused(paused)),
            _ => Ok(()),
        }
    }

    /// The refusal a pause of the upstream makes now, not yet counted; `Err` when the fleet's
    /// pauses cannot be read.
    async fn pause(&self, guard: &UpstreamGuard) -> Result<Option<UpstreamRefusal>, UpstreamRefusal> {
        let now = self.clock.now_millis();
        let until = self.paused_until(guard).await.map_err(|e| {
            tracing::warn!(error = %e, upstream = %guard.name, "upstream budget (redis) unavailable");
            self.refused(UpstreamRefusal::Unavailable { upstream: guard.name.clone() })
        })?;
        Ok(until.filter(|&until| until > now).map(|until| UpstreamRefusal::Paused {
            upstream: guard.name.clone(),
            retry_after_seconds: (until - now).div_ceil(1000),
        }))
    }

    /// Until when (ms) the upstream is paused, if it is: this replica's knowledge, and in fleet
    /// mode the fleet's. Counts no refusal: a listing that reads it refuses nobody.
    async fn paused_until(&self, guard: &UpstreamGuard) -> redis::RedisResult<Option<u64>> {
        let local = guard.paused_until_ms.load(Ordering::SeqCst);
        let shared = match &*self.shared {
            Shared::Memory(_) => None,
            Shared::Redis(r) => r.penalty(&pause_key(&guard.name)).await?,
        };
        let until = local.max(shared.unwrap_or(0));
        Ok((until > 0).then_some(until))
    }

    /// Every upstream paused now, by name (one that cannot be read is left out: a listing still
    /// answers, and a call to it is refused `unavailable` by [`Protection::check_paused`]).
    pub async fn paused(&self) -> HashMap<String, Pause> {
        let now = self.clock.now_millis();
        let mut paused = HashMap::new();
        for guard in self.upstreams.values() {
            if let Ok(Some(until)) = self.paused_until(guard).await
                && until > now
            {
                let pause =
                    Pause { until: until.div_ceil(1000), retry_after_seconds: (until - now).div_ceil(1000) };
                paused.insert(guard.name.clone(), pause);
            }
        }
        paused
    }

    /// A cached answer young enough to be served at the cached price now (for the quote).
    pub async fn fresh(&self, p: &Protected) -> Option<Arc<CachedAnswer>> {
        let policy = p.cache?;
        self.cache.get(&p.key, self.clock.now_unix(), policy.ttl_secs).await
    }

    /// How a call paying `paid` is served: from the cache when it caches, an answer is there
    /// and the payment is for a cached answer (its `cached_price`, or any price when it has
    /// none); else by the upstream, admitted by its budget and state.
    pub async fn serve(&self, p: &Protected, paid: Option<UsdcAmount>) -> Result<Service, UpstreamRefusal> {
        if let Some(policy) = p.cache {
            let (name, tool) = (p.guard.name.clone(), tool_label(&p.key));
            // A payment at the cached price may come from an offer made while the answer was
            // young: it is served that answer while the offer lives.
            let max_age = match (policy.cached_price, paid) {
                (None, _) | (Some(_), None) => Some(policy.ttl_secs),
                (Some(cached), Some(paid)) if cached == paid => Some(policy.ttl_secs + self.offer_grace_secs),
                (Some(_), Some(_)) => None,
            };
            let found = match max_age {
                Some(max_age) => self.cache.get(&p.key, self.clock.now_unix(), max_age).await,
                None => None,
            };
            let count = |outcome: &'static str| {
                metrics::counter!("tollgate_upstream_cache_total", "upstream" => name, "tool" => tool, "outcome" => outcome)
                    .increment(1)
            };
            if let Some(answer) = found {
                count("hit");
                return Ok(Service::Cached(answer));
            }
            // A miss is a call of a cached tool that goes to the upstream, whatever the reason;
            // a call refused here reaches nothing, and is counted as a refusal.
            let admission = self.admit(p).await?;
            count("miss");
            return Ok(Service::Live(Some(admission)));
        }
        self.admit(p).await.map(|a| Service::Live(Some(a)))
    }

    /// Admits a call into the upstream: not paused, a slot free, quota left (charged now).
    pub async fn admit(&self, p: &Protected) -> Result<Admission, UpstreamRefusal> {
        let guard = &p.guard;
        self.check_paused(guard).await?;
        let slot = match &guard.slots {
            None => None,
            Some(slots) => match slots.clone().try_acquire_owned() {
                Ok(slot) => Some(slot),
                Err(_) => {
                    let busy =
                        UpstreamRefusal::Busy { upstream: guard.name.clone(), limit: guard.max_in_flight };
                    return Err(self.refused(busy));
                }
            },
        };
        let quota = match guard.quota {
            None => None,
            Some((rate, q)) => Some(self.charge_quota(guard, rate, q).await?),
        };
        let admission = Admission {
            protected: p.clone(),
            shared: self.shared.clone(),
            cache: self.cache.clone(),
            clock: self.clock.clone(),
            cache_keep_secs: p.cache.map_or(0, |c| c.ttl_secs + self.offer_grace_secs),
            slot,
            quota,
            ran: false,
        };
        admission.report_in_flight();
        Ok(admission)
    }

    async fn charge_quota(
        &self,
        guard: &UpstreamGuard,
        rate: Rate,
        q: QuotaConfig,
    ) -> Result<Charge, UpstreamRefusal> {
        let charge = Charge { key: quota_key(&guard.name), rate, cost: 1 };
        let now_us = self.clock.now_millis() * 1000;
        let verdict = match &*self.shared {
            // The table holds one key per upstream: it cannot saturate.
            Shared::Memory(m) => {
                m.check(std::slice::from_ref(&charge), now_us).unwrap_or(Verdict::Allowed { tats: vec![] })
            }
            Shared::Redis(r) => r.check(std::slice::from_ref(&charge), now_us).await.map_err(|e| {
                tracing::warn!(error = %e, upstream = %guard.name, "upstream budget (redis) unavailable");
                self.refused(UpstreamRefusal::Unavailable { upstream: guard.name.clone() })
            })?,
        };
        let gauge = |tat: u64| {
            metrics::gauge!("tollgate_upstream_quota_remaining", "upstream" => guard.name.clone())
                .set(rate.remaining(tat, now_us) as f64);
        };
        match verdict {
            Verdict::Allowed { tats } => {
                gauge(tats.first().copied().unwrap_or(now_us));
                Ok(charge)
            }
            Verdict::Denied { tat, .. } => {
                gauge(tat);
                let retry_us = Verdict::retry_after_us(&charge, tat, now_us);
                Err(self.refused(UpstreamRefusal::Quota {
                    upstream: guard.name.clone(),
                    limit: q.requests,
                    window_seconds: q.window_secs,
                    remaining: rate.remaining(tat, now_us),
                    retry_after_seconds: retry_us.div_ceil(1_000_000).max(1),
                }))
            }
        }
    }

    /// Reads the throttle signals in the answer of a call that ran without an admission: a
    /// payment that settled before its handler ran (a retry, or the recovery of one whose
    /// request ended) runs whatever the upstream's state, since its money has moved, and what
    /// the upstream answers it still pauses sales.
    pub async fn observe_unadmitted(&self, upstream: &str, result: &CallToolResult) {
        if let Some(guard) = self.upstreams.get(upstream) {
            observe(guard, &self.shared, self.clock.now_millis(), result).await;
        }
    }

    /// Counts a refusal (by upstream and reason) on its way out.
    fn refused(&self, refusal: UpstreamRefusal) -> UpstreamRefusal {
        metrics::counter!("tollgate_upstream_refusals_total", "upstream" => refusal.upstream().to_owned(), "reason" => refusal.reason())
            .increment(1);
        refusal
    }
}

impl UpstreamGuard {
    fn new(c: &UpstreamConfig) -> UpstreamGuard {
        let quota = c.quota.map(|q| (Rate { limit: q.requests, window_us: q.window_secs * 1_000_000 }, q));
        let slots = (c.max_in_flight > 0).then(|| Arc::new(Semaphore::new(c.max_in_flight as usize)));
        let patterns = RegexSet::new(&c.throttle_patterns).expect("patterns are checked by Config::validate");
        let cached_tools = c
            .tools
            .iter()
            .filter(|(_, t)| t.cache_ttl_secs > 0)
            .map(|(name, t)| {
                (name.clone(), CachePolicy { ttl_secs: t.cache_ttl_secs, cached_price: t.cached_price })
            })
            .collect();
        UpstreamGuard {
            name: c.name.clone(),
            quota,
            slots,
            max_in_flight: c.max_in_flight,
            patterns,
            pause_secs: c.throttle_pause_secs,
            paused_until_ms: AtomicU64::new(0),
            cached_tools,
        }
    }
}

impl Admission {
    /// The call is about to reach the upstream: from here its quota unit is spent, even if the
    /// call is cut off (a timeout, a dropped request), since the upstream may be serving it.
    pub fn started(&mut self) {
        self.ran = true;
    }

    /// The upstream answered: reads any throttle signal in the answer, pausing the upstream's
    /// sales (fleet-wide in fleet mode). The slot is released when the admission is dropped.
    pub async fn observe(&mut self, result: &CallToolResult) {
        self.ran = true;
        observe(&self.protected.guard, &self.shared, self.clock.now_millis(), result).await;
    }

    /// Keeps a cacheable answer (not an error) for the identical calls that follow. Called once
    /// the call is paid for: an `on_success` answer whose settlement was refused is withheld
    /// from its caller, and must not be served to the next one at the cached price.
    pub async fn keep(&self, result: &CallToolResult) {
        if self.protected.cache.is_none() || result.is_error == Some(true) {
            return;
        }
        let answer = CachedAnswer { at: self.clock.now_unix(), result: result.clone() };
        self.cache.put(&self.protected.key, answer, self.cache_keep_secs).await;
    }

    fn report_in_flight(&self) {
        let guard = &self.protected.guard;
        if let Some(slots) = &guard.slots {
            let used = guard.max_in_flight as usize - slots.available_permits();
            metrics::gauge!("tollgate_upstream_in_flight", "upstream" => guard.name.clone()).set(used as f64);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        drop(self.slot.take());
        self.report_in_flight();
        let Some(charge) = self.quota.take().filter(|_| !self.ran) else { return };
        let now_us = self.clock.now_millis() * 1000;
        match &*self.shared {
            Shared::Memory(m) => m.refund(&charge, now_us),
            Shared::Redis(r) => {
                let r = r.clone();
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    runtime.spawn(async move {
                        if let Err(e) = r.refund(&charge, now_us).await {
                            tracing::warn!(error = %e, "could not give back an unused upstream quota unit");
                        }
                    });
                }
            }
        }
    }
}

/// Pauses the upstream's sales (fleet-wide in fleet mode) when `result` carries a throttle
/// signal.
async fn observe(guard: &UpstreamGuard, shared: &Shared, now_ms: u64, result: &CallToolResult) {
    let Some(signal) = throttle::signal(result, &guard.patterns, guard.pause_secs) else { return };
    let until = now_ms + signal.pause_secs * 1000;
    guard.paused_until_ms.fetch_max(until, Ordering::SeqCst);
    metrics::counter!("tollgate_upstream_throttle_signals_total", "upstream" => guard.name.clone(), "signal" => signal.kind).increment(1);
    metrics::gauge!("tollgate_upstream_paused_until_seconds", "upstream" => guard.name.clone())
        .set((until / 1000) as f64);
    tracing::warn!(upstream = %guard.name, signal = signal.kind, pause_secs = signal.pause_secs, "upstream throttled; its tools are paused");
    if let Shared::Redis(r) = shared
        && let Err(e) = r.extend_penalty(&pause_key(&guard.name), until, signal.pause_secs * 1000).await
    {
        tracing::warn!(error = %e, upstream = %guard.name, "could not share an upstream pause");
    }
}

/// `_meta` key (in `tools/list`) and field (in `/.well-known/x402`) of a paused tool.
pub const META_PAUSED: &str = "tollgate/paused";

/// An upstream's pause: until when (unix seconds), and how long from now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Pause {
    pub until: u64,
    pub retry_after_seconds: u64,
}

/// What a listing shows for a tool of `upstream` while it is paused (`None` when it is not).
pub fn paused_meta(upstream: &str, paused: &HashMap<String, Pause>) -> Option<serde_json::Value> {
    let pause = paused.get(upstream)?;
    Some(serde_json::json!({
        "upstream": upstream,
        "until": pause.until,
        "retry_after_seconds": pause.retry_after_seconds,
    }))
}

fn quota_key(upstream: &str) -> String {
    format!("upstream:{upstream}:quota")
}

fn pause_key(upstream: &str) -> String {
    format!("upstream-pause:{upstream}")
}

/// The tool name of a cache key (`<tool>:<args hash>`), for metric labels.
fn tool_label(key: &str) -> String {
    key.rsplit_once(':').map_or(key, |(tool, _)| tool).to_owned()
}
