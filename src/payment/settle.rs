//! Settlers: who puts a verified authorization on chain.
//!
//! - [`SelfSettler`]: tollgate's relayer key submits `transferWithAuthorization` itself.
//! - [`FacilitatorSettler`]: an x402 facilitator's `/verify` then `/settle`.
//!
//! A settler only *submits*; the gate confirms the result on chain itself either way, so a
//! facilitator's word alone never releases a paid result. The error type separates the three
//! outcomes that matter for money: refused (nothing can move), not sent (nothing moved), and
//! ambiguous (something may have moved: the payment becomes `pending`, never re-challenged).

use std::time::Duration;

use alloy::consensus::{Transaction as _, TxEnvelope};
use alloy::network::{EthereumWallet, NetworkTransactionBuilder, TransactionBuilder};
use alloy::primitives::{Address, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use alloy::transports::{RpcError, TransportErrorKind};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::error::PaymentError;
use super::verify::VerifiedPayment;
use super::wire::PaymentRequirements;
use crate::chain::client::rpc_client;
use crate::chain::usdc::Usdc;

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
}

#[async_trait::async_trait]
pub trait Settler: Send + Sync + 'static {
    /// Submits the settlement and returns its transaction hash once broadcast (self) or once
    /// the facilitator reports it settled.
    async fn submit(&self, req: &SettleRequest<'_>, recorder: &dyn TxRecorder) -> Result<B256, SettleError>;
    /// The relayer address, when tollgate pays gas itself.
    fn relayer(&self) -> Option<Address> {
        None
    }
}

/// Submits with tollgate's own relayer key.
pub struct SelfSettler {
    provider: DynProvider,
    wallet: EthereumWallet,
    relayer: Address,
    asset: Address,
    /// Serialises nonce → sign → record → broadcast, so each transaction takes the relayer's
    /// pending nonce fresh from the node: a transaction that is never broadcast cannot leave a
    /// nonce gap that would stall every later settlement (a risk with a locally cached nonce).
    submit_lock: tokio::sync::Mutex<()>,
}

