//! Read access to the chain for the payment stage: authorization state, balances, receipts,
//! and the `AuthorizationUsed` log that proves a nonce was spent (by anyone's transaction).
//!
//! Every call has a timeout (via the HTTP client), and every failure is `ChainError::Unavailable`
//! so the caller can decide what "unknown" means for money: before submission it means
//! "nothing charged", after submission it means "pending".

use std::num::NonZeroUsize;
use std::time::Duration;

use alloy::eips::BlockId;
use alloy::primitives::{Address, B256, Bytes, U64, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::client::{ClientBuilder, RpcClient};
use alloy::rpc::types::{Filter, TransactionReceipt, TransactionRequest};
use alloy::sol_types::SolCall as _;
use alloy::sol_types::SolEvent;
use alloy::transports::RpcError;
use alloy::transports::http::Http;
use alloy::transports::layers::{FallbackLayer, RateLimitRetryPolicy, RetryBackoffLayer, RetryPolicy};
use tower::Layer;

use super::usdc::Usdc;
use super::wallets::Deployment;

/// Per-request RPC timeout: a stuck RPC must not hold a paid call past its settle deadline.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("chain RPC unavailable: {0}")]
    Unavailable(String),
    #[error("bad RPC URL")]
    BadUrl,
    #[error("the log search reached its window budget without an answer")]
    SearchExhausted,
}

/// What the chain says about a settlement transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxStatus {
    /// Not mined (unknown, dropped, or still in the mempool).
    NotMined,
    /// Mined and successful, with this many confirmations (1 = just its own block), what it
    /// did with the authorization we expect, and who sent it (our relayer, a facilitator's
    /// signer, anyone).
    Mined { block: u64, confirmations: u64, effect: AuthEffect, sender: Address },
    /// Mined and reverted: nothing moved.
    Reverted { block: u64 },
}

/// What settlement starts from, read in one request ([`Chain::settlement_checks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SettlementChecks {
    /// Whether the authorization is already spent (or cancelled).
    pub used: bool,
    /// The payer's token balance.
    pub balance: U256,
    /// The latest block number: where log searches for this payment start.
    pub head: u64,
    /// Whether the simulated transaction (when one was given) would succeed: `None` when none
    /// was given, the node could not say, or the payer holds code (its answer may change).
    pub simulated: Option<bool>,
}

/// The chain's latest block, as far as the node knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub number: u64,
    pub timestamp: u64,
}

impl TxStatus {
    /// The status a mined transaction's receipt shows, with the chain head at `head`.
    pub fn of(
        receipt: &TransactionReceipt,
        expect: &ExpectedTransfer,
        asset: Address,
        head: u64,
    ) -> TxStatus {
        let block = receipt.block_number.unwrap_or_default();
        if !receipt.status() {
            return TxStatus::Reverted { block };
        }
        let confirmations = head.max(block).saturating_sub(block) + 1;
        TxStatus::Mined {
            block,
            confirmations,
            effect: expect.effect_in(receipt, asset),
            sender: receipt.from,
        }
    }
}

/// What one mined transaction did with an authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthEffect {
    /// It spent the authorization with the paired transfer we expect: the payment.
    Paid,
    /// It spent the authorization, but its paired transfer went elsewhere or moved another
    /// value: the authorization is gone and it paid nothing to us.
    SpentOtherwise,
    /// It did not touch this authorization.
    Untouched,
}

/// How an authorization left the unused state, found from the token's logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spent {
    /// `AuthorizationUsed`, in this transaction (whoever sent it).
    Used(B256),
    /// `AuthorizationCanceled` (the payer's `cancelAuthorization`): nothing moved.
    Canceled(B256),
}

