//! `tollgate call`: the paying client, against tollgate itself (and, in interop, others).

use alloy::primitives::U256;
use serde_json::{Value, json};
use tokio::process::Command;

use crate::helpers::{COUNTED_PRICE, TestApp, spawn_app};

/// Runs `tollgate call` for the `counted` tool with the demo payer's key.
async fn tollgate_call(app: &TestApp, extra: &[&str]) -> std::process::Output {
    let allow = format!("{}:{}", app.state.network.caip2, app.chain.token);
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["call", "--url", &app.mcp_url(), "--tool", "counted", "--args", r#"{"text":"cli"}"#])
        .arg("--key-file")
        .arg(app.dir.path().join("payer.key"))
        .args(["--allow-asset", &allow])
        .args(extra)
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn tollgate_call_pays_once_and_reports_the_settlement() {
    let app = spawn_app().await;
    let payer = app.payer().address();
    let before = app.balance(payer).await;
    let out = tollgate_call(&app, &["--json"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["result"]["structuredContent"]["echo"], "cli");
    assert_eq!(report["paymentResponse"]["success"], true);
    assert_eq!(report["paid"]["amount"], COUNTED_PRICE.to_string());
    assert_eq!(before - app.balance(payer).await, U256::from(COUNTED_PRICE));
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn tollgate_call_refuses_prices_and_assets_outside_its_caps() {
    let app = spawn_app().await;
    let payer = app.payer().address();
    let before = app.balance(payer).await;
    // Price above --max-amount.
    let out = tollgate_call(&app, &["--max-amount", "1000"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("exceeds --max-amount"), "{err}");
    // A token that was not allowed (no --allow-asset for the local test USDC).
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["call", "--url", &app.mcp_url(), "--tool", "counted"])
        .arg("--key-file")
        .arg(app.dir.path().join("payer.key"))
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("asset not allowed"), "{err}");
    assert_eq!(app.balance(payer).await, before, "nothing was signed or paid");
    assert_eq!(app.runs(), 0);
    app.shutdown().await;
}

#[tokio::test]
async fn tollgate_call_keeps_a_total_cap_across_calls() {
    let app = spawn_app().await;
    let ledger = app.dir.path().join("spend.json");
    let cap = ["--total-cap", "2000", "--spend-file", ledger.to_str().unwrap()];
    let first = tollgate_call(&app, &cap).await;
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let second = tollgate_call(&app, &cap).await;
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && err.contains("total cap"), "{err}");
    let spent: Value = serde_json::from_str(&std::fs::read_to_string(&ledger).unwrap()).unwrap();
    assert_eq!(spent["spent"], COUNTED_PRICE.to_string());
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}

/// Runs `tollgate call --json` for tool `t` on a fake server, paying (if asked) with a fresh key.
async fn call_fake(url: &str, extra: &[&str]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("payer.key");
    std::fs::write(&key, tollgate::chain::anvil::DEV_KEYS[6]).unwrap();
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["call", "--url", url, "--tool", "t", "--json"])
        .arg("--key-file")
        .arg(&key)
        .args(extra)
        .output()
        .await
        .unwrap()
}

/// A fake x402 MCP server: a price, then for the paid call an internal error without a
/// charging claim, then a bare HTTP 500, then the paid result. It records every payment.
#[derive(Clone, Default)]
struct Flaky {
    payments: std::sync::Arc<std::sync::Mutex<Vec<Value>>>,
}

async fn flaky(
    axum::extract::State(fake): axum::extract::State<Flaky>,
    axum::Json(request): axum::Json<Value>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let reply =
        |result: Value| axum::Json(json!({ "jsonrpc": "2.0", "id": request["id"], "result": result }));
    match request["method"].as_str().unwrap_or_default() {
        "initialize" => {
            reply(json!({ "protocolVersion": "2025-06-18", "capabilities": {}, "serverInfo": { "name": "flaky", "version": "0" } }))
                .into_response()
        }
        "tools/call" => {
            let Some(payment) = request.pointer("/params/_meta/x402~1payment").cloned() else {
                let accepts = json!([{
                    "scheme": "exact", "network": "eip155:31337", "amount": "1000",
                    "asset": "0x5FbDB2315678afecb367f032d93F642f64180aa3",
                    "payTo": "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC",
                    "maxTimeoutSeconds": 300, "extra": { "name": "USD Coin", "version": "2" },
                }]);
                let required = json!({ "x402Version": 2, "error": "payment required", "resource": { "url": "mcp://tool/t" }, "accepts": accepts });
                let text = required.to_string();
                return reply(json!({ "isError": true, "structuredContent": required, "content": [{ "type": "text", "text": text }] }))
                    .into_response();
            };
            let attempt = {
                let mut payments = fake.payments.lock().unwrap();
                payments.push(payment);
                payments.len()
            };
            match attempt {
                1 => reply(json!({ "isError": true, "structuredContent": { "error": "internal_error", "message": "boom" },
                                   "content": [{ "type": "text", "text": "boom" }] }))
                .into_response(),
                2 => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
                _ => reply(json!({ "isError": false, "structuredContent": { "ok": true }, "content": [{ "type": "text", "text": "ok" }],
                                   "_meta": { "x402/payment-response": { "success": true, "transaction": "0x01", "network": "eip155:31337" } } }))
                .into_response(),
            }
        }
        _ => axum::http::StatusCode::ACCEPTED.into_response(),
    }
}

#[tokio::test]
async fn tollgate_call_resends_the_same_payment_until_an_answer_proves_the_outcome() {
    // Arrange
    let fake = Flaky::default();
    let router = axum::Router::new().route("/mcp", axum::routing::post(flaky)).with_state(fake.clone());
    let url = format!("{}/mcp", crate::helpers::serve_on_loopback(router).await);
    // Act
    let out =
        call_fake(&url, &["--allow-asset", "eip155:31337:0x5FbDB2315678afecb367f032d93F642f64180aa3"]).await;
    // Assert: three attempts, one authorization; the user is told why it was resent.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let payments = fake.payments.lock().unwrap().clone();
    assert_eq!(payments.len(), 3, "{stderr}");
    assert!(payments.iter().all(|p| *p == payments[0]), "never a second signature: {payments:?}");
    assert!(stderr.contains("resending the same payment (never a new one)"), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["paymentResponse"]["success"], true, "{report}");
}

/// Answers `tools/call` as an SSE event whose JSON spans two `data:` lines (joined by the SSE
/// rules with a newline), as servers that pretty-print or chunk their events do.
async fn multiline_sse(axum::Json(request): axum::Json<Value>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match request["method"].as_str().unwrap_or_default() {
        "initialize" => axum::Json(json!({ "jsonrpc": "2.0", "id": request["id"], "result": {
            "protocolVersion": "2025-06-18", "capabilities": { "tools": {} }, "serverInfo": { "name": "sse", "version": "0" } } }))
        .into_response(),
        "tools/call" => {
            let id = &request["id"];
            let event = format!(
                "event: message\ndata: {{\"jsonrpc\":\"2.0\",\"id\":{id},\ndata: \"result\":{{\"content\":[{{\"type\":\"text\",\"text\":\"two lines\"}}],\"isError\":false}}}}\n\n"
            );
            ([("content-type", "text/event-stream")], event).into_response()
        }
        _ => axum::http::StatusCode::ACCEPTED.into_response(),
    }
}

#[tokio::test]
async fn tollgate_call_reads_an_sse_event_whose_data_spans_several_lines() {
    // Arrange
    let router = axum::Router::new().route("/mcp", axum::routing::post(multiline_sse));
    let url = format!("{}/mcp", crate::helpers::serve_on_loopback(router).await);
    // Act
    let out = call_fake(&url, &[]).await;
    // Assert
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["result"]["content"][0]["text"], "two lines", "{report}");
}
