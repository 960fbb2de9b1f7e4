//! x402 v2 wire types (x402 v2 specification §5), as tollgate emits and accepts them.
//!
//! Emitted types have a fixed field order so their JSON is byte-stable between a challenge and
//! the paid retry. Accepted types are lenient: unknown fields are ignored and optional fields
//! may be `null`, as other implementations send them.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The protocol version tollgate speaks on MCP.
pub const X402_VERSION: u64 = 2;

/// `_meta` key carrying the client's payment on `tools/call`.
pub const META_PAYMENT: &str = "x402/payment";
/// `_meta` key carrying the settlement response on a paid result.
pub const META_PAYMENT_RESPONSE: &str = "x402/payment-response";
/// `_meta` key on a tool in `tools/list` carrying its price.
pub const META_PRICE: &str = "x402/price";

/// One way to pay: what a client signs and echoes back as `accepted`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequirements {
    pub scheme: String,
    /// CAIP-2, e.g. `eip155:8453`.
    pub network: String,
    /// Atomic units, decimal string.
    pub amount: String,
    /// Token contract, checksummed.
    pub asset: String,
    /// Recipient, checksummed.
    pub pay_to: String,
    pub max_timeout_seconds: u64,
    /// EIP-712 domain `{name, version}` of the token; clients refuse to sign without it.
    pub extra: Eip712Extra,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eip712Extra {
    pub name: String,
    pub version: String,
    /// tollgate's offer (`payment::offer`): lets a price change honour this challenge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offer: Option<String>,
}

/// What the payment is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceInfo {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mime_type: Option<String>,
}

/// The 402 body, carried as an MCP tool result's `structuredContent`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentRequired {
    pub x402_version: u64,
    /// The x402 reason code (or the first-challenge text).
    pub error: String,
    /// A readable explanation of `error`, on re-challenges only. Clients ignore unknown fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub resource: ResourceInfo,
    pub accepts: Vec<PaymentRequirements>,
    pub extensions: serde_json::Map<String, Value>,
}

/// The client's payment (x402 v2 specification §5.2), decoded leniently.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentPayload {
    pub x402_version: u64,
    #[serde(default)]
    pub resource: Option<Value>,
    /// Kept as raw JSON: it is compared with our requirements by value, not by type.
    pub accepted: Value,
    pub payload: ExactEvmPayload,
    #[serde(default)]
    pub extensions: Option<Value>,
}

/// The "exact" EVM scheme payload: an EIP-3009 authorization and its signature.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ExactEvmPayload {
    pub signature: String,
    pub authorization: Authorization,
}

/// EIP-3009 authorization fields; every integer is a decimal string on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    pub from: String,
    pub to: String,
    pub value: String,
    pub valid_after: String,
    pub valid_before: String,
    pub nonce: String,
}

/// The settlement response (`_meta["x402/payment-response"]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SettlementResponse {
    pub success: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_reason: Option<String>,
    #[serde(default)]
    pub transaction: String,
    #[serde(default)]
    pub network: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payer: Option<String>,
}
