//! The MCP surface before any payment: tools/list prices, challenges, free tools, bad input.

use serde_json::{Value, json};

use tollgate::clock::Clock;
use tollgate::config::PriceSetting;
use tollgate::money::UsdcAmount;

use crate::helpers::{Mcp, spawn_app, spawn_app_with};

#[tokio::test]
async fn tools_list_shows_each_priced_tools_price_in_meta() {
    // Arrange
    let app = spawn_app().await;
    let network = format!("eip155:{}", tollgate::dev::ANVIL_CHAIN_ID);
    let asset = app.chain.token.to_checksum(None);
    // Act
    let tools = app.sessionless().list_tools().await;
    // Assert
    let by_name = |n: &str| tools.iter().find(|t| t["name"] == n).unwrap_or_else(|| panic!("{n} listed"));
    for (name, amount) in [("sha256", "1000"), ("quote_of_the_day", "2500")] {
        let price = &by_name(name)["_meta"]["x402/price"];
        assert_eq!(price["amount"], amount, "{name} amount");
        assert_eq!(price["asset"], asset.as_str(), "{name} asset");
        assert_eq!(price["network"], network.as_str(), "{name} network");
        assert_eq!(price["decimals"], 6, "{name} decimals");
        assert!(by_name(name)["inputSchema"]["type"] == "object", "{name} has an input schema");
    }
    assert!(by_name("echo").get("_meta").is_none(), "free tool carries no price");
    app.shutdown().await;
}

#[tokio::test]
async fn unpaid_priced_call_returns_the_x402_challenge() {
    // Arrange
    let app = spawn_app().await;
    let mcp = app.sessionless();
    // Act
    let result = mcp.call_tool("sha256", json!({ "text": "hello" }), None).await;
    // The same call again: its offer is bound to these arguments (and to the second it was made).
    let again = mcp.call_tool("sha256", json!({ "text": "hello" }), None).await;
    // Assert: the x402 v2 MCP transport shape, every field.
    assert_eq!(result["isError"], true);
    let challenge = &result["structuredContent"];
    let text = result["content"][0]["text"].as_str().expect("text copy");
    assert_eq!(result["content"][0]["type"], "text");
    assert_eq!(&serde_json::from_str::<Value>(text).unwrap(), challenge, "text is the same JSON");
    assert_eq!(challenge["x402Version"], 2);
    assert_eq!(challenge["error"], "Payment required to access this resource");
    assert_eq!(challenge["resource"]["url"], "mcp://tool/sha256");
    assert_eq!(challenge["resource"]["mimeType"], "application/json");
    let accepts = challenge["accepts"].as_array().expect("accepts");
    assert_eq!(accepts.len(), 1);
    let a = &accepts[0];
    assert_eq!(a["scheme"], "exact");
    assert_eq!(a["network"], format!("eip155:{}", tollgate::dev::ANVIL_CHAIN_ID));
    assert_eq!(a["amount"], "1000");
    assert_eq!(a["asset"], app.chain.token.to_checksum(None));
    assert_eq!(a["payTo"], app.chain.pay_to.to_checksum(None));
    assert_eq!(a["maxTimeoutSeconds"], 300);
    assert_eq!((&a["extra"]["name"], &a["extra"]["version"]), (&json!("USD Coin"), &json!("2")));
    // The offer: what a price change must still honour, bound to this call and valid as long
    // as an authorization for it may live.
    let offer = a["extra"]["offer"].as_str().expect("an offer");
    let expires: u64 = offer.split('.').next().unwrap().parse().unwrap();
    assert_eq!(expires, app.clock.now_unix() + 300);
    let bazaar = &challenge["extensions"]["bazaar"]["info"]["input"];
    assert_eq!(bazaar["type"], "mcp");
    assert_eq!(bazaar["tool"], "sha256");
    assert_eq!(bazaar["inputSchema"]["required"], json!(["text"]));
    // Byte-stable: the accepts of a second challenge serialise identically.
    let first = serde_json::to_string(&challenge["accepts"]).unwrap();
    let second = serde_json::to_string(&again["structuredContent"]["accepts"]).unwrap();
    assert_eq!(first, second);
    let raw_first = text.split("\"accepts\":").nth(1).unwrap().split("],").next().unwrap();
    let again_text = again["content"][0]["text"].as_str().unwrap();
    let raw_second = again_text.split("\"accepts\":").nth(1).unwrap().split("],").next().unwrap();
    assert_eq!(raw_first, raw_second, "accepts bytes differ between challenges");
    app.shutdown().await;
}

#[tokio::test]
async fn challenge_carries_the_configured_eip712_domain() {
    let app = spawn_app_with(|c| {
        c.network.eip712_name = "USDC".into();
        c.tools.prices.insert("echo".into(), PriceSetting::Fixed(UsdcAmount::from_atomic(7)));
    })
    .await;
    let result = app.sessionless().call_tool("echo", json!({ "text": "hi" }), None).await;
    let a = &result["structuredContent"]["accepts"][0];
    assert_eq!((&a["extra"]["name"], &a["extra"]["version"]), (&json!("USDC"), &json!("2")));
    assert_eq!(a["amount"], "7", "a price set in config makes a free tool priced");
    app.shutdown().await;
}

#[tokio::test]
async fn free_tool_runs_without_payment() {
    let app = spawn_app().await;
    let result = app.sessionless().call_tool("echo", json!({ "text": "hello there" }), None).await;
    assert_eq!(result["isError"], false);
    assert_eq!(result["structuredContent"], json!({ "text": "hello there" }));
    assert!(result.get("_meta").is_none(), "no payment response on a free call");
    app.shutdown().await;
}