/// What the payment stage reads from the chain. [`ChainClient`] is the real one; the
/// payment state machine's unit tests drive fakes of it.
#[async_trait::async_trait]
pub trait Chain: Send + Sync + 'static {
    async fn authorization_used(&self, authorizer: Address, nonce: B256) -> Result<bool, ChainError>;
    /// As of block `at` (read together with that block's time, it proves expiry).
    async fn authorization_used_at(
        &self,
        authorizer: Address,
        nonce: B256,
        at: u64,
    ) -> Result<bool, ChainError>;
    async fn balance_of(&self, owner: Address) -> Result<U256, ChainError>;
    async fn block_number(&self) -> Result<u64, ChainError>;
    /// The authorization's state, the payer's balance, the head, and (when given) whether
    /// `simulate` would succeed as an `eth_call`. A simulation that fails is not an error.
    async fn settlement_checks(
        &self,
        authorizer: Address,
        nonce: B256,
        simulate: Option<TransactionRequest>,
    ) -> Result<SettlementChecks, ChainError> {
        let _ = simulate;
        let (used, balance, head) = tokio::try_join!(
            self.authorization_used(authorizer, nonce),
            self.balance_of(authorizer),
            self.block_number(),
        )?;
        Ok(SettlementChecks { used, balance, head, simulated: None })
    }
    async fn head(&self) -> Result<Head, ChainError>;
    async fn tx_status(&self, tx: B256, expect: &ExpectedTransfer) -> Result<TxStatus, ChainError>;
    async fn find_spent(&self, q: &SpentQuery) -> Result<Option<Spent>, ChainError>;
    async fn chain_id(&self) -> Result<u64, ChainError>;
    /// Native (gas) balance in wei.
    async fn gas_balance(&self, who: Address) -> Result<U256, ChainError>;
    /// Whether `who` holds code (a contract, or an ERC-7702 delegation).
    async fn has_code(&self, who: Address) -> Result<bool, ChainError>;
    /// What the wallet at `wallet` says of `signature` over `digest` (ERC-1271).
    async fn erc1271_valid(
        &self,
        wallet: Address,
        digest: B256,
        signature: Bytes,
    ) -> Result<bool, ChainError>;
    /// A simulated deployment, the deployed wallet's own check, then the transfer: `None` when
    /// all would succeed, else why not.
    async fn simulate_deployed_transfer(&self, deploy: &Deployment) -> Result<Option<String>, ChainError>;
    /// A simulated call of the token with `input`: `None` when it would succeed, else its revert.
    async fn simulate_token_call(&self, input: Bytes) -> Result<Option<String>, ChainError>;
}

#[async_trait::async_trait]
impl Chain for ChainClient {
    async fn authorization_used(&self, authorizer: Address, nonce: B256) -> Result<bool, ChainError> {
        ChainClient::authorization_used(self, authorizer, nonce).await
    }
    async fn authorization_used_at(
        &self,
        authorizer: Address,
        nonce: B256,
        at: u64,
    ) -> Result<bool, ChainError> {
        ChainClient::authorization_used_at(self, authorizer, nonce, at).await
    }
    async fn balance_of(&self, owner: Address) -> Result<U256, ChainError> {
        ChainClient::balance_of(self, owner).await
    }
    async fn block_number(&self) -> Result<u64, ChainError> {
        ChainClient::block_number(self).await
    }
    async fn settlement_checks(
        &self,
        authorizer: Address,
        nonce: B256,
        simulate: Option<TransactionRequest>,
    ) -> Result<SettlementChecks, ChainError> {
        ChainClient::settlement_checks(self, authorizer, nonce, simulate).await
    }
    async fn head(&self) -> Result<Head, ChainError> {
        ChainClient::head(self).await
    }
    async fn tx_status(&self, tx: B256, expect: &ExpectedTransfer) -> Result<TxStatus, ChainError> {
        ChainClient::tx_status(self, tx, expect).await
    }
    async fn find_spent(&self, q: &SpentQuery) -> Result<Option<Spent>, ChainError> {
        ChainClient::find_spent(self, q).await
    }
    async fn chain_id(&self) -> Result<u64, ChainError> {
        ChainClient::chain_id(self).await
    }
    async fn gas_balance(&self, who: Address) -> Result<U256, ChainError> {
        ChainClient::gas_balance(self, who).await
    }
    async fn has_code(&self, who: Address) -> Result<bool, ChainError> {
        ChainClient::has_code(self, who).await
    }
    async fn erc1271_valid(
        &self,
        wallet: Address,
        digest: B256,
        signature: Bytes,
    ) -> Result<bool, ChainError> {
        ChainClient::erc1271_valid(self, wallet, digest, signature).await
    }
    async fn simulate_token_call(&self, input: Bytes) -> Result<Option<String>, ChainError> {
        ChainClient::simulate_token_call(self, input).await
    }
    async fn simulate_deployed_transfer(&self, deploy: &Deployment) -> Result<Option<String>, ChainError> {
        ChainClient::simulate_deployed_transfer(self, deploy).await
    }
}

