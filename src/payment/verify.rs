//! Local verification: everything about a payment that can be checked without the network.
//!
//! Guarantees, in this order (the x402 exact EVM scheme, specs/schemes/exact/scheme_exact_evm.md in the x402 repository): x402 v2; `accepted` equals this tool's
//! requirements; the EIP-712 TransferWithAuthorization signature recovers to
//! `authorization.from` (that address becomes the [`Payer`]), or else is left for the wallet at
//! `from` to vouch for (`wallet::prove`, which needs the chain); recipient is our payTo; the
//! validity window holds with a safety margin, and is no longer than the offer's
//! `maxTimeoutSeconds` (plus clock skew); the value is the price exactly.
//! Does NOT check: chain state (nonce unused, balance) — the settle stage does, after the claim.

use std::fmt;

use alloy::primitives::{Address, B256, Bytes, Signature, U256};
use alloy::sol_types::{Eip712Domain, SolStruct};
use serde_json::Value;

use super::decode::{DecodedPayment, PaymentInput, decode};
use super::error::PaymentError;
use super::requirements::Quote;
use super::wire::{Authorization, X402_VERSION};
use crate::chain::usdc::TransferWithAuthorization;

/// A wallet address proven by a signature. Limits, claims and receipts key on this only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Payer(Address);

impl Payer {
    pub fn address(self) -> Address {
        self.0
    }

    /// The store key form: lower-case hex, independent of checksum casing.
    pub fn key(self) -> String {
        format!("{:#x}", self.0)
    }
}

impl fmt::Display for Payer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.to_checksum(None))
    }
}

/// How the payer signed. Never logged.
#[derive(Debug, Clone)]
pub enum PayerSignature {
    /// A 65-byte ECDSA signature recovering to `from`: an EOA, proven locally.
    Eoa(Signature),
    /// Not provable without the chain (a smart wallet's): `payer` is only the claimed `from`
    /// until `wallet::prove` turns this into one of the variants below. Nothing keys limits on,
    /// claims or settles an unproven payment.
    Unproven(Unproven),
    /// A deployed smart wallet's signature: its `isValidSignature` said yes (ERC-1271).
    Contract(Bytes),
    /// An undeployed wallet's (ERC-6492): deployed through an allowed factory at settlement,
    /// then `inner` is its ERC-1271 signature; a simulation of both succeeded.
    Counterfactual { factory: Address, calldata: Bytes, inner: Bytes },
}

/// A signature only `from`'s contract (or its factory) can vouch for.
#[derive(Debug, Clone)]
pub struct Unproven {
    /// The signature itself (an ERC-6492 wrapper's inner signature).
    pub signature: Bytes,
    /// From an ERC-6492 wrapper: the factory and the calldata that deploy the wallet.
    pub deployment: Option<(Address, Bytes)>,
    /// The EIP-712 digest the wallet is asked about.
    pub digest: B256,
}

impl PayerSignature {
    pub fn is_proven(&self) -> bool {
        !matches!(self, PayerSignature::Unproven(_))
    }
}

/// A payment that passed every local check.
#[derive(Debug, Clone)]
pub struct VerifiedPayment {
    /// `authorization.from`, proven by its signature once `signature.is_proven()`.
    pub payer: Payer,
    pub authorization: TransferWithAuthorization,
    pub signature: PayerSignature,
    /// SHA-256 of the RFC 8785 canonical payload: tells a replay from a different payload.
    pub payload_hash: String,
    /// The x402 `payment-identifier` extension id, when the client sent one.
    pub payment_id: Option<String>,
    /// The canonical payload, stored so settlement can resume after a crash.
    pub payload_json: String,
    /// The payload as received, forwarded as-is to a facilitator.
    pub raw: Value,
}

impl VerifiedPayment {
    pub fn valid_before(&self) -> u64 {
        self.authorization.validBefore.saturating_to()
    }
}

/// Verifies a payment for `quote` at unix time `now`.
pub fn verify(
    input: &PaymentInput,
    quote: &Quote,
    domain: &Eip712Domain,
    now: u64,
    margin_secs: u64,
) -> Result<VerifiedPayment, PaymentError> {
    verify_decoded(decode(input)?, quote, domain, now, margin_secs)
}