impl SelfSettler {
    pub fn new(rpc_url: &str, relayer: PrivateKeySigner, asset: Address) -> anyhow::Result<SelfSettler> {
        let address = relayer.address();
        let provider = ProviderBuilder::new()
            .disable_recommended_fillers()
            .connect_client(rpc_client(rpc_url)?)
            .erased();
        Ok(SelfSettler {
            provider,
            wallet: EthereumWallet::from(relayer),
            relayer: address,
            asset,
            submit_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The signed transaction, after a simulation (gas estimation) that must succeed. Everything
    /// that can refuse it is asked here, before broadcast, where a refusal still means "not
    /// sent": after `eth_sendRawTransaction`, every error is ambiguous.
    async fn build(&self, tx: TransactionRequest) -> Result<TxEnvelope, SettleError> {
        let not_sent = |e: RpcError<TransportErrorKind>| {
            SettleError::NotSent(format!("RPC unavailable: {}", rpc_failure(&e)))
        };
        let gas = self.provider.estimate_gas(tx.clone()).await.map_err(classify_rejection)?;
        let p = &self.provider;
        let (chain_id, nonce, fees, balance) = tokio::try_join!(
            async { p.get_chain_id().await },
            async { p.get_transaction_count(self.relayer).pending().await },
            async { p.estimate_eip1559_fees().await },
            async { p.get_balance(self.relayer).await },
        )
        .map_err(not_sent)?;
        // Headroom over the estimate: state can shift between simulation and inclusion.
        let gas_limit = gas.saturating_mul(12) / 10;
        if balance < U256::from(gas_limit) * U256::from(fees.max_fee_per_gas) {
            return Err(SettleError::NotSent("the relayer cannot pay for gas".into()));
        }
        let tx = tx
            .with_chain_id(chain_id)
            .with_nonce(nonce)
            .with_gas_limit(gas_limit)
            .with_max_fee_per_gas(fees.max_fee_per_gas)
            .with_max_priority_fee_per_gas(fees.max_priority_fee_per_gas);
        tx.build(&self.wallet).await.map_err(|_| SettleError::NotSent("relayer could not sign".into()))
    }
}

#[async_trait::async_trait]
impl Settler for SelfSettler {
    async fn submit(&self, req: &SettleRequest<'_>, recorder: &dyn TxRecorder) -> Result<B256, SettleError> {
        let a = &req.payment.authorization;
        let sig = &req.payment.signature;
        let usdc = Usdc::new(self.asset, &self.provider);
        let call = usdc.transferWithAuthorization_1(
            a.from,
            a.to,
            a.value,
            a.validAfter,
            a.validBefore,
            a.nonce,
            27 + u8::from(sig.v()),
            sig.r().into(),
            sig.s().into(),
        );
        let tx = call.into_transaction_request().with_from(self.relayer);
        let _serial = self.submit_lock.lock().await;
        let envelope = self.build(tx).await?;
        let hash = *envelope.tx_hash();
        let nonce = envelope.nonce();
        recorder
            .record(hash, nonce)
            .await
            .map_err(|e| SettleError::NotSent(format!("cannot record tx: {e}")))?;
        match self.provider.send_tx_envelope(envelope).await {
            Ok(_) => Ok(hash),
            // Any error from here on is ambiguous, even a node's explicit refusal: "already
            // known", a timeout, or one node of a load-balanced pool refusing what another
            // already took. The gate resolves it from chain state (the authorization, and
            // whether this nonce was taken by another transaction), never by assumption.
            Err(e) => {
                tracing::warn!(reason = %rpc_failure(&e), payment.tx = %hash, "broadcast refused or unanswered");
                Err(SettleError::Ambiguous { tx: Some(hash) })
            }
        }
    }

    fn relayer(&self) -> Option<Address> {
        Some(self.relayer)
    }
}

/// What an RPC failure may say in logs and answers: the node's own message, never the
/// transport's, whose errors can carry the RPC URL (and a hosted RPC URL carries its API key).
fn rpc_failure(e: &RpcError<TransportErrorKind>) -> String {
    match e {
        RpcError::ErrorResp(resp) => resp.message.to_string(),
        RpcError::Transport(TransportErrorKind::HttpError(http)) => format!("HTTP {}", http.status),
        _ => "no answer".to_owned(),
    }
}

/// Maps a simulation (gas estimation) failure to a reason, from FiatToken's revert strings.
fn classify_rejection(e: RpcError<TransportErrorKind>) -> SettleError {
    let RpcError::ErrorResp(resp) = &e else {
        return SettleError::NotSent(format!("RPC unavailable: {}", rpc_failure(&e)));
    };
    let message = resp.message.to_ascii_lowercase();
    let reason = if message.contains("authorization is used") {
        PaymentError::NonceReused
    } else if message.contains("exceeds balance") {
        PaymentError::InsufficientBalance
    } else if message.contains("authorization is expired") {
        PaymentError::Expired { margin_secs: 0 }
    } else if message.contains("not yet valid") {
        PaymentError::NotYetValid
    } else if message.contains("invalid signature") {
        PaymentError::BadSignature
    } else if message.contains("revert") {
        PaymentError::SettlementFailed { reason: "invalid_exact_evm_transaction_simulation_failed".into() }
    } else {
        // e.g. the relayer cannot pay for gas: our problem, and nothing was sent.
        return SettleError::NotSent(format!("node refused: {}", resp.message));
    };
    SettleError::Refused(reason)
}

/// Submits through an x402 facilitator (x402 v2 specification §7, the facilitator API).
pub struct FacilitatorSettler {
    http: reqwest::Client,
    base_url: String,
    auth_header: Option<SecretString>,
}

impl FacilitatorSettler {
    pub fn new(base_url: &str, auth_header: Option<SecretString>, timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(FacilitatorSettler { http, base_url: base_url.trim_end_matches('/').to_owned(), auth_header })
    }

    async fn post(&self, path: &str, body: &Value) -> Result<(u16, Option<Value>), reqwest::Error> {
        let mut request = self.http.post(format!("{}/{path}", self.base_url)).json(body);
        if let Some(auth) = &self.auth_header {
            request = request.header("authorization", auth.expose_secret());
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        // A body that is not JSON is treated like no body: the status alone decides.
        Ok((status, response.json::<Value>().await.ok()))
    }
}

#[async_trait::async_trait]
impl Settler for FacilitatorSettler {
    async fn submit(&self, req: &SettleRequest<'_>, _recorder: &dyn TxRecorder) -> Result<B256, SettleError> {
        let body = json!({
            "x402Version": 2,
            "paymentPayload": req.payload,
            "paymentRequirements": req.requirements,
        });
        // /verify moves no money: any failure to get an answer means "not sent".
        let (status, verdict) = self
            .post("verify", &body)
            .await
            .map_err(|e| SettleError::NotSent(format!("facilitator /verify: {e}")))?;
        match verdict.as_ref().and_then(|v| v.get("isValid")).and_then(Value::as_bool) {
            Some(true) => {}
            // Spent already (by a front-runner, or through another route): the gate asks the
            // chain who spent it, as it does when our own simulation says so.
            Some(false) if invalid_reason(verdict.as_ref()).contains("nonce_already_used") => {
                return Err(SettleError::Refused(PaymentError::NonceReused));
            }
            Some(false) => return Err(refused(verdict.as_ref(), "invalidReason")),
            None => return Err(SettleError::NotSent(format!("facilitator /verify answered HTTP {status}"))),
        }
        // /settle may move money: from here on, no answer means "ambiguous".
        let (_, settled) =
            self.post("settle", &body).await.map_err(|_| SettleError::Ambiguous { tx: None })?;
        let Some(settled) = settled else {
            return Err(SettleError::Ambiguous { tx: None });
        };
        let tx = settled.get("transaction").and_then(Value::as_str).and_then(|t| t.parse::<B256>().ok());
        match settled.get("success").and_then(Value::as_bool) {
            Some(true) => tx.ok_or(SettleError::Ambiguous { tx: None }),
            // Upstream's non-terminal outcome: submitted, not confirmed.
            // `success:false` from /settle is not proof that nothing moved: a facilitator may
            // broadcast, then fail waiting for the receipt (or report `settlement_pending`).
            // The gate asks the chain before it concludes anything.
            Some(false) | None => {
                let reason = settled.get("errorReason").and_then(Value::as_str).unwrap_or("none");
                tracing::warn!(facilitator.reason = %reason.chars().take(100).collect::<String>(), "facilitator /settle did not confirm");
                Err(SettleError::Ambiguous { tx })
            }
        }
    }
}

fn invalid_reason(body: Option<&Value>) -> &str {
    body.and_then(|b| b.get("invalidReason")).and_then(Value::as_str).unwrap_or_default()
}

fn refused(body: Option<&Value>, field: &str) -> SettleError {
    let reason = body
        .and_then(|b| b.get(field))
        .and_then(Value::as_str)
        .filter(|r| !r.is_empty() && r.len() <= 100)
        .unwrap_or("unexpected_settle_error");
    SettleError::Refused(PaymentError::SettlementFailed { reason: reason.to_owned() })
}
