//! Smart-wallet payers (ERC-1271 and ERC-6492): proving that `authorization.from` signed
//! when `from` is a contract, or a contract about to be deployed. Rules as the official x402
//! SDKs apply them (`@x402/evm` `verifySignature.ts` and `exact/facilitator/eip3009.ts`; the
//! Python `x402` `mechanisms/evm/verify.py`):
//! - code at `from` (a deployed wallet, or an ERC-7702-delegated EOA): `isValidSignature(digest,
//!   signature)` must return `0x1626ba7e`; there is no ECDSA fallback;
//! - no code, and an ERC-6492 wrapper with deployment info: the factory must be one the operator
//!   allows (`payment.eip6492_allowed_factories`), and deploying the wallet then transferring
//!   with the inner signature must succeed in one simulated Multicall3 call;
//! - no code otherwise: only a 65-byte ECDSA signature recovering to `from` counts.
//!
//! An EOA's own ECDSA signature is proven locally (`verify`) and never comes here: this stage
//! costs RPC, so it runs only for signatures that cannot be proven without the chain, inside the
//! client's failed-attempt budget like every other payment failure. Should `from` be a delegated
//! EOA after all, the token's own check (FiatToken v2.2 `SignatureChecker`, ERC-1271 whenever
//! there is code) refuses the transfer in settlement's simulation, before anything moves.

use alloy::primitives::{Address, Bytes};
use alloy::sol_types::{SolCall, SolValue};

use super::error::PaymentError;
use super::verify::{PayerSignature, Unproven, VerifiedPayment, recover_eoa};
use crate::chain::client::{Chain, ChainError};
use crate::chain::usdc::Usdc;
use crate::chain::wallets::Deployment;

/// The 32-byte suffix that marks an ERC-6492 signature.
pub const ERC6492_MAGIC: [u8; 32] = [
    0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64,
    0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92, 0x64, 0x92,
];

/// An ERC-6492 wrapper: `abi.encode(factory, factoryCalldata, signature) ++ magic`.
pub struct Wrapped {
    pub factory: Address,
    pub calldata: Bytes,
    pub inner: Bytes,
}

/// Unwraps an ERC-6492 signature; `None` when `signature` is not one.
pub fn unwrap_6492(signature: &[u8]) -> Option<Result<Wrapped, PaymentError>> {
    let body = signature.strip_suffix(ERC6492_MAGIC.as_slice())?;
    let decoded = <(Address, Bytes, Bytes)>::abi_decode_params(body)
        .map_err(|_| PaymentError::Malformed("payload.signature is a malformed ERC-6492 wrapper".into()));
    Some(decoded.map(|(factory, calldata, inner)| Wrapped { factory, calldata, inner }))
}

/// Proves who signed an [`Unproven`] payment, asking `from`'s contract (or its factory). On
/// success the payment's payer is `from`, proven by the contract's answer.
pub async fn prove(
    chain: &dyn Chain,
    allowed_factories: &[Address],
    mut payment: VerifiedPayment,
) -> Result<VerifiedPayment, PaymentError> {
    let PayerSignature::Unproven(Unproven { signature, deployment, digest }) = &payment.signature else {
        return Ok(payment);
    };
    let from = payment.authorization.from;
    let unavailable = |_: ChainError| PaymentError::ChainUnavailable;
    let proven = if chain.has_code(from).await.map_err(unavailable)? {
        // Deployed (or delegated): the wallet alone decides, whatever the wrapper says.
        match chain.erc1271_valid(from, *digest, signature.clone()).await.map_err(unavailable)? {
            true => PayerSignature::Contract(signature.clone()),
            false => return Err(PaymentError::BadSignature),
        }
    } else if let Some((factory, calldata)) = deployment {
        if !allowed_factories.contains(factory) {
            return Err(PaymentError::FactoryNotAllowed);
        }
        let deploy = Deployment {
            factory: *factory,
            calldata: calldata.clone(),
            wallet: from,
            digest: *digest,
            signature: signature.clone(),
            transfer: transfer_call(&payment, signature.clone()),
        };
        let outcome = chain.simulate_deployed_transfer(&deploy).await;
        if let Some(reason) = outcome.map_err(unavailable)? {
            return Err(simulation_refusal(&reason));
        }
        PayerSignature::Counterfactual {
            factory: *factory,
            calldata: calldata.clone(),
            inner: signature.clone(),
        }
    } else {
        // No code and nothing to deploy: an EOA, whose signature did not recover to it.
        match recover_eoa(signature, digest, from) {
            Some(eoa) => PayerSignature::Eoa(eoa),
            None => return Err(PaymentError::BadSignature),
        }
    };
    payment.signature = proven;
    Ok(payment)
}

