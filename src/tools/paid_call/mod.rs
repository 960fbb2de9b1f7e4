//! `PaidCall`: the stages of one `tools/call`, in order. [`PaidCall::try_call`] is the one place
//! that shows the pipeline after the HTTP layers (ARCHITECTURE.md, steps 3–10); the renderer in
//! `tools::results` is the one place that turns its outcome into an MCP result.
//!
//! Guarantees: arguments are checked before any quote; a payment is verified locally before it
//! is claimed; wallet limits and tool readiness are checked before the claim, except for a
//! payment already held (a retry is answered, never re-limited); the handler runs only after
//! settlement, at most once per payment (a lease in the store, and a tool timeout shorter than
//! the lease); every settled call ends in a receipt. Does not render answers.

mod error;
mod finish;
mod on_success;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use alloy::sol_types::Eip712Domain;
use rmcp::model::{CallToolResult, JsonObject};

pub use error::{ArgumentError, CallError, ToolUnavailable};

use super::catalog::ToolEntry;
use super::results;
use crate::clock::SharedClock;
use crate::config::{ChargePolicy, FailureBudgetConfig};
use crate::limits::failures::FailureBudget;
use crate::limits::{LimitRequest, WalletLimits};
use crate::payment::PaymentError;
use crate::payment::decode::{PaymentInput, decode};
use crate::payment::gate::{Claimed, Lease, PaymentGate, Settlement};
use crate::payment::offer::Offers;
use crate::payment::price::{CallTerms, PriceRecord};
use crate::payment::refund::{RefundRecord, Refunder};
use crate::payment::requirements::Quote;
use crate::payment::verify::{VerifiedPayment, verify_decoded};
use crate::protect::{Protected, Protection, Service};
use crate::receipt::{ReceiptInput, Receipts, SignedReceipt};

/// One `tools/call` for a known tool.
#[derive(Debug, Clone)]
pub struct ToolCall {
    pub arguments: JsonObject,
    pub payment: Option<PaymentInput>,
    /// The caller's client key (from the ceiling), for the `agent` limit axis.
    pub agent: String,
    /// The caller whatever its session (API key, else IP): refused payments count against it.
    pub client: String,
}

/// What a call produced, ready to serve.
#[derive(Debug, Clone)]
pub enum Paid {
    /// A free tool's answer.
    Free(CallToolResult),
    /// A paid answer: the handler's result with its settlement response and receipt.
    Settled(CallToolResult),
    /// The stored answer of a payment already served (a retry, or a replay of the same call).
    Replayed(CallToolResult),
    /// A tool error under `charge = "on_success"`: nothing was settled, the authorization was
    /// released.
    Uncharged(CallToolResult),
}

/// A call's answer, rendered but for a first challenge.
#[derive(Debug)]
pub enum Reply {
    Result(CallToolResult),
    /// A first challenge: this call's quote, carrying its offer token.
    Challenge(Quote),
}

impl Reply {
    /// The MCP result.
    pub fn into_result(self) -> CallToolResult {
        match self {
            Reply::Result(result) => result,
            Reply::Challenge(quote) => results::render_error(Some(&quote), &CallError::PaymentRequired),
        }
    }
}

/// A priced call's price for its arguments, and its terms.
#[derive(Debug, Clone)]
pub struct Priced {
    pub quote: Arc<Quote>,
    pub terms: CallTerms,
    /// SHA-256 of the canonical arguments: what offers and replays are bound to.
    pub args_hash: String,
    /// The upstream budget, state and cache of an upstream's tool.
    pub protected: Option<Protected>,
}

/// The config values a paid call needs.
#[derive(Debug, Clone)]
pub struct CallSettings {
    /// An authorization must stay valid at least this long after we receive it.
    pub valid_before_margin_secs: u64,
    /// The HTTP request timeout, which is also the handler lease.
    pub request_timeout: Duration,
    /// Longest a tool may run: below the lease, so a cut-off handler never runs twice at once.
    pub tool_timeout: Duration,
    /// The payee (the receipt binds it).
    pub pay_to: alloy::primitives::Address,
    /// Refused payments a client may cause per window.
    pub failed_attempts: FailureBudgetConfig,
    /// How long a payer is refused after an `on_success` run it did not pay for.
    pub unpaid_penalty_secs: u64,
    /// How long an `on_success` authorization must stay valid (`Config::on_success_validity_secs`).
    pub on_success_validity_secs: u64,
}

