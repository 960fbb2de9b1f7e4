//! Settlement that does not confirm in time: pending, never lost, collected by a retry.

use std::time::Duration;

use alloy::primitives::U256;
use serde_json::json;
use tollgate::clock::Clock;
use tollgate::payment::gate::args_hash;
use tollgate::payment::reconcile::Reconciler;
use tollgate::store::PaymentState;

use crate::helpers::{COUNTED_PRICE, spawn_app_with};

#[tokio::test]
async fn a_settlement_timeout_becomes_pending_then_is_reconciled_and_a_retry_gets_the_result() {
    // Arrange: blocks are only mined when we say so; settlement waits 1 s at most.
    let app = spawn_app_with(|c| c.payment.settle_timeout_secs = 1).await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    app.anvil_rpc("evm_setAutomine", json!([false])).await;
    // Act 1: the call times out waiting for its block.
    let pending = app.pay("counted", json!({}), &payload).await;
    // Assert 1: a status (not a price) naming the transaction; nothing ran.
    let body = &pending["structuredContent"];
    assert_eq!(body["error"], "payment_confirmation_pending", "{pending}");
    assert!(body.get("accepts").is_none() && body.get("x402Version").is_none(), "never a fresh challenge");
    let tx = body["transaction"].as_str().expect("the submitted transaction").to_owned();
    assert_eq!(app.runs(), 0);
    // A retry before the block is mined is still pending, and still not a price.
    let again = app.pay("counted", json!({}), &payload).await;
    assert_eq!(again["structuredContent"]["error"], "payment_confirmation_pending");
    // Act 2: the block arrives and the reconciler runs.
    app.anvil_rpc("evm_mine", json!([])).await;
    let report = Reconciler::new(app.state.gate.clone(), Duration::ZERO).tick().await.unwrap();
    // Assert 2: settled from chain state; the retry gets the result, paid once.
    assert_eq!(report.failed, 0, "{report:?}");
    let row = app.state.store.unresolved(10).await.unwrap();
    assert!(row.is_empty(), "nothing left unresolved: {row:?}");
    let result = app.pay("counted", json!({}), &payload).await;
    assert_eq!(result["isError"], false, "{result}");
    assert_eq!(result["_meta"]["x402/payment-response"]["transaction"], tx.as_str());
    assert_eq!(before - app.balance(payer.address()).await, U256::from(COUNTED_PRICE));
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn a_retry_collects_a_pending_payment_even_before_the_reconciler_runs() {
    let app = spawn_app_with(|c| c.payment.settle_timeout_secs = 1).await;
    let payer = app.payer();
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    app.anvil_rpc("evm_setAutomine", json!([false])).await;
    let pending = app.pay("counted", json!({}), &payload).await;
    assert_eq!(pending["structuredContent"]["error"], "payment_confirmation_pending");
    app.anvil_rpc("evm_mine", json!([])).await;
    let result = app.pay("counted", json!({}), &payload).await;
    assert_eq!(result["isError"], false, "{result}");
    assert_eq!(app.runs(), 1);
    app.shutdown().await;
}

#[tokio::test]
async fn a_pending_payment_that_never_lands_fails_after_expiry_and_charges_nothing() {
    // Arrange: a pending settlement whose transaction is then dropped from the mempool.
    let app = spawn_app_with(|c| c.payment.settle_timeout_secs = 1).await;
    let payer = app.payer();
    let before = app.balance(payer.address()).await;
    let payload = app.sign(&payer, &app.requirements("counted", json!({})).await);
    app.anvil_rpc("evm_setAutomine", json!([false])).await;
    let pending = app.pay("counted", json!({}), &payload).await;
    let tx = pending["structuredContent"]["transaction"].as_str().unwrap().to_owned();
    app.anvil_rpc("anvil_dropTransaction", json!([tx])).await;
    app.anvil_rpc("evm_setAutomine", json!([true])).await;
    let reconciler = Reconciler::new(app.state.gate.clone(), Duration::ZERO);
    // Act: before expiry it stays pending; after expiry (injected clock) it fails.
    let early = reconciler.tick().await.unwrap();
    app.advance_time(400).await;
    let late = reconciler.tick().await.unwrap();
    // Assert
    assert_eq!(early.still_pending, 1, "{early:?}");
    assert_eq!(late.failed, 1, "{late:?}");
    let retry = app.pay("counted", json!({}), &payload).await;
    assert_eq!(retry["structuredContent"]["error"], "invalid_exact_evm_payload_authorization_valid_before");
    assert_eq!(app.balance(payer.address()).await, before, "nothing was charged");
    assert_eq!(app.runs(), 0);
    app.shutdown().await;
}

#[tokio::test]
async fn rows_still_in_flight_are_left_to_their_request_and_abandoned_claims_are_released() {
    let app = spawn_app_with(|_| {}).await;
    let payer = app.payer();
    let requirements = app.requirements("counted", json!({})).await;
    let payload = app.sign(&payer, &requirements);
    // A claim whose request died before submitting (as after a crash).
    let quote = app.state.catalog.current().get("counted").unwrap().quote.clone().unwrap();
    let input = tollgate::payment::decode::PaymentInput::Meta(payload.clone());
    let verified = tollgate::payment::verify::verify(
        &input,
        &quote,
        &app.state.network.domain(),
        app.clock.now_unix(),
        6,
    )
    .unwrap();
    let claimed = app
        .state
        .gate
        .claim(&verified, &quote, &Default::default(), &args_hash(&Default::default()), &Default::default())
        .await
        .unwrap();
    assert!(
        matches!(claimed, tollgate::payment::gate::Claimed::Fresh(ref r) if r.state == PaymentState::Claimed)
    );
    let reconciler = Reconciler::new(app.state.gate.clone(), Duration::from_secs(60));
    assert_eq!(reconciler.tick().await.unwrap().skipped_in_flight, 1, "fresh rows belong to their request");
    app.clock.advance(61);
    assert_eq!(reconciler.tick().await.unwrap().released, 1, "stale claims are released");
    // The authorization is usable again.
    let result = app.pay("counted", json!({}), &payload).await;
    assert_eq!(result["isError"], false, "{result}");
    app.shutdown().await;
}
