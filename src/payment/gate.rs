//! `PaymentGate`: claim, then settle and confirm — the money-moving part of the payment stage.
//!
//! Guarantees: one authorization is claimed by exactly one request fleet-wide; a claim that
//! never reached the chain is released (the authorization stays usable); once a transaction
//! may exist, the payment is never dropped — it ends `settled`, `failed`, or `pending` for the
//! reconciler; `settled` is only written after the token's own logs show the transfer to payTo
//! with the configured confirmations. Does not run handlers or render answers.

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256, U256};

use super::error::PaymentError;
use super::requirements::Quote;
use super::settle::{SettleError, SettleRequest, Settler, TxRecorder};
use super::verify::VerifiedPayment;
use super::wire::SettlementResponse;
use crate::chain::Network;
use crate::chain::client::{ChainClient, ExpectedTransfer, TxStatus};
use crate::clock::SharedClock;
use crate::store::{Claim, NewPayment, PaymentRecord, PaymentState, Store, StoreError, Transition};

/// Confirmation polling: quick at first (a local chain mines at once), backing off to the
/// slowest useful rate (Base produces a block every 2 s).
const CONFIRM_POLL_FIRST: Duration = Duration::from_millis(10);
const CONFIRM_POLL_MAX: Duration = Duration::from_millis(250);

/// A settled payment: the money moved, confirmed on chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub row_id: i64,
    pub transaction: String,
    pub block: u64,
    pub payer: String,
    pub network: String,
    /// From the payment row: what the receipt binds.
    pub asset: String,
    pub amount: String,
    pub nonce: String,
}

impl Settlement {
    pub fn response(&self) -> SettlementResponse {
        SettlementResponse {
            success: true,
            error_reason: None,
            transaction: self.transaction.clone(),
            network: self.network.clone(),
            payer: Some(self.payer.clone()),
        }
    }

    pub fn from_record(row: &PaymentRecord, payer: String) -> Option<Settlement> {
        Some(Settlement {
            row_id: row.id,
            transaction: row.tx_hash.clone()?,
            block: u64::try_from(row.block_number?).ok()?,
            payer,
            network: row.network.clone(),
            asset: row.asset.clone(),
            amount: row.amount.clone(),
            nonce: row.nonce.clone(),
        })
    }
}

/// What the claim found.
#[derive(Debug, Clone)]
pub enum Claimed {
    /// A new claim: this request must settle it.
    Fresh(PaymentRecord),
    /// The same payment, already settled: serve its stored result, or run the handler if the
    /// result was never produced (the settlement was resolved after the request ended).
    AlreadySettled(PaymentRecord, Settlement),
}

pub struct PaymentGate {
    pub store: Arc<dyn Store>,
    pub chain: ChainClient,
    pub settler: Arc<dyn Settler>,
    pub network: Network,
    pub clock: SharedClock,
    pub confirmations: u64,
    pub settle_timeout: Duration,
}

fn store_down(e: StoreError) -> PaymentError {
    tracing::warn!(error = %e, "payment store unavailable");
    PaymentError::StoreUnavailable
}

impl PaymentGate {
    fn now(&self) -> i64 {
        self.clock.now_unix() as i64
    }

