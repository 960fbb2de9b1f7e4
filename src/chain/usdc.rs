//! Typed bindings to USDC, generated from the ABI files in `contracts-abi/`.
//!
//! `Usdc` is the FiatToken v2.2 subset tollgate calls in production; `TestUsdc` adds the
//! constructor and `mint` of the local test token. `TransferWithAuthorization` is the EIP-712
//! struct every x402 "exact" EVM payment signs.

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, Bytes, U256};
use alloy::providers::Provider;
use alloy::rpc::types::TransactionRequest;
use alloy::sol;
use alloy::sol_types::SolConstructor;

pub use bindings::{TestUsdc, Usdc};

// EIP-3009 functions take 7–9 arguments; the generated Rust mirrors the ABI.
#[allow(clippy::too_many_arguments)]
mod bindings {
    alloy::sol!(
        #[sol(rpc)]
        #[derive(Debug)]
        Usdc,
        "contracts-abi/usdc.abi.json"
    );

    alloy::sol!(
        #[sol(rpc)]
        #[derive(Debug)]
        TestUsdc,
        "contracts-abi/TestUSDC.abi.json"
    );
}

sol! {
    /// EIP-3009 `TransferWithAuthorization`, field for field as FiatToken hashes it.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct TransferWithAuthorization {
        address from;
        address to;
        uint256 value;
        uint256 validAfter;
        uint256 validBefore;
        bytes32 nonce;
    }
}

/// The token's `Transfer` events in a mined transaction, in log order (logs of other
/// contracts are skipped, so a look-alike event elsewhere never counts).
pub fn transfers_in(
    receipt: &alloy::rpc::types::TransactionReceipt,
    token: alloy::primitives::Address,
) -> impl Iterator<Item = Usdc::Transfer> + '_ {
    use alloy::sol_types::SolEvent;
    receipt
        .inner
        .logs()
        .iter()
        .filter(move |l| l.address() == token)
        .filter_map(|l| Usdc::Transfer::decode_log(&l.inner).ok().map(|t| t.data))
}

/// Creation bytecode of `contracts-abi/TestUSDC.sol`, rebuilt by `scripts/build-token.sh`.
const TEST_USDC_BIN: &str = include_str!("../../contracts-abi/TestUSDC.bin");

/// Deploys the test token with the given EIP-712 domain name/version; returns its address.
pub async fn deploy_test_usdc<P: Provider>(
    provider: &P,
    name: &str,
    version: &str,
) -> anyhow::Result<Address> {
    let mut code = hex::decode(TEST_USDC_BIN.trim())?;
    code.extend(
        TestUsdc::constructorCall { name_: name.to_owned(), version_: version.to_owned() }.abi_encode(),
    );
    let tx = TransactionRequest::default().with_deploy_code(Bytes::from(code));
    let receipt = provider.send_transaction(tx).await?.get_receipt().await?;
    anyhow::ensure!(receipt.status(), "TestUSDC deployment reverted");
    receipt.contract_address.ok_or_else(|| anyhow::anyhow!("deployment receipt has no contract address"))
}

/// Mints test USDC (only the deployer may) and waits for inclusion.
pub async fn mint<P: Provider>(
    provider: &P,
    token: Address,
    to: Address,
    amount: U256,
) -> anyhow::Result<()> {
    let receipt = TestUsdc::new(token, provider).mint(to, amount).send().await?.get_receipt().await?;
    anyhow::ensure!(receipt.status(), "mint reverted");
    Ok(())
}
