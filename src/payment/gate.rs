//! `PaymentGate`: claim, then settle and confirm — the money-moving part of the payment stage.
//!
//! Guarantees:
//! - one authorization is claimed by exactly one request fleet-wide;
//! - a claim is released (the authorization stays usable) only when nothing was broadcast;
//!   once a transaction may exist its row is kept, bound to the call it paid for, because its
//!   payload may be public and anyone may still land it;
//! - once a transaction may exist, the payment is never dropped: it ends `settled`, `failed`
//!   (the chain proves it paid us nothing: spent elsewhere, cancelled, or unused at a block
//!   whose timestamp is past validBefore), or `pending` for the reconciler;
//! - `settled` is written only when the token's `AuthorizationUsed(from, nonce)` log is followed
//!   by its paired `Transfer(from, payTo, price)` (see `ExpectedTransfer::effect_in`), with the
//!   configured confirmations, in whichever transaction spent it: ours, a facilitator's, or a
//!   stranger's who submitted the public authorization first;
//! - a payload replayed for another tool or other arguments buys nothing (`AlreadyUsed`).
//!
//! Does not run handlers or render answers.

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256, TxHash, U256};

use super::error::PaymentError;
use super::price::CallTerms;
use super::requirements::Quote;
use super::resolve::expected_transfer;
use super::settle::{Prepared, SettleError, SettleRequest, Settler, Submitted, TxRecorder};
use super::verify::VerifiedPayment;
use super::wire::SettlementResponse;
use crate::chain::Network;
use crate::chain::client::{AuthEffect, Chain, ChainError, TxStatus};
use crate::clock::SharedClock;
use crate::money::UsdcAmount;
use crate::store::{
    Claim, NewPayment, PaymentKey, PaymentRecord, PaymentState, Store, StoreError, Transition,
};

/// Confirmation polling: the first check at once (a local chain, or a node that mined while
/// we signed), then quick (10 ms), backing off to the slowest useful rate (Base: 2 s blocks).
const CONFIRM_POLL_FIRST: Duration = Duration::from_millis(10);
const CONFIRM_POLL_MAX: Duration = Duration::from_millis(250);

/// Reason codes of payments that can never settle for us.
const TX_FAILED: &str = "invalid_exact_evm_transaction_failed";

/// Whether a settlement takes the handler lease as it is recorded: a fresh call about to run
/// its handler takes it in the same write (`Transition::handler_lease`); any other settlement
/// leaves it to be taken apart (`Store::start_handler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    Take,
    Leave,
}

/// A settled payment: the money moved, confirmed on chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    pub row_id: i64,
    pub transaction: TxHash,
    pub block: u64,
    pub payer: Address,
    pub network: String,
    /// From the payment row: what the receipt binds.
    pub asset: Address,
    pub amount: UsdcAmount,
    pub nonce: B256,
    /// This request took the handler lease with the settlement ([`Lease::Take`]).
    pub leased: bool,
}

impl Settlement {
    /// The standard x402 settlement response (hashes lower-case, addresses checksummed).
    pub fn response(&self) -> SettlementResponse {
        SettlementResponse {
            success: true,
            error_reason: None,
            transaction: format!("{:#x}", self.transaction),
            network: self.network.clone(),
            payer: Some(self.payer.to_checksum(None)),
        }
    }

    /// The settlement a settled row records (`None` if it is not settled).
    pub fn from_record(row: &PaymentRecord) -> Option<Settlement> {
        Some(Settlement {
            row_id: row.id,
            transaction: row.tx_hash?,
            block: u64::try_from(row.block_number?).ok()?,
            payer: row.payer,
            network: row.network.clone(),
            asset: row.asset,
            amount: row.amount,
            nonce: row.nonce,
            leased: false,
        })
    }
}

/// A transaction that spent the authorization as we expect, mined: where, and who sent it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Landed {
    pub tx: TxHash,
    pub block: u64,
    pub sender: Address,
}

/// A transaction hash as answers carry it.
pub(super) fn hex(tx: TxHash) -> String {
    format!("{tx:#x}")
}

/// What the chain said before settlement.
#[derive(Debug, Clone, Copy)]
pub struct ChainChecks {
    pub used: bool,
    pub balance: U256,
    pub head: u64,
    /// What the settler simulated ahead of the submission (`Settler::presimulation`).
    pub prepared: Option<Prepared>,
}