/// A paid call answers before the HTTP request timeout, by this much: past it the client is
/// told the payment is pending (and resends the same payment), never given a bare 408.
const ANSWER_MARGIN: Duration = Duration::from_secs(2);

/// Abandoned calls finished concurrently, at most.
const FINISHERS: usize = 8;

/// Runs priced and free tool calls through the pipeline.
pub struct PaidCall {
    gate: Arc<PaymentGate>,
    limits: Arc<WalletLimits>,
    /// Refused payments per client: a client that keeps failing is turned away unverified.
    failures: FailureBudget,
    receipts: Arc<Receipts>,
    clock: SharedClock,
    /// The token's EIP-712 domain, every authorization is signed against.
    domain: Eip712Domain,
    settings: CallSettings,
    /// Finishing abandoned calls: a bound on concurrent tasks, and the rows being finished.
    finishers: Arc<tokio::sync::Semaphore>,
    finishing: Arc<Mutex<HashSet<i64>>>,
    /// Tags challenges' offers, so a payment for one is honoured after a price change.
    offers: Offers,
    /// Sends `refund_on_error` refunds, when configured.
    refunder: Option<Arc<Refunder>>,
    /// Upstreams' quotas, in-flight caps, pauses and the result cache.
    protection: Arc<Protection>,
}

impl PaidCall {
    pub fn new(
        gate: Arc<PaymentGate>,
        limits: Arc<WalletLimits>,
        receipts: Arc<Receipts>,
        clock: SharedClock,
        settings: CallSettings,
    ) -> PaidCall {
        let domain = gate.network.domain();
        let finishers = Arc::new(tokio::sync::Semaphore::new(FINISHERS));
        let failures = FailureBudget::from_config(&settings.failed_attempts);
        let offers = receipts.signer.offers();
        PaidCall {
            offers,
            refunder: None,
            protection: Arc::new(Protection::none(clock.clone())),
            gate,
            limits,
            failures,
            receipts,
            clock,
            domain,
            settings,
            finishers,
            finishing: Default::default(),
        }
    }

    /// Upstream tools are protected by `protection` (the default protects none).
    pub fn with_protection(mut self, protection: Arc<Protection>) -> PaidCall {
        self.protection = protection;
        self
    }

    /// Refunds of `refund_on_error` tools go out from this wallet.
    pub fn with_refunder(mut self, refunder: Option<Arc<Refunder>>) -> PaidCall {
        self.refunder = refunder;
        self
    }

    /// Runs one call and renders its outcome; a challenge carries this call's offer.
    pub async fn call(self: &Arc<Self>, entry: &Arc<ToolEntry>, call: ToolCall) -> CallToolResult {
        self.reply(entry, call).await.into_result()
    }

    /// As [`call`](Self::call), leaving a first challenge unrendered: a transport that writes
    /// JSON itself renders it from its quote's template (`results::challenge_json`).
    pub async fn reply(self: &Arc<Self>, entry: &Arc<ToolEntry>, call: ToolCall) -> Reply {
        let (outcome, priced) = self.attempt(entry, call).await;
        let offer = match (&outcome, &priced) {
            (Err(e), Some(priced)) if e.is_challenge() => Some(self.offer(priced)),
            _ => None,
        };
        match (outcome, offer) {
            (Err(CallError::PaymentRequired), Some(offer)) => Reply::Challenge(offer),
            (outcome, offer) => Reply::Result(results::render(offer.as_ref(), outcome)),
        }
    }

