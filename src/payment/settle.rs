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
use alloy::eips::eip1559::Eip1559Estimation;
use alloy::eips::eip2718::Encodable2718;
use alloy::network::{EthereumWallet, NetworkTransactionBuilder, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::{TransactionReceipt, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall as _;
use alloy::transports::{RpcError, TransportErrorKind};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::PaymentError;
use super::verify::{PayerSignature, VerifiedPayment};
use super::wallet;
use super::wire::PaymentRequirements;
use crate::cdp_auth::CdpAuth;
use crate::chain::client::rpc_client;
use crate::chain::usdc::Usdc;
use crate::chain::wallets::{MULTICALL3, Multicall3};

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
        recorder: &dyn TxRecorder,
    ) -> Result<Submitted, SettleError>;
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

/// Submits with tollgate's own relayer key.
pub struct SelfSettler {
    provider: DynProvider,
    wallet: EthereumWallet,
    relayer: Address,
    asset: Address,
    /// The relayer's next nonce, kept here so a settlement costs no nonce round trip. Taken
    /// under this lock with the signing and recording, so nonces go out in order; dropped on
    /// any broadcast error, and read again from the node (its pending count), so a transaction
    /// that never reached a mempool cannot leave a gap that stalls every later one.
    next_nonce: tokio::sync::Mutex<Option<u64>>,
    chain_id: tokio::sync::OnceCell<u64>,
    fees: Cached<Eip1559Estimation>,
    gas_money: Cached<U256>,
    /// Whether the node answers `eth_sendRawTransactionSync` (EIP-7966); learnt once.
    sync_send: std::sync::atomic::AtomicBool,
}

/// Most gas a settlement may take, and the refusal past it. A plain transfer needs ~90k; a
/// smart wallet's ERC-1271 check, and its deployment, run the payer's chosen code at our
/// expense, bounded here (passkey wallets need the most; deployments ~300k for common ones).
struct GasCap {
    limit: u64,
    refusal: fn() -> PaymentError,
}

impl GasCap {
    const TRANSFER: GasCap = GasCap { limit: 300_000, refusal: over_cap };
    const WALLET_TRANSFER: GasCap = GasCap { limit: 800_000, refusal: over_cap };
    const DEPLOY_AND_TRANSFER: GasCap =
        GasCap { limit: 1_500_000, refusal: || PaymentError::WalletDeploymentFailed };
}

fn over_cap() -> PaymentError {
    PaymentError::SettlementFailed { reason: "settlement_gas_exceeds_cap".into() }
}

/// Fee estimates move with the base fee, block by block: a second-old one is good enough for
/// a limit with 2x base-fee headroom (alloy's estimate), and saves a round trip per payment.
const FEES_TTL: Duration = Duration::from_secs(2);
/// The relayer's gas balance is a preflight only (the node has the last word), so it may be
/// a few seconds old.
const GAS_MONEY_TTL: Duration = Duration::from_secs(5);

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

impl SelfSettler {
    pub fn new(rpc_urls: &[&str], relayer: PrivateKeySigner, asset: Address) -> anyhow::Result<SelfSettler> {
        let address = relayer.address();
        let provider = ProviderBuilder::new()
            .disable_recommended_fillers()
            .connect_client(rpc_client(rpc_urls)?)
            .erased();
        Ok(SelfSettler {
            provider,
            wallet: EthereumWallet::from(relayer),
            relayer: address,
            asset,
            next_nonce: tokio::sync::Mutex::new(None),
            chain_id: tokio::sync::OnceCell::new(),
            fees: Cached::new(FEES_TTL),
            gas_money: Cached::new(GAS_MONEY_TTL),
            sync_send: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// The signed transaction, after a simulation (gas estimation) that must succeed. Everything
    /// that can refuse it is asked here, before broadcast, where a refusal still means "not
    /// sent": after the broadcast, every error is ambiguous. One round trip: the simulation,
    /// beside reads that are cached (chain id, fees, gas money) or kept (the nonce).
    async fn build(
        &self,
        tx: TransactionRequest,
        gas_cap: &GasCap,
        nonce: &mut Option<u64>,
    ) -> Result<TxEnvelope, SettleError> {
        let not_sent = |e: RpcError<TransportErrorKind>| {
            SettleError::NotSent(format!("RPC unavailable: {}", rpc_failure(&e)))
        };
        let p = &self.provider;
        let known_nonce = *nonce;
        let (gas, (chain_id, fees, balance, pending)) = tokio::try_join!(
            async { p.estimate_gas(tx.clone()).await.map_err(classify_rejection) },
            async {
                tokio::try_join!(
                    self.chain_id.get_or_try_init(|| async { p.get_chain_id().await }),
                    self.fees.get(p.estimate_eip1559_fees()),
                    self.gas_money.get(async { p.get_balance(self.relayer).await }),
                    async {
                        match known_nonce {
                            Some(n) => Ok(n),
                            None => p.get_transaction_count(self.relayer).pending().await,
                        }
                    },
                )
                .map_err(not_sent)
            },
        )?;
        // Headroom over the estimate: state can shift between simulation and inclusion.
        let gas_limit = gas.saturating_mul(12) / 10;
        if gas_limit > gas_cap.limit {
            tracing::warn!(
                settlement.gas = gas_limit,
                settlement.gas_cap = gas_cap.limit,
                "settlement refused: it would cost more gas than allowed"
            );
            return Err(SettleError::Refused((gas_cap.refusal)()));
        }
        if balance < U256::from(gas_limit) * U256::from(fees.max_fee_per_gas) {
            return Err(SettleError::NotSent("the relayer cannot pay for gas".into()));
        }
        let tx = tx
            .with_chain_id(*chain_id)
            .with_nonce(pending)
            .with_gas_limit(gas_limit)
            .with_max_fee_per_gas(fees.max_fee_per_gas)
            .with_max_priority_fee_per_gas(fees.max_priority_fee_per_gas);
        let envelope = tx
            .build(&self.wallet)
            .await
            .map_err(|_| SettleError::NotSent("relayer could not sign".into()))?;
        *nonce = Some(pending + 1);
        Ok(envelope)
    }

    /// Broadcasts, returning the receipt with the answer when the node can (EIP-7966).
    async fn broadcast(&self, hash: B256, raw: &[u8]) -> Result<Submitted, RpcError<TransportErrorKind>> {
        use std::sync::atomic::Ordering;
        if self.sync_send.load(Ordering::Relaxed) {
            match self.provider.send_raw_transaction_sync(raw).await {
                Ok(receipt) => return Ok(Submitted { tx: hash, receipt: Some(receipt) }),
                // The node does not know the method: nothing was processed, send it plainly.
                Err(RpcError::ErrorResp(e)) if e.code == -32601 => {
                    tracing::info!("the node has no eth_sendRawTransactionSync; confirming by polling");
                    self.sync_send.store(false, Ordering::Relaxed);
                }
                // EIP-7966 code 4: in the mempool, not mined within the node's wait: poll for it.
                Err(RpcError::ErrorResp(e)) if e.code == 4 => return Ok(hash.into()),
                Err(e) => return Err(e),
            }
        }
        self.provider.send_raw_transaction(raw).await.map(|_| hash.into())
    }
}

#[async_trait::async_trait]
impl Settler for SelfSettler {
    async fn submit(
        &self,
        req: &SettleRequest<'_>,
        recorder: &dyn TxRecorder,
    ) -> Result<Submitted, SettleError> {
        let a = &req.payment.authorization;
        let (to, input, gas_cap) = match &req.payment.signature {
            PayerSignature::Eoa(sig) => {
                (self.asset, wallet::eoa_transfer_call(req.payment, sig), GasCap::TRANSFER)
            }
            // The `bytes` overload: FiatToken v2.2 asks the wallet (ERC-1271) there.
            PayerSignature::Contract(signature) => {
                (self.asset, wallet::transfer_call(req.payment, signature.clone()), GasCap::WALLET_TRANSFER)
            }
            // One transaction through Multicall3: deploy (allowed to fail, should the wallet
            // exist by now), then the transfer (must succeed). Estimated from our relayer, so
            // the deployment costs gas only when the payment goes through with it.
            PayerSignature::Counterfactual { factory, calldata, inner } => {
                let calls = vec![
                    Multicall3::Call3 { target: *factory, allowFailure: true, callData: calldata.clone() },
                    Multicall3::Call3 {
                        target: self.asset,
                        allowFailure: false,
                        callData: wallet::transfer_call(req.payment, inner.clone()),
                    },
                ];
                let input = Multicall3::aggregate3Call { calls }.abi_encode().into();
                (MULTICALL3, input, GasCap::DEPLOY_AND_TRANSFER)
            }
            // Never reached: the gate proves a wallet's signature before anything is claimed.
            PayerSignature::Unproven(_) => return Err(SettleError::Refused(PaymentError::BadSignature)),
        };
        let tx = TransactionRequest::default().with_to(to).with_input::<Bytes>(input).with_from(self.relayer);
        let counterfactual = matches!(req.payment.signature, PayerSignature::Counterfactual { .. });
        let mut attempts = 0;
        // The first transaction broadcast, if any: from then on nothing can be "not sent" (a
        // "nonce too low" may mean it was mined through another node), so every later failure
        // is ambiguous and names it.
        let mut sent: Option<B256> = None;
        loop {
            attempts += 1;
            let built = {
                // Nonce, signing and recording in order; the broadcast itself runs unlocked, so
                // a settlement waiting for its block (sync send) does not hold up the next one.
                let mut next = self.next_nonce.lock().await;
                match self.build(tx.clone(), &gas_cap, &mut next).await {
                    Ok(envelope) => {
                        let nonce = envelope.nonce();
                        match recorder.record(*envelope.tx_hash(), nonce).await {
                            Ok(()) => Ok((envelope, nonce)),
                            Err(e) => {
                                *next = None;
                                Err(SettleError::NotSent(format!("cannot record tx: {e}")))
                            }
                        }
                    }
                    Err(e) => Err(e),
                }
            };
            let (envelope, nonce) = match (built, sent) {
                (Ok(built), _) => built,
                (Err(_), Some(first)) => return Err(SettleError::Ambiguous { tx: Some(first) }),
                // Multicall3 reverts with its own message, hiding USDC's: an authorization spent
                // meanwhile (by a front-runner) must reach the gate as spent, which asks the
                // chain who spent it, never as a plain failure.
                (Err(SettleError::Refused(e)), None) if counterfactual && e != PaymentError::NonceReused => {
                    let used = Usdc::new(self.asset, &self.provider)
                        .authorizationState(a.from, a.nonce)
                        .call()
                        .await;
                    return Err(match used {
                        Ok(true) => SettleError::Refused(PaymentError::NonceReused),
                        Ok(false) => SettleError::Refused(e),
                        // Unknown either way, and nothing was sent.
                        Err(_) => SettleError::NotSent("RPC unavailable".into()),
                    });
                }
                (Err(e), None) => return Err(e),
            };
            let hash = *envelope.tx_hash();
            let error = match self.broadcast(hash, &envelope.encoded_2718()).await {
                Ok(submitted) => return Ok(submitted),
                Err(e) => e,
            };
            *self.next_nonce.lock().await = None;
            match Refusal::of(&error) {
                // This very transaction is in the node's mempool already.
                Some(Refusal::AlreadyKnown) => return Ok(hash.into()),
                // Its nonce belongs to another transaction (another replica on the same key, a
                // stale local nonce): this one can never be mined. Sign again with a fresh nonce;
                // should the first have landed after all, the second reverts, and the logs
                // still show who spent the authorization.
                Some(Refusal::NonceTaken) if attempts < 3 => {
                    tracing::info!(payment.tx = %hash, relayer.nonce = nonce, "relayer nonce taken; signing again");
                    sent.get_or_insert(hash);
                }
                // Anything else after a broadcast is ambiguous, even a node's explicit refusal
                // (in a load-balanced pool another node may hold it): the gate resolves it from
                // chain state, never by assumption.
                _ => {
                    tracing::warn!(reason = %rpc_failure(&error), payment.tx = %hash, relayer.nonce = nonce, "broadcast refused or unanswered");
                    return Err(SettleError::Ambiguous { tx: Some(hash) });
                }
            }
        }
    }

    fn relayer(&self) -> Option<Address> {
        Some(self.relayer)
    }

    fn kind(&self) -> &'static str {
        "relayer"
    }
}

/// Node answers to a broadcast that prove what became of the transaction.
enum Refusal {
    AlreadyKnown,
    NonceTaken,
}

impl Refusal {
    fn of(e: &RpcError<TransportErrorKind>) -> Option<Refusal> {
        let RpcError::ErrorResp(resp) = e else { return None };
        let message = resp.message.to_ascii_lowercase();
        if message.contains("already known") {
            Some(Refusal::AlreadyKnown)
        } else if message.contains("nonce too low") || message.contains("replacement transaction underpriced")
        {
            Some(Refusal::NonceTaken)
        } else {
            None
        }
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

/// How tollgate proves itself to a facilitator.
pub enum FacilitatorAuth {
    /// None: the public testnet facilitator.
    None,
    /// A fixed `Authorization` header value.
    Header(SecretString),
    /// A fresh JWT per request, signed with a CDP API key (Coinbase's facilitator).
    Cdp(CdpAuth),
}

/// Why a facilitator cannot settle our payments, found by asking its `/supported`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FacilitatorCheckError {
    #[error("facilitator unreachable: {0}")]
    Unreachable(String),
    #[error(
        "the facilitator refused our credentials (HTTP {status}: {said}): check \
         payment.facilitator.cdp_key_id and cdp_key_secret, or auth_header"
    )]
    Unauthorized { status: u16, said: String },
    #[error("facilitator /supported answered HTTP {0}")]
    Status(u16),
    #[error("facilitator /supported did not answer with a list of supported kinds")]
    Malformed,
    #[error("the facilitator does not settle x402 v2 `exact` payments on {network}; it offers: {offers}")]
    Unsupported { network: String, offers: String },
}

/// `GET /supported`: what a facilitator settles, and with which signer addresses.
#[derive(Debug, Deserialize)]
struct Supported {
    kinds: Vec<SupportedKind>,
    #[serde(default)]
    signers: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SupportedKind {
    x402_version: u64,
    scheme: String,
    network: String,
}

impl Supported {
    /// The signers that settle on `network`: those listed for it, or for its whole CAIP-2
    /// namespace (`eip155:*`).
    fn signers_for(&self, network: &str) -> Vec<Address> {
        let namespace = network.split(':').next().map(|n| format!("{n}:*"));
        let mut signers: Vec<Address> = self
            .signers
            .iter()
            .filter(|(k, _)| k.as_str() == network || Some(k.as_str()) == namespace.as_deref())
            .flat_map(|(_, list)| list.iter().filter_map(|a| a.parse().ok()))
            .collect();
        signers.sort();
        signers.dedup();
        signers
    }
}

/// Success of `/supported` is reused this long by readiness probes: it rarely changes, and
/// each probe would otherwise spend the facilitator's rate limit.
const SUPPORTED_TTL: Duration = Duration::from_secs(60);
/// `/supported` answering 429 is retried this many times, with doubling backoff (as the
/// official x402 HTTP facilitator client does).
const SUPPORTED_RETRIES: u32 = 3;

/// Submits through an x402 facilitator (x402 v2 specification §7, the facilitator API).
pub struct FacilitatorSettler {
    http: reqwest::Client,
    base_url: String,
    auth: FacilitatorAuth,
    /// The facilitator's signers on our network, from its last `/supported` answer.
    signers: std::sync::RwLock<Vec<Address>>,
    checked: Cached<()>,
}

impl FacilitatorSettler {
    pub fn new(base_url: &str, auth: FacilitatorAuth, timeout: Duration) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(FacilitatorSettler {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            auth,
            signers: Default::default(),
            checked: Cached::new(SUPPORTED_TTL),
        })
    }

    /// One authenticated request. Errors are for logs: URLs redacted, never the token.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Option<Value>), String> {
        let url: reqwest::Url =
            format!("{}/{path}", self.base_url).parse().map_err(|_| "bad facilitator URL".to_owned())?;
        let mut request = self.http.request(method.clone(), url.clone());
        if let Some(body) = body {
            request = request.json(body);
        }
        request = match &self.auth {
            FacilitatorAuth::None => request,
            FacilitatorAuth::Header(value) => request.header("authorization", value.expose_secret()),
            FacilitatorAuth::Cdp(cdp) => {
                let token = cdp.header_for(method.as_str(), &url).map_err(|_| "cannot sign the CDP token")?;
                request.header("authorization", token)
            }
        };
        let response =
            request.send().await.map_err(|e| crate::redact::urls(&format!("facilitator /{path}: {e}")))?;
        let status = response.status().as_u16();
        // A body that is not JSON is treated like no body: the status alone decides.
        Ok((status, response.json::<Value>().await.ok()))
    }

    async fn post(&self, path: &str, body: &Value) -> Result<(u16, Option<Value>), String> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// The HTTP status the facilitator answers `body` at `path` with (`tollgate doctor`).
    pub async fn probe(&self, path: &str, body: &Value) -> Result<u16, String> {
        self.post(path, body).await.map(|(status, _)| status)
    }

    /// [`Self::check_supported`], its success reused for `SUPPORTED_TTL` (start-up and readiness
    /// probes share it).
    async fn supported_cached(&self, network: &str) -> Result<(), FacilitatorCheckError> {
        self.checked.get(async { self.check_supported(network).await.map(drop) }).await
    }

    /// Asks `/supported` whether the facilitator settles x402 v2 `exact` on `network`, and
    /// records its signers there.
    pub async fn check_supported(&self, network: &str) -> Result<Vec<Address>, FacilitatorCheckError> {
        let mut backoff = Duration::from_millis(250);
        let mut attempt = 0;
        let (status, body) = loop {
            let answer = self.call(reqwest::Method::GET, "supported", None).await;
            let (status, body) = answer.map_err(FacilitatorCheckError::Unreachable)?;
            attempt += 1;
            if status != 429 || attempt > SUPPORTED_RETRIES {
                break (status, body);
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        };
        match status {
            200..=299 => {}
            401 | 403 => {
                // What the facilitator says about it (CDP: `errorMessage`), cut short.
                let said = body
                    .as_ref()
                    .and_then(|b| b.get("errorMessage").or_else(|| b.get("message")))
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                let said = said.chars().filter(|c| !c.is_control()).take(200).collect();
                return Err(FacilitatorCheckError::Unauthorized { status, said });
            }
            _ => return Err(FacilitatorCheckError::Status(status)),
        }
        let supported: Supported =
            body.and_then(|b| serde_json::from_value(b).ok()).ok_or(FacilitatorCheckError::Malformed)?;
        let ours = |k: &SupportedKind| k.x402_version == 2 && k.scheme == "exact" && k.network == network;
        if !supported.kinds.iter().any(ours) {
            let offers: Vec<String> = supported
                .kinds
                .iter()
                .take(20)
                .map(|k| format!("v{} {} on {}", k.x402_version, k.scheme, k.network))
                .collect();
            let offers = if offers.is_empty() { "nothing".to_owned() } else { offers.join(", ") };
            return Err(FacilitatorCheckError::Unsupported { network: network.to_owned(), offers });
        }
        let signers = supported.signers_for(network);
        *self.signers.write().expect("not poisoned") = signers.clone();
        Ok(signers)
    }
}

#[async_trait::async_trait]
impl Settler for FacilitatorSettler {
    async fn submit(
        &self,
        req: &SettleRequest<'_>,
        _recorder: &dyn TxRecorder,
    ) -> Result<Submitted, SettleError> {
        let body = json!({
            "x402Version": 2,
            "paymentPayload": req.payload,
            "paymentRequirements": req.requirements,
        });
        // /verify moves no money: any failure to get an answer means "not sent".
        let (status, verdict) = self.post("verify", &body).await.map_err(SettleError::NotSent)?;
        match verdict.as_ref().and_then(|v| v.get("isValid")).and_then(Value::as_bool) {
            Some(true) => {}
            // Spent already (by a front-runner, or through another route): the gate asks the
            // chain who spent it, as it does when our own simulation says so.
            Some(false) if invalid_reason(verdict.as_ref()).contains("nonce_already_used") => {
                return Err(SettleError::Refused(PaymentError::NonceReused));
            }
            Some(false) => return Err(refused(verdict.as_ref(), "invalidReason")),
            None if status == 401 || status == 403 => {
                tracing::error!(facilitator.status = status, "the facilitator refused our credentials");
                return Err(SettleError::NotSent(format!(
                    "facilitator refused our credentials (HTTP {status})"
                )));
            }
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
            Some(true) => tx.map(Submitted::from).ok_or(SettleError::Ambiguous { tx: None }),
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

    async fn preflight(&self, network: &str) -> anyhow::Result<()> {
        // Through the readiness cache, so the first probe right after start asks no second time.
        match self.supported_cached(network).await {
            Ok(()) => {}
            // Down for now is no verdict: serve unready (readiness keeps asking), rather than
            // crash-loop a fleet while the facilitator has an outage.
            Err(e @ FacilitatorCheckError::Unreachable(_)) => {
                tracing::warn!(error = %e, "the facilitator did not answer at start; unready until it does");
                return Ok(());
            }
            Err(FacilitatorCheckError::Status(status)) if status == 429 || status >= 500 => {
                tracing::warn!(
                    facilitator.status = status,
                    "the facilitator is failing at start; unready until it answers"
                );
                return Ok(());
            }
            // A definitive answer: wrong credentials, network or URL.
            Err(e) => return Err(e.into()),
        }
        let signers = self.signers();
        tracing::info!(facilitator.signers = ?signers, network, "the facilitator settles our payments");
        Ok(())
    }

    async fn ready(&self, network: &str) -> Option<Result<(), String>> {
        let checked = self.supported_cached(network).await;
        Some(checked.map_err(|e| e.to_string()))
    }

    fn kind(&self) -> &'static str {
        "facilitator signer"
    }

    fn signers(&self) -> Vec<Address> {
        self.signers.read().expect("not poisoned").clone()
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
