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
    /// This quote's first challenge as served, rendered once (`ChallengeTemplate`).
    challenge: TemplateSlot,
}

/// A first challenge's answer as JSON, cut around its offer token: the only part that differs
/// from one challenge of a quote to the next. Rendering the whole answer (a JSON tree, two
/// serialisations, one of them escaped) was most of a challenge's cost.
#[derive(Debug)]
pub struct ChallengeTemplate {
    /// The JSON before, between and after the two places the offer token appears.
    parts: [String; 3],
}

impl ChallengeTemplate {
    /// Cuts `json`, rendered with `placeholder` as the offer token, around its two occurrences
    /// (a token holds no character JSON escapes, so it reads the same escaped or not).
    pub fn cut(json: &str, placeholder: &str) -> Option<ChallengeTemplate> {
        let mut parts = json.split(placeholder).map(str::to_owned);
        let template = [parts.next()?, parts.next()?, parts.next()?];
        parts.next().is_none().then_some(ChallengeTemplate { parts: template })
    }

    /// The answer with `offer` in place.
    pub fn render(&self, offer: &str) -> String {
        let [a, b, c] = &self.parts;
        let mut json = String::with_capacity(a.len() + b.len() + c.len() + 2 * offer.len());
        for part in [a.as_str(), offer, b, offer, c] {
            json.push_str(part);
        }
        json
    }
}

/// Where a quote keeps its rendered challenge: shared by the quote's copies that carry offers,
/// emptied for a copy at another amount. Never part of a quote's identity.
#[derive(Debug, Clone, Default)]
struct TemplateSlot(std::sync::Arc<std::sync::OnceLock<Option<ChallengeTemplate>>>);

impl PartialEq for TemplateSlot {
    fn eq(&self, _: &TemplateSlot) -> bool {
        true
    }
}

/// Where tollgate is paid: the settings shared by every quote.
#[derive(Debug, Clone)]
pub struct PayTerms {
    pub network: Network,
    pub pay_to: Address,
    pub max_timeout_seconds: u64,
}

/// The terms unit tests quote under: a local chain, a made-up token and payee.
#[cfg(test)]
pub(crate) fn test_terms() -> PayTerms {
    let network = Network {
        caip2: "eip155:31337".into(),
        chain_id: 31337,
        asset: Address::repeat_byte(0xaa),
        eip712_name: "USD Coin".into(),
        eip712_version: "2".into(),
    };
    PayTerms { network, pay_to: Address::repeat_byte(0xbb), max_timeout_seconds: 300 }
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
            challenge: TemplateSlot::default(),
        }
    }

    /// This quote's challenge template, rendered by `render` on first use (`None` when the
    /// rendering could not be cut: the caller renders in full).
    pub fn challenge_template(
        &self,
        render: impl FnOnce(&Quote) -> Option<ChallengeTemplate>,
    ) -> Option<&ChallengeTemplate> {
        self.challenge.0.get_or_init(|| render(self)).as_ref()
    }

    /// The same quote at another amount (a computed price, or an honoured offer).
    pub fn with_amount(&self, amount: UsdcAmount) -> Quote {
        let mut quote = self.clone();
        quote.amount = amount;
        quote.requirements.amount = amount.to_string();
        quote.challenge = TemplateSlot::default();
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