/// A read-only handle on the chain and the USDC contract.
#[derive(Clone)]
pub struct ChainClient {
    provider: DynProvider,
    asset: Address,
}

/// An HTTP JSON-RPC client with a request timeout.
/// A client over one or more endpoints of the same chain. With several, alloy's fallback layer
/// sends each request to the healthiest endpoint (ranked by recent success and latency) and on
/// to the next when it fails; every method tollgate uses is sequential there, so a healthy
/// setup spends one provider's quota, not all of them. Rate limits (HTTP 429, and providers'
/// rate-limit error codes) are retried with backoff by alloy's retry layer.
pub fn rpc_client(urls: &[&str]) -> Result<RpcClient, ChainError> {
    let http = reqwest::Client::builder()
        .timeout(RPC_TIMEOUT)
        .build()
        .map_err(|e| ChainError::Unavailable(e.to_string()))?;
    let transports = urls
        .iter()
        .map(|url| Ok(Http::with_client(http.clone(), url.parse().map_err(|_| ChainError::BadUrl)?)))
        .collect::<Result<Vec<_>, ChainError>>()?;
    let count = NonZeroUsize::new(transports.len()).ok_or(ChainError::BadUrl)?;
    let fallback = FallbackLayer::default()
        .with_active_transport_count(count)
        .with_sequential_methods(SEQUENTIAL_METHODS.iter().map(|m| (*m).to_owned()).collect());
    let retry = RetryBackoffLayer::new_with_policy(
        RATE_LIMIT_RETRIES,
        RATE_LIMIT_BACKOFF_MS,
        COMPUTE_UNITS_PER_SECOND,
        ShortHints,
    );
    let is_local = false;
    Ok(ClientBuilder::default().layer(retry).transport(fallback.layer(transports), is_local))
}

/// Every method tollgate sends. Sequential in the fallback layer: tried on one endpoint at a
/// time, best first. (Any other method would go to all endpoints at once: correct, but costly.)
const SEQUENTIAL_METHODS: [&str; 16] = [
    "eth_call",
    "eth_chainId",
    "eth_blockNumber",
    "eth_getBlockByNumber",
    "eth_getBalance",
    "eth_getCode",
    "eth_getLogs",
    "eth_getTransactionByHash",
    "eth_getTransactionCount",
    "eth_getTransactionReceipt",
    "eth_estimateGas",
    "eth_feeHistory",
    "eth_gasPrice",
    "eth_maxPriorityFeePerGas",
    "eth_sendRawTransaction",
    "eth_sendRawTransactionSync",
];
/// alloy's rate-limit policy, with the server's backoff hint (`Retry-After`, up to minutes)
/// capped: a settlement holds the relayer's nonce lock while it asks the RPC, so one provider
/// asking for a long pause must not stall every settlement behind it.
#[derive(Debug, Clone, Copy)]
struct ShortHints;

const MAX_BACKOFF_HINT: Duration = Duration::from_secs(1);

impl RetryPolicy for ShortHints {
    fn should_retry(&self, error: &alloy::transports::TransportError) -> bool {
        RateLimitRetryPolicy::default().should_retry(error)
    }