/// What the prechecks found.
#[derive(Debug, Clone)]
pub enum Checked {
    /// Unused and funded at block `head` (where log searches for it will start): submit it,
    /// with what the settler read ahead.
    Ready { head: u64, prepared: Option<Prepared> },
    /// Already spent on chain, in a transaction that paid us (a front-runner submitted it).
    Spent(Settlement),
}

/// What the claim found.
#[derive(Debug, Clone)]
pub enum Claimed {
    /// A new claim: this request must settle it.
    Fresh(PaymentRecord),
    /// The same call, already settled: serve its stored result, or run the handler with the
    /// stored arguments if the result was never produced (the settlement was resolved after
    /// the request ended).
    AlreadySettled(PaymentRecord, Settlement),
}

pub struct PaymentGate {
    pub store: Arc<dyn Store>,
    pub chain: Arc<dyn Chain>,
    pub settler: Arc<dyn Settler>,
    pub network: Network,
    pub clock: SharedClock,
    pub confirmations: u64,
    pub settle_timeout: Duration,
    /// Blocks per `eth_getLogs` request (hosted RPCs refuse wide ranges).
    pub log_window: u64,
    /// ERC-6492 factories through which an undeployed smart wallet may be deployed to pay.
    pub allowed_factories: Vec<Address>,
}

/// The store failed before anything could move: the answer may say nothing was charged.
pub(super) fn store_down(e: StoreError) -> PaymentError {
    tracing::warn!(error = %e, "payment store unavailable");
    PaymentError::StoreUnavailable
}

/// The store failed after a transaction may exist: the answer must not say nothing was charged.
pub(super) fn unrecorded(tx: Option<TxHash>) -> impl FnOnce(StoreError) -> PaymentError {
    move |e| {
        tracing::error!(error = %e, payment.tx = ?tx, "could not record a payment outcome");
        PaymentError::OutcomeUnknown { transaction: tx.map(hex) }
    }
}

/// SHA-256 (hex) of the canonical arguments: what makes a replay "the same call".
pub fn args_hash(args: &serde_json::Map<String, serde_json::Value>) -> String {
    crate::canonical::hash_of(args)
}

impl PaymentGate {
    /// Proves a smart wallet's signature with the chain (`wallet::prove`); an EOA's, proven
    /// locally already, passes untouched.
    pub async fn prove_payer(&self, payment: VerifiedPayment) -> Result<VerifiedPayment, PaymentError> {
        if payment.signature.is_proven() {
            return Ok(payment);
        }
        super::wallet::prove(self.chain.as_ref(), &self.allowed_factories, payment).await
    }

    fn now(&self) -> i64 {
        self.clock.now_unix() as i64
    }

    /// A payment this server already holds, if any: a retry (or a replay) of it must neither
    /// spend wallet limits nor be refused for a tool's readiness, only be answered.
    /// `args_hash` is the call's [`args_hash`], computed once by the caller.
    pub async fn known(
        &self,
        v: &VerifiedPayment,
        quote: &Quote,
        args_hash: &str,
    ) -> Result<Option<Claimed>, PaymentError> {
        let key = PaymentKey {
            network: &self.network.caip2,
            asset: self.network.asset,
            payer: v.payer.address(),
            nonce: v.authorization.nonce,
        };
        match self.store.by_key(&key).await.map_err(store_down)? {
            Some(row) => self.classify_taken(row, v, quote, args_hash).await.map(Some),
            None => Ok(None),
        }
    }

    /// The amount of this very payload if this server already holds it (same payer, nonce and
    /// payload): a resend after a price change is answered for what it is, never re-challenged
    /// (which would invite a second payment). A store that cannot say is an error, never "not
    /// held": the payer of a settled payment must not be asked to pay again.
    pub async fn held_amount(
        &self,
        decoded: &super::decode::DecodedPayment,
    ) -> Result<Option<UsdcAmount>, PaymentError> {
        let a = &decoded.payload.payload.authorization;
        let (Ok(payer), Ok(nonce)) = (a.from.parse(), a.nonce.parse()) else { return Ok(None) };
        let key = PaymentKey { network: &self.network.caip2, asset: self.network.asset, payer, nonce };
        let Some(row) = self.store.by_key(&key).await.map_err(store_down)? else { return Ok(None) };
        let Ok((_, hash)) = super::verify::canonical_payload(&decoded.raw) else { return Ok(None) };
        Ok((row.payload_hash == hash).then_some(row.amount))
    }

