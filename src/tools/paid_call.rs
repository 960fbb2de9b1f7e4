//! `paid_call`: the stages of one `tools/call`, in order. This function is the one place that
//! shows the pipeline after the HTTP layers (DESIGN.md §1, steps 3–10).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::{CallToolResult, JsonObject};

use super::catalog::ToolEntry;
use super::results;
use crate::app::AppState;
use crate::limits::LimitRequest;
use crate::payment::PaymentError;
use crate::payment::decode::PaymentInput;
use crate::payment::gate::{Claimed, Settlement};
use crate::payment::verify::{VerifiedPayment, verify};
use crate::receipt::ReceiptInput;

/// One `tools/call` for a known tool.
#[derive(Debug, Clone)]
pub struct ToolCall {
    pub arguments: JsonObject,
    pub payment: Option<PaymentInput>,
    /// The caller's client key (from the ceiling), for the `agent` limit axis.
    pub agent: String,
}

/// The `error` text of a first challenge.
pub const PAYMENT_REQUIRED: &str = "Payment required to access this resource";

/// A paid call answers before the HTTP request timeout, by this much: past it the client is
/// told the payment is pending (and resends the same payment), never given a bare 408.
const ANSWER_MARGIN: Duration = Duration::from_secs(2);

pub async fn paid_call(app: &Arc<AppState>, entry: &Arc<ToolEntry>, call: ToolCall) -> CallToolResult {
    // 3. Arguments are checked before anything is quoted or charged.
    if let Err(problems) = entry.validate(&call.arguments) {
        return results::invalid_arguments(&entry.tool.name, problems);
    }
    let tool = entry.tool.name.to_string();
    let Some(quote) = &entry.quote else {
        metrics::counter!("tollgate_calls_total", "tool" => tool, "kind" => "free").increment(1);
        return run_bounded(app, entry, &call.arguments).await;
    };
    // 4. No payment: the challenge.
    let Some(payment) = call.payment else {
        metrics::counter!("tollgate_challenges_total", "tool" => tool).increment(1);
        return results::payment_required(&quote.payment_required(PAYMENT_REQUIRED));
    };
    // 5. Local verification; from here on the payer is the recovered signer.
    let now = app.clock.now_unix();
    let margin = app.config.payment.valid_before_margin_secs;
    let verified = match verify(&payment, quote, &app.network.domain(), now, margin) {
        Ok(verified) => verified,
        Err(e) => return results::payment_error(quote, &e),
    };
    tracing::info!(payment.payer = %verified.payer, tool = %quote.tool, "payment verified");
    // A payment already held here (a retry, or a replay) is answered for what it is: it never
    // spends the payer's wallet limits again, nor is refused for a tool's readiness.
    let known = match app.gate.known(&verified, quote, &call.arguments).await {
        Ok(known) => known,
        Err(e) => return results::payment_error(quote, &e),
    };
    if known.is_none() {
        // 6. Wallet limits, on the recovered payer, before anything is claimed or charged.
        let agent = &call.agent;
        let limit = LimitRequest { payer: verified.payer, tool: &quote.tool, agent, amount: quote.amount };
        if let Err(e) = app.limits.check(&limit, app.clock.now_millis()).await {
            return results::limited(&e);
        }
        // A tool that cannot run now (its upstream is down) must not take a payment.
        if let Err(why) = entry.ready().await {
            let extra = serde_json::json!({ "retry_after_seconds": 5 });
            return results::refusal("tool_unavailable", &why, results::Charged::No, extra);
        }
    }
    // 7–10 run in their own task: once a claim exists, a dropped connection must not abandon
    // the settlement halfway; the outcome is stored and a retry of the same payment gets it.
    let job = claim_settle_run(app.clone(), entry.clone(), verified, call.arguments, known);
    answer_in_time(app, quote, tokio::spawn(job)).await
}

