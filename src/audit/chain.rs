//! The chain side of the audit: every EIP-3009 payment from the wallet to any recipient the
//! audit knows of, in any token it knows of, read from the tokens' own `AuthorizationUsed` and
//! `Transfer` logs (not from the server).
//!
//! Does not see payments that are not EIP-3009 authorizations (a plain `transfer`), nor ones
//! in a token or to a recipient outside the `Scan`: widening the scan is the holder's to do.

use std::collections::{BTreeMap, BTreeSet};

use alloy::primitives::{Address, U256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::Filter;
use alloy::sol_types::SolEvent;
use anyhow::Context;

use crate::chain::usdc::{Usdc, transfers_in};

/// What to look for on chain: transfers from `wallet`, of any of `assets`, to any of `pay_to`.
pub struct Scan {
    pub wallet: Address,
    pub assets: BTreeSet<Address>,
    pub pay_to: BTreeSet<Address>,
}

/// A payment seen on chain.
#[derive(Debug, Clone)]
pub struct OnChainPayment {
    pub tx: String,
    pub amount: U256,
    pub to: Address,
    /// Who sent the settling transaction.
    pub sender: Address,
}

/// (token, nonce as lower-case 0x-hex). EIP-3009 nonces are unique per token and authorizer
/// only, so the token is part of the key.
pub type PaymentKey = (Address, String);

pub type Payments = BTreeMap<PaymentKey, OnChainPayment>;

/// A read-only connection to the chain behind `--rpc`.
pub struct Chain {
    provider: DynProvider,
}

impl Chain {
    pub fn connect(rpc: &str) -> anyhow::Result<Chain> {
        let provider = ProviderBuilder::new().connect_http(rpc.parse().context("--rpc")?).erased();
        Ok(Chain { provider })
    }

    /// The chain's CAIP-2 name, spelled as receipts spell it.
    pub async fn network(&self) -> anyhow::Result<String> {
        let id = self.provider.get_chain_id().await.context("reading the chain id")?;
        Ok(format!("eip155:{id}"))
    }

    /// Every authorization of the wallet whose transaction moved one of the tokens from the
    /// wallet to one of the recipients. Authorizations paying someone else are not ours.
    pub async fn payments(&self, scan: &Scan) -> anyhow::Result<Payments> {
        let mut out = Payments::new();
        for asset in &scan.assets {
            self.payments_in(*asset, scan, &mut out).await?;
        }
        Ok(out)
    }

    /// Whether transaction `tx` moved exactly `amount` of `asset` from `from` to `to` (its own
    /// `Transfer` log, in a successful transaction).
    pub async fn transferred(
        &self,
        asset: Address,
        tx: alloy::primitives::B256,
        from: Address,
        to: Address,
        amount: &str,
    ) -> anyhow::Result<bool> {
        let Some(receipt) = self.provider.get_transaction_receipt(tx).await.context("reading a refund")?
        else {
            return Ok(false);
        };
        let amount = U256::from_str_radix(amount, 10).unwrap_or(U256::MAX);
        let moved = transfers_in(&receipt, asset).any(|t| t.from == from && t.to == to && t.value == amount);
        Ok(receipt.status() && moved)
    }

    async fn payments_in(&self, asset: Address, scan: &Scan, out: &mut Payments) -> anyhow::Result<()> {
        let used = Filter::new()
            .address(asset)
            .event_signature(Usdc::AuthorizationUsed::SIGNATURE_HASH)
            .topic1(scan.wallet.into_word())
            .from_block(0);
        for log in self.provider.get_logs(&used).await.context("reading AuthorizationUsed logs")? {
            let Some(tx) = log.transaction_hash else { continue };
            let event = Usdc::AuthorizationUsed::decode_log(&log.inner)?;
            let receipt = self
                .provider
                .get_transaction_receipt(tx)
                .await?
                .context("receipt of a logged transaction")?;
            let paid =
                transfers_in(&receipt, asset).find(|t| t.from == scan.wallet && scan.pay_to.contains(&t.to));
            if let Some(transfer) = paid {
                let payment = OnChainPayment {
                    tx: format!("{tx:#x}"),
                    amount: transfer.value,
                    to: transfer.to,
                    sender: receipt.from,
                };
                out.insert((asset, format!("{:#x}", event.data.nonce)), payment);
            }
        }
        Ok(())
    }
}