    /// The pipeline's outcome, without rendering.
    pub async fn try_call(
        self: &Arc<Self>,
        entry: &Arc<ToolEntry>,
        call: ToolCall,
    ) -> Result<Paid, CallError> {
        self.attempt(entry, call).await.0
    }

    /// The quote a challenge shows: this call's price, tagged as offered until the offer's
    /// `maxTimeoutSeconds` runs out.
    fn offer(&self, priced: &Priced) -> Quote {
        let expires = self.clock.now_unix() + priced.quote.requirements.max_timeout_seconds;
        priced.quote.with_offer(self.offers.token(&priced.quote, &priced.args_hash, expires))
    }

    /// Step 3, the arguments, then their price; the rest runs in [`Self::try_priced`].
    async fn attempt(
        self: &Arc<Self>,
        entry: &Arc<ToolEntry>,
        call: ToolCall,
    ) -> (Result<Paid, CallError>, Option<Priced>) {
        let tool = &entry.tool.name;
        // 3. Arguments are checked before anything is quoted or charged.
        if let Err(problems) = entry.validate(&call.arguments) {
            return (Err(ArgumentError { tool: tool.to_string(), problems }.into()), None);
        }
        let mut priced = match price(entry, &call.arguments) {
            Ok(priced) => priced,
            Err(e) => return (Err(e), None),
        };
        if let Some(priced) = priced.as_mut() {
            self.protect(entry, priced).await;
        }
        let outcome = self.try_priced(entry, priced.as_ref(), call).await;
        (outcome, priced)
    }

    /// Steps 4–10, in order, inside the client's failed-attempt budget (`limits::failures`): a
    /// client whose payments keep failing is turned away before they cost store writes and RPC
    /// reads.
    async fn try_priced(
        self: &Arc<Self>,
        entry: &Arc<ToolEntry>,
        priced: Option<&Priced>,
        call: ToolCall,
    ) -> Result<Paid, CallError> {
        let attempt = match priced.is_some() && call.payment.is_some() {
            true => Some((self.failures.admit(&call.client, self.clock.now_millis())?, call.client.clone())),
            false => None,
        };
        let outcome = self.try_call_steps(entry, priced, call).await;
        if let Some((attempt, client)) = attempt {
            let failed = matches!(&outcome, Err(CallError::Payment(e)) if e.spends_failure_budget());
            self.failures.settle(&client, attempt, failed, self.clock.now_millis());
        }
        outcome
    }

    async fn try_call_steps(
        self: &Arc<Self>,
        entry: &Arc<ToolEntry>,
        priced: Option<&Priced>,
        mut call: ToolCall,
    ) -> Result<Paid, CallError> {
        let started = tokio::time::Instant::now();
        let tool = entry.tool.name.to_string();
        let Some(priced) = priced else {
            metrics::counter!("tollgate_calls_total", "tool" => tool, "kind" => "free").increment(1);
            return self.run_free(entry, &call.arguments).await.map(Paid::Free);
        };
        // 4. No payment: the challenge; nobody is asked to sign for an upstream that is paused,
        // unless the call would be answered from the cache, which asks the upstream nothing.
        let Some(payment) = call.payment.take() else {
            if let Some(p) = &priced.protected {
                self.protection.check_challenge(p).await?;
            }
            metrics::counter!("tollgate_challenges_total", "tool" => tool).increment(1);
            return Err(CallError::PaymentRequired);
        };
        // Boxed: the paid steps' state is large, and every challenge and free call would
        // otherwise carry (and copy) it in its own future.
        Box::pin(self.paid_steps(entry, priced, call, payment, started)).await
    }

