//! The chain side of the audit: every EIP-3009 payment from the wallet to payTo, read from the
//! token's own `AuthorizationUsed` and `Transfer` logs (not from the server).

use std::collections::BTreeMap;

use alloy::primitives::{Address, U256};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::rpc::types::Filter;
use alloy::sol_types::SolEvent;
use anyhow::Context;

use crate::chain::usdc::Usdc;

/// A payment seen on chain.
#[derive(Debug, Clone)]
pub struct OnChainPayment {
    pub tx: String,
    pub amount: U256,
}

/// nonce (lower-case 0x-hex) → payment, for every authorization of `wallet` whose transaction
/// moved USDC from `wallet` to `pay_to`. Authorizations paying someone else are not ours.
pub async fn payments(
    rpc: &str,
    asset: Address,
    wallet: Address,
    pay_to: Address,
) -> anyhow::Result<BTreeMap<String, OnChainPayment>> {
    let provider = ProviderBuilder::new().connect_http(rpc.parse().context("--rpc")?);
    let used = Filter::new()
        .address(asset)
        .event_signature(Usdc::AuthorizationUsed::SIGNATURE_HASH)
        .topic1(wallet.into_word())
        .from_block(0);
    let mut out = BTreeMap::new();
    for log in provider.get_logs(&used).await.context("reading AuthorizationUsed logs")? {
        let Some(tx) = log.transaction_hash else { continue };
        let event = Usdc::AuthorizationUsed::decode_log(&log.inner)?;
        let receipt =
            provider.get_transaction_receipt(tx).await?.context("receipt of a logged transaction")?;
        let paid = receipt
            .inner
            .logs()
            .iter()
            .filter(|l| l.address() == asset)
            .filter_map(|l| Usdc::Transfer::decode_log(&l.inner).ok())
            .find(|t| t.data.from == wallet && t.data.to == pay_to);
        if let Some(transfer) = paid {
            let nonce = format!("{:#x}", event.data.nonce);
            out.insert(nonce, OnChainPayment { tx: format!("{tx:#x}"), amount: transfer.data.value });
        }
    }
    Ok(out)
}