/// As [`verify`], for a payment already decoded (whose `accepted` chose the quote).
pub fn verify_decoded(
    decoded: DecodedPayment,
    quote: &Quote,
    domain: &Eip712Domain,
    now: u64,
    margin_secs: u64,
) -> Result<VerifiedPayment, PaymentError> {
    let DecodedPayment { payload, raw } = decoded;
    if payload.x402_version != X402_VERSION {
        return Err(PaymentError::UnsupportedVersion(payload.x402_version));
    }
    assert_accepted_matches(&payload.accepted, quote)?;
    let authorization = parse_authorization(&payload.payload.authorization)?;
    let signature = classify_signature(&payload.payload.signature, &authorization, domain)?;
    let payer = Payer(authorization.from);
    let pay_to: Address = quote.requirements.pay_to.parse().expect("quote holds a valid payTo");
    if authorization.to != pay_to {
        return Err(PaymentError::RecipientMismatch);
    }
    assert_time_window(&authorization, now, margin_secs, quote.requirements.max_timeout_seconds)?;
    if authorization.value != U256::from(quote.amount.atomic()) {
        return Err(PaymentError::WrongAmount);
    }
    let payment_id = payment_identifier(payload.extensions.as_ref())?;
    let (payload_json, payload_hash) = canonical_payload(&raw)?;
    Ok(VerifiedPayment { payer, authorization, signature, payload_hash, payment_id, payload_json, raw })
}

/// The canonical (RFC 8785) payload and its SHA-256, hex: what tells a replay of the same
/// payment from another payload.
pub fn canonical_payload(raw: &Value) -> Result<(String, String), PaymentError> {
    let json = serde_json_canonicalizer::to_string(raw)
        .map_err(|e| PaymentError::Malformed(format!("cannot canonicalise payload: {e}")))?;
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(json.as_bytes()));
    Ok((json, hash))
}

/// `accepted` must be our requirements (deep equality, key order and address case aside).
fn assert_accepted_matches(accepted: &Value, quote: &Quote) -> Result<(), PaymentError> {
    let ours = serde_json::to_value(&quote.requirements).expect("requirements serialise");
    let mismatch = |field| Err(PaymentError::RequirementsMismatch { field });
    let Value::Object(theirs) = accepted else {
        return mismatch("scheme");
    };
    for field in ["scheme", "network", "asset", "payTo", "amount", "maxTimeoutSeconds"] {
        let same = match (theirs.get(field), ours.get(field)) {
            (Some(Value::String(a)), Some(Value::String(b))) if matches!(field, "asset" | "payTo") => {
                a.eq_ignore_ascii_case(b)
            }
            (a, b) => a == b,
        };
        if !same {
            return mismatch(field);
        }
    }
    // The EIP-712 domain must be ours; other `extra` keys (e.g. assetTransferMethod) are allowed.
    let extra = theirs.get("extra");
    for key in ["name", "version"] {
        if extra.and_then(|e| e.get(key)) != ours["extra"].get(key) {
            return mismatch("extra");
        }
    }
    Ok(())
}

fn parse_authorization(a: &Authorization) -> Result<TransferWithAuthorization, PaymentError> {
    let bad =
        |field: &str, what: &str| PaymentError::Malformed(format!("authorization.{field} is not {what}"));
    let address = |field, s: &str| s.parse::<Address>().map_err(|_| bad(field, "an address"));
    let uint = |field, s: &str| {
        if s.is_empty() || s.len() > 78 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad(field, "a decimal integer string"));
        }
        U256::from_str_radix(s, 10).map_err(|_| bad(field, "a uint256"))
    };
    let nonce = a
        .nonce
        .strip_prefix("0x")
        .filter(|h| h.len() == 64)
        .ok_or_else(|| bad("nonce", "32 bytes of 0x-hex"))?;
    Ok(TransferWithAuthorization {
        from: address("from", &a.from)?,
        to: address("to", &a.to)?,
        value: uint("value", &a.value)?,
        validAfter: uint("validAfter", &a.valid_after)?,
        validBefore: uint("validBefore", &a.valid_before)?,
        nonce: nonce.parse::<B256>().map_err(|_| bad("nonce", "32 bytes of 0x-hex"))?,
    })
}