    /// Step 7: the atomic claim of (network, asset, payer, nonce), with the call's arguments
    /// (and their [`args_hash`], computed once by the caller) and terms.
    pub async fn claim(
        &self,
        v: &VerifiedPayment,
        quote: &Quote,
        args: &serde_json::Map<String, serde_json::Value>,
        args_hash: &str,
        terms: &CallTerms,
    ) -> Result<Claimed, PaymentError> {
        let new = NewPayment {
            network: self.network.caip2.clone(),
            asset: self.network.asset,
            payer: v.payer.address(),
            nonce: v.authorization.nonce,
            payload_hash: v.payload_hash.clone(),
            payment_id: v.payment_id.clone(),
            tool: quote.tool.clone(),
            amount: quote.amount,
            valid_before: v.valid_before().min(i64::MAX as u64) as i64,
            payload_json: v.payload_json.clone(),
            args_json: Some(serde_json::Value::Object(args.clone()).to_string()),
            args_hash: args_hash.to_owned(),
            price_terms: Some(serde_json::to_string(terms).expect("terms serialise")),
            now: self.now(),
        };
        match self.store.claim(&new).await.map_err(store_down)? {
            Claim::Won(row) => Ok(Claimed::Fresh(row)),
            Claim::Taken(row) => self.classify_taken(row, v, quote, args_hash).await,
        }
    }