    /// Steps 5–10 for a call that brings a payment.
    async fn paid_steps(
        self: &Arc<Self>,
        entry: &Arc<ToolEntry>,
        priced: &Priced,
        call: ToolCall,
        payment: PaymentInput,
        started: tokio::time::Instant,
    ) -> Result<Paid, CallError> {
        // 5. Local verification; from here on the payer is the recovered signer. A payment for
        // another amount than today's must bring an offer this server made for this very call.
        let (now, margin) = (self.clock.now_unix(), self.settings.valid_before_margin_secs);
        let decoded = decode(&payment)?;
        let mut priced = priced.clone();
        match self.offers.honour(&priced.quote, &decoded.payload.accepted, &priced.args_hash, now) {
            Ok(None) => {}
            Ok(Some(h)) => {
                priced.quote = Arc::new(priced.quote.with_amount(h.amount));
                priced.terms.price = PriceRecord::offer(h.expires);
            }
            // Not an offer we can honour now, unless it is a payment we already hold (a resend
            // after a price change): that one is answered below for what it is.
            Err(refusal) => match self.gate.held_amount(&decoded).await? {
                Some(amount) => priced.quote = Arc::new(priced.quote.with_amount(amount)),
                None => return Err(refusal.into()),
            },
        }
        let quote = &priced.quote;
        let mut verified = verify_decoded(decoded, quote, &self.domain, now, margin)?;
        // A payment already held (a retry, or a replay) is answered for what it is: it never
        // spends the payer's wallet limits again, nor is refused for a tool's readiness. Held
        // means settled, for this very payload (`known` never hands back one to settle), so a
        // smart wallet's signature is not asked again: were its answer different now (new
        // owners, a flaky node), a payer whose money moved would be re-challenged.
        let known = self.gate.known(&verified, quote, &priced.args_hash).await?;
        let mut service = Service::Live(None);
        if known.is_none() {
            // Under on_success the handler runs before the settlement: the authorization must
            // outlive both, or a payer could sign one that expires mid-run and never pay.
            if priced.terms.charge == ChargePolicy::OnSuccess {
                let needed = self.settings.on_success_validity_secs;
                if verified.valid_before() < now.saturating_add(needed) {
                    return Err(PaymentError::Expired { margin_secs: needed }.into());
                }
            }
            // A smart wallet's signature is proven by its contract (RPC, inside the
            // failed-attempt budget like every refusal): only then is `from` the payer.
            verified = self.gate.prove_payer(verified).await?;
            tracing::info!(payment.payer = %verified.payer, tool = %quote.tool, "payment verified");
            // 6a. The upstream's state and budget, or its cached answer, before the wallet
            // limits: a call the upstream refuses must not spend the payer's limits, and an
            // admission the limits then refuse is dropped unused (its quota unit given back).
            // A pause refuses live calls only: a cached answer asks the upstream nothing.
            if let Some(p) = &priced.protected {
                service = self.protection.serve(p, Some(quote.amount)).await?;
                // A payment that covers only a cached answer never buys a live call: with the
                // answer gone, the caller is quoted today's price, uncharged.
                let cached_price = p.cache.and_then(|c| c.cached_price);
                if matches!(service, Service::Live(_))
                    && cached_price == Some(quote.amount)
                    && price(entry, &call.arguments)?.is_some_and(|live| live.quote.amount != quote.amount)
                {
                    return Err(PaymentError::OfferExpired.into());
                }
            }
            // 6. Wallet limits, on the recovered payer, before anything is claimed or charged.
            let limit = LimitRequest {
                payer: verified.payer,
                tool: &quote.tool,
                agent: &call.agent,
                amount: quote.amount,
            };
            self.limits.check(&limit, self.clock.now_millis()).await?;
            // A tool that cannot run now (its upstream is down) must not take a payment.
            if !matches!(service, Service::Cached(_)) {
                entry.ready().await.map_err(ToolUnavailable)?;
            }
        }
        // 7–10 run in their own task: once a claim exists, a dropped connection must not
        // abandon the settlement halfway; the outcome is stored and a retry gets it.
        tracing::debug!(timing.admitted_us = started.elapsed().as_micros() as u64, "paid call admitted");
        let task = tokio::spawn(self.clone().claim_settle_run(
            entry.clone(),
            verified,
            call.arguments,
            known,
            priced,
            service,
        ));
        self.answer_in_time(started, task).await
    }

