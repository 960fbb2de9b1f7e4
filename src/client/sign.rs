//! Signing an x402 "exact" EVM payment: an EIP-3009 TransferWithAuthorization over the token's
//! EIP-712 domain, as the official clients do (x402 exact EVM scheme).

use alloy::primitives::{Address, B256, U256};
use alloy::signers::SignerSync;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolStruct;
use serde_json::{Value, json};

use crate::chain::usdc::TransferWithAuthorization;
use crate::payment::wire::PaymentRequirements;

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("network {0:?} is not an eip155 network")]
    UnsupportedNetwork(String),
    #[error("requirement field {0} is invalid")]
    BadRequirement(&'static str),
    #[error("signing failed")]
    Signer,
}

/// What to sign, beyond the requirements: the window and the nonce.
#[derive(Debug, Clone)]
pub struct SignParams {
    pub valid_after: u64,
    pub valid_before: u64,
    pub nonce: B256,
}

impl SignParams {
    /// The official clients' defaults: backdated 10 minutes, valid for maxTimeoutSeconds.
    pub fn standard(now: u64, max_timeout_seconds: u64) -> Self {
        SignParams {
            valid_after: now.saturating_sub(600),
            valid_before: now + max_timeout_seconds,
            nonce: B256::from(rand::random::<[u8; 32]>()),
        }
    }
}

/// The chain id of a CAIP-2 `eip155:N` network.
pub fn chain_id(network: &str) -> Result<u64, SignError> {
    network
        .strip_prefix("eip155:")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| SignError::UnsupportedNetwork(network.to_owned()))
}

/// Builds the v2 PaymentPayload JSON for `requirements`, signed by `signer`.
pub fn sign_payment(
    signer: &PrivateKeySigner,
    requirements: &PaymentRequirements,
    resource: Option<&Value>,
    params: &SignParams,
) -> Result<Value, SignError> {
    let asset: Address = requirements.asset.parse().map_err(|_| SignError::BadRequirement("asset"))?;
    let pay_to: Address = requirements.pay_to.parse().map_err(|_| SignError::BadRequirement("payTo"))?;
    let value =
        U256::from_str_radix(&requirements.amount, 10).map_err(|_| SignError::BadRequirement("amount"))?;
    let domain = alloy::sol_types::eip712_domain! {
        name: requirements.extra.name.clone(),
        version: requirements.extra.version.clone(),
        chain_id: chain_id(&requirements.network)?,
        verifying_contract: asset,
    };
    let authorization = TransferWithAuthorization {
        from: signer.address(),
        to: pay_to,
        value,
        validAfter: U256::from(params.valid_after),
        validBefore: U256::from(params.valid_before),
        nonce: params.nonce,
    };
    let signature =
        signer.sign_hash_sync(&authorization.eip712_signing_hash(&domain)).map_err(|_| SignError::Signer)?;
    let mut payload = json!({
        "x402Version": 2,
        "accepted": requirements,
        "payload": {
            "signature": format!("0x{}", hex::encode(signature.as_bytes())),
            "authorization": {
                "from": signer.address().to_checksum(None),
                "to": pay_to.to_checksum(None),
                "value": value.to_string(),
                "validAfter": params.valid_after.to_string(),
                "validBefore": params.valid_before.to_string(),
                "nonce": format!("{:#x}", params.nonce),
            }
        }
    });
    if let Some(resource) = resource {
        payload["resource"] = resource.clone();
    }
    Ok(payload)
}