    fn backoff_hint(&self, error: &alloy::transports::TransportError) -> Option<Duration> {
        RateLimitRetryPolicy::default().backoff_hint(error).map(|hint| hint.min(MAX_BACKOFF_HINT))
    }
}

/// Retries of a rate-limited request before its error is returned, and the first backoff.
const RATE_LIMIT_RETRIES: u32 = 3;
const RATE_LIMIT_BACKOFF_MS: u64 = 100;
/// The retry layer's budget estimate (compute units per second, as hosted RPCs count them):
/// only paces retries after a rate limit, never ordinary requests.
const COMPUTE_UNITS_PER_SECOND: u64 = 330;

/// Transport errors name the RPC URL, which may carry an API key: cut to scheme and host.
fn unavailable(e: impl std::fmt::Display) -> ChainError {
    ChainError::Unavailable(crate::redact::urls(&e.to_string()))
}

impl ChainClient {
    /// Connects to one endpoint.
    pub fn connect(url: &str, asset: Address) -> Result<ChainClient, ChainError> {
        Self::connect_any(&[url], asset)
    }

    /// Connects to several endpoints of one chain (see [`rpc_client`]).
    pub fn connect_any(urls: &[&str], asset: Address) -> Result<ChainClient, ChainError> {
        let provider = ProviderBuilder::new().connect_client(rpc_client(urls)?).erased();
        Ok(ChainClient { provider, asset })
    }

    pub fn provider(&self) -> &DynProvider {
        &self.provider
    }

    pub fn asset(&self) -> Address {
        self.asset
    }

    pub async fn authorization_used(&self, authorizer: Address, nonce: B256) -> Result<bool, ChainError> {
        Usdc::new(self.asset, &self.provider)
            .authorizationState(authorizer, nonce)
            .call()
            .await
            .map_err(unavailable)
    }

    /// The authorization's state as of block `at`: read together with that block's time, it
    /// proves expiry (no later block can carry an earlier timestamp).
    pub async fn authorization_used_at(
        &self,
        authorizer: Address,
        nonce: B256,
        at: u64,
    ) -> Result<bool, ChainError> {
        Usdc::new(self.asset, &self.provider)
            .authorizationState(authorizer, nonce)
            .block(at.into())
            .call()
            .await
            .map_err(unavailable)
    }

    /// The latest block: its number and timestamp (the chain's own clock).
    pub async fn head(&self) -> Result<Head, ChainError> {
        let block = self
            .provider
            .get_block_by_number(alloy::eips::BlockNumberOrTag::Latest)
            .await
            .map_err(unavailable)?
            .ok_or_else(|| ChainError::Unavailable("no latest block".into()))?;
        Ok(Head { number: block.header.number, timestamp: block.header.timestamp })
    }

    /// [`Chain::settlement_checks`]: the three reads as one JSON-RPC batch (one HTTP request
    /// where they would otherwise take three, on the path every payment waits for), beside the
    /// simulation. The simulation goes on its own: alloy's retry layer fails a whole batch when
    /// any answer in it is an error, and a simulation's revert is an answer, not a failure.
    pub async fn settlement_checks(
        &self,
        authorizer: Address,
        nonce: B256,
        simulate: Option<TransactionRequest>,
    ) -> Result<SettlementChecks, ChainError> {
        let token_call = |input: Vec<u8>| {
            let call = TransactionRequest::default().to(self.asset).input(input.into());
            (call, BlockId::latest())
        };
        let used = token_call(Usdc::authorizationStateCall { authorizer, nonce }.abi_encode());
        let balance = token_call(Usdc::balanceOfCall::new((authorizer,)).abi_encode());
        let reads = async {
            let client = self.provider.client();
            let mut batch = alloy::rpc::client::BatchRequest::new(client);
            let used = batch.add_call::<_, Bytes>("eth_call", &used)?;
            let balance = batch.add_call::<_, Bytes>("eth_call", &balance)?;
            let head = batch.add_call::<_, U64>("eth_blockNumber", &[(); 0])?;
            let code = batch.add_call::<_, Bytes>("eth_getCode", &(authorizer, BlockId::latest()))?;
            batch.send().await?;
            tokio::try_join!(used, balance, head, code)
        };
        let simulated = async {
            let tx = simulate?;
            match self.provider.call(tx).await {
                Ok(_) => Some(true),
                Err(RpcError::ErrorResp(e)) if super::wallets::is_revert(e.code, &e.message) => Some(false),
                Err(_) => None,
            }
        };
        let (reads, simulated) = tokio::join!(reads, simulated);
        let (used, balance, head, code) = reads.map_err(unavailable)?;
        // A payer with code (a contract, an EIP-7702 delegation) runs its own code when the
        // token checks the signature, and may behave otherwise once mined (on block number,
        // say): its simulation says nothing of the transaction.
        let simulated = simulated.filter(|_| code.is_empty());
        let word = |answer: &Bytes| {
            U256::try_from_be_slice(answer.get(..32).unwrap_or_default())
                .ok_or_else(|| ChainError::Unavailable("a malformed token answer".into()))
        };
        Ok(SettlementChecks {
            used: !word(&used)?.is_zero(),
            balance: word(&balance)?,
            head: head.to(),
            simulated,
        })
    }

