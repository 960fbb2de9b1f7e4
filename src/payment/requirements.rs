//! Price table → x402 `accepts`: one [`Quote`] per priced tool, built once at startup.
//!
//! Guarantees that a tool's `accepts` is byte-for-byte the same in every challenge, because
//! clients echo it verbatim and servers match by deep equality (the official clients pick an entry of `accepts` and send it back as `accepted`).

use alloy::primitives::Address;
use serde_json::{Map, Value, json};

use super::price::Pricing;
use super::wire::{
    Eip712Extra, META_PRICE, PaymentRequired, PaymentRequirements, ResourceInfo, X402_VERSION,
};
use crate::chain::Network;
use crate::money::{USDC_DECIMALS, UsdcAmount};

/// The one scheme tollgate sells with: EIP-3009 "exact" on EVM.
pub const SCHEME_EXACT: &str = "exact";

/// What a priced tool costs and how to pay for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Quote {
    pub tool: String,
    pub amount: UsdcAmount,
    pub requirements: PaymentRequirements,
    pub resource: ResourceInfo,
    /// The bazaar discovery extension, so marketplaces can catalogue the tool from a 402.
    /// Shared: a computed price copies the quote, not the tool's schema.
    bazaar: std::sync::Arc<Value>,
}

/// Where tollgate is paid: the settings shared by every quote.
#[derive(Debug, Clone)]
pub struct PayTerms {
    pub network: Network,
    pub pay_to: Address,
    pub max_timeout_seconds: u64,
}

impl Quote {
    pub fn new(
        terms: &PayTerms,
        tool: &str,
        description: &str,
        input_schema: &Map<String, Value>,
        amount: UsdcAmount,
    ) -> Quote {
        let requirements = PaymentRequirements {
            scheme: SCHEME_EXACT.to_owned(),
            network: terms.network.caip2.clone(),
            amount: amount.to_string(),
            asset: terms.network.asset.to_checksum(None),
            pay_to: terms.pay_to.to_checksum(None),
            max_timeout_seconds: terms.max_timeout_seconds,
            extra: Eip712Extra {
                name: terms.network.eip712_name.clone(),
                version: terms.network.eip712_version.clone(),
                offer: None,
            },
        };
        let resource = ResourceInfo {
            url: format!("mcp://tool/{tool}"),
            description: Some(description.to_owned()),
            mime_type: Some("application/json".to_owned()),
        };
        Quote {
            tool: tool.to_owned(),
            amount,
            requirements,
            resource,
            bazaar: std::sync::Arc::new(bazaar(tool, description, input_schema)),
        }
    }

    /// The same quote at another amount (a computed price, or an honoured offer).
    pub fn with_amount(&self, amount: UsdcAmount) -> Quote {
        let mut quote = self.clone();
        quote.amount = amount;
        quote.requirements.amount = amount.to_string();
        quote
    }

    /// The same quote carrying an offer token in `extra`, as a challenge shows it.
    pub fn with_offer(&self, offer: String) -> Quote {
        let mut quote = self.clone();
        quote.requirements.extra.offer = Some(offer);
        quote
    }

    /// The PaymentRequired answer with a given reason (`error`).
    pub fn payment_required(&self, error: impl Into<String>) -> PaymentRequired {
        let mut extensions = Map::new();
        extensions.insert("bazaar".to_owned(), Value::clone(&self.bazaar));
        PaymentRequired {
            x402_version: X402_VERSION,
            error: error.into(),
            message: None,
            resource: self.resource.clone(),
            accepts: vec![self.requirements.clone()],
            extensions,
        }
    }

    /// The `_meta` entry for `tools/list`: the price in atomic units (for a computed price,
    /// the least a call costs), asset and network, and `pricing`'s description (the charge
    /// policy; an expression and its bounds).
    pub fn price_meta(&self, pricing: &Pricing) -> (String, Value) {
        let r = &self.requirements;
        let mut value = json!({
            "amount": pricing.floor().to_string(),
            "decimals": USDC_DECIMALS,
            "asset": r.asset,
            "network": r.network,
            "payTo": r.pay_to,
            "scheme": r.scheme,
        });
        if let Value::Object(v) = &mut value {
            v.extend(pricing.describe());
        }
        (META_PRICE.to_owned(), value)
    }
}

/// The bazaar extension for an MCP tool (x402 bazaar extension, input type `mcp`).
fn bazaar(tool: &str, description: &str, input_schema: &Map<String, Value>) -> Value {
    json!({
        "info": {
            "input": {
                "type": "mcp",
                "tool": tool,
                "description": description,
                "inputSchema": input_schema,
                "transport": "streamable-http",
            }
        },
        "schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": {
                "input": {
                    "type": "object",
                    "properties": {
                        "type": { "const": "mcp" },
                        "tool": { "type": "string" },
                        "description": { "type": "string" },
                        "inputSchema": { "type": "object" },
                        "transport": { "enum": ["streamable-http", "sse"] }
                    },
                    "required": ["type", "tool", "inputSchema"]
                }
            },
            "required": ["input"]
        }
    })
}
