//! One authorization, many concurrent requests: exactly one handler run and one transfer.

use std::sync::Arc;

use alloy::primitives::U256;
use serde_json::{Value, json};

use crate::helpers::{COUNTED_PRICE, Mcp, TestApp, fresh_pg_url, spawn_app, spawn_app_with};

/// Sends `n` copies of one payment, spread round-robin over `urls`, all at once.
async fn storm(urls: &[String], payload: &Value, n: usize) -> Vec<Value> {
    let payload = Arc::new(payload.clone());
    let calls = (0..n).map(|i| {
        let mcp = Mcp::sessionless(&urls[i % urls.len()]);
        let payload = payload.clone();
        tokio::spawn(async move {
            let meta = json!({ "x402/payment": *payload });
            mcp.call_tool("counted", json!({ "text": "storm" }), Some(meta)).await
        })
    });
    let mut results = Vec::new();
    for call in calls.collect::<Vec<_>>() {
        results.push(call.await.unwrap());
    }
    results
}

/// Every answer is the paid result or a clear "in progress" status — never a price.
fn assert_one_outcome(results: &[Value]) {
    let mut paid = 0;
    for r in results {
        let body = &r["structuredContent"];
        if r["isError"] == false {
            assert_eq!(body["run"], 1, "every success is the one run: {r}");
            paid += 1;
        } else {
            assert_eq!(body["error"], "payment_in_progress", "only in-progress refusals: {r}");
            assert!(body.get("accepts").is_none(), "a status is never a price");
        }
    }
    assert!(paid >= 1, "at least the winner got the result");
}

async fn assert_charged_once(app: &TestApp, payer: alloy::primitives::Address, before: U256) {
    assert_eq!(before - app.balance(payer).await, U256::from(COUNTED_PRICE), "exactly one transfer");
    assert_eq!(app.runs(), 1, "exactly one handler run");
}

#[tokio::test]
async fn fifty_concurrent_calls_with_one_authorization_run_the_handler_once_on_sqlite() {
    // Arrange
    let app = spawn_app().await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    // Act
    let results = storm(&[app.mcp_url()], &payload, 50).await;
    // Assert
    assert_one_outcome(&results);
    assert_charged_once(&app, payer.address(), before).await;
    // Afterwards, a retry gets the stored result.
    let retry = app.pay("counted", json!({ "text": "storm" }), &payload).await;
    assert_eq!(retry["structuredContent"]["run"], 1);
    app.shutdown().await;
}

#[tokio::test]
async fn fifty_concurrent_calls_through_two_instances_sharing_postgres_run_the_handler_once() {
    // Arrange: two replicas, one Postgres.
    let url = fresh_pg_url().await;
    let app = spawn_app_with(|c| c.database.url = url.into()).await;
    let sibling = app.sibling().await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    // Act
    let results = storm(&[app.mcp_url(), sibling.mcp_url()], &payload, 50).await;
    // Assert
    assert_one_outcome(&results);
    assert_charged_once(&app, payer.address(), before).await;
    sibling.shutdown().await;
    app.shutdown().await;
}

#[tokio::test]
async fn concurrent_distinct_payments_each_get_one_receipt_on_sqlite() {
    // Regression: under concurrent writers SQLite once refused receipt appends (SQLITE_BUSY on
    // a deferred transaction), leaving paid calls without receipts. The load test found it.
    let app = spawn_app().await;
    let requirements = app.requirements("counted", json!({})).await;
    let payloads: Vec<Value> = (0..24).map(|_| app.sign(&app.payer(), &requirements)).collect();
    let calls = payloads.into_iter().map(|payload| {
        let mcp = app.sessionless();
        tokio::spawn(async move {
            mcp.call_tool("counted", json!({}), Some(json!({ "x402/payment": payload }))).await
        })
    });
    let mut with_receipt = 0;
    for call in calls.collect::<Vec<_>>() {
        let result = call.await.unwrap();
        assert_eq!(result["isError"], false, "{result}");
        with_receipt += usize::from(result["_meta"].get("tollgate/receipt").is_some());
    }
    assert_eq!(with_receipt, 24, "every paid answer carries its receipt");
    assert_eq!(app.state.store.receipt_count().await.unwrap(), 24);
    assert_eq!(app.runs(), 24);
    app.shutdown().await;
}
