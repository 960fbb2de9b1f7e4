//! Read access to the chain for the payment stage: authorization state, balances, receipts,
//! and the `AuthorizationUsed` log that proves a nonce was spent (by anyone's transaction).
//!
//! Every call has a timeout (via the HTTP client), and every failure is `ChainError::Unavailable`
//! so the caller can decide what "unknown" means for money: before submission it means
//! "nothing charged", after submission it means "pending".

use std::time::Duration;

use alloy::primitives::{Address, B256, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::client::RpcClient;
use alloy::rpc::types::{Filter, TransactionReceipt};
use alloy::sol_types::SolEvent;
use alloy::transports::http::Http;

use super::usdc::Usdc;

/// Per-request RPC timeout: a stuck RPC must not hold a paid call past its settle deadline.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("chain RPC unavailable: {0}")]
    Unavailable(String),
    #[error("bad RPC URL")]
    BadUrl,
}

/// What the chain says about a settlement transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxStatus {
    /// Not mined (unknown, dropped, or still in the mempool).
    NotMined,
    /// Mined and successful, with this many confirmations (1 = just its own block).
    Mined { block: u64, confirmations: u64, paid: bool },
    /// Mined and reverted: nothing moved.
    Reverted { block: u64 },
}

/// A read-only handle on the chain and the USDC contract.
#[derive(Clone)]
pub struct ChainClient {
    provider: DynProvider,
    asset: Address,
}

/// An HTTP JSON-RPC client with a request timeout.
pub fn rpc_client(url: &str) -> Result<RpcClient, ChainError> {
    let url = url.parse().map_err(|_| ChainError::BadUrl)?;
    let http = reqwest::Client::builder()
        .timeout(RPC_TIMEOUT)
        .build()
        .map_err(|e| ChainError::Unavailable(e.to_string()))?;
    let is_local = false;
    Ok(RpcClient::new(Http::with_client(http, url), is_local))
}

fn unavailable(e: impl std::fmt::Display) -> ChainError {
    ChainError::Unavailable(e.to_string())
}

impl ChainClient {
    pub fn connect(url: &str, asset: Address) -> Result<ChainClient, ChainError> {
        let provider = ProviderBuilder::new().connect_client(rpc_client(url)?).erased();
        Ok(ChainClient { provider, asset })
    }

    pub fn provider(&self) -> &DynProvider {
        &self.provider
    }

    pub async fn authorization_used(&self, authorizer: Address, nonce: B256) -> Result<bool, ChainError> {
        Usdc::new(self.asset, &self.provider)
            .authorizationState(authorizer, nonce)
            .call()
            .await
            .map_err(unavailable)
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
        let block = receipt.block_number.unwrap_or_default();
        if !receipt.status() {
            return Ok(TxStatus::Reverted { block });
        }
        let head = self.provider.get_block_number().await.map_err(unavailable)?;
        Ok(TxStatus::Mined {
            block,
            confirmations: head.saturating_sub(block) + 1,
            paid: expect.is_in(&receipt, self.asset),
        })
    }

    /// Finds the transaction that spent `(authorizer, nonce)`, whoever sent it.
    pub async fn find_authorization_used(
        &self,
        authorizer: Address,
        nonce: B256,
    ) -> Result<Option<B256>, ChainError> {
        let filter = Filter::new()
            .address(self.asset)
            .event_signature(Usdc::AuthorizationUsed::SIGNATURE_HASH)
            .topic1(authorizer.into_word())
            .topic2(nonce)
            .from_block(0);
        let logs = self.provider.get_logs(&filter).await.map_err(unavailable)?;
        Ok(logs.into_iter().find_map(|log| log.transaction_hash))
    }
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
    /// Both events, emitted by the token itself (not by a look-alike contract).
    fn is_in(&self, receipt: &TransactionReceipt, asset: Address) -> bool {
        let ours = || receipt.inner.logs().iter().filter(move |l| l.address() == asset);
        let transferred = ours()
            .filter_map(|l| Usdc::Transfer::decode_log(&l.inner).ok())
            .any(|e| e.data.from == self.from && e.data.to == self.to && e.data.value == self.value);
        let used = ours()
            .filter_map(|l| Usdc::AuthorizationUsed::decode_log(&l.inner).ok())
            .any(|e| e.data.authorizer == self.from && e.data.nonce == self.nonce);
        transferred && used
    }
}