    /// Waits for a paid call's task until just before the HTTP timeout. The task goes on either
    /// way; a late client is told to resend the same payment, which then gets the outcome.
    async fn answer_in_time(
        &self,
        started: tokio::time::Instant,
        task: tokio::task::JoinHandle<Result<Paid, CallError>>,
    ) -> Result<Paid, CallError> {
        // Counted from the request's start: the checks before the task took time too.
        let budget = self.settings.request_timeout.saturating_sub(ANSWER_MARGIN).max(Duration::from_secs(1));
        match tokio::time::timeout_at(started + budget, task).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "payment task failed");
                Err(CallError::Internal("the payment task failed".into()))
            }
            Err(_) => Err(PaymentError::Pending { transaction: None }.into()),
        }
    }

    /// Steps 7–10: claim (unless held), settle, run once, receipt; under `on_success`, claim,
    /// check, run, then settle only a success (`run_then_settle`). `service` (an upstream's
    /// admission, or its cached answer) lives as long as this task: an in-flight slot is held
    /// through the settlement and the handler, and released on every path.
    async fn claim_settle_run(
        self: Arc<Self>,
        entry: Arc<ToolEntry>,
        v: VerifiedPayment,
        args: JsonObject,
        known: Option<Claimed>,
        priced: Priced,
        service: Service,
    ) -> Result<Paid, CallError> {
        let quote = &priced.quote;
        // 7. The atomic claim (unless the payment was already held).
        let t0 = std::time::Instant::now();
        let (claimed, checks) = match known {
            Some(known) => (known, None),
            // The chain checks only read: asked while the claim is written, one wait for both.
            None => {
                let (claimed, checks) = tokio::join!(
                    self.gate.claim(&v, quote, &args, &priced.args_hash, &priced.terms),
                    self.gate.check_chain(&v)
                );
                (claimed?, Some(checks))
            }
        };
        let t_claim = t0.elapsed();
        let (settled, lease, args, terms) = match claimed {
            Claimed::Fresh(row) if priced.terms.charge == ChargePolicy::OnSuccess => {
                return self.run_then_settle(&entry, row, &v, &priced, checks, args, service).await;
            }
            // 8. Settlement, confirmed on chain, before the handler.
            Claimed::Fresh(row) => {
                // The handler runs next: the settlement takes its lease in the same write.
                let checks = match checks {
                    Some(checks) => checks,
                    None => self.gate.check_chain(&v).await,
                };
                let settled = self.gate.settle_checked(&row, &v, quote, checks, Lease::Take).await?;
                (settled, None, args, Some(priced.terms.clone()))
            }
            Claimed::AlreadySettled(row, settlement) => {
                match (row.result_json.clone(), stored_args(row.args_json.as_deref())) {
                    (Some(stored), paid_for) => match stored_answer(&stored)? {
                        Stored::Served(answer) => return Ok(Paid::Replayed(answer)),
                        // An `on_success` run whose settlement was confirmed after its request
                        // ended: its kept result gets its receipt now.
                        Stored::Unsettled(result) => {
                            let terms = CallTerms::from_stored(row.price_terms.as_deref());
                            let args = paid_for.unwrap_or_default();
                            let answer = self
                                .finish(
                                    &entry.tool.name,
                                    &settlement,
                                    &args,
                                    result,
                                    terms.as_ref(),
                                    None,
                                    None,
                                )
                                .await;
                            return Ok(Paid::Replayed(answer));
                        }
                    },
                    // Settled after its request ended: run what was paid for, with the stored
                    // arguments, never the caller's (a hash match is no proof of equal arguments).
                    (None, Some(paid_for)) => {
                        let terms = CallTerms::from_stored(row.price_terms.as_deref());
                        (settlement, row.handler_started_at, paid_for, terms)
                    }
                    // Its receipt is stored (which drops the arguments) and its answer is about to
                    // be, under a live lease: still in progress.
                    (None, None) if self.lease_is_live(row.handler_started_at) => {
                        return Err(PaymentError::InProgress.into());
                    }
                    // The lease expired with the receipt stored and no answer kept: it ran, and
                    // must not run again.
                    (None, None) => {
                        tracing::error!(payment.row = row.id, "a receipted call has no stored answer");
                        return Err(CallError::Internal("the answer of this paid call was not kept".into()));
                    }
                }
            }
        };
        let t_settle = t0.elapsed() - t_claim;
        // 9. The handler, at most once per settlement; 10. its receipt.
        let answer =
            self.run_once(&entry, &settled, lease, args, terms.as_ref(), service).await.map(Paid::Settled);
        tracing::debug!(
            timing.claim_us = t_claim.as_micros() as u64,
            timing.settle_us = t_settle.as_micros() as u64,
            timing.run_and_receipt_us = (t0.elapsed() - t_claim - t_settle).as_micros() as u64,
            "paid call stages"
        );
        answer
    }

    /// Whether a handler lease taken at `started` may still belong to a running request.
    fn lease_is_live(&self, started: Option<i64>) -> bool {
        let now = self.clock.now_unix() as i64;
        started.is_some_and(|t| now - t <= self.settings.request_timeout.as_secs() as i64)
    }

    /// Runs a tool, bounded by the tool timeout (shorter than the handler lease, so a handler
    /// cut off here can never still be running when a retry takes the lease over).
    async fn run_bounded(&self, entry: &ToolEntry, args: &JsonObject) -> CallToolResult {
        let limit = self.settings.tool_timeout;
        match tokio::time::timeout(limit, entry.run(args)).await {
            Ok(result) => result,
            Err(_) => {
                metrics::counter!("tollgate_tool_timeouts_total", "tool" => entry.tool.name.to_string())
                    .increment(1);
                results::tool_timeout(&entry.tool.name, limit.as_secs())
            }
        }
    }

    /// A free call: from the cache when its upstream caches it, else admitted by its upstream's
    /// budget and state (a free call spends the API's budget too), then run.
    async fn run_free(&self, entry: &ToolEntry, args: &JsonObject) -> Result<CallToolResult, CallError> {
        let name = &entry.tool.name;
        let protected = entry
            .upstream()
            .and_then(|u| self.protection.of(name, u, &crate::payment::gate::args_hash(args)));
        let service = match &protected {
            Some(p) => self.protection.serve(p, None).await?,
            None => Service::Live(None),
        };
        Ok(self.serve(entry, args, service).await.0)
    }

    /// Step 9's answer: the cached one (with its time), or the handler's, bounded; a live
    /// upstream answer is handed to its admission (throttle signals, the cache).
    async fn serve(
        &self,
        entry: &ToolEntry,
        args: &JsonObject,
        service: Service,
    ) -> (CallToolResult, Option<u64>) {
        match service {
            Service::Cached(answer) => (answer.result.clone(), Some(answer.at)),
            Service::Live(mut admission) => {
                let result = self.run_admitted(entry, args, admission.as_mut()).await;
                if let Some(admission) = &admission {
                    admission.keep(&result).await;
                }
                (result, None)
            }
        }
    }

    /// Runs the handler (bounded) under an upstream's admission, which sees the answer (its
    /// throttle signals); the admission's slot stays held by the caller. Without one (a call
    /// paid before it ran), the upstream's throttle signals are read all the same.
    async fn run_admitted(
        &self,
        entry: &ToolEntry,
        args: &JsonObject,
        admission: Option<&mut crate::protect::Admission>,
    ) -> CallToolResult {
        let Some(admission) = admission else {
            let result = self.run_bounded(entry, args).await;
            if let Some((upstream, _)) = entry.upstream() {
                self.protection.observe_unadmitted(upstream, &result).await;
            }
            return result;
        };
        admission.started();
        let result = self.run_bounded(entry, args).await;
        admission.observe(&result).await;
        result
    }

    /// The protection of an upstream tool's call, and its price when a cached answer is there
    /// and the tool has a `cached_price` (quoted as such, and recorded in the receipt).
    async fn protect(&self, entry: &ToolEntry, priced: &mut Priced) {
        let Some(upstream) = entry.upstream() else { return };
        let Some(p) = self.protection.of(&entry.tool.name, upstream, &priced.args_hash) else { return };
        if let Some(cached_price) = p.cache.and_then(|c| c.cached_price)
            && cached_price != priced.quote.amount
            && self.protection.fresh(&p).await.is_some()
        {
            priced.quote = Arc::new(priced.quote.with_amount(cached_price));
            priced.terms.price = PriceRecord::cached();
        }
        priced.protected = Some(p);
    }

    /// Runs the handler under the payment's lease, then finishes the call. `lease` is the
    /// handler lease the caller saw on the row (`None` for a fresh settlement).
    async fn run_once(
        &self,
        entry: &ToolEntry,
        settled: &Settlement,
        lease: Option<i64>,
        args: JsonObject,
        terms: Option<&CallTerms>,
        service: Service,
    ) -> Result<CallToolResult, CallError> {
        let now = self.clock.now_unix() as i64;
        // A lease younger than the request timeout belongs to a request that may still be running.
        let leased = settled.leased
            || (!self.lease_is_live(lease)
                && self.gate.store.start_handler(settled.row_id, lease, now).await.unwrap_or(false));
        if !leased {
            return Err(PaymentError::InProgress.into());
        }
        metrics::counter!("tollgate_calls_total", "tool" => entry.tool.name.to_string(), "kind" => "paid")
            .increment(1);
        let (result, cached_at) = self.serve(entry, &args, service).await;
        // Refunded here, where the handler has just run under the lease: never for an answer
        // finished again from storage, so one failure is refunded once.
        let refund = match terms {
            Some(t) if t.refund_on_error && result.is_error == Some(true) => self.refund(settled).await,
            _ => None,
        };
        Ok(self.finish(&entry.tool.name, settled, &args, result, terms, refund, cached_at).await)
    }

    /// Whether `refund_on_error` refunds can be sent (a refund wallet was configured at start).
    pub fn can_refund(&self) -> bool {
        self.refunder.is_some()
    }

    /// A `refund_on_error` refund of the whole amount to the payer, recorded for the receipt.
    /// At most one per payment: started by a compare-and-set on its row before anything is
    /// sent, so a handler run again (a lease taken over, a crash) never refunds twice.
    async fn refund(&self, settled: &Settlement) -> Option<RefundRecord> {
        let store = &self.gate.store;
        let (payer, amount, row) = (settled.payer, settled.amount, settled.row_id);
        let Some(refunder) = &self.refunder else {
            tracing::error!(payment.row = row, "refund_on_error without a refund wallet");
            return Some(RefundRecord::failed(None, amount, "no refund wallet is configured"));
        };
        match store.begin_refund(row).await {
            Ok(true) => {}
            Ok(false) => {
                // Another run started it: its record, once it has one, is the refund.
                let kept = store.payment(row).await.ok().flatten().and_then(|r| r.refund_json);
                let recorded = kept.and_then(|json| serde_json::from_str::<RefundRecord>(&json).ok());
                let busy = "a refund of this payment was already started";
                let record = recorded.filter(|r| r.status != "sending");
                return Some(
                    record.unwrap_or_else(|| RefundRecord::failed(Some(refunder.from), amount, busy)),
                );
            }
            Err(e) => {
                tracing::error!(error = %e, payment.row = row, "could not mark a refund; not sending it");
                let why = "the store could not record the refund";
                return Some(RefundRecord::failed(Some(refunder.from), amount, why));
            }
        }
        let record = refunder.refund(payer, amount).await;
        let json = serde_json::to_string(&record).expect("refund record serialises");
        if let Err(e) = store.end_refund(row, &json).await {
            tracing::error!(error = %e, payment.row = row, "could not record a sent refund");
        }
        Some(record)
    }

    /// Step 10: the signed receipt (with the call's terms, any refund and the time of a cached
    /// answer), appended to the log, beside the standard payment response; the answer is
    /// stored for retries of the payment.
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        tool: &str,
        settled: &Settlement,
        args: &JsonObject,
        result: CallToolResult,
        terms: Option<&CallTerms>,
        refund: Option<RefundRecord>,
        cached_at: Option<u64>,
    ) -> CallToolResult {
        let now = self.clock.now_unix();
        let pay_to = self.settings.pay_to;
        let settlement = settled;
        let input =
            ReceiptInput { tool, args, result: &result, settlement, pay_to, now, terms, refund, cached_at };
        // The answer is stored with its receipt, in one transaction.
        let render = |receipt: &SignedReceipt| {
            let answer = results::paid(result.clone(), settled, Some(receipt));
            serde_json::to_string(&answer).expect("CallToolResult serialises")
        };
        let receipt = self.issue_receipt(&input, &render).await;
        let answer = results::paid(result, settled, receipt.as_ref());
        if receipt.is_none() {
            let json = serde_json::to_string(&answer).expect("CallToolResult serialises");
            if let Err(e) = self.gate.store.save_result(settled.row_id, &json, now as i64).await {
                // The answer is still served; a retry will re-run under an expired lease.
                tracing::error!(error = %e, payment.row = settled.row_id, "could not store the paid result");
            }
        }
        answer
    }

    /// Issues the receipt with the answer `render` makes of it, retrying transient store
    /// failures: a paid call must not end without one.
    async fn issue_receipt(
        &self,
        input: &ReceiptInput<'_>,
        render: &(dyn Fn(&SignedReceipt) -> String + Send + Sync),
    ) -> Option<SignedReceipt> {
        let mut delay = Duration::from_millis(20);
        for attempt in 1..=5 {
            match self.receipts.issue_answered(input, Some(render)).await {
                Ok(receipt) => return Some(receipt),
                Err(e) if attempt < 5 => {
                    tracing::warn!(error = %e, attempt, "receipt not stored yet; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 3;
                }
                Err(e) => {
                    // Paid and run: serve it. The audit will show the missing receipt, and the
                    // payment row still proves the settlement.
                    tracing::error!(error = %e, payment.row = input.settlement.row_id, "could not issue the receipt");
                    metrics::counter!("tollgate_receipt_failures_total").increment(1);
                }
            }
        }
        None
    }
}

