//! `tollgate listing`: what an operator submits to marketplaces — the MCP registry
//! `server.json` and the x402 discovery (bazaar) entry — generated from the live catalog.

use ed25519_dalek::VerifyingKey;
use serde_json::{Value, json};

use crate::chain::Network;
use crate::config::Config;
use crate::state::AppState;
use crate::tools::catalog::Catalog;

/// What a listing is made of: public configuration only (no relayer key, no receipt seed,
/// no store, no chain), so `tollgate listing` runs wherever the config file is.
pub struct ListingInput<'a> {
    pub config: &'a Config,
    pub network: &'a Network,
    pub catalog: &'a Catalog,
    /// The receipt keys (id, public key) receipts are checked against.
    pub receipt_keys: Vec<(String, VerifyingKey)>,
}

impl<'a> ListingInput<'a> {
    pub fn of(app: &'a AppState, catalog: &'a Catalog) -> ListingInput<'a> {
        ListingInput {
            config: &app.config,
            network: &app.network,
            catalog,
            receipt_keys: app.receipts.signer.published().to_vec(),
        }
    }
}

/// The MCP registry schema the `server.json` follows.
pub const SERVER_SCHEMA: &str =
    "https://static.modelcontextprotocol.io/schemas/2025-09-29/server.schema.json";

/// Both documents, keyed by what they are.
pub fn documents(app: &ListingInput<'_>, now_unix: u64) -> Value {
    let public_url = &app.config.server.public_url;
    let base = public_url.strip_suffix("/mcp").unwrap_or(public_url);
    let catalog = app.catalog;
    let keys: Vec<Value> =
        app.receipt_keys.iter().map(|(kid, key)| crate::receipt::keys::published_json(kid, key)).collect();
    let priced: Vec<_> = catalog.entries().filter_map(|e| e.quote.as_ref()).collect();
    let tools: Vec<Value> = catalog
        .entries()
        .map(|e| {
            let price = e.price_meta();
            json!({ "name": e.tool.name, "description": e.tool.description, "price": price })
        })
        .collect();
    let server_json = json!({
        "$schema": SERVER_SCHEMA,
        "name": app.config.server.listing_name,
        "description": app.config.server.listing_description,
        "version": env!("CARGO_PKG_VERSION"),
        "remotes": [{ "type": "streamable-http", "url": public_url }],
        "_meta": {
            "io.modelcontextprotocol.registry/publisher-provided": {
                "x402": {
                    "x402Version": 2,
                    "network": app.network.caip2,
                    "asset": app.network.asset.to_checksum(None),
                    "payTo": app.config.payment.pay_to.map(|a| a.to_checksum(None)),
                    "tools": tools,
                    "receiptKeys": keys,
                    "wellKnown": format!("{base}/.well-known/x402"),
                }
            }
        }
    });
    let discovery = json!({
        "resource": public_url,
        "type": "mcp",
        "x402Version": 2,
        "accepts": priced.iter().map(|q| &q.requirements).collect::<Vec<_>>(),
        "lastUpdated": now_unix,
        "metadata": {
            "tools": priced.iter().map(|q| q.payment_required("").extensions["bazaar"].clone()).collect::<Vec<_>>(),
        },
    });
    json!({ "server.json": server_json, "x402_discovery": discovery })
}
