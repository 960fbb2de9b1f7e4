//! The chain: which network and USDC we accept, and typed access to the token on it.
//!
//! `Network` is resolved once from config (a Base preset, or `local` for anvil) and is the only
//! source of chain id, asset and EIP-712 domain for the rest of the program. Presets cannot be
//! overridden piecemeal: a mismatched domain name is the classic cause of "invalid signature".

pub mod anvil;
pub mod client;
pub mod usdc;
pub mod wallets;

use alloy::primitives::{Address, B256};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::Eip712Domain;

use crate::config::{NetworkConfig, NetworkPreset};

/// Base mainnet USDC (FiatToken v2.2).
pub const BASE_USDC: Address = alloy::primitives::address!("833589fCD6eDb6E08f4c7C32D4f71b54bdA02913");
/// Base Sepolia USDC.
pub const BASE_SEPOLIA_USDC: Address =
    alloy::primitives::address!("036CbD53842c5426634e7929541eC2318f3dCF7e");

/// The network and token every payment must be for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// CAIP-2 id, e.g. `eip155:8453`.
    pub caip2: String,
    pub chain_id: u64,
    /// The USDC contract, also the EIP-712 `verifyingContract`.
    pub asset: Address,
    pub eip712_name: String,
    pub eip712_version: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("network.asset is not set: `tollgate dev` deploys a token, `serve` needs its address")]
    MissingAsset,
}

impl Network {
    pub fn from_config(c: &NetworkConfig) -> Result<Network, NetworkError> {
        let (chain_id, asset, name, version) = match c.preset {
            NetworkPreset::Base => (8453, BASE_USDC, "USD Coin".to_owned(), "2".to_owned()),
            NetworkPreset::BaseSepolia => (84532, BASE_SEPOLIA_USDC, "USDC".to_owned(), "2".to_owned()),
            NetworkPreset::Local => {
                let asset = c.asset.ok_or(NetworkError::MissingAsset)?;
                (c.chain_id, asset, c.eip712_name.clone(), c.eip712_version.clone())
            }
        };
        Ok(Network {
            caip2: format!("eip155:{chain_id}"),
            chain_id,
            asset,
            eip712_name: name,
            eip712_version: version,
        })
    }

    /// The token's EIP-712 domain: what every TransferWithAuthorization is signed against.
    pub fn domain(&self) -> Eip712Domain {
        alloy::sol_types::eip712_domain! {
            name: self.eip712_name.clone(),
            version: self.eip712_version.clone(),
            chain_id: self.chain_id,
            verifying_contract: self.asset,
        }
    }
}

/// Parses a hex private key (with or without 0x). The error never echoes the input.
pub fn parse_private_key(s: &str) -> Result<PrivateKeySigner, KeyError> {
    let s = s.trim();
    let s = s.strip_prefix("0x").unwrap_or(s);
    if s.len() != 64 {
        return Err(KeyError);
    }
    let bytes: B256 = s.parse().map_err(|_| KeyError)?;
    PrivateKeySigner::from_bytes(&bytes).map_err(|_| KeyError)
}

/// A private key failed to parse; deliberately carries no detail about the key.
#[derive(Debug, thiserror::Error)]
#[error("not a valid 32-byte hex private key")]
pub struct KeyError;

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::sol_types::SolStruct;

    #[test]
    fn base_domain_separators_match_the_reference_vectors() {
        // FiatToken's DOMAIN_SEPARATOR() on Base and Base Sepolia.
        let cases = [
            (NetworkPreset::Base, "0x02fa7265e7c5d81118673727957699e4d68f74cd74b7db77da710fe8a2c7834f"),
            (
                NetworkPreset::BaseSepolia,
                "0x71f17a3b2ff373b803d70a5a07c046c1a2bc8e89c09ef722fcb047abe94c9818",
            ),
        ];
        for (preset, expected) in cases {
            let config = NetworkConfig {
                preset,
                rpc_url: Default::default(),
                rpc_urls: vec![],
                chain_id: 1,
                asset: None,
                eip712_name: "ignored".into(),
                eip712_version: "ignored".into(),
                max_log_range: 1000,
            };
            let network = Network::from_config(&config).unwrap();
            assert_eq!(network.domain().separator().to_string(), expected, "{preset:?}");
        }
    }

    #[test]
    fn transfer_with_authorization_typehash_matches_fiat_token() {
        let typehash = usdc::TransferWithAuthorization::eip712_type_hash(&Default::default());
        assert_eq!(
            typehash.to_string(),
            "0x7c7c6cdb67a18743f49ec6fa9b35f50d52ed05cbed4cc592e13b44501c1a2267"
        );
    }

    #[test]
    fn private_keys_parse_with_or_without_prefix_and_errors_do_not_echo() {
        let key = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
        let a = parse_private_key(key).unwrap().address();
        let b = parse_private_key(&format!("0x{key}")).unwrap().address();
        assert_eq!(a, b);
        assert_eq!(a.to_string(), "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266");
        let err = parse_private_key("0xac0974").unwrap_err().to_string();
        assert!(!err.contains("ac0974"));
    }
}
