//! Finishing paid calls whose requests died after their settlement (a crash, a timeout, a
//! dropped connection) and that nobody retried: the handler runs once under the lease (unless
//! its result was already stored), the receipt is issued, and the answer waits for the client's
//! retry. So every transfer on chain gets its receipt without the client's help.
//!
//! Each call runs as its own task, at most `FINISHERS` at once, so slow tools never stall the
//! reconciler's loop; a row already being finished here is not started twice, and across
//! replicas the lease and the one-receipt-per-payment rule are compare-and-set in the store.

use std::sync::Arc;

use super::{PaidCall, Stored, results, stored_answer, stored_args};
use crate::payment::gate::Settlement;
use crate::payment::price::CallTerms;
use crate::protect::Service;
use crate::store::{PaymentRecord, StoreError};
use crate::tools::catalog::Catalog;

/// Rows examined per pass.
const BATCH: i64 = 100;

impl PaidCall {
    /// Starts finishing what is abandoned now; returns how many calls were started. While the
    /// catalog is not `complete` (an upstream has yet to list its tools), a call whose tool is
    /// missing waits: it may be that upstream's, and must not be closed as withdrawn.
    pub async fn finish_abandoned(
        self: &Arc<Self>,
        catalog: &Arc<Catalog>,
        complete: bool,
    ) -> Result<usize, StoreError> {
        let lease = self.settings.request_timeout.as_secs() as i64;
        let idle_since = self.clock.now_unix() as i64 - lease;
        let mut started = 0;
        for row in self.gate.store.unfinished(idle_since, BATCH).await? {
            if !complete && row.result_json.is_none() && catalog.get(&row.tool).is_none() {
                continue;
            }
            let Ok(slot) = self.finishers.clone().try_acquire_owned() else { break };
            if !self.finishing.lock().expect("not poisoned").insert(row.id) {
                continue;
            }
            let (paid, catalog, id) = (self.clone(), catalog.clone(), row.id);
            tokio::spawn(async move {
                paid.finish_one(&catalog, row).await;
                paid.finishing.lock().expect("not poisoned").remove(&id);
                drop(slot);
            });
            started += 1;
        }
        Ok(started)
    }

    async fn finish_one(&self, catalog: &Catalog, row: PaymentRecord) {
        let Some(settled) = Settlement::from_record(&row) else { return };
        let args = stored_args(row.args_json.as_deref()).unwrap_or_default();
        let entry = catalog.get(&row.tool).filter(|e| e.quote.is_some());
        let terms = CallTerms::from_stored(row.price_terms.as_deref());
        match (&row.result_json, entry) {
            // It ran and its result was stored; only the receipt is missing.
            (Some(stored), _) => {
                let result = match stored_answer(stored) {
                    Ok(Stored::Served(answer) | Stored::Unsettled(answer)) => answer,
                    Err(e) => results::render_error(None, &e),
                };
                self.finish(&row.tool, &settled, &args, result, terms.as_ref(), None, None).await;
            }
            (None, Some(entry)) => {
                if let Err(e) = self
                    .run_once(
                        entry,
                        &settled,
                        row.handler_started_at,
                        args,
                        terms.as_ref(),
                        Service::Live(None),
                    )
                    .await
                {
                    tracing::debug!(error = %e, payment.row = row.id, "abandoned call taken by another worker");
                    return;
                }
            }
            // The tool was removed (or made free) after it was paid for: the receipt records
            // that the call could not run.
            (None, None) => {
                self.finish(
                    &row.tool,
                    &settled,
                    &args,
                    results::withdrawn(&row.tool),
                    terms.as_ref(),
                    None,
                    None,
                )
                .await;
            }
        }
        tracing::info!(payment.row = row.id, tool = %row.tool, "finished an abandoned paid call");
    }
}
