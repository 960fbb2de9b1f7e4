//! Resolving a payment from chain state alone — for the reconciler, for a retry of a pending
//! payment, and for an authorization someone else spent.
//!
//! Guarantees: a payment is settled only by the paired logs of the transaction that spent its
//! authorization, whoever sent it; it fails only when the chain proves nothing can move (spent
//! elsewhere, cancelled, or unused at a block whose timestamp is past validBefore); anything
//! the chain cannot answer now leaves it pending, recorded as such. Does not submit anything.

use alloy::primitives::Address;

use super::error::PaymentError;
use super::gate::{Landed, PaymentGate, Settlement, hex};
use crate::chain::client::{AuthEffect, ExpectedTransfer, Spent, SpentQuery, TxStatus};
use crate::store::{PaymentRecord, PaymentState};

/// Reason codes of payments that can never settle for us.
const EXPIRED: &str = "invalid_exact_evm_payload_authorization_valid_before";
const CANCELED: &str = "invalid_exact_evm_authorization_canceled";
const SPENT_ELSEWHERE: &str = "invalid_exact_evm_authorization_spent_elsewhere";

impl PaymentGate {
    /// Resolves a payment from chain state alone: the reconciler, a retry, or an authorization
    /// spent by someone else. Chain errors here leave the payment pending: a transaction may
    /// exist, so "unavailable" must not read as "nothing was charged".
    pub async fn resolve(&self, row: &PaymentRecord) -> Result<Settlement, PaymentError> {
        let expect = expected_transfer(row)?;
        let ours = row.tx_hash;
        if let Some(tx) = ours {
            // Not mined yet, reverted, or mined without paying: the authorization decides below.
            let Ok(status) = self.chain.tx_status(tx, &expect).await else {
                return Err(self.still_pending(row).await);
            };
            if let TxStatus::Mined { block, confirmations, effect: AuthEffect::Paid, sender } = status {
                return self.settled_or_pending(row, Landed { tx, block, sender }, confirmations).await;
            }
        }
        // The authorization's state and the chain's time, read at one block.
        let pinned = async {
            let head = self.chain.head().await?;
            let used = self.chain.authorization_used_at(expect.from, expect.nonce, head.number).await?;
            Ok::<_, crate::chain::client::ChainError>((head, used))
        };
        let Ok((head, used)) = pinned.await else {
            return Err(self.still_pending(row).await);
        };
        if used {
            return self.resolve_spent(row, &expect).await;
        }
        if head.timestamp >= row.valid_before as u64 {
            // Unused at a block already past validBefore: no later block can spend it, so it
            // can never move money now. The chain's clock decides, not ours.
            return Err(self.fail_with(row.id, EXPIRED).await);
        }
        Err(self.still_pending(row).await)
    }

    /// Records that a transaction may exist and nothing is concluded yet; the answer to give.
    pub(super) async fn still_pending(&self, row: &PaymentRecord) -> PaymentError {
        if row.state != PaymentState::Pending
            && let Err(e) = self.mark_pending(row.id, row.tx_hash).await
        {
            return e;
        }
        PaymentError::Pending { transaction: row.tx_hash.map(hex) }
    }

    /// The authorization is spent: find the transaction that spent it, whoever sent it, and
    /// honour it only if it carries the paired transfer of the price to our payTo.
    async fn resolve_spent(
        &self,
        row: &PaymentRecord,
        expect: &ExpectedTransfer,
    ) -> Result<Settlement, PaymentError> {
        let payload = stored_payload(row)?;
        let query = SpentQuery {
            authorizer: expect.from,
            nonce: expect.nonce,
            anchor: row.from_block.and_then(|b| u64::try_from(b).ok()),
            not_before: payload
                .valid_after
                .max(payload.valid_before.saturating_sub(payload.longest_validity())),
            window: self.log_window,
        };
        let spent = match self.chain.find_spent(&query).await {
            Ok(spent) => spent,
            Err(e) => {
                tracing::warn!(error = %e, payment.row = row.id, "could not find the spending transaction");
                return Err(self.still_pending(row).await);
            }
        };
        let tx = match spent {
            Some(Spent::Used(tx)) => tx,
            Some(Spent::Canceled(_)) => return Err(self.fail_with(row.id, CANCELED).await),
            // Used, yet no log in reach (a reorg in progress, or beyond the search budget):
            // nothing can be concluded; the reconciler asks again.
            None => return Err(self.still_pending(row).await),
        };
        match self.chain.tx_status(tx, expect).await {
            Ok(TxStatus::Mined { block, confirmations, effect: AuthEffect::Paid, sender }) => {
                self.settled_or_pending(row, Landed { tx, block, sender }, confirmations).await
            }
            Ok(TxStatus::Mined { effect: AuthEffect::SpentOtherwise, .. }) => {
                tracing::warn!(payment.row = row.id, payment.tx = %tx, "authorization spent without paying payTo the price");
                Err(self.fail_with(row.id, SPENT_ELSEWHERE).await)
            }
            _ => Err(self.still_pending(row).await),
        }
    }

    pub(super) async fn settled_or_pending(
        &self,
        row: &PaymentRecord,
        landed: Landed,
        confirmations: u64,
    ) -> Result<Settlement, PaymentError> {
        if confirmations >= self.confirmations {
            return self.mark_settled(row, landed, super::gate::Lease::Leave).await;
        }
        self.mark_pending(row.id, Some(landed.tx)).await?;
        Err(PaymentError::Pending { transaction: Some(hex(landed.tx)) })
    }
}

/// The parts of the stored payload resolution needs beyond the row's columns.
struct StoredPayload {
    to: Address,
    valid_after: u64,
    valid_before: u64,
    /// `accepted.maxTimeoutSeconds`: verification bounds validBefore by it.
    max_timeout_seconds: u64,
}

impl StoredPayload {
    /// The longest an authorization we accept may have been valid for when it reached us.
    fn longest_validity(&self) -> u64 {
        self.max_timeout_seconds + super::verify::VALIDITY_SKEW_SECS
    }
}

/// Damaged stored data is our fault: an internal error, never a fresh challenge.
fn corrupt(what: &str) -> PaymentError {
    PaymentError::Corrupt(format!("stored payment has a bad {what}"))
}

fn stored_payload(row: &PaymentRecord) -> Result<StoredPayload, PaymentError> {
    let payload: serde_json::Value =
        serde_json::from_str(&row.payload_json).map_err(|_| corrupt("payload"))?;
    let field =
        |name: &str| payload.pointer(&format!("/payload/authorization/{name}")).and_then(|v| v.as_str());
    let to = field("to").and_then(|s| s.parse::<Address>().ok()).ok_or_else(|| corrupt("recipient"))?;
    let number = |name: &str| field(name).and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| corrupt(name));
    let (valid_after, valid_before) = (number("validAfter")?, number("validBefore")?);
    let max_timeout_seconds = payload
        .pointer("/accepted/maxTimeoutSeconds")
        .and_then(|v| v.as_u64())
        .ok_or_else(|| corrupt("accepted"))?;
    Ok(StoredPayload { to, valid_after, valid_before, max_timeout_seconds })
}

/// The transfer a stored payment must produce on chain.
pub(super) fn expected_transfer(row: &PaymentRecord) -> Result<ExpectedTransfer, PaymentError> {
    Ok(ExpectedTransfer {
        from: row.payer,
        to: stored_payload(row)?.to,
        value: row.amount.into(),
        nonce: row.nonce,
    })
}