/// Sorts the signature: an EOA's ECDSA signature of `from` is proven here; anything else (a
/// smart wallet's ERC-1271 signature, an ERC-6492 wrapper) needs the chain (`wallet::prove`).
fn classify_signature(
    s: &str,
    authorization: &TransferWithAuthorization,
    domain: &Eip712Domain,
) -> Result<PayerSignature, PaymentError> {
    let bytes = s
        .strip_prefix("0x")
        .and_then(|h| hex::decode(h).ok())
        .ok_or_else(|| PaymentError::Malformed("payload.signature is not 0x-hex".into()))?;
    if bytes.is_empty() {
        return Err(PaymentError::BadSignature);
    }
    // Smart-wallet signatures (WebAuthn, multi-owner, 6492-wrapped) run to a few hundred bytes;
    // anything longer is only load for the wallet calls that would check it.
    if bytes.len() > MAX_SIGNATURE_BYTES {
        return Err(PaymentError::Malformed(format!(
            "payload.signature exceeds {MAX_SIGNATURE_BYTES} bytes"
        )));
    }
    let digest = authorization.eip712_signing_hash(domain);
    if let Some(wrapped) = super::wallet::unwrap_6492(&bytes) {
        let w = wrapped?;
        let deployment = (!w.factory.is_zero() && !w.calldata.is_empty()).then_some((w.factory, w.calldata));
        return Ok(PayerSignature::Unproven(Unproven { signature: w.inner, deployment, digest }));
    }
    match recover_eoa(&bytes, &digest, authorization.from) {
        Some(signature) => Ok(PayerSignature::Eoa(signature)),
        None => Ok(PayerSignature::Unproven(Unproven { signature: bytes.into(), deployment: None, digest })),
    }
}

/// The longest signature accepted.
pub const MAX_SIGNATURE_BYTES: usize = 4096;

/// The signature, when it is a 65-byte ECDSA signature of `digest` by `from`. High-s
/// (malleable) signatures are refused, as USDC refuses them on chain.
pub fn recover_eoa(bytes: &[u8], digest: &B256, from: Address) -> Option<Signature> {
    let signature = Signature::from_raw(bytes).ok()?;
    if signature.normalize_s().is_some() {
        return None;
    }
    let recovered = signature.recover_address_from_prehash(digest).ok()?;
    (recovered == from).then_some(signature)
}

/// How far a payer's clock may run ahead of ours when it sets validBefore.
pub const VALIDITY_SKEW_SECS: u64 = 60;

fn assert_time_window(
    a: &TransferWithAuthorization,
    now: u64,
    margin_secs: u64,
    max_timeout_secs: u64,
) -> Result<(), PaymentError> {
    if a.validBefore < U256::from(now.saturating_add(margin_secs)) {
        return Err(PaymentError::Expired { margin_secs });
    }
    // The offer says how long an authorization may live; a longer one is not what we offered,
    // and would keep its payment unresolvable (and its log search running) for as long.
    let longest = max_timeout_secs.saturating_add(VALIDITY_SKEW_SECS);
    if a.validBefore > U256::from(now.saturating_add(longest)) {
        return Err(PaymentError::TooLong { max_secs: max_timeout_secs });
    }
    // The token requires block.timestamp > validAfter; a block mined now has timestamp ≥ now.
    if a.validAfter > U256::from(now) {
        return Err(PaymentError::NotYetValid);
    }
    Ok(())
}

/// The `payment-identifier` extension: `extensions["payment-identifier"].info.id`.
fn payment_identifier(extensions: Option<&Value>) -> Result<Option<String>, PaymentError> {
    let Some(id) = extensions.and_then(|e| e.pointer("/payment-identifier/info/id")) else {
        return Ok(None);
    };
    let id = id.as_str().ok_or(PaymentError::BadPaymentIdentifier)?;
    let valid = (16..=128).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(PaymentError::BadPaymentIdentifier);
    }
    Ok(Some(id.to_owned()))
}
