//! The reconciler: resolves every payment left unresolved (pending, or abandoned mid-flight by
//! a crash or timeout) from chain state, so a settled payment is never lost.
//!
//! For each unresolved row: a spent authorization with our transfer confirmed → `settled` (a
//! retry of the same payment then gets its result); expired and unspent → `failed` (nothing
//! moved); a claim that never reached submission → released. Rows touched by a live request
//! within `stale_after` are left to that request. All transitions are compare-and-set, so any
//! number of replicas may run this at once without harm.

use std::sync::Arc;
use std::time::Duration;

use super::error::PaymentError;
use super::gate::PaymentGate;
use crate::store::{PaymentState, StoreError, Transition};

/// What one pass did, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    pub settled: usize,
    pub failed: usize,
    pub released: usize,
    pub still_pending: usize,
    pub skipped_in_flight: usize,
}

pub struct Reconciler {
    gate: Arc<PaymentGate>,
    /// A claimed/settling row untouched for this long has lost its request (a claim waiting in
    /// the settlement queue is released too: its transaction then fails to record, and nothing
    /// is sent).
    stale_after_secs: i64,
}

impl Reconciler {
    pub fn new(gate: Arc<PaymentGate>, stale_after: Duration) -> Self {
        Reconciler { gate, stale_after_secs: stale_after.as_secs() as i64 }
    }

    /// One pass over unresolved payments.
    pub async fn tick(&self) -> Result<ReconcileReport, StoreError> {
        let gate = &self.gate;
        let now = gate.clock.now_unix() as i64;
        let mut report = ReconcileReport::default();
        let unresolved = gate.store.unresolved(500).await?;
        metrics::gauge!("tollgate_pending_payments").set(unresolved.len() as f64);
        for row in unresolved {
            let in_flight =
                row.state != PaymentState::Pending && now - row.updated_at < self.stale_after_secs;
            if in_flight {
                report.skipped_in_flight += 1;
                continue;
            }
            if row.state == PaymentState::Claimed {
                // Its request died before submitting anything: free the authorization.
                // Only as it was seen: a claim that moved on meanwhile (its request woke up and
                // broadcast) must never be deleted.
                if gate.store.release_stale(row.id, row.updated_at).await? {
                    report.released += 1;
                }
                continue;
            }
            match gate.resolve(&row).await {
                Ok(_) => report.settled += 1,
                Err(PaymentError::SettlementFailed { .. }) => report.failed += 1,
                Err(_) => {
                    // Abandoned mid-submission: tell retries it is pending, not in progress.
                    if row.state == PaymentState::Settling {
                        let t = Transition::default();
                        gate.store
                            .transition(row.id, &[PaymentState::Settling], PaymentState::Pending, t, now)
                            .await?;
                    }
                    report.still_pending += 1;
                }
            }
        }
        if report != ReconcileReport::default() {
            tracing::info!(?report, "reconciled payments");
        }
        Ok(report)
    }
}