/// Waits for a paid call's task until just before the HTTP timeout. The task goes on either
/// way; a late client is told to resend the same payment, which then gets the stored outcome.
async fn answer_in_time(
    app: &AppState,
    quote: &crate::payment::requirements::Quote,
    task: tokio::task::JoinHandle<CallToolResult>,
) -> CallToolResult {
    let timeout = Duration::from_secs(app.config.server.request_timeout_secs);
    let deadline = timeout.saturating_sub(ANSWER_MARGIN).max(Duration::from_secs(1));
    match tokio::time::timeout(deadline, task).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "payment task failed");
            results::internal_error()
        }
        Err(_) => results::payment_error(quote, &PaymentError::Pending { transaction: None }),
    }
}

async fn claim_settle_run(
    app: Arc<AppState>,
    entry: Arc<ToolEntry>,
    v: VerifiedPayment,
    args: JsonObject,
    known: Option<Claimed>,
) -> CallToolResult {
    let quote = entry.quote.as_ref().expect("priced: checked by the caller");
    // 7. The atomic claim (unless the payment was already held).
    let claimed = match known {
        Some(known) => Ok(known),
        None => app.gate.claim(&v, quote, &args).await,
    };
    let (settled, lease, args) = match claimed {
        // 8. Settlement, confirmed on chain, before the handler.
        Ok(Claimed::Fresh(row)) => match app.gate.settle(&row, &v, quote).await {
            Ok(settlement) => (settlement, None, args),
            Err(e) => return results::payment_error(quote, &e),
        },
        Ok(Claimed::AlreadySettled(row, settlement)) => match row.result_json {
            Some(stored) => return results::stored(&stored),
            // Settled after its request ended: run what was paid for, the stored arguments
            // (equal by hash to these, or the claim would have refused the replay).
            None => {
                (settlement, row.handler_started_at, stored_args(row.args_json.as_deref()).unwrap_or(args))
            }
        },
        Err(e) => return results::payment_error(quote, &e),
    };
    // 9. The handler, at most once per settlement.
    run_once(&app, &entry, &settled, lease, args).await
}

fn stored_args(json: Option<&str>) -> Option<JsonObject> {
    json.and_then(|a| serde_json::from_str(a).ok())
}

/// Runs a tool, bounded by `tools.timeout_secs` (shorter than the handler lease, so a handler
/// cut off here can never still be running when a retry takes the lease over).
async fn run_bounded(app: &AppState, entry: &ToolEntry, args: &JsonObject) -> CallToolResult {
    let limit = Duration::from_secs(app.config.tools.timeout_secs);
    match tokio::time::timeout(limit, entry.run(args)).await {
        Ok(result) => result,
        Err(_) => {
            metrics::counter!("tollgate_tool_timeouts_total", "tool" => entry.tool.name.to_string())
                .increment(1);
            results::tool_timeout(&entry.tool.name, limit.as_secs())
        }
    }
}

/// Runs the handler under the payment's lease, then finishes the call. `lease` is the handler
/// lease the caller saw on the row (`None` for a fresh settlement).
async fn run_once(
    app: &AppState,
    entry: &ToolEntry,
    settled: &Settlement,
    lease: Option<i64>,
    args: JsonObject,
) -> CallToolResult {
    let quote = entry.quote.as_ref().expect("priced");
    let now = app.clock.now_unix() as i64;
    // A lease younger than the request timeout belongs to a request that may still be running.
    let expired = lease.is_none_or(|t| now - t > app.config.server.request_timeout_secs as i64);
    let leased = expired && app.gate.store.start_handler(settled.row_id, lease, now).await.unwrap_or(false);
    if !leased {
        return results::payment_error(quote, &PaymentError::InProgress);
    }
    metrics::counter!("tollgate_calls_total", "tool" => quote.tool.clone(), "kind" => "paid").increment(1);
    let result = run_bounded(app, entry, &args).await;
    finish(app, &quote.tool, settled, &args, result).await
}

