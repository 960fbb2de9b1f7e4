//! The facilitator settler against a fake facilitator: a real HTTP server in the test that
//! really settles on anvil (or refuses, fails, or hangs after settling, as told).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use alloy::primitives::{Address, U256};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};
use tollgate::config::SettlerKind;

use crate::helpers::{COUNTED_PRICE, TestApp, spawn_app_with};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Settle,
    Refuse,
    ServerError,
    SettleThenHang,
    SettleThenRefuse,
    SettleThenServerError,
}

#[derive(Clone)]
struct Fake {
    mode: Mode,
    rpc: String,
    settles: Arc<AtomicUsize>,
}

/// Starts the fake facilitator on port 0; returns its base URL.
async fn fake_facilitator(fake: Fake) -> String {
    let app = Router::new().route("/verify", post(verify)).route("/settle", post(settle)).with_state(fake);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

async fn verify(Json(body): Json<Value>) -> Json<Value> {
    let payer = body["paymentPayload"]["payload"]["authorization"]["from"].clone();
    assert_eq!(body["x402Version"], 2);
    assert_eq!(body["paymentRequirements"]["scheme"], "exact", "the server sends its own requirements");
    Json(json!({ "isValid": true, "payer": payer }))
}

async fn settle(State(fake): State<Fake>, Json(body): Json<Value>) -> Response {
    fake.settles.fetch_add(1, Ordering::SeqCst);
    let network = body["paymentRequirements"]["network"].clone();
    match fake.mode {
        Mode::Refuse => Json(json!({
            "success": false, "errorReason": "invalid_exact_evm_insufficient_balance",
            "transaction": "", "network": network,
        }))
        .into_response(),
        Mode::ServerError => (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        Mode::Settle | Mode::SettleThenHang => {
            let tx = submit_on_chain(&fake.rpc, &body).await;
            if fake.mode == Mode::SettleThenHang {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Json(json!({ "success": true, "transaction": tx, "network": network })).into_response()
        }
        // It lies: the transfer is on chain, the answer says it failed.
        Mode::SettleThenRefuse => {
            submit_on_chain(&fake.rpc, &body).await;
            Json(json!({
                "success": false, "errorReason": "invalid_exact_evm_transaction_failed",
                "transaction": "", "network": network,
            }))
            .into_response()
        }
        Mode::SettleThenServerError => {
            submit_on_chain(&fake.rpc, &body).await;
            (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response()
        }
    }
}

/// What a real facilitator does: submit transferWithAuthorization with its own key.
async fn submit_on_chain(rpc: &str, body: &Value) -> String {
    let asset: Address = body["paymentRequirements"]["asset"].as_str().unwrap().parse().unwrap();
    crate::helpers::submit_on_chain(rpc, asset, &body["paymentPayload"]).await
}

/// tollgate using a fake facilitator in `mode`.
async fn app_with_facilitator(mode: Mode) -> (TestApp, Arc<AtomicUsize>) {
    let settles = Arc::new(AtomicUsize::new(0));
    // The chain must exist before the facilitator knows its RPC: start the app, then point a
    // second replica of it at the facilitator.
    let app = spawn_app_with(|c| c.payment.settle_timeout_secs = 2).await;
    let url =
        fake_facilitator(Fake { mode, rpc: app.chain.anvil.endpoint(), settles: settles.clone() }).await;
    let mut app = app;
    let mut config = app.state.config.clone();
    config.payment.settler = SettlerKind::Facilitator;
    config.payment.facilitator.url = url;
    app.replace_server(config).await;
    (app, settles)
}

#[tokio::test]
async fn a_facilitator_settlement_is_confirmed_on_chain_before_the_handler_runs() {
    let (app, settles) = app_with_facilitator(Mode::Settle).await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    let result = app.pay("counted", json!({}), &payload).await;
    assert_eq!(result["isError"], false, "{result}");
    let tx = result["_meta"]["x402/payment-response"]["transaction"].as_str().unwrap();
    let receipt = app.anvil_rpc("eth_getTransactionReceipt", json!([tx])).await;
    assert_eq!(receipt["result"]["status"], "0x1");
    assert_eq!(before - app.balance(payer.address()).await, U256::from(COUNTED_PRICE));
    assert_eq!((settles.load(Ordering::SeqCst), app.runs()), (1, 1));
    app.shutdown().await;
}

#[tokio::test]
async fn a_facilitator_success_false_without_a_transfer_is_pending_and_then_expires_uncharged() {
    // Arrange
    let (app, _) = app_with_facilitator(Mode::Refuse).await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    // Act
    let result = app.pay("counted", json!({}), &payload).await;
    // Assert: `success:false` from /settle proves nothing (it may have broadcast): pending, never
    // a fresh price and never "nothing was charged", while the authorization could still land.
    let body = &result["structuredContent"];
    assert_eq!(body["error"], "payment_confirmation_pending", "{result}");
    assert!(body.get("accepts").is_none() && body.get("charged").is_none(), "{result}");
    assert_eq!(app.runs(), 0);
    // It never lands: once it expires, the reconciler fails it; nothing was charged.
    app.advance_time(400).await;
    let reconciler = tollgate::payment::reconcile::Reconciler::new(app.state.gate.clone(), Duration::ZERO);
    assert_eq!(reconciler.tick().await.unwrap().failed, 1);
    assert_eq!(app.balance(payer.address()).await, before);
    assert_eq!(app.runs(), 0);
    app.shutdown().await;
}

#[tokio::test]
async fn a_facilitator_that_settles_then_answers_a_failure_charges_once_and_serves_the_call() {
    for mode in [Mode::SettleThenRefuse, Mode::SettleThenServerError] {
        // Arrange
        let (app, settles) = app_with_facilitator(mode).await;
        let payer = app.payer();
        let before = app.balance(payer.address()).await;
        let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
        // Act: the first answer may be the result or "pending"; the retry must be the result.
        let first = app.pay("counted", json!({}), &payload).await;
        let first_status = first["structuredContent"]["error"].clone();
        assert!(first["isError"] == false || first_status == "payment_confirmation_pending", "{first}");
        let retry = app.pay("counted", json!({}), &payload).await;
        // Assert: one charge, one run, one receipt.
        assert_eq!(retry["isError"], false, "{retry}");
        assert!(retry["_meta"]["tollgate/receipt"].is_object(), "{retry}");
        assert_eq!(before - app.balance(payer.address()).await, U256::from(COUNTED_PRICE));
        assert_eq!((settles.load(Ordering::SeqCst), app.runs()), (1, 1));
        assert_eq!(app.state.store.receipt_count().await.unwrap(), 1);
        app.shutdown().await;
    }
}

#[tokio::test]
async fn a_facilitator_5xx_is_pending_never_served_and_fails_once_the_authorization_expires() {
    let (app, _) = app_with_facilitator(Mode::ServerError).await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    let result = app.pay("counted", json!({}), &payload).await;
    // A 5xx on /settle may have moved money: pending, not a new price.
    assert_eq!(result["structuredContent"]["error"], "payment_confirmation_pending", "{result}");
    assert_eq!(app.runs(), 0);
    // The authorization expires unspent: the reconciler fails it; nothing was charged.
    app.advance_time(400).await;
    let reconciler = tollgate::payment::reconcile::Reconciler::new(app.state.gate.clone(), Duration::ZERO);
    assert_eq!(reconciler.tick().await.unwrap().failed, 1);
    assert_eq!(app.balance(payer.address()).await, before);
    assert_eq!(app.runs(), 0);
    app.shutdown().await;
}

#[tokio::test]
async fn a_facilitator_timeout_after_settling_is_resolved_from_the_chain_and_charged_once() {
    let (app, settles) = app_with_facilitator(Mode::SettleThenHang).await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    // The facilitator's answer never comes; the chain already shows the paired transfer, so
    // the call is served at once instead of waiting for a retry.
    let result = app.pay("counted", json!({}), &payload).await;
    assert_eq!(result["isError"], false, "{result}");
    let retry = app.pay("counted", json!({}), &payload).await;
    assert_eq!(retry, result, "the retry gets the stored result");
    assert_eq!(before - app.balance(payer.address()).await, U256::from(COUNTED_PRICE));
    assert_eq!((settles.load(Ordering::SeqCst), app.runs()), (1, 1), "settled once, ran once");
    app.shutdown().await;
}