    pub async fn balance_of(&self, owner: Address) -> Result<U256, ChainError> {
        Usdc::new(self.asset, &self.provider).balanceOf(owner).call().await.map_err(unavailable)
    }

    /// Native (gas) balance in wei.
    pub async fn gas_balance(&self, who: Address) -> Result<U256, ChainError> {
        self.provider.get_balance(who).await.map_err(unavailable)
    }

    pub async fn chain_id(&self) -> Result<u64, ChainError> {
        self.provider.get_chain_id().await.map_err(unavailable)
    }

    /// The status of `tx`, and whether its logs show the expected payment.
    pub async fn tx_status(&self, tx: B256, expect: &ExpectedTransfer) -> Result<TxStatus, ChainError> {
        let Some(receipt) = self.provider.get_transaction_receipt(tx).await.map_err(unavailable)? else {
            return Ok(TxStatus::NotMined);
        };
        let head = match receipt.status() {
            true => self.provider.get_block_number().await.map_err(unavailable)?,
            false => 0,
        };
        Ok(TxStatus::of(&receipt, expect, self.asset, head))
    }

    pub async fn block_number(&self) -> Result<u64, ChainError> {
        self.provider.get_block_number().await.map_err(unavailable)
    }

    /// Finds how `(authorizer, nonce)` was spent or cancelled, whoever did it.
    ///
    /// Hosted RPCs refuse `eth_getLogs` over wide ranges (1k–10k blocks), so the search walks
    /// windows of `window` blocks: forward from `anchor` (the head when the payment was
    /// checked) to the head, then backward from `anchor` until a block older than
    /// `not_before`, before which the authorization cannot have been spent. At most
    /// `MAX_WINDOWS` windows are read per call; a search that runs out says so, so the caller
    /// keeps the payment pending rather than concluding anything.
    pub async fn find_spent(&self, q: &SpentQuery) -> Result<Option<Spent>, ChainError> {
        let head = self.block_number().await?;
        let anchor = q.anchor.unwrap_or(head).min(head);
        let window = q.window.max(1);
        let mut budget = MAX_WINDOWS;
        let mut lo = anchor;
        while lo <= head {
            let hi = head.min(lo.saturating_add(window - 1));
            if let Some(found) = self.spent_in(q, lo, hi).await? {
                return Ok(Some(found));
            }
            budget = budget.checked_sub(1).ok_or(ChainError::SearchExhausted)?;
            lo = hi + 1;
        }
        let mut hi = anchor;
        while hi > 0 {
            let top = hi - 1;
            let lo = top.saturating_sub(window - 1);
            if let Some(found) = self.spent_in(q, lo, top).await? {
                return Ok(Some(found));
            }
            if lo == 0 || self.block_time(lo).await? <= q.not_before {
                break;
            }
            budget = budget.checked_sub(1).ok_or(ChainError::SearchExhausted)?;
            hi = lo;
        }
        Ok(None)
    }