    /// Step 7: the atomic claim of (network, asset, payer, nonce).
    pub async fn claim(
        &self,
        v: &VerifiedPayment,
        quote: &Quote,
        args: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Claimed, PaymentError> {
        let new = NewPayment {
            network: self.network.caip2.clone(),
            asset: format!("{:#x}", self.network.asset),
            payer: v.payer.key(),
            nonce: v.nonce_hex(),
            payload_hash: v.payload_hash.clone(),
            payment_id: v.payment_id.clone(),
            tool: quote.tool.clone(),
            amount: quote.amount.to_string(),
            valid_before: v.valid_before().min(i64::MAX as u64) as i64,
            payload_json: v.payload_json.clone(),
            args_json: Some(serde_json::Value::Object(args.clone()).to_string()),
            now: self.now(),
        };
        match self.store.claim(&new).await.map_err(store_down)? {
            Claim::Won(row) => Ok(Claimed::Fresh(row)),
            Claim::Taken(row) => self.classify_taken(row, v).await,
        }
    }

    async fn classify_taken(&self, row: PaymentRecord, v: &VerifiedPayment) -> Result<Claimed, PaymentError> {
        if row.payload_hash != v.payload_hash {
            let same_id = v.payment_id.is_some() && row.payment_id == v.payment_id;
            let same_key = row.payer == v.payer.key() && row.nonce == v.nonce_hex();
            return Err(if same_id && !same_key {
                PaymentError::IdentifierConflict
            } else {
                PaymentError::NonceReused
            });
        }
        match row.state {
            PaymentState::Settled => {
                let settlement = Settlement::from_record(&row, v.payer.to_string())
                    .ok_or_else(|| PaymentError::Malformed("settled payment lacks its transaction".into()))?;
                Ok(Claimed::AlreadySettled(row, settlement))
            }
            // A retry of a payment whose transaction is out: ask the chain now rather than make
            // the client wait for the reconciler (this is how a pending payment is collected).
            PaymentState::Pending | PaymentState::Settling
                if row.tx_hash.is_some() || row.state == PaymentState::Pending =>
            {
                match self.resolve(&row, v.payer.to_string()).await {
                    Ok(settlement) => Ok(Claimed::AlreadySettled(row, settlement)),
                    // A settling row not yet confirmed most likely has its request still
                    // waiting on it (or a crashed one, for the reconciler): in progress.
                    Err(PaymentError::Pending { .. }) if row.state == PaymentState::Settling => {
                        Err(PaymentError::InProgress)
                    }
                    Err(e) => Err(e),
                }
            }
            PaymentState::Claimed | PaymentState::Settling | PaymentState::Pending => {
                Err(PaymentError::InProgress)
            }
            PaymentState::Failed => Err(PaymentError::SettlementFailed {
                reason: row.error.unwrap_or_else(|| "invalid_exact_evm_transaction_failed".into()),
            }),
        }
    }

    /// Step 8: chain checks, submission and confirmation, before any handler runs.
    pub async fn settle(
        &self,
        row: &PaymentRecord,
        v: &VerifiedPayment,
        quote: &Quote,
    ) -> Result<Settlement, PaymentError> {
        let a = &v.authorization;
        // Cheap refusals first; any failure here has moved nothing, so the claim is released.
        let checks = async {
            if self.chain.authorization_used(a.from, a.nonce).await? {
                return Ok(Err(PaymentError::NonceReused));
            }
            if self.chain.balance_of(a.from).await? < a.value {
                return Ok(Err(PaymentError::InsufficientBalance));
            }
            Ok::<_, crate::chain::client::ChainError>(Ok(()))
        };
        let refusal = match checks.await {
            Ok(Ok(())) => None,
            Ok(Err(refusal)) => Some(refusal),
            Err(e) => {
                tracing::warn!(error = %e, "chain unavailable before settlement");
                Some(PaymentError::ChainUnavailable)
            }
        };
        if let Some(refusal) = refusal {
            self.store.release(row.id).await.map_err(store_down)?;
            return Err(refusal);
        }
        let moved = [PaymentState::Claimed];
        let t = Transition::default();
        if !self
            .store
            .transition(row.id, &moved, PaymentState::Settling, t, self.now())
            .await
            .map_err(store_down)?
        {
            return Err(PaymentError::InProgress);
        }
        let started = std::time::Instant::now();
        let recorder = RowRecorder { store: self.store.as_ref(), row: row.id, now: self.now() };
        let request = SettleRequest { payment: v, requirements: &quote.requirements, payload: &v.raw };
        let submitted = self.settler.submit(&request, &recorder).await;
        let tx = match submitted {
            Ok(tx) => tx,
            Err(SettleError::NotSent(why)) => {
                tracing::warn!(reason = %why, "settlement not sent; releasing the claim");
                self.store.release(row.id).await.map_err(store_down)?;
                return Err(PaymentError::ChainUnavailable);
            }
            Err(SettleError::Refused(PaymentError::NonceReused)) => {
                // Someone else's transaction may have spent it — which still pays payTo.
                return self.resolve(row, v.payer.to_string()).await;
            }
            Err(SettleError::Refused(refusal)) => {
                self.fail(row.id, refusal.code()).await?;
                return Err(refusal);
            }
            Err(SettleError::Ambiguous { tx }) => return self.mark_pending(row.id, tx).await,
        };
        let confirmed = self.confirm(row, tx, v.payer.to_string()).await;
        if confirmed.is_ok() {
            metrics::histogram!("tollgate_settlement_seconds").record(started.elapsed().as_secs_f64());
        }
        confirmed
    }

    /// Waits for `tx` to be mined with enough confirmations, until the settle timeout.
    async fn confirm(
        &self,
        row: &PaymentRecord,
        tx: B256,
        payer: String,
    ) -> Result<Settlement, PaymentError> {
        let expect = expected_transfer(row)?;
        let deadline = tokio::time::Instant::now() + self.settle_timeout;
        let mut poll = CONFIRM_POLL_FIRST;
        loop {
            match self.chain.tx_status(tx, &expect).await {
                Ok(TxStatus::Mined { block, confirmations, paid: true })
                    if confirmations >= self.confirmations =>
                {
                    return self.mark_settled(row, tx, block, payer).await;
                }
                Ok(TxStatus::Mined { paid: false, .. }) => {
                    // Mined but without our transfer: never serve a result for it.
                    self.fail(row.id, "invalid_exact_evm_transaction_failed").await?;
                    return Err(PaymentError::SettlementFailed {
                        reason: "invalid_exact_evm_transaction_failed".into(),
                    });
                }
                Ok(TxStatus::Reverted { .. }) => {
                    self.fail(row.id, "invalid_exact_evm_transaction_failed").await?;
                    return Err(PaymentError::SettlementFailed {
                        reason: "invalid_exact_evm_transaction_failed".into(),
                    });
                }
                Ok(_) | Err(_) if tokio::time::Instant::now() >= deadline => {
                    return self.mark_pending(row.id, Some(tx)).await;
                }
                Ok(_) | Err(_) => {
                    tokio::time::sleep(poll).await;
                    poll = (poll * 2).min(CONFIRM_POLL_MAX);
                }
            }
        }
    }

    /// Resolves a payment from chain state alone (reconciler, or a nonce spent by someone else).
    pub async fn resolve(&self, row: &PaymentRecord, payer: String) -> Result<Settlement, PaymentError> {
        let expect = expected_transfer(row)?;
        let known = row.tx_hash.as_deref().and_then(|t| t.parse::<B256>().ok());
        let spent_by = match known {
            Some(tx) => Some(tx),
            None => self
                .chain
                .find_authorization_used(expect.from, expect.nonce)
                .await
                .map_err(|_| PaymentError::ChainUnavailable)?,
        };
        if let Some(tx) = spent_by {
            match self.chain.tx_status(tx, &expect).await.map_err(|_| PaymentError::ChainUnavailable)? {
                TxStatus::Mined { block, confirmations, paid: true }
                    if confirmations >= self.confirmations =>
                {
                    return self.mark_settled(row, tx, block, payer).await;
                }
                TxStatus::Mined { paid: true, .. } => return self.mark_pending(row.id, Some(tx)).await,
                TxStatus::Mined { paid: false, .. } | TxStatus::Reverted { .. } if known.is_none() => {}
                TxStatus::Mined { .. } | TxStatus::Reverted { .. } => {
                    // Our transaction failed; the authorization may still be spendable later.
                    let used = self.chain.authorization_used(expect.from, expect.nonce).await;
                    if matches!(used, Ok(false)) && self.now() >= row.valid_before {
                        self.fail(row.id, "invalid_exact_evm_transaction_failed").await?;
                        return Err(PaymentError::SettlementFailed {
                            reason: "invalid_exact_evm_transaction_failed".into(),
                        });
                    }
                }
                TxStatus::NotMined => {}
            }
        }
        let used = self
            .chain
            .authorization_used(expect.from, expect.nonce)
            .await
            .map_err(|_| PaymentError::ChainUnavailable)?;
        if !used && self.now() >= row.valid_before {
            // Expired without being spent: it can never move money now.
            self.fail(row.id, "invalid_exact_evm_payload_authorization_valid_before").await?;
            return Err(PaymentError::SettlementFailed {
                reason: "invalid_exact_evm_payload_authorization_valid_before".into(),
            });
        }
        Err(PaymentError::Pending { transaction: row.tx_hash.clone() })
    }

    async fn mark_settled(
        &self,
        row: &PaymentRecord,
        tx: B256,
        block: u64,
        payer: String,
    ) -> Result<Settlement, PaymentError> {
        let transaction = format!("{tx:#x}");
        let t = Transition { tx_hash: Some(&transaction), block_number: Some(block as i64), error: None };
        let from = [PaymentState::Settling, PaymentState::Pending, PaymentState::Claimed];
        let moved = self
            .store
            .transition(row.id, &from, PaymentState::Settled, t, self.now())
            .await
            .map_err(store_down)?;
        if moved {
            metrics::counter!("tollgate_payments_total", "outcome" => "settled").increment(1);
            let amount = row.amount.parse::<u64>().unwrap_or(0);
            metrics::counter!("tollgate_revenue_atomic_total", "tool" => row.tool.clone()).increment(amount);
        }
        tracing::info!(payment.row = row.id, payment.tx = %transaction, payment.block = block, "payment settled");
        Ok(Settlement {
            row_id: row.id,
            transaction,
            block,
            payer,
            network: row.network.clone(),
            asset: row.asset.clone(),
            amount: row.amount.clone(),
            nonce: row.nonce.clone(),
        })
    }

    async fn mark_pending(&self, id: i64, tx: Option<B256>) -> Result<Settlement, PaymentError> {
        let transaction = tx.map(|t| format!("{t:#x}"));
        let t = Transition { tx_hash: transaction.as_deref(), ..Default::default() };
        let from = [PaymentState::Claimed, PaymentState::Settling, PaymentState::Pending];
        self.store.transition(id, &from, PaymentState::Pending, t, self.now()).await.map_err(store_down)?;
        metrics::counter!("tollgate_payments_total", "outcome" => "pending").increment(1);
        tracing::warn!(payment.row = id, payment.tx = ?transaction, "settlement pending confirmation");
        Err(PaymentError::Pending { transaction })
    }

    async fn fail(&self, id: i64, reason: &str) -> Result<(), PaymentError> {
        let t = Transition { error: Some(reason), ..Default::default() };
        let from = [PaymentState::Claimed, PaymentState::Settling, PaymentState::Pending];
        self.store.transition(id, &from, PaymentState::Failed, t, self.now()).await.map_err(store_down)?;
        metrics::counter!("tollgate_payments_total", "outcome" => "failed").increment(1);
        tracing::warn!(payment.row = id, payment.reason = reason, "payment failed; nothing was charged");
        Ok(())
    }
}

/// The transfer a stored payment must produce on chain.
fn expected_transfer(row: &PaymentRecord) -> Result<ExpectedTransfer, PaymentError> {
    let corrupt = |what: &str| PaymentError::Malformed(format!("stored payment has a bad {what}"));
    let payload: serde_json::Value =
        serde_json::from_str(&row.payload_json).map_err(|_| corrupt("payload"))?;
    let to = payload
        .pointer("/payload/authorization/to")
        .and_then(|v| v.as_str())
        .and_then(|s| s.parse::<Address>().ok())
        .ok_or_else(|| corrupt("recipient"))?;
    Ok(ExpectedTransfer {
        from: row.payer.parse().map_err(|_| corrupt("payer"))?,
        to,
        value: U256::from_str_radix(&row.amount, 10).map_err(|_| corrupt("amount"))?,
        nonce: row.nonce.parse().map_err(|_| corrupt("nonce"))?,
    })
}

/// Records a settlement transaction hash on its payment row before broadcast.
struct RowRecorder<'a> {
    store: &'a dyn Store,
    row: i64,
    now: i64,
}

#[async_trait::async_trait]
impl TxRecorder for RowRecorder<'_> {
    async fn record(&self, tx: B256) -> Result<(), StoreError> {
        let hash = format!("{tx:#x}");
        let t = Transition { tx_hash: Some(&hash), ..Default::default() };
        self.store
            .transition(self.row, &[PaymentState::Settling], PaymentState::Settling, t, self.now)
            .await?;
        Ok(())
    }
}