    async fn classify_taken(
        &self,
        row: PaymentRecord,
        v: &VerifiedPayment,
        quote: &Quote,
        call_args_hash: &str,
    ) -> Result<Claimed, PaymentError> {
        if row.payload_hash != v.payload_hash {
            let same_id = v.payment_id.is_some() && row.payment_id == v.payment_id;
            let same_key = row.payer == v.payer.address() && row.nonce == v.authorization.nonce;
            return Err(if same_id && !same_key {
                PaymentError::IdentifierConflict
            } else {
                PaymentError::NonceReused
            });
        }
        // The payload is public once settled (calldata), so anyone can rebuild it: it buys the
        // stored answer only for the very call it paid for, and reveals nothing otherwise.
        // Rows older than the arguments hash compare their kept arguments; with neither, the
        // call cannot be proven the same, so nothing is served.
        let paid_for = row.args_hash.clone().or_else(|| {
            let kept = row.args_json.as_deref()?;
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(kept)
                .ok()
                .map(|a| args_hash(&a))
        });
        let same_call = row.tool == quote.tool && paid_for.is_some_and(|h| h == call_args_hash);
        if !same_call {
            return Err(PaymentError::AlreadyUsed);
        }
        match row.state {
            PaymentState::Settled => {
                let settlement = Settlement::from_record(&row)
                    .ok_or_else(|| PaymentError::Corrupt("settled payment lacks its transaction".into()))?;
                Ok(Claimed::AlreadySettled(row, settlement))
            }
            // A retry of a payment whose transaction is out: ask the chain now rather than make
            // the client wait for the reconciler (this is how a pending payment is collected).
            PaymentState::Pending | PaymentState::Settling
                if row.tx_hash.is_some() || row.state == PaymentState::Pending =>
            {
                match self.resolve(&row).await {
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
            PaymentState::Failed => {
                Err(PaymentError::SettlementFailed { reason: row.error.unwrap_or_else(|| TX_FAILED.into()) })
            }
        }
    }

    /// The chain checks settlement starts from: is the authorization already used, does the
    /// payer hold the price, and the head (where log searches start), beside what the settler
    /// reads ahead. They only read, so a caller may ask them while the claim is being written.
    pub async fn check_chain(&self, v: &VerifiedPayment) -> Result<ChainChecks, ChainError> {
        let a = &v.authorization;
        let asked = std::time::Instant::now();
        let simulate = self.settler.presimulation(v);
        let checks = self.chain.settlement_checks(a.from, a.nonce, simulate).await?;
        tracing::debug!(timing.checks_us = asked.elapsed().as_micros() as u64, "chain checks answered");
        let prepared = (checks.simulated == Some(true)).then_some(Prepared { simulated_at: asked });
        Ok(ChainChecks { used: checks.used, balance: checks.balance, head: checks.head, prepared })
    }

    /// Step 8 with the chain checks already answered.
    pub async fn settle_checked(
        &self,
        row: &PaymentRecord,
        v: &VerifiedPayment,
        quote: &Quote,
        checks: Result<ChainChecks, ChainError>,
        lease: Lease,
    ) -> Result<Settlement, PaymentError> {
        match self.precheck(row, v, checks).await? {
            Checked::Spent(settlement) => Ok(settlement),
            Checked::Ready { head, prepared } => self.submit(row, v, quote, head, prepared, lease).await,
        }
    }

    /// Would this payment settle now? The chain checks, and (for a charge taken only after
    /// the run) a simulated `transferWithAuthorization`. A claim that cannot settle is released
    /// (nothing was broadcast); one already spent on chain is resolved from the chain.
    pub async fn precheck(
        &self,
        row: &PaymentRecord,
        v: &VerifiedPayment,
        checks: Result<ChainChecks, ChainError>,
    ) -> Result<Checked, PaymentError> {
        let a = &v.authorization;
        // A failure to ask has moved nothing: release.
        let checks = checks.map(|c| (c.used, c.balance, c.head, c.prepared));
        let (used, balance, head, prepared) = match checks {
            Ok(answers) => answers,
            Err(e) => {
                tracing::warn!(error = %e, "chain unavailable before settlement");
                self.store.release(row.id).await.map_err(store_down)?;
                return Err(PaymentError::ChainUnavailable);
            }
        };
        let t = Transition { from_block: Some(head as i64), ..Default::default() };
        if used {
            // Spent already: by a facilitator, a stranger who saw the authorization, or the
            // payer's own cancellation. The chain says which; only a paired transfer to us pays.
            // Parked as pending first: money may have moved, so the row must outlive this
            // request (a claimed row would be released by the reconciler).
            let parked = [PaymentState::Claimed];
            self.store
                .transition(row.id, &parked, PaymentState::Pending, t, self.now())
                .await
                .map_err(unrecorded(None))?;
            return self.resolve(&self.reload(row).await?).await.map(Checked::Spent);
        }
        if balance < a.value {
            self.store.release(row.id).await.map_err(store_down)?;
            return Err(PaymentError::InsufficientBalance);
        }
        Ok(Checked::Ready { head, prepared })
    }

    /// As [`precheck`](Self::precheck), then a simulated transfer: nothing is run for a payment
    /// the token would refuse now (a bad wallet signature, an expired window).
    pub async fn precheck_simulated(
        &self,
        row: &PaymentRecord,
        v: &VerifiedPayment,
        checks: Result<ChainChecks, ChainError>,
    ) -> Result<Checked, PaymentError> {
        let checked = self.precheck(row, v, checks).await?;
        if let Checked::Ready { .. } = checked
            && let Err(refusal) = super::wallet::simulate(self.chain.as_ref(), v).await
        {
            self.store.release(row.id).await.map_err(store_down)?;
            return Err(refusal);
        }
        Ok(checked)
    }

    /// Submission and confirmation of a prechecked claim.
    pub async fn submit(
        &self,
        row: &PaymentRecord,
        v: &VerifiedPayment,
        quote: &Quote,
        head: u64,
        prepared: Option<Prepared>,
        lease: Lease,
    ) -> Result<Settlement, PaymentError> {
        // A settler that records its transaction before broadcasting moves the row to
        // `settling` then, with the transaction, in one write. Otherwise it is moved now: a
        // facilitator's transaction is learnt only after the fact, and a row whose handler has
        // already run (`on_success`, `Lease::Leave`) must not wait in the batcher as a claim,
        // which the reconciler releases once stale (its payer's resend would run it again).
        if !self.settler.records_before_broadcast() || lease == Lease::Leave {
            let moved = [PaymentState::Claimed];
            let t = Transition { from_block: Some(head as i64), ..Default::default() };
            let settling = self.store.transition(row.id, &moved, PaymentState::Settling, t, self.now());
            if !settling.await.map_err(store_down)? {
                return Err(PaymentError::InProgress);
            }
        }
        let started = std::time::Instant::now();
        let recorder = Arc::new(RowRecorder {
            store: self.store.clone(),
            row: row.id,
            from_block: head as i64,
            clock: self.clock.clone(),
        });
        let request =
            SettleRequest { payment: v, requirements: &quote.requirements, payload: &v.raw, prepared };
        let submitted = self.settler.submit(&request, recorder).await;
        tracing::debug!(timing.submit_us = started.elapsed().as_micros() as u64, "settlement submitted");
        let settled = match submitted {
            Ok(submitted) => self.confirm(row, submitted, lease).await,
            Err(SettleError::NotSent(why)) => {
                tracing::warn!(reason = %why, "settlement not sent; releasing the claim");
                self.store.release(row.id).await.map_err(store_down)?;
                Err(PaymentError::ChainUnavailable)
            }
            // Someone else's transaction may have spent it, which may still pay us.
            Err(SettleError::Refused(PaymentError::NonceReused)) => {
                self.resolve(&self.reload(row).await?).await
            }
            Err(SettleError::Refused(refusal)) => {
                self.fail(row.id, refusal.code()).await?;
                Err(refusal)
            }
            Err(SettleError::Ambiguous { tx }) => {
                self.mark_pending(row.id, tx).await?;
                // Ask the chain at once: a facilitator that settled, then failed to say so,
                // has already paid us.
                self.resolve(&self.reload(row).await?).await
            }
        };
        if settled.is_ok() {
            metrics::histogram!("tollgate_settlement_seconds").record(started.elapsed().as_secs_f64());
        }
        settled
    }

    pub(super) async fn reload(&self, row: &PaymentRecord) -> Result<PaymentRecord, PaymentError> {
        let pending = unrecorded(row.tx_hash);
        match self.store.payment(row.id).await {
            Ok(Some(row)) => Ok(row),
            Ok(None) => Err(PaymentError::Corrupt("payment row vanished".into())),
            Err(e) => Err(pending(e)),
        }
    }

    /// Waits for our transaction to be mined with enough confirmations, until the settle
    /// timeout. A receipt that came with the broadcast (EIP-7966) is the first answer, at once.
    async fn confirm(
        &self,
        row: &PaymentRecord,
        submitted: Submitted,
        lease: Lease,
    ) -> Result<Settlement, PaymentError> {
        let expect = expected_transfer(row)?;
        let tx = submitted.tx;
        if let Some(receipt) = &submitted.receipt
            && let TxStatus::Mined { block, confirmations, effect: AuthEffect::Paid, sender } =
                TxStatus::of(receipt, &expect, self.network.asset, 0)
            && confirmations >= self.confirmations
        {
            return self.mark_settled(row, Landed { tx, block, sender }, lease).await;
        }
        let deadline = tokio::time::Instant::now() + self.settle_timeout;
        let mut poll = CONFIRM_POLL_FIRST;
        loop {
            match self.chain.tx_status(tx, &expect).await {
                Ok(TxStatus::Mined { block, confirmations, effect: AuthEffect::Paid, sender })
                    if confirmations >= self.confirmations =>
                {
                    return self.mark_settled(row, Landed { tx, block, sender }, lease).await;
                }
                // Reverted, or mined without spending this authorization: another transaction
                // may have spent it first (a front-runner submitting the public authorization).
                // The chain decides, not our transaction's fate.
                Ok(
                    TxStatus::Reverted { .. }
                    | TxStatus::Mined { effect: AuthEffect::Untouched | AuthEffect::SpentOtherwise, .. },
                ) => {
                    return self.resolve(&self.reload(row).await?).await;
                }
                Ok(_) | Err(_) if tokio::time::Instant::now() >= deadline => {
                    self.mark_pending(row.id, Some(tx)).await?;
                    return Err(PaymentError::Pending { transaction: Some(hex(tx)) });
                }
                Ok(_) | Err(_) => {
                    tokio::time::sleep(poll).await;
                    poll = (poll * 2).min(CONFIRM_POLL_MAX);
                }
            }
        }
    }

    pub(super) async fn mark_settled(
        &self,
        row: &PaymentRecord,
        landed: Landed,
        lease: Lease,
    ) -> Result<Settlement, PaymentError> {
        let Landed { tx, block, sender } = landed;
        let handler_lease = (lease == Lease::Take).then(|| self.now());
        let t = Transition {
            tx_hash: Some(tx),
            block_number: Some(block as i64),
            handler_lease,
            ..Default::default()
        };
        let from = [PaymentState::Settling, PaymentState::Pending, PaymentState::Claimed];
        let moved = self
            .store
            .transition(row.id, &from, PaymentState::Settled, t, self.now())
            .await
            .map_err(unrecorded(Some(tx)))?;
        if moved {
            metrics::counter!("tollgate_payments_total", "outcome" => "settled").increment(1);
            let amount = row.amount.atomic();
            metrics::counter!("tollgate_revenue_atomic_total", "tool" => row.tool.clone()).increment(amount);
        } else {
            // Someone else moved the row first: only their `settled` agrees with the chain.
            let now = self.store.payment(row.id).await.map_err(unrecorded(Some(tx)))?;
            let state = now.map(|r| r.state);
            if state != Some(PaymentState::Settled) {
                tracing::error!(payment.row = row.id, payment.tx = %tx, ?state, "a confirmed payment's row is not settled");
                return Err(PaymentError::OutcomeUnknown { transaction: Some(hex(tx)) });
            }
        }
        let settled_by = match self.settler.signers().contains(&sender) {
            true => self.settler.kind(),
            false => "an unlisted sender",
        };
        tracing::info!(payment.row = row.id, payment.tx = %tx, payment.block = block, payment.sender = %sender, payment.settled_by = settled_by, "payment settled");
        Ok(Settlement {
            row_id: row.id,
            transaction: tx,
            block,
            payer: row.payer,
            network: row.network.clone(),
            asset: row.asset,
            amount: row.amount,
            nonce: row.nonce,
            // Moved here, the lease went with it (a row on its way from `claimed` to `settled`
            // has none taken yet: only `on_success` leases a claim, and leaves it, `Lease::Leave`).
            leased: moved && handler_lease.is_some(),
        })
    }

    /// Records that a transaction may exist. A store failure here is reported as such, never
    /// as "nothing was charged".
    pub(super) async fn mark_pending(&self, id: i64, tx: Option<TxHash>) -> Result<(), PaymentError> {
        let t = Transition { tx_hash: tx, ..Default::default() };
        let from = [PaymentState::Claimed, PaymentState::Settling, PaymentState::Pending];
        self.store
            .transition(id, &from, PaymentState::Pending, t, self.now())
            .await
            .map_err(unrecorded(tx))?;
        metrics::counter!("tollgate_payments_total", "outcome" => "pending").increment(1);
        tracing::warn!(payment.row = id, payment.tx = ?tx, "settlement pending confirmation");
        Ok(())
    }

    /// Records that the chain proved this payment paid us nothing, and says so to the payer
    /// (or, if the store fails, that it should retry).
    pub(super) async fn fail_with(&self, id: i64, reason: &str) -> PaymentError {
        match self.fail(id, reason).await {
            Ok(()) => PaymentError::SettlementFailed { reason: reason.to_owned() },
            Err(e) => e,
        }
    }

    /// Records that the chain proved this payment paid us nothing.
    async fn fail(&self, id: i64, reason: &str) -> Result<(), PaymentError> {
        let t = Transition { error: Some(reason), ..Default::default() };
        let from = [PaymentState::Claimed, PaymentState::Settling, PaymentState::Pending];
        self.store.transition(id, &from, PaymentState::Failed, t, self.now()).await.map_err(store_down)?;
        metrics::counter!("tollgate_payments_total", "outcome" => "failed").increment(1);
        tracing::warn!(payment.row = id, payment.reason = reason, "payment failed; nothing was charged");
        Ok(())
    }
}

/// Records a settlement transaction hash and its relayer nonce on its row before broadcast,
/// moving it to `settling`: from `claimed`, from `settling` (a transaction signed again with
/// another nonce), or from `pending`, where the reconciler parks a `settling` row that waited
/// in the settlement queue past its stale time (nothing of ours was sent for it yet).
struct RowRecorder {
    store: Arc<dyn Store>,
    row: i64,
    /// The head before settlement: where a search for the payment's logs starts.
    from_block: i64,
    /// Read when recording, not when queued: the row is fresh as of its transaction.
    clock: SharedClock,
}

#[async_trait::async_trait]
impl TxRecorder for RowRecorder {
    async fn record(&self, tx: B256, nonce: u64) -> Result<(), StoreError> {
        let t = Transition {
            tx_hash: Some(tx),
            tx_nonce: Some(nonce as i64),
            from_block: Some(self.from_block),
            ..Default::default()
        };
        let from = [PaymentState::Claimed, PaymentState::Settling, PaymentState::Pending];
        let now = self.clock.now_unix() as i64;
        let recorded = self.store.transition(self.row, &from, PaymentState::Settling, t, now).await?;
        // The row is gone or resolved (the reconciler released a claim that waited too long, or
        // found the authorization spent or expired): broadcasting now would put a transaction
        // on chain that no row knows of.
        if !recorded {
            return Err(StoreError::Corrupt("the payment is no longer claimed for settlement".into()));
        }
        Ok(())
    }
}