#[tokio::test]
async fn bad_arguments_are_rejected_before_any_challenge() {
    // Arrange: a priced tool and three kinds of bad arguments.
    let app = spawn_app().await;
    let mcp = app.sessionless();
    let cases = [
        (json!({}), "missing required"),
        (json!({ "text": 42 }), "wrong type"),
        (json!({ "text": "x", "extra": true }), "unknown property"),
        (json!({ "text": "x".repeat(70_000) }), "too long"),
    ];
    for (args, why) in cases {
        // Act
        let result = mcp.call_tool("sha256", args, None).await;
        // Assert: a clear tool error, and nothing that looks like a price.
        assert_eq!(result["isError"], true, "{why}");
        let body = &result["structuredContent"];
        assert_eq!(body["error"], "invalid_arguments", "{why}: {body}");
        assert_eq!(body["charged"], false, "{why}");
        assert!(!body["problems"].as_array().unwrap().is_empty(), "{why}: names the problem");
        assert!(body.get("accepts").is_none() && body.get("x402Version").is_none(), "{why}: no challenge");
    }
    app.shutdown().await;
}

#[tokio::test]
async fn unknown_tool_is_a_jsonrpc_error_without_a_challenge() {
    let app = spawn_app().await;
    let response = app.sessionless().call_tool_raw("no_such_tool", json!({}), None).await;
    assert_eq!(response["error"]["code"], -32602, "{response}");
    assert!(response["error"]["message"].as_str().unwrap().contains("no_such_tool"));
    assert!(response.get("result").is_none());
    app.shutdown().await;
}

#[tokio::test]
async fn session_clients_and_sessionless_requests_both_work() {
    // Arrange
    let app = spawn_app().await;
    // Act: a 2025-era client with a session, and a bare request without one.
    let with_session = Mcp::with_session(&app.mcp_url()).await;
    let in_session = with_session.call_tool("sha256", json!({ "text": "a" }), None).await;
    let sessionless = app.sessionless().call_tool("sha256", json!({ "text": "a" }), None).await;
    let listed = with_session.list_tools().await;
    // Assert: the same challenge either way.
    assert!(with_session.session.as_deref().is_some_and(|s| !s.is_empty()));
    assert_eq!(in_session["structuredContent"], sessionless["structuredContent"]);
    assert_eq!(listed.len(), 5, "three built-ins and the counted and slow test tools");
    app.shutdown().await;
}

#[tokio::test]
async fn server_keeps_serving_after_malformed_jsonrpc_and_oversized_bodies() {
    // Arrange: a small body limit.
    let app = spawn_app_with(|c| c.server.max_body_bytes = 4096).await;
    let mcp = app.sessionless();
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("not json", b"{{{ nope".to_vec()),
        ("not utf8", vec![0xff, 0xfe, 0x00, 0x7b]),
        ("json but not json-rpc", br#"{"hello": "world"}"#.to_vec()),
        ("wrong params type", br#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":7}"#.to_vec()),
        ("unknown method", br#"{"jsonrpc":"2.0","id":1,"method":"nope/nope","params":{}}"#.to_vec()),
        ("empty", Vec::new()),
        (
            "oversized",
            format!(r#"{{"jsonrpc":"2.0","id":1,"method":"tools/list","pad":"{}"}}"#, "x".repeat(10_000))
                .into_bytes(),
        ),
    ];
    for (why, body) in garbage {
        // Act
        let response = mcp.post_bytes(body).await;
        let status = response.status();
        let text = response.text().await.unwrap();
        // Assert: a clear refusal, never a crash or a 5xx.
        assert!(!status.is_server_error(), "{why}: HTTP {status} {text}");
        let refused = status.is_client_error() || text.contains("\"error\"");
        assert!(refused, "{why}: must be refused, got HTTP {status} {text}");
        if why == "oversized" {
            assert_eq!(status, 413, "{why}");
        }
    }
    // ... and the server still serves.
    assert_eq!(mcp.list_tools().await.len(), 5);
    app.shutdown().await;
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let app = spawn_app().await;
    let http = reqwest::Client::new();
    let health = http.get(format!("{}/healthz", app.base_url())).send().await.unwrap();
    let ready = http.get(format!("{}/readyz", app.base_url())).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(ready.status(), 200);
    let id = |r: &reqwest::Response| r.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_owned());
    assert!(id(&health).is_some(), "every response carries a request id");
    assert_ne!(id(&health), id(&ready), "each its own");
    let mine = http
        .get(format!("{}/healthz", app.base_url()))
        .header("x-request-id", "agent-7")
        .send()
        .await
        .unwrap();
    assert_eq!(id(&mine).as_deref(), Some("agent-7"), "a client's own id is kept");
    app.shutdown().await;
}

#[tokio::test]
async fn serves_from_postgres_as_from_sqlite() {
    let url = crate::helpers::fresh_pg_url().await;
    let app = spawn_app_with(|c| c.database.url = url.into()).await;
    let result = app.sessionless().call_tool("sha256", json!({ "text": "pg" }), None).await;
    assert_eq!(result["structuredContent"]["x402Version"], 2);
    let ready = reqwest::get(format!("{}/readyz", app.base_url())).await.unwrap();
    assert_eq!(ready.status(), 200);
    app.shutdown().await;
}