    async fn spent_in(&self, q: &SpentQuery, from: u64, to: u64) -> Result<Option<Spent>, ChainError> {
        let filter = Filter::new()
            .address(self.asset)
            .event_signature(vec![
                Usdc::AuthorizationUsed::SIGNATURE_HASH,
                Usdc::AuthorizationCanceled::SIGNATURE_HASH,
            ])
            .topic1(q.authorizer.into_word())
            .topic2(q.nonce)
            .from_block(from)
            .to_block(to);
        let logs = self.provider.get_logs(&filter).await.map_err(unavailable)?;
        Ok(logs.into_iter().find_map(|log| {
            let tx = log.transaction_hash?;
            match log.topic0()? {
                t if *t == Usdc::AuthorizationUsed::SIGNATURE_HASH => Some(Spent::Used(tx)),
                _ => Some(Spent::Canceled(tx)),
            }
        }))
    }

    async fn block_time(&self, number: u64) -> Result<u64, ChainError> {
        let block = self.provider.get_block_by_number(number.into()).await.map_err(unavailable)?;
        Ok(block.map(|b| b.header.timestamp).unwrap_or(0))
    }
}

/// At most this many `eth_getLogs` windows per search (with 1,000-block windows on Base, two
/// 2-second blocks apart, that spans about 55 hours on each side of the anchor).
const MAX_WINDOWS: u32 = 100;

/// What `find_spent` looks for, and where.
#[derive(Debug, Clone)]
pub struct SpentQuery {
    pub authorizer: Address,
    pub nonce: B256,
    /// The head when the payment was checked; `None` searches back from the current head.
    pub anchor: Option<u64>,
    /// No block at or before this time can have spent it: the later of `validAfter` and the
    /// earliest the authorization can have been signed (validBefore less the longest validity).
    pub not_before: u64,
    /// Blocks per `eth_getLogs` request.
    pub window: u64,
}

/// The transfer a settlement must produce: `from` → `to`, exactly `value`, nonce spent.
#[derive(Debug, Clone)]
pub struct ExpectedTransfer {
    pub from: Address,
    pub to: Address,
    pub value: U256,
    pub nonce: B256,
}

impl ExpectedTransfer {
    /// What `receipt` did with this authorization.
    ///
    /// The pairing rule: FiatToken v2.2 (`_transferWithAuthorization`, and likewise
    /// `_receiveWithAuthorization`) marks the authorization used and then transfers, so it emits
    /// `AuthorizationUsed(from, nonce)` and, as the very next log of the transaction,
    /// `Transfer(from, to, value)`, both from the token. Nothing can log in between: the only
    /// external call on that path (ERC-1271 `isValidSignature`) is a staticcall made before.
    /// So the transfer an authorization paid is the log right after its `AuthorizationUsed`;
    /// any other matching `Transfer` in the same transaction paid for something else, and
    /// cannot settle this payment (one transfer settles exactly one payment).
    pub fn effect_in(&self, receipt: &TransactionReceipt, asset: Address) -> AuthEffect {
        let logs = receipt.inner.logs();
        let ours = |l: &alloy::rpc::types::Log| l.address() == asset;
        let Some(at) = logs.iter().position(|l| {
            ours(l)
                && Usdc::AuthorizationUsed::decode_log(&l.inner)
                    .is_ok_and(|e| e.data.authorizer == self.from && e.data.nonce == self.nonce)
        }) else {
            return AuthEffect::Untouched;
        };
        let paired =
            logs.get(at + 1).filter(|l| ours(l)).and_then(|l| Usdc::Transfer::decode_log(&l.inner).ok());
        match paired {
            Some(t) if t.data.from == self.from && t.data.to == self.to && t.data.value == self.value => {
                AuthEffect::Paid
            }
            _ => AuthEffect::SpentOtherwise,
        }
    }
}
