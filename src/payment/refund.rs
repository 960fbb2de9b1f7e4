//! Refunds of calls that failed after they were paid (`refund_on_error`, for `before_run`
//! tools): the configured refund wallet sends the whole amount back to the payer in a plain
//! USDC `transfer`, and the receipt records its transaction.
//!
//! Guarantees: a refund is confirmed by its own `Transfer(refund wallet → payer, amount)` log
//! before the receipt says "sent"; refunds go out one at a time (the wallet's account nonce);
//! a refund that cannot be sent or confirmed in time is recorded as "failed" with its reason, so
//! the operator (and `tollgate audit`) sees what is owed. Never retried blindly: a refund that
//! timed out may still be mined, and a second would pay twice.

use std::time::Duration;

use alloy::network::EthereumWallet;
use alloy::primitives::{Address, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use serde::{Deserialize, Serialize};

use crate::chain::client::rpc_client;
use crate::chain::usdc::transfers_in;
use crate::money::UsdcAmount;

alloy::sol! {
    #[sol(rpc)]
    interface IERC20Transfer {
        function transfer(address to, uint256 value) external returns (bool);
    }
}

/// How long a refund may take to be mined before it is recorded as failed (unknown).
const REFUND_TIMEOUT: Duration = Duration::from_secs(30);

/// A refund of a failed call, as its receipt records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundRecord {
    /// "sent" (mined, with `tx`) or "failed" (with `reason`: the operator owes it).
    pub status: String,
    /// The refunding wallet, checksummed.
    pub from: String,
    /// USDC atomic units, decimal: the whole amount paid.
    pub amount: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl RefundRecord {
    fn of(status: &str, from: Option<Address>, amount: UsdcAmount) -> RefundRecord {
        RefundRecord {
            status: status.into(),
            from: from.map(|a| a.to_checksum(None)).unwrap_or_default(),
            amount: amount.to_string(),
            tx: None,
            block: None,
            reason: None,
        }
    }

    /// A refund that could not be sent: the payer is owed `amount`.
    pub fn failed(from: Option<Address>, amount: UsdcAmount, reason: &str) -> RefundRecord {
        RefundRecord { reason: Some(reason.into()), ..RefundRecord::of("failed", from, amount) }
    }
}

/// The wallet refunds are sent from.
pub struct Refunder {
    provider: DynProvider,
    token: Address,
    pub from: Address,
    /// One refund at a time: the wallet's account nonce is filled per transaction.
    one: tokio::sync::Mutex<()>,
}

impl Refunder {
    pub fn new(key: PrivateKeySigner, rpc_urls: &[&str], token: Address) -> anyhow::Result<Refunder> {
        let from = key.address();
        let provider = ProviderBuilder::new()
            .wallet(EthereumWallet::from(key))
            .connect_client(rpc_client(rpc_urls)?)
            .erased();
        Ok(Refunder { provider, token, from, one: tokio::sync::Mutex::new(()) })
    }

    /// Sends `amount` back to `to` and waits for it to be mined; the record says what happened.
    pub async fn refund(&self, to: Address, amount: UsdcAmount) -> RefundRecord {
        match self.send(to, amount).await {
            Ok((tx, block)) => {
                metrics::counter!("tollgate_refunds_total", "outcome" => "sent").increment(1);
                RefundRecord {
                    tx: Some(tx),
                    block: Some(block),
                    ..RefundRecord::of("sent", Some(self.from), amount)
                }
            }
            Err((tx, reason)) => {
                metrics::counter!("tollgate_refunds_total", "outcome" => "failed").increment(1);
                tracing::error!(refund.to = %to, refund.amount = %amount, refund.tx = ?tx, reason = %reason, "refund failed: the payer is owed it");
                RefundRecord { tx, ..RefundRecord::failed(Some(self.from), amount, &reason) }
            }
        }
    }

    /// The transaction and its block, or (the transaction if one was sent, why it failed).
    async fn send(&self, to: Address, amount: UsdcAmount) -> Result<(String, u64), (Option<String>, String)> {
        let _one = self.one.lock().await;
        let token = IERC20Transfer::new(self.token, &self.provider);
        let redact = |e: &dyn std::fmt::Display| crate::redact::urls(&e.to_string());
        let pending =
            token.transfer(to, U256::from(amount.atomic())).send().await.map_err(|e| (None, redact(&e)))?;
        let tx = format!("{:#x}", pending.tx_hash());
        let receipt = pending
            .with_timeout(Some(REFUND_TIMEOUT))
            .get_receipt()
            .await
            .map_err(|e| (Some(tx.clone()), format!("not confirmed: {}", redact(&e))))?;
        let value = U256::from(amount.atomic());
        let paid =
            transfers_in(&receipt, self.token).any(|t| t.from == self.from && t.to == to && t.value == value);
        if !receipt.status() || !paid {
            return Err((Some(tx), "the refund transaction did not transfer the amount".into()));
        }
        Ok((tx, receipt.block_number.unwrap_or_default()))
    }
}
