//! [`SelfSettler`]: tollgate's own relayer key submits `transferWithAuthorization`.
//!
//! A plain (EOA-signed) payment goes through the [`Batcher`]: alone when nothing is in flight,
//! else together with every payment that arrived meanwhile, in one Multicall3 transaction.
//! Smart-wallet payments run the payer's own code at our expense and always go alone, so a
//! wallet whose code burns gas can never sink someone else's payment.

use std::sync::Arc;
use std::time::Duration;

use alloy::consensus::{Transaction as _, TxEnvelope};
use alloy::eips::eip1559::Eip1559Estimation;
use alloy::eips::eip2718::Encodable2718;
use alloy::network::{EthereumWallet, NetworkTransactionBuilder, TransactionBuilder};
use alloy::primitives::{Address, B256, Bytes, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall as _;
use alloy::transports::{RpcError, TransportErrorKind};

use super::batch::{Batcher, Batching};
use super::{Cached, Prepared, SettleError, SettleRequest, Settler, Submitted, TxRecorder};
use crate::chain::client::rpc_client;
use crate::chain::usdc::Usdc;
use crate::chain::wallets::{MULTICALL3, Multicall3};
use crate::payment::error::PaymentError;
use crate::payment::verify::PayerSignature;
use crate::payment::wallet;

/// Submits with tollgate's own relayer key.
pub struct SelfSettler {
    relayer: Arc<Relayer>,
    /// Most payments per transaction (1 sends every payment in its own), and the hold.
    batching: Batching,
    /// Started on first use: it is a task, and needs the runtime.
    batcher: std::sync::OnceLock<Batcher>,
    /// Whether Multicall3 answers at its canonical address, as batches need; asked once, on the
    /// first payment (a node that cannot answer then is asked again on the next).
    multicall: tokio::sync::OnceCell<bool>,
}

/// The relayer account: signs, records and broadcasts settlement transactions in nonce order.
pub(super) struct Relayer {
    provider: DynProvider,
    wallet: EthereumWallet,
    address: Address,
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
pub(super) struct GasCap {
    limit: u64,
    refusal: fn() -> PaymentError,
}

impl GasCap {
    pub(super) const TRANSFER: GasCap = GasCap { limit: 300_000, refusal: over_cap };
    const WALLET_TRANSFER: GasCap = GasCap { limit: 800_000, refusal: over_cap };
    const DEPLOY_AND_TRANSFER: GasCap =
        GasCap { limit: 1_500_000, refusal: || PaymentError::WalletDeploymentFailed };

    /// The cap of `n` such settlements in one transaction.
    pub(super) fn times(&self, n: usize) -> GasCap {
        GasCap { limit: self.limit.saturating_mul(n as u64), refusal: self.refusal }
    }
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
/// Longest the batcher waits, from the broadcast, for a transaction to be mined before the next
/// round goes anyway (the gate keeps watching for it): three Base blocks. A stuck transaction
/// must not hold every later payment for the whole settle timeout.
pub(super) const IN_FLIGHT_MAX: Duration = Duration::from_secs(6);
/// Longest a broadcast waits for the node's `eth_sendRawTransactionSync` answer. Nodes wait
/// for inclusion up to their own timeout (anvil: 30 s, longer than our RPC timeout, and
/// EIP-7966's timeout parameter is not accepted everywhere); past this the transaction is
/// treated as sent and confirmed by polling.
const SYNC_SEND_WAIT: Duration = Duration::from_secs(4);

/// What a batch's simulation says of one payment in it.
pub(super) enum Verdict {
    Settles,
    /// The token refuses it, and says why.
    Refused(PaymentError),
    /// It failed without a reason of the token's: out of gas (a payer whose code burns it, an
    /// EIP-7702 delegation), or anything else that may be the batch's doing, not the payment's.
    /// It is tried alone, where its own simulation decides.
    Unclear,
}

/// Why [`Relayer::send`] did not broadcast.
pub(super) enum SendFailure {
    Settle(SettleError),
    /// These payments' rows (indexes into the recorders) could not record the transaction,
    /// so nothing was sent: the others may go without them.
    Unrecorded(Vec<usize>),
}

impl SendFailure {
    fn into_settle(self) -> SettleError {
        match self {
            SendFailure::Settle(e) => e,
            SendFailure::Unrecorded(_) => SettleError::NotSent("cannot record the transaction".into()),
        }
    }
}

impl SelfSettler {
    /// A settler paying gas from `relayer`, batching plain payments as `batching` says.
    pub fn new(
        rpc_urls: &[&str],
        relayer: PrivateKeySigner,
        asset: Address,
        batching: Batching,
    ) -> anyhow::Result<SelfSettler> {
        let address = relayer.address();
        let provider = ProviderBuilder::new()
            .disable_recommended_fillers()
            .connect_client(rpc_client(rpc_urls)?)
            .erased();
        let relayer = Relayer {
            provider,
            wallet: EthereumWallet::from(relayer),
            address,
            asset,
            next_nonce: tokio::sync::Mutex::new(None),
            chain_id: tokio::sync::OnceCell::new(),
            fees: Cached::new(FEES_TTL),
            gas_money: Cached::new(GAS_MONEY_TTL),
            sync_send: std::sync::atomic::AtomicBool::new(true),
        };
        Ok(SelfSettler {
            relayer: Arc::new(relayer),
            batching: Batching { max: batching.max.max(1), ..batching },
            batcher: std::sync::OnceLock::new(),
            multicall: tokio::sync::OnceCell::new(),
        })
    }

    /// Whether plain payments are batched: allowed by config, and Multicall3 is there.
    async fn batching(&self) -> bool {
        if self.batching.max < 2 {
            return false;
        }
        let present = self.multicall.get_or_try_init(|| async {
            let code = self.relayer.provider.get_code_at(MULTICALL3).await?;
            if code.is_empty() {
                tracing::warn!(%MULTICALL3, "no Multicall3 on this chain: one transaction per payment");
            }
            Ok::<_, RpcError<TransportErrorKind>>(!code.is_empty())
        });
        present.await.is_ok_and(|present| *present)
    }

    fn batcher(&self) -> &Batcher {
        self.batcher.get_or_init(|| Batcher::start(self.relayer.clone(), self.batching))
    }
}

impl Relayer {
    /// The signed transaction, after a simulation (gas estimation) that must succeed. Everything
    /// that can refuse it is asked here, before broadcast, where a refusal still means "not
    /// sent": after the broadcast, every error is ambiguous. One round trip: the simulation,
    /// beside reads that are cached (chain id, fees, gas money) or kept (the nonce). When the
    /// very transaction was `simulated` a moment ago with the cap as its gas
    /// (`Settler::presimulation`), the cap is its limit and no round trip is left at all.
    async fn build(
        &self,
        tx: TransactionRequest,
        gas_cap: &GasCap,
        simulated: bool,
        nonce: &mut Option<u64>,
    ) -> Result<TxEnvelope, SettleError> {
        let not_sent = |e: RpcError<TransportErrorKind>| {
            SettleError::NotSent(format!("RPC unavailable: {}", rpc_failure(&e)))
        };
        let p = &self.provider;
        let known_nonce = *nonce;
        let (gas_limit, (chain_id, fees, balance, pending)) = tokio::try_join!(
            async {
                match simulated {
                    true => Ok(gas_cap.limit),
                    // Headroom over the estimate: state can shift between simulation and inclusion.
                    false => p.estimate_gas(tx.clone()).await.map(|gas| gas.saturating_mul(12) / 10),
                }
                .map_err(classify_rejection)
            },
            async {
                tokio::try_join!(
                    self.chain_id.get_or_try_init(|| async { p.get_chain_id().await }),
                    self.fees.get(p.estimate_eip1559_fees()),
                    self.gas_money.get(async { p.get_balance(self.address).await }),
                    async {
                        match known_nonce {
                            Some(n) => Ok(n),
                            None => p.get_transaction_count(self.address).pending().await,
                        }
                    },
                )
                .map_err(not_sent)
            },
        )?;
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
            let answer = tokio::time::timeout(SYNC_SEND_WAIT, self.provider.send_raw_transaction_sync(raw));
            let Ok(answer) = answer.await else {
                // Sent, almost surely (the node holds the request), or possibly not: either way
                // the gate confirms it from the chain. The local nonce stays: reading the node's
                // pending count now could hand this transaction's nonce out again while it
                // propagates. Should it never have arrived, `until_mined` resyncs after its wait.
                tracing::debug!(payment.tx = %hash, "not mined within the sync wait; confirming by polling");
                return Ok(hash.into());
            };
            match answer {
                Ok(receipt) => return Ok(Submitted { tx: hash, receipt: Some(receipt) }),
                // The node took it, and its own wait for inclusion ran out (anvil says so).
                Err(RpcError::ErrorResp(e)) if e.message.to_ascii_lowercase().contains("timeout") => {
                    return Ok(hash.into());
                }
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

    /// A transaction from the relayer calling `to` with `input`.
    pub(super) fn request(&self, to: Address, input: Bytes) -> TransactionRequest {
        TransactionRequest::default().with_to(to).with_input(input).with_from(self.address)
    }

    /// One plain payment's transaction: the token's `transferWithAuthorization`.
    pub(super) fn single(&self, call: Bytes) -> TransactionRequest {
        self.request(self.asset, call)
    }

    /// Several payments in one transaction: Multicall3 `aggregate3`, every call allowed to
    /// fail, so one that reverts (spent or drained since its simulation) takes only itself down.
    pub(super) fn aggregate(&self, calls: &[Bytes]) -> TransactionRequest {
        let calls = calls
            .iter()
            .map(|call| Multicall3::Call3 { target: self.asset, allowFailure: true, callData: call.clone() })
            .collect();
        self.request(MULTICALL3, Multicall3::aggregate3Call { calls }.abi_encode().into())
    }

    /// Simulates every payment of a batch in one `eth_call` (aggregate3, each allowed to fail):
    /// for each, whether it would settle, or the token's own reason why not.
    pub(super) async fn simulate_each(&self, calls: &[Bytes]) -> Result<Vec<Verdict>, SettleError> {
        let answer = self
            .provider
            .call(self.aggregate(calls))
            .await
            .map_err(|e| SettleError::NotSent(format!("batch simulation failed: {}", rpc_failure(&e))))?;
        let results = Multicall3::aggregate3Call::abi_decode_returns(&answer)
            .ok()
            .filter(|results| results.len() == calls.len())
            .ok_or_else(|| SettleError::NotSent("Multicall3 gave no answer for the batch".into()))?;
        Ok(results
            .iter()
            .map(|r| match r.success {
                true => Verdict::Settles,
                false => alloy::sol_types::decode_revert_reason(&r.returnData)
                    .and_then(|reason| wallet::token_refusal(&reason))
                    .map_or(Verdict::Unclear, Verdict::Refused),
            })
            .collect())
    }

    /// Signs `tx` with the next nonce, records it on every payment's row, then broadcasts it.
    /// A row that cannot record it stops the attempt before anything is sent
    /// ([`SendFailure::Unrecorded`]); once a transaction was broadcast, every later failure is
    /// ambiguous and names it.
    pub(super) async fn send(
        &self,
        tx: TransactionRequest,
        gas_cap: &GasCap,
        prepared: Option<Prepared>,
        recorders: &[Arc<dyn TxRecorder>],
    ) -> Result<Submitted, SendFailure> {
        let mut attempts = 0;
        // The first transaction broadcast, if any: from then on nothing can be "not sent" (a
        // "nonce too low" may mean it was mined through another node).
        let mut sent: Option<B256> = None;
        loop {
            attempts += 1;
            let built = {
                // Nonce, signing and recording in order; the broadcast itself runs unlocked, so
                // a settlement waiting for its block (sync send) does not hold up the next one.
                let mut next = self.next_nonce.lock().await;
                let started = std::time::Instant::now();
                // A second attempt (the nonce was taken) is simulated again: time has passed.
                let simulated = attempts == 1 && prepared.is_some();
                match self.build(tx.clone(), gas_cap, simulated, &mut next).await {
                    Ok(envelope) => {
                        let built_in = started.elapsed();
                        let (hash, nonce) = (*envelope.tx_hash(), envelope.nonce());
                        let recorded =
                            futures_util::future::join_all(recorders.iter().map(|r| r.record(hash, nonce)))
                                .await;
                        tracing::debug!(
                            timing.build_us = built_in.as_micros() as u64,
                            timing.record_us = (started.elapsed() - built_in).as_micros() as u64,
                            "settlement signed and recorded"
                        );
                        let failed: Vec<usize> =
                            recorded.iter().enumerate().filter(|(_, r)| r.is_err()).map(|(i, _)| i).collect();
                        if failed.is_empty() {
                            Ok((envelope, nonce))
                        } else {
                            *next = None;
                            Err(SendFailure::Unrecorded(failed))
                        }
                    }
                    Err(e) => Err(SendFailure::Settle(e)),
                }
            };
            let (envelope, nonce) = match (built, sent) {
                (Ok(built), _) => built,
                (Err(_), Some(first)) => {
                    return Err(SendFailure::Settle(SettleError::Ambiguous { tx: Some(first) }));
                }
                (Err(e), None) => return Err(e),
            };
            let hash = *envelope.tx_hash();
            let started = std::time::Instant::now();
            let error = match self.broadcast(hash, &envelope.encoded_2718()).await {
                Ok(submitted) => {
                    let waited = started.elapsed().as_micros() as u64;
                    tracing::debug!(timing.broadcast_us = waited, "settlement broadcast");
                    return Ok(submitted);
                }
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
                    return Err(SendFailure::Settle(SettleError::Ambiguous { tx: Some(hash) }));
                }
            }
        }
    }

    /// Waits for a broadcast transaction's receipt (at once when the broadcast brought it), so
    /// the batcher builds the next transaction once this one is mined, and the gate confirms
    /// from the receipt without polling. Past `deadline` it returns without one: the gate
    /// keeps watching.
    pub(super) async fn until_mined(
        &self,
        submitted: Submitted,
        deadline: tokio::time::Instant,
    ) -> Submitted {
        if submitted.receipt.is_some() {
            return submitted;
        }
        let mut pause = Duration::from_millis(20);
        loop {
            if let Ok(Some(receipt)) = self.provider.get_transaction_receipt(submitted.tx).await {
                return Submitted { tx: submitted.tx, receipt: Some(receipt) };
            }
            if tokio::time::Instant::now() + pause >= deadline {
                // Not mined in several blocks: perhaps it never reached the node, leaving a gap
                // every later nonce would wait behind. The next transaction takes the node's
                // pending count, which fills such a gap (and is ours + 1 if there is none).
                tracing::warn!(payment.tx = %submitted.tx, "settlement not mined in time; resyncing the relayer nonce");
                *self.next_nonce.lock().await = None;
                return submitted;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}

#[async_trait::async_trait]
impl Settler for SelfSettler {
    /// Every broadcast goes through [`Relayer::send`], which records before it sends.
    fn records_before_broadcast(&self) -> bool {
        true
    }

    fn waiting(&self) -> usize {
        self.batcher.get().map_or(0, Batcher::waiting)
    }

    async fn submit(
        &self,
        req: &SettleRequest<'_>,
        recorder: Arc<dyn TxRecorder>,
    ) -> Result<Submitted, SettleError> {
        let a = &req.payment.authorization;
        let asset = self.relayer.asset;
        let (to, input, gas_cap) = match &req.payment.signature {
            PayerSignature::Eoa(sig) if self.batching().await => {
                let call = wallet::eoa_transfer_call(req.payment, sig);
                return self.batcher().submit(a.from, a.nonce, call, req.prepared, recorder).await;
            }
            PayerSignature::Eoa(sig) => {
                (asset, wallet::eoa_transfer_call(req.payment, sig), GasCap::TRANSFER)
            }
            // The `bytes` overload: FiatToken v2.2 asks the wallet (ERC-1271) there.
            PayerSignature::Contract(signature) => {
                (asset, wallet::transfer_call(req.payment, signature.clone()), GasCap::WALLET_TRANSFER)
            }
            // One transaction through Multicall3: deploy (allowed to fail, should the wallet
            // exist by now), then the transfer (must succeed). Estimated from our relayer, so
            // the deployment costs gas only when the payment goes through with it.
            PayerSignature::Counterfactual { factory, calldata, inner } => {
                let calls = vec![
                    Multicall3::Call3 { target: *factory, allowFailure: true, callData: calldata.clone() },
                    Multicall3::Call3 {
                        target: asset,
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
        let counterfactual = matches!(req.payment.signature, PayerSignature::Counterfactual { .. });
        let request = self.relayer.request(to, input);
        // Sent at once, beside any other payment in flight: only the batcher knows whether a
        // simulation ahead of time is still current (`batch::Flights`), so it is not used here.
        let sent = self.relayer.send(request, &gas_cap, None, &[recorder]).await;
        match sent.map_err(SendFailure::into_settle) {
            // Multicall3 reverts with its own message, hiding USDC's: an authorization spent
            // meanwhile (by a front-runner) must reach the gate as spent, which asks the chain
            // who spent it, never as a plain failure. (A refusal means nothing was broadcast.)
            Err(SettleError::Refused(e)) if counterfactual && e != PaymentError::NonceReused => {
                let used =
                    Usdc::new(asset, &self.relayer.provider).authorizationState(a.from, a.nonce).call().await;
                Err(match used {
                    Ok(true) => SettleError::Refused(PaymentError::NonceReused),
                    Ok(false) => SettleError::Refused(e),
                    // Unknown either way, and nothing was sent.
                    Err(_) => SettleError::NotSent("RPC unavailable".into()),
                })
            }
            other => other,
        }
    }

    /// A plain payment's `transferWithAuthorization` from the relayer, with the gas cap as its
    /// gas: simulated beside the claim, it lets a lone payment's transaction be built without an
    /// estimate (one execution off the path, instead of an estimate's many on it). Smart wallets
    /// are simulated where they are sent (their cap differs, and they are rare).
    fn presimulation(&self, payment: &crate::payment::verify::VerifiedPayment) -> Option<TransactionRequest> {
        let PayerSignature::Eoa(sig) = &payment.signature else { return None };
        let call = wallet::eoa_transfer_call(payment, sig);
        Some(self.relayer.single(call).with_gas_limit(GasCap::TRANSFER.limit))
    }

    fn relayer(&self) -> Option<Address> {
        Some(self.relayer.address)
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
    if let Some(refusal) = wallet::token_refusal(&resp.message) {
        return SettleError::Refused(refusal);
    }
    if resp.message.to_ascii_lowercase().contains("revert") {
        let reason = "invalid_exact_evm_transaction_simulation_failed".into();
        return SettleError::Refused(PaymentError::SettlementFailed { reason });
    }
    // e.g. the relayer cannot pay for gas: our problem, and nothing was sent.
    SettleError::NotSent(format!("node refused: {}", resp.message))
}
