//! Smart-contract wallets on chain: whether an address holds code, what its ERC-1271
//! `isValidSignature` says, and a simulated deploy-then-transfer for a wallet not deployed yet
//! (one `eth_call` to Multicall3, as the official x402 facilitators simulate it).

use alloy::primitives::{Address, B256, Bytes, address};
use alloy::providers::Provider;
use alloy::rpc::types::TransactionRequest;
use alloy::sol_types::SolCall;
use alloy::transports::RpcError;

use super::client::{ChainClient, ChainError};

/// The ERC-1271 answer for a valid signature: `isValidSignature`'s selector.
pub const ERC1271_MAGIC: [u8; 4] = [0x16, 0x26, 0xba, 0x7e];

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

    /// Whether the wallet at `wallet` accepts `signature` for `digest` (ERC-1271). A revert or
    /// any answer but the magic word is a no; a node that cannot answer is not.
    pub async fn erc1271_valid(
        &self,
        wallet: Address,
        digest: B256,
        signature: Bytes,
    ) -> Result<bool, ChainError> {
        let input = IERC1271::isValidSignatureCall { hash: digest, signature }.abi_encode();
        let call = TransactionRequest::default().to(wallet).input(input.into()).gas_limit(WALLET_CALL_GAS);
        match self.provider().call(call).await {
            Ok(answer) => Ok(vouches(&answer)),
            Err(RpcError::ErrorResp(e)) if is_revert(e.code, &e.message) => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// A simulated call of the token (`eth_call`, gas-capped): `None` when it would succeed,
    /// else the revert's message. A node that cannot answer is an error, not a refusal.
    pub async fn simulate_token_call(&self, input: Bytes) -> Result<Option<String>, ChainError> {
        let call =
            TransactionRequest::default().to(self.asset()).input(input.into()).gas_limit(WALLET_CALL_GAS);
        match self.provider().call(call).await {
            Ok(_) => Ok(None),
            Err(RpcError::ErrorResp(e)) if is_revert(e.code, &e.message) => Ok(Some(e.message.to_string())),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Simulates, in one Multicall3 `eth_call`, the deployment `factory.call(calldata)`, then
    /// `wallet.isValidSignature(digest, signature)`, then the token call `transfer`: `None` when
    /// the factory put a wallet at `wallet` that vouches for the signature and the transfer
    /// would succeed; else why not. (Checking the wallet itself matters: a factory call that
    /// deploys some other contract leaves `wallet` empty, and a call to an empty address
    /// "succeeds" with no answer.)
    pub async fn simulate_deployed_transfer(
        &self,
        deploy: &Deployment,
    ) -> Result<Option<String>, ChainError> {
        let check =
            IERC1271::isValidSignatureCall { hash: deploy.digest, signature: deploy.signature.clone() };
        let calls = vec![
            Multicall3::Call3 {
                target: deploy.factory,
                allowFailure: true,
                callData: deploy.calldata.clone(),
            },
            Multicall3::Call3 {
                target: deploy.wallet,
                allowFailure: true,
                callData: check.abi_encode().into(),
            },
            Multicall3::Call3 { target: self.asset(), allowFailure: true, callData: deploy.transfer.clone() },
        ];
        let multicall = Multicall3::new(MULTICALL3, self.provider());
        let results = match multicall.aggregate3(calls).gas(SIMULATION_GAS).call().await {
            Ok(results) => results,
            Err(alloy::contract::Error::TransportError(RpcError::ErrorResp(e)))
                if is_revert(e.code, &e.message) =>
            {
                return Ok(Some(e.message.to_string()));
            }
            Err(alloy::contract::Error::TransportError(e)) => return Err(unavailable(e)),
            Err(e) => return Ok(Some(e.to_string())),
        };
        match (results.get(1), results.get(2)) {
            (Some(vouched), _) if !(vouched.success && vouches(&vouched.returnData)) => {
                Ok(Some("invalid signature: the deployed wallet does not vouch for it".into()))
            }
            (_, Some(transfer)) if transfer.success => Ok(None),
            (_, Some(transfer)) => Ok(Some(revert_reason(&transfer.returnData))),
            _ => Ok(Some("no answer from the simulation".into())),
        }
    }
}

/// An undeployed wallet's payment, as the simulation needs it.
pub struct Deployment {
    pub factory: Address,
    pub calldata: Bytes,
    pub wallet: Address,
    pub digest: B256,
    pub signature: Bytes,
    /// The token call `transferWithAuthorization(…, bytes signature)`.
    pub transfer: Bytes,
}

/// Gas for one `isValidSignature` call into a wallet (arbitrary code: bounded), and for the
/// whole deploy-check-transfer simulation.
const WALLET_CALL_GAS: u64 = 2_000_000;
const SIMULATION_GAS: u64 = 5_000_000;

/// An ERC-1271 yes: the first ABI word is exactly `bytes32(0x1626ba7e)`, as FiatToken v2.2's
/// `SignatureChecker` decodes it (the magic, then 28 zero bytes).
fn vouches(answer: &[u8]) -> bool {
    answer.len() >= 32 && answer[..4] == ERC1271_MAGIC && answer[4..32].iter().all(|b| *b == 0)
}

/// Whether a node's error answer is the call's own revert (execution), not the node's trouble.
/// Running out of the gas we capped a wallet call with is the wallet's doing: a no too.
pub(crate) fn is_revert(code: i64, message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    code == 3 || message.contains("revert") || message.contains("out of gas")
}

/// A revert's `Error(string)` message, or a placeholder.
fn revert_reason(data: &[u8]) -> String {
    alloy::sol_types::decode_revert_reason(data).unwrap_or_else(|| "reverted".to_owned())
}

fn unavailable(e: impl std::fmt::Display) -> ChainError {
    ChainError::Unavailable(crate::redact::urls(&e.to_string()))
}