/// Simulates this payment's `transferWithAuthorization` now (`eth_call`): `Ok` when the token
/// would accept it, else the refusal its revert names. An undeployed wallet's payment was
/// simulated with its deployment by [`prove`] in this very request, so it is not asked again.
pub async fn simulate(chain: &dyn Chain, payment: &VerifiedPayment) -> Result<(), PaymentError> {
    // The very call the self-relay settler sends.
    let call = match &payment.signature {
        PayerSignature::Eoa(sig) => eoa_transfer_call(payment, sig),
        PayerSignature::Contract(signature) => transfer_call(payment, signature.clone()),
        PayerSignature::Counterfactual { .. } => return Ok(()),
        PayerSignature::Unproven(_) => return Err(PaymentError::BadSignature),
    };
    match chain.simulate_token_call(call).await {
        Ok(None) => Ok(()),
        Ok(Some(reason)) => Err(match simulation_refusal(&reason) {
            PaymentError::SettlementFailed { .. } => PaymentError::SimulationFailed { reason },
            refusal => refusal,
        }),
        Err(_) => Err(PaymentError::ChainUnavailable),
    }
}

/// `transferWithAuthorization(…, v, r, s)`: an EOA's payment, as every FiatToken version takes it.
pub fn eoa_transfer_call(payment: &VerifiedPayment, sig: &alloy::primitives::Signature) -> Bytes {
    let a = &payment.authorization;
    Usdc::transferWithAuthorization_1Call {
        from: a.from,
        to: a.to,
        value: a.value,
        validAfter: a.validAfter,
        validBefore: a.validBefore,
        nonce: a.nonce,
        v: 27 + u8::from(sig.v()),
        r: sig.r().into(),
        s: sig.s().into(),
    }
    .abi_encode()
    .into()
}

/// `transferWithAuthorization(…, bytes signature)`: the overload FiatToken v2.2 checks with
/// ERC-1271 when `from` has code.
pub fn transfer_call(payment: &VerifiedPayment, signature: Bytes) -> Bytes {
    let a = &payment.authorization;
    Usdc::transferWithAuthorization_0Call {
        from: a.from,
        to: a.to,
        value: a.value,
        validAfter: a.validAfter,
        validBefore: a.validBefore,
        nonce: a.nonce,
        signature,
    }
    .abi_encode()
    .into()
}

/// A simulated transfer's revert, as a payment refusal (FiatToken's revert strings).
fn simulation_refusal(reason: &str) -> PaymentError {
    token_refusal(reason).unwrap_or_else(|| PaymentError::SettlementFailed {
        reason: "invalid_exact_evm_transaction_simulation_failed".into(),
    })
}

/// The refusal a FiatToken revert string names, if it is one of the token's own: anything else
/// (no reason, out of gas) says nothing certain about the payment itself. The one reading of
/// the token's reasons, for simulations, gas estimations and batches alike.
pub(crate) fn token_refusal(reason: &str) -> Option<PaymentError> {
    let reason = reason.to_ascii_lowercase();
    Some(if reason.contains("authorization is used") {
        PaymentError::NonceReused
    } else if reason.contains("invalid signature") {
        PaymentError::BadSignature
    } else if reason.contains("exceeds balance") {
        PaymentError::InsufficientBalance
    } else if reason.contains("authorization is expired") {
        PaymentError::Expired { margin_secs: 0 }
    } else if reason.contains("not yet valid") {
        PaymentError::NotYetValid
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_erc6492_wrapper_unwraps_to_its_parts_and_anything_else_is_not_one() {
        let factory = Address::repeat_byte(0xfa);
        let (calldata, inner) = (Bytes::from(vec![1, 2, 3]), Bytes::from(vec![9; 65]));
        let mut wrapped = (factory, calldata.clone(), inner.clone()).abi_encode_params();
        wrapped.extend_from_slice(&ERC6492_MAGIC);
        let w = unwrap_6492(&wrapped).unwrap().unwrap();
        assert_eq!((w.factory, w.calldata, w.inner), (factory, calldata, inner));
        assert!(unwrap_6492(&[7; 65]).is_none());
        let mut garbage = vec![1; 40];
        garbage.extend_from_slice(&ERC6492_MAGIC);
        assert!(matches!(unwrap_6492(&garbage), Some(Err(PaymentError::Malformed(_)))));
    }
}