/// Step 10: the signed receipt, appended to the log, beside the standard payment response;
/// the result is stored for replays of the same payment.
async fn finish(
    app: &AppState,
    tool: &str,
    settled: &Settlement,
    args: &JsonObject,
    result: CallToolResult,
) -> CallToolResult {
    let now = app.clock.now_unix();
    let input = ReceiptInput {
        tool,
        args,
        result: &result,
        settlement: settled,
        pay_to: &app.config.payment.pay_to,
        now,
    };
    let receipt = issue_receipt(app, &input).await;
    let result = results::paid(result, settled, receipt.as_ref());
    let json = serde_json::to_string(&result).expect("CallToolResult serialises");
    if let Err(e) = app.gate.store.save_result(settled.row_id, &json, now as i64).await {
        // The result is still served; a replay will re-run under an expired lease.
        tracing::error!(error = %e, payment.row = settled.row_id, "could not store the paid result");
    }
    result
}

/// Finishes paid calls whose requests died after their settlement (a crash, a timeout, a
/// dropped connection) and that nobody has retried: the handler runs once under the lease
/// (unless its result was already stored), the receipt is issued, and the result waits for
/// the client's retry. So every transfer on chain gets its receipt without the client's help.
///
/// Each call runs as its own task, at most `FINISHERS` at once, so slow tools never stall the
/// reconciler's loop; a row already being finished here is not started twice (and across
/// replicas the lease and the one-receipt-per-payment rule are compare-and-set in the store).
pub struct Finisher {
    app: Arc<AppState>,
    slots: Arc<tokio::sync::Semaphore>,
    running: Arc<Mutex<HashSet<i64>>>,
}

/// Abandoned calls finished concurrently, at most.
const FINISHERS: usize = 8;

impl Finisher {
    pub fn new(app: Arc<AppState>) -> Finisher {
        let slots = Arc::new(tokio::sync::Semaphore::new(FINISHERS));
        Finisher { app, slots, running: Default::default() }
    }

    /// Starts finishing what is abandoned now; returns how many calls were started.
    pub async fn start(&self) -> Result<usize, crate::store::StoreError> {
        let app = &self.app;
        let idle_since = app.clock.now_unix() as i64 - app.config.server.request_timeout_secs as i64;
        let mut started = 0;
        for row in app.gate.store.unfinished(idle_since, 100).await? {
            let Ok(slot) = self.slots.clone().try_acquire_owned() else { break };
            if !self.running.lock().expect("not poisoned").insert(row.id) {
                continue;
            }
            let (app, running, id) = (app.clone(), self.running.clone(), row.id);
            tokio::spawn(async move {
                finish_one(&app, row).await;
                running.lock().expect("not poisoned").remove(&id);
                drop(slot);
            });
            started += 1;
        }
        Ok(started)
    }
}

async fn finish_one(app: &AppState, row: crate::store::PaymentRecord) {
    let Some(settled) = Settlement::from_record(&row, row.payer.clone()) else { return };
    let args = stored_args(row.args_json.as_deref()).unwrap_or_default();
    match (&row.result_json, app.catalog.get(&row.tool)) {
        // It ran and its result was stored; only the receipt is missing.
        (Some(stored), _) => {
            let result = results::stored(stored);
            finish(app, &row.tool, &settled, &args, result).await;
        }
        (None, Some(entry)) if entry.quote.is_some() => {
            run_once(app, entry, &settled, row.handler_started_at, args).await;
        }
        // The tool was removed (or made free) after it was paid for: the receipt records
        // that the call could not run.
        (None, _) => {
            let why = format!("the tool `{}` was withdrawn before this paid call could run", row.tool);
            let result =
                results::refusal("tool_withdrawn", &why, results::Charged::Yes, serde_json::json!({}));
            finish(app, &row.tool, &settled, &args, result).await;
        }
    }
    tracing::info!(payment.row = row.id, tool = %row.tool, "finished an abandoned paid call");
}

/// Issues the receipt, retrying transient store failures: a paid call must not end without one.
async fn issue_receipt(app: &AppState, input: &ReceiptInput<'_>) -> Option<crate::receipt::SignedReceipt> {
    let mut delay = std::time::Duration::from_millis(20);
    for attempt in 1..=5 {
        match app.receipts.issue(input).await {
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