/// Step 3's second half: the call's price for these arguments (`None` for a free tool).
fn price(entry: &ToolEntry, args: &JsonObject) -> Result<Option<Priced>, CallError> {
    let (Some(pricing), Some(base)) = (&entry.pricing, &entry.quote) else { return Ok(None) };
    let (amount, record) = pricing.evaluate(&entry.tool.name, args)?;
    let quote = match amount == base.amount {
        true => base.clone(),
        false => Arc::new(base.with_amount(amount)),
    };
    let terms = CallTerms { charge: pricing.charge, refund_on_error: pricing.refund_on_error, price: record };
    let args_hash = crate::payment::gate::args_hash(args);
    Ok(Some(Priced { quote, terms, args_hash, protected: None }))
}

fn stored_args(json: Option<&str>) -> Option<JsonObject> {
    json.and_then(|a| serde_json::from_str(a).ok())
}

/// A stored result: the answer served, or an `on_success` result kept while its settlement
/// was unconfirmed (not served until it has its settlement and receipt).
enum Stored {
    Served(CallToolResult),
    Unsettled(CallToolResult),
}

/// The answer stored for a payment. One that does not parse is our damage to report, never a
/// reason to run the handler again.
fn stored_answer(json: &str) -> Result<Stored, CallError> {
    let damaged = |e: serde_json::Error| {
        tracing::error!(error = %e, "stored result does not parse");
        CallError::Internal("the stored result of this payment is damaged".into())
    };
    let mut value: serde_json::Value = serde_json::from_str(json).map_err(damaged)?;
    match value.get_mut(crate::store::UNSETTLED_KEY).map(serde_json::Value::take) {
        Some(kept) => serde_json::from_value(kept).map(Stored::Unsettled).map_err(damaged),
        None => serde_json::from_value(value).map(Stored::Served).map_err(damaged),
    }
}
