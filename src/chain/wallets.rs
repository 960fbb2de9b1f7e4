//! Smart-contract wallets on chain: whether an address holds code, what its ERC-1271
//! `isValidSignature` says, and a simulated deploy-then-transfer for a wallet not deployed yet
//! (one `eth_call` to Multicall3, as the official x402 facilitators simulate it).

use alloy::primitives::{Address, B256, Bytes, address};
use alloy::providers::Provider;
use alloy::sol_types::SolCall;
use alloy::transports::RpcError;

use super::client::{ChainClient, ChainError};

/// Multicall3's address on Base, Base Sepolia and most EVM chains (CREATE2-deterministic);
/// `tollgate dev` places the same contract there on anvil.
pub const MULTICALL3: Address = address!("cA11bde05977b3631167028862bE2a173976CA11");

alloy::sol! {
    interface IERC1271 {
        function isValidSignature(bytes32 hash, bytes signature) external view returns (bytes4 magicValue);
    }
}

mod bindings {
    alloy::sol!(
        #[sol(rpc)]
        Multicall3,
        "contracts-abi/Multicall3.abi.json"
    );
}
pub use bindings::Multicall3;

impl ChainClient {
    pub async fn has_code(&self, who: Address) -> Result<bool, ChainError> {
        let code = self.provider().get_code_at(who).await.map_err(unavailable)?;
        Ok(!code.is_empty())
    }

    /// Whether the wallet at `wallet` accepts `signature` for `digest` (ERC-1271). A revert, an
    /// empty or short answer, or any other value is a no.
    pub async fn erc1271_valid(
        &self,
        wallet: Address,
        digest: B256,
        signature: Bytes,
    ) -> Result<bool, ChainError> {
        let input = IERC1271::isValidSignatureCall { hash: digest, signature }.abi_encode();
        let call = alloy::rpc::types::TransactionRequest::default().to(wallet).input(input.into());
        match self.provider().call(call).await {
            Ok(answer) => Ok(answer.len() >= 4 && answer[..4] == crate::payment::wallet::ERC1271_MAGIC),
            Err(RpcError::ErrorResp(_)) => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Simulates `factory.call(calldata)` then the token call `transfer` in one Multicall3
    /// `eth_call`: `None` when the transfer would succeed, else its revert reason.
    pub async fn simulate_deployed_transfer(
        &self,
        factory: Address,
        calldata: Bytes,
        transfer: Bytes,
    ) -> Result<Option<String>, ChainError> {
        let calls = vec![
            Multicall3::Call3 { target: factory, allowFailure: true, callData: calldata },
            Multicall3::Call3 { target: self.asset(), allowFailure: true, callData: transfer },
        ];
        let multicall = Multicall3::new(MULTICALL3, self.provider());
        let results = match multicall.aggregate3(calls).call().await {
            Ok(results) => results,
            Err(alloy::contract::Error::TransportError(RpcError::ErrorResp(e))) => {
                return Ok(Some(e.message.to_string()));
            }
            Err(alloy::contract::Error::TransportError(e)) => return Err(unavailable(e)),
            Err(e) => return Ok(Some(e.to_string())),
        };
        match results.get(1) {
            Some(r) if r.success => Ok(None),
            Some(r) => Ok(Some(revert_reason(&r.returnData))),
            None => Ok(Some("no answer from the simulation".into())),
        }
    }
}

/// A revert's `Error(string)` message, or a placeholder.
fn revert_reason(data: &[u8]) -> String {
    alloy::sol_types::decode_revert_reason(data).unwrap_or_else(|| "reverted".to_owned())
}

fn unavailable(e: impl std::fmt::Display) -> ChainError {
    ChainError::Unavailable(crate::redact::urls(&e.to_string()))
}
