//! `tollgate call`: the paying client, against tollgate itself (and, in interop, others).

use alloy::primitives::U256;
use serde_json::Value;
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
