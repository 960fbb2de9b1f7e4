//! Telling the truth about charging: once a transaction may exist, no answer says "nothing was
//! charged", and a slow handler runs once however often the payer retries.

use std::sync::atomic::Ordering;
use std::time::Duration;

use alloy::primitives::U256;
use serde_json::{Value, json};

use crate::helpers::{COUNTED_PRICE, TestApp, pg_behind_relay, spawn_app_with};

/// An answer that claims nothing about money and offers no price.
fn assert_no_false_claims(answer: &Value) {
    let body = &answer["structuredContent"];
    assert_ne!(body["charged"], false, "must not say nothing was charged: {answer}");
    assert!(
        body.get("accepts").is_none() && body.get("x402Version").is_none(),
        "never a fresh price: {answer}"
    );
    assert!(!answer.to_string().contains("nothing was charged"), "{answer}");
}

async fn until_submitted(app: &TestApp) {
    let submitted = async {
        while !app.state.store.unresolved(10).await.unwrap().iter().any(|r| r.tx_hash.is_some()) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), submitted).await.expect("tollgate submitted");
}

#[tokio::test]
async fn a_store_failure_while_recording_a_settlement_never_says_nothing_was_charged() {
    // Arrange: Postgres behind a relay we can cut; our settlement waits in the mempool.
    let (relay, through_relay) = pg_behind_relay().await;
    let app = spawn_app_with(|c| c.database.url = through_relay.into()).await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    app.anvil_rpc("evm_setAutomine", json!([false])).await;
    let mcp = app.sessionless();
    let sent = payload.clone();
    let call = tokio::spawn(async move {
        mcp.call_tool("counted", json!({}), Some(json!({ "x402/payment": sent }))).await
    });
    until_submitted(&app).await;
    // Act: the store goes away, then the block with our transfer arrives.
    relay.up.store(false, Ordering::SeqCst);
    let cut = async {
        // The relay drops live connections within 20 ms: wait until every one is closed (a
        // pooled connection not yet dropped would still record the settlement) and the store
        // really fails.
        while app.state.store.ping().await.is_ok() || relay.live.load(Ordering::SeqCst) > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), cut).await.expect("the store is cut off");
    app.anvil_rpc("evm_mine", json!([])).await;
    let answer = call.await.unwrap();
    // Assert: the money moved and could not be recorded: say so, never "not charged".
    assert_eq!(answer["structuredContent"]["error"], "payment_outcome_unknown", "{answer}");
    assert_no_false_claims(&answer);
    assert_eq!(app.runs(), 0);
    // The store returns: the same payment gets its result, charged once.
    relay.up.store(true, Ordering::SeqCst);
    app.anvil_rpc("evm_setAutomine", json!([true])).await;
    let retry = app.pay("counted", json!({}), &payload).await;
    assert_eq!(retry["isError"], false, "{retry}");
    assert_eq!(before - app.balance(payer.address()).await, U256::from(COUNTED_PRICE));
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn damaged_stored_payment_data_is_an_internal_error_not_a_fresh_challenge() {
    // Arrange: a pending payment whose stored payload is then damaged.
    let app = spawn_app_with(|c| c.payment.settle_timeout_secs = 1).await;
    let payer = app.payer();
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    app.anvil_rpc("evm_setAutomine", json!([false])).await;
    let pending = app.pay("counted", json!({}), &payload).await;
    assert_eq!(pending["structuredContent"]["error"], "payment_confirmation_pending", "{pending}");
    let db = format!("sqlite://{}", app.dir.path().join("tollgate.db").display());
    let pool = sqlx::SqlitePool::connect(&db).await.unwrap();
    sqlx::query("update payments set payload_json = '{\"damaged\":true}'").execute(&pool).await.unwrap();
    // Act
    let retry = app.pay("counted", json!({}), &payload).await;
    // Assert
    assert_eq!(retry["structuredContent"]["error"], "internal_error", "{retry}");
    assert_no_false_claims(&retry);
    assert_eq!(app.runs(), 0);
    app.anvil_rpc("evm_setAutomine", json!([true])).await;
    app.shutdown().await;
}

#[tokio::test]
async fn a_handler_slower_than_the_request_timeout_runs_once_and_the_late_client_is_told_pending() {
    // Arrange: requests time out after 4 s; tools are cut off after 3 s; the tool sleeps 10 s.
    let app = spawn_app_with(|c| {
        c.server.request_timeout_secs = 4;
        c.payment.settle_timeout_secs = 2;
        c.tools.timeout_secs = 3;
    })
    .await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let args = json!({ "secs": 10 });
    let payload = app.sign(&payer, &app.requirements("slow", args.clone()).await);
    // Act 1: the call outlives what the client may wait for.
    let first = app.pay("slow", args.clone(), &payload).await;
    // Assert 1: told to resend the same payment (not a bare 408, not a price).
    assert_eq!(first["structuredContent"]["error"], "payment_confirmation_pending", "{first}");
    assert_no_false_claims(&first);
    // Act 2: retries while the handler still runs, then after it was cut off.
    let during = app.pay("slow", args.clone(), &payload).await;
    assert_eq!(during["structuredContent"]["error"], "payment_in_progress", "{during}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = app.pay("slow", args.clone(), &payload).await;
    // Assert 2: one run, one charge; the paid answer records the timeout, with its receipt.
    assert_eq!(after["structuredContent"]["error"], "tool_timeout", "{after}");
    assert!(after["_meta"]["tollgate/receipt"].is_object(), "{after}");
    assert_eq!(app.runs(), 1, "the handler ran once");
    assert_eq!(before - app.balance(payer.address()).await, U256::from(COUNTED_PRICE));
    app.shutdown().await;
}
