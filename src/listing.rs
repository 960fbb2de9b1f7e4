//! `tollgate listing`: what an operator submits to marketplaces — the MCP registry
//! `server.json` and the x402 discovery (bazaar) entry — generated from the live catalog.

use serde_json::{Value, json};

use crate::state::AppState;

/// The MCP registry schema the `server.json` follows.
pub const SERVER_SCHEMA: &str =
    "https://static.modelcontextprotocol.io/schemas/2025-09-29/server.schema.json";

/// Both documents, keyed by what they are.
pub fn documents(app: &AppState, now_unix: u64) -> Value {
    let public_url = &app.config.server.public_url;
    let base = public_url.strip_suffix("/mcp").unwrap_or(public_url);
    let catalog = app.catalog.current();
    let priced: Vec<_> = catalog.entries().filter_map(|e| e.quote.as_ref()).collect();
    let tools: Vec<Value> = catalog
        .entries()
        .map(|e| {
            let price = e.quote.as_ref().map(|q| q.price_meta().1);
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
