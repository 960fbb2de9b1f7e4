//! `charge = "on_success"`: the payer pays only for a call that worked. The payment is claimed
//! and checked on chain (unused, funded, a simulated `transferWithAuthorization` succeeds), the
//! handler runs, and only a result that is not an error is settled; it is served only once the
//! settlement is confirmed.
//!
//! Guarantees: a tool error settles nothing, its claim is released and the authorization stays
//! usable (`Paid::Uncharged`); a success whose settlement is refused (the payer moved the funds
//! in between) is withheld, recorded (the row fails with the reason, a metric counts it) and
//! the payer's wallet is refused paid calls for `tools.unpaid_penalty_secs`; a settlement that
//! may still land keeps the result on its row, so the receipt is issued when it is confirmed
//! and the handler never runs twice for it. While the handler runs, the claim holds the
//! authorization: a retry of the same payment is told it is in progress.

use std::sync::Arc;

use rmcp::model::JsonObject;

use super::{CallError, Paid, PaidCall, Priced};
use crate::chain::client::ChainError;
use crate::payment::gate::{ChainChecks, Checked, Lease};
use crate::payment::verify::VerifiedPayment;
use crate::payment::{Money, PaymentError};
use crate::protect::Service;
use crate::store::{PaymentRecord, UNSETTLED_KEY};
use crate::tools::catalog::ToolEntry;

impl PaidCall {
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn run_then_settle(
        &self,
        entry: &Arc<ToolEntry>,
        row: PaymentRecord,
        v: &VerifiedPayment,
        priced: &Priced,
        checks: Option<Result<ChainChecks, ChainError>>,
        args: JsonObject,
        service: Service,
    ) -> Result<Paid, CallError> {
        let tool = entry.tool.name.to_string();
        let checks = match checks {
            Some(checks) => checks,
            None => self.gate.check_chain(v).await,
        };
        // 8a. Would it settle now? Nothing runs for a payment the chain would refuse.
        let head = match self.gate.precheck_simulated(&row, v, checks).await? {
            // What the settler read ahead is stale once the handler has run: not passed on.
            Checked::Ready { head, .. } => head,
            // Someone submitted the public authorization first and it paid us: the money has
            // moved, so the call runs as a paid one whatever its outcome.
            Checked::Spent(settled) => {
                let ran = self.run_once(entry, &settled, None, args, Some(&priced.terms), service).await;
                return ran.map(Paid::Settled);
            }
        };
        // 9. The handler, under the claim and its lease: a retry of this payment (even once it
        // settles) is "in progress" until the lease runs out, so the handler runs once.
        let now = self.clock.now_unix() as i64;
        if !self.gate.store.start_unsettled_run(row.id, now).await.unwrap_or(false) {
            return Err(PaymentError::InProgress.into());
        }
        metrics::counter!("tollgate_calls_total", "tool" => tool.clone(), "kind" => "paid").increment(1);
        // The upstream's slot stays held through the settlement below; a live answer is kept
        // in the cache only once it is paid for.
        let (result, cached_at, admission) = match service {
            Service::Cached(answer) => (answer.result.clone(), Some(answer.at), None),
            Service::Live(mut admission) => {
                (self.run_admitted(entry, &args, admission.as_mut()).await, None, admission)
            }
        };
        if result.is_error == Some(true) {
            if let Err(e) = self.gate.store.release(row.id).await {
                // Still nothing broadcast: the reconciler releases the stale claim later.
                tracing::warn!(error = %e, payment.row = row.id, "could not release an unsettled claim");
            }
            metrics::counter!("tollgate_uncharged_errors_total", "tool" => tool).increment(1);
            return Ok(Paid::Uncharged(result));
        }
        // 8b. Settle the success, confirmed before it is served.
        match self.gate.submit(&row, v, &priced.quote, head, None, Lease::Leave).await {
            Ok(settled) => {
                if let Some(admission) = &admission {
                    admission.keep(&result).await;
                }
                let answer =
                    self.finish(&tool, &settled, &args, result, Some(&priced.terms), None, cached_at).await;
                Ok(Paid::Settled(answer))
            }
            Err(refusal) if refusal.money() == Money::Unmoved => {
                let reason = refusal.code().to_owned();
                metrics::counter!("tollgate_unpaid_runs_total", "tool" => tool.clone(), "reason" => reason.clone())
                    .increment(1);
                tracing::warn!(payment.row = row.id, payment.payer = %v.payer, tool = %tool, reason = %reason, "a successful on_success run could not be settled; its result is withheld");
                // Our side's outage is not the payer's doing; anything else (funds moved, the
                // authorization cancelled or spent elsewhere) is.
                if !matches!(refusal, PaymentError::ChainUnavailable | PaymentError::StoreUnavailable) {
                    let secs = self.settings.unpaid_penalty_secs;
                    self.limits.penalize(v.payer, secs, self.clock.now_millis()).await;
                }
                Err(PaymentError::Withheld { reason }.into())
            }
            Err(status) => {
                // The transaction may still land: keep the result, so the receipt is issued
                // with it once the settlement is confirmed, and a retry gets it.
                let kept = serde_json::json!({ UNSETTLED_KEY: result });
                if let Err(e) = self.gate.store.save_result(row.id, &kept.to_string(), now).await {
                    tracing::error!(error = %e, payment.row = row.id, "could not keep an unsettled result");
                }
                Err(status.into())
            }
        }
    }
}
