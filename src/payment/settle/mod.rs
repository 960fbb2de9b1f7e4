//! Settlers: who puts a verified authorization on chain.
//!
//! - [`SelfSettler`]: tollgate's relayer key submits `transferWithAuthorization` itself, one
//!   payment per transaction, or many per transaction while one is in flight ([`batch`]).
//! - [`FacilitatorSettler`]: an x402 facilitator's `/verify` then `/settle`.
//!
//! A settler only *submits*; the gate confirms the result on chain itself either way, so a
//! facilitator's word alone never releases a paid result. The error type separates the three
//! outcomes that matter for money: refused (nothing can move), not sent (nothing moved), and
//! ambiguous (something may have moved: the payment becomes `pending`, never re-challenged).

mod batch;
mod facilitator;
mod relayer;

use std::sync::Arc;
use std::time::Duration;

use alloy::primitives::{Address, B256};
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use serde_json::Value;

pub use batch::Batching;
pub use facilitator::{FacilitatorAuth, FacilitatorCheckError, FacilitatorSettler};
pub use relayer::SelfSettler;

use super::error::PaymentError;
use super::verify::VerifiedPayment;
use super::wire::PaymentRequirements;

/// Why a submission did not produce a transaction hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleError {
    /// The authorization can never settle as given (simulation or facilitator said so).
    Refused(PaymentError),
    /// Nothing was broadcast (RPC or facilitator unreachable before submission, node refused).
    NotSent(String),
    /// Something may have been broadcast; resolve from chain state.
    Ambiguous { tx: Option<B256> },
}

/// Receives the transaction hash (and the relayer nonce it uses) before it is broadcast, so a
/// crash right after the broadcast still leaves both on record for the reconciler.
#[async_trait::async_trait]
pub trait TxRecorder: Send + Sync {
    async fn record(&self, tx: B256, nonce: u64) -> Result<(), crate::store::StoreError>;
}

/// What a settler needs: the verified payment, the matched requirements, the raw payload.
pub struct SettleRequest<'a> {
    pub payment: &'a VerifiedPayment,
    pub requirements: &'a PaymentRequirements,
    pub payload: &'a Value,
    /// What [`Settler::presimulation`] found, when it was asked for this payment.
    pub prepared: Option<Prepared>,
}

/// What a settler learnt ahead of the submission ([`Settler::presimulation`]): the simulation
/// of the very transaction it would send passed, with the gas cap as its gas. It stands for the
/// settler's own simulation (its gas estimate) only while the chain cannot have moved under it
/// by the settler's own doing (the batcher decides: `batch::Flights`).
#[derive(Debug, Clone, Copy)]
pub struct Prepared {
    /// When the simulation was asked: the state it saw is no older than this.
    pub simulated_at: std::time::Instant,
}

/// A broadcast settlement: its hash, and its receipt when the node returned it with the answer
/// (EIP-7966 `eth_sendRawTransactionSync`), which spares the confirmation polling.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub tx: B256,
    pub receipt: Option<TransactionReceipt>,
}

impl From<B256> for Submitted {
    fn from(tx: B256) -> Self {
        Submitted { tx, receipt: None }
    }
}

#[async_trait::async_trait]
pub trait Settler: Send + Sync + 'static {
    /// Submits the settlement and returns its transaction once broadcast (self) or once the
    /// facilitator reports it settled.
    async fn submit(
        &self,
        req: &SettleRequest<'_>,
        recorder: Arc<dyn TxRecorder>,
    ) -> Result<Submitted, SettleError>;
    /// The transaction this settler would send for `payment`, to be simulated ahead of the
    /// submission: the gate asks it with the chain checks, beside the claim's write, so that a
    /// lone payment's submission needs no round trip before its broadcast. `None` when the
    /// settler has nothing to simulate ahead (a facilitator, a smart wallet).
    fn presimulation(&self, _payment: &VerifiedPayment) -> Option<TransactionRequest> {
        None
    }
    /// Whether every transaction this settler broadcasts goes to the `recorder` first. Then
    /// the gate may leave a payment `claimed` until its transaction is recorded, and the
    /// recorder marks it `settling` in the same write; otherwise (a facilitator, whose
    /// transaction we learn only after the fact) the gate marks it `settling` before the
    /// submission, so a crash mid-submission leaves a row the reconciler resolves from the
    /// chain, not a claim it would release.
    fn records_before_broadcast(&self) -> bool {
        false
    }
    /// Payments waiting for a settlement round behind a transaction in flight (batching).
    fn waiting(&self) -> usize {
        0
    }
    /// The relayer address, when tollgate pays gas itself.
    fn relayer(&self) -> Option<Address> {
        None
    }
    /// Checks, before the server takes calls, that this settler can settle on `network`
    /// (a CAIP-2 id); an error stops start-up.
    async fn preflight(&self, _network: &str) -> anyhow::Result<()> {
        Ok(())
    }
    /// Readiness of a remote dependency of the settler, when it has one.
    async fn ready(&self, _network: &str) -> Option<Result<(), String>> {
        None
    }
    /// What signs settlements, for logs.
    fn kind(&self) -> &'static str;
    /// Who signs settlement transactions: our relayer, or the facilitator's signers.
    fn signers(&self) -> Vec<Address> {
        self.relayer().into_iter().collect()
    }
}

/// A value fetched from the chain, reused while young.
struct Cached<T>(std::sync::Mutex<Option<(std::time::Instant, T)>>, Duration);

impl<T: Clone> Cached<T> {
    fn new(ttl: Duration) -> Self {
        Cached(std::sync::Mutex::new(None), ttl)
    }

    async fn get<F, E>(&self, fetch: F) -> Result<T, E>
    where
        F: std::future::Future<Output = Result<T, E>>,
    {
        if let Some((at, value)) = self.0.lock().expect("not poisoned").clone()
            && at.elapsed() < self.1
        {
            return Ok(value);
        }
        let value = fetch.await?;
        *self.0.lock().expect("not poisoned") = Some((std::time::Instant::now(), value.clone()));
        Ok(value)
    }
}
